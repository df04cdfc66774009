"""Training configuration: one YAML file per stage x scale, overridable with ``key.sub=value`` arguments."""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any

import yaml

__all__ = [
    "DataConfig",
    "LoraConfigSpec",
    "ModelSpec",
    "OptimConfig",
    "RLConfig",
    "SourceConfig",
    "TrainConfig",
    "TrainerConfig",
    "apply_overrides",
    "load_config",
]

STAGES = ("align", "sft", "rl")


@dataclass
class ModelSpec:
    """How to build the model: an embedded preset, a saved pipeline folder, or official weights."""

    preset: str | None = "tiny"
    pipeline: str | None = None
    vlm: str | None = None
    weights: str | None = None  # an official DeepGen checkpoint (file or release folder)
    vae: str | None = None
    transformer: str | None = None  # a diffusers SD3 transformer folder (official stage-1 start: UniPic2's)
    scheduler: str | None = None
    seed: int = 0
    mask_padding: bool | None = None
    tokens: str | None = None
    init_from: str | None = None  # a training checkpoint whose weights start this run (e.g. stage 1 -> 2)
    teacher: str | None = None  # a shapes base folder: distil its DiT under its own prompt encoder (shapes_base)
    teacher_target: bool = True  # the teacher's velocity replaces the target eps - x0
    teacher_features: float = 0.0  # weight of the SCB-context-to-prompt-encoder feature loss (0 = off)
    flow_weight: float = 1.0  # weight of DeepGen's flow-matching loss; 0 = the feature loss alone (no DiT pass)
    condition_dropout: float = 0.1
    image_size: int | None = None


@dataclass
class SourceConfig:
    name: str
    kind: str  # manifest | webdataset | shapes
    task: str = "t2i"
    path: str | None = None
    repeat: int = 1
    seed: int = 0
    length: int = 100_000  # shapes only
    foreground_weight: float = 0.0  # shapes only: loss weight 1 + w on the latent cells a shape covers
    edit_kinds: list[str] | None = None  # shapes edit sources only: which kinds (None = all of EDIT_KINDS)


@dataclass
class DataConfig:
    sources: list[SourceConfig] = field(default_factory=list)
    image_size: int = 512
    batch_size: int = 4  # per process and micro-batch
    num_workers: int = 0


@dataclass
class OptimConfig:
    lr: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    weight_decay: float = 0.05  # on parameters with >= 2 dims only
    warmup_ratio: float = 0.01
    warmup_steps: int | None = None  # overrides warmup_ratio (official RL: 20 steps)
    warmup_start_factor: float = 1e-5
    schedule: str = "cosine"  # cosine | constant
    grad_clip: float = 1.0
    grad_accum: int = 1


@dataclass
class LoraConfigSpec:
    r: int = 64
    alpha: float = 128.0
    dropout: float = 0.05
    init: str = "gaussian"
    targets: list[str] = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    )


@dataclass
class TrainerConfig:
    max_steps: int = 100
    seed: int = 0
    precision: str = "auto"  # auto (bf16 autocast on CUDA, fp32 on CPU) | fp32 | bf16
    activation_checkpointing: bool = False
    checkpoint_every: int = 50
    keep_last: int = 2
    log_every: int = 1
    distributed: str = "auto"  # auto | none | ddp | fsdp
    device: str = "auto"
    save_pipeline: bool = True
    tensorboard: bool = True


@dataclass
class RLConfig:
    """Stage 3 (MR-GRPO) settings; see docs/rl.md."""

    group_size: int = 8
    prompts_per_step: int = 4
    num_steps: int = 50  # denoising steps of a rollout
    eta: float = 1.0
    logprob: str = "mean_squared"  # mean_squared (official) | gaussian
    sampler: str = "cps"  # cps | flow_grpo
    noise_level: float = 0.7  # flow_grpo sampler only: sigma_t = noise_level * sqrt(sigma / (1 - sigma))
    same_noise_in_group: bool = True
    guidance_scale: float = 1.0  # official: CFG off during RL
    timestep_fraction: float = 0.6
    include_last_step: bool = False
    clip_range: float = 1e-4
    adv_clip: float = 5.0
    adv_eps: float = 1e-4
    advantages: str = "gdpo"  # gdpo | grpo
    global_normalisation: bool = True
    kl_beta: float = 5e-7
    sft_lambda: float = 1e-4
    sft_batch_size: int = 4
    update_mode: str = "per_rollout"  # per_rollout (one optimizer step) | per_timestep
    micro_batch: int = 8
    rewards: dict[str, Any] = field(default_factory=dict)  # key -> build_reward spec {name, **options}
    categories: dict[str, dict[str, float]] = field(default_factory=dict)  # category -> reward weights
    prompts: list[dict[str, Any]] = field(default_factory=list)  # {"text", "category", "weight"}
    prompt_files: list[dict[str, Any]] = field(default_factory=list)  # {"path" (.txt/.jsonl), "category", "weight"}
    prompt_source: dict[str, Any] = field(default_factory=dict)


@dataclass
class TrainConfig:
    stage: str = "align"
    model: ModelSpec = field(default_factory=ModelSpec)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    lora: LoraConfigSpec | None = None
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    rl: RLConfig | None = None
    out: str = "runs/train"

    def __post_init__(self) -> None:
        if self.stage not in STAGES:
            raise ValueError(f"stage must be one of {STAGES}, got {self.stage!r}")
        if self.model.teacher_features < 0:
            raise ValueError(f"model.teacher_features must be >= 0, got {self.model.teacher_features}")
        if self.model.teacher_features > 0 and not self.model.teacher:
            raise ValueError("model.teacher_features needs model.teacher (a shapes base folder with prompt_encoder.pt)")
        if self.model.flow_weight < 0:
            raise ValueError(f"model.flow_weight must be >= 0, got {self.model.flow_weight}")
        if self.model.flow_weight == 0 and self.model.teacher_features == 0:
            raise ValueError("model.flow_weight: 0 leaves no loss; it needs model.teacher_features > 0 (the feature "
                             "loss alone)")
        if self.model.flow_weight == 0 and self.stage != "align":
            raise ValueError(f"model.flow_weight: 0 (no DiT pass) is for stage 'align' only, got stage {self.stage!r}")

    def to_dict(self) -> dict:
        return asdict(self)


def _build(cls, data: Any, where: str):
    """Instantiate a (nested) dataclass from plain data, naming unknown keys."""
    if not is_dataclass(cls):
        return data
    if data is None:
        return None
    if not isinstance(data, dict):
        raise ValueError(f"{where}: expected a mapping, got {type(data).__name__}")
    known = {f.name: f for f in fields(cls)}
    unknown = sorted(set(data) - set(known))
    if unknown:
        raise ValueError(f"{where}: unknown keys {unknown}; known: {sorted(known)}")
    hints = {
        "model": ModelSpec, "data": DataConfig, "optim": OptimConfig, "lora": LoraConfigSpec,
        "trainer": TrainerConfig, "rl": RLConfig,
    }
    kwargs = {}
    for key, value in data.items():
        if cls is TrainConfig and key in hints:
            kwargs[key] = _build(hints[key], value, f"{where}.{key}")
        elif cls is DataConfig and key == "sources":
            if not isinstance(value, list):
                raise ValueError(f"{where}.sources: expected a list")
            kwargs[key] = [_build(SourceConfig, v, f"{where}.sources[{i}]") for i, v in enumerate(value)]
        elif cls is OptimConfig and key == "betas":
            kwargs[key] = tuple(float(b) for b in value)
        else:
            kwargs[key] = value
    return cls(**kwargs)


def _parse_value(text: str) -> Any:
    return yaml.safe_load(text) if text != "" else ""


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Apply ``a.b.c=value`` overrides (values parsed as YAML) to a plain config dict."""
    data = copy.deepcopy(data)
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"override {item!r}: expected key=value (e.g. optim.lr=1e-4)")
        key, value = item.split("=", 1)
        node = data
        parts = key.strip().split(".")
        for part in parts[:-1]:
            if isinstance(node, list):
                node = node[int(part)]
            else:
                node = node.setdefault(part, {})
        last = parts[-1]
        if isinstance(node, list):
            node[int(last)] = _parse_value(value)
        else:
            node[last] = _parse_value(value)
    return data


def load_config(path: str | Path | None = None, overrides: list[str] | None = None, **data_defaults) -> TrainConfig:
    """Read a YAML config (or start empty), apply overrides, validate into a :class:`TrainConfig`."""
    data: dict = dict(data_defaults)
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"config not found: {path}")
        loaded = yaml.safe_load(path.read_text()) or {}
        if not isinstance(loaded, dict):
            raise ValueError(f"{path}: a config must be a YAML mapping")
        data.update(loaded)
    data = apply_overrides(data, overrides or [])
    # YAML reads 1e-4 as a string: coerce the float fields.
    for section, keys in (("optim", ("lr", "eps", "weight_decay", "warmup_ratio", "warmup_start_factor", "grad_clip")),
                          ("rl", ("clip_range", "adv_clip", "adv_eps", "kl_beta", "sft_lambda", "eta", "timestep_fraction",
                                  "guidance_scale")),
                          ("lora", ("alpha", "dropout")),
                          ("model", ("condition_dropout",))):
        for key in keys:
            if isinstance(data.get(section), dict) and isinstance(data[section].get(key), str):
                data[section][key] = float(data[section][key])
    return _build(TrainConfig, data, str(path) if path else "config")
