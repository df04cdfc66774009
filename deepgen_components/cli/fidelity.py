"""Numerical parity with the official DeepGen 1.0 implementation, checked against a golden set.

A golden set (e.g. ``shared/golden/deepgen_tiny_a``) is what the official code computed at a tiny random
size: its weights, the inputs it was given, and every intermediate and output (see the set's ``README.md``
and ``manifest.json``). :func:`compare_golden` imports the weights through our official-weights import
(:func:`~deepgen_components.builders.deepgen_from_official`, official parity mode: no pad masking, every
token reaches the DiT), feeds the recorded inputs through the public API (``DeepGenModel``,
``DeepGenPipeline``, ``processing``, ``denoising``) and returns one :class:`Row` per compared tensor.
``benchmarks/fidelity.py`` prints the rows as a table; ``tests/test_golden_parity.py`` asserts on them. This
module holds the golden set, the rows and their :class:`Recorder`, the entry point and the table; the sections
that feed the recorded inputs through the API are :mod:`deepgen_components.cli.fidelity_checks`.

Everything set-specific (prompts, sizes, steps, seeds, CFG scale, connector heads, layer count) is read
from the manifest, so any set laid out like set A can be checked. Tensors a set does not hold are
skipped; tensors this module does not know get a ``not compared`` row.

Tolerance (the golden README's rule): integer / bool tensors exactly equal; float tensors
``torch.allclose(ours, golden, rtol=1e-4, atol=1e-4)``. Three tensor kinds cannot be recomputed and are
checked differently:

* recorded random *inputs* (noise, clean latents, ``u``, pixels): fed to the model as given (``input``);
* VAE posterior *samples* drawn from the official run's global RNG (``*.ref_latents.*``,
  ``train_edit.x0.*``): our posterior mean is compared where the set stores the official one, and the
  sample must be a plausible draw from *our* posterior, max |z| <= 6 with
  z = (sample / scale + shift - mean) / std (``sample``); the sample itself is then fed to the DiT;
* a generator draw with a known seed (``gen_*.initial_noise``): recomputed with ``torch.randn`` exactly as
  ``DeepGenPipeline`` draws it.
"""

from __future__ import annotations

import json
import math
import re
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from deepgen_components.cli.fidelity_checks import (
    check_dit,
    check_edit,
    check_generation,
    check_t2i,
    check_training,
)

__all__ = [
    "ATOL",
    "RTOL",
    "SAMPLE_Z_LIMIT",
    "GoldenSet",
    "Recorder",
    "Row",
    "compare_golden",
    "format_table",
    "load_golden",
    "load_official_model",
]

RTOL = 1e-4
ATOL = 1e-4
SAMPLE_Z_LIMIT = 6.0  # P(|z| > 6) ~ 2e-9 per element: a real posterior draw never gets near it

_EXACT_DTYPES = (torch.bool, torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64)


# -- golden set ---------------------------------------------------------------------------------------
@dataclass
class GoldenSet:
    """A golden set on disk: ``manifest.json``, ``tensors.safetensors`` and the component folders."""

    path: Path
    manifest: dict
    tensors: dict[str, torch.Tensor]

    def __contains__(self, name: str) -> bool:
        return name in self.tensors

    def __getitem__(self, name: str) -> torch.Tensor:
        return self.tensors[name]

    def indexed(self, prefix: str) -> list[torch.Tensor]:
        """``prefix.0``, ``prefix.1``, ... for as long as they exist."""
        out = []
        while f"{prefix}.{len(out)}" in self.tensors:
            out.append(self.tensors[f"{prefix}.{len(out)}"])
        return out

    @property
    def prompts(self) -> dict:
        return self.manifest.get("prompts", {})

    @property
    def generation(self) -> dict:
        return self.manifest.get("generation", {})

    @property
    def connector_heads(self) -> int | None:
        return self.manifest.get("configs", {}).get("connector", {}).get("num_attention_heads")

    @property
    def vae_shift_scale(self) -> tuple[float, float]:
        vae = self.manifest.get("configs", {}).get("vae", {})
        return float(vae.get("shift_factor") or 0.0), float(vae.get("scaling_factor", 1.0))

    def seed(self, task: str) -> int | None:
        """The generator seed of ``generate()`` for ``task`` ("t2i" / "edit"): a structured manifest entry
        (``generation.seeds[task]`` or ``generation.seed_<task>``) or, as in set A, the README sentence
        "seeded with 1245 (T2I) and 1255 (edit)" kept in ``generation.initial_noise``."""
        gen = self.generation
        if isinstance(gen.get("seeds"), dict) and task in gen["seeds"]:
            return int(gen["seeds"][task])
        if f"seed_{task}" in gen:
            return int(gen[f"seed_{task}"])
        match = re.search(rf"(\d+)\s*\({re.escape(task)}\)", str(gen.get("initial_noise", "")), re.IGNORECASE)
        return int(match.group(1)) if match else None

    def references_per_sample(self, num_samples: int) -> list[list[int]]:
        """Indices of ``edit.ref_pixels.*`` belonging to each edit sample (consecutive, equal split unless the
        manifest gives ``images.edit_references_per_sample``)."""
        num_refs = len(self.indexed("edit.ref_pixels"))
        counts = self.manifest.get("images", {}).get("edit_references_per_sample")
        if counts is None:
            if num_samples == 0 or num_refs % num_samples:
                raise ValueError(
                    f"golden set: {num_refs} edit references for {num_samples} edit prompts; add "
                    "images.edit_references_per_sample to the manifest"
                )
            counts = [num_refs // num_samples] * num_samples
        starts = [sum(counts[:i]) for i in range(len(counts))]
        return [list(range(s, s + c)) for s, c in zip(starts, counts)]


def load_golden(golden_dir: str | Path) -> GoldenSet:
    from safetensors.torch import load_file

    path = Path(golden_dir)
    for name in ("manifest.json", "tensors.safetensors", "official_state_dict.safetensors"):
        if not (path / name).is_file():
            raise FileNotFoundError(
                f"golden_dir: no {name} in {path} (expected a golden set like deepgen_tiny_a)"
            )
    manifest = json.loads((path / "manifest.json").read_text())
    return GoldenSet(path=path, manifest=manifest, tensors=load_file(str(path / "tensors.safetensors")))


def load_official_model(golden: GoldenSet, *, mask_padding: bool = False, tokens: str = "all"):
    """The golden set's weights imported through ``deepgen_from_official`` (original checkpoint layout plus
    the tiny Qwen2.5-VL folder), float32. Parity mode unless ``mask_padding`` / ``tokens`` say otherwise."""
    from deepgen_components.builders import deepgen_from_official
    from deepgen_components.model import DeepGenConfig

    kwargs = golden.manifest.get("model_kwargs", {})
    config = DeepGenConfig(
        max_length=int(kwargs.get("max_length", 1024)),
        condition_dropout=float(kwargs.get("unconditional", 0.1)),
    )
    p = golden.path
    return deepgen_from_official(
        p / "qwen2_5_vl",
        p / "official_state_dict.safetensors",
        vae_path=p / "vae",
        transformer_config=p / "transformer",
        scheduler_path=p / "scheduler",
        tokenizer_path=p / "tokenizer",
        connector_heads=golden.connector_heads,
        dtype=torch.float32,
        mask_padding=mask_padding,
        tokens=tokens,
        config=config,
    )


# -- rows -----------------------------------------------------------------------------------------------
@dataclass
class Row:
    """One compared tensor.

    check: ``exact`` (integers / bools), ``allclose`` (floats), ``sample`` (random posterior draw: max |z|),
    ``input`` (recorded input, fed as given) or ``not compared``.
    max_abs: max |ours - golden|; max_rel: max_abs / max |golden| (the README's "rel");
    tol_used: max |ours - golden| / (atol + rtol |golden|), <= 1 passes (allclose); for ``sample`` rows
    max |z| / SAMPLE_Z_LIMIT.
    """

    name: str
    via: str
    check: str
    shape: tuple[int, ...]
    max_abs: float | None
    max_rel: float | None
    tol_used: float | None
    tolerance: str
    passed: bool
    note: str = ""

    def to_dict(self) -> dict:
        data = asdict(self)
        data["shape"] = list(self.shape)
        return data


class Recorder:
    """Collects the :class:`Row` s of one comparison: ``compare`` (ours vs a golden tensor), ``sample`` (a golden
    posterior draw against our posterior), ``input`` (a recorded input, fed as given)."""

    def __init__(self, golden: GoldenSet, rtol: float, atol: float) -> None:
        self.golden = golden
        self.rtol = rtol
        self.atol = atol
        self.rows: list[Row] = []

    def compare(
        self, name: str, ours, via: str, *, expected: torch.Tensor | None = None, note: str = ""
    ) -> None:
        """Row ``name``: ours vs the golden tensor (or ``expected``, a tensor derived from the golden set)."""
        if name not in self.golden:
            return
        golden = self.golden[name] if expected is None else expected
        ours = torch.as_tensor(ours).detach().cpu()
        shape = tuple(golden.shape)
        if golden.dtype in _EXACT_DTYPES:
            if tuple(ours.shape) != shape or ours.is_floating_point():
                note = f"ours is {tuple(ours.shape)} {ours.dtype}, golden {shape} {golden.dtype}"
                self.rows.append(Row(name, via, "exact", shape, math.inf, None, None, "exact", False, note))
                return
            diff = (ours.long() - golden.long()).abs()
            max_abs = float(diff.max()) if diff.numel() else 0.0
            passed = bool(torch.equal(ours.to(golden.dtype), golden))
            self.rows.append(Row(name, via, "exact", shape, max_abs, None, None, "exact", passed, note))
            return
        tolerance = f"rtol={self.rtol:g} atol={self.atol:g}"
        if tuple(ours.shape) != shape:
            note = f"ours has shape {tuple(ours.shape)}"
            self.rows.append(
                Row(name, via, "allclose", shape, math.inf, math.inf, math.inf, tolerance, False, note)
            )
            return
        g, o = golden.double(), ours.double()
        diff = (o - g).abs()
        max_abs = float(diff.max()) if diff.numel() else 0.0
        scale = float(g.abs().max()) if g.numel() else 0.0
        max_rel = max_abs / scale if scale > 0 else (0.0 if max_abs == 0 else math.inf)
        tol_used = float((diff / (self.atol + self.rtol * g.abs())).max()) if diff.numel() else 0.0
        passed = bool(torch.allclose(o, g, rtol=self.rtol, atol=self.atol))
        self.rows.append(
            Row(name, via, "allclose", shape, max_abs, max_rel, tol_used, tolerance, passed, note)
        )

    def sample(self, name: str, mean: torch.Tensor, std: torch.Tensor, via: str) -> None:
        """``name`` holds (z - shift) * scale for a draw z ~ N(mean, std^2) of our VAE posterior."""
        if name not in self.golden:
            return
        shift, scale = self.golden.vae_shift_scale
        golden = self.golden[name].double()
        z = ((golden / scale + shift) - mean.detach().cpu().double()) / std.detach().cpu().double()
        max_z = float(z.abs().max())
        self.rows.append(
            Row(
                name,
                via,
                "sample",
                tuple(golden.shape),
                None,
                None,
                max_z / SAMPLE_Z_LIMIT,
                f"|z|<={SAMPLE_Z_LIMIT:g}",
                max_z <= SAMPLE_Z_LIMIT,
                f"max|z|={max_z:.2f}, mean z={float(z.mean()):+.3f}, std z={float(z.std()):.3f}",
            )
        )

    def input(self, name: str, via: str = "recorded input, fed as given") -> None:
        if name in self.golden:
            shape = tuple(self.golden[name].shape)
            self.rows.append(Row(name, via, "input", shape, None, None, None, "-", True))


# -- entry points --------------------------------------------------------------------------------------------
def compare_golden(
    golden: str | Path | GoldenSet,
    model=None,
    *,
    rtol: float = RTOL,
    atol: float = ATOL,
    timings: dict[str, float] | None = None,
) -> list[Row]:
    """Reproduce every tensor of a golden set through our public API; one :class:`Row` per comparison.

    ``model``: a model from :func:`load_official_model` (built here when None). Golden tensors no check
    covers get a ``not compared`` row (passed, but listed so that a new set's extra tensors are visible).
    ``timings`` (optional) receives seconds per section.
    """
    if not isinstance(golden, GoldenSet):
        golden = load_golden(golden)
    timings = {} if timings is None else timings
    clock = time.perf_counter()
    if model is None:
        model = load_official_model(golden)
        timings["load model"] = time.perf_counter() - clock
    rec = Recorder(golden, rtol, atol)
    expected = golden.manifest.get("selected_layers")
    if expected is not None:
        ours = list(model.layers.indices)
        rec.rows.append(
            Row(
                "selected_layers (manifest)",
                "DeepGenModel.layers (official rule range(N-1, 0, -6))",
                "exact",
                (len(expected),),
                0.0 if ours == expected else math.inf,
                None,
                None,
                "exact",
                ours == expected,
                "" if ours == expected else f"ours {ours}",
            )
        )

    def section(name: str, fn, *args):
        start = time.perf_counter()
        with torch.no_grad():
            result = fn(*args)
        timings[name] = time.perf_counter() - start
        return result

    t2i = section("t2i VLM+SCB", check_t2i, model, golden, rec)
    edit = section("edit VLM+SCB+refs", check_edit, model, golden, rec)
    section("direct DiT", check_dit, model, golden, rec, edit)
    if t2i is not None:
        section("generation t2i", check_generation, model, golden, rec, "t2i", t2i)
    if edit is not None:
        section("generation edit", check_generation, model, golden, rec, "edit", edit)
    section("training t2i", check_training, model, golden, rec, "t2i", edit)
    section("training edit", check_training, model, golden, rec, "edit", edit)

    covered = {row.name for row in rec.rows}
    for name in sorted(set(golden.tensors) - covered):
        shape = tuple(golden[name].shape)
        rec.rows.append(
            Row(name, "-", "not compared", shape, None, None, None, "-", True, "no check defined")
        )
    return rec.rows


def _fmt(value: float | None, digits: str = ".1e") -> str:
    if value is None:
        return "-"
    if math.isinf(value):
        return "inf"
    return "0" if value == 0 else format(value, digits)


def format_table(rows: Sequence[Row], *, with_via: bool = True) -> str:
    """The rows as a Markdown table."""
    header = ["tensor", "shape", "check", "max abs", "max rel", "tol used", "tolerance", "ok"]
    if with_via:
        header.append("computed by (public API)")
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        cells = [
            f"`{r.name}`",
            "×".join(str(s) for s in r.shape) or "()",
            r.check,
            _fmt(r.max_abs),
            _fmt(r.max_rel),
            _fmt(r.tol_used, ".2f"),
            r.tolerance,
            "yes" if r.passed else "**NO**",
        ]
        if with_via:
            cells.append(r.via + (f"; {r.note}" if r.note else ""))
        lines.append("| " + " | ".join(cell.replace("|", "\\|") for cell in cells) + " |")
    return "\n".join(lines)
