"""The ``deepgen`` command line: generate, edit, info, demo (and export / train / bench when installed).

Model sources, for every command that needs a model: ``--preset NAME`` (embedded presets, no downloads),
``--pipeline DIR`` (a folder written by ``DeepGenPipeline.save_pretrained``) or ``--vlm DIR --weights PATH
[--vae DIR]`` (the official DeepGen 1.0 weights from local paths).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

__all__ = ["main"]

DEFAULT_PRESET = "deepgen-shapes"  # trained on the shapes world and shipped in the package; "tiny" is random
DEMO_PROMPTS = ("a red circle on the left on a gray background", "a yellow square on the right on a navy background")
DEMO_INSTRUCTION = "make the circle green"
_DTYPES = ("float32", "bfloat16", "float16")


def _add_model_args(parser: argparse.ArgumentParser, *, default_preset: str | None = DEFAULT_PRESET) -> None:
    group = parser.add_argument_group("model")
    group.add_argument("--preset", default=None, help=f"embedded preset (default: {default_preset}); see `deepgen info`")
    group.add_argument("--pipeline", default=None, help="folder saved by DeepGenPipeline.save_pretrained")
    group.add_argument("--vlm", default=None, help="local Qwen2.5-VL-3B-Instruct folder (official weights)")
    group.add_argument("--weights", default=None, help="official DeepGen checkpoint file or diffusers-format folder")
    group.add_argument("--vae", default=None, help="SD3 VAE folder (with an original-layout checkpoint)")
    group.add_argument("--device", default="cpu", help="torch device, e.g. cpu, cuda, cuda:1 (default: cpu)")
    group.add_argument("--dtype", default="float32", choices=_DTYPES, help="weights dtype (default: float32)")
    group.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    parser.set_defaults(default_preset=default_preset)


def _dtype(name: str):
    import torch

    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def _load_pipeline(args):
    import torch

    from deepgen_components.builders import PRESETS, build_preset, deepgen_1_0
    from deepgen_components.pipeline import DeepGenPipeline

    dtype = _dtype(args.dtype)
    sources = [bool(args.preset), bool(args.pipeline), bool(args.vlm or args.weights)]
    if sum(sources) > 1:
        raise SystemExit("error: choose one model source: --preset, --pipeline, or --vlm/--weights")
    if args.pipeline:
        return DeepGenPipeline.from_pretrained(args.pipeline, device=args.device, dtype=dtype)
    if args.vlm or args.weights:
        if not (args.vlm and args.weights):
            raise SystemExit("error: --vlm and --weights go together (official weights from local paths)")
        model = deepgen_1_0(args.vlm, args.weights, vae_path=args.vae, dtype=dtype)
        return DeepGenPipeline(model.to(args.device))
    name = args.preset or args.default_preset
    if name not in PRESETS:
        raise SystemExit(f"error: unknown preset {name!r}; presets: {', '.join(sorted(PRESETS))}")
    torch.manual_seed(args.seed)
    model = build_preset(name)
    return DeepGenPipeline(model.to(device=args.device, dtype=dtype))


def _generator(args):
    import torch

    return torch.Generator().manual_seed(args.seed)


def _print_timings(label: str, timings: dict) -> None:
    parts = ", ".join(f"{k} {v * 1000:.0f} ms" for k, v in timings.items())
    print(f"{label}: {parts}")


def cmd_generate(args) -> int:
    pipe = _load_pipeline(args)
    out = pipe(
        args.prompt,
        negative_prompt=args.negative_prompt,
        height=args.height,
        width=args.width,
        num_inference_steps=args.steps,
        guidance_scale=args.guidance,
        num_images_per_prompt=args.num_images,
        generator=_generator(args),
        progress=not args.quiet,
    )
    paths = _save_images(out.images, Path(args.out))
    for p in paths:
        print(f"wrote {p}")
    _print_timings("timings", out.timings)
    return 0


def cmd_edit(args) -> int:
    from PIL import Image

    images = []
    for path in args.image:
        if not Path(path).is_file():
            raise SystemExit(f"error: --image {path}: no such file")
        images.append(Image.open(path))
    pipe = _load_pipeline(args)
    out = pipe(
        args.instruction,
        image=images,
        negative_prompt=args.negative_prompt,
        height=args.height,
        width=args.width,
        num_inference_steps=args.steps,
        guidance_scale=args.guidance,
        num_images_per_prompt=args.num_images,
        generator=_generator(args),
        progress=not args.quiet,
    )
    for p in _save_images(out.images, Path(args.out)):
        print(f"wrote {p}")
    _print_timings("timings", out.timings)
    return 0


def _save_images(images, out: Path) -> list[Path]:
    out.parent.mkdir(parents=True, exist_ok=True)
    if len(images) == 1:
        images[0].save(out)
        return [out]
    paths = []
    for i, image in enumerate(images):
        path = out.with_name(f"{out.stem}_{i}{out.suffix or '.png'}")
        image.save(path)
        paths.append(path)
    return paths


def parameter_counts(model) -> dict[str, int]:
    """Parameters per component: VLM, SCB (think tokens + bridge), DiT, VAE, total."""
    count = lambda module: sum(p.numel() for p in module.parameters())
    counts = {
        "vlm": count(model.encoder.vlm),
        "scb": count(model.think_tokens) + count(model.bridge),
        "think_tokens": count(model.think_tokens),
        "bridge": count(model.bridge),
        "dit": count(model.dit),
        "vae": count(model.vae),
    }
    counts["total"] = counts["vlm"] + counts["scb"] + counts["dit"] + counts["vae"]
    return counts


def cmd_info(args) -> int:
    from deepgen_components.builders import PRESETS, build_preset

    name = args.preset or DEFAULT_PRESET
    if name not in PRESETS:
        raise SystemExit(f"error: unknown preset {name!r}; presets: {', '.join(sorted(PRESETS))}")
    start = time.perf_counter()
    model = build_preset(name, device="meta")
    counts = parameter_counts(model)
    info = {
        "preset": name,
        "parameters": counts,
        "layers": list(model.layers.indices),
        "think_tokens": model.think_tokens.num_tokens,
        "bridge": model.bridge.config.to_dict(),
        "built_on": "meta",
        "seconds": round(time.perf_counter() - start, 2),
    }
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    print(f"preset {name} (built on the meta device in {info['seconds']} s, no weights allocated)")
    for key in ("vlm", "think_tokens", "bridge", "scb", "dit", "vae", "total"):
        value = counts[key]
        print(f"  {key:<13} {value:>15,}  ({value / 1e9:.3f} B)")
    print(f"  stacked layers {info['layers']}, {info['think_tokens']} think tokens")
    return 0


def cmd_demo(args) -> int:
    """The README's main job: text-to-image and an edit of that image, PNGs into --out, per-stage timings."""
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    pipe = _load_pipeline(args)
    print(f"loaded {args.preset or args.pipeline or args.default_preset} in {time.perf_counter() - start:.2f} s")
    prompts = args.prompt or list(DEMO_PROMPTS)
    generated = pipe(
        prompts,
        num_inference_steps=args.steps,
        guidance_scale=args.guidance,
        generator=_generator(args),
        progress=not args.quiet,
    )
    for i, image in enumerate(generated.images):
        path = out / f"generate_{i}.png"
        image.save(path)
        print(f"wrote {path}  ({prompts[i]!r})")
    _print_timings("generate", generated.timings)
    instruction = args.instruction
    edited = pipe(
        instruction,
        image=generated.images[0],
        num_inference_steps=args.steps,
        guidance_scale=args.guidance,
        generator=_generator(args),
        progress=not args.quiet,
    )
    path = out / "edit_0.png"
    edited.images[0].save(path)
    print(f"wrote {path}  ({instruction!r} applied to generate_0.png)")
    _print_timings("edit", edited.timings)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="deepgen", description="DeepGen 1.0 components: generate, edit, inspect.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log more")
    sub = parser.add_subparsers(dest="command", required=True)

    def sampling_args(p):
        p.add_argument("--height", type=int, default=None, help="output height, multiple of 32")
        p.add_argument("--width", type=int, default=None, help="output width, multiple of 32")
        p.add_argument("--steps", type=int, default=50, help="denoising steps (default: 50)")
        p.add_argument("--guidance", type=float, default=None,
                       help="CFG scale; 1 disables CFG (default: the model's, 4.0 unless it ships its own: "
                            "deepgen-shapes edits with 1.0)")
        p.add_argument("--negative-prompt", default="", help="negative prompt (default: empty)")
        p.add_argument("--num-images", type=int, default=1, help="images per prompt")
        p.add_argument("--quiet", action="store_true", help="no progress bar")

    p = sub.add_parser("generate", help="prompt -> PNG")
    p.add_argument("prompt")
    p.add_argument("--out", default="generated.png", help="output PNG path")
    sampling_args(p)
    _add_model_args(p)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("edit", help="image + instruction -> PNG")
    p.add_argument("image", nargs="+", help="reference image path(s); several for multi-reference editing")
    p.add_argument("--instruction", "-i", required=True, help="the editing instruction")
    p.add_argument("--out", default="edited.png", help="output PNG path")
    sampling_args(p)
    _add_model_args(p)
    p.set_defaults(func=cmd_edit)

    p = sub.add_parser("info", help="parameters per component of a preset (built on the meta device)")
    p.add_argument("--preset", default=None, help=f"preset name (default: {DEFAULT_PRESET})")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("demo", help="the README's main job: generate + edit on an embedded preset, PNGs into --out")
    p.add_argument("--out", default="demo_out", help="output folder (default: demo_out)")
    p.add_argument("--prompt", action="append", help="prompt(s) to generate (repeatable)")
    p.add_argument("--instruction", default=DEMO_INSTRUCTION, help="edit applied to the first image")
    p.add_argument("--steps", type=int, default=20, help="denoising steps (default: 20)")
    p.add_argument("--guidance", type=float, default=None,
                   help="CFG scale of both calls (default: the model's per task; deepgen-shapes: 4.0 to generate, "
                        "1.0 to edit)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    _add_model_args(p)
    p.set_defaults(func=cmd_demo)

    _add_optional_commands(sub)
    return parser


def _add_optional_commands(sub) -> None:
    """Commands that live in the export / training / benchmark packages register themselves here."""
    for module_name in ("deepgen_components.export.cli", "deepgen_components.training.cli", "deepgen_components.bench"):
        try:
            module = __import__(module_name, fromlist=["add_commands"])
        except ModuleNotFoundError as err:
            if err.name and module_name.startswith(err.name):
                continue
            raise
        module.add_commands(sub)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extras = parser.parse_known_args(argv)
    if extras:
        # `deepgen train` takes key=value overrides anywhere among its options (argparse hands a positional
        # nargs='*' only the first run of them).
        if hasattr(args, "overrides") and all("=" in e and not e.startswith("-") for e in extras):
            args.overrides = [*args.overrides, *extras]
        else:
            parser.error(f"unrecognized arguments: {' '.join(extras)}")
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
