"""One :class:`ExportSpec` per exported stage, declared in one place.

A spec names the stage's inputs and outputs with dtypes and shapes; every dynamic axis refers to a named
dimension (``Axis(dim, scale, offset)``: size = scale * value + offset) whose min/opt/max come from the user's
:class:`ExportRanges` and the model's sizes (:func:`stage_dims`). The exporter turns the dims into
``torch.export.Dim`` objects, the parity gate samples shapes from them, the ONNX runtime checks inputs against
them and TensorRT builds its optimisation profiles from them (``tensorrt.profiles_for``).

This module imports neither torch nor onnxruntime at import time: the runtimes read the same declarations back
from ``manifest.json``.

Stages (graph inputs -> outputs; B batch, L prompt tokens, N think tokens, D VLM width):

* ``condition_encoder``: input_ids, attention_mask (B, L) int64, position_ids (3, B, L + N) int64 (M-RoPE,
  computed outside), image_features (B, L, D) (the vision tower's output at the image-token slots, zeros for
  text-to-image) -> context (B, L + N, C) [(B, N, C) with ``tokens="think"``], pooled (B, P), mask bool.
* ``vision_encoder``: one reference's patches (4u, 1176) in window order, their (row, col) rope positions and
  window ids -> merged features (u, D) in window order (see ``preprocessing.vision_inputs``).
* ``dit`` / ``dit_edit``: ConditionedDiT with classifier-free guidance folded into the batch; ``dit_edit``
  also takes one reference latent per sample.
* ``vae_decoder``: latents -> pixels (includes latents / scale + shift); ``vae_encoder``: pixels -> posterior
  mean and std in latent space ((mean - shift) * scale, std * scale).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import numpy as np

__all__ = [
    "STAGES",
    "Axis",
    "DimSpec",
    "ExportRanges",
    "ExportSpec",
    "TensorSpec",
    "build_specs",
    "model_config",
    "stage_dims",
    "stage_tensors",
]

STAGES = ("condition_encoder", "vision_encoder", "dit", "dit_edit", "vae_decoder", "vae_encoder")
# Which stages each pipeline feature needs (the CLI's --stages default is all of them).
TEXT_TO_IMAGE_STAGES = ("condition_encoder", "dit", "vae_decoder")


@dataclass(frozen=True)
class ExportRanges:
    """The shapes an export must serve, in user units.

    min_size / max_size: generated image sides in pixels (multiples of 32). max_batch: images per call (the DiT
    and condition batches are twice that with classifier-free guidance). max_prompt_tokens: tokens of one chat
    text including image tokens (default: the model's max_length + one reference's image tokens).
    opt_*: the shapes TensorRT optimises for (default: the model's image_size, batch 1, 64 prompt tokens).
    """

    min_size: int = 256
    max_size: int = 1024
    max_batch: int = 4
    max_prompt_tokens: int | None = None
    opt_size: int | None = None
    opt_batch: int = 1
    opt_prompt_tokens: int = 64

    def __post_init__(self) -> None:
        for name in ("min_size", "max_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 32 or value % 32:
                raise ValueError(f"{name} must be a positive multiple of 32, got {value!r}")
        if self.min_size > self.max_size:
            raise ValueError(f"min_size ({self.min_size}) must be <= max_size ({self.max_size})")
        if self.max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {self.max_batch}")
        if self.max_prompt_tokens is not None and self.max_prompt_tokens < 1:
            raise ValueError(f"max_prompt_tokens must be >= 1, got {self.max_prompt_tokens}")
        if self.opt_size is not None and not (self.min_size <= self.opt_size <= self.max_size and self.opt_size % 32 == 0):
            raise ValueError(f"opt_size must be a multiple of 32 in {self.min_size}..{self.max_size}, got {self.opt_size}")
        if not 1 <= self.opt_batch <= self.max_batch:
            raise ValueError(f"opt_batch must be in 1..{self.max_batch}, got {self.opt_batch}")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> ExportRanges:
        return cls(**{k: v for k, v in data.items() if k in cls.__dataclass_fields__})


@dataclass(frozen=True)
class DimSpec:
    """A named dynamic dimension: value range, the value TensorRT optimises for, what it means."""

    name: str
    min: int
    max: int
    opt: int
    meaning: str = ""
    step: int = 1  # spacing of the values the parity gate tries

    def __post_init__(self) -> None:
        if not self.min <= self.opt <= self.max:
            raise ValueError(f"dimension {self.name}: need min <= opt <= max, got {self.min}, {self.opt}, {self.max}")

    @property
    def static(self) -> bool:
        return self.min == self.max

    def candidates(self) -> list[int]:
        """Up to four distinct values near the bottom of the range (cheap shapes for the parity gate)."""
        values: list[int] = []
        for k in range(4):
            value = min(self.max, self.min + k * self.step)
            if value not in values:
                values.append(value)
        return values


@dataclass(frozen=True)
class Axis:
    """A dynamic axis: size = scale * dims[dim] + offset."""

    dim: str
    scale: int = 1
    offset: int = 0

    def size(self, values: dict[str, int]) -> int:
        return self.scale * values[self.dim] + self.offset


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str  # "float32", "bfloat16", "int64", "bool"
    shape: tuple[int | Axis, ...]

    def concrete(self, values: dict[str, int]) -> tuple[int, ...]:
        return tuple(a if isinstance(a, int) else a.size(values) for a in self.shape)

    def to_dict(self) -> dict:
        return {"name": self.name, "dtype": self.dtype, "shape": [a if isinstance(a, int) else asdict(a) for a in self.shape]}

    @classmethod
    def from_dict(cls, data: dict) -> TensorSpec:
        shape = tuple(a if isinstance(a, int) else Axis(**a) for a in data["shape"])
        return cls(data["name"], data["dtype"], shape)


@dataclass
class ExportSpec:
    """Everything the exporter, the parity gate and the runtimes need to know about one stage.

    ``module_factory`` builds the small ``nn.Module`` with plain tensor I/O that is exported; ``make_inputs``
    builds a consistent numpy input set for given dim values (used for the traced example and the parity
    shapes); ``compare_rows`` gives, per output, the rows that must match (left-pad rows are garbage by design).
    Those three only exist at export time; ``to_dict`` keeps the declarative part for the manifest.
    """

    stage: str
    description: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    dims: dict[str, DimSpec]
    dtype: str = "float32"
    module_factory: Callable | None = field(default=None, repr=False)
    make_inputs: Callable[[dict[str, int], np.random.Generator], dict[str, np.ndarray]] | None = field(default=None, repr=False)
    compare_rows: Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]] | None = field(default=None, repr=False)

    @property
    def input_names(self) -> list[str]:
        return [t.name for t in self.inputs]

    @property
    def output_names(self) -> list[str]:
        return [t.name for t in self.outputs]

    def example_values(self) -> dict[str, int]:
        """The traced example: the second candidate of each dim (never 0 or 1 for a dynamic batch)."""
        return {name: (dim.candidates()[1] if len(dim.candidates()) > 1 else dim.min) for name, dim in self.dims.items()}

    def parity_values(self, count: int = 3) -> list[dict[str, int]]:
        """``count`` dim assignments that differ from the traced example wherever the range allows; different dims
        take different candidates, so spatial shapes come out non-square."""
        example = self.example_values()
        points = []
        for k in range(count):
            values = {}
            for j, (name, dim) in enumerate(self.dims.items()):
                others = [v for v in dim.candidates() if v != example[name]] or [example[name]]
                values[name] = others[(k + j) % len(others)]
            points.append(values)
        return points

    def torch_dynamic_shapes(self) -> dict:
        """``dynamic_shapes`` for ``torch.onnx.export``: one ``torch.export.Dim`` per named dynamic dim."""
        from torch.export import Dim

        symbols = {name: Dim(name, min=dim.min, max=dim.max) for name, dim in self.dims.items() if not dim.static}
        shapes = {}
        for tensor in self.inputs:
            axes = {}
            for i, axis in enumerate(tensor.shape):
                if isinstance(axis, Axis) and axis.dim in symbols:
                    symbol = symbols[axis.dim] if axis.scale == 1 else axis.scale * symbols[axis.dim]
                    axes[i] = symbol + axis.offset if axis.offset else symbol
            shapes[tensor.name] = axes or None
        return shapes

    def to_dict(self) -> dict:
        return {
            "stage": self.stage,
            "description": self.description,
            "dtype": self.dtype,
            "inputs": [t.to_dict() for t in self.inputs],
            "outputs": [t.to_dict() for t in self.outputs],
            "dims": {name: asdict(dim) for name, dim in self.dims.items()},
        }

    @classmethod
    def from_dict(cls, data: dict) -> ExportSpec:
        return cls(
            stage=data["stage"],
            description=data.get("description", ""),
            inputs=tuple(TensorSpec.from_dict(t) for t in data["inputs"]),
            outputs=tuple(TensorSpec.from_dict(t) for t in data["outputs"]),
            dims={name: DimSpec(**dim) for name, dim in data["dims"].items()},
            dtype=data.get("dtype", "float32"),
        )


# -- the model facts a runtime needs -----------------------------------------------------------------------------


def model_config(model) -> dict:
    """The sizes and constants of a ``DeepGenModel`` that the export specs and the runtimes need (manifest
    ``config``): chat template, special tokens, think tokens, bridge mode, vision preprocessing, VAE, scheduler."""
    from deepgen_components import conventions, processing
    from deepgen_components.conventions import OFFICIAL_PAD_POSITION

    encoder = model.encoder
    if encoder.kind != "qwen_vl":
        raise ValueError(
            f"export supports Qwen2/2.5-VL VLMs (M-RoPE, vision tower); this model wraps a {type(encoder.vlm).__name__}"
        )
    vlm_cfg = encoder.config
    vision = vlm_cfg.vision_config
    tokenizer = model.tokenizer
    bridge = model.bridge.config
    dit = model.dit.config
    vae = model.vae.config
    scheduler = {k: v for k, v in dict(model.scheduler.config).items() if not k.startswith("_")}
    return {
        "image_size": model.config.image_size,
        "max_length": model.config.max_length,
        "reference_latents": model.config.reference_latents,
        "num_think_tokens": encoder.num_think_tokens,
        "layers": list(encoder.layers.indices),
        "tokens": bridge.tokens,
        "mask_padding": bridge.mask_padding,
        "vocab_size": int(encoder.decoder.get_input_embeddings().weight.shape[0]),
        "vlm_hidden_size": encoder.hidden_size,
        "context_dim": bridge.context_dim,
        "pooled_dim": bridge.pooled_dim,
        "image_token_id": int(vlm_cfg.image_token_id),
        "pad_token_id": int(tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0),
        "pad_position": encoder.pad_position if encoder.pad_position is not None else OFFICIAL_PAD_POSITION,
        "chat_template": {
            "user_turn": conventions.USER_TURN,
            "t2i_wrapper": conventions.T2I_WRAPPER,
            "vision_block": conventions.VISION_BLOCK,
            "image_pad": conventions.IMAGE_PAD,
        },
        "spatial_merge_size": vision.spatial_merge_size,
        "patch_size": vision.patch_size,
        "temporal_patch_size": vision.temporal_patch_size,
        "vision_in_channels": vision.in_channels,
        "vision_window_size": vision.window_size,
        "vision_resize_factor": 28 / 32,
        "clip_mean": list(processing.CLIP_MEAN),
        "clip_std": list(processing.CLIP_STD),
        "dit_patch_size": dit.patch_size,
        "dit_pos_embed_max_size": dit.pos_embed_max_size,
        "latent_channels": model.latent_channels,
        "vae_scale_factor": model.vae_scale_factor,
        "vae_scaling_factor": vae.scaling_factor,
        "vae_shift_factor": vae.shift_factor or 0.0,
        "scheduler": scheduler,
    }


def _reference_side_units(pixels: int, config: dict) -> int:
    """Merged vision tokens along one side of a reference of ``pixels`` (512 -> 448 -> 32 patches -> 16)."""
    resized = math.floor(pixels * config["vision_resize_factor"])
    return resized // (config["patch_size"] * config["spatial_merge_size"])


def max_prompt_tokens(ranges: ExportRanges, config: dict) -> int:
    """Longest chat text: max_length text tokens plus one reference's image tokens (the official truncation)."""
    if ranges.max_prompt_tokens is not None:
        return ranges.max_prompt_tokens
    return config["max_length"] + _reference_side_units(config["image_size"], config) ** 2


def stage_dims(stage: str, ranges: ExportRanges, config: dict) -> dict[str, DimSpec]:
    """The named dimensions of ``stage`` for these ranges (pure arithmetic on the manifest ``config``)."""
    image_size = config["image_size"]
    opt_size = ranges.opt_size or min(max(image_size, ranges.min_size), ranges.max_size)
    vae = config["vae_scale_factor"]
    patch = config["dit_patch_size"]
    latent_unit = vae * patch  # pixels per latent-patch step (16 for SD3)
    think = config["num_think_tokens"]
    prompt_max = max_prompt_tokens(ranges, config)
    prompt_opt = min(ranges.opt_prompt_tokens, prompt_max)
    reference_max = image_size  # the reference resize rule caps the long side at image_size
    limit = config["dit_pos_embed_max_size"] * patch  # latent side the DiT's position table covers
    if ranges.max_size // vae > limit:
        raise ValueError(
            f"max_size={ranges.max_size}: the DiT's position table covers latents up to {limit} "
            f"({limit * vae} px, pos_embed_max_size={config['dit_pos_embed_max_size']})"
        )
    cfg_batch = DimSpec("batch", 1, 2 * ranges.max_batch, 2 * ranges.opt_batch, "batch (x2 with CFG)")
    latent_h = DimSpec("latent_height", ranges.min_size // latent_unit, ranges.max_size // latent_unit,
                       opt_size // latent_unit, f"image height / {latent_unit}")
    latent_w = DimSpec("latent_width", latent_h.min, latent_h.max, latent_h.opt, f"image width / {latent_unit}")
    if stage == "condition_encoder":
        return {
            "batch": cfg_batch,
            "prompt_length": DimSpec("prompt_length", 1, prompt_max, prompt_opt, "tokens of the chat text", step=7),
        }
    if stage == "vision_encoder":
        units_max = _reference_side_units(reference_max, config) ** 2
        units_opt = _reference_side_units(image_size, config) ** 2
        return {"vision_units": DimSpec("vision_units", 1, units_max, units_opt, "merged vision tokens of one reference")}
    if stage in ("dit", "dit_edit"):
        context = (
            DimSpec("context_length", think + 1, think + prompt_max, think + prompt_opt, "prompt + think tokens", step=7)
            if config["tokens"] == "all"
            else DimSpec("context_length", think, think, think, "think tokens")
        )
        dims = {"batch": cfg_batch, "latent_height": latent_h, "latent_width": latent_w, "context_length": context}
        if stage == "dit_edit":
            ref_max = reference_max // latent_unit
            dims["reference_height"] = DimSpec("reference_height", 32 // latent_unit or 1, ref_max, ref_max,
                                               f"reference height / {latent_unit}")
            dims["reference_width"] = DimSpec("reference_width", dims["reference_height"].min, ref_max, ref_max,
                                              f"reference width / {latent_unit}")
        return dims
    batch = DimSpec("batch", 1, ranges.max_batch, ranges.opt_batch, "images")
    if stage == "vae_decoder":
        return {"batch": batch, "latent_height": latent_h, "latent_width": latent_w}
    if stage == "vae_encoder":
        top = max(ranges.max_size, reference_max) // 32
        return {
            "batch": batch,
            "pixel_height": DimSpec("pixel_height", 1, top, max(1, min(top, image_size // 32)), "image height / 32"),
            "pixel_width": DimSpec("pixel_width", 1, top, max(1, min(top, image_size // 32)), "image width / 32"),
        }
    raise ValueError(f"unknown stage {stage!r}; stages: {', '.join(STAGES)}")


def stage_tensors(stage: str, config: dict, dtype: str) -> tuple[tuple[TensorSpec, ...], tuple[TensorSpec, ...], str]:
    """(inputs, outputs, description) of ``stage``; float tensors are in ``dtype`` except the fp32 timestep."""
    f = dtype
    think = config["num_think_tokens"]
    channels = config["latent_channels"]
    vae = config["vae_scale_factor"]
    patch = config["dit_patch_size"]
    if stage == "condition_encoder":
        length = Axis("prompt_length")
        ctx = Axis("prompt_length", 1, think) if config["tokens"] == "all" else think
        inputs = (
            TensorSpec("input_ids", "int64", (Axis("batch"), length)),
            TensorSpec("attention_mask", "int64", (Axis("batch"), length)),
            TensorSpec("position_ids", "int64", (3, Axis("batch"), Axis("prompt_length", 1, think))),
            TensorSpec("image_features", f, (Axis("batch"), length, config["vlm_hidden_size"])),
        )
        outputs = (
            TensorSpec("context", f, (Axis("batch"), ctx, config["context_dim"])),
            TensorSpec("pooled", f, (Axis("batch"), config["pooled_dim"])),
            TensorSpec("mask", "bool", (Axis("batch"), ctx)),
        )
        return inputs, outputs, "VLM text path + think tokens + SCB bridge -> DiT condition"
    if stage == "vision_encoder":
        tokens = Axis("vision_units", config["spatial_merge_size"] ** 2)
        width = config["vision_in_channels"] * config["temporal_patch_size"] * config["patch_size"] ** 2
        inputs = (
            TensorSpec("patches", f, (tokens, width)),
            TensorSpec("position_ids", "int64", (tokens, 2)),
            TensorSpec("window_ids", "int64", (tokens,)),
        )
        outputs = (TensorSpec("features", f, (Axis("vision_units"), config["vlm_hidden_size"])),)
        return inputs, outputs, "Qwen2.5-VL vision tower for one reference (window order in and out)"
    if stage in ("dit", "dit_edit"):
        batch = Axis("batch")
        latent = (batch, channels, Axis("latent_height", patch), Axis("latent_width", patch))
        inputs = [
            TensorSpec("hidden_states", f, latent),
            TensorSpec("encoder_hidden_states", f, (batch, Axis("context_length"), config["context_dim"])),
            TensorSpec("pooled", f, (batch, config["pooled_dim"])),
            TensorSpec("timestep", "float32", (batch,)),
        ]
        if config["mask_padding"]:
            inputs.append(TensorSpec("context_mask", "bool", (batch, Axis("context_length"))))
        if stage == "dit_edit":
            inputs.append(
                TensorSpec("reference_latents", f, (batch, channels, Axis("reference_height", patch), Axis("reference_width", patch)))
            )
        description = "ConditionedDiT velocity, CFG folded into the batch" + (
            ", one reference latent per sample appended to the image tokens" if stage == "dit_edit" else ""
        )
        return tuple(inputs), (TensorSpec("velocity", f, latent),), description
    if stage == "vae_decoder":
        inputs = (TensorSpec("latents", f, (Axis("batch"), channels, Axis("latent_height", patch), Axis("latent_width", patch))),)
        outputs = (
            TensorSpec("pixels", f, (Axis("batch"), 3, Axis("latent_height", patch * vae), Axis("latent_width", patch * vae))),
        )
        return inputs, outputs, "VAE decoder: latents / scaling + shift -> pixels in about [-1, 1]"
    if stage == "vae_encoder":
        inputs = (TensorSpec("pixels", f, (Axis("batch"), 3, Axis("pixel_height", 32), Axis("pixel_width", 32))),)
        latent = (Axis("batch"), channels, Axis("pixel_height", 32 // vae), Axis("pixel_width", 32 // vae))
        outputs = (TensorSpec("mean", f, latent), TensorSpec("std", f, latent))
        return inputs, outputs, "VAE encoder: pixels -> posterior (mean - shift) * scaling and std * scaling"
    raise ValueError(f"unknown stage {stage!r}; stages: {', '.join(STAGES)}")


# -- example inputs -------------------------------------------------------------------------------------------


def _left_padded_mask(batch: int, length: int, rng: np.random.Generator, min_real: int = 1) -> np.ndarray:
    """(batch, length) int64 ones with random left padding; row 0 has none (so the batch fixes the length)."""
    mask = np.ones((batch, length), dtype=np.int64)
    for row in range(1, batch):
        mask[row, : rng.integers(0, length - min(min_real, length) + 1)] = 0
    return mask


def _input_maker(stage: str, config: dict, dtype: str) -> Callable:
    from deepgen_components.export.manifest import numpy_dtype
    from deepgen_components.export.preprocessing import vision_inputs as window_ordered_inputs

    from deepgen_components.conventions import mrope_positions

    fdt = numpy_dtype(dtype)
    think = config["num_think_tokens"]
    merge = config["spatial_merge_size"]

    def condition_inputs(values: dict[str, int], rng: np.random.Generator) -> dict[str, np.ndarray]:
        batch, length = values["batch"], values["prompt_length"]
        image_id = config["image_token_id"]
        # An image block (grid 1 x 2m x 2m -> 4 tokens) after the first real token when the prompt has room.
        with_image = length >= 6
        mask = _left_padded_mask(batch, length, rng, min_real=6 if with_image else 1)
        ids = rng.integers(0, config["vocab_size"] - 1, (batch, length), dtype=np.int64)
        ids[ids >= image_id] += 1  # never the image token by accident
        ids[mask == 0] = config["pad_token_id"]
        features = np.zeros((batch, length, config["vlm_hidden_size"]), dtype=np.float32)
        grids = []
        if with_image:
            for row in range(batch):
                start = int(np.argmax(mask[row])) + 1
                ids[row, start : start + 4] = image_id
                features[row, start : start + 4] = rng.standard_normal((4, config["vlm_hidden_size"]))
                grids.append((1, 2 * merge, 2 * merge))
        ext_ids = np.concatenate([ids, np.zeros((batch, think), np.int64)], axis=1)
        ext_mask = np.concatenate([mask, np.ones((batch, think), np.int64)], axis=1)
        positions = mrope_positions(
            ext_ids, ext_mask, grids, image_token_id=image_id, spatial_merge_size=merge, pad_position=config["pad_position"]
        )
        return {"input_ids": ids, "attention_mask": mask, "position_ids": positions, "image_features": features.astype(fdt)}

    def vision_inputs(values: dict[str, int], rng: np.random.Generator) -> dict[str, np.ndarray]:
        units = values["vision_units"]
        rows = max(d for d in range(1, int(math.isqrt(units)) + 1) if units % d == 0)
        grid = (1, rows * merge, units // rows * merge)
        width = config["vision_in_channels"] * config["temporal_patch_size"] * config["patch_size"] ** 2
        patches = rng.standard_normal((units * merge * merge, width)).astype(np.float32)
        feeds, _ = window_ordered_inputs(
            patches, grid, merge_size=merge, window_size=config["vision_window_size"], patch_size=config["patch_size"]
        )
        feeds["patches"] = feeds["patches"].astype(fdt)
        return feeds

    def dit_inputs(values: dict[str, int], rng: np.random.Generator) -> dict[str, np.ndarray]:
        batch, context = values["batch"], values["context_length"]
        patch, channels = config["dit_patch_size"], config["latent_channels"]
        feeds = {
            "hidden_states": rng.standard_normal((batch, channels, patch * values["latent_height"], patch * values["latent_width"])),
            "encoder_hidden_states": rng.standard_normal((batch, context, config["context_dim"])),
            "pooled": rng.standard_normal((batch, config["pooled_dim"])),
        }
        feeds = {k: v.astype(np.float32).astype(fdt) for k, v in feeds.items()}
        feeds["timestep"] = rng.uniform(0, 1000, batch).astype(np.float32)
        if config["mask_padding"]:
            feeds["context_mask"] = _left_padded_mask(batch, context, rng).astype(bool)
        if stage == "dit_edit":
            shape = (batch, channels, patch * values["reference_height"], patch * values["reference_width"])
            feeds["reference_latents"] = rng.standard_normal(shape).astype(np.float32).astype(fdt)
        return feeds

    def vae_decoder_inputs(values: dict[str, int], rng: np.random.Generator) -> dict[str, np.ndarray]:
        patch = config["dit_patch_size"]
        shape = (values["batch"], config["latent_channels"], patch * values["latent_height"], patch * values["latent_width"])
        return {"latents": rng.standard_normal(shape).astype(np.float32).astype(fdt)}

    def vae_encoder_inputs(values: dict[str, int], rng: np.random.Generator) -> dict[str, np.ndarray]:
        shape = (values["batch"], 3, 32 * values["pixel_height"], 32 * values["pixel_width"])
        return {"pixels": rng.uniform(-1, 1, shape).astype(np.float32).astype(fdt)}

    return {
        "condition_encoder": condition_inputs,
        "vision_encoder": vision_inputs,
        "dit": dit_inputs,
        "dit_edit": dit_inputs,
        "vae_decoder": vae_decoder_inputs,
        "vae_encoder": vae_encoder_inputs,
    }[stage]


def _condition_rows(config: dict) -> Callable:
    think = config["num_think_tokens"]

    def rows(inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        mask = inputs["attention_mask"].astype(bool)
        if config["tokens"] == "all":
            valid = np.concatenate([mask, np.ones((mask.shape[0], think), bool)], axis=1)
        else:
            valid = np.ones((mask.shape[0], think), bool)
        return {"context": valid, "mask": valid}

    return rows


def build_specs(model, ranges: ExportRanges, stages=STAGES, dtype: str = "float32") -> dict[str, ExportSpec]:
    """The export specs of ``stages`` for ``model``, with their module factories and input makers."""
    from deepgen_components.export import modules

    config = model_config(model)
    unknown = [s for s in stages if s not in STAGES]
    if unknown:
        raise ValueError(f"stages: unknown {unknown}; stages: {', '.join(STAGES)}")
    factories = {
        "condition_encoder": lambda: modules.ConditionEncoder(model),
        "vision_encoder": lambda: modules.VisionEncoder(model),
        "dit": lambda: modules.DiTVelocity(model, with_reference=False),
        "dit_edit": lambda: modules.DiTVelocity(model, with_reference=True),
        "vae_decoder": lambda: modules.VAEDecoder(model),
        "vae_encoder": lambda: modules.VAEEncoder(model),
    }
    specs = {}
    for stage in stages:
        inputs, outputs, description = stage_tensors(stage, config, dtype)
        specs[stage] = ExportSpec(
            stage=stage,
            description=description,
            inputs=inputs,
            outputs=outputs,
            dims=stage_dims(stage, ranges, config),
            dtype=dtype,
            module_factory=factories[stage],
            make_inputs=_input_maker(stage, config, dtype),
            compare_rows=_condition_rows(config) if stage == "condition_encoder" else None,
        )
    return specs
