"""``python -m sparsec ...`` runs the ``sparsec`` command line."""

from sparsec.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
