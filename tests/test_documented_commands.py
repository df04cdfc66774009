"""Every command the README and docs/ show runs as documented (issue 20).

A dependency release broke ``python benchmarks/fidelity.py`` without any test noticing (``benchmarks/kernels.py``
shadowed the ``kernels`` package that transformers imports). So this module reads the shell commands and Python
blocks out of README.md and docs/*.md and holds each one to one of two fates:

* ``RUN``: run exactly as written, as a real subprocess through ``bash -c``, from a folder laid out like the
  repository root (symlinks to ``training/``, ``benchmarks/``, ``tests/``, ``docs/``), so relative outputs
  (``demo_out``, ``runs/...``) land in a temporary folder. The only rewrite is ``/tmp/`` -> that folder's
  ``tmp/``. ``python`` and ``deepgen`` are the current interpreter's and its console script.
* ``NOT_RUN``: a reason why not (official weights, a GPU, a server; a synopsis; the suite itself). The program
  it calls still has its ``--help`` run below, so its argument parsing and imports are exercised.

A documented command in neither set fails ``test_every_documented_command_is_run_or_has_a_reason``: a new
command in the docs needs a test decision. Also: every ``deepgen`` subcommand and every script in
``benchmarks/`` answers ``--help``, and no file in ``benchmarks/`` shares its name with an importable module.
"""

from __future__ import annotations

import ast
import json
import os
import re
import shlex
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from PIL import Image

from deepgen_components.cli import DEFAULT_PRESET, DEMO_INSTRUCTION, DEMO_PROMPTS
from deepgen_components.shapes import ShapesEval

ROOT = Path(__file__).resolve().parents[1]
DOC_FILES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
SHELL_LANGS = {"", "bash", "sh", "shell", "console"}
# First words that make a line of a shell block a command (other lines there are folder listings or formulas).
PROGRAMS = {"deepgen", "python", "torchrun", "bash", "pytest", "pip", "vllm", "time", "for"}
FENCE = re.compile(r"^\s*```(\w*)\s*$")
COMMENT = re.compile(r"\s+#\s.*$")  # a trailing shell / Python comment

# -- the documented commands ---------------------------------------------------------------------------------


def _first_word(command: str) -> str:
    words = command.split()
    while words and re.match(r"^[A-Z_][A-Z0-9_]*=\S*$", words[0]):  # leading VAR=value assignments
        words = words[1:]
    return words[0] if words else ""


def _complete(text: str) -> bool:
    """Whether ``text`` is a whole shell command: no trailing backslash, loops closed, quotes balanced."""
    if text.rstrip().endswith("\\"):
        return False
    if len(re.findall(r"\bdo\b", text)) > len(re.findall(r"\bdone\b", text)):
        return False
    try:
        shlex.split(text, comments=True)
    except ValueError:
        return False
    return True


def documented() -> list[tuple[str, str, str]]:
    """(doc file, kind 'shell' | 'python', text) for every command / Python block in the README and docs/."""
    found = []
    for path in DOC_FILES:
        block, lang = None, ""
        for line in path.read_text().splitlines():
            fence = FENCE.match(line)
            if fence is None:
                if block is not None:
                    block.append(line)
                continue
            if block is None:
                block, lang = [], fence.group(1)
                continue
            name = str(path.relative_to(ROOT))
            if lang == "python":
                found.append((name, "python", "\n".join(block).strip()))
            elif lang in SHELL_LANGS:
                pending = ""
                for part in block:
                    pending = f"{pending}\n{part}" if pending else part
                    if _complete(pending):
                        command, pending = pending.strip(), ""
                        word = _first_word(command)
                        if word in PROGRAMS or word.endswith("/pytest"):
                            found.append((name, "shell", command))
            block = None
    return found


def _key(doc: str, kind: str, text: str) -> str:
    """A shell command is keyed by its text with continuations joined, comments dropped and blanks folded (a
    script such as a loop: by its first line); a Python block by its file and first line of code that is not an
    import (comments dropped)."""
    if kind == "python":
        lines = text.splitlines()
        try:
            first = next(
                s.lineno for s in ast.parse(text).body if not isinstance(s, ast.Import | ast.ImportFrom)
            )
        except (SyntaxError, StopIteration):  # a list of signatures, or imports only
            first = 1
        return f"{doc}: " + COMMENT.sub("", lines[first - 1]).strip()
    text = re.sub(r"\\\n", " ", text)
    text = "\n".join(COMMENT.sub("", line) for line in text.splitlines())
    text = re.sub(r"[ \t]+", " ", text).strip()
    return text.split("\n")[0] + " ..." if "\n" in text else text  # a script (a loop): its first line


# Run verbatim. A group's commands run in order (a later one may read an earlier one's output).
RUN_GROUPS: list[list[str]] = [
    ["deepgen demo --out demo_out"],
    [
        "OMP_NUM_THREADS=1 deepgen train --config training/configs/align_tiny.yaml --out runs/align_tiny",
        "OMP_NUM_THREADS=1 deepgen train --config training/configs/sft_tiny.yaml --out runs/sft_tiny "
        "model.init_from=runs/align_tiny/checkpoints",
        'deepgen generate --pipeline runs/sft_tiny/pipeline "a red circle" --out circle.png',
        "deepgen convert --to official runs/sft_tiny sft.safetensors",
        "deepgen convert --to pipeline runs/sft_tiny runs/sft_tiny_pipeline",
    ],
    ["time python benchmarks/fidelity.py --golden tests/data/golden/deepgen_tiny_a --json fidelity_a.json"],
    ["python benchmarks/kernel_bench.py --device cpu --quick"],
    ["python benchmarks/load_memory.py --quick --out out/load_memory_quick"],
    ["python benchmarks/export_scale.py --preset tiny --out out/export_scale"],
    # The README's SCB-between-other-models block: build, run, save and load the bridge as a diffusers model.
    ["README.md: bridge = StackedChannelBridge(BridgeConfig(num_stacked_layers=4, vlm_hidden_size=896, context_dim=1536, pooled_dim=2048,"],
    [
        "deepgen train --config training/configs/rl_tiny.yaml --max-steps 2 --out /tmp/rl rl.update_mode=per_timestep"
    ],
    ["deepgen train --config training/configs/rl_deepgen1.yaml --dry-run"],
    ["deepgen train --config training/configs/sft_deepgen1.yaml --dry-run --world-size 8"],
    # The README's quick tour (a Python block): the shapes preset and the tiny model, generate + edit.
    ['README.md: pipe = DeepGenPipeline.from_preset("deepgen-shapes")'],
    # docs/eval.md: the smoke runs of `deepgen eval` (tiny model, a few prompts) and its torchrun form.
    [
        "deepgen eval --benchmark geneval --preset tiny --limit 8 --out runs/eval_geneval",
        "deepgen eval --benchmark dpg --preset tiny --limit 4 --out runs/eval_dpg",
    ],
    [
        "torchrun --standalone --nproc-per-node 2 -m deepgen_components.cli eval --benchmark geneval --preset tiny "
        "--limit 8 --out runs/eval_geneval_2"
    ],
]
RUN = {key for group in RUN_GROUPS for key in group}

_WEIGHTS = "needs the official DeepGen 1.0 / Qwen2.5-VL weights (local folders a CPU test cannot have)"
_GPU = "needs CUDA (the GPU tier; benchmarks/gpu_*.sh run it on the device machine)"
_SHAPES_RL = ("a measured stage-3 run (about 16 minutes on 2 cores); its --quick form runs in tests/test_shapes_rl.py "
              "(test_a_quick_stage3_run_raises_its_rewards_on_its_own_training_prompts)")
_FRAGMENT = "an API fragment (names defined by the surrounding text); the same calls run in the test named"
NOT_RUN: dict[str, str] = {
    "python benchmarks/load_memory.py --out out/load_memory": "the small preset: about 2 minutes and 1.5 GB of "
    "inputs on disk; its --quick form runs above and tests/test_load_memory.py checks the loaders it measures",
    "deepgen eval --benchmark shapes --preset deepgen-shapes --protocol official --out runs/eval_shapes": "27 s of "
    "generation; tests/test_eval_distributed.py runs it under torchrun and checks the documented numbers",
    "torchrun --standalone --nproc-per-node 8 -m deepgen_components.cli eval --benchmark geneval --pipeline my_deepgen "
    "--device cuda --dtype bfloat16 --protocol official --out runs/geneval": _GPU + " and a trained model",
    "python evaluation/evaluate_images.py runs/geneval/images --outfile runs/geneval/results.jsonl --model-path "
    "DETECTOR_DIR": "GenEval's own evaluator (mmdetection + a downloaded detector); tests/test_eval_scoring.py runs a "
    "stand-in through --scorer-cmd",
    "python evaluation/summary_scores.py runs/geneval/results.jsonl": "GenEval's own summary script, not installed here",
    "deepgen eval --benchmark cvtg --prompts cvtg2k.jsonl --pipeline my_deepgen --device cuda --protocol official "
    "--out runs/cvtg": _GPU + ", a trained model and the CVTG-2K prompts; tests/test_eval_scoring.py runs the OCR "
    "evaluator on rendered text",
    "deepgen eval --benchmark wise --prompts wise.jsonl --pipeline my_deepgen --device cuda --protocol official "
    "--judge-url http://127.0.0.1:8000 --judge-model Qwen2.5-VL-72B-Instruct --out runs/wise": _GPU + " and a judge "
    "server; tests/test_eval_scoring.py runs the judge evaluator against a loopback server",
    "python -m venv .venv && . .venv/bin/activate": "the set-up; .ci/run performs it on every CI run",
    'pip install torch==2.13.0 && pip install -e ".[test]"': "the set-up; .ci/run performs it on every CI run",
    "python -m pytest -q": "the suite this test belongs to",
    "python -m pytest -q tests/test_golden_parity.py": "part of the suite this test belongs to",
    "python -m pytest tests/test_kernels_*.py -q": "part of the suite this test belongs to",
    'python -m pytest tests/test_kernels_*.py -q -m "not slow"': "part of the suite this test belongs to",
    "pytest -m gpu tests/test_kernels_*.py": _GPU,
    "bash benchmarks/gpu_check.sh OUTDIR": _GPU + "; its usage line is checked below",
    "deepgen bench --preset tiny --device cpu --dtype float32 --modes eager,kernels,compile,compile+graphs "
    "--resolution 64 --steps 20 --repeats 20 --threads 1 --resolutions 64,128,256 --batches 1,2,4 --out out/bench": "minutes of torch.compile on 2 cores; tests/test_denoising.py runs every mode at toy size and tests/test_bench.py the suite, --help here",
    "deepgen bench --preset deepgen-1.0 --device cuda --dtype bfloat16 --modes eager,kernels,compile,compile+graphs "
    "--resolution 512 --steps 50 --guidance 4 --out out/bench": _GPU,
    "deepgen bench --preset small --modes eager,onnxruntime,tensorrt --resolution 256 --out out/bench_exported": "TensorRT cannot be installed here; tests/test_export.py runs the bench's ONNX Runtime mode",
    "deepgen export --preset tiny --out exported/": "about a minute of ONNX export; tests/test_export.py exports the tiny preset through the same code",
    "deepgen export --pipeline saved/ --out exported/ --min-size 512 --max-size 1024 --max-batch 2 "
    "--stages condition_encoder,dit,vae_decoder --dtype bfloat16 --trtexec": "needs a saved pipeline at DeepGen scale",
    "python benchmarks/export_latency.py --presets tiny,small --threads 1 --warmup 1 --repeats 5 --profile "
    "--out /tmp/bench": "a measurement of several minutes (docs/export.md's numbers); --help here",
    "python benchmarks/export_latency.py --presets tiny,small --threads 2 --warmup 1 --repeats 5 --out /tmp/bench": "a measurement of several minutes (docs/export.md's numbers); --help here",
    "python benchmarks/export_latency.py --presets small --size 256 --threads 1 --warmup 1 --repeats 5 "
    "--out /tmp/bench": "a measurement of several minutes (docs/export.md's numbers); --help here",
    "python benchmarks/fidelity.py --golden tests/data/golden/deepgen_tiny_a [--json fidelity.json]": "a synopsis ([...] is optional); the run with --json is in RUN",
    "python benchmarks/kernel_bench.py": _GPU,
    "python benchmarks/kernel_bench.py --verify --out DIR": _GPU,
    "python benchmarks/kernel_bench.py --only attention": _GPU,
    "OMP_NUM_THREADS=1 deepgen train --config training/configs/rl_tiny.yaml --out runs/rl_tiny": "the full rl_tiny run; the same config runs for 2 steps in RUN and in tests/test_rl_recipe.py",
    "vllm serve CodeGoat24/UnifiedReward-Think-qwen3vl-8b --served-model-name UnifiedReward --port 18087 &": "a GPU judge server (vLLM); tests/test_rewards.py serves the same API on 127.0.0.1",
    "torchrun --nproc_per_node 8 -m deepgen_components.cli train --config training/configs/rl_deepgen1.yaml": _WEIGHTS
    + "; 8 GPUs",
    "for stage in align sft; do for t in 1 2; do ...": "a throughput measurement, four tiny runs; the same "
    "configs train in RUN",
    "deepgen train --config training/configs/align_tiny.yaml": "the same run as 'deepgen train ... align_tiny.yaml --out runs/align_tiny' (the config's own out), in RUN",
    "torchrun --standalone --nproc-per-node 8 -m deepgen_components.cli train --config "
    "training/configs/align_deepgen1.yaml trainer.distributed=ddp": _WEIGHTS + "; 8 GPUs",
    "torchrun --standalone --nproc-per-node 8 -m deepgen_components.cli train --config "
    "training/configs/sft_deepgen1.yaml trainer.distributed=fsdp": _WEIGHTS + "; 8 GPUs",
    "torchrun --nnodes 8 --nproc-per-node 8 --node-rank $NODE_RANK --rdzv-backend c10d --rdzv-endpoint "
    "$MASTER_ADDR:29500 --rdzv-id deepgen-sft -m deepgen_components.cli train --config "
    "training/configs/sft_deepgen1.yaml --out /shared/runs/sft": _WEIGHTS + "; 64 GPUs on 8 nodes",
    'deepgen generate "a red cat" --vlm Qwen2.5-VL-3B-Instruct --weights DeepGen-1.0-diffusers --out cat.png': _WEIGHTS
    + "; tests/test_cli.py runs --vlm/--weights on a tiny model in the official layout",
    'deepgen edit cat.png -i "make it blue" --vlm Qwen2.5-VL-3B-Instruct --weights deepgen_sft.safetensors '
    "--vae UniPic2-SD3.5M-Kontext-2B/vae --device cuda --dtype bfloat16": _WEIGHTS + "; CUDA",
    # Python blocks (keyed by file and first line of code).
    'README.md: model = deepgen_1_0("Qwen2.5-VL-3B-Instruct/", "DeepGen-1.0/model.safetensors", '
    'vae_path="UniPic2/vae")': _WEIGHTS,
    'README.md: llm = AutoModelForCausalLM.from_pretrained("my-llm/").requires_grad_(False)': "loads 'my-llm/' and "
    "'my-sd3/', the reader's own models; tests/test_bridge.py composes the same components around tiny ones",
    'docs/benchmarks.md: pipe = DeepGenPipeline(model).to("cuda")': _GPU,
    "docs/components.md: vlm = ThinkTokenVLM(hf_model, num_think_tokens=128, layers=LayerSelection.official(36))": _FRAGMENT
    + ": tests/test_think_tokens.py",
    "docs/components.md: bridge = StackedChannelBridge(BridgeConfig(num_stacked_layers=6, vlm_hidden_size=2048,": _FRAGMENT
    + ": tests/test_bridge.py",
    "docs/components.md: dit = ConditionedDiT(SD3Transformer2DModel(...))": _FRAGMENT + ": tests/test_dit.py",
    'docs/export.md: manifest = export_model(model, "exported/", ranges=ExportRanges(min_size=256, max_size=1024, '
    "max_batch=4))": _FRAGMENT + ": tests/test_export.py",
    'docs/export.md: pipe = OnnxDeepGenPipeline("exported/", providers=["CPUExecutionProvider"], '
    "intra_op_num_threads=4,": _FRAGMENT + ": tests/test_export_numpy.py",
    'docs/export.md: build_engines("exported/")': "TensorRT cannot be installed here; "
    "tests/test_tensorrt_pipeline.py runs these calls against the fake tensorrt (tests/fake_tensorrt)",
    "deepgen export --preset small --out exported/ --min-size 512 --max-size 512 --max-batch 1 --engine": "TensorRT "
    "cannot be installed here; tests/test_tensorrt_export_gate.py runs `deepgen export --engine` through the fake "
    "tensorrt",
    "deepgen train --config training/configs/align_deepgen1.yaml --max-steps 20 --out runs/smoke "
    "trainer.checkpoint_every=10": _WEIGHTS + "; a GPU",
    "torchrun --standalone --nproc-per-node 8 -m deepgen_components.cli train --config "
    "training/configs/sft_deepgen1.yaml --out runs/sft trainer.distributed=fsdp model.init_from=runs/align/checkpoints "
    'data.num_workers=4 "trainer.ema={decay: 0.9999}"': _WEIGHTS + "; 8 GPUs",
    "deepgen convert --to official runs/sft sft.safetensors": "converts the 8-GPU run above; its tiny form "
    "(runs/sft_tiny) runs in the training chain",
    "deepgen data convert --format edit data/nano/data.json --images-root data/nano --out manifests/nano.jsonl "
    "--check-images": "needs an official dataset on disk; tests/test_data_convert.py runs the command on small lists "
    "in every official format",
    "deepgen shapes --out runs/rl_s0 --rl-from deepgen-shapes --threads 1 --set rl.trainer.seed=0": _SHAPES_RL,
    "deepgen shapes --out runs/rl_grpo_s0 --rl-from deepgen-shapes --threads 1 --set rl.trainer.seed=0 --set "
    "rl.rl.advantages=grpo": _SHAPES_RL,
    "python benchmarks/rl_gain.py --runs runs/rl_s0 runs/rl_s1 runs/rl_s2 --ablation runs/rl_grpo_s0 runs/rl_grpo_s1 "
    "--no-kl-sft runs/rl_nokl_s0 --out docs/results/rl_gain.json --plot docs/images/shapes/rl_rewards.png --grid "
    "docs/images/shapes/rl_pairs_heldout.png": "reads the six 16-minute runs above; tests/test_shapes_rl.py runs "
    "gain_record on a real quick run",
    "python benchmarks/export_scale.py --out out/export_scale": "the measurement itself (4 minutes, 19 GB of RAM); "
    "its --preset tiny form runs here",
    "docs/kernels.md: from deepgen_components.triton_kernels import (": "a list of signatures, not code to run",
    "docs/kernels.md: if tk.kernels_enabled():": _FRAGMENT + ": tests/test_kernels_*.py",
    "docs/pipeline.md: pipe = DeepGenPipeline(deepgen_tiny())": _WEIGHTS + " (its second pipeline); "
    "tests/test_pipeline.py makes the same call on deepgen_tiny()",
    'docs/pipeline.md: source = Image.open("cat.png")': _FRAGMENT + ": tests/test_pipeline.py",
    'docs/pipeline.md: pipe.save_pretrained("my_deepgen")': _FRAGMENT + ": tests/test_pipeline.py",
    'docs/weights.md: model = deepgen_1_0("Qwen2.5-VL-3B-Instruct", "deepgen_sft.safetensors", '
    'vae_path="UniPic2-SD3.5M-Kontext-2B/vae")': _WEIGHTS,
}


def test_the_docs_show_commands_at_all():
    kinds = {(doc, kind) for doc, kind, _ in documented()}
    assert ("README.md", "shell") in kinds and ("README.md", "python") in kinds
    assert len(documented()) >= 40


def test_every_documented_command_is_run_or_has_a_reason():
    missing, both = [], []
    for doc, kind, text in documented():
        key = _key(doc, kind, text)
        if key in RUN and key in NOT_RUN:
            both.append(key)
        elif key not in RUN and key not in NOT_RUN:
            missing.append(f"{doc}: {key!r}")
    assert not missing, (
        "documented commands that no test runs (add them to RUN, or to NOT_RUN with a reason):\n"
        + ("\n".join(missing))
    )
    assert not both


def test_no_stale_entries_in_the_run_and_skip_lists():
    keys = {_key(doc, kind, text) for doc, kind, text in documented()}
    assert sorted((RUN | set(NOT_RUN)) - keys) == []


# -- running them --------------------------------------------------------------------------------------------


def _environment() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # as a user's shell has it
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env.setdefault("OMP_NUM_THREADS", "1")
    env["HF_HUB_OFFLINE"] = "1"
    return env


def _run_group(
    group: list[str], work: Path, python_blocks: dict[str, str]
) -> dict[str, subprocess.CompletedProcess]:
    results = {}
    for key in group:
        if ".md: " in key:
            argv = [sys.executable, "-c", python_blocks[key]]
        else:
            argv = ["bash", "-c", key.replace("/tmp/", f"{work}/tmp/")]
        results[key] = subprocess.run(
            argv, cwd=work, env=_environment(), capture_output=True, text=True, timeout=600
        )
        if results[key].returncode != 0:
            break  # a later command of the group needs this one's output
    return results


@pytest.fixture(scope="module")
def ran(tmp_path_factory) -> tuple[Path, dict[str, subprocess.CompletedProcess]]:
    """Run every RUN command in a folder laid out like the repository root; two groups at a time."""
    work = tmp_path_factory.mktemp("as_documented")
    for name in ("training", "benchmarks", "tests", "docs"):
        (work / name).symlink_to(ROOT / name, target_is_directory=True)
    (work / "tmp").mkdir()
    python_blocks = {_key(doc, kind, text): text for doc, kind, text in documented() if kind == "python"}
    with ThreadPoolExecutor(max_workers=2) as pool:
        futures = [pool.submit(_run_group, group, work, python_blocks) for group in RUN_GROUPS]
        results = {}
        for future in futures:
            results.update(future.result())
    return work, results


@pytest.mark.parametrize("key", [key for group in RUN_GROUPS for key in group])
def test_documented_command_runs_as_written(ran, key):
    _, results = ran
    assert key in results, f"not run: an earlier command of its group failed ({key!r})"
    result = results[key]
    assert result.returncode == 0, f"{key!r} exited {result.returncode}:\n{result.stderr[-3000:]}"
    assert "Traceback" not in result.stderr, result.stderr[-3000:]


def test_the_demo_as_documented_draws_its_prompts_and_performs_its_edit(ran):
    """The README's main job: both generated images follow their prompts and the edit succeeds (ShapesEval)."""
    work, results = ran
    assert DEFAULT_PRESET == "deepgen-shapes"
    assert "loaded deepgen-shapes" in results["deepgen demo --out demo_out"].stdout
    evaluator = ShapesEval()
    out = work / "demo_out"
    images = {}
    for name in ("generate_0", "generate_1", "edit_0"):
        with Image.open(out / f"{name}.png") as image:
            assert image.size == (64, 64)
            images[name] = image.convert("RGB")
    for i, prompt in enumerate(DEMO_PROMPTS):
        assert evaluator.score_t2i(images[f"generate_{i}"], prompt)["all"], prompt
    edit = evaluator.score_edit(
        images["generate_0"], DEMO_INSTRUCTION, images["edit_0"], source_caption=DEMO_PROMPTS[0]
    )
    assert edit == {"success": True, "changed_ok": True, "kept_ok": True}, (DEMO_INSTRUCTION, edit)


def test_the_load_memory_benchmark_as_documented_reports_every_case(ran):
    """``--quick`` (the tiny preset) measures every loading path in both dtypes, each against its own loaded bytes."""
    work, _ = ran
    result = json.loads((work / "out" / "load_memory_quick" / "load_memory.json").read_text())
    assert result["preset"] == "tiny"
    cases = {(c["path"], c["dtype"]): c for c in result["cases"]}
    assert set(cases) == {(p, d) for p in ("folder", "official-file", "official-release")
                          for d in ("float32", "bfloat16")}
    for (path, dtype), case in cases.items():
        assert case["weight_dtypes"] == [dtype], (path, dtype)
        assert case["peak_increase_bytes"] > 0 and case["seconds"] > 0
        assert case["ratio"] == pytest.approx(case["peak_increase_bytes"] / case["loaded_bytes"], rel=1e-2)
        fp32 = cases[(path, "float32")]["loaded_bytes"]
        if dtype == "bfloat16":  # the same weights at half the bytes (the integer buffers aside)
            assert 0.45 * fp32 < case["loaded_bytes"] < 0.55 * fp32


def test_the_training_chain_as_documented_writes_its_outputs(ran):
    work, _ = ran
    assert (work / "runs" / "align_tiny" / "checkpoints" / "latest").is_file()
    assert (work / "runs" / "sft_tiny" / "pipeline" / "model_index.json").is_file()
    with Image.open(work / "circle.png") as image:
        assert image.size[0] > 0 and image.format == "PNG"
    # deepgen convert: the official file holds the SCB, the DiT and the VLM LoRA; the pipeline folder loads.
    from safetensors import safe_open

    with safe_open(str(work / "sft.safetensors"), "pt") as handle:
        keys = list(handle.keys())
    assert any(k.startswith("transformer.") for k in keys) and any(".lora_A." in k for k in keys)
    assert (work / "runs" / "sft_tiny_pipeline" / "model_index.json").is_file()


def test_the_fidelity_report_as_documented_finds_every_row_within_tolerance(ran):
    work, _ = ran
    report = json.loads((work / "fidelity_a.json").read_text())
    assert report["passed"] is True
    assert len(report["rows"]) >= 100


# -- every program answers --help --------------------------------------------------------------------------


def _subcommands() -> list[str]:
    from deepgen_components.cli import build_parser

    parser = build_parser()
    action = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
    return sorted(action.choices)


def test_the_cli_has_the_documented_subcommands():
    assert {"generate", "edit", "info", "demo", "export", "train", "bench", "shapes"} <= set(_subcommands())


HELP_COMMANDS = (
    [
        f"deepgen {name} --help"
        for name in ("generate", "edit", "info", "demo", "export", "train", "bench", "shapes", "eval")
    ]
    + [f"python benchmarks/{path.name} --help" for path in sorted((ROOT / "benchmarks").glob("[!_]*.py"))]
    + ["torchrun --nproc-per-node 1 -m deepgen_components.cli --help"]
)


@pytest.fixture(scope="module")
def helped(tmp_path_factory) -> dict[str, subprocess.CompletedProcess]:
    work = tmp_path_factory.mktemp("help")
    (work / "benchmarks").symlink_to(ROOT / "benchmarks", target_is_directory=True)

    def run(command: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            ["bash", "-c", command], cwd=work, env=_environment(), capture_output=True, text=True, timeout=300
        )

    with ThreadPoolExecutor(max_workers=2) as pool:
        return dict(zip(HELP_COMMANDS, pool.map(run, HELP_COMMANDS)))


@pytest.mark.parametrize("command", HELP_COMMANDS)
def test_every_program_answers_help(helped, command):
    result = helped[command]
    assert result.returncode == 0, f"{command!r} exited {result.returncode}:\n{result.stderr[-3000:]}"
    assert "usage:" in result.stdout.lower(), result.stdout[:500]


@pytest.mark.parametrize("script", sorted(p.name for p in (ROOT / "benchmarks").glob("*.sh")))
def test_every_benchmark_shell_script_parses_and_states_its_usage(script):
    path = ROOT / "benchmarks" / script
    assert subprocess.run(["bash", "-n", str(path)], capture_output=True).returncode == 0
    result = subprocess.run(
        ["bash", str(path)], capture_output=True, text=True, timeout=60, env=_environment()
    )
    assert result.returncode != 0 and "usage" in result.stderr.lower(), result.stderr


def test_no_benchmark_script_shadows_an_importable_module(tmp_path):
    """``python benchmarks/X.py`` puts benchmarks/ first on sys.path: a file named like a package hides it
    (``benchmarks/kernels.py`` hid the ``kernels`` package transformers imports). Asked in a fresh interpreter
    outside the repository, so nothing of this test session's sys.path counts."""
    names = sorted(p.stem for p in (ROOT / "benchmarks").glob("*.py"))
    assert "kernel_bench" in names
    probe = (
        "import importlib.util, json, sys; "
        "print(json.dumps({n: importlib.util.find_spec(n) is not None for n in sys.argv[1:]}))"
    )
    argv = [sys.executable, "-c", probe, "kernels", "transformers", *names]
    result = subprocess.run(
        argv, cwd=tmp_path, capture_output=True, text=True, env=_environment(), timeout=120
    )
    found = json.loads(result.stdout)
    assert found["kernels"] and found["transformers"]  # the probe sees installed packages
    shadowing = [name for name in names if found[name]]
    assert shadowing == [], f"benchmarks/ files named like importable modules: {shadowing}"
