"""Shapes world and its evaluator: determinism, grammar round-trips, held-out split, evaluator accuracy on
ground truth (clean, noisy + blurred, 32 px), and edit scoring (true edits pass, no-ops and wrong edits fail).

Speed is not asserted here (shared CPUs); see the module docstring / report for measured numbers.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image, ImageFilter

from deepgen_components.shapes import (
    BACKGROUNDS,
    COLORS,
    EDIT_KINDS,
    POSITIONS,
    SHAPES,
    Instruction,
    Scene,
    SceneObject,
    ShapesEval,
    ShapesWorld,
    apply_instruction,
    caption,
    instruction_text,
    parse_caption,
    parse_instruction,
    to_uint8,
)


@pytest.fixture(scope="module")
def ev() -> ShapesEval:
    return ShapesEval()


def degrade(img: Image.Image, rng: np.random.Generator, noise: float = 10.0, blur: float = 1.0) -> np.ndarray:
    """Gaussian blur (PIL radius) then Gaussian pixel noise (std in 0..255 units), as uint8."""
    if blur:
        img = img.filter(ImageFilter.GaussianBlur(blur))
    a = np.asarray(img).astype(np.float32) + rng.normal(0.0, noise, (img.size[1], img.size[0], 3))
    return np.clip(np.rint(a), 0, 255).astype(np.uint8)


# ------------------------------------------------------------------------------------------- generator
def test_determinism_and_seeds():
    a, b, c = ShapesWorld(64, seed=0), ShapesWorld(64, seed=0), ShapesWorld(64, seed=1)
    for i in (0, 1, 17, 12345):
        (ia, ca), (ib, cb) = a.t2i_sample(i), b.t2i_sample(i)
        assert ca == cb and np.array_equal(np.asarray(ia), np.asarray(ib))
        (sa, xa, ta), (sb, xb, tb) = a.edit_sample(i), b.edit_sample(i)
        assert xa == xb
        assert np.array_equal(np.asarray(sa), np.asarray(sb)) and np.array_equal(
            np.asarray(ta), np.asarray(tb)
        )
    # Order does not matter (pure function of the index), and other seeds / indices differ.
    assert a.t2i_scene(5) == ShapesWorld(64, seed=0).t2i_scene(5)
    img0 = [np.asarray(a.t2i_sample(i)[0]) for i in range(8)]
    img1 = [np.asarray(c.t2i_sample(i)[0]) for i in range(8)]
    assert sum(not np.array_equal(x, y) for x, y in zip(img0, img1)) >= 7
    assert len({a.t2i_scene(i) for i in range(50)}) == 50
    it = a.iter_t2i(3)
    assert next(it)[1] == a.t2i_sample(3)[1] and next(it)[1] == a.t2i_sample(4)[1]
    assert next(a.iter_edit(2))[1] == a.edit_sample(2)[1]


@pytest.mark.parametrize("size", [32, 64, 128])
def test_render_sizes(size: int):
    w = ShapesWorld(size, seed=3)
    img, cap = w.t2i_sample(0)
    assert img.size == (size, size) and img.mode == "RGB"
    assert parse_caption(cap) == replace(w.t2i_scene(0), dx=0.0, dy=0.0)


def test_scene_validation():
    with pytest.raises(ValueError):
        Scene("circle", "white", "left", "white")  # shape colour equals the background
    with pytest.raises(ValueError):
        Scene("hexagon", "red", "left", "white")
    with pytest.raises(ValueError):
        Scene("circle", "red", "left", "white", second=SceneObject("square", "blue", "left"))


def test_edit_kinds_and_jitter_kept():
    w = ShapesWorld(64, seed=0)
    kinds = set()
    for i in range(300):
        src, text, tgt = w.edit_triplet(i)
        instr = parse_instruction(text)
        kinds.add(instr.kind)
        assert src.second is None
        assert apply_instruction(src, instr).key() == tgt.key()
        assert src.key() != tgt.key()
        assert (src.dx, src.dy) == (tgt.dx, tgt.dy)  # everything not named stays identical
        diff = {f for f in ("shape", "color", "position", "background") if getattr(src, f) != getattr(tgt, f)}
        if instr.kind == "add":
            assert not diff and tgt.second is not None and tgt.second.position != src.position
        else:
            named = {"recolor": "color", "move": "position", "background": "background", "reshape": "shape"}
            assert diff == {named[instr.kind]} and tgt.second is None
    assert kinds == set(EDIT_KINDS)
    only = ShapesWorld(64, seed=0, edit_kinds=("move",))
    assert all(parse_instruction(only.edit_triplet(i)[1]).kind == "move" for i in range(20))


# ---------------------------------------------------------------------------------------------- grammar
def test_caption_round_trip():
    n = 0
    for bg in BACKGROUNDS:
        for color in COLORS:
            if color == bg:
                continue
            for shape in SHAPES:
                for pos in POSITIONS:
                    s = Scene(shape, color, pos, bg)
                    assert parse_caption(caption(s)) == s
                    n += 1
    assert n == 270
    two = Scene("circle", "orange", "left", "navy", second=SceneObject("triangle", "white", "right"))
    text = caption(two)
    assert text == "an orange circle on the left and a white triangle on the right on a navy background"
    assert parse_caption(text) == two
    assert parse_caption("  A Red Square In The Center On A Gray Background. ").key() == (
        "gray",
        ("square", "red", "center"),
    )
    for bad in ("a red hexagon on the left on a gray background", "a red circle on a gray background", ""):
        with pytest.raises(ValueError):
            parse_caption(bad)


def test_instruction_round_trip():
    examples = {
        "make the circle green": Instruction("recolor", subject="circle", color="green"),
        "move the square to the right": Instruction("move", subject="square", position="right"),
        "move the square to the center": Instruction("move", subject="square", position="center"),
        "make the background white": Instruction("background", background="white"),
        "turn the circle into a triangle": Instruction("reshape", subject="circle", shape="triangle"),
        "add a yellow triangle on the right": Instruction(
            "add", shape="triangle", color="yellow", position="right"
        ),
        "add an orange circle in the center": Instruction(
            "add", shape="circle", color="orange", position="center"
        ),
    }
    for text, instr in examples.items():
        assert parse_instruction(text) == instr
        assert instruction_text(instr) == text
    w = ShapesWorld(64, seed=5)
    for i in range(100):
        text = w.edit_triplet(i)[1]
        assert instruction_text(parse_instruction(text)) == text
    for bad in ("make the circle sparkly", "rotate the square", "add a circle"):
        with pytest.raises(ValueError):
            parse_instruction(bad)
    with pytest.raises(ValueError):  # recolouring into the background colour is not a valid scene
        apply_instruction(Scene("circle", "red", "left", "white"), "make the circle white")


# --------------------------------------------------------------------------------------------- held-out
def test_heldout_split_disjoint_and_deterministic():
    w = ShapesWorld(64, seed=0)
    assert len(w.heldout_combos) == 27 and len(w.train_combos) == 243
    train_captions = {caption(Scene(*c)) for c in w.train_combos}
    prompts = w.heldout_prompts(60, seed=0)
    assert prompts == ShapesWorld(64, seed=0).heldout_prompts(60, seed=0)
    assert len(set(prompts)) == 27 and not set(prompts) & train_captions
    assert set(w.heldout_prompts(60, seed=0, unseen=False)) <= train_captions
    # Every attribute value is still seen in training; training samplers never emit held-out compositions.
    for i, values in enumerate((SHAPES, COLORS, POSITIONS, BACKGROUNDS)):
        assert {c[i] for c in w.train_combos} == set(values)
    for i in range(300):
        assert not w.is_heldout(w.t2i_scene(i))
        src, _, tgt = w.edit_triplet(i)
        assert not w.is_heldout(src) and not w.is_heldout(tgt)
    tasks = w.heldout_edits(40, seed=0)
    assert [t.instruction for t in tasks] == [t.instruction for t in w.heldout_edits(40, seed=0)]
    for t in tasks:
        assert not w.is_heldout(t.source) and w.is_heldout(t.target)
        assert apply_instruction(t.source, t.instruction).key() == t.target.key()
    with pytest.raises(ValueError):
        ShapesWorld(64, heldout_fraction=0.0).heldout_prompts(3)


# -------------------------------------------------------------------------------------------- evaluator
def _t2i_accuracy(ev: ShapesEval, size: int, n: int, seed: int, degraded: bool, two: float = 0.0) -> float:
    w = ShapesWorld(size, seed=seed, second_shape_prob=two, heldout_fraction=0.0)
    rng = np.random.default_rng(seed)
    ok = 0
    for i in range(n):
        scene = w.t2i_scene(i)
        img = w.render(scene)
        ok += ev.score_t2i(degrade(img, rng) if degraded else img, caption(scene))["all"]
    return ok / n


def test_eval_accuracy_clean_64(ev: ShapesEval):
    assert _t2i_accuracy(ev, 64, 500, seed=101, degraded=False) >= 0.99
    assert _t2i_accuracy(ev, 64, 100, seed=102, degraded=False, two=1.0) >= 0.99  # two-shape scenes


def test_eval_accuracy_clean_32_and_128(ev: ShapesEval):
    assert _t2i_accuracy(ev, 32, 500, seed=103, degraded=False, two=0.2) >= 0.99
    assert _t2i_accuracy(ev, 128, 100, seed=104, degraded=False) >= 0.99


def test_eval_accuracy_noise_and_blur(ev: ShapesEval):
    assert _t2i_accuracy(ev, 64, 500, seed=105, degraded=True, two=0.2) >= 0.97
    assert _t2i_accuracy(ev, 32, 300, seed=106, degraded=True) >= 0.97


def test_read_input_types_and_empty(ev: ShapesEval):
    w = ShapesWorld(64, seed=9)
    scene = Scene("triangle", "purple", "right", "gray")
    img = w.render(scene)
    arr = np.array(img)
    chw = torch.from_numpy(arr).permute(2, 0, 1).float() / 127.5 - 1.0
    for x in (img, arr, chw, chw[None], chw.numpy().transpose(1, 2, 0), torch.from_numpy(arr.copy())):
        r = ev.read(x)
        assert (r.shape, r.color, r.position, r.background) == ("triangle", "purple", "right", "gray")
    assert np.array_equal(to_uint8(chw), arr)
    assert r.to_scene() == scene and 0.0 < r.confidence <= 1.0
    # No foreground: read gracefully, score the background only.
    blank = Image.new("RGB", (64, 64), (128, 128, 128))
    r = ev.read(blank)
    assert r.shape is None and r.objects == () and r.background == "gray" and r.to_scene() is None
    s = ev.score_t2i(blank, caption(scene))
    assert s["background"] and not (s["shape"] or s["color"] or s["position"] or s["all"])
    assert ev.reward(blank, caption(scene)) == pytest.approx(0.25 * 0.75)


def test_reward_partial_credit(ev: ShapesEval):
    w = ShapesWorld(64, seed=4)
    target = Scene("square", "red", "left", "white", dx=0.01)
    cap = caption(target)
    r_true = ev.reward(w.render(target), cap)
    r_orange = ev.reward(w.render(replace(target, color="orange")), cap)  # close colour
    r_blue = ev.reward(w.render(replace(target, color="blue")), cap)  # far colour
    r_two = ev.reward(w.render(replace(target, color="blue", position="right")), cap)
    r_three = ev.reward(w.render(replace(target, color="blue", position="right", shape="triangle")), cap)
    assert r_true == 1.0
    assert 0.75 < r_orange < 1.0 and r_blue < r_orange
    assert 0.0 < r_three < r_two < r_blue
    rs = ev.rewards(
        torch.stack([torch.from_numpy(np.array(w.render(target))).permute(2, 0, 1)] * 2), [cap] * 2
    )
    assert rs == [1.0, 1.0]


def _wrong_outputs(src: Scene, instr: Instruction, tgt: Scene) -> list[Scene]:
    """Outputs that must not count as the edit: the wrong value of the named attribute, the right value
    but another attribute changed too, and a different attribute changed instead (invalid scenes, e.g. a
    shape in the background colour, are skipped)."""
    other = {
        "color": [c for c in COLORS if c not in (src.color, tgt.color)],
        "background": [b for b in BACKGROUNDS if b not in (src.background, tgt.background)],
        "position": [p for p in POSITIONS if p not in (src.position, tgt.position)],
        "shape": [s for s in SHAPES if s not in (src.shape, tgt.shape)],
    }
    named = {"recolor": "color", "move": "position", "background": "background", "reshape": "shape"}
    out: list[Scene] = []

    def add(scene: Scene, **changes) -> None:
        try:
            out.append(replace(scene, **changes))
        except ValueError:
            pass

    if instr.kind == "add":
        new = tgt.second
        for s in SHAPES:
            if s != new.shape:
                add(tgt, second=replace(new, shape=s))
        for c in COLORS:
            if c != new.color:
                add(tgt, second=replace(new, color=c))
        for s in other["shape"]:
            add(tgt, shape=s)
        add(src, color=other["color"][0])
    else:
        attr = named[instr.kind]
        side = "shape" if attr != "shape" else "position"
        for v in other[attr]:
            add(tgt, **{attr: v})  # wrong value
        for v in other[side]:
            add(tgt, **{side: v})  # right value plus a side effect
            add(src, **{side: v})  # something else instead
    return out


def test_edit_scoring_ground_truth(ev: ShapesEval):
    w = ShapesWorld(64, seed=21)
    n, ok, noop, wrong, n_wrong = 500, 0, 0, 0, 0
    for i in range(n):
        src, text, tgt = w.edit_triplet(i)
        s_img, t_img = w.render(src), w.render(tgt)
        res = ev.score_edit(s_img, text, t_img)
        ok += res["success"] and res["changed_ok"] and res["kept_ok"]
        noop += ev.score_edit(s_img, text, s_img)["success"]
        if i % 5 == 0:
            for bad in _wrong_outputs(src, parse_instruction(text), tgt):
                n_wrong += 1
                wrong += ev.score_edit(s_img, text, w.render(bad), source_caption=caption(src))["success"]
    assert ok / n >= 0.99
    assert noop / n <= 0.01
    assert n_wrong >= 300 and wrong / n_wrong <= 0.01


def test_edit_scoring_changed_vs_kept(ev: ShapesEval):
    w = ShapesWorld(64, seed=2)
    src = Scene("circle", "red", "left", "white")
    s_img = w.render(src)
    res = ev.score_edit(s_img, "make the circle green", w.render(replace(src, color="green")))
    assert res == {"success": True, "changed_ok": True, "kept_ok": True}
    res = ev.score_edit(
        s_img, "make the circle green", w.render(replace(src, color="green", position="right"))
    )
    assert res == {"success": False, "changed_ok": True, "kept_ok": False}
    res = ev.score_edit(s_img, "make the circle green", s_img)
    assert res == {"success": False, "changed_ok": False, "kept_ok": True}
    added = replace(src, second=SceneObject("triangle", "yellow", "right"))
    res = ev.score_edit(s_img, "add a yellow triangle on the right", w.render(added), caption(src))
    assert res["success"]
    res = ev.score_edit(s_img, "add a yellow triangle in the center", w.render(added), caption(src))
    assert not res["success"] and res["kept_ok"]


def test_edit_scoring_degraded_and_32(ev: ShapesEval):
    for size, n, degraded in ((64, 300, True), (32, 300, False), (32, 200, True)):
        w = ShapesWorld(size, seed=31 + size)
        rng = np.random.default_rng(size)
        ok = noop = 0
        for i in range(n):
            src, text, tgt = w.edit_triplet(i)
            s_img, t_img = w.render(src), w.render(tgt)
            if degraded:
                s_img, t_img = degrade(s_img, rng), degrade(t_img, rng)
            ok += ev.score_edit(s_img, text, t_img)["success"]
            noop += ev.score_edit(s_img, text, s_img)["success"]
        assert ok / n >= (0.97 if degraded else 0.99), (size, degraded)
        assert noop / n <= 0.01, (size, degraded)
