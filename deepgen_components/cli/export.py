"""``deepgen export``: every stage to ONNX with the parity gate, registered by ``deepgen_components.cli``.

    deepgen export --preset tiny --out exported/
    deepgen export --pipeline saved/ --out exported/ --stages condition_encoder,dit,vae_decoder \\
        --min-size 512 --max-size 1024 --max-batch 2 --dtype bfloat16 --opset 23 --trtexec
    deepgen export --preset small --device cuda --dtype float16 --out exported/ --tensorrt-version 10.15 --engine
    deepgen export --preset tiny --out exported_fp16/ --device cuda --dtype float16

``--device`` / ``--dtype`` load the model there and in that precision (``cli.args.load_pipeline``); the export
traces and parity-checks each stage on that device at that dtype (half precision against the bound derived from
the same stage in fp32, ``export.parity``).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
from pathlib import Path

from deepgen_components.cli.args import (
    add_model_args,
    check_output_path,
    image_side,
    int_at_least,
    load_pipeline,
    positive_int,
)

__all__ = ["add_commands", "cmd_export"]


def add_commands(sub) -> None:
    from deepgen_components.export.exporter import DEFAULT_OPSET, FALLBACK_OPSET
    from deepgen_components.export.specs import STAGES

    p = sub.add_parser(
        "export",
        help="ONNX per stage with dynamic shapes, parity-checked against PyTorch (manifest.json beside the files)",
        description="Export the model stage by stage to ONNX (torch.onnx dynamo exporter, dynamic batch / resolution "
        "/ context length, external data), check every fp32 file against PyTorch on ONNX Runtime at three other "
        "shapes (fp16/bf16: against PyTorch at the same dtype, within twice PyTorch's own error against fp32), and write "
        "manifest.json + tokenizer/ for OnnxDeepGenPipeline and TensorRT. --device/--dtype: where the model runs and "
        "the export precision (float32, float16, bfloat16).",
    )
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--stages", default=",".join(STAGES), help=f"comma-separated subset of {','.join(STAGES)} (default: all)")
    p.add_argument("--min-size", type=image_side, default=None, help="smallest image side in px, multiple of 32 (default: min(256, image_size))")
    p.add_argument("--max-size", type=image_side, default=1024, help="largest image side in px, multiple of 32 (default: 1024)")
    p.add_argument("--max-batch", type=positive_int, default=4, help="images per call; the CFG batch is twice that (default: 4)")
    p.add_argument("--max-prompt-tokens", type=positive_int, default=None,
                   help="tokens of one chat text incl. image tokens (default: max_length + one reference's image tokens)")
    p.add_argument("--opset", type=positive_int, default=DEFAULT_OPSET, help=f"ONNX opset (default: {DEFAULT_OPSET})")
    p.add_argument("--fallback-opset", type=int_at_least(0), default=FALLBACK_OPSET,
                   help=f"opset retried for a stage that fails at --opset; 0 disables (default: {FALLBACK_OPSET})")
    p.add_argument("--no-parity", action="store_true", help="skip the ONNX Runtime vs PyTorch gate (not recommended)")
    p.add_argument("--trtexec", action="store_true", help="print the trtexec command that builds each stage's engine")
    p.add_argument("--tensorrt-version", default=None, metavar="X.Y",
                   help="TensorRT the engines are for: a stage its ONNX parser cannot read at --opset (per the "
                        "compatibility table) is exported at --fallback-opset instead (default: no target)")
    p.add_argument("--engine", action="store_true",
                   help="after the export, build every stage's TensorRT engine into OUT/engines/ ahead of time (needs "
                        "tensorrt and a GPU; engines already up to date are kept)")
    p.add_argument("--optimization-level", type=int_at_least(0), default=3,
                   help="TensorRT builder optimisation level for --engine, 0..5 (default: 3)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    add_model_args(p)
    p.set_defaults(func=cmd_export)


def _ranges(args, image_size: int):
    from deepgen_components.export.specs import ExportRanges

    min_size = args.min_size if args.min_size is not None else min(256, image_size, args.max_size)
    return ExportRanges(
        min_size=min_size, max_size=args.max_size, max_batch=args.max_batch, max_prompt_tokens=args.max_prompt_tokens
    )


def cmd_export(args: argparse.Namespace) -> int:
    from deepgen_components.export.exporter import (
        SUPPORTED_DTYPES,
        SUPPORTED_OPSETS,
        ExportError,
        export_model,
    )
    from deepgen_components.export.parity import ParityError
    from deepgen_components.export.specs import STAGES
    from deepgen_components.export.tensorrt import profiles_for, trtexec_command

    if args.dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"--dtype: export supports {', '.join(SUPPORTED_DTYPES)}, got {args.dtype}")
    stages = [s.strip() for s in args.stages.split(",") if s.strip()]
    unknown = [s for s in stages if s not in STAGES]
    if unknown or not stages:
        raise ValueError(f"--stages: unknown stage(s) {', '.join(unknown) or '(none given)'}; stages: {', '.join(STAGES)}")
    for flag, opset in (("--opset", args.opset), ("--fallback-opset", args.fallback_opset or None)):
        if opset is not None and opset not in SUPPORTED_OPSETS:
            raise ValueError(f"{flag}: must be in {SUPPORTED_OPSETS.start}..{SUPPORTED_OPSETS.stop - 1}, got {opset}")
    if args.optimization_level > 5:
        raise ValueError(f"--optimization-level: must be in 0..5, got {args.optimization_level}")
    if args.tensorrt_version is not None:
        from deepgen_components.export.tensorrt_compat import version_tuple

        try:
            version_tuple(args.tensorrt_version)
        except ValueError:
            raise ValueError(f"--tensorrt-version: expected a version like 10.15 or 11.4.0, got {args.tensorrt_version!r}") from None
    if args.min_size is not None and args.min_size > args.max_size:
        raise ValueError(f"--min-size {args.min_size} must be <= --max-size {args.max_size}")
    out = check_output_path(args.out, folder=True)
    pipe = load_pipeline(args)
    model = pipe.model
    ranges = _ranges(args, model.config.image_size)
    source = {k: getattr(args, k) for k in ("preset", "pipeline", "vlm", "weights", "vae") if getattr(args, k)}
    if not source:
        source = {"preset": args.default_preset}
    source["seed"] = args.seed
    # Exported into a temporary folder beside --out, moved in only when every stage passed: a failed export leaves
    # neither partial .onnx files nor a manifest describing them.
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        manifest = export_model(
            model,
            staging,
            stages=stages,
            ranges=ranges,
            opset=args.opset,
            fallback_opset=args.fallback_opset or None,
            parity=not args.no_parity,
            progress=not args.quiet,
            source=source,
            seed=args.seed,
            dtype=args.dtype,
            tensorrt_version=args.tensorrt_version,
        )
        _move_into(staging, out)
    except (ExportError, ParityError) as err:
        message = "; ".join(line.strip() for line in str(err).splitlines() if line.strip())
        print(f"deepgen export: error: export failed: {message}", file=sys.stderr)
        return 1
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    print(f"wrote {args.out}/manifest.json ({manifest['dtype']} on {manifest['device']}, {len(manifest['stages'])} stages)")
    print(f"{'stage':<18} {'file':<24} {'opset':>5}  {'TensorRT':>8}  {'parity (max relative error)':<30}")
    for stage, entry in manifest["stages"].items():
        parity = entry["parity"]
        if "skipped" in parity:
            result = parity["skipped"]
        elif manifest["dtype"] == "float32":
            result = f"{parity['max_relative']:.2e} <= {parity['tolerance']:g}"
        else:
            result = (f"{parity['max_relative']:.2e} (torch {manifest['dtype']} vs fp32: {parity['max_torch_vs_fp32']:.2e}, "
                      f"bound 2x that or {parity['floor']:.2e}; {parity['runtime']})")
        fallback = " (fallback)" if entry["fallback"] else ""
        trt = entry["tensorrt"]["min_tensorrt"] or "none"
        print(f"{stage:<18} {entry['file']:<24} {entry['opset']:>5}{fallback}  {'>=' + trt:>8}  {result}")
    if args.trtexec:
        for stage, entry in manifest["stages"].items():
            print(f"# {stage}")
            print(trtexec_command(f"{args.out}/{entry['file']}", profiles_for(entry), timing_cache=f"{args.out}/timing.cache"))
    if args.engine:
        from deepgen_components.export.tensorrt import build_engines

        try:
            engines = build_engines(out, optimization_level=args.optimization_level, progress=not args.quiet)
        except (ImportError, RuntimeError) as err:
            print(f"deepgen export: error: --engine: {err}", file=sys.stderr)
            return 1
        for stage, path in engines.items():
            print(f"engine {stage}: {path}")
    return 0


def _move_into(staging: Path, out: Path) -> None:
    """Move an export from ``staging`` into ``out``: the whole folder when ``out`` does not exist, else entry by
    entry, replacing same-named files of an earlier export and keeping anything else the folder holds."""
    if not out.exists():
        os.replace(staging, out)
        return
    for entry in staging.iterdir():
        target = out / entry.name
        if target.is_dir() and not target.is_symlink():
            shutil.rmtree(target)
        os.replace(entry, target)
