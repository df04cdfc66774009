"""Stage 3's measured gain on the shapes world: several `deepgen shapes --rl-from` runs -> one record and one plot.

    deepgen shapes --out runs/rl_s0 --rl-from deepgen-shapes --threads 2 --set rl.trainer.seed=0     # one per seed
    deepgen shapes --out runs/rl_grpo_s0 --rl-from deepgen-shapes --threads 2 --set rl.trainer.seed=0 \
        --set rl.rl.advantages=grpo                                                                  # the ablation
    python benchmarks/rl_gain.py --runs runs/rl_s0 runs/rl_s1 runs/rl_s2 --ablation runs/rl_grpo_s0 ... \
        --out docs/results/rl_gain.json --plot docs/images/shapes/rl_rewards.png \
        --grid docs/images/shapes/rl_pairs_heldout.png

Each run's ``report.json`` holds the evaluation of its starting pipeline ("before stage 3 (start)") and of its
result ("after stage 3 (rl)"), on the same fixed prompts and noise. The headroom metric is ``layout`` on the 96
distinct held-out two-shape captions without CFG (the sampler stage 3 trains: its rollouts run without CFG, as in
the official recipe); every other rate of the evaluation is recorded beside it, before and after, with its noise:
the larger of the seed-to-seed standard deviation and the binomial standard error of the starting rate on its n
images (at least one image). Written: the record (``--out``), and the rollout rewards of every run per step
(``--plot``, matplotlib).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from pathlib import Path

BEFORE, AFTER = "before stage 3 (start)", "after stage 3 (rl)"
HEADROOM = ("pairs", "1.0", "layout")


def _rates(result: dict) -> dict[str, tuple[float, int]]:
    """Every rate of one evaluation as {name: (value, n)}: one-shape T2I, held-out T2I, edits, the two-shape task."""
    out: dict[str, tuple[float, int]] = {}
    for key in ("color", "shape", "position", "background", "count", "all"):
        out[f"t2i {key}"] = (result["t2i"][key], result["n_t2i"])
        out[f"held-out t2i {key}"] = (result["heldout"][key], result["n_heldout"])
    out["edit success"] = (result["edit_success"], result["n_edits"])
    for scale, metrics in result.get("pairs", {}).items():
        for key, value in metrics.items():
            if key in ("composition", "placement_px", "reward"):
                continue
            out[f"pairs {key} (CFG {scale})"] = (value, result["n_pairs"])
    return out


def _summary(values: list[float]) -> dict:
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0}


def gain_record(runs: list[Path], ablation: list[Path], extra: dict[str, list[Path]] | None = None) -> dict:
    reports = [json.loads((run / "report.json").read_text()) for run in runs]
    befores = {json.dumps(r["results"][BEFORE]["pairs"], sort_keys=True) for r in reports}
    if len(befores) != 1:
        raise ValueError("runs: the runs start from different pipelines (their 'before' evaluations differ)")
    before = reports[0]["results"][BEFORE]
    part, scale, key = HEADROOM
    metric = lambda result: 100 * result[part][scale][key]  # noqa: E731
    after = [metric(r["results"][AFTER]) for r in reports]
    record: dict = {
        "metric": f"layout of {before['n_pairs']} distinct held-out two-shape captions, CFG {scale} (%)",
        "before": [metric(before)],
        "after": after,
        "after_summary": _summary(after),
        "gain": statistics.fmean(after) - metric(before),
        "runs": [str(run) for run in runs],
        "seeds": [_seed(r) for r in reports],
        "settings": before["settings"],
        "stage3_seconds": [r["seconds"].get("rl") for r in reports],
    }
    record["gain_over_3_std"] = record["gain"] > 3 * record["after_summary"]["std"]
    start = _rates(before)
    ends = [_rates(r["results"][AFTER]) for r in reports]
    attributes = {}
    for name, (value, n) in start.items():
        values = [100 * end[name][0] for end in ends if name in end]
        se = 100 * math.sqrt(max(value * (1 - value), 0.0) / n)
        noise = max(statistics.stdev(values) if len(values) > 1 else 0.0, se, 100 / n)
        change = statistics.fmean(values) - 100 * value
        attributes[name] = {"before": 100 * value, "after": values, "change": change, "noise": noise,
                            "falls_beyond_noise": change < -noise}
    record["attributes"] = attributes
    record["rewards"] = {name: {"before": before["pairs"][scale][name],
                                "after": [r["results"][AFTER]["pairs"][scale][name] for r in reports]}
                         for name in ("composition", "placement_px", "reward")}
    if ablation:
        record["gdpo_ablation"] = _variant(ablation, before, metric, "rl.advantages=grpo: the weighted sum of the "
                                           "raw rewards, normalised per group (no per-reward normalisation)")
    for name, folders in (extra or {}).items():
        if folders:
            record[name] = _variant(folders, before, metric, name)
    return record


def _seed(report: dict) -> int:
    for item in report.get("sets", []):
        if item.startswith("rl.trainer.seed="):
            return int(item.split("=", 1)[1])
    return 0


def _variant(folders: list[Path], before: dict, metric, what: str) -> dict:
    reports = [json.loads((run / "report.json").read_text()) for run in folders]
    after = [metric(r["results"][AFTER]) for r in reports]
    ends = [r["results"][AFTER] for r in reports]
    return {"what": what, "runs": [str(f) for f in folders], "seeds": [_seed(r) for r in reports],
            "sets": [r.get("sets", []) for r in reports], "after": after, "after_summary": _summary(after),
            "gain": statistics.fmean(after) - metric(before),
            "t2i_all": [100 * e["t2i"]["all"] for e in ends],
            "edit_success": [100 * e["edit_success"] for e in ends]}

def seeds_grid(runs: list[Path], target: Path, name: str = "pairs_heldout_cfg1.png", tile: int = 64,
               pad: int = 2) -> None:
    """One grid of the held-out two-shape captions: ground truth | before | after, for each run (seed): the first
    two columns of the first run's ``images/<name>`` (every run has the same), then each run's last column."""
    from PIL import Image

    grids = [Image.open(run / "images" / name).convert("RGB") for run in runs]
    step = tile + pad
    rows = (grids[0].height - pad) // step
    out = Image.new("RGB", ((2 + len(grids)) * step + pad, grids[0].height), (255, 255, 255))
    out.paste(grids[0].crop((0, 0, 2 * step + pad, grids[0].height)), (0, 0))
    for i, grid in enumerate(grids):
        last = (grid.width - pad) // step - 1
        out.paste(grid.crop((pad + last * step, 0, pad + last * step + tile, rows * step + pad)),
                  (pad + (2 + i) * step, 0))
    target.parent.mkdir(parents=True, exist_ok=True)
    out.save(target, optimize=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", nargs="+", type=Path, required=True, help="run folders of the recipe, one per seed")
    parser.add_argument("--ablation", nargs="*", type=Path, default=[], help="run folders with rl.advantages=grpo")
    parser.add_argument("--no-kl-sft", nargs="*", type=Path, default=[],
                        help="run folders with rl.kl_beta=0 and rl.sft_lambda=0")
    parser.add_argument("--out", type=Path, required=True, help="the JSON record to write")
    parser.add_argument("--plot", type=Path, default=None, help="a PNG of the rollout rewards")
    parser.add_argument("--grid", type=Path, default=None,
                        help="a PNG of held-out two-shape images: ground truth, before, after for each --runs seed")
    args = parser.parse_args(argv)
    for folder in [*args.runs, *args.ablation, *args.no_kl_sft]:
        if not (folder / "report.json").is_file():
            parser.error(f"{folder}: no report.json (a `deepgen shapes --rl-from` run folder)")
    record = gain_record(args.runs, args.ablation, {"no_kl_sft": args.no_kl_sft})
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=2) + "\n")
    if args.plot is not None:
        from deepgen_components.shapes.evaluation import plot_rewards

        groups = {"GDPO (recipe)": args.runs, "summed raw rewards (GRPO)": args.ablation,
                  "no KL, no SFT term": args.no_kl_sft}
        plot_rewards({label: [run / "rl" / "metrics.jsonl" for run in runs] for label, runs in groups.items()},
                     args.plot)
    if args.grid is not None:
        seeds_grid(args.runs, args.grid)
    s = record["after_summary"]
    print(f"{record['metric']}: before {record['before'][0]:.1f}, after {s['mean']:.1f} ± {s['std']:.1f} "
          f"(gain {record['gain']:+.1f}; > 3 std: {record['gain_over_3_std']})")
    for name, a in record["attributes"].items():
        if a["falls_beyond_noise"]:
            print(f"  falls beyond its noise: {name} {a['before']:.1f} -> {statistics.fmean(a['after']):.1f} "
                  f"(noise {a['noise']:.1f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
