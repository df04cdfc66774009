"""``deepgen train``: run a stage from a YAML config (registered into the ``deepgen`` command line)."""

from __future__ import annotations

import json

import deepgen_components.shapes  # noqa: F401  (registers the shapes world's kinds: `kind: shapes` in a config)

__all__ = ["add_commands"]


def cmd_train(args) -> int:
    from deepgen_components.cli.args import check_output_path
    from deepgen_components.training.config import load_config

    overrides = list(args.overrides)
    cfg = load_config(args.config, overrides)
    if not args.dry_run:
        check_output_path(args.out or cfg.out, folder=True, flag="--out" if args.out else "out (config)")
    if args.dry_run:
        from deepgen_components.training.trainer import dry_run

        report = dry_run(cfg, world_size=args.world_size)
        if args.json:
            print(json.dumps(report, indent=2))
            return 0
        print(f"stage {report['stage']}: {report['trainable']:,} trainable / {report['frozen']:,} frozen parameters")
        for name, c in report["parameters"].items():
            print(f"  {name:<13} total {c['total']:>15,}  trainable {c['trainable']:>15,}")
        mem = report["memory_per_gpu"]
        print(f"memory per GPU (sharded over {report['sharded_over']}; frozen weights in {report['frozen_dtype']}), "
              "without activations:")
        for key, value in mem.items():
            print(f"  {key:<32} {value:8.2f} GiB")
        return 0
    if cfg.stage == "rl":
        from deepgen_components.training.rl import train_rl

        result = train_rl(cfg, out=args.out, max_steps=args.max_steps)
    else:
        from deepgen_components.training.trainer import train

        result = train(cfg, out=args.out, max_steps=args.max_steps)
    print(f"finished {result.steps} steps in {result.out} (final loss {result.final_loss})")
    if result.checkpoint:
        print(f"checkpoint: {result.checkpoint}")
    if result.pipeline:
        print(f"pipeline:   {result.pipeline}  (load with DeepGenPipeline.from_pretrained or --pipeline)")
    return 0


def add_commands(sub) -> None:
    from deepgen_components.cli.args import positive_int

    p = sub.add_parser("train", help="train a stage (align / sft / rl) from a YAML config")
    p.add_argument("--config", required=True, help="YAML config, e.g. training/configs/align_tiny.yaml")
    p.add_argument("--max-steps", type=positive_int, default=None, help="override trainer.max_steps (>= 1)")
    p.add_argument("--out", default=None, help="output folder (checkpoints, metrics.jsonl, pipeline)")
    p.add_argument("--dry-run", action="store_true", help="print parameter counts and memory per GPU, then exit")
    p.add_argument("--world-size", type=positive_int, default=8, help="GPUs assumed by --dry-run for FSDP sharding")
    p.add_argument("--json", action="store_true", help="with --dry-run: machine-readable output")
    p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. optim.lr=5e-5 data.batch_size=2")
    p.set_defaults(func=cmd_train)
