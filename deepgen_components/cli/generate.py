"""``deepgen generate``, ``edit``, ``info`` and ``demo``: the pipeline's own commands."""

from __future__ import annotations

import json
import time
from pathlib import Path

from deepgen_components.cli.args import (
    DEFAULT_PRESET,
    add_model_args,
    check_output_path,
    image_side,
    load_pipeline,
    non_negative_float,
    positive_int,
    text,
    write_images,
)

DEMO_PROMPTS = ("a red circle on the left on a gray background", "a yellow square on the right on a navy background")
# An edit the shipped model performs in 10 of 10 seeds (ShapesEval); "make the circle green" fails: docs/shapes.md
DEMO_INSTRUCTION = "turn the circle into a square"


def _generator(args):
    import torch

    return torch.Generator().manual_seed(args.seed)


def _print_timings(label: str, timings: dict) -> None:
    parts = ", ".join(f"{k} {v * 1000:.0f} ms" for k, v in timings.items())
    print(f"{label}: {parts}")


def cmd_generate(args) -> int:
    out = check_output_path(args.out, folder=False)
    return _sample_and_save(args, out, args.prompt)


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
    return _sample_and_save(args, out, args.instruction, image=images)


def _sample_and_save(args, out: Path, prompt: str, **inputs) -> int:
    """``generate`` / ``edit`` after their own checks: load the pipeline, run it with the sampling flags, write the
    images to ``out`` and print the timings."""
    pipe = load_pipeline(args)
    pipe.set_progress_bar_config(disable=args.quiet)
    result = pipe(
        prompt,
        negative_prompt=args.negative_prompt,
        height=args.height,
        width=args.width,
        num_inference_steps=args.steps,
        guidance_scale=args.guidance,
        num_images_per_prompt=args.num_images,
        generator=_generator(args),
        **inputs,
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
    pipe.set_progress_bar_config(disable=args.quiet)
    prompts = args.prompt or list(DEMO_PROMPTS)
    generated = pipe(
        prompts,
        num_inference_steps=args.steps,
        guidance_scale=args.guidance,
        generator=_generator(args),
    )
    instruction = args.instruction
    edited = pipe(
        instruction,
        image=generated.images[0],
        num_inference_steps=args.steps,
        guidance_scale=args.guidance,
        generator=_generator(args),
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


def add_commands(sub) -> None:

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
