"""``python -m sparsec ...`` runs the ``sparsec`` command line."""

from sparsec.cli import main

raise SystemExit(main())
