"""Numerical parity with the official DeepGen 1.0 implementation, on a golden set.

    python benchmarks/fidelity.py --golden tests/data/golden/deepgen_tiny_a [--json fidelity.json]

Loads the golden set's weights through our official-weights import (official parity mode), reproduces
every recorded tensor through the public API (``deepgen_components.cli.fidelity.compare_golden``, the code
path ``tests/test_golden_parity.py`` asserts on) and prints one Markdown row per compared tensor: max abs
error, max relative error (max abs / max |golden|), the share of the tolerance used and the tolerance
(the golden README's rule: integers and bools exact, floats ``allclose(rtol=1e-4, atol=1e-4)``).
Exits 1 if any tensor is outside its tolerance. Works for any set laid out like ``deepgen_tiny_a``: prompts,
sizes, steps, seeds, CFG scale, connector heads and the layer count come from its manifest.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


def _json_number(value):
    """inf (a shape mismatch) as the string "inf": strict JSON has no infinity."""
    return "inf" if isinstance(value, float) and math.isinf(value) else value


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--golden", required=True, type=Path, help="golden set folder (manifest.json, tensors...)"
    )
    parser.add_argument(
        "--json", type=Path, default=None, help="also write the rows (and timings) as JSON here"
    )
    parser.add_argument(
        "--rtol", type=float, default=None, help="relative tolerance (default: README rule 1e-4)"
    )
    parser.add_argument(
        "--atol", type=float, default=None, help="absolute tolerance (default: README rule 1e-4)"
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch intra-op threads (default 1: the tensors are tiny, and extra threads only slow a busy machine)",
    )
    parser.add_argument("--no-via", action="store_true", help="leave out the 'computed by' column")
    args = parser.parse_args(argv)

    start = time.perf_counter()
    import torch
    from transformers.utils import logging as transformers_logging

    from deepgen_components.cli import fidelity

    transformers_logging.disable_progress_bar()
    torch.set_num_threads(args.threads)
    timings: dict[str, float] = {"import": time.perf_counter() - start}
    clock = time.perf_counter()
    try:
        golden = fidelity.load_golden(args.golden)
    except FileNotFoundError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    timings["load golden"] = time.perf_counter() - clock
    clock = time.perf_counter()
    model = fidelity.load_official_model(golden)
    timings["load model"] = time.perf_counter() - clock
    rows = fidelity.compare_golden(
        golden,
        model,
        rtol=fidelity.RTOL if args.rtol is None else args.rtol,
        atol=fidelity.ATOL if args.atol is None else args.atol,
        timings=timings,
    )
    timings["total"] = time.perf_counter() - start

    failed = [r for r in rows if not r.passed]
    unchecked = [r for r in rows if r.check == "not compared"]
    print(f"golden set: {args.golden.resolve()} ({golden.manifest.get('golden_set', '?')})")
    import diffusers
    import transformers

    print(
        f"torch {torch.__version__}, transformers {transformers.__version__}, diffusers {diffusers.__version__}, "
        f"{platform.machine()}, {args.threads} thread(s)\n"
    )
    print(fidelity.format_table(rows, with_via=not args.no_via))
    print()
    counts = {kind: sum(r.check == kind for r in rows) for kind in ("exact", "allclose", "sample", "input")}
    worst = max((r for r in rows if r.check == "allclose"), key=lambda r: r.tol_used, default=None)
    print(
        f"{len(rows)} rows: {counts['exact']} exact, {counts['allclose']} allclose, {counts['sample']} posterior "
        f"samples, {counts['input']} recorded inputs; {len(failed)} outside tolerance"
    )
    if worst is not None:
        print(
            f"largest share of the float tolerance: {worst.tol_used:.3f} ({worst.name}, max abs {worst.max_abs:.2e})"
        )
    if unchecked:
        print(f"not compared (no check defined): {', '.join(r.name for r in unchecked)}")
    print("timings (s): " + ", ".join(f"{k} {v:.2f}" for k, v in timings.items()))
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        payload = {
            "golden": str(args.golden.resolve()),
            "passed": not failed,
            "rows": [{k: _json_number(v) for k, v in r.to_dict().items()} for r in rows],
            "timings_s": timings,
        }
        args.json.write_text(json.dumps(payload, indent=1) + "\n")
    if failed:
        print(f"FAILED: {', '.join(r.name for r in failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
