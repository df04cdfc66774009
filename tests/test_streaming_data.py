"""Streaming WebDataset reading (#27): shards split across ranks and DataLoader workers (disjoint, the whole
dataset once per epoch), exact resume of the consumed stream position after a SIGKILL, and the official data
filter (shorter side > 80 px, aspect 0.1-10) on every built-in source, counted per reason."""

import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import textwrap
import time

import pytest
from deepgen_components.training.batches import BatchStream
from deepgen_components.training.config import load_config
from deepgen_components.training.data import ManifestSource, WebDatasetSource, build_sources
from deepgen_components.training.samples import ImageFilter
from deepgen_components.training.streaming import StreamingWebDataset, read_groups
from PIL import Image


def png_bytes(width=64, height=64, color=(0, 0, 255)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (width, height), color).save(buf, format="PNG")
    return buf.getvalue()


def write_tar(path, files: dict[str, bytes]):
    with tarfile.open(path, "w") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def write_shards(folder, shards=8, per_shard=3, extra: dict | None = None):
    """``shards`` shards of ``per_shard`` t2i samples keyed ``s{shard}_{i}`` (the caption is the key)."""
    folder.mkdir(parents=True, exist_ok=True)
    keys = []
    for s in range(shards):
        files = {}
        for i in range(per_shard):
            key = f"s{s}_{i}"
            files[f"{key}.png"] = png_bytes(96, 96, color=(10 * s, 20 * i, 0))
            files[f"{key}.txt"] = key.encode()
            keys.append(key)
        if s == 0:
            files.update(extra or {})
        write_tar(folder / f"{s:03d}.tar", files)
    return keys


def stream(folder, *, rank=0, world_size=1, num_workers=2, batch_size=3, **options):
    source = StreamingWebDataset(folder, image_size=64, name="t", filters=ImageFilter(min_side=0), **options)
    return BatchStream({"t": source}, {"t": 1}, batch_size, seed=5, rank=rank, world_size=world_size,
                       num_workers=num_workers)


def test_two_ranks_with_two_workers_read_disjoint_samples_that_cover_the_dataset_once_per_epoch(tmp_path):
    keys = write_shards(tmp_path / "shards", shards=8, per_shard=3)  # 24 samples, 2 shards per reader and epoch
    per_rank = []
    for rank in range(2):
        data = stream(tmp_path / "shards", rank=rank, world_size=2, num_workers=2, batch_size=3)
        plans = [next(data)[1] for _ in range(8)]  # 4 micro-batches = one epoch of this rank (12 samples)
        data.close()
        assert all(plan.source == "t" and len(plan.keys) == 3 for plan in plans)
        per_rank.append([plan.keys for plan in plans])
    for epoch in range(2):
        read = [key for rank in per_rank for batch in rank[4 * epoch: 4 * epoch + 4] for key in batch]
        assert sorted(read) == sorted(keys)  # disjoint (no key twice) and the whole dataset
    # Every micro-batch is one worker's: its samples come from that worker's shards only.
    assert all(len({key.split("_")[0] for key in batch}) == 1 for rank in per_rank for batch in rank)
    # A new epoch reads the shards in a new order (shuffle: true), seeded: the same run reads the same.
    assert per_rank[0][:4] != per_rank[0][4:]
    again = stream(tmp_path / "shards", rank=0, world_size=2, num_workers=2, batch_size=3)
    assert [next(again)[1].keys for _ in range(8)] == per_rank[0]


def test_block_shuffle_permutes_within_a_shard_and_keeps_every_sample(tmp_path):
    keys = write_shards(tmp_path / "shards", shards=2, per_shard=6)
    plain = stream(tmp_path / "shards", num_workers=0, batch_size=6, shuffle=False)
    shuffled = stream(tmp_path / "shards", num_workers=0, batch_size=6, shuffle=False, shuffle_buffer=3)
    plain_keys = [k for _ in range(2) for k in next(plain)[1].keys]
    shuffled_keys = [k for _ in range(2) for k in next(shuffled)[1].keys]
    assert plain_keys == keys and sorted(shuffled_keys) == sorted(keys) and shuffled_keys != keys
    # Blocks of 3: each block's samples stay in their block.
    assert [sorted(shuffled_keys[i:i + 3]) for i in range(0, 12, 3)] == [keys[i:i + 3] for i in range(0, 12, 3)]


_READER = textwrap.dedent("""
    import json, os, sys, time
    from deepgen_components.training.batches import BatchStream
    from deepgen_components.training.data import ManifestSource
    from deepgen_components.training.samples import ImageFilter
    from deepgen_components.training.streaming import StreamingWebDataset

    shards, manifest, out = sys.argv[1:4]
    sources = {"m": ManifestSource(manifest, 64),
               "t": StreamingWebDataset(shards, 64, name="t", filters=ImageFilter(), shuffle_buffer=2)}
    data = BatchStream(sources, {"m": 1, "t": 2}, 2, seed=3, num_workers=2)
    prompts = []
    for count in range(1, 500):
        batch, plan = next(data)
        prompts.append(batch["prompts"])
        if count == 5:  # the checkpoint: what was consumed and the stream state, written atomically
            with open(out + ".tmp", "w") as f:
                json.dump({"state": data.state_dict(), "prompts": prompts}, f)
            os.replace(out + ".tmp", out)
        with open(out + ".progress", "w") as f:
            f.write(str(count))
        time.sleep(0.05)
""")


def _mixed_stream(shards, manifest) -> BatchStream:
    """What the reader process builds: a manifest and a streaming source in a 1 : 2 cycle."""
    sources = {"m": ManifestSource(manifest, 64),
               "t": StreamingWebDataset(shards, 64, name="t", filters=ImageFilter(), shuffle_buffer=2)}
    return BatchStream(sources, {"m": 1, "t": 2}, 2, seed=3, num_workers=2)


def test_resume_after_sigkill_continues_at_the_exact_sample(tmp_path):
    """A real process reads micro-batches (2 DataLoader workers prefetching ahead, a manifest source in the
    cycle, block shuffle, filtered samples), checkpoints after 5, reads on and is killed with SIGKILL; a new
    stream loaded from the checkpoint continues with exactly the samples of an uninterrupted run."""
    small = {"tiny.png": png_bytes(40, 40), "tiny.txt": b"tiny", "wide.png": png_bytes(1500, 90), "wide.txt": b"w"}
    write_shards(tmp_path / "shards", shards=4, per_shard=5, extra=small)
    (tmp_path / "img").mkdir()
    rows = []
    for i in range(5):
        Image.new("RGB", (96, 96), (40 * i, 0, 0)).save(tmp_path / "img" / f"{i}.png")
        rows.append(json.dumps({"task": "t2i", "image": f"img/{i}.png", "caption": f"m{i}"}))
    manifest = tmp_path / "m.jsonl"
    manifest.write_text("\n".join(rows) + "\n")
    script = tmp_path / "reader.py"
    script.write_text(_READER)
    out = str(tmp_path / "ckpt.json")
    process = subprocess.Popen([sys.executable, str(script), str(tmp_path / "shards"), str(manifest), out])
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and process.poll() is None:
            progress = tmp_path / "ckpt.json.progress"
            if progress.is_file() and progress.read_text() and int(progress.read_text()) >= 9:
                break
            time.sleep(0.1)
        assert process.poll() is None, "the reader process ended before it was killed"
        os.kill(process.pid, signal.SIGKILL)  # mid-stream, 4+ micro-batches past the checkpoint
    finally:
        process.kill()
        process.wait()
    saved = json.loads((tmp_path / "ckpt.json").read_text())
    assert len(saved["prompts"]) == 5

    reference = _mixed_stream(tmp_path / "shards", manifest)
    expected = [next(reference)[0]["prompts"] for _ in range(14)]
    reference.close()
    resumed = _mixed_stream(tmp_path / "shards", manifest)
    resumed.load_state_dict(saved["state"])
    continued = [next(resumed)[0]["prompts"] for _ in range(9)]
    resumed.close()
    assert saved["prompts"] + continued == expected
    assert {"tiny", "w"}.isdisjoint(p for batch in expected for p in batch)  # filtered (40 px; 1500:90 > 10)
    assert dict(reference.sources["t"].skipped.counts) == {"too_small": 1, "aspect_ratio": 1}


def test_exact_resume_needs_the_same_world_size_and_workers(tmp_path):
    write_shards(tmp_path / "shards", shards=4, per_shard=2)
    data = stream(tmp_path / "shards", num_workers=2, batch_size=2)
    next(data)
    state = json.loads(json.dumps(data.state_dict()))
    data.close()
    with pytest.raises(ValueError, match=r"saved with world_size=1, num_workers=2, batch_size=2; this run has "
                                         r"world_size=1, num_workers=1"):
        stream(tmp_path / "shards", num_workers=1, batch_size=2).load_state_dict(state)
    two_ranks = stream(tmp_path / "shards", rank=0, world_size=2, num_workers=1, batch_size=2)
    next(two_ranks)
    with pytest.raises(RuntimeError, match=r"call gather_state\(info\) on every rank first"):
        two_ranks.state_dict()
    two_ranks.close()


def test_every_reader_needs_a_shard(tmp_path):
    write_shards(tmp_path / "shards", shards=3, per_shard=1)
    with pytest.raises(ValueError, match=r"data.sources\[t\]: 3 shard\(s\) for 4 readers \(world_size 2 x "
                                         r"data.num_workers 2\)"):
        stream(tmp_path / "shards", rank=1, world_size=2, num_workers=2)


def test_a_shard_is_read_sequentially_grouping_consecutive_members(tmp_path):
    shard = write_tar(tmp_path / "a.tar", {"k1.png": b"1", "k1.txt": b"a", "d/k2.src.png": b"2", "d/k2.tgt.png": b"3",
                                           "d/k2.txt": b"b", "k3.txt": b"c"})
    assert [(key, sorted(files)) for key, files in read_groups(shard)] == [
        ("k1", ["png", "txt"]), ("d/k2", ["src.png", "tgt.png", "txt"]), ("k3", ["txt"])]
    assert [key for key, _ in read_groups(shard, skip=2)] == ["k3"]


# -- the official filter ---------------------------------------------------------------------------------------
def test_the_official_filter_skips_a_150_to_1_image_and_a_60_px_image_and_counts_them(tmp_path, caplog):
    (tmp_path / "shards").mkdir()
    write_tar(tmp_path / "shards" / "000.tar", {
        "wide.png": png_bytes(13500, 90), "wide.txt": b"150:1",
        "small.png": png_bytes(60, 60), "small.txt": b"60 px",
        "ok.png": png_bytes(128, 96), "ok.txt": b"kept",
    })
    source = StreamingWebDataset(tmp_path / "shards", 64, name="t", filters=ImageFilter())
    data = BatchStream({"t": source}, {"t": 1}, 1, num_workers=0)
    with caplog.at_level("WARNING", logger="deepgen_components.training.data"):
        batch, plan = next(data)
    assert plan.keys == ("ok",) and batch["prompts"] == ["kept"]
    assert dict(source.skipped.counts) == {"aspect_ratio": 1, "too_small": 1}
    assert any("aspect 150 outside [0.1, 10.0]" in r.getMessage() for r in caplog.records)

    # The same filter on the map-style sources.
    mapped = WebDatasetSource(tmp_path / "shards", 64, filters=ImageFilter())
    assert [mapped[i] is None for i in range(3)] == [False, True, True]  # sorted keys: ok, small, wide
    assert dict(mapped.skipped.counts) == {"aspect_ratio": 1, "too_small": 1}
    for name, size in (("wide", (13500, 90)), ("small", (60, 60)), ("tall", (90, 1000))):
        Image.new("RGB", size).save(tmp_path / f"{name}.png")
    (tmp_path / "m.jsonl").write_text("".join(json.dumps({"image": f"{n}.png", "caption": n}) + "\n"
                                              for n in ("wide", "small", "tall")))
    manifest = ManifestSource(tmp_path / "m.jsonl", 64, task="t2i", filters=ImageFilter())
    assert [manifest[i] for i in range(3)] == [None, None, None]
    assert dict(manifest.skipped.counts) == {"aspect_ratio": 2, "too_small": 1}


def test_the_config_applies_the_filter_by_default_and_builds_streaming_sources(tmp_path):
    write_shards(tmp_path / "shards", shards=1, per_shard=1)
    (tmp_path / "m.jsonl").write_text(json.dumps({"image": "x.png", "caption": "x"}) + "\n")
    entries = (f"[{{name: w, kind: webdataset, path: {tmp_path / 'shards'}}},"
               f"{{name: f, kind: webdataset, path: {tmp_path / 'shards'}, options: {{streaming: false, min_side: 0}}}},"
               f"{{name: m, kind: manifest, path: {tmp_path / 'm.jsonl'}, options: {{max_aspect: 4}}}}]")
    sources = build_sources(load_config(None, [f"data.sources={entries}", "data.image_size=512"]))
    assert isinstance(sources["w"], StreamingWebDataset) and isinstance(sources["f"], WebDatasetSource)
    assert sources["w"].filters == ImageFilter(80, 0.1, 10.0)  # the official filter at DeepGen's 512 px
    assert sources["f"].filters.min_side == 0 and sources["m"].filters == ImageFilter(80, 0.1, 4.0)
    # Smaller training sizes scale the size rule (a 64 px tiny run keeps its 64 px images).
    assert ImageFilter.from_options({}, 64, "x").min_side == 10
    assert ImageFilter.from_options({}, 1024, "x").min_side == 80
    with pytest.raises(ValueError, match=r"data.sources\[m\].options: need 0 < min_aspect <= 1 <= max_aspect"):
        build_sources(load_config(None, [f"data.sources=[{{name: m, kind: manifest, path: {tmp_path / 'm.jsonl'}, "
                                         "options: {min_aspect: 2}}]"]))
    with pytest.raises(ValueError, match=r"data.sources\[w\].options.shuffle_buffer: expected an int >= 0"):
        build_sources(load_config(None, [f"data.sources=[{{name: w, kind: webdataset, path: {tmp_path / 'shards'}, "
                                         "options: {shuffle_buffer: -1}}]"]))


# -- in the trainer ------------------------------------------------------------------------------------------------
def test_training_on_a_streamed_source_restarts_from_a_checkpoint_at_the_exact_samples(tmp_path):
    """Stage 1 on a shapes edit source and a streamed t2i source (2 DataLoader workers): restarted from its step-2
    checkpoint, a 6-step run repeats steps 3-6 float for float (the streamed samples came back exactly)."""
    import shutil
    from pathlib import Path

    import deepgen_components.training as training_package
    from deepgen_components.training.checkpoint import load_checkpoint
    from deepgen_components.training.metrics import read_metrics
    from deepgen_components.training.trainer import train

    import deepgen_components.shapes  # noqa: F401  (registers `kind: shapes`)

    write_shards(tmp_path / "shards", shards=4, per_shard=4)
    sources = ("[{name: edit, kind: shapes, task: edit, repeat: 1, seed: 1},"
               f"{{name: t2i, kind: webdataset, task: t2i, repeat: 2, path: {tmp_path / 'shards'}}}]")
    cfg = load_config(Path(training_package.__file__).parent / "configs" / "align_tiny.yaml", [
        f"data.sources={sources}", "data.num_workers=2", "data.batch_size=2", "trainer.checkpoint_every=2",
        "trainer.keep_last=3", "trainer.tensorboard=false", "trainer.save_pipeline=false"])
    out = tmp_path / "run"
    train(cfg, out=out, max_steps=6)
    expected = read_metrics(out)
    streams = load_checkpoint(out / "checkpoints" / "step_00000006")["sampler"]["streams"]
    assert streams["num_workers"] == 2 and set(streams["ranks"][0]) == {"t2i"}
    for step in (4, 6):
        shutil.rmtree(out / "checkpoints" / f"step_{step:08d}")
    (out / "checkpoints" / "latest").write_text("step_00000002")
    train(cfg, out=out, max_steps=6)
    assert [(r["step"], r["loss"], r["grad_norm"]) for r in read_metrics(out)] == [
        (r["step"], r["loss"], r["grad_norm"]) for r in expected]
