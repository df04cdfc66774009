"""``deepgen convert``: a trained checkpoint to the official DeepGen layout or to a ready pipeline folder.

    deepgen convert --to official runs/sft_tiny deepgen_sft.safetensors
    deepgen convert --to pipeline runs/sft_tiny/checkpoints/step_00000050 my_pipeline/

CHECKPOINT is a checkpoint folder written by ``deepgen train`` (``step_XXXXXXXX/``), a run folder or its
``checkpoints/`` folder (the newest complete checkpoint), or a saved ``DeepGenPipeline`` folder. A checkpoint holds
only the trained weights; the model they belong to is rebuilt the way the run built it — the stage, ``model:`` and
``lora:`` sections recorded in the checkpoint's ``state.json`` (or, for older checkpoints, the run's
``config.yaml``), the ``model.init_from`` weights, then the checkpoint's tensors.

``--to official``: one safetensors file in the official layout (a) — think tokens, bridge, DiT and the VLM's LoRA
unmerged under ``lmm.*`` (its alpha in the file's metadata) — that ``deepgen_from_official`` /
``official.import_official_weights`` read back. ``--to pipeline``: a ``DeepGenPipeline`` folder, the LoRA merged into
the VLM weights (``save_pretrained`` writes a plain Hugging Face VLM).
"""

from __future__ import annotations

import json
from pathlib import Path

__all__ = ["add_commands", "load_trained_model", "resolve_checkpoint"]

_ACCEPTED = "a checkpoint folder (state.json), a run folder (checkpoints/) or a saved pipeline folder (model_index.json)"


def resolve_checkpoint(path: str | Path) -> tuple[str, Path]:
    """``("pipeline", folder)`` or ``("checkpoint", folder)`` for what CHECKPOINT names; a run folder or a
    ``checkpoints/`` folder gives its newest complete checkpoint."""
    from deepgen_components.training.checkpoint import latest_checkpoint

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"CHECKPOINT {path}: no such file or folder; expected {_ACCEPTED}")
    if not path.is_dir():
        raise ValueError(f"CHECKPOINT {path}: is a file; expected {_ACCEPTED}")
    if (path / "model_index.json").is_file():
        return "pipeline", path
    if (path / "state.json").is_file():
        return "checkpoint", path
    for folder in (path / "checkpoints", path):
        if folder.is_dir() and any(folder.glob("step_*")):
            newest = latest_checkpoint(folder)
            if newest is None:
                raise FileNotFoundError(f"CHECKPOINT {path}: no complete checkpoint (with state.json) in {folder}")
            return "checkpoint", newest
    raise ValueError(f"CHECKPOINT {path}: not {_ACCEPTED}")


def _run_config(checkpoint: Path):
    """The run's config as far as rebuilding its model goes: the stage / model / lora the trainer recorded in the
    checkpoint's ``state.json`` (exact for this checkpoint even if the run was resumed with another config), else
    the ``config.yaml`` of the run folder two levels up."""
    from deepgen_components.training.config import load_config

    extra = json.loads((checkpoint / "state.json").read_text()).get("extra") or {}
    if "stage" in extra and "model" in extra:
        return load_config(None, stage=extra["stage"], model=extra["model"], lora=extra.get("lora"))
    config = checkpoint.parent.parent / "config.yaml"
    if config.is_file():
        return load_config(config)
    raise FileNotFoundError(
        f"CHECKPOINT {checkpoint}: no config to rebuild its model from (state.json records no stage/model and "
        f"there is no {config}); checkpoints written by `deepgen train` carry both"
    )


def load_trained_model(checkpoint: str | Path):
    """The model of a training checkpoint, rebuilt as the run built it, its trained weights loaded, in eval mode:
    ``build_model`` from the config, the stage-2 LoRA (stages sft and rl, when the config has a ``lora:``
    section), the ``model.init_from`` weights, then the checkpoint's trainable tensors (every one must fit)."""
    from deepgen_components.lora import lora_module_names
    from deepgen_components.training.checkpoint import load_checkpoint
    from deepgen_components.training.stage_model import apply_lora, build_model, load_init_weights
    from deepgen_components.training.state import load_trainable

    checkpoint = Path(checkpoint)
    cfg = _run_config(checkpoint)
    model = build_model(cfg.model)
    if cfg.stage in ("sft", "rl") and cfg.lora is not None and not lora_module_names(model.encoder.vlm):
        apply_lora(model, cfg.lora)  # as configure_stage (sft) and the stage-3 trainer do
    if cfg.model.init_from:
        load_init_weights(model, cfg.model.init_from)
    load_trainable(model, load_checkpoint(checkpoint)["trainable"])
    return model.eval()


def _check_out(out: Path, target: str, overwrite: bool) -> None:
    from deepgen_components.cli.args import check_output_path

    if target == "official" and out.suffix != ".safetensors":
        raise ValueError(f"OUT {out}: --to official writes one .safetensors file; got "
                         f"{repr(out.suffix) if out.suffix else 'no extension'}")
    if out.exists() and not overwrite:
        raise FileExistsError(f"OUT {out}: exists; pass --overwrite to replace it")
    if target == "official" and out.is_dir():
        raise ValueError(f"OUT {out}: is a folder; --to official writes a .safetensors file")
    check_output_path(out if target == "pipeline" else out.parent, folder=True, flag="OUT")


def cmd_convert(args) -> int:
    from deepgen_components import official
    from deepgen_components.pipeline import DeepGenPipeline

    out = Path(args.out)
    _check_out(out, args.to, args.overwrite)
    kind, source = resolve_checkpoint(args.checkpoint)
    if kind == "pipeline":
        model = DeepGenPipeline.from_pretrained(source).model
    else:
        model = load_trained_model(source)
    if args.to == "official":
        state = official.to_official_state_dict(model, vlm_layout=args.vlm_layout)
        official.save_official_checkpoint(model, out, vlm_layout=args.vlm_layout, overwrite=args.overwrite)
        lora = sum(k.startswith("lmm.") for k in state)
        print(f"wrote {out}: {len(state) - lora} SCB + DiT tensors and {lora} VLM LoRA tensors (unmerged, "
              f"transformers {args.vlm_layout} key layout) from {source}")
        if kind == "pipeline":
            print(f"note: a pipeline folder's LoRA is merged into its VLM; load with --vlm {source / 'vlm'}")
    else:
        DeepGenPipeline(model).save_pretrained(out)
        print(f"wrote {out} (the VLM's LoRA merged into its weights) from {source}; load with --pipeline {out}")
    return 0


def add_commands(sub) -> None:
    p = sub.add_parser("convert", help="a trained checkpoint to the official layout or a pipeline folder",
                       description="Write a training checkpoint (or a run folder's newest one, or a pipeline folder) "
                                   "in the official DeepGen layout (one .safetensors: SCB + DiT + VLM LoRA) or as "
                                   "a DeepGenPipeline folder.")
    p.add_argument("--to", required=True, choices=("official", "pipeline"),
                   help="official: one .safetensors in the official key layout; pipeline: a DeepGenPipeline folder")
    p.add_argument("checkpoint", metavar="CHECKPOINT", help=_ACCEPTED)
    p.add_argument("out", metavar="OUT", help="the .safetensors file (--to official) or the folder (--to pipeline)")
    p.add_argument("--vlm-layout", choices=("4.51", "4.56"), default="4.51",
                   help="transformers key layout of the lmm.* LoRA keys (default 4.51, the official code's)")
    p.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    p.set_defaults(func=cmd_convert)
