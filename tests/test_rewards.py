"""MR-GRPO rewards (reference ``mr-grpo.md`` §4, §7 OCR defect, §8 offline stand-ins).

* CLIP: a tiny random ``CLIPModel`` with an offline byte-level tokenizer and a PIL image processor is saved to
  a temporary folder and loaded through the local path; the scores are meaningless but the cosine code is
  checked against a manual computation.
* OCR: real ``rapidocr-onnxruntime`` (its wheel ships the PP-OCRv4 ONNX models) on text rendered with PIL.
* Judge: a loopback stand-in (``tests/_judge_server.py``, a real HTTP server on 127.0.0.1) for the real
  UnifiedReward VLM service, which cannot run here. It prefers the brighter image and has modes for malformed
  answers, HTTP errors and slow answers.
"""

from __future__ import annotations

import copy
import json
import logging
import socket
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from _judge_server import FakeJudgeServer
from PIL import Image, ImageDraw, ImageFont

from deepgen_components.rl.rewards import (
    OFFICIAL_CATEGORY_WEIGHTS,
    CategoryWeights,
    ClipReward,
    OcrReward,
    PairwiseJudgeReward,
    Reward,
    available_rewards,
    build_reward,
    extract_quoted_target,
    ocr_accuracy,
    parse_judge_answer,
    register_reward,
    reward_weights,
    to_pil_list,
)
from deepgen_components.rl.rewards import base as rewards_base
from deepgen_components.shapes.reward import ShapesReward  # importing the world registers its reward


def _solid(value: int, size: int = 32) -> Image.Image:
    return Image.new("RGB", (size, size), (value, value, value))


def _rand_images(n: int, seed: int = 0, size: int = 40) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (size, size + 8, 3), dtype=np.uint8)) for _ in range(n)]


# ------------------------------------------------------------------------------------ shared helpers


def test_to_pil_list_formats():
    rng = np.random.default_rng(0)
    u8 = rng.integers(0, 256, (2, 6, 5, 3), dtype=np.uint8)
    pil = to_pil_list(u8)
    assert len(pil) == 2 and pil[0].size == (5, 6) and pil[0].mode == "RGB"
    np.testing.assert_array_equal(np.asarray(pil[1]), u8[1])
    # float (N,3,H,W) in [-1,1], decoded like the rollout: round(127.5 x + 127.5)
    x = torch.tensor([-1.0, -0.5, 0.0, 0.5, 1.0, 3.0]).view(1, 1, 1, 6).expand(1, 3, 2, 6).contiguous()
    (img,) = to_pil_list(x)
    assert np.asarray(img)[0, :, 0].tolist() == [0, 64, 128, 191, 255, 255]
    np.testing.assert_array_equal(np.asarray(to_pil_list(torch.from_numpy(u8))[0]), u8[0])  # uint8 tensor
    grey = to_pil_list([Image.new("L", (3, 3), 7)])[0]
    assert grey.mode == "RGB"
    with pytest.raises(ValueError, match="N, 3, H, W"):
        to_pil_list(torch.zeros(2, 4, 3, 3))
    with pytest.raises(TypeError, match=r"images\[1\]"):
        to_pil_list([_solid(0), "not an image"])
    with pytest.raises(TypeError, match="images"):
        to_pil_list(torch.zeros(1, 3, 2, 2, dtype=torch.int32))


# ------------------------------------------------------------------------------------ registry / weights


class _ConstReward:
    name = "shapes"

    def __init__(self, value: float = 1.0):
        self.value = value

    def score(self, images, prompts):
        pil, prompts = rewards_base.check_batch(images, prompts)
        return torch.full((len(pil),), self.value, dtype=torch.float32)


def test_registry_build_and_register(monkeypatch):
    monkeypatch.setattr(
        rewards_base, "_REGISTRY", dict(rewards_base._REGISTRY)
    )  # keep the global registry clean
    assert {"clip", "ocr", "judge"} <= set(available_rewards())
    ocr = build_reward("ocr")
    assert isinstance(ocr, OcrReward) and isinstance(ocr, Reward) and ocr.name == "ocr"
    judge = build_reward({"name": "judge", "base_url": "http://127.0.0.1:1", "group_size": 4})
    assert isinstance(judge, PairwiseJudgeReward) and judge.group_size == 4

    assert {"color", "shapes"} <= set(available_rewards())  # the rule-based rewards (shapes: the world's) registered
    register_reward("constant", _ConstReward)
    r = build_reward({"name": "constant", "value": 0.25})
    assert r.score([_solid(1), _solid(2)], ["a", "b"]).tolist() == [0.25, 0.25]
    with pytest.raises(ValueError, match="already registered"):
        register_reward("constant", lambda: _ConstReward())
    register_reward("constant", lambda: _ConstReward(0.5), overwrite=True)
    assert build_reward("constant").score([_solid(1)], ["x"]).item() == 0.5

    with pytest.raises(ValueError, match=r"unknown reward 'nope'.*'clip'"):
        build_reward("nope")
    with pytest.raises(ValueError, match=r"rl.rewards.mine: unknown reward 'nope'.*deepgen_components.shapes is imported"):
        build_reward({"name": "nope"}, argument="rl.rewards.mine")
    with pytest.raises(ValueError, match="'name'"):
        build_reward({"model_path": "x"})
    with pytest.raises(TypeError, match="'clip'"):
        build_reward("clip")  # model_path missing
    with pytest.raises(ValueError, match="prompt per image"):
        r.score([_solid(1)], ["a", "b"])
    with pytest.raises(TypeError, match="single str"):
        r.score([_solid(1)], "a")


def test_reward_weights_official_and_errors():
    assert OFFICIAL_CATEGORY_WEIGHTS == {
        "text_rendering": {"judge": 0.2, "clip": 0.1, "ocr": 0.7},
        "general": {"judge": 0.7, "clip": 0.3, "ocr": 0.0},
    }
    assert copy.deepcopy(CategoryWeights.official()) == CategoryWeights()  # configs can copy it
    w = reward_weights(
        OFFICIAL_CATEGORY_WEIGHTS, ["general", "text_rendering", "general"], ["judge", "clip", "ocr"]
    )
    assert w.dtype == torch.float32 and w.shape == (3, 3)
    torch.testing.assert_close(w, torch.tensor([[0.7, 0.3, 0.0], [0.2, 0.1, 0.7], [0.7, 0.3, 0.0]]))
    # column order follows reward_names; a subset of the table's rewards is allowed
    torch.testing.assert_close(
        CategoryWeights.official().matrix(["text_rendering"], ["ocr", "clip"]), torch.tensor([[0.7, 0.1]])
    )
    # a category may omit a reward (weight 0); extra rewards such as "shapes" need a weight somewhere
    custom = {"shapes": {"shapes": 1.0}, "general": {"clip": 1.0}}
    torch.testing.assert_close(
        reward_weights(custom, ["shapes", "general"], ["clip", "shapes"]),
        torch.tensor([[0.0, 1.0], [1.0, 0.0]]),
    )
    assert reward_weights(custom, [], ["clip"]).shape == (0, 1)
    with pytest.raises(ValueError, match=r"'poetry'.*\['general', 'text_rendering'\]"):
        reward_weights(OFFICIAL_CATEGORY_WEIGHTS, ["general", "poetry"], ["clip"])
    with pytest.raises(ValueError, match="cllip"):
        reward_weights(OFFICIAL_CATEGORY_WEIGHTS, ["general"], ["cllip"])
    with pytest.raises(ValueError, match=">= 0"):
        CategoryWeights({"general": {"clip": -1.0}})
    with pytest.raises(TypeError, match="single str"):
        reward_weights(OFFICIAL_CATEGORY_WEIGHTS, "general", ["clip"])


# ------------------------------------------------------------------------------------ CLIP


def _write_tiny_clip(folder: Path) -> None:
    """A random 2-layer CLIP with a byte-level CLIP tokenizer (256 bytes × {mid, end-of-word} + specials, no
    merges) and a PIL CLIP image processor (shortest side 32, 32 centre crop), saved like a hub snapshot."""
    from tokenizers import pre_tokenizers
    from transformers import CLIPConfig, CLIPModel, CLIPProcessor, CLIPTokenizer
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {c: i for i, c in enumerate(alphabet)}
    vocab.update({c + "</w>": len(alphabet) + i for i, c in enumerate(alphabet)})
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    tokenizer = CLIPTokenizer(vocab=vocab, merges=[])
    image_processor = CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    eos = vocab["<|endoftext|>"]
    config = CLIPConfig(
        text_config=dict(
            vocab_size=len(vocab),
            hidden_size=32,
            intermediate_size=48,
            num_hidden_layers=2,
            num_attention_heads=2,
            max_position_embeddings=77,
            bos_token_id=vocab["<|startoftext|>"],
            eos_token_id=eos,
            pad_token_id=eos,
        ),
        vision_config=dict(
            hidden_size=32,
            intermediate_size=48,
            num_hidden_layers=2,
            num_attention_heads=2,
            image_size=32,
            patch_size=8,
        ),
        projection_dim=16,
    )
    torch.manual_seed(0)
    CLIPModel(config).save_pretrained(folder)
    CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(folder)


@pytest.fixture(scope="module")
def clip_path(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("tiny_clip")
    _write_tiny_clip(path)
    return path


@pytest.fixture(scope="module")
def clip_reward(clip_path) -> ClipReward:
    return ClipReward(clip_path)


def test_clip_loads_from_local_path_only(clip_reward, clip_path, tmp_path):
    assert clip_reward.name == "clip" and clip_reward.max_text_tokens == 77
    assert type(clip_reward.image_processor).__name__.startswith("CLIPImageProcessor")
    with pytest.raises(FileNotFoundError, match="model_path"):
        ClipReward("openai/clip-vit-large-patch14")  # a hub id is refused, not downloaded
    r = build_reward({"name": "clip", "model_path": str(clip_path)})
    assert isinstance(r, ClipReward)


def test_clip_cosine_matches_manual(clip_reward):
    images = _rand_images(3)
    prompts = ["a red cube", "a red cube", "two dogs on a beach"]
    scores = clip_reward.score(images, prompts)
    assert scores.dtype == torch.float32 and scores.shape == (3,)
    assert bool(((scores >= -1) & (scores <= 1)).all())

    model, tok, proc = clip_reward.model, clip_reward.tokenizer, clip_reward.image_processor
    with torch.no_grad():
        t = tok(prompts, padding=True, truncation=True, max_length=77, return_tensors="pt")
        text = model.get_text_features(input_ids=t["input_ids"], attention_mask=t["attention_mask"])
        pix = proc(images=images, return_tensors="pt")["pixel_values"]
        assert pix.shape == (3, 3, 32, 32)  # resized + centre-cropped by the processor
        image = model.get_image_features(pixel_values=pix)
    text = getattr(text, "pooler_output", text)
    image = getattr(image, "pooler_output", image)
    manual = (text * image).sum(-1) / (text.norm(dim=-1) * image.norm(dim=-1))  # no ×100 logit scale
    torch.testing.assert_close(scores, manual, atol=1e-6, rtol=1e-5)


def test_clip_deterministic_truncation_and_formats(clip_reward):
    img = _rand_images(1, seed=3)[0]
    a = clip_reward.score([img, img], ["a cat", "a cat"])
    b = clip_reward.score([img], ["a cat"])
    assert a[0].item() == a[1].item()
    torch.testing.assert_close(a[:1], b, atol=1e-6, rtol=0)
    assert torch.equal(clip_reward.score([img], ["a cat"]), b)  # repeated call: identical
    # prompts longer than 77 tokens are truncated (byte-level: one token per character)
    long_a, long_b = "x" * 300, "x" * 400 + " tail that is cut off"
    s = clip_reward.score([img, img], [long_a, long_b])
    assert s[0].item() == pytest.approx(s[1].item(), abs=1e-6)
    # uint8 (N,H,W,3) and float (N,3,H,W) inputs score like the PIL list
    arr = np.array(img)[None]
    torch.testing.assert_close(clip_reward.score(arr, ["a cat"]), b)
    f = torch.from_numpy(arr).permute(0, 3, 1, 2).float() / 127.5 - 1.0
    torch.testing.assert_close(clip_reward.score(f, ["a cat"]), b, atol=1e-6, rtol=0)
    assert clip_reward.score([], []).shape == (0,)


def test_clip_from_model(clip_reward):
    wrapped = ClipReward.from_model(
        clip_reward.model, clip_reward
    )  # anything with .tokenizer/.image_processor
    imgs = _rand_images(2, seed=5)
    torch.testing.assert_close(wrapped.score(imgs, ["p", "q"]), clip_reward.score(imgs, ["p", "q"]))


# ------------------------------------------------------------------------------------ OCR


def test_extract_quoted_target_and_accuracy():
    assert extract_quoted_target('a sign that says "HELLO 2026" in neon') == "HELLO 2026"
    assert extract_quoted_target('say "a" then "b"') == "a"
    assert extract_quoted_target("a “curly” quote") == "curly"
    assert extract_quoted_target("a “curly” quote", curly_quotes=False) is None
    assert extract_quoted_target('unclosed "rest of it') == "rest of it"  # like split('"')[1]
    assert extract_quoted_target("no quotes at all") is None
    assert ocr_accuracy("SALE! HELLO 2026 today", "hello 2026") == 1.0  # substring after normalisation
    assert ocr_accuracy("HELL0 2026", "HELLO 2026") == pytest.approx(1 - 1 / 9)  # one edit, 9 chars
    assert ocr_accuracy("", "HELLO") == 0.0  # distance capped at len(target)
    assert ocr_accuracy("a very long unrelated ocr text", "ab") == 0.0
    assert ocr_accuracy("anything", "  ") == 0.0  # empty target


def test_ocr_reward_engine_contract_and_failures(caplog):
    """Per-image scoring with a scripted engine: RapidOCR tuples, plain line lists, None and an exception."""
    outputs = iter(
        [
            ([[[0, 0], "HELLO", 0.99], [[0, 1], "2026", 0.98]], [0.1]),  # RapidOCR format, two lines
            ["Hel1o"],  # plain list of lines
            (None, None),  # RapidOCR: nothing detected
            RuntimeError("engine exploded"),
        ]
    )

    def engine(img):
        out = next(outputs)
        if isinstance(out, Exception):
            raise out
        return out

    r = OcrReward(engine=engine)
    imgs = [_solid(255)] * 5
    prompts = ['"HELLO 2026"', "a cat, no quotes", 'the word "hello"', 'text "ABC"', 'text "XYZ"']
    with caplog.at_level(logging.WARNING, logger="deepgen_components.rl.rewards.ocr"):
        s = r.score(imgs, prompts)
    assert s.tolist() == pytest.approx([1.0, 0.0, 0.8, 0.0, 0.0])
    assert r.last_texts == ["HELLO2026", None, "Hel1o", "", None]
    assert "image 4" in caplog.text and "engine exploded" in caplog.text


def _text_image(text: str, size: int = 512) -> Image.Image:
    img = Image.new("RGB", (size, size), "white")
    draw = ImageDraw.Draw(img)
    font = None
    for path in (
        "/usr/share/fonts/truetype/dejavu/DejaVuSans-Bold.ttf",
        "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
    ):
        if Path(path).exists():
            font = ImageFont.truetype(path, 64)
            break
    if font is None:
        font = ImageFont.load_default(size=64)
    left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
    draw.text(
        ((size - (right - left)) / 2 - left, (size - (bottom - top)) / 2 - top), text, fill="black", font=font
    )
    return img


@pytest.fixture(scope="module")
def real_ocr() -> OcrReward:
    pytest.importorskip("rapidocr_onnxruntime")
    return OcrReward()


def test_ocr_reward_real_engine_mixed_batch(real_ocr, capsys):
    """Real RapidOCR: rendered text scores ~1, a blank image ~0, a quote-less prompt 0 for its image only."""
    hello = _text_image("HELLO 2026")
    blank = Image.new("RGB", (512, 512), "white")
    real_ocr.engine  # load the ONNX sessions before timing  # noqa: B018
    images = [hello, hello, blank]
    prompts = ['a sign that says "HELLO 2026"', "a photo of a sign", 'a sign that says "HELLO 2026"']
    t0 = time.perf_counter()
    s = real_ocr.score(images, prompts)
    dt = time.perf_counter() - t0
    with capsys.disabled():
        print(f"\n[ocr] {dt / 2:.3f} s per OCR'd 512x512 image (2 images OCR'd); texts {real_ocr.last_texts}")
    assert s.dtype == torch.float32 and s.shape == (3,)
    assert s[0] >= 0.8, real_ocr.last_texts
    assert s[1] == 0.0  # no quotes: zero for this image only, no exception
    assert s[2] <= 0.2, real_ocr.last_texts
    # the same image scored against a different target drops accordingly
    assert real_ocr.score([hello], ['the words "GOODBYE 1999"'])[0] < 0.5


# ------------------------------------------------------------------------------------ pairwise judge


@pytest.fixture(scope="module")
def judge_server():
    with FakeJudgeServer(slow_seconds=1.0) as srv:
        yield srv


def _judge(srv: FakeJudgeServer, model: str = "bright", **kw) -> PairwiseJudgeReward:
    kw = {"timeout": 5.0, "retries": 1, "backoff": 0.01, "group_size": 4, "max_workers": 4} | kw
    return PairwiseJudgeReward(srv.base_url, model=model, **kw)


def test_parse_judge_answer():
    assert parse_judge_answer("<think>hmm</think><answer>Image 1 is better</answer>") == 1.0
    assert parse_judge_answer("<answer> image 2  is better. </answer>") == 0.0
    assert parse_judge_answer("<think>x</think><answer>Both are equally good</answer>") is None
    assert parse_judge_answer("Image 1 is better") is None  # no tag
    assert parse_judge_answer("<answer>Image 1 is better, Image 2 is better</answer>") is None
    assert (
        parse_judge_answer(
            "<think><answer>Image 2 is better</answer>?</think><answer>Image 1 is better</answer>"
        )
        == 1.0
    )
    assert parse_judge_answer(None) is None


def test_judge_win_rates_brightness_ordered(judge_server):
    judge_server.clear()
    r = _judge(judge_server)
    # group 0: brightness 10 < 90 < 170 < 250 (shuffled); group 1: two ties
    images = [
        _solid(170),
        _solid(10),
        _solid(250),
        _solid(90),
        _solid(50),
        _solid(50),
        _solid(200),
        _solid(0),
    ]
    prompts = ["a lamp"] * 4 + ['a sign "OPEN"'] * 4
    s = r.score(images, prompts)
    assert s.dtype == torch.float32 and s.shape == (8,)
    torch.testing.assert_close(s[:4], torch.tensor([2 / 3, 0.0, 1.0, 1 / 3]))
    torch.testing.assert_close(s[4:], torch.tensor([1.5 / 3, 1.5 / 3, 1.0, 0.0]))
    torch.testing.assert_close(s.view(2, 4).mean(1), torch.tensor([0.5, 0.5]))
    assert r.last_stats.pairs == 12 and r.last_stats.failed == 0 and r.last_stats.undecided == 1
    reqs = judge_server.requests
    assert len(reqs) == 12 and all(q["n_images"] == 2 and q["temperature"] == 0 for q in reqs)
    assert (
        sum(
            q["text"] == "Compare these two images based on the prompt: a lamp. Which image is better?"
            for q in reqs
        )
        == 6
    )


def test_judge_group_of_eight_and_validation(judge_server):
    r = _judge(judge_server, group_size=8, max_workers=8, api_key="k")
    order = [3, 7, 0, 5, 1, 6, 2, 4]
    s = r.score([_solid(20 + 30 * k) for k in order], ["p"] * 8)
    torch.testing.assert_close(s, torch.tensor(order, dtype=torch.float32) / 7)
    assert s.mean().item() == pytest.approx(0.5, abs=1e-7)
    assert judge_server.requests[-1]["auth"] == "Bearer k"
    with pytest.raises(ValueError, match="multiple of group_size=8"):
        r.score([_solid(0)] * 6, ["p"] * 6)
    with pytest.raises(ValueError, match="mixes prompts"):
        r.score([_solid(0)] * 8, ["p"] * 7 + ["q"])
    with pytest.raises(ValueError, match="group_size"):
        PairwiseJudgeReward(judge_server.base_url, group_size=1)


@pytest.mark.parametrize("mode", ["notag", "garbage", "http500"])
def test_judge_malformed_answers_are_neutral(judge_server, caplog, mode):
    judge_server.clear()
    r = _judge(judge_server, model=mode)
    with caplog.at_level(logging.WARNING, logger="deepgen_components.rl.rewards.judge"):
        s = r.score([_solid(0), _solid(100), _solid(200), _solid(255)], ["p"] * 4)
    torch.testing.assert_close(s, torch.full((4,), 0.5))
    assert "scored as ties" in caplog.text
    n_req = len(judge_server.requests)
    if mode == "notag":  # a valid answer without a verdict: a tie, not retried
        assert r.last_stats.undecided == 6 and r.last_stats.failed == 0 and n_req == 6
    else:  # transport/format failures are retried, then neutral
        assert r.last_stats.failed == 6 and n_req == 6 * (1 + r.retries)
        assert ("HTTP 500" if mode == "http500" else "malformed") in caplog.text


def test_judge_slow_server_times_out_to_neutral(judge_server, caplog):
    r = _judge(judge_server, model="slow", timeout=0.2, retries=1, group_size=2)
    t0 = time.perf_counter()
    with caplog.at_level(logging.WARNING, logger="deepgen_components.rl.rewards.judge"):
        s = r.score([_solid(0), _solid(255)], ["p", "p"])
    elapsed = time.perf_counter() - t0
    torch.testing.assert_close(s, torch.tensor([0.5, 0.5]))
    assert r.last_stats.failed == 1 and "timed out" in caplog.text
    assert elapsed < 1.5, elapsed  # 2 attempts × 0.2 s + backoff; no waiting for the server's 1 s sleep


def test_judge_unreachable_is_neutral(caplog):
    with socket.socket() as sock:  # a port that nothing listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    r = PairwiseJudgeReward(f"http://127.0.0.1:{port}/v1", timeout=0.2, retries=2, backoff=0.01, group_size=2)
    with caplog.at_level(logging.WARNING, logger="deepgen_components.rl.rewards.judge"):
        s = r.score(torch.zeros(4, 3, 8, 8), ["a", "a", "b", "b"])
    torch.testing.assert_close(s, torch.full((4,), 0.5))
    assert r.last_stats.failed == 2 and "ConnectionRefusedError" in caplog.text


def test_mean_colour_reward_is_one_at_the_target_and_falls_with_distance():
    from deepgen_components.rl.rewards import MeanColorReward

    reward = MeanColorReward(target=(200, 40, 40))
    exact = Image.new("RGB", (16, 16), (200, 40, 40))
    near = Image.new("RGB", (16, 16), (180, 60, 40))
    far = Image.new("RGB", (16, 16), (0, 0, 255))
    scores = reward.score([exact, near, far], ["", "", ""]).tolist()
    assert scores[0] == pytest.approx(1.0)
    assert scores[0] > scores[1] > scores[2] >= 0.0
    with pytest.raises(ValueError, match="RGB triple"):
        MeanColorReward(target=(1, 2))


def test_shapes_reward_scores_ground_truth_world_images_one_and_mismatches_lower():
    from deepgen_components.shapes import ShapesWorld

    world = ShapesWorld(image_size=64, seed=11)
    images, captions = zip(*(world.t2i_sample(i) for i in range(6)))
    reward = ShapesReward()
    assert reward.score(list(images), list(captions)).tolist() == pytest.approx([1.0] * 6)
    shuffled = list(captions[1:]) + [captions[0]]
    mismatched = reward.score(list(images), shuffled)
    assert float(mismatched.mean()) < 1.0
