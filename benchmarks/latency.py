"""Latency suite (the same as ``deepgen bench``): per stage and end to end, per mode, with sweeps and plots.

    python benchmarks/latency.py --preset tiny --device cpu --dtype float32 --modes eager,compile --out out/bench
    python benchmarks/latency.py --preset deepgen-1.0 --device cuda --dtype bfloat16 \
        --modes eager,kernels,compile,compile+graphs --resolution 512 --steps 50 --out out/bench

See docs/benchmarks.md for what is measured and how.
"""

import argparse
import sys

from deepgen_components.cli.bench import add_commands


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="latency")
    sub = parser.add_subparsers(dest="command")
    add_commands(sub)
    args = parser.parse_args(["bench", *(sys.argv[1:] if argv is None else argv)])
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
