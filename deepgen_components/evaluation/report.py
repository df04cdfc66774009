"""The report of a run: ``summary.json`` and ``summary.md`` (scores per category and overall, the model and pipeline,
the protocol, the seeds, timing, images/s) and ``contact_sheet.png`` (the first sample of a few prompts)."""

from __future__ import annotations

import json
import math
from pathlib import Path

from PIL import Image, ImageDraw

from deepgen_components.evaluation.layouts import write_text_atomic

__all__ = ["contact_sheet", "write_summary"]


def contact_sheet(images: list[Image.Image], labels: list[str], *, tile: int = 128, columns: int = 8) -> Image.Image:
    """A grid of ``images`` (resized to ``tile`` px), each with its label (the prompt id) under it."""
    if not images:
        raise ValueError("contact_sheet: no images")
    columns = min(columns, len(images))
    rows = math.ceil(len(images) / columns)
    label_h = 14
    sheet = Image.new("RGB", (columns * tile, rows * (tile + label_h)), "white")
    draw = ImageDraw.Draw(sheet)
    for i, (image, label) in enumerate(zip(images, labels)):
        x, y = (i % columns) * tile, (i // columns) * (tile + label_h)
        sheet.paste(image.convert("RGB").resize((tile, tile)), (x, y))
        draw.text((x + 2, y + tile + 1), label[:20], fill="black")
    return sheet


def _fmt(value) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def write_summary(out: Path, summary: dict) -> None:
    """``summary.json`` (everything) and ``summary.md`` (the same, for people), both written atomically."""
    write_text_atomic(out / "summary.json", json.dumps(summary, indent=2, ensure_ascii=False) + "\n")
    settings, timing, model = summary["settings"], summary["timing"], summary["model"]
    lines = [
        f"# {settings['benchmark']}: {summary['prompts']} prompts, {summary['images']} images",
        "",
        f"- model: {model['source']} ({model.get('parameters', 'n/a')} parameters), pipeline {model['pipeline']}, "
        f"mode {model['mode']}, dtype {model['dtype']}, device {model['device']}",
        f"- protocol: {settings['protocol']} ({summary['protocol_source']}): {settings['height']}x{settings['width']} "
        f"px, {settings['steps']} steps, CFG {settings['guidance']}, {settings['samples']} sample(s) per prompt",
        f"- seeds: {summary['seeds']['rule']} (every prompt's seeds in seeds.jsonl)",
        f"- layout: `images/` in the {summary['layout']} layout; generated this run {timing['generated_prompts']} "
        f"prompts, {timing['skipped_prompts']} already finished",
        f"- timing: {timing['generation_seconds']:.1f} s generating on {timing['world_size']} process(es), "
        f"{_fmt(timing['images_per_second'])} images/s; scoring {timing['scoring_seconds']:.1f} s",
        "",
    ]
    for result in summary["scores"]:
        lines += [f"## {result['name']}: overall {_fmt(result['overall'])}", ""]
        if result.get("notes"):
            lines += [result["notes"], ""]
        if result["categories"]:
            lines += ["| category | score |", "|---|---|"]
            lines += [f"| {k} | {_fmt(v)} |" for k, v in result["categories"].items()]
            lines.append("")
        if result["metrics"]:
            lines += ["| metric | value |", "|---|---|"]
            lines += [f"| {k} | {_fmt(v)} |" for k, v in result["metrics"].items()]
            lines.append("")
    if not summary["scores"]:
        lines += ["No evaluator ran; score `images/` with the benchmark's official scorer (docs/eval.md).", ""]
    if summary.get("contact_sheet"):
        lines += [f"![contact sheet]({summary['contact_sheet']})", ""]
    write_text_atomic(out / "summary.md", "\n".join(lines))
