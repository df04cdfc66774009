#!/usr/bin/env bash
# GPU check of the Triton kernels: GPU-marked kernel tests, then the kernel benchmarks (with --verify).
#
#   bash benchmarks/gpu_check.sh OUTDIR
#
# Writes into OUTDIR: env.txt, pytest.log (+ junit.xml), bench.log, kernels.json, kernels.md, summary.md.
# Every part is capped with `timeout` (about 7.5 minutes in all) and a failing part never stops the others; the
# script exits 0 when it ran to the end (the verdicts are in summary.md). It needs no network and no install: the
# project is made importable through a temporary package tree of symlinks on PYTHONPATH whose
# deepgen_components/__init__.py is empty, so only deepgen_components.triton_kernels (torch + triton) is imported.
# Without CUDA it still runs the CPU smoke benchmark (torch baselines, tiny shapes).
set -u

OUT="${1:-}"
if [ -z "$OUT" ]; then
    echo "usage: bash benchmarks/gpu_check.sh OUTDIR" >&2
    exit 2
fi
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
export PYTHONUNBUFFERED=1
PY="${PYTHON:-}"
if [ -z "$PY" ]; then
    if command -v python >/dev/null 2>&1; then PY=python; else PY=python3; fi
fi
T_TESTS="${GPU_CHECK_TEST_TIMEOUT:-270}"
T_BENCH="${GPU_CHECK_BENCH_TIMEOUT:-150}"
START=$(date +%s)
SUMMARY="$OUT/summary.md"
: >"$SUMMARY"
note() { echo "$*" | tee -a "$SUMMARY"; }

# ---- importable package without installing: $SHIM/deepgen_components/{triton_kernels -> $REPO/triton_kernels} ----
SHIM="$(mktemp -d "${TMPDIR:-/tmp}/deepgen_shim.XXXXXX")"
trap 'rm -rf "$SHIM"' EXIT
mkdir -p "$SHIM/deepgen_components"
: >"$SHIM/deepgen_components/__init__.py"  # empty: the real one may import diffusers-dependent modules
for f in "$REPO"/deepgen_components/*; do
    name="$(basename "$f")"
    case "$name" in __init__.py | __pycache__ | triton_kernels) continue ;; esac
    ln -s "$f" "$SHIM/deepgen_components/$name"
done
ln -s "$REPO/triton_kernels" "$SHIM/deepgen_components/triton_kernels"
export PYTHONPATH="$SHIM${PYTHONPATH:+:$PYTHONPATH}"
# Run from a scratch directory so that the repo root (with the real deepgen_components/) is not on sys.path first.
WORK="$SHIM/work"
mkdir -p "$WORK"
cd "$WORK" || exit 0

note "# GPU check of deepgen_components.triton_kernels"
note ""
note "- started: $(date -u +%Y-%m-%dT%H:%M:%SZ), repo: $REPO, python: $PY"

# ---- environment -------------------------------------------------------------------------------------------------
{
    echo "== nvidia-smi"
    timeout 20 nvidia-smi 2>&1 || echo "nvidia-smi unavailable"
    echo "== python"
    timeout 60 "$PY" - <<'EOF' 2>&1
import platform, sys
print("python", platform.python_version(), sys.executable)
import torch
print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available())
if torch.cuda.is_available():
    print("device", torch.cuda.get_device_name(0), "capability", torch.cuda.get_device_capability(0))
try:
    import triton
    print("triton", triton.__version__)
except Exception as exc:
    print("triton unavailable:", exc)
try:
    import pytest
    print("pytest", pytest.__version__)
except Exception as exc:
    print("pytest unavailable:", exc)
import deepgen_components.triton_kernels as tk
print("kernels package", tk.__file__, "triton_available", tk.triton_available())
EOF
} >"$OUT/env.txt" 2>&1
sed 's/^/    /' "$OUT/env.txt"
HAS_CUDA=$(timeout 60 "$PY" -c "import torch; print(int(torch.cuda.is_available()))" 2>/dev/null || echo 0)
HAS_PYTEST=$(timeout 60 "$PY" -c "import pytest; print(1)" 2>/dev/null || echo 0)
note "- CUDA available: $HAS_CUDA, pytest available: $HAS_PYTEST"

# ---- 1. GPU-marked kernel tests ---------------------------------------------------------------------------------
if [ "$HAS_CUDA" = "1" ] && [ "$HAS_PYTEST" = "1" ]; then
    timeout -k 10 "$T_TESTS" "$PY" -m pytest "$REPO"/tests/test_kernels_*.py -m gpu -v -rA \
        -c "$REPO/pyproject.toml" --rootdir "$REPO" -p no:cacheprovider \
        --junitxml "$OUT/junit.xml" >"$OUT/pytest.log" 2>&1
    rc=$?
    note "- GPU kernel tests: exit $rc$([ $rc = 124 ] && echo " (timed out after $T_TESTS s)"): $(tail -n 1 "$OUT/pytest.log")"
    grep -E "^(FAILED|ERROR) " "$OUT/pytest.log" | head -20 | sed 's/^/    /' | tee -a "$SUMMARY"
elif [ "$HAS_CUDA" = "1" ]; then
    note "- GPU kernel tests: skipped (pytest is not installed); the benchmark's --verify checks still run"
    echo "pytest unavailable" >"$OUT/pytest.log"
else
    note "- GPU kernel tests: skipped (no CUDA device)"
    echo "no CUDA device: GPU tests not run" >"$OUT/pytest.log"
fi

# ---- 2. benchmarks ----------------------------------------------------------------------------------------------
if [ "$HAS_CUDA" = "1" ]; then
    BENCH_ARGS=(--device cuda --dtype bf16 --verify)
else
    BENCH_ARGS=(--device cpu --quick)
fi
timeout -k 10 "$T_BENCH" "$PY" "$REPO/benchmarks/kernel_bench.py" "${BENCH_ARGS[@]}" --out "$OUT" >"$OUT/bench.log" 2>&1
rc=$?
note "- benchmarks (${BENCH_ARGS[*]}): exit $rc$([ $rc = 124 ] && echo " (timed out after $T_BENCH s)")"
if [ -f "$OUT/kernels.md" ]; then
    note ""
    cat "$OUT/kernels.md" >>"$SUMMARY"
else
    note "  (no kernels.md; last lines of bench.log:)"
    tail -20 "$OUT/bench.log" | sed 's/^/    /' | tee -a "$SUMMARY"
fi

note ""
note "- finished in $(($(date +%s) - START)) s"
exit 0
