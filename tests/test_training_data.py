"""Training data: JSONL / Parquet manifests, WebDataset tar shards and the shapes world all yield ``Sample``s
resized by the official ``fix_pixels`` rule (sqrt(H*W) = size, sides rounded up to a multiple of 32) in
[-1, 1]; unreadable images are skipped and counted (never a crash mid-epoch); a bad manifest line is an error
that names the file and the line.
"""

import io
import json
import logging
import tarfile

import numpy as np
import pytest
import torch
from deepgen_components.training.config import load_config
from deepgen_components.training.data import (
    ManifestError,
    ManifestSource,
    Sample,
    WebDatasetSource,
    available_sources,
    build_sources,
    collate,
    load_image,
    register_source,
)
from PIL import Image

from deepgen_components.shapes.data import ShapesSource, foreground_mask  # also registers the `shapes` kinds


def png(path, height=40, width=60, color=(255, 0, 0)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (width, height), color).save(path)
    return path


def png_bytes(height=40, width=60, color=(0, 0, 255)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (width, height), color).save(buf, format="PNG")
    return buf.getvalue()


def write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def write_tar(path, files: dict[str, bytes]):
    with tarfile.open(path, "w") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


# -- fix_pixels and range -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("height", "width", "size", "expected"),
    [
        (40, 60, 64, (64, 96)),  # scale 64/sqrt(2400) = 1.306: 52.2 -> 64, 78.4 -> 96
        (64, 64, 64, (64, 64)),
        (100, 50, 64, (96, 64)),  # 90.5 -> 96, 45.3 -> 64
        (300, 400, 512, (448, 608)),  # 443.4 -> 448, 591.2 -> 608
    ],
)
def test_images_are_resized_by_fix_pixels_and_rounded_up_to_32(tmp_path, height, width, size, expected):
    pixels = load_image(png(tmp_path / "a.png", height, width), size)
    assert pixels.shape == (3, *expected)


def test_pixels_are_in_minus_one_to_one(tmp_path):
    white = load_image(png(tmp_path / "w.png", color=(255, 255, 255)), 64)
    black = load_image(png(tmp_path / "b.png", color=(0, 0, 0)), 64)
    red = load_image(png_bytes(color=(255, 0, 0)), 64)
    assert white.dtype == torch.float32
    assert torch.equal(white, torch.ones_like(white)) and torch.equal(black, -torch.ones_like(black))
    assert red[0].eq(1).all() and red[1:].eq(-1).all()


def test_grayscale_and_rgba_images_become_rgb(tmp_path):
    Image.new("L", (32, 32), 128).save(tmp_path / "g.png")
    Image.new("RGBA", (32, 32), (10, 20, 30, 0)).save(tmp_path / "rgba.png")
    assert load_image(tmp_path / "g.png", 32).shape == (3, 32, 32)
    assert load_image(tmp_path / "rgba.png", 32).shape == (3, 32, 32)


# -- manifests --------------------------------------------------------------------------------------------------


def test_jsonl_manifest_reads_t2i_and_edit_samples_relative_to_the_manifest(tmp_path):
    png(tmp_path / "img/cat.png")
    png(tmp_path / "img/src.png", 64, 64)
    png(tmp_path / "img/ref2.png", 32, 128)
    png(tmp_path / "img/tgt.png", 64, 64, color=(0, 255, 0))
    (tmp_path / "data").mkdir()
    manifest = write_jsonl(tmp_path / "data" / "m.jsonl", [  # paths are relative to the manifest's folder
        {"task": "t2i", "image": "../img/cat.png", "caption": "a red cat"},
        {"task": "edit", "source": "../img/src.png", "instruction": "make it green", "target": "../img/tgt.png"},
        {"task": "edit", "source": ["../img/src.png", "../img/ref2.png"], "instruction": "combine",
         "target": "../img/tgt.png"},
    ])
    source = ManifestSource(manifest, image_size=64)
    assert len(source) == 3 and source.task == "mixed"
    t2i, edit, multi = source[0], source[1], source[2]
    assert (t2i.task, t2i.text, t2i.target.shape, t2i.references) == ("t2i", "a red cat", (3, 64, 96), [])
    assert (edit.task, edit.text, len(edit.references)) == ("edit", "make it green", 1)
    assert edit.target[1].eq(1).all()  # the green target, not the red source
    assert [r.shape for r in multi.references] == [(3, 64, 64), (3, 32, 128)]


def test_parquet_manifest_has_the_same_columns(tmp_path):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    png(tmp_path / "a.png")
    png(tmp_path / "b.png", 64, 64)
    table = pa.Table.from_pylist([
        {"task": "edit", "source": ["a.png", "b.png"], "instruction": "swap", "target": "b.png"},
        {"task": "edit", "source": ["b.png"], "instruction": "again", "target": "a.png"},
    ])
    pq.write_table(table, tmp_path / "m.parquet")
    source = ManifestSource(tmp_path / "m.parquet", image_size=64, task="edit")
    assert len(source) == 2 and source.task == "edit"
    assert source[0].text == "swap" and len(source[0].references) == 2
    assert source[1].target.shape == (3, 64, 96)


def test_a_manifest_row_without_task_takes_the_declared_task(tmp_path):
    png(tmp_path / "a.png")
    manifest = write_jsonl(tmp_path / "m.jsonl", [{"image": "a.png", "caption": "x"}])
    assert ManifestSource(manifest, 64, task="t2i")[0].task == "t2i"


@pytest.mark.parametrize(
    ("rows", "task", "message"),
    [
        (['{"task": "t2i", "image": "a.png", "caption": "ok"}', '{"task": "t2i", "image": '], None,
         r"m\.jsonl:2: not valid JSON"),
        (['{"task": "t2i", "image": "a.png", "caption": "ok"}', "", '["a.png"]'], None,
         r"m\.jsonl:3: expected a JSON object, got list"),
        ([{"task": "t2i", "image": "a.png"}], None, r"m\.jsonl:1: missing 'caption' for a t2i sample"),
        ([{"task": "edit", "source": "a.png", "target": "a.png"}], None,
         r"m\.jsonl:1: missing 'instruction' for a edit sample"),
        ([{"task": "t2i", "image": "a.png", "caption": "ok"}, {"task": "video", "image": "a.png", "caption": "x"}],
         None, r"m\.jsonl:2: 'task' must be 't2i' or 'edit', got 'video'"),
        ([{"image": "a.png", "caption": "no task"}], None, r"m\.jsonl:1: 'task' must be 't2i' or 'edit', got None"),
        ([{"task": "edit", "source": "a.png", "instruction": "x", "target": "a.png"}], "t2i",
         r"m\.jsonl:1: task 'edit' in a source declared as 't2i'"),
        ([], None, r"m\.jsonl: the manifest has no samples"),
    ],
)
def test_a_bad_manifest_is_an_error_naming_the_file_and_line(tmp_path, rows, task, message):
    manifest = write_jsonl(tmp_path / "m.jsonl", rows)
    with pytest.raises(ManifestError, match=message):
        ManifestSource(manifest, 64, task=task)


def test_a_missing_manifest_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="manifest not found: .*nope.jsonl"):
        ManifestSource(tmp_path / "nope.jsonl")


def test_unreadable_images_are_skipped_counted_and_warned_about(tmp_path, caplog):
    png(tmp_path / "good.png")
    (tmp_path / "garbage.png").write_bytes(b"not an image at all")
    full = png_bytes(64, 64)
    (tmp_path / "truncated.png").write_bytes(full[: len(full) // 2])
    manifest = write_jsonl(tmp_path / "m.jsonl", [
        {"task": "t2i", "image": "good.png", "caption": "ok"},
        {"task": "t2i", "image": "garbage.png", "caption": "corrupt"},
        {"task": "t2i", "image": "missing.png", "caption": "missing"},
        {"task": "t2i", "image": "truncated.png", "caption": "truncated"},
    ])
    source = ManifestSource(manifest, 64)
    with caplog.at_level(logging.WARNING, logger="deepgen_components.training.data"):
        samples = [source[i] for i in range(len(source))]
    assert isinstance(samples[0], Sample) and samples[1:] == [None, None, None]
    assert source.skipped.total == 3
    assert source.skipped.counts["FileNotFoundError"] == 1
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("missing.png" in w and "m.jsonl:3" in w for w in warnings)
    assert any("m.jsonl:2" in w for w in warnings) and any("m.jsonl:4" in w for w in warnings)


def test_an_edit_sample_with_one_unreadable_reference_is_skipped(tmp_path):
    png(tmp_path / "a.png")
    manifest = write_jsonl(tmp_path / "m.jsonl", [
        {"task": "edit", "source": ["a.png", "gone.png"], "instruction": "x", "target": "a.png"}])
    source = ManifestSource(manifest, 64)
    assert source[0] is None and source.skipped.total == 1


def test_repeated_skips_warn_once_then_every_hundredth(tmp_path, caplog):
    manifest = write_jsonl(tmp_path / "m.jsonl", [{"task": "t2i", "image": "gone.png", "caption": "x"}])
    source = ManifestSource(manifest, 64)
    with caplog.at_level(logging.WARNING, logger="deepgen_components.training.data"):
        for _ in range(250):
            source[0]
    assert source.skipped.total == 250
    assert len(caplog.records) == 3  # the 1st, 100th and 200th


# -- WebDataset ---------------------------------------------------------------------------------------------------


def test_webdataset_t2i_shards_pair_each_image_with_its_caption(tmp_path):
    shards = tmp_path / "shards"
    shards.mkdir()
    write_tar(shards / "000.tar", {"0001.png": png_bytes(), "0001.txt": b"a blue square\n",
                                   "0002.jpg": png_bytes(64, 64), "0002.txt": b"a jpeg-named png"})
    write_tar(shards / "001.tar", {"0003.webp": png_bytes(32, 32), "0003.txt": b"third"})
    source = WebDatasetSource(shards, image_size=64, task="t2i")
    assert len(source) == 3 and source.task == "t2i"
    assert [source[i].text for i in range(3)] == ["a blue square", "a jpeg-named png", "third"]
    assert source[0].target.shape == (3, 64, 96) and source[0].target[2].eq(1).all()


def test_webdataset_edit_samples_take_every_src_image_in_order(tmp_path):
    shard = write_tar(tmp_path / "edit.tar", {
        "k1.src.png": png_bytes(64, 64, (255, 0, 0)), "k1.tgt.png": png_bytes(64, 64), "k1.txt": b"make it blue",
        "k2.src0.png": png_bytes(64, 64, (255, 0, 0)), "k2.src1.png": png_bytes(32, 128, (0, 255, 0)),
        "k2.tgt.png": png_bytes(64, 64), "k2.txt": b"combine them",
    })
    source = WebDatasetSource(shard, image_size=64)
    assert source.task == "edit" and len(source) == 2
    one, two = source[0], source[1]
    assert one.task == "edit" and one.text == "make it blue" and len(one.references) == 1
    assert [r.shape for r in two.references] == [(3, 64, 64), (3, 32, 128)]
    assert two.references[0][0].eq(1).all() and two.references[1][1].eq(1).all()  # src0 (red) before src1


def test_webdataset_keys_keep_their_folder(tmp_path):
    # WebDataset convention: the key is the path up to the first dot of the file name, folders included.
    shard = write_tar(tmp_path / "s.tar", {"a/0001.png": png_bytes(), "a/0001.txt": b"from a",
                                            "b/0001.png": png_bytes(), "b/0001.txt": b"from b",
                                            "c.d/0002.png": png_bytes(), "c.d/0002.txt": b"dotted folder"})
    source = WebDatasetSource(shard, 64, task="t2i")
    assert [key for _, key, _ in source.index] == ["a/0001", "b/0001", "c.d/0002"]
    assert [source[i].text for i in range(3)] == ["from a", "from b", "dotted folder"]


def test_webdataset_task_filter_keeps_only_that_task(tmp_path):
    shard = write_tar(tmp_path / "mixed.tar", {
        "t.png": png_bytes(), "t.txt": b"t2i", "e.src.png": png_bytes(), "e.tgt.png": png_bytes(), "e.txt": b"edit"})
    assert [WebDatasetSource(shard, 64, task="t2i")[0].text] == ["t2i"]
    assert len(WebDatasetSource(shard, 64, task="edit")) == 1
    with pytest.raises(ValueError, match="no edit samples found"):
        WebDatasetSource(write_tar(tmp_path / "t.tar", {"t.png": png_bytes(), "t.txt": b"x"}), 64, task="edit")


def test_webdataset_corrupt_or_incomplete_samples_are_skipped(tmp_path, caplog):
    shard = write_tar(tmp_path / "s.tar", {
        "ok.png": png_bytes(), "ok.txt": b"fine",
        "bad.png": b"\x89PNG garbage", "bad.txt": b"corrupt",
        "notext.png": png_bytes(),
        "noimage.txt": b"caption only",
    })
    source = WebDatasetSource(shard, 64, task="t2i")
    with caplog.at_level(logging.WARNING, logger="deepgen_components.training.data"):
        samples = {source.index[i][1]: source[i] for i in range(len(source))}
    assert samples["ok"].text == "fine"
    assert samples["bad"] is None and samples["notext"] is None and samples["noimage"] is None
    assert source.skipped.total == 3 and caplog.records


def test_webdataset_needs_shards(tmp_path):
    with pytest.raises(FileNotFoundError, match="no .tar shards"):
        WebDatasetSource(tmp_path, 64)


# -- shapes world, collate, sources from a config -----------------------------------------------------------------


def test_shapes_source_is_deterministic_per_index():
    edit = ShapesSource("edit", 64, seed=1)
    t2i = ShapesSource("t2i", 64, seed=0)
    a, b = edit[5], ShapesSource("edit", 64, seed=1)[5]
    assert a.task == "edit" and a.text == b.text and torch.equal(a.target, b.target)
    assert len(a.references) == 1 and a.references[0].shape == (3, 64, 64)
    sample = t2i[0]
    assert sample.task == "t2i" and sample.target.shape == (3, 64, 64) and not sample.references
    assert -1 <= sample.target.min() and sample.target.max() <= 1
    with pytest.raises(ValueError, match="task must be 't2i' or 'edit'"):
        ShapesSource("video")


def test_shapes_source_foreground_weight_marks_the_shape_and_collates():
    plain, weighted = ShapesSource("t2i", 64, seed=0)[3], ShapesSource("t2i", 64, seed=0, foreground_weight=4.0)[3]
    assert plain.loss_weight is None and torch.equal(plain.target, weighted.target)
    w = weighted.loss_weight
    assert w.shape == (1, 64, 64) and set(w.unique().tolist()) == {1.0, 5.0}
    shape = foreground_mask(weighted.target)
    assert 0.03 < shape.mean() < 0.2  # one shape of the world, not the background
    assert torch.all(w[shape > 0] == 5.0) and (w == 5.0).sum() > (shape > 0).sum()  # covered and dilated
    assert torch.all(w[:, :2, :2] == 1.0)  # the background corner stays at 1
    batch = collate([ShapesSource("edit", 64, seed=1, foreground_weight=2.0)[i] for i in range(3)])
    assert batch["loss_weight"].shape == (3, 1, 64, 64) and batch["loss_weight"].max() == 3.0
    assert "loss_weight" not in collate([plain])
    with pytest.raises(ValueError, match="foreground_weight must be >= 0"):
        ShapesSource("t2i", foreground_weight=-1)


def test_collate_builds_one_task_micro_batches():
    t2i = [Sample("t2i", "a", torch.zeros(3, 64, 64)), Sample("t2i", "b", torch.ones(3, 64, 64))]
    batch = collate(t2i)
    assert batch["task"] == "t2i" and batch["prompts"] == ["a", "b"] and batch["pixels"].shape == (2, 3, 64, 64)
    mixed_sizes = collate([t2i[0], Sample("t2i", "c", torch.zeros(3, 32, 96))])
    assert isinstance(mixed_sizes["pixels"], list)  # different fix_pixels sizes stay a list
    edit = collate([Sample("edit", "x", torch.zeros(3, 64, 64), [torch.zeros(3, 64, 64)])])
    assert len(edit["reference_pixels"][0]) == 1
    with pytest.raises(ValueError, match="must hold one task"):
        collate([t2i[0], Sample("edit", "x", torch.zeros(3, 64, 64), [torch.zeros(3, 64, 64)])])
    with pytest.raises(ValueError, match="every sample was skipped"):
        collate([])


def test_sources_are_built_from_the_config(tmp_path):
    png(tmp_path / "a.png")
    manifest = write_jsonl(tmp_path / "m.jsonl", [{"task": "t2i", "image": "a.png", "caption": "x"}])
    cfg = load_config(None, [f"data.sources=[{{name: m, kind: manifest, path: {manifest}}},"
                             "{name: s, kind: shapes, task: edit, options: {length: 10}}]", "data.image_size=64"])
    sources = build_sources(cfg)
    assert isinstance(sources["m"], ManifestSource) and len(sources["s"]) == 10


@pytest.mark.parametrize(
    ("sources", "message"),
    [
        ("[{name: a, kind: shapes}, {name: a, kind: shapes}]", "duplicate source name 'a'"),
        ("[{name: a, kind: manifest}]", "a manifest source needs 'path'"),
        ("[{name: a, kind: webdataset}]", "a webdataset source needs 'path'"),
        ("[{name: a, kind: lmdb}]", r"data.sources\[a\].kind: unknown source kind 'lmdb'; known: manifest, shapes, "
                                    r"webdataset \(the shapes world registers its kinds when deepgen_components.shapes "
                                    r"is imported\)"),
        ("[{name: a, kind: shapes, options: {lenght: 5}}]", r"data.sources\[a\].options: unknown keys \['lenght'\]; "
                                                           "accepted: length, foreground_weight, edit_kinds"),
        ("[{name: a, kind: manifest, path: m.jsonl, options: {root: x}}]", r"data.sources\[a\].options: unknown keys"),
        ("[{task: t2i}]", r"data.sources\[0\]: missing keys \['name', 'kind'\]"),
        ("[]", "at least one source"),
    ],
)
def test_bad_source_configs_are_named(sources, message):
    with pytest.raises(ValueError, match=message):
        build_sources(load_config(None, [f"data.sources={sources}"]))


def test_a_registered_source_kind_is_built_from_its_config_entry():
    """``register_source``: a new kind for ``data.sources``, its factory given the entry (with its ``options``) and
    ``data.image_size``; the built-in kinds and the shapes world's are registered."""
    assert {"manifest", "webdataset", "shapes"} <= set(available_sources())
    seen = []

    def factory(spec, image_size):
        seen.append((spec.name, spec.task, spec.options, image_size))
        return [Sample("t2i", spec.options["text"], torch.zeros(3, image_size, image_size))] * 3

    register_source("constant_for_test", factory)
    register_source("constant_for_test", factory)  # the same factory again: a no-op
    with pytest.raises(ValueError, match="already registered"):
        register_source("constant_for_test", lambda spec, size: [])
    cfg = load_config(None, ["data.sources=[{name: c, kind: constant_for_test, options: {text: hello}}]",
                             "data.image_size=32"])
    (source,) = build_sources(cfg).values()
    assert len(source) == 3 and source[0].text == "hello" and seen == [("c", "t2i", {"text": "hello"}, 32)]


def test_pixels_match_numpy_reference(tmp_path):
    array = (np.arange(64 * 64 * 3) % 256).astype(np.uint8).reshape(64, 64, 3)
    Image.fromarray(array).save(tmp_path / "ramp.png")
    pixels = load_image(tmp_path / "ramp.png", 64)  # already 64x64: no resize
    assert torch.allclose(pixels, torch.from_numpy(array).permute(2, 0, 1).float() / 127.5 - 1)


def test_prepare_batch_averages_the_pixel_weights_onto_the_latent_grid():
    """The trainer hands ``flow_matching_loss`` the per-pixel weight averaged over each latent cell."""
    import torch.nn.functional as F
    from deepgen_components.training.sampler import MicroBatchPlan
    from deepgen_components.training.trainer import prepare_batch

    from deepgen_components import deepgen_tiny

    model = deepgen_tiny()
    batch = collate([ShapesSource("t2i", 64, seed=0, foreground_weight=3.0)[i] for i in range(2)])
    prepared = prepare_batch(model, batch, MicroBatchPlan(0, "t2i", (0, 1), 0), seed=0)
    factor = model.vae_scale_factor
    assert prepared["loss_weight"].shape == (2, 1, 64 // factor, 64 // factor)
    torch.testing.assert_close(prepared["loss_weight"], F.avg_pool2d(batch["loss_weight"], factor))
    assert prepared["loss_weight"].shape[-2:] == prepared["latents"].shape[-2:]


def test_shapes_source_edit_kinds_restricts_the_edits():
    from deepgen_components.shapes import parse_instruction

    only_add = ShapesSource("edit", 64, seed=1, edit_kinds=["add"])
    assert {parse_instruction(only_add[i].text).kind for i in range(20)} == {"add"}
    every = ShapesSource("edit", 64, seed=1)
    assert len({parse_instruction(every[i].text).kind for i in range(40)}) > 1
    with pytest.raises(ValueError, match="edit_kinds must be a subset"):
        ShapesSource("edit", 64, edit_kinds=["rotate"])


def test_prepare_batch_encodes_the_batch_at_once_and_draws_each_sample_as_one_image_calls_would():
    """The batched VAE pass gives every sample the latents, noise and reference latents that encoding it alone
    (``encode_images``, one image at a time, from the sample's own generator) gives, and a sample's draws do
    not depend on the samples around it."""
    from deepgen_components.training.sampler import MicroBatchPlan
    from deepgen_components.training.trainer import prepare_batch, sample_seed

    from deepgen_components import deepgen_tiny

    model = deepgen_tiny()
    batch = collate([ShapesSource("edit", 64, seed=1)[i] for i in range(3)])
    plan = MicroBatchPlan(0, "edit", (0, 1, 2), 0)
    prepared = prepare_batch(model, batch, plan, seed=5)
    for j in range(3):
        gen = torch.Generator().manual_seed(sample_seed(5, plan.position, plan.global_offset + j, plan.source))
        torch.rand((), generator=gen), torch.rand((), generator=gen)  # condition dropout, u
        x = model.encode_images(batch["pixels"][j][None], gen, mode="sample")[0]
        torch.testing.assert_close(prepared["latents"][j], x, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(prepared["noise"][j], torch.randn(x.shape, generator=gen))
        refs = [model.encode_images(r[None], gen, mode="sample")[0] for r in batch["reference_pixels"][j]]
        assert len(refs) == len(prepared["reference_latents"][j]) == 1
        torch.testing.assert_close(prepared["reference_latents"][j][0], refs[0], rtol=1e-5, atol=1e-5)
    alone = prepare_batch(model, collate([ShapesSource("edit", 64, seed=1)[1]]),
                          MicroBatchPlan(0, "edit", (1,), 1), seed=5)
    torch.testing.assert_close(alone["latents"][0], prepared["latents"][1], rtol=1e-5, atol=1e-5)


def test_encode_posteriors_rejects_batched_pixels():
    from deepgen_components import deepgen_tiny

    with pytest.raises(ValueError, match=r"images\[0\]: expected \(3, H, W\)"):
        deepgen_tiny().encode_posteriors([torch.zeros(1, 3, 64, 64)])
