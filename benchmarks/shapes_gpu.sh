#!/usr/bin/env bash
# Shapes world on one GPU: how far do the base models and stages 1-3 get with budgets a CPU cannot pay for?
# Four `deepgen shapes --device cuda` runs at once (the models are tiny: the GPU is launch-bound, so several
# processes share it well), each with its own `--set` budgets:
#   committed  the committed configs as they are (calibration against the 2-core CPU numbers of docs/shapes.md)
#   big        base DiT 3000 steps x batch 128 (6x the samples), stages 1-2 2000 steps x batch 64 (8x / 10x)
#   cpubase    the CPU run's base models (carried in .exp/base_cpu) + the `big` stage budgets, stage 3 150 steps
#   bigbase    base DiT 6000 x 128 (12x); its stages keep the committed budgets (it is stopped at the deadline)
# RUNSET=cpu_chain instead asks how short the 2-core CPU chain can be: three runs on the CPU run's base models
# (carried in .exp/base_cpu) with the committed stage configs:
#   s1500      as committed (stage 1 1,500 steps, stage 3 40 steps)
#   s1000      stage 1 1,000 steps
#   s1000_rl20 stage 1 1,000 steps and stage 3 20 steps
# RUNSET=base_budget compares base DiTs of the committed CPU cost (each run is meant to be cut off by RUN_TIMEOUT
# after its base-DiT evaluation):
#   b_committed  as committed (2,000 steps x batch 32, lr 1e-3)
#   b_lr2e-3     lr 2e-3
#   b_b64        1,000 steps x batch 64 (the same samples in half the steps)
# Every run writes report.json after each evaluation, so a run stopped at the deadline still reports what it
# reached. Results: OUTDIR/summary.md (every run's table so far), OUTDIR/results.tgz (reports, logs, grids),
# OUTDIR/big_pipeline_fp16.tgz (the last pipeline of `big`, weights cast to fp16 to fit the transfer limit).
#
#   bash benchmarks/shapes_gpu.sh OUTDIR                     # on the GPU machine (wheels in .whl, base in .exp)
#   RUNSET=cpu_chain bash benchmarks/shapes_gpu.sh OUTDIR
#   SHAPES_GPU_QUICK=1 DEVICE=cpu bash benchmarks/shapes_gpu.sh /tmp/sg   # smoke test of the script on a CPU
set -u
OUTDIR="${1:?usage: bash benchmarks/shapes_gpu.sh OUTDIR}"
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
mkdir -p "$OUTDIR"; OUTDIR="$(cd "$OUTDIR" && pwd)"
WORK="${WORK:-/tmp/shapes_gpu}"; rm -rf "$WORK"; mkdir -p "$WORK"
DEVICE="${DEVICE:-cuda}"; RUN_TIMEOUT="${RUN_TIMEOUT:-470}"; THREADS="${THREADS:-3}"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
PY="${PYTHON:-python3}"
START=$(date +%s)
note() { echo "$*" | tee -a "$OUTDIR/summary.md"; }
: >"$OUTDIR/summary.md"

if ls "$REPO"/.whl/*.whl >/dev/null 2>&1; then  # diffusers is not in the device image
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$REPO"/.whl/*.whl \
        && export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
SHIM="$(mktemp -d /tmp/deepgen_pkg.XXXXXX)"; trap 'rm -rf "$SHIM"' EXIT  # the project without installing it
mkdir -p "$SHIM/deepgen_components"
for f in "$REPO"/deepgen_components/*; do ln -s "$f" "$SHIM/deepgen_components/$(basename "$f")"; done
for sub in export triton_kernels training; do ln -s "$REPO/$sub" "$SHIM/deepgen_components/$sub"; done
export PYTHONPATH="$SHIM${PYTHONPATH:+:$PYTHONPATH}"

note "# shapes_gpu $(date -u +%FT%TZ) device $DEVICE, each run capped at $RUN_TIMEOUT s"
timeout 30 nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 | tee -a "$OUTDIR/summary.md"
timeout 60 "$PY" -c "import torch, diffusers, transformers; print('torch', torch.__version__, 'diffusers', diffusers.__version__, 'transformers', transformers.__version__, 'cuda', torch.cuda.is_available())" 2>&1 | tee -a "$OUTDIR/summary.md"

BIG_STAGES="--set align.trainer.max_steps=2000 --set align.data.batch_size=64 --set align.trainer.checkpoint_every=1000 \
 --set sft.trainer.max_steps=2000 --set sft.data.batch_size=64 --set sft.trainer.checkpoint_every=1000"
RUNSET="${RUNSET:-scaling}"
if [ "$RUNSET" = cpu_chain ]; then
    RUNS="s1500 s1000 s1000_rl20"
    S1K="--set align.trainer.max_steps=1000 --set align.trainer.checkpoint_every=500"
    declare -A SETS=([s1500]="" [s1000]="$S1K" [s1000_rl20]="$S1K --set rl.trainer.max_steps=20 --set rl.trainer.checkpoint_every=20")
    [ -n "${SHAPES_GPU_QUICK:-}" ] && SETS=([s1500]="" [s1000]="--set align.trainer.max_steps=2" [s1000_rl20]="--set align.trainer.max_steps=2 --set rl.trainer.max_steps=1")
    QUICK=""; [ -n "${SHAPES_GPU_QUICK:-}" ] && QUICK="--quick"
elif [ "$RUNSET" = base_budget ]; then
    RUNS="b_committed b_lr2e-3 b_b64"
    declare -A SETS=([b_committed]="" [b_lr2e-3]="--set base.dit_lr=2e-3" [b_b64]="--set base.dit_steps=1000 --set base.dit_batch=64")
    QUICK=""; [ -n "${SHAPES_GPU_QUICK:-}" ] && QUICK="--quick"
elif [ -n "${SHAPES_GPU_QUICK:-}" ]; then  # smoke test: the same runs at toy budgets
    RUNS="committed big cpubase bigbase"
    QUICK="--quick"
    BIG_STAGES="--set align.trainer.max_steps=3 --set sft.trainer.max_steps=3"
    declare -A SETS=([committed]="" [big]="--set base.dit_steps=5 $BIG_STAGES" [cpubase]="$BIG_STAGES --set rl.trainer.max_steps=4" [bigbase]="--set base.dit_steps=6")
else
    RUNS="committed big cpubase bigbase"
    QUICK=""
    declare -A SETS=(
        [committed]=""
        [big]="--set base.dit_steps=3000 --set base.dit_batch=128 $BIG_STAGES"
        [cpubase]="$BIG_STAGES --set rl.trainer.max_steps=150 --set rl.trainer.checkpoint_every=150"
        [bigbase]="--set base.dit_steps=6000 --set base.dit_batch=128"
    )
fi
for name in $RUNS; do
    { [ "$RUNSET" = base_budget ] || { [ "$RUNSET" = scaling ] && [ "$name" != cpubase ]; }; } && continue
    if [ -d "$REPO/.exp/base_cpu/pipeline" ]; then
        mkdir -p "$WORK/$name" && cp -r "$REPO/.exp/base_cpu" "$WORK/$name/base"
    else
        note "- $name: no carried base in .exp/base_cpu; it builds its own (committed sizes)"
    fi
done

for name in $RUNS; do
    # shellcheck disable=SC2086
    (cd "$SHIM" && timeout "$RUN_TIMEOUT" "$PY" -m deepgen_components.cli shapes --out "$WORK/$name" --device "$DEVICE" \
        --threads "$THREADS" $QUICK ${SETS[$name]} >"$WORK/$name.log" 2>&1; echo "exit $?" >>"$WORK/$name.log") &
done
if [ -z "${SHAPES_GPU_QUICK:-}" ]; then  # the CUDA-marked chain test, beside the runs
    (cd "$SHIM" && timeout 120 "$PY" -m pytest -q -m gpu -p no:cacheprovider "$REPO/tests/test_shapes_chain.py" \
        >"$WORK/pytest_gpu.log" 2>&1; echo "exit $?" >>"$WORK/pytest_gpu.log") &
fi
wait
[ -f "$WORK/pytest_gpu.log" ] && note "- gpu test: $(tail -n 2 "$WORK/pytest_gpu.log" | tr '\n' ' ')"
note "- all runs ended after $(( $(date +%s) - START )) s"

"$PY" - "$WORK" "$OUTDIR" $RUNS <<'EOF' 2>&1 | tee -a "$OUTDIR/summary.md"
import json, shutil, sys, tarfile, tempfile
from pathlib import Path

work, outdir, runs = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3:]
for run in runs:
    path = work / run / "report.json"
    log = (work / f"{run}.log").read_text(errors="replace") if (work / f"{run}.log").exists() else ""
    print(f"\n## {run} ({log.strip().splitlines()[-1] if log.strip() else 'no log'})")
    if not path.exists():
        print("no report")
        continue
    report = json.loads(path.read_text())
    print("sets:", " ".join(report.get("sets", [])) or "(committed)")
    print("| model | color | shape | position | background | all | edit | reward | edit reward | eval s |\n"
          "|---|---|---|---|---|---|---|---|---|---|")
    for name, s in report["results"].items():
        t = s["t2i"]
        edit = "-" if s["edit_success"] is None else f"{100 * s['edit_success']:.1f}"
        edit_reward = "-" if s.get("edit_reward") is None else f"{s['edit_reward']:.3f}"
        print(f"| {name} | {100*t['color']:.1f} | {100*t['shape']:.1f} | {100*t['position']:.1f} | "
              f"{100*t['background']:.1f} | {100*t['all']:.1f} | {edit} | {s['reward']:.3f} | {edit_reward} | "
              f"{s['seconds']:.0f} |")
    print("seconds:", json.dumps({k: round(v, 1) for k, v in report["seconds"].items()}))
with tarfile.open(outdir / "results.tgz", "w:gz") as tar:
    for run in runs:
        for rel in ("report.json", "report.md", "base/report.json", "images"):
            if (work / run / rel).exists():
                tar.add(work / run / rel, arcname=f"{run}/{rel}")
        for stage in ("align", "sft", "rl"):
            for log in sorted((work / run / stage).glob("*.jsonl")) if (work / run / stage).is_dir() else []:
                tar.add(log, arcname=f"{run}/{stage}/{log.name}")
        if (work / f"{run}.log").exists():
            tar.add(work / f"{run}.log", arcname=f"{run}.log")
    if (work / "pytest_gpu.log").exists():
        tar.add(work / "pytest_gpu.log", arcname="pytest_gpu.log")
# the last pipeline of `big`, fp16 weights (an fp32 pipeline is over the 16 MB transfer limit)
import torch
from safetensors.torch import load_file, save_file
for stage in ("rl", "sft", "align", "base") if "big" in runs else ():
    src = work / "big" / stage / "pipeline"
    if (src / "model_index.json").exists():
        tmp = Path(tempfile.mkdtemp()) / f"big_{stage}"
        shutil.copytree(src, tmp)
        for f in tmp.rglob("*.safetensors"):
            tensors = load_file(str(f))
            save_file({k: v.half() if v.dtype == torch.float32 else v for k, v in tensors.items()}, str(f))
        if stage == "base" and (work / "big" / "base" / "prompt_encoder.pt").exists():
            shutil.copy(work / "big" / "base" / "prompt_encoder.pt", tmp)
        with tarfile.open(outdir / "big_pipeline_fp16.tgz", "w:gz") as tar:
            tar.add(tmp, arcname=f"big_{stage}")
        print(f"\npacked big/{stage}/pipeline (fp16): {(outdir / 'big_pipeline_fp16.tgz').stat().st_size / 1e6:.1f} MB")
        break
EOF
note "- total $(( $(date +%s) - START )) s"
exit 0
