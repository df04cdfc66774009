"""`deepgen eval` under ``torchrun --nproc-per-node 2`` (gloo, CPU): shards disjoint and complete, and the shipped
deepgen-shapes model scores its documented numbers through the harness; a killed run resumes without redoing
finished prompts."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

import deepgen_components.shapes  # noqa: F401  (registers the shapes benchmark: load_prompts("shapes"))
from deepgen_components.builders import SHAPES_PRESET_DIR
from deepgen_components.evaluation import load_prompts

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
ENV.pop("TRITON_INTERPRET", None)


def _eval(*args: str, nproc: int | None = None) -> list[str]:
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"] if nproc \
        else [sys.executable]
    return [*launcher, "-m", "deepgen_components.cli", "eval", "--quiet", *args]


@pytest.mark.slow
def test_torchrun_two_ranks_shard_disjointly_and_reproduce_the_shapes_numbers(tmp_path):
    """108 prompts of the shapes evaluation, 54 per rank, at the shapes evaluation's settings (64 px, 20 steps, CFG
    4, its noise): the scores are the documented ones of the shipped model (training_report.json, docs/shapes.md)."""
    out = tmp_path / "shapes"
    done = subprocess.run(_eval("--benchmark", "shapes", "--preset", "deepgen-shapes", "--protocol", "official",
                                "--batch-size", "27", "--out", str(out), nproc=2),
                          env=ENV, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    ids = [r.id for r in load_prompts("shapes")]
    shards = json.loads((out / "shards.json").read_text())
    assert shards["world_size"] == 2
    rank0, rank1 = (rank["generated"] for rank in shards["ranks"])
    assert not set(rank0) & set(rank1)
    assert sorted(rank0 + rank1) == sorted(ids) and len(rank0) == len(rank1) == 54
    assert rank0 == ids[0::2] and rank1 == ids[1::2]  # deterministic round-robin
    assert sorted(p.name for p in (out / "images").iterdir()) == sorted([f"{i}.png" for i in ids] + ["prompts.jsonl"])

    documented = json.loads((SHAPES_PRESET_DIR / "training_report.json").read_text())["results"]["after stage 3 (rl)"]
    summary = json.loads((out / "summary.json").read_text())
    (shapes,) = summary["scores"]
    metrics = shapes["metrics"]
    for attribute, value in documented["t2i"].items():
        assert metrics[f"t2i_{attribute}"] == pytest.approx(value, abs=1e-12), attribute
    for attribute, value in documented["heldout"].items():
        assert metrics[f"heldout_{attribute}"] == pytest.approx(value, abs=1e-12), attribute
    assert metrics["reward"] == pytest.approx(documented["reward"], abs=1e-9)
    assert shapes["overall"] == pytest.approx(0.9722222222222222)  # docs/shapes.md: 97.2 % all four right
    assert summary["timing"]["world_size"] == 2 and summary["timing"]["generated_images"] == 108


def test_a_killed_run_resumes_without_redoing_finished_prompts(tmp_path):
    out = tmp_path / "geneval"
    args = _eval("--benchmark", "geneval", "--preset", "tiny", "--steps", "2", "--height", "32", "--width", "32",
                 "--batch-size", "1", "--limit", "40", "--out", str(out))
    process = subprocess.Popen(args, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    images = out / "images"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and process.poll() is None:
        if images.is_dir() and len([p for p in images.iterdir() if p.name.isdigit()]) >= 3:
            break
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    process.wait()
    finished = {p.name: p.stat().st_ino for p in images.iterdir()}
    assert 3 <= len(finished) < 40, f"kill came too late or too early: {len(finished)} prompts finished"
    assert not (out / "summary.json").exists()
    stamps = {name: (images / name / "samples" / "0000.png").stat().st_mtime_ns for name in finished}

    done = subprocess.run(args, env=ENV, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    after = sorted(p.name for p in images.iterdir())
    assert after == [f"{n:05d}" for n in range(40)]
    for name, inode in finished.items():  # the finished prompts were left as they were
        assert (images / name).stat().st_ino == inode
        assert (images / name / "samples" / "0000.png").stat().st_mtime_ns == stamps[name]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["timing"]["skipped_prompts"] == len(finished)
    assert summary["timing"]["generated_prompts"] == 40 - len(finished)
    (generated,) = [rank["generated"] for rank in json.loads((out / "shards.json").read_text())["ranks"]]
    assert not set(generated) & set(finished)
    assert not (out / ".partial").exists()
