"""The ``deepgen`` command line: generate, edit, info, demo (and export / train / bench when installed).

Model sources, for every command that needs a model: ``--preset NAME`` (embedded presets, no downloads),
``--pipeline DIR`` (a folder written by ``DeepGenPipeline.save_pretrained``) or ``--vlm DIR --weights PATH
[--vae DIR]`` (the official DeepGen 1.0 weights from local paths).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
import time
from pathlib import Path

__all__ = ["main"]

DEFAULT_PRESET = "deepgen-shapes"  # trained on the shapes world and shipped in the package; "tiny" is random
DEMO_PROMPTS = ("a red circle on the left on a gray background", "a yellow square on the right on a navy background")
# An edit the shipped model performs in 10 of 10 seeds (ShapesEval); "make the circle green" fails: docs/shapes.md
DEMO_INSTRUCTION = "turn the circle into a square"
DTYPES = ("float32", "bfloat16", "float16")
MAX_SEED = 2**64 - 1
# Errors a user's input causes, printed as one line (exit 2); FloatingPointError (non-finite latents) is a failed run
# (exit 1). A ValueError / TypeError counts only when our own code raised it: one from inside torch, numpy or another
# library is a bug and keeps its traceback. --debug (or DEEPGEN_DEBUG=1) shows the traceback of any error.
USER_ERRORS = (ValueError, TypeError, OSError, FloatingPointError)


class ArgumentParser(argparse.ArgumentParser):
    """argparse with one-line errors: ``deepgen CMD: error: MESSAGE (see `deepgen CMD --help`)``, exit code 2."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")


# -- argument types: argparse reports their errors as "argument --NAME: MESSAGE" ------------------------------------
def int_at_least(minimum: int):
    """An argparse type: an integer >= ``minimum``."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer >= {minimum}, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {value}")
        return value

    return parse


positive_int = int_at_least(1)  # steps, images, batch sizes, threads


def non_negative_float(text: str) -> float:
    """A finite number >= 0 (CFG scales: 1 = no CFG, 0 = the unconditional branch alone)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {text!r}") from None
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0 (1 = no CFG), got {text}")
    return value


def image_side(text: str) -> int:
    """A positive multiple of 32 (px), the resolution rule of every DeepGen model."""
    from deepgen_components.conventions import nearest_multiples

    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive multiple of 32, got {text!r}") from None
    if value < 32 or value % 32:
        raise argparse.ArgumentTypeError(
            f"must be a positive multiple of 32, got {value}; nearest valid: {nearest_multiples(value, 32)}"
        )
    return value


def seed(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer in 0..2**64-1, got {text!r}") from None
    if not 0 <= value <= MAX_SEED:
        raise argparse.ArgumentTypeError(f"must be in 0..2**64-1 (torch.Generator().manual_seed), got {value}")
    return value


def text(value: str) -> str:
    """A prompt or an instruction: not empty or blank."""
    if not value.strip():
        raise argparse.ArgumentTypeError("is empty; describe the image (or the edit) in words")
    return value


def check_output_path(path: str | os.PathLike, *, folder: bool, flag: str = "--out") -> Path:
    """Fail before any work when ``path`` cannot be written: an existing file where a folder is needed (or the
    reverse), a file on the way to it, a folder we may not write to, or (for images) an unknown extension."""
    path = Path(path)
    if folder and path.exists() and not path.is_dir():
        raise ValueError(f"{flag} {path}: exists and is not a folder")
    if not folder:
        if path.is_dir():
            raise ValueError(f"{flag} {path}: is a folder; give a file name such as {path / 'image.png'}")
        from PIL import Image

        Image.init()
        extensions = Image.registered_extensions()
        if extensions.get(path.suffix.lower()) not in Image.SAVE:
            got = f"unknown image extension {path.suffix!r}" if path.suffix else "no file extension"
            raise ValueError(f"{flag} {path}: {got}; use .png, .jpg or .webp")
    ancestor = path if folder else path.parent
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise ValueError(f"{flag} {path}: {ancestor} is a file, not a folder")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise ValueError(f"{flag} {path}: {ancestor} is not writable")
    return path


def write_images(items: list[tuple[object, Path]]) -> None:
    """Save (image, path) pairs: each to a temporary name beside its target, then all renamed into place, so a
    failure (disk full, bad path) leaves neither a partial file nor a folder we created."""
    created: list[Path] = []
    temporary: list[Path] = []
    try:
        for image, path in items:
            missing = [d for d in reversed(path.parents) if not d.exists()]
            path.parent.mkdir(parents=True, exist_ok=True)
            created += missing
            tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp{path.suffix}")
            temporary.append(tmp)
            image.save(tmp)
        for tmp, (_, path) in zip(temporary, items):
            os.replace(tmp, path)
    except BaseException:
        for tmp in temporary:
            tmp.unlink(missing_ok=True)
        for folder in reversed(created):
            try:
                folder.rmdir()
            except OSError:
                pass
        raise


def add_model_args(
    parser: argparse.ArgumentParser,
    *,
    default_preset: str | None = DEFAULT_PRESET,
    title: str = "model",
    seed_help: str = "random seed, 0..2**64-1 (default: 0)",
):
    """The model flags every command that loads a pipeline shares (read by ``load_pipeline``); returns the group,
    so a command can add flags of its own to it."""
    group = parser.add_argument_group(title)
    group.add_argument("--preset", default=None, help=f"embedded preset (default: {default_preset}); see `deepgen info`")
    group.add_argument("--pipeline", default=None, help="folder saved by DeepGenPipeline.save_pretrained")
    group.add_argument("--vlm", default=None, help="local Qwen2.5-VL-3B-Instruct folder (official weights)")
    group.add_argument("--weights", default=None, help="official DeepGen checkpoint file or diffusers-format folder")
    group.add_argument("--vae", default=None, help="SD3 VAE folder (with an original-layout checkpoint)")
    group.add_argument("--device", default="cpu", help="torch device, e.g. cpu, cuda, cuda:1 (default: cpu)")
    group.add_argument("--dtype", default="float32", choices=DTYPES, help="weights dtype (default: float32)")
    group.add_argument("--seed", type=seed, default=0, help=seed_help)
    parser.set_defaults(default_preset=default_preset)
    return group


def _dtype(name: str):
    import torch

    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def check_device(name: str, flag: str = "--device"):
    """A torch.device that exists here: ``--device nope`` or ``--device cuda`` without CUDA fail naming the flag."""
    import torch

    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        raise ValueError(f"{flag} {name}: not a torch device; use cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"{flag} {name}: CUDA is not available on this machine")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"{flag} {name}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    elif device.type not in ("cpu", "meta", "mps", "xpu"):
        raise ValueError(f"{flag} {name}: unsupported device type {device.type!r}; use cpu, cuda or cuda:N")
    return device


def check_model_source(args) -> None:
    """The model flags, checked before any loading: one source, --vlm with --weights, a known preset."""
    from deepgen_components.builders import PRESETS

    check_device(args.device)
    sources = [bool(args.preset), bool(args.pipeline), bool(args.vlm or args.weights)]
    if sum(sources) > 1:
        raise ValueError("choose one model source: --preset, --pipeline, or --vlm/--weights")
    if (args.vlm or args.weights) and not (args.vlm and args.weights):
        raise ValueError("--vlm and --weights go together (official weights from local paths)")
    if args.pipeline and not (Path(args.pipeline) / "model_index.json").is_file():
        raise FileNotFoundError(f"--pipeline {args.pipeline}: no model_index.json there (not a saved DeepGenPipeline)")
    for flag in ("vlm", "weights", "vae"):
        if getattr(args, flag) and not Path(getattr(args, flag)).exists():
            raise FileNotFoundError(f"--{flag} {getattr(args, flag)}: no such file or folder")
    if not (args.pipeline or args.vlm):
        name = args.preset or args.default_preset
        if name not in PRESETS:
            raise ValueError(f"--preset: unknown preset {name!r}; presets: {', '.join(sorted(PRESETS))}")


def load_pipeline(args):
    """The pipeline the model flags of ``add_model_args`` name, on ``args.device`` in ``args.dtype``."""
    import torch

    from deepgen_components.builders import build_preset, deepgen_1_0
    from deepgen_components.pipeline import DeepGenPipeline

    check_model_source(args)
    dtype = _dtype(args.dtype)
    if args.pipeline:
        return DeepGenPipeline.from_pretrained(args.pipeline, device=args.device, dtype=dtype)
    if args.vlm:
        model = deepgen_1_0(args.vlm, args.weights, vae_path=args.vae, dtype=dtype)
        return DeepGenPipeline(model.to(args.device))
    name = args.preset or args.default_preset
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
    out = check_output_path(args.out, folder=False)
    pipe = load_pipeline(args)
    result = pipe(
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
    for p in _save_images(result.images, out):
        print(f"wrote {p}")
    _print_timings("timings", result.timings)
    return 0


def cmd_edit(args) -> int:
    from deepgen_components.processing import load_image

    out = check_output_path(args.out, folder=False)
    images = []
    for path in args.image:
        try:
            images.append(load_image(path))
        except FileNotFoundError as err:
            raise FileNotFoundError(f"image {err}") from None
        except ValueError as err:
            raise ValueError(f"image {err}") from None
    pipe = load_pipeline(args)
    result = pipe(
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
    for p in _save_images(result.images, out):
        print(f"wrote {p}")
    _print_timings("timings", result.timings)
    return 0


def _save_images(images, out: Path) -> list[Path]:
    """One image to ``out``; several to ``out_0``, ``out_1``, ... (atomically, see :func:`write_images`)."""
    paths = [out] if len(images) == 1 else [out.with_name(f"{out.stem}_{i}{out.suffix}") for i in range(len(images))]
    write_images(list(zip(images, paths)))
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
        raise ValueError(f"--preset: unknown preset {name!r}; presets: {', '.join(sorted(PRESETS))}")
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
    out = check_output_path(args.out, folder=True)
    start = time.perf_counter()
    pipe = load_pipeline(args)
    print(f"loaded {args.preset or args.pipeline or args.default_preset} in {time.perf_counter() - start:.2f} s")
    prompts = args.prompt or list(DEMO_PROMPTS)
    generated = pipe(
        prompts,
        num_inference_steps=args.steps,
        guidance_scale=args.guidance,
        generator=_generator(args),
        progress=not args.quiet,
    )
    instruction = args.instruction
    edited = pipe(
        instruction,
        image=generated.images[0],
        num_inference_steps=args.steps,
        guidance_scale=args.guidance,
        generator=_generator(args),
        progress=not args.quiet,
    )
    # Written only once both calls succeeded: a failing edit leaves no generate_*.png behind.
    items = [(image, out / f"generate_{i}.png") for i, image in enumerate(generated.images)]
    write_images(items + [(edited.images[0], out / "edit_0.png")])
    for i, (_, path) in enumerate(items):
        print(f"wrote {path}  ({prompts[i]!r})")
    _print_timings("generate", generated.timings)
    print(f"wrote {out / 'edit_0.png'}  ({instruction!r} applied to generate_0.png)")
    _print_timings("edit", edited.timings)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(prog="deepgen", description="DeepGen 1.0 components: generate, edit, inspect.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log more")
    parser.add_argument("--debug", action="store_true",
                        help="show the full traceback of an error (also DEEPGEN_DEBUG=1); by default a bad input is "
                             "one line")
    sub = parser.add_subparsers(dest="command", required=True)

    def sampling_args(p):
        p.add_argument("--height", type=image_side, default=None, help="output height, multiple of 32")
        p.add_argument("--width", type=image_side, default=None, help="output width, multiple of 32")
        p.add_argument("--steps", type=positive_int, default=50, help="denoising steps, >= 1 (default: 50)")
        p.add_argument("--guidance", type=non_negative_float, default=None,
                       help="CFG scale >= 0; 1 disables CFG (default: the model's, 4.0 unless it ships its own: "
                            "deepgen-shapes edits with 1.0)")
        p.add_argument("--negative-prompt", default="", help="negative prompt (default: empty)")
        p.add_argument("--num-images", type=positive_int, default=1, help="images per prompt, >= 1")
        p.add_argument("--quiet", action="store_true", help="no progress bar")

    p = sub.add_parser("generate", help="prompt -> PNG")
    p.add_argument("prompt", type=text)
    p.add_argument("--out", default="generated.png", help="output image path (.png, .jpg, .webp)")
    sampling_args(p)
    add_model_args(p)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("edit", help="image + instruction -> PNG")
    p.add_argument("image", nargs="+", help="reference image path(s); several for multi-reference editing")
    p.add_argument("--instruction", "-i", type=text, required=True, help="the editing instruction")
    p.add_argument("--out", default="edited.png", help="output image path (.png, .jpg, .webp)")
    sampling_args(p)
    add_model_args(p)
    p.set_defaults(func=cmd_edit)

    p = sub.add_parser("info", help="parameters per component of a preset (built on the meta device)")
    p.add_argument("--preset", default=None, help=f"preset name (default: {DEFAULT_PRESET})")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("demo", help="the README's main job: generate + edit on an embedded preset, PNGs into --out")
    p.add_argument("--out", default="demo_out", help="output folder (default: demo_out)")
    p.add_argument("--prompt", action="append", type=text, help="prompt(s) to generate (repeatable)")
    p.add_argument("--instruction", type=text, default=DEMO_INSTRUCTION, help="edit applied to the first image")
    p.add_argument("--steps", type=positive_int, default=20, help="denoising steps, >= 1 (default: 20)")
    p.add_argument("--guidance", type=non_negative_float, default=None,
                   help="CFG scale of both calls (default: the model's per task; deepgen-shapes: 4.0 to generate, "
                        "1.0 to edit)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    add_model_args(p)
    p.set_defaults(func=cmd_demo)

    _add_optional_commands(sub)
    return parser


def _add_optional_commands(sub) -> None:
    """Commands that live in the export / training / benchmark packages register themselves here."""
    for module_name in ("deepgen_components.export.cli", "deepgen_components.training.cli", "deepgen_components.bench",
                        "deepgen_components.evaluation.cli"):
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
            prog = f"{parser.prog} {args.command}"
            parser.exit(2, f"{prog}: error: unrecognized arguments: {' '.join(extras)} (see `{prog} --help`)\n")
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if args.debug or os.environ.get("DEEPGEN_DEBUG", "") not in ("", "0"):
        return args.func(args)
    try:
        return args.func(args)
    except USER_ERRORS as err:
        if not _is_user_error(err):
            raise
        message = "; ".join(line.strip() for line in str(err).splitlines() if line.strip()) or type(err).__name__
        print(f"deepgen {args.command}: error: {message}", file=sys.stderr)
        return 1 if isinstance(err, FloatingPointError) else 2


def _is_user_error(err: BaseException) -> bool:
    """OSError always (files, folders, disks); ValueError / TypeError / FloatingPointError when raised by our own
    code (a validation message), not from inside a library (a bug, which keeps its traceback)."""
    if isinstance(err, OSError):
        return True
    tb = err.__traceback__
    while tb.tb_next is not None:
        tb = tb.tb_next
    module = tb.tb_frame.f_globals
    return module.get("__name__", "").startswith("deepgen_components") or module.get("__file__") == __file__


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
