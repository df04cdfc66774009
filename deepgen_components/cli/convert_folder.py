"""Rewrite a DeepGenPipeline folder of format 1 or 2 in the diffusers schema (issue #22), in place.

    python -m deepgen_components.cli.convert_folder deepgen_components/shapes/preset

Loads the folder, saves it with ``DeepGenPipeline.save_pretrained`` beside it, checks that every tensor of the
model reads back bit-identical, carries over the files that are not part of the pipeline (e.g. the preset's
training_report.json), then replaces the folder. Used for the shipped ``deepgen-shapes`` preset. (Folders of
formats 1 and 2 also load as they are; this only brings one up to date.)
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

import torch

from deepgen_components.pipeline import DeepGenPipeline
from deepgen_components.serialization import COMPONENTS, replace_folder


def convert(folder: Path) -> None:
    old = DeepGenPipeline.from_pretrained(folder)
    staging = folder.with_name(f"{folder.name}.diffusers")
    old.save_pretrained(staging)
    new = DeepGenPipeline.from_pretrained(staging)
    before, after = old.model.state_dict(), new.model.state_dict()
    different = sorted(k for k in before if k not in after or not torch.equal(before[k], after[k]))
    if different or set(before) != set(after):
        shutil.rmtree(staging)
        raise SystemExit(f"{folder}: tensors differ after the rewrite: {different[:5]}")
    if new.model.config != old.model.config or new.model.layers != old.model.layers:
        shutil.rmtree(staging)
        raise SystemExit(f"{folder}: config or layer selection differ after the rewrite")
    for extra in folder.iterdir():  # files that belong to the folder, not to the pipeline
        if extra.name not in (*COMPONENTS, "model_index.json") and not (staging / extra.name).exists():
            copy = shutil.copytree if extra.is_dir() else shutil.copy2
            copy(extra, staging / extra.name)
    replace_folder(staging, folder)
    print(f"{folder}: rewritten in the diffusers schema, {len(before)} tensors bit-identical")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folders", nargs="+", type=Path)
    for folder in parser.parse_args(argv).folders:
        convert(folder)
    return 0


if __name__ == "__main__":
    sys.exit(main())
