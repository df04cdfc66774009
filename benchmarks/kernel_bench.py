"""Benchmark the Triton kernels of ``deepgen_components.triton_kernels`` against their baselines at DeepGen shapes.

    python benchmarks/kernel_bench.py [--device cuda|cpu] [--quick] [--dtype bf16|fp16|fp32] [--out DIR] [--only NAME]

Cases (GPU, full):
* stack_project B=2, L=430, K=6, D=2048 → 2048 vs ``torch.cat`` + ``F.linear`` (forward; forward + backward);
* attention B=2, H=24, d=64, S=1357 / 4429 (DiT joint tokens at 512² / 1024²), with and without a key-padding
  mask, vs ``F.scaled_dot_product_attention`` pinned to each SDPA backend (flash / efficient / cudnn / math;
  unsupported ones are recorded as such), plus the connector's B=2, H=32, d=64, S=430;
* rms_norm on the qk-norm shape (2, 24, 4096, 64) (a (B, S, H, d) projection viewed as heads) and
  layer_norm_modulate on (2, 4096, 1536) vs the eager torch references (forward; forward + backward).

Every row reports the median time, the ratio against its baseline, TFLOP/s (matmul-type ops) or GB/s (norms), and
the share of the card's peak measured in-process (a large bf16 matmul; a large copy for bandwidth). Targets
(H100, bf16): stack_project ≥ 1.2× faster than cat + Linear, attention ≥ 0.9× the best SDPA backend, norms ≥ 1.5×
eager. ``--device cpu --quick`` runs the torch baselines only, at tiny shapes (a smoke test of this script).
Writes ``kernels.json`` and ``kernels.md`` into ``--out``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import sys
import traceback
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _timing import copy_bandwidth_gbs, matmul_peak_tflops, measure, measure_graph  # noqa: E402
from deepgen_components.triton_kernels import (  # noqa: E402
    INTERPRET,
    attention,
    attention_reference,
    layer_norm_modulate,
    layer_norm_modulate_reference,
    rms_norm,
    rms_norm_reference,
    stack_project,
    stack_project_reference,
    triton_available,
)
from deepgen_components.triton_kernels.testing import compare_with_reference  # noqa: E402

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
TARGETS = {"stack_project": 1.2, "attention": 0.9, "norms": 1.5}


class Bench:
    def __init__(self, device: torch.device, dtype: torch.dtype, quick: bool, verify: bool = False):
        self.device, self.dtype, self.quick, self.verify = device, dtype, quick, verify
        self.results: list[dict] = []
        self.targets: list[dict] = []
        # Under TRITON_INTERPRET=1 the kernels also run on CPU tensors (slowly): a smoke test of the Triton rows.
        self.use_triton = triton_available() and (device.type == "cuda" or INTERPRET)
        self.skip_reason = (
            None
            if self.use_triton
            else ("Triton kernels need a CUDA device" if device.type != "cuda" else "triton is not installed")
        )
        self.peaks = self._peaks()
        self.timing = dict(warmup_ms=5, rep_ms=20, min_reps=3) if quick else {}

    def _peaks(self) -> dict:
        n = 1024 if self.device.type == "cpu" else 8192
        nbytes = (64 << 20) if self.device.type == "cpu" else (1 << 30)
        mm_dtype = torch.float32 if self.device.type == "cpu" else self.dtype
        peaks = {
            "matmul_dtype": str(mm_dtype).replace("torch.", ""),
            "matmul_tflops": matmul_peak_tflops(self.device, mm_dtype, n),
            "matmul_n": n,
            "copy_gbs": copy_bandwidth_gbs(self.device, nbytes),
            "copy_bytes": nbytes,
        }
        print(
            f"measured peaks: {peaks['matmul_dtype']} matmul {peaks['matmul_tflops']:.4g} TFLOP/s (n={n}), "
            f"copy {peaks['copy_gbs']:.4g} GB/s"
        )
        return peaks

    def run(
        self,
        op,
        case,
        impl,
        fn,
        *,
        flops=None,
        nbytes=None,
        baseline=None,
        check=None,
        verify=None,
        graph=True,
    ):
        """Time one implementation; ``baseline`` names the row of the same op/case to compare with.

        ``check(out)`` gives the max abs error against the baseline's output; ``verify = (kernel_fn, reference_fn,
        args, grad)`` runs the tests' FlagAttention check (``--verify``) on the same inputs.
        """
        row = {"op": op, "case": case, "impl": impl, "baseline": baseline, "status": "ok"}
        if verify is not None and self.verify:
            kernel_fn, reference_fn, args, grad = verify
            try:
                errs = compare_with_reference(kernel_fn, reference_fn, args, grad=grad, name=f"{op} {case}")
                row["verify"] = "pass"
                row["verify_errors"] = errs
            except Exception as exc:  # AssertionError or a crash: recorded, timing still runs
                row["verify"] = f"FAIL: {str(exc).strip()[:300]}"
                print(f"  VERIFY FAILED {op} {case}: {exc}")
        try:
            out = fn()
            if check is not None:
                row["max_abs_err_vs_baseline"] = check(out)
            row.update(measure(fn, self.device, **self.timing))
            if self.device.type == "cuda" and graph:
                try:
                    row["ms_graph"] = measure_graph(fn, self.device, row["ms"], **self.timing)["ms"]
                except Exception as exc:  # e.g. an op that cannot be captured
                    row["graph_error"] = (
                        str(exc).strip().splitlines()[0][:160] if str(exc).strip() else repr(exc)
                    )
        except Exception as exc:  # recorded, the other rows still run
            msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            row["status"] = f"unsupported: {msg[:160]}" if _is_unsupported(exc) else f"error: {msg[:160]}"
            if not _is_unsupported(exc):
                traceback.print_exc()
        if row["status"] == "ok":
            sec = row["ms"] * 1e-3
            if flops:
                row["tflops"] = flops / sec / 1e12
                row["pct_matmul_peak"] = 100 * row["tflops"] / self.peaks["matmul_tflops"]
            if nbytes:
                row["gbs"] = nbytes / sec / 1e9
                row["pct_copy_peak"] = 100 * row["gbs"] / self.peaks["copy_gbs"]
            if flops and "ms_graph" in row:
                row["tflops_graph"] = flops / (row["ms_graph"] * 1e-3) / 1e12
            if nbytes and "ms_graph" in row:
                row["gbs_graph"] = nbytes / (row["ms_graph"] * 1e-3) / 1e9
            if baseline:
                base = self._find(op, case, baseline)
                if base is not None and base["status"] == "ok":
                    row["speedup_vs_baseline"] = base["ms"] / row["ms"]
                    if "ms_graph" in row and "ms_graph" in base:
                        row["speedup_vs_baseline_graph"] = base["ms_graph"] / row["ms_graph"]
        self.results.append(row)
        _print_row(row)
        return row

    def skip(self, op: str, case: str, impl: str, reason: str):
        row = {"op": op, "case": case, "impl": impl, "status": f"skipped: {reason}"}
        self.results.append(row)
        _print_row(row)

    def _find(self, op, case, impl):
        return next((r for r in self.results if (r["op"], r["case"], r["impl"]) == (op, case, impl)), None)

    def target(self, group: str, op: str, case: str, impl: str, against: list[str]):
        """Record kernel speed vs the best of ``against`` (ratio = best baseline time / kernel time)."""
        mine = self._find(op, case, impl)
        bases = [
            r for r in (self._find(op, case, a) for a in against) if r is not None and r["status"] == "ok"
        ]
        entry = {"group": group, "op": op, "case": case, "target": TARGETS[group]}
        if mine is None or mine["status"] != "ok" or not bases:
            entry.update(ratio=None, met=None, note=(mine or {}).get("status", "no kernel row"))
        else:
            best = min(bases, key=lambda r: r["ms"])
            entry.update(best_baseline=best["impl"], ratio=best["ms"] / mine["ms"])
            entry["met"] = entry["ratio"] >= TARGETS[group]
            graphed = [r for r in bases if "ms_graph" in r]
            if "ms_graph" in mine and graphed:
                best_g = min(graphed, key=lambda r: r["ms_graph"])
                entry.update(
                    best_baseline_graph=best_g["impl"], ratio_graph=best_g["ms_graph"] / mine["ms_graph"]
                )
                entry["met_graph"] = entry["ratio_graph"] >= TARGETS[group]
        self.targets.append(entry)


def _is_unsupported(exc: Exception) -> bool:
    text = str(exc).lower()
    keys = ("no available kernel", "no viable backend", "not supported", "unsupported", "no execution plans")
    return any(s in text for s in keys)


def _print_row(r: dict) -> None:
    if r["status"] != "ok":
        print(f"  {r['op']:<22} {r['case']:<34} {r['impl']:<26} {r['status']}")
        return
    extra = []
    if "ms_graph" in r:
        extra.append(f"graph {r['ms_graph']:.4f} ms")
    if "speedup_vs_baseline" in r:
        extra.append(f"{r['speedup_vs_baseline']:.2f}x vs {r['baseline']}")
    if "speedup_vs_baseline_graph" in r:
        extra.append(f"graph {r['speedup_vs_baseline_graph']:.2f}x")
    if "tflops" in r:
        extra.append(f"{r['tflops']:.3g} TFLOP/s ({r['pct_matmul_peak']:.0f}% peak)")
    if "gbs" in r:
        extra.append(f"{r['gbs']:.3g} GB/s ({r['pct_copy_peak']:.0f}% peak)")
    if "max_abs_err_vs_baseline" in r:
        extra.append(f"err {r['max_abs_err_vs_baseline']:.1e}")
    if "verify" in r:
        extra.append(f"verify {r['verify'][:60]}")
    print(f"  {r['op']:<22} {r['case']:<34} {r['impl']:<26} {r['ms']:9.4f} ms  " + ", ".join(extra))


def _err(ref):
    return lambda out: (out.float() - ref.float()).abs().max().item()


def _grad_fn(op, leaves, grad_out):
    def fn():
        out = op()
        return torch.autograd.grad(out, leaves, grad_out)

    return fn


# ----------------------------------------------------------------------------------------------------------
# Cases
# ------------------------------------------------------------------------------------------------------------


def bench_stack_project(bench: Bench) -> None:
    dev, dt = bench.device, bench.dtype
    b, seq, k, d, n = (1, 16, 6, 64, 64) if bench.quick else (2, 430, 6, 2048, 2048)
    case = f"B{b} L{seq} K{k} D{d}->N{n}"
    gen = torch.Generator(device=dev).manual_seed(0)
    xs = [torch.randn(b, seq, d, device=dev, dtype=dt, generator=gen) for _ in range(k)]
    w = (torch.randn(n, k * d, device=dev, dtype=dt, generator=gen) / math.sqrt(k * d)).contiguous()
    bias = torch.randn(n, device=dev, dtype=dt, generator=gen)
    flops = 2 * b * seq * n * k * d
    ref = stack_project_reference(xs, w, bias)
    bench.run(
        "stack_project fwd", case, "cat+F.linear", lambda: stack_project_reference(xs, w, bias), flops=flops
    )
    if bench.use_triton:
        bench.run(
            "stack_project fwd",
            case,
            "triton",
            lambda: stack_project(xs, w, bias, backend="triton"),
            flops=flops,
            baseline="cat+F.linear",
            check=_err(ref),
            verify=(_sp_kernel, stack_project_reference, [xs, w, bias], False),
        )
        bench.target("stack_project", "stack_project fwd", case, "triton", ["cat+F.linear"])
    else:
        bench.skip("stack_project fwd", case, "triton", bench.skip_reason)

    leaves = [t.detach().requires_grad_() for t in (*xs, w, bias)]
    g = torch.randn(b, seq, n, device=dev, dtype=dt, generator=gen)
    fwd_ref = lambda: stack_project_reference(leaves[:k], leaves[k], leaves[k + 1])
    bench.run("stack_project fwd+bwd", case, "cat+F.linear", _grad_fn(fwd_ref, leaves, g), flops=3 * flops)
    if bench.use_triton:
        fwd_tri = lambda: stack_project(leaves[:k], leaves[k], leaves[k + 1], backend="triton")
        bench.run(
            "stack_project fwd+bwd",
            case,
            "triton",
            _grad_fn(fwd_tri, leaves, g),
            flops=3 * flops,
            baseline="cat+F.linear",
            verify=(_sp_kernel, stack_project_reference, [xs, w, bias], True),
        )
        bench.target("stack_project", "stack_project fwd+bwd", case, "triton", ["cat+F.linear"])
    else:
        bench.skip("stack_project fwd+bwd", case, "triton", bench.skip_reason)


def _sp_kernel(xs, w, bias):
    return stack_project(xs, w, bias, backend="triton")


def _attn_kernel(q, k, v, m=None):
    return attention(q, k, v, m, backend="triton")


def _attn_reference_exact(q, k, v, m=None):
    """SDPA; fp32 inputs on a GPU go to the math backend (fused fp32 kernels may use TF32)."""
    if q.dtype == torch.float32 and q.is_cuda:
        from torch.nn.attention import SDPBackend, sdpa_kernel

        with sdpa_kernel([SDPBackend.MATH]):
            return attention_reference(q, k, v, m)
    return attention_reference(q, k, v, m)


def _sdpa_backends():
    try:
        from torch.nn.attention import SDPBackend
    except ImportError:  # very old torch: only the default dispatch
        return {}
    names = {
        "flash": "FLASH_ATTENTION",
        "efficient": "EFFICIENT_ATTENTION",
        "cudnn": "CUDNN_ATTENTION",
        "math": "MATH",
    }
    return {k: getattr(SDPBackend, v) for k, v in names.items() if hasattr(SDPBackend, v)}


def _sdpa_pinned(backend, q, k, v, attn_mask):
    from torch.nn.attention import sdpa_kernel

    def fn():
        with sdpa_kernel([backend]):
            return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)

    return fn


def bench_attention(bench: Bench) -> None:
    dev, dt = bench.device, bench.dtype
    if bench.quick:
        shapes = [("dit", 1, 2, 64, 64), ("connector", 1, 2, 48, 64)]
    else:
        shapes = [("dit", 2, 24, 1357, 64), ("dit", 2, 24, 4429, 64), ("connector", 2, 32, 430, 64)]
    backends = _sdpa_backends()
    for name, b, h, s, d in shapes:
        gen = torch.Generator(device=dev).manual_seed(s)
        # (B, S, H, d) projections viewed as heads: the layout the model hands over.
        q, k, v = (
            torch.randn(b, s, h, d, device=dev, dtype=dt, generator=gen).transpose(1, 2) for _ in range(3)
        )
        mask = torch.ones(b, s, dtype=torch.bool, device=dev)
        mask[-1, int(0.75 * s) :] = False  # last sample: a quarter of the keys are padding
        for masked in (False, True):
            if name == "connector" and not masked:
                continue  # the connector always runs with its padding mask
            m = mask if masked else None
            case = f"{name} B{b} H{h} S{s} d{d}" + (" mask" if masked else "")
            flops = 4 * b * h * s * s * d
            ref = attention_reference(q, k, v, m)
            baselines = []
            for bname, backend in backends.items():
                impl = f"sdpa[{bname}]"
                bench.run(
                    "attention fwd",
                    case,
                    impl,
                    _sdpa_pinned(backend, q, k, v, None if m is None else m[:, None, None, :]),
                    flops=flops,
                    check=_err(ref),
                )
                baselines.append(impl)
            bench.run(
                "attention fwd",
                case,
                "sdpa[default]",
                lambda q=q, k=k, v=v, m=m: attention_reference(q, k, v, m),
                flops=flops,
            )
            baselines.append("sdpa[default]")
            if bench.use_triton:
                bench.run(
                    "attention fwd",
                    case,
                    "triton",
                    lambda q=q, k=k, v=v, m=m: attention(q, k, v, m, backend="triton"),
                    flops=flops,
                    baseline="sdpa[default]",
                    check=_err(ref),
                    verify=(_attn_kernel, _attn_reference_exact, [q, k, v, m], False),
                )
                bench.target("attention", "attention fwd", case, "triton", baselines)
            else:
                bench.skip("attention fwd", case, "triton", bench.skip_reason)
    # One backward comparison at the DiT's 1024² length (d=64), against the default SDPA dispatch.
    b, h, s, d = (1, 2, 64, 64) if bench.quick else (2, 24, 4429, 64)
    case = f"dit B{b} H{h} S{s} d{d}"
    gen = torch.Generator(device=dev).manual_seed(1)
    leaves = [torch.randn(b, h, s, d, device=dev, dtype=dt, generator=gen).requires_grad_() for _ in range(3)]
    g = torch.randn(b, h, s, d, device=dev, dtype=dt, generator=gen)
    flops = int(3.5 * 4 * b * h * s * s * d)  # forward + backward (2.5x the forward's matmul work)
    bench.run(
        "attention fwd+bwd",
        case,
        "sdpa[default]",
        _grad_fn(lambda: attention_reference(*leaves), leaves, g),
        flops=flops,
    )
    if bench.use_triton:
        bench.run(
            "attention fwd+bwd",
            case,
            "triton",
            _grad_fn(lambda: attention(*leaves, backend="triton"), leaves, g),
            flops=flops,
            baseline="sdpa[default]",
            verify=(_attn_kernel, _attn_reference_exact, [t.detach() for t in leaves], True),
        )
    else:
        bench.skip("attention fwd+bwd", case, "triton", bench.skip_reason)


def bench_norms(bench: Bench) -> None:
    dev, dt = bench.device, bench.dtype
    esize = torch.empty((), dtype=dt).element_size()
    gen = torch.Generator(device=dev).manual_seed(2)
    # rms_norm, qk-norm: the (B, S, H*d) projection viewed as (B, H, S, d)
    b, h, s, d = (1, 2, 64, 64) if bench.quick else (2, 24, 4096, 64)
    x = torch.randn(b, s, h, d, device=dev, dtype=dt, generator=gen).transpose(1, 2)
    w = 1 + 0.1 * torch.randn(d, device=dev, dtype=dt, generator=gen)
    case = f"qk-norm ({b}, {h}, {s}, {d})"
    nbytes = 2 * x.numel() * esize  # read x, write y
    ref = rms_norm_reference(x, w, 1e-6)
    _norm_rows(
        bench,
        "rms_norm",
        case,
        nbytes,
        ref,
        lambda: rms_norm_reference(x, w, 1e-6),
        lambda: rms_norm(x, w, 1e-6, backend="triton"),
        [x, w],
        lambda xx, ww: rms_norm_reference(xx, ww, 1e-6),
        lambda xx, ww: rms_norm(xx, ww, 1e-6, backend="triton"),
    )
    # layer_norm_modulate, adaLN: x (B, S, C), shift/scale chunks of the (B, 6C) embedding
    b, s, c = (1, 64, 96) if bench.quick else (2, 4096, 1536)
    x = torch.randn(b, s, c, device=dev, dtype=dt, generator=gen)
    emb = 0.5 * torch.randn(b, 6 * c, device=dev, dtype=dt, generator=gen)
    shift, scale = emb[:, :c], emb[:, c : 2 * c]
    case = f"adaLN ({b}, {s}, {c})"
    nbytes = 2 * x.numel() * esize
    ref = layer_norm_modulate_reference(x, shift, scale, 1e-6)
    _norm_rows(
        bench,
        "layer_norm_modulate",
        case,
        nbytes,
        ref,
        lambda: layer_norm_modulate_reference(x, shift, scale, 1e-6),
        lambda: layer_norm_modulate(x, shift, scale, 1e-6, backend="triton"),
        [x, shift, scale],
        lambda xx, sh, sc: layer_norm_modulate_reference(xx, sh, sc, 1e-6),
        lambda xx, sh, sc: layer_norm_modulate(xx, sh, sc, 1e-6, backend="triton"),
    )


def _norm_rows(bench, op, case, nbytes, ref, eager, kernel, inputs, eager_f, kernel_f):
    bench.run(f"{op} fwd", case, "eager", eager, nbytes=nbytes)
    if bench.use_triton:
        bench.run(
            f"{op} fwd",
            case,
            "triton",
            kernel,
            nbytes=nbytes,
            baseline="eager",
            check=_err(ref),
            verify=(kernel_f, eager_f, inputs, False),
        )
        bench.target("norms", f"{op} fwd", case, "triton", ["eager"])
    else:
        bench.skip(f"{op} fwd", case, "triton", bench.skip_reason)
    leaves = [t.detach().requires_grad_() for t in inputs]
    g = torch.randn_like(ref)
    # forward + backward moves x, y, dy, dx: about twice the forward's bytes
    bench.run(
        f"{op} fwd+bwd", case, "eager", _grad_fn(lambda: eager_f(*leaves), leaves, g), nbytes=2 * nbytes
    )
    if bench.use_triton:
        bench.run(
            f"{op} fwd+bwd",
            case,
            "triton",
            _grad_fn(lambda: kernel_f(*leaves), leaves, g),
            nbytes=2 * nbytes,
            baseline="eager",
            verify=(kernel_f, eager_f, inputs, True),
        )
        bench.target("norms", f"{op} fwd+bwd", case, "triton", ["eager"])
    else:
        bench.skip(f"{op} fwd+bwd", case, "triton", bench.skip_reason)


GROUPS = {"stack_project": bench_stack_project, "attention": bench_attention, "norms": bench_norms}


# ----------------------------------------------------------------------------------------------------------
# Output
# ------------------------------------------------------------------------------------------------------------


def _fmt(v, spec):
    return "" if v is None else format(v, spec)


def to_markdown(meta: dict, peaks: dict, results: list[dict], targets: list[dict]) -> str:
    lines = [
        "# Kernel benchmarks",
        "",
        f"- device: {meta['device_name']} ({meta['device']}), dtype {meta['dtype']}, quick={meta['quick']}",
        f"- torch {meta['torch']}, triton {meta['triton']}, {meta['timestamp']}",
        f"- measured peaks: {peaks['matmul_dtype']} matmul {peaks['matmul_tflops']:.4g} TFLOP/s "
        f"(n={peaks['matmul_n']}); copy {peaks['copy_gbs']:.4g} GB/s (read+write)",
        "- times: median of repeats after warm-up (CUDA events per repeat on GPU); ratio = baseline time / time",
        "- ms = eager call incl. Python dispatch and launch; graph ms = the same call replayed from a CUDA graph (GPU",
        "  time only). TFLOP/s, GB/s and % peak are from the graph time when there is one, else from ms.",
        "",
        "| op | case | impl | ms | graph ms | ratio (eager) | ratio (graph) | TFLOP/s | GB/s | % peak | max abs err "
        "| verify | status |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|---|",
    ]
    for r in results:
        tflops = r.get("tflops_graph", r.get("tflops"))
        gbs = r.get("gbs_graph", r.get("gbs"))
        pct = None
        if tflops is not None:
            pct = 100 * tflops / peaks["matmul_tflops"]
        elif gbs is not None:
            pct = 100 * gbs / peaks["copy_gbs"]
        ratio = _fmt(r.get("speedup_vs_baseline"), ".2f")
        if ratio:
            ratio += f" ({r['baseline']})"
        ratio_g = _fmt(r.get("speedup_vs_baseline_graph"), ".2f")
        lines.append(
            f"| {r['op']} | {r['case']} | {r['impl']} | {_fmt(r.get('ms'), '.4f')} | {_fmt(r.get('ms_graph'), '.4f')} "
            f"| {ratio} | {ratio_g} | "
            f"{_fmt(tflops, '.3g')} | {_fmt(gbs, '.3g')} | {_fmt(pct, '.0f')} | "
            f"{_fmt(r.get('max_abs_err_vs_baseline'), '.1e')} | {r.get('verify', '')[:80]} | {r['status']} |"
        )
    if targets:
        lines += [
            "",
            "## Targets",
            "",
            "| group | op | case | best baseline (eager) | ratio (eager) | best baseline (graph) | ratio (graph) "
            "| target | met (eager / graph) |",
            "|---|---|---|---|---:|---|---:|---:|---|",
        ]
        for t in targets:
            yn = {True: "yes", False: "**no**", None: "n/a"}
            lines.append(
                f"| {t['group']} | {t['op']} | {t['case']} | {t.get('best_baseline', t.get('note', ''))} | "
                f"{_fmt(t['ratio'], '.2f')} | {t.get('best_baseline_graph', '')} | {_fmt(t.get('ratio_graph'), '.2f')} "
                f"| ≥ {t['target']} | {yn[t['met']]} / {yn[t.get('met_graph')]} |"
            )
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--dtype", choices=sorted(DTYPES), default=None, help="default: bf16 on GPU, fp32 on CPU"
    )
    parser.add_argument("--quick", action="store_true", help="tiny shapes and short timing (smoke test)")
    parser.add_argument("--out", default=None, help="directory for kernels.json and kernels.md")
    parser.add_argument("--only", action="append", choices=sorted(GROUPS), help="run only these groups")
    parser.add_argument(
        "--verify",
        action="store_true",
        help="also check every Triton row against the fp32 reference with the tests' tolerance rule",
    )
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("CUDA is not available; use --device cpu", file=sys.stderr)
        return 2
    dtype = DTYPES[args.dtype or ("fp32" if device.type == "cpu" else "bf16")]
    torch.manual_seed(0)
    bench = Bench(device, dtype, args.quick, verify=args.verify)
    for name in args.only or list(GROUPS):
        print(f"== {name}")
        try:
            GROUPS[name](bench)
        except Exception:  # keep the other groups
            traceback.print_exc()
            bench.results.append({"op": name, "case": "-", "impl": "-", "status": "error: group failed"})

    triton_version = None
    if triton_available():
        import triton

        triton_version = triton.__version__
    meta = {
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else platform.processor() or "cpu",
        "dtype": str(dtype).replace("torch.", ""),
        "quick": args.quick,
        "torch": torch.__version__,
        "triton": triton_version,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        # timezone.utc rather than datetime.UTC: the GPU machine's Python may predate 3.11
        "timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),  # noqa: UP017
        "threads": torch.get_num_threads(),
        "targets": TARGETS,
    }
    md = to_markdown(meta, bench.peaks, bench.results, bench.targets)
    print()
    print(md)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        payload = {"meta": meta, "peaks": bench.peaks, "results": bench.results, "targets": bench.targets}
        (out / "kernels.json").write_text(json.dumps(payload, indent=2))
        (out / "kernels.md").write_text(md)
        print(f"wrote {out / 'kernels.json'} and {out / 'kernels.md'}")
    failed = [
        r for r in bench.results if r["status"].startswith("error") or r.get("verify", "").startswith("FAIL")
    ]
    return 1 if failed else 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
