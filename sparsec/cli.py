"""The ``sparsec`` command line: ``sparsec explain SPEC --shape OUTxIN [--dtype] [--batch]``, and ``sparsec tune``
(``sparsec.tuning``)."""

from __future__ import annotations

import argparse
import re
import sys

from sparsec.dtypes import KERNEL_DTYPES
from sparsec.errors import SparsecError
from sparsec.explainer import explain_spec
from sparsec.runtime.strategies import PROGRAMS
from sparsec.tuning import run as run_tune


def _shape(text: str) -> tuple[int, int]:
    m = re.fullmatch(r"\s*(\d+)\s*[xX]\s*(\d+)\s*", text)
    if not m:
        raise argparse.ArgumentTypeError(f"shape {text!r} is not OUTxIN, e.g. 4096x1024")
    return int(m.group(1)), int(m.group(2))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="sparsec", description="sparsec: a sparse-training compiler")
    sub = parser.add_subparsers(dest="command", required=True)
    ex = sub.add_parser("explain", help="show the IR, passes, format, cost model and generated source of a layer")
    ex.add_argument("spec", help="a sparsity spec, e.g. 2:4, 90%%, 'block(32x32, 90%%)', 'fanin(k=64)'")
    ex.add_argument("--shape", type=_shape, required=True, help="weight shape OUTxIN, e.g. 4096x1024")
    ex.add_argument("--dtype", default="fp16", choices=[d for d in KERNEL_DTYPES if d != "tf32"])
    ex.add_argument("--batch", type=int, default=4096, help="rows of the activation for the cost model")
    ex.add_argument("--no-bias", action="store_true")
    ex.add_argument("--activation", choices=["relu", "gelu", "silu"])
    ex.add_argument("--no-source", action="store_true", help="leave out the generated Triton source")
    tune = sub.add_parser("tune", help="tune every sparse layer of a model; move tuning caches between machines")
    tune.add_argument("model", nargs="?", help="module:function returning the model (an nn.Module)")
    tune.add_argument("--batch", type=int, nargs="+", default=[1, 256], help="batch sizes to tune (rows)")
    tune.add_argument("--programs", nargs="+", choices=PROGRAMS, default=list(PROGRAMS))
    tune.add_argument("--device", default="cpu", help="where the model runs while tuning: cpu, cuda, cuda:1")
    tune.add_argument("--export", dest="export_file", help="write this device's tuning entries to FILE")
    tune.add_argument("--import", dest="import_file", help="merge FILE's entries (refused unless from this device)")
    args = parser.parse_args(argv)
    if args.command == "tune":
        if not (args.model or args.export_file or args.import_file):
            parser.error("tune needs a model (module:function), --export FILE or --import FILE")
        try:
            return run_tune(args)
        except SparsecError as e:
            print(f"sparsec: error: {e}", file=sys.stderr)
            return 2
    out, inn = args.shape
    try:
        print(
            explain_spec(
                args.spec, out, inn, args.dtype, args.batch, not args.no_bias, args.activation, not args.no_source
            )
        )
    except SparsecError as e:
        print(f"sparsec: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
