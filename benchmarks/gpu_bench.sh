#!/usr/bin/env bash
# The GPU latency run of issue 10 on one H100/H200: DeepGen 1.0 shapes (random weights, bf16, built directly on
# the GPU), every mode, per stage and end to end, sweeps, plots; plus the GPU-marked tests of the fast path.
#
#   bash benchmarks/gpu_bench.sh OUTDIR
#
# The device image has torch/triton/transformers/peft/onnx/onnxruntime but no diffusers: carry its wheel
# (here: python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#  --platform manylinux2014_x86_64 -d .whl diffusers==0.42.1) and name `.whl` in the device call's carry.
# Budget: under 8 minutes (each part capped with `timeout`; a failing part never stops the others).
# Results: OUTDIR/summary.md, OUTDIR/tables.md (every bench table) and OUTDIR/results.tgz (JSON, logs, plots) —
# few files, as the device tool brings back at most 8. Smoke test on a CPU:
#   PRESET=tiny EXPORT_PRESET=tiny EXPORT_RES=64 DEVICE=cpu DTYPE=float32 RES=64 HIRES=128 bash benchmarks/gpu_bench.sh /tmp/gb
set -u
OUTDIR="${1:?usage: bash benchmarks/gpu_bench.sh OUTDIR}"
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
mkdir -p "$OUTDIR"; OUTDIR="$(cd "$OUTDIR" && pwd)"
OUT="$OUTDIR/raw"; mkdir -p "$OUT"
PRESET="${PRESET:-deepgen-1.0}"; DEVICE="${DEVICE:-cuda}"; DTYPE="${DTYPE:-bfloat16}"
RES="${RES:-512}"; HIRES="${HIRES:-1024}"; SWEEP="${SWEEP:-256,512,768,1024}"
export PYTHONUNBUFFERED=1
PY="${PYTHON:-python3}"
START=$(date +%s)
note() { echo "$*" | tee -a "$OUTDIR/summary.md"; }

# Wheels carried in .whl (diffusers) go to a private site folder.
if ls "$REPO"/.whl/*.whl >/dev/null 2>&1; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$REPO"/.whl/*.whl \
        && export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
# The project without installing it: a symlink tree mapping export/, triton_kernels/, training/ under the package.
SHIM="$(mktemp -d /tmp/deepgen_pkg.XXXXXX)"; trap 'rm -rf "$SHIM"' EXIT
mkdir -p "$SHIM/deepgen_components"
for f in "$REPO"/deepgen_components/*; do ln -s "$f" "$SHIM/deepgen_components/$(basename "$f")"; done
for sub in export triton_kernels training; do ln -s "$REPO/$sub" "$SHIM/deepgen_components/$sub"; done
export PYTHONPATH="$SHIM${PYTHONPATH:+:$PYTHONPATH}"
cd "$SHIM" || exit 0

note "# gpu_bench $(date -u +%FT%TZ)"
timeout 30 nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv >>"$OUTDIR/summary.md" 2>&1
timeout 60 "$PY" -c "import torch, diffusers, transformers; print('torch', torch.__version__, 'diffusers', diffusers.__version__, 'transformers', transformers.__version__)" 2>&1 | tee -a "$OUTDIR/summary.md"

# 1. GPU-marked tests of the fast path and kernels integration (cap 90 s).
timeout 90 "$PY" -m pytest -q -m gpu -p no:cacheprovider "$REPO/tests/test_fastpath.py" >"$OUT/pytest_gpu.log" 2>&1
note "- gpu tests: exit $? (log pytest_gpu.log)"

# 2. DeepGen 1.0 at 512 px, 50 steps, CFG 4: every mode, per stage + end to end (cap 300 s: compile warm-ups).
timeout 300 "$PY" -m deepgen_components.cli bench --preset "$PRESET" --device "$DEVICE" --dtype "$DTYPE" \
    --modes eager,kernels,compile,compile+graphs --resolution "$RES" --batch 1 --steps 50 --guidance 4 \
    --prompt-tokens 64 --repeats 10 --warmup 3 --out "$OUT/deepgen1_512" >"$OUT/deepgen1_512.log" 2>&1
note "- deepgen-1.0 512px modes: exit $? (deepgen1_512/)"

# 3. DiT step at 1024 px with CFG (eager vs compile+graphs), no end-to-end rows (cap 150 s).
timeout 150 "$PY" -m deepgen_components.cli bench --preset "$PRESET" --device "$DEVICE" --dtype "$DTYPE" \
    --modes eager,compile+graphs --resolution "$HIRES" --batch 1 --steps 50 --no-e2e --repeats 10 \
    --out "$OUT/deepgen1_1024" >"$OUT/deepgen1_1024.log" 2>&1
note "- deepgen-1.0 1024px DiT step: exit $? (deepgen1_1024/)"

# 4. How a DiT step grows with tokens and batch (eager; 256..1024 px, batch 1..8) (cap 90 s).
timeout 90 "$PY" -m deepgen_components.cli bench --preset "$PRESET" --device "$DEVICE" --dtype "$DTYPE" \
    --modes eager --resolution "$RES" --batch 1 --no-e2e --repeats 5 --resolutions "$SWEEP" --batches 1,2,4,8 \
    --out "$OUT/deepgen1_sweep" >"$OUT/deepgen1_sweep.log" 2>&1
note "- sweeps: exit $? (deepgen1_sweep/)"

# 5. The exported modes: ONNX Runtime (CUDA EP when onnxruntime-gpu is there) and TensorRT, or a "not available"
#    row each, against eager in the same run; the small preset in fp32 keeps the export inside the cap.
if [ $(( $(date +%s) - START )) -lt 390 ]; then  # only inside the 8-minute budget (cap 90 s)
    timeout 90 "$PY" -m deepgen_components.cli bench --preset "${EXPORT_PRESET:-small}" --device "$DEVICE" --dtype float32 \
        --modes eager,onnxruntime,tensorrt --resolution "${EXPORT_RES:-256}" --batch 1 --steps 20 --repeats 5 --warmup 2 \
        --out "$OUT/deepgen1_exported" >"$OUT/deepgen1_exported.log" 2>&1
    note "- exported modes (onnxruntime, tensorrt): exit $? (deepgen1_exported/)"
    # 5b. The same in fp16: an fp16 export (the model cast to fp16, fp32 softmax/norm statistics kept) parity-checked
    #     at its own tolerance, then ONNX Runtime / TensorRT on it where those runtimes exist (cap 90 s).
    if [ $(( $(date +%s) - START )) -lt 390 ]; then
        timeout 90 "$PY" -m deepgen_components.cli bench --preset "${EXPORT_PRESET:-small}" --device "$DEVICE" --dtype float16 \
            --modes eager,onnxruntime,tensorrt --resolution "${EXPORT_RES:-256}" --batch 1 --steps 20 --repeats 5 --warmup 2 \
            --out "$OUT/deepgen1_exported_fp16" >"$OUT/deepgen1_exported_fp16.log" 2>&1
        note "- exported modes in fp16 (onnxruntime, tensorrt): exit $? (deepgen1_exported_fp16/)"
    else
        note "- exported modes in fp16: skipped (past 390 s of the 8-minute budget)"
    fi
else
    note "- exported modes: skipped (past 390 s of the 8-minute budget)"
fi

note "- total $(( $(date +%s) - START )) s"
for f in "$OUT"/deepgen1_*/bench.md; do [ -f "$f" ] && { echo; echo "## $(basename "$(dirname "$f")")"; cat "$f"; }; done >"$OUTDIR/tables.md"
tar czf "$OUTDIR/results.tgz" -C "$OUTDIR" raw && rm -rf "$OUT"
cat "$OUTDIR/tables.md"
exit 0
