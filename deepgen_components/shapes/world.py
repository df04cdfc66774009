"""Shapes world: a seeded synthetic text-to-image / editing world (scenes, captions, edit instructions, rendering).

Why: to train a *tiny* DeepGen on CPU and measure prompt following we need unlimited, instantly generated (image,
caption) pairs and (source, instruction, target) editing triplets whose captions are fully determined by a few
categorical attributes. The evaluator that reads those attributes back from an image lives beside it
(``shapes.evaluator``).

A scene is a flat background and one main shape (optionally a second shape, produced by "add" edits):

* ``shape``      ∈ SHAPES = (circle, square, triangle), axis-aligned, triangle pointing up — three shapes
  whose blur-invariant moments are far apart (circle: none; square: four-fold anisotropy; triangle:
  vertical skew), so even a blurred 7-pixel shape at 32×32 is classified reliably;
* ``color``      ∈ COLORS = (red, orange, yellow, green, blue, purple, white, black) — saturated, far apart
  in RGB (closest pair orange/yellow ≈ 86 units);
* ``position``   ∈ POSITIONS = (left, center, right) — thirds of the width; only the horizontal axis is
  named, the vertical placement is jitter (a 3-way categorical is easy for a tiny model and unambiguous);
* ``background`` ∈ BACKGROUNDS = (white, gray, black, navy) — never the shape's color, so every
  shape/background pair is at least ≈ 107 RGB units apart (purple on gray) and the shape segments by its
  distance to the background.

Shapes have a fixed size (26 % of the image side); the centre is jittered by ±1 % horizontally (so it stays
inside its third and two shapes never touch) and ±1 % vertically. Images are rendered 4× supersampled and
box-downsampled (anti-aliased, like a generated image's soft edges). The jitter is small on purpose: the caption
does not name it, so a generator must sample it, and a small DiT trained briefly paints the average of the
placements it cannot decide between (docs/shapes.md, experiment 2, has what larger jitter did).

Captions (fixed grammar, ``caption`` / ``parse_caption``)::

    a red circle on the left on a gray background
    an orange square in the center on a navy background
    a red circle on the left and a yellow triangle on the right on a white background   (two shapes)

Edit instructions (``instruction_text`` / ``parse_instruction``); everything not named stays identical,
including the exact jitter::

    make the circle green                 (recolor)
    move the square to the right          (move; "to the center" for the centre)
    make the background white             (background)
    turn the circle into a triangle       (reshape)
    add a yellow triangle on the right    (add; the new shape goes to a free third)

Held-out split: a fixed ~10 % of the (shape, color, position, background) compositions is never produced
by the training samplers (``t2i_sample`` / ``edit_sample``, also not as an edit target or added shape);
``heldout_prompts`` / ``heldout_edits`` draw from those, so held-out captions are disjoint from training
captions by construction and measure compositional generalisation.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace

import numpy as np
from PIL import Image, ImageDraw

__all__ = [
    "SHAPES",
    "COLORS",
    "POSITIONS",
    "BACKGROUNDS",
    "COLOR_RGB",
    "BACKGROUND_RGB",
    "EDIT_KINDS",
    "SceneObject",
    "Scene",
    "Instruction",
    "EditTask",
    "ShapesWorld",
    "caption",
    "parse_caption",
    "instruction_text",
    "parse_instruction",
    "apply_instruction",
]

SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
POSITIONS: tuple[str, ...] = ("left", "center", "right")
COLOR_RGB: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "orange": (255, 140, 0),
    "yellow": (245, 220, 30),
    "green": (30, 170, 50),
    "blue": (30, 80, 230),
    "purple": (140, 50, 200),
    "white": (245, 245, 245),
    "black": (15, 15, 15),
}
BACKGROUND_RGB: dict[str, tuple[int, int, int]] = {
    "white": (245, 245, 245),
    "gray": (128, 128, 128),
    "black": (15, 15, 15),
    "navy": (25, 40, 120),
}
COLORS: tuple[str, ...] = tuple(COLOR_RGB)
BACKGROUNDS: tuple[str, ...] = tuple(BACKGROUND_RGB)
EDIT_KINDS: tuple[str, ...] = ("recolor", "move", "background", "reshape", "add")

_POS_PHRASE = {"left": "on the left", "center": "in the center", "right": "on the right"}
_MOVE_PHRASE = {"left": "to the left", "center": "to the center", "right": "to the right"}

# Geometry, as fractions of the image side.
SHAPE_SIZE = 0.26
X_JITTER = 0.01
Y_JITTER = 0.01


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


# ----------------------------------------------------------------------------------------------- scenes
@dataclass(frozen=True)
class SceneObject:
    """One shape: categorical attributes plus its placement jitter (fractions of the image side)."""

    shape: str
    color: str
    position: str
    dx: float = 0.0
    dy: float = 0.0

    def key(self) -> tuple[str, str, str]:
        """The categorical attributes (what a caption says), without jitter."""
        return (self.shape, self.color, self.position)


@dataclass(frozen=True)
class Scene:
    """A scene: the main shape's attributes, the background, placement jitter and an optional second shape.

    Two scenes with the same attributes but different jitter have the same caption; ``key()`` compares
    attributes only.
    """

    shape: str
    color: str
    position: str
    background: str
    dx: float = 0.0
    dy: float = 0.0
    second: SceneObject | None = None

    def __post_init__(self) -> None:
        for obj in self.objects:
            if obj.shape not in SHAPES:
                raise ValueError(f"unknown shape {obj.shape!r}; expected one of {SHAPES}")
            if obj.color not in COLOR_RGB:
                raise ValueError(f"unknown color {obj.color!r}; expected one of {COLORS}")
            if obj.position not in POSITIONS:
                raise ValueError(f"unknown position {obj.position!r}; expected one of {POSITIONS}")
            if obj.color == self.background:
                raise ValueError(f"shape color equals the background ({self.background!r})")
        if self.background not in BACKGROUND_RGB:
            raise ValueError(f"unknown background {self.background!r}; expected one of {BACKGROUNDS}")
        if self.second is not None and self.second.position == self.position:
            raise ValueError("the two shapes must be in different positions")

    @property
    def main(self) -> SceneObject:
        """The main shape as a ``SceneObject``."""
        return SceneObject(self.shape, self.color, self.position, self.dx, self.dy)

    @property
    def objects(self) -> tuple[SceneObject, ...]:
        """All shapes, main first."""
        return (self.main,) if self.second is None else (self.main, self.second)

    def key(self) -> tuple:
        """Attributes only (no jitter): equal keys ⇔ equal captions."""
        return (self.background,) + tuple(o.key() for o in self.objects)


def caption(scene: Scene) -> str:
    """The scene's caption in the fixed grammar, e.g. ``"a red circle on the left on a gray background"``."""
    parts = [f"{_article(o.color)} {o.color} {o.shape} {_POS_PHRASE[o.position]}" for o in scene.objects]
    return f"{' and '.join(parts)} on a {scene.background} background"


_C = "|".join(COLORS)
_S = "|".join(SHAPES)
_B = "|".join(BACKGROUNDS)
_P = "on the left|in the center|on the right"
_OBJ_RE = rf"an? ({_C}) ({_S}) ({_P})"
_CAPTION_RE = re.compile(rf"^{_OBJ_RE}(?: and {_OBJ_RE})? on an? ({_B}) background$")
_PHRASE_POS = {v: k for k, v in _POS_PHRASE.items()}
_MOVE_POS = {v: k for k, v in _MOVE_PHRASE.items()}


def _norm(text: str) -> str:
    return " ".join(text.lower().strip().rstrip(".").split())


def parse_caption(text: str) -> Scene:
    """Parse a caption of the fixed grammar back into a ``Scene`` (zero jitter). Raises ``ValueError``."""
    m = _CAPTION_RE.match(_norm(text))
    if m is None:
        raise ValueError(f"not a shapes-world caption: {text!r}")
    c1, s1, p1, c2, s2, p2, bg = m.groups()
    second = None if c2 is None else SceneObject(s2, c2, _PHRASE_POS[p2])
    return Scene(s1, c1, _PHRASE_POS[p1], bg, second=second)


# --------------------------------------------------------------------------------------- instructions
@dataclass(frozen=True)
class Instruction:
    """A parsed edit instruction. ``kind`` ∈ EDIT_KINDS; ``subject`` is the shape the text refers to
    (None for background / add); the attribute(s) the edit sets are non-None, the rest are None.
    For "add": ``shape``, ``color`` and ``position`` describe the new shape."""

    kind: str
    subject: str | None = None
    shape: str | None = None
    color: str | None = None
    position: str | None = None
    background: str | None = None


def instruction_text(instr: Instruction) -> str:
    """Render an ``Instruction`` in the fixed grammar (inverse of ``parse_instruction``)."""
    if instr.kind == "recolor":
        return f"make the {instr.subject} {instr.color}"
    if instr.kind == "move":
        return f"move the {instr.subject} {_MOVE_PHRASE[instr.position]}"
    if instr.kind == "background":
        return f"make the background {instr.background}"
    if instr.kind == "reshape":
        return f"turn the {instr.subject} into {_article(instr.shape)} {instr.shape}"
    if instr.kind == "add":
        return f"add {_article(instr.color)} {instr.color} {instr.shape} {_POS_PHRASE[instr.position]}"
    raise ValueError(f"unknown edit kind {instr.kind!r}")


_INSTR_RES = (
    ("background", re.compile(rf"^make the background ({_B})$")),
    ("recolor", re.compile(rf"^make the ({_S}) ({_C})$")),
    ("move", re.compile(rf"^move the ({_S}) (to the left|to the center|to the right)$")),
    ("reshape", re.compile(rf"^turn the ({_S}) into an? ({_S})$")),
    ("add", re.compile(rf"^add an? ({_C}) ({_S}) ({_P})$")),
)


def parse_instruction(text: str) -> Instruction:
    """Parse an edit instruction of the fixed grammar. Raises ``ValueError`` on anything else."""
    t = _norm(text)
    for kind, rx in _INSTR_RES:
        m = rx.match(t)
        if m is None:
            continue
        g = m.groups()
        if kind == "background":
            return Instruction(kind, background=g[0])
        if kind == "recolor":
            return Instruction(kind, subject=g[0], color=g[1])
        if kind == "move":
            return Instruction(kind, subject=g[0], position=_MOVE_POS[g[1]])
        if kind == "reshape":
            return Instruction(kind, subject=g[0], shape=g[1])
        return Instruction(kind, color=g[0], shape=g[1], position=_PHRASE_POS[g[2]])
    raise ValueError(f"not a shapes-world instruction: {text!r}")


def apply_instruction(scene: Scene, instruction: Instruction | str) -> Scene:
    """The scene an instruction should produce: only the named attribute changes (jitter is kept; a moved
    shape keeps its offset within its third). Raises ``ValueError`` when the result is not a valid scene
    (e.g. recolouring to the background colour, adding where a shape already is)."""
    instr = parse_instruction(instruction) if isinstance(instruction, str) else instruction
    if instr.kind == "recolor":
        return replace(scene, color=instr.color)
    if instr.kind == "move":
        return replace(scene, position=instr.position)
    if instr.kind == "background":
        return replace(scene, background=instr.background)
    if instr.kind == "reshape":
        return replace(scene, shape=instr.shape)
    if instr.kind == "add":
        if scene.second is not None:
            raise ValueError("scene already has two shapes")
        return replace(scene, second=SceneObject(instr.shape, instr.color, instr.position))
    raise ValueError(f"unknown edit kind {instr.kind!r}")


@dataclass(frozen=True)
class EditTask:
    """A held-out editing task: render ``source`` with ``ShapesWorld.render``, apply ``instruction``,
    compare against ``target`` (e.g. ``ShapesEval.score_edit(src_img, instruction, out, source_caption)``)."""

    source: Scene
    instruction: str
    target: Scene

    @property
    def source_caption(self) -> str:
        return caption(self.source)

    @property
    def target_caption(self) -> str:
        return caption(self.target)


# ------------------------------------------------------------------------------------------- the world
def _all_combos() -> list[tuple[str, str, str, str]]:
    return [(s, c, p, b) for b in BACKGROUNDS for c in COLORS for s in SHAPES for p in POSITIONS if c != b]


def _combo_of(scene: Scene, obj: SceneObject | None = None) -> tuple[str, str, str, str]:
    o = scene.main if obj is None else obj
    return (o.shape, o.color, o.position, scene.background)


_STREAM_T2I, _STREAM_EDIT, _STREAM_HELDOUT_T2I, _STREAM_HELDOUT_EDIT = 1, 2, 3, 4


class ShapesWorld:
    """Seeded, unlimited generator of shapes-world images, captions and editing triplets.

    ``t2i_sample(i)`` / ``edit_sample(i)`` are pure functions of ``(seed, i)`` (each index has its own
    ``numpy`` generator seeded with ``[seed, stream, i]``), so a ``Dataset`` can index them directly and
    workers need no shared state.

    Args:
        image_size: side in pixels (tested at 32, 64, 128).
        seed: world seed; different seeds give different sample streams (the held-out split does not
            depend on it).
        supersample: render at ``image_size * supersample`` and box-downsample (anti-aliasing); 1 = crisp.
        heldout_fraction: fraction of (shape, color, position, background) compositions reserved for
            ``heldout_prompts`` / ``heldout_edits`` and never produced by the training samplers.
        second_shape_prob: probability that a ``t2i_sample`` scene has a second shape (default 0: one shape
            per scene so text-to-image evaluation is unambiguous; two-shape scenes arise from "add" edits).
        edit_kinds: the instruction kinds ``edit_sample`` draws from (uniformly).
    """

    def __init__(
        self,
        image_size: int = 64,
        seed: int = 0,
        *,
        supersample: int = 4,
        heldout_fraction: float = 0.1,
        second_shape_prob: float = 0.0,
        edit_kinds: Sequence[str] = EDIT_KINDS,
    ) -> None:
        if image_size < 16:
            raise ValueError("image_size must be >= 16")
        unknown = set(edit_kinds) - set(EDIT_KINDS)
        if unknown or not edit_kinds:
            raise ValueError(f"edit_kinds must be a non-empty subset of {EDIT_KINDS}")
        self.image_size = int(image_size)
        self.seed = int(seed)
        self.supersample = max(1, int(supersample))
        self.second_shape_prob = float(second_shape_prob)
        self.edit_kinds = tuple(edit_kinds)
        combos = _all_combos()
        # Held-out compositions: a fixed permutation (independent of the world seed).
        perm = np.random.default_rng(20240601).permutation(len(combos))
        n_held = int(round(heldout_fraction * len(combos)))
        held = {combos[i] for i in perm[:n_held]}
        self.heldout_combos: tuple[tuple[str, str, str, str], ...] = tuple(c for c in combos if c in held)
        self.train_combos: tuple[tuple[str, str, str, str], ...] = tuple(c for c in combos if c not in held)
        self._held = frozenset(held)
        self._train = frozenset(self.train_combos)

    # -- sampling -------------------------------------------------------------------------------------
    def _rng(self, stream: int, index: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, stream, int(index)])

    def is_heldout(self, scene: Scene) -> bool:
        """Whether any shape of the scene (with its background) is a held-out composition."""
        return any(_combo_of(scene, o) in self._held for o in scene.objects)

    def _jitter(self, rng: np.random.Generator) -> tuple[float, float]:
        u = rng.random(2)
        return float((2 * u[0] - 1) * X_JITTER), float((2 * u[1] - 1) * Y_JITTER)

    def sample_scene(self, rng: np.random.Generator, *, heldout: bool = False) -> Scene:
        """A random scene: a uniformly drawn training (or, with ``heldout=True``, held-out) composition
        with random jitter; with probability ``second_shape_prob`` (training only) a second shape is added
        in a free third."""
        combos = self.heldout_combos if heldout else self.train_combos
        if not combos:
            raise ValueError("no held-out compositions (heldout_fraction=0)")
        s, c, p, b = combos[int(rng.integers(len(combos)))]
        dx, dy = self._jitter(rng)
        scene = Scene(s, c, p, b, dx=dx, dy=dy)
        if not heldout and self.second_shape_prob > 0 and rng.random() < self.second_shape_prob:
            options = self._edit_options(scene, "add", heldout=False)
            if options:
                instr = options[int(rng.integers(len(options)))]
                dx, dy = self._jitter(rng)
                scene = replace(scene, second=SceneObject(instr.shape, instr.color, instr.position, dx, dy))
        return scene

    def _edit_options(self, scene: Scene, kind: str, *, heldout: bool) -> list[Instruction]:
        """Every instruction of ``kind`` applicable to ``scene`` whose result (for "add": the added shape)
        is a training composition, or a held-out one when ``heldout``."""
        allowed = self._held if heldout else self._train
        s, c, p, b = _combo_of(scene)
        if kind == "add":
            combos = self.heldout_combos if heldout else self.train_combos
            return [
                Instruction(kind, shape=s2, color=c2, position=p2)
                for (s2, c2, p2, b2) in combos
                if b2 == b and p2 != p
            ]
        if kind == "recolor":
            out = [Instruction(kind, subject=s, color=v) for v in COLORS if v not in (c, b)]
        elif kind == "move":
            out = [Instruction(kind, subject=s, position=v) for v in POSITIONS if v != p]
        elif kind == "background":
            out = [Instruction(kind, background=v) for v in BACKGROUNDS if v not in (b, c)]
        else:
            out = [Instruction(kind, subject=s, shape=v) for v in SHAPES if v != s]
        return [i for i in out if _combo_of(apply_instruction(scene, i)) in allowed]

    def _sample_edit(self, rng: np.random.Generator, heldout: bool) -> tuple[Scene, str, Scene]:
        """Source: a one-shape training scene; kind: uniform over ``edit_kinds`` that have an option;
        instruction: uniform over that kind's options. The target keeps the source's jitter (a new shape
        gets its own)."""
        if heldout and not self.heldout_combos:
            raise ValueError("no held-out compositions (heldout_fraction=0)")
        for _ in range(1000):
            source = replace(self.sample_scene(rng), second=None)
            kinds = list(self.edit_kinds)
            rng.shuffle(kinds)
            for kind in kinds:
                options = self._edit_options(source, kind, heldout=heldout)
                if not options:
                    continue
                instr = options[int(rng.integers(len(options)))]
                target = apply_instruction(source, instr)
                if kind == "add":
                    dx, dy = self._jitter(rng)
                    target = replace(target, second=replace(target.second, dx=dx, dy=dy))
                return source, instruction_text(instr), target
        raise RuntimeError("could not sample an edit (edit_kinds / held-out split too restrictive)")

    def t2i_scene(self, index: int) -> Scene:
        """The scene of training text-to-image sample ``index`` (deterministic in ``(seed, index)``)."""
        return self.sample_scene(self._rng(_STREAM_T2I, index))

    def t2i_sample(self, index: int) -> tuple[Image.Image, str]:
        """Training text-to-image sample ``index``: ``(RGB image, caption)``."""
        scene = self.t2i_scene(index)
        return self.render(scene), caption(scene)

    def edit_triplet(self, index: int) -> tuple[Scene, str, Scene]:
        """Training edit ``index`` as scenes: ``(source, instruction, target)``."""
        return self._sample_edit(self._rng(_STREAM_EDIT, index), heldout=False)

    def edit_sample(self, index: int) -> tuple[Image.Image, str, Image.Image]:
        """Training edit ``index``: ``(source image, instruction, target image)``."""
        source, instr, target = self.edit_triplet(index)
        return self.render(source), instr, self.render(target)

    def iter_t2i(self, start: int = 0) -> Iterator[tuple[Image.Image, str]]:
        """Endless ``t2i_sample(start), t2i_sample(start + 1), ...``."""
        i = start
        while True:
            yield self.t2i_sample(i)
            i += 1

    def iter_edit(self, start: int = 0) -> Iterator[tuple[Image.Image, str, Image.Image]]:
        """Endless ``edit_sample(start), edit_sample(start + 1), ...``."""
        i = start
        while True:
            yield self.edit_sample(i)
            i += 1

    def heldout_scenes(self, n: int, seed: int = 0, *, unseen: bool = True) -> list[Scene]:
        """``n`` evaluation scenes. ``unseen=True``: held-out compositions, cycled in a fixed shuffled order
        so each appears ~equally often (captions disjoint from training). ``unseen=False``: training
        compositions from a separate seed stream (in-distribution, new jitter)."""
        combos = self.heldout_combos if unseen else self.train_combos
        if not combos:
            raise ValueError("no held-out compositions (heldout_fraction=0)")
        rng = np.random.default_rng([self.seed, _STREAM_HELDOUT_T2I, int(seed), int(unseen)])
        order = rng.permutation(len(combos))
        out = []
        for i in range(n):
            s, c, p, b = combos[order[i % len(combos)]]
            dx, dy = self._jitter(rng)
            out.append(Scene(s, c, p, b, dx=dx, dy=dy))
        return out

    def heldout_prompts(self, n: int, seed: int = 0, *, unseen: bool = True) -> list[str]:
        """Captions of ``heldout_scenes(n, seed, unseen=unseen)`` — a fixed evaluation prompt list."""
        return [caption(s) for s in self.heldout_scenes(n, seed, unseen=unseen)]

    def heldout_edits(self, n: int, seed: int = 0, *, unseen: bool = True) -> list[EditTask]:
        """``n`` fixed evaluation edit tasks. ``unseen=True``: a training-composition source whose target
        (or added shape) is a held-out composition; ``unseen=False``: in-distribution, separate stream."""
        rng = np.random.default_rng([self.seed, _STREAM_HELDOUT_EDIT, int(seed), int(unseen)])
        return [EditTask(*self._sample_edit(rng, heldout=unseen)) for _ in range(n)]

    def pair_scenes(self, n: int, seed: int = 0, *, heldout: bool = True) -> list[Scene]:
        """``n`` distinct two-shape scenes (distinct captions), the harder prompts of stage 3 (docs/shapes.md,
        "Stage 3 with headroom"). ``heldout=True``: the first shape is a held-out composition, the second any
        composition on that background in another third, so no caption is a training one; ``heldout=False``:
        both shapes are training compositions. Raises ``ValueError`` when fewer than ``n`` exist."""
        stream = _STREAM_HELDOUT_T2I if heldout else _STREAM_T2I
        rng = np.random.default_rng([self.seed, stream, int(seed), 2])
        firsts = self.heldout_combos if heldout else self.train_combos
        seconds = self.heldout_combos + self.train_combos if heldout else self.train_combos
        pool = sorted({((s, c, p), (s2, c2, p2), b) for s, c, p, b in firsts
                       for s2, c2, p2, b2 in seconds if b2 == b and p2 != p})
        if n > len(pool):
            raise ValueError(f"n: at most {len(pool)} distinct two-shape scenes exist here, got {n}")
        out = []
        for k in rng.permutation(len(pool))[:n]:
            (s, c, p), (s2, c2, p2), b = pool[int(k)]
            dx, dy = self._jitter(rng)
            dx2, dy2 = self._jitter(rng)
            out.append(Scene(s, c, p, b, dx=dx, dy=dy, second=SceneObject(s2, c2, p2, dx2, dy2)))
        return out

    # -- rendering ------------------------------------------------------------------------------------
    def render(self, scene: Scene) -> Image.Image:
        """Draw a scene as an ``image_size``² RGB ``PIL.Image`` (supersampled, box-downsampled)."""
        k = self.supersample
        side = self.image_size * k
        img = Image.new("RGB", (side, side), BACKGROUND_RGB[scene.background])
        draw = ImageDraw.Draw(img)
        h = SHAPE_SIZE * side / 2
        for obj in scene.objects:
            cx = ((POSITIONS.index(obj.position) + 0.5) / 3 + obj.dx) * side
            cy = (0.5 + obj.dy) * side
            fill = COLOR_RGB[obj.color]
            # PIL boxes are inclusive of the end pixel: subtract 1 so the shape covers exactly 2h pixels.
            x0, y0, x1, y1 = round(cx - h), round(cy - h), round(cx + h) - 1, round(cy + h) - 1
            if obj.shape == "square":
                draw.rectangle((x0, y0, x1, y1), fill=fill)
            elif obj.shape == "circle":
                draw.ellipse((x0, y0, x1, y1), fill=fill)
            else:
                draw.polygon(((cx - 0.5, y0), (x0, y1), (x1, y1)), fill=fill)
        return img.reduce(k) if k > 1 else img
