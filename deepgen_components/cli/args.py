"""What every ``deepgen`` subcommand shares: the model flags (:func:`add_model_args`, :func:`load_pipeline`),
argument types with one-line errors, output-path checks and image writing. Public: subcommands outside this package
(a user's own) build on it the same way ours do.

Model sources, for every command that needs a model: ``--preset NAME`` (embedded presets, no downloads),
``--pipeline DIR`` (a folder written by ``DeepGenPipeline.save_pretrained``) or ``--vlm DIR --weights PATH
[--vae DIR]`` (the official DeepGen 1.0 weights from local paths).
"""

from __future__ import annotations

import argparse
import math
import os
from pathlib import Path

__all__ = [
    "DEFAULT_PRESET",
    "DTYPES",
    "MAX_SEED",
    "USER_ERRORS",
    "ArgumentParser",
    "add_model_args",
    "check_device",
    "check_model_source",
    "check_output_path",
    "image_side",
    "int_at_least",
    "load_pipeline",
    "non_negative_float",
    "positive_int",
    "seed",
    "text",
    "write_images",
]

DEFAULT_PRESET = "deepgen-shapes"  # trained on the shapes world and shipped in the package; "tiny" is random
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
        return DeepGenPipeline.from_pretrained(args.pipeline, torch_dtype=dtype).to(args.device)
    if args.vlm:
        model = deepgen_1_0(args.vlm, args.weights, vae_path=args.vae, dtype=dtype)
        return DeepGenPipeline(model.to(args.device))
    name = args.preset or args.default_preset
    if name == "deepgen-shapes":  # a saved pipeline folder in the package, read the way diffusers users read one
        from diffusers import DiffusionPipeline

        from deepgen_components.builders import SHAPES_PRESET_DIR

        if not (SHAPES_PRESET_DIR / "model_index.json").is_file():
            raise FileNotFoundError(f"--preset deepgen-shapes: {SHAPES_PRESET_DIR} is missing; reinstall the package")
        # trust_remote_code runs the folder's pipeline file: two lines of this package, importing DeepGenPipeline
        pipe = DiffusionPipeline.from_pretrained(str(SHAPES_PRESET_DIR), torch_dtype=dtype, trust_remote_code=True)
        return pipe.to(args.device)
    torch.manual_seed(args.seed)
    model = build_preset(name)
    return DeepGenPipeline(model.to(device=args.device, dtype=dtype))
