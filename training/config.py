"""Training configuration: one YAML file per stage x scale, overridable with ``key.sub=value`` arguments."""

from __future__ import annotations

import copy
import math
import types
import typing
from dataclasses import MISSING, asdict, dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any

import yaml

__all__ = [
    "DataConfig",
    "EMAConfig",
    "EvalConfig",
    "LoraConfigSpec",
    "ModelSpec",
    "OptimConfig",
    "RLConfig",
    "SourceConfig",
    "TeacherConfig",
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
    flow_weight: float = 1.0  # weight of DeepGen's flow-matching loss; 0 = the teacher's feature loss alone (no DiT)
    condition_dropout: float = 0.1
    image_size: int | None = None
    # dtype of the frozen weights (VLM base, VAE, frozen DiT): auto = the compute dtype (bf16 when the run autocasts
    # to bf16: trainer.precision bf16, or auto on CUDA; else fp32) | bf16 | fp16 | fp32. Trainable weights stay fp32.
    frozen_dtype: str = "auto"


@dataclass
class SourceConfig:
    """One data source: a registered kind (``training.data.register_source``; built in: manifest, webdataset) and
    what its factory needs; ``options`` are the kind's own settings."""

    name: str
    kind: str
    task: str = "t2i"
    path: str | None = None
    repeat: int = 1
    seed: int = 0  # for sources that draw their samples
    options: dict[str, Any] = field(default_factory=dict)


@dataclass
class TeacherConfig:
    """A teacher for stages 1-2 (not in DeepGen's recipe): a registered kind (``training.teacher.register_teacher``)
    that gives a velocity target and / or a feature loss on the bridge's output; ``options`` are the kind's own."""

    kind: str
    target: bool = True  # its velocity replaces the target eps - x0
    features: float = 0.0  # weight of its feature loss on the bridge's output (0 = off)
    options: dict[str, Any] = field(default_factory=dict)


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
class EMAConfig:
    """``trainer.ema``: an fp32 exponential moving average of the trainable weights (``training.ema``)."""

    decay: float = 0.9999
    every: int = 1  # update the average after every N-th optimizer step
    start: int = 0  # until this optimizer step the average is a copy of the weights (no averaging of the start)
    save_pipeline: str = "both"  # the final pipeline: both (pipeline/ raw, pipeline_ema/) | ema (pipeline/) | raw

    def __post_init__(self) -> None:
        if not 0.0 <= self.decay < 1.0:
            raise ValueError(f"trainer.ema.decay must be in [0, 1), got {self.decay}")
        if self.every < 1:
            raise ValueError(f"trainer.ema.every must be >= 1, got {self.every}")
        if self.start < 0:
            raise ValueError(f"trainer.ema.start must be >= 0, got {self.start}")
        if self.save_pipeline not in ("both", "ema", "raw"):
            raise ValueError(f"trainer.ema.save_pipeline must be one of both, ema, raw, got {self.save_pipeline!r}")


@dataclass
class EvalConfig:
    """``trainer.eval``: what ``trainer.eval_every`` renders and scores (``training.evaluate_during``). The prompts
    come from ``prompts``, a ``prompt_file`` (.txt / .jsonl) or a registered ``benchmark`` (first ``limit``)."""

    prompts: list[str] = field(default_factory=list)
    prompt_file: str | None = None
    benchmark: str | None = None
    limit: int | None = None  # at most this many prompts (of any of the three)
    seed: int = 0  # prompt i starts from the noise of torch.Generator().manual_seed(seed + i)
    steps: int = 20
    guidance_scale: float | None = None  # None: the model's default
    height: int | None = None  # None: data.image_size
    width: int | None = None
    batch_size: int = 8
    evaluators: list[str] = field(default_factory=list)  # registered names (evaluation.register_evaluator)
    evaluator_options: dict[str, Any] = field(default_factory=dict)  # build_evaluator(name, **options)
    use_ema: bool = True  # render with the EMA weights when trainer.ema is on

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "limit", "height", "width"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"trainer.eval.{name} must be >= 1, got {value}")


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
    # Where metrics go: jsonl (out/metrics.jsonl, always written) and / or tensorboard (out/tensorboard; an error
    # when the package is missing). None: jsonl, plus tensorboard when it is importable.
    log_to: list[str] | None = None
    tensorboard: bool | None = None  # deprecated: false = log_to [jsonl]; true = the default
    ema: EMAConfig | None = None  # off by default
    eval_every: int = 0  # render trainer.eval's prompts (and score them) every N optimizer steps; 0 = off
    eval: EvalConfig = field(default_factory=EvalConfig)

    def __post_init__(self) -> None:
        if self.log_to is not None:
            unknown = [sink for sink in self.log_to if sink not in ("jsonl", "tensorboard")]
            if unknown:
                raise ValueError(f"trainer.log_to: unknown {unknown}; accepted: jsonl, tensorboard")
            if "jsonl" not in self.log_to:
                raise ValueError(f"trainer.log_to: metrics.jsonl is always written (resume and the tests read it); "
                                 f"include jsonl, got {self.log_to}")
        if self.eval_every < 0:
            raise ValueError(f"trainer.eval_every must be >= 0 (0 = off), got {self.eval_every}")
        if self.tensorboard is not None:
            import warnings

            warnings.warn("trainer.tensorboard is deprecated; use trainer.log_to: [jsonl, tensorboard] or [jsonl]",
                          DeprecationWarning, stacklevel=2)
            if self.log_to is None and not self.tensorboard:  # true keeps the default: tensorboard if importable
                self.log_to = ["jsonl"]


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
    teacher: TeacherConfig | None = None
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    rl: RLConfig | None = None
    out: str = "runs/train"

    def __post_init__(self) -> None:
        if self.stage not in STAGES:
            raise ValueError(f"stage must be one of {STAGES}, got {self.stage!r}")
        features = self.teacher.features if self.teacher is not None else 0.0
        if features < 0:
            raise ValueError(f"teacher.features must be >= 0, got {features}")
        if self.model.flow_weight < 0:
            raise ValueError(f"model.flow_weight must be >= 0, got {self.model.flow_weight}")
        if self.model.flow_weight == 0 and features == 0:
            raise ValueError("model.flow_weight: 0 leaves no loss; it needs teacher.features > 0 (the feature loss "
                             "alone)")
        if self.model.flow_weight == 0 and self.stage != "align":
            raise ValueError(f"model.flow_weight: 0 (no DiT pass) is for stage 'align' only, got stage {self.stage!r}")

    def to_dict(self) -> dict:
        return asdict(self)


# Values a key accepts beyond its type (checked when a config is loaded, so a typo fails before any model is built).
CHOICES = {
    "optim.schedule": ("cosine", "constant"),
    "trainer.precision": ("auto", "fp32", "bf16"),
    "trainer.distributed": ("auto", "none", "ddp", "fsdp"),
    "rl.logprob": ("mean_squared", "gaussian"),
    "rl.sampler": ("cps", "flow_grpo"),
    "rl.advantages": ("gdpo", "grpo"),
    "rl.update_mode": ("per_rollout", "per_timestep"),
}  # data.sources.*.kind / task: checked by training.data.build_sources
AT_LEAST_ONE = ("data.batch_size", "optim.grad_accum", "trainer.checkpoint_every", "trainer.log_every", "rl.group_size",
                "rl.prompts_per_step", "rl.num_steps", "rl.micro_batch", "rl.sft_batch_size", "data.sources.*.repeat")
NON_NEGATIVE = ("optim.lr", "optim.weight_decay", "optim.grad_clip", "optim.warmup_ratio", "model.condition_dropout")


def _type_name(hint) -> str:
    """A type hint in words, for error messages: float -> 'a number', list[str] -> 'a list of text', ..."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        names = [_type_name(a) for a in args if a is not type(None)]
        return " or ".join(names) + (" or null" if type(None) in args else "")
    if origin is list:
        return f"a list of {_type_name(args[0]).removeprefix('a ').removeprefix('an ')}s"
    if origin is tuple:
        return f"a list of {len(args)} numbers" if all(a is float for a in args) else f"a list of {len(args)} values"
    if origin is dict or is_dataclass(hint):
        return "a mapping"
    return {bool: "true or false", int: "an integer", float: "a number", str: "text"}.get(hint, getattr(hint, "__name__", str(hint)))


class _ConfigTypeError(ValueError):
    """A value of the wrong type; ``key`` is its dotted path (e.g. ``optim.lr``)."""

    def __init__(self, key: str, hint, value) -> None:
        self.key = key
        super().__init__(f"{key}: expected {_type_name(hint)}, got {value!r} ({_yaml_type(value)})")


def _yaml_type(value) -> str:
    return {bool: "boolean", int: "integer", float: "number", str: "text", list: "list", dict: "mapping",
            type(None): "null"}.get(type(value), type(value).__name__)


def _coerce(value, hint, key: str, where: str):
    """``value`` checked against the type hint ``hint`` (numbers written as text, such as 1e-4 which YAML reads as a
    string, become numbers); nested dataclasses are built with :func:`_build`."""
    if hint is Any:
        return value
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        options = [a for a in args if a is not type(None)]
        if len(options) == 1:
            try:
                return _coerce(value, options[0], key, where)
            except _ConfigTypeError as err:
                if err.key == key:  # name the whole union ("a number or null"), not its one option
                    raise _ConfigTypeError(key, hint, value) from None
                raise
        raise TypeError(f"config: unsupported type hint {hint} for {key}")  # pragma: no cover - not in our dataclasses
    if is_dataclass(hint):
        if not isinstance(value, dict):
            raise _ConfigTypeError(key, hint, value)
        return _build(hint, value, where, key)
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise _ConfigTypeError(key, hint, value)
        if origin is list:
            return [_coerce(v, args[0], f"{key}.{i}", f"{where}[{i}]") for i, v in enumerate(value)]
        if len(value) != len(args):
            raise _ConfigTypeError(key, hint, value)
        return tuple(_coerce(v, a, f"{key}.{i}", where) for i, (v, a) in enumerate(zip(value, args)))
    if origin is dict:
        if not isinstance(value, dict):
            raise _ConfigTypeError(key, hint, value)
        return {k: _coerce(v, args[1], f"{key}.{k}", where) for k, v in value.items()}
    if hint is bool:
        if not isinstance(value, bool):
            raise _ConfigTypeError(key, hint, value)
        return value
    if hint in (int, float):
        number = value
        if isinstance(value, str):
            try:
                number = float(value.strip())
            except ValueError:
                raise _ConfigTypeError(key, hint, value) from None
        if isinstance(number, bool) or not isinstance(number, (int, float)) or not math.isfinite(number):
            raise _ConfigTypeError(key, hint, value)
        if hint is int:
            if isinstance(number, float) and not number.is_integer():
                raise _ConfigTypeError(key, hint, value)
            return int(number)
        return float(number)
    if hint is str:
        if not isinstance(value, str):
            raise _ConfigTypeError(key, hint, value)
        return value
    return value  # pragma: no cover - every hint of our dataclasses is handled above


def _build(cls, data: Any, where: str, key: str = ""):
    """Instantiate a (nested) dataclass from plain data, naming unknown keys and values of the wrong type."""
    if data is None:
        return None
    if not isinstance(data, dict):
        raise ValueError(f"{where}: expected a mapping, got {type(data).__name__}")
    known = {f.name: f for f in fields(cls)}
    unknown = sorted(set(data) - set(known))
    if unknown:
        raise ValueError(f"{where}: unknown keys {unknown}; known: {sorted(known)}")
    missing = [name for name, f in known.items()
               if f.default is MISSING and f.default_factory is MISSING and name not in data]
    if missing:
        raise ValueError(f"{where}: missing keys {missing}")
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for name, value in data.items():
        path = f"{key}.{name}" if key else name
        if value is None and is_dataclass(_optional_inner(hints[name])) and known[name].default is MISSING:
            continue  # an empty section ("model:" with nothing under it) keeps its defaults
        kwargs[name] = _coerce(value, hints[name], path, f"{where}.{name}")
    return cls(**kwargs)


def _optional_inner(hint):
    """``X | None`` -> X; anything else unchanged."""
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    return args[0] if typing.get_origin(hint) in (typing.Union, types.UnionType) and len(args) == 1 else hint


def _check_values(cfg: TrainConfig) -> None:
    """The :data:`CHOICES`, :data:`AT_LEAST_ONE` and :data:`NON_NEGATIVE` rules, each error naming its key."""
    data = cfg.to_dict()

    def values(pattern: str) -> list[tuple[str, Any]]:
        """(dotted key, value) of every set value matching ``pattern``; ``*`` stands for each list index."""
        nodes = [("", data)]
        for part in pattern.split("."):
            found = []
            for key, node in nodes:
                if part == "*" and isinstance(node, list):
                    found += [(f"{key}.{i}", item) for i, item in enumerate(node)]
                elif isinstance(node, dict) and node.get(part) is not None:
                    found.append((f"{key}.{part}" if key else part, node[part]))
            nodes = found
        return nodes

    for pattern, choices in CHOICES.items():
        for key, value in values(pattern):
            if value not in choices:
                raise _ConfigValueError(key, f"must be one of {', '.join(choices)}, got {value!r}")
    for pattern in AT_LEAST_ONE:
        for key, value in values(pattern):
            if value < 1:
                raise _ConfigValueError(key, f"must be >= 1, got {value}")
    for pattern in NON_NEGATIVE:
        for key, value in values(pattern):
            if value < 0:
                raise _ConfigValueError(key, f"must be >= 0, got {value}")


class _ConfigValueError(ValueError):
    def __init__(self, key: str, message: str) -> None:
        self.key = key
        super().__init__(f"{key}: {message}")


def _parse_value(text: str, item: str) -> Any:
    if text == "":
        return ""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as err:
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise ValueError(f"override {item!r}: the value is not valid YAML ({problem})") from None


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Apply ``a.b.c=value`` overrides (values parsed as YAML) to a plain config dict."""
    data = copy.deepcopy(data)
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"override {item!r}: expected key=value (e.g. optim.lr=1e-4)")
        key, value = item.split("=", 1)
        parts = key.strip().split(".")
        if not all(parts):
            raise ValueError(f"override {item!r}: the key {key!r} has an empty part; expected e.g. optim.lr=1e-4")
        node = data
        for depth, part in enumerate(parts):
            here = ".".join(parts[: depth + 1])
            last = depth == len(parts) - 1
            if isinstance(node, list):
                if not part.lstrip("-").isdigit() or not -len(node) <= int(part) < len(node):
                    raise ValueError(f"override {item!r}: {here.rpartition('.')[0]} is a list of {len(node)}; "
                                     f"{part!r} is not an index into it")
                if last:
                    node[int(part)] = _parse_value(value, item)
                else:
                    node = node[int(part)]
            elif isinstance(node, dict):
                if last:
                    node[part] = _parse_value(value, item)
                else:
                    if node.get(part) is None:  # a new section, or an empty one in the file
                        node[part] = {}
                    node = node[part]
            else:
                raise ValueError(f"override {item!r}: {here.rpartition('.')[0]} is {_yaml_type(node)} "
                                 f"{node!r}, not a section with keys")
    return data


def _key_lines(text: str) -> dict[str, int]:
    """Dotted key (``optim.lr``, ``data.sources.0.kind``) -> its 1-based line in a YAML document."""
    lines: dict[str, int] = {}

    def walk(node, prefix: str) -> None:
        if isinstance(node, yaml.MappingNode):
            for key_node, value_node in node.value:
                key = f"{prefix}.{key_node.value}" if prefix else str(key_node.value)
                lines[key] = key_node.start_mark.line + 1
                walk(value_node, key)
        elif isinstance(node, yaml.SequenceNode):
            for i, item in enumerate(node.value):
                lines[f"{prefix}.{i}"] = item.start_mark.line + 1
                walk(item, f"{prefix}.{i}")

    try:
        walk(yaml.compose(text), "")
    except yaml.YAMLError:  # pragma: no cover - the text has already been parsed
        pass
    return lines


def _override_keys(overrides: list[str]) -> dict[str, str]:
    return {item.split("=", 1)[0].strip(): item for item in overrides if "=" in item}


def load_config(path: str | Path | None = None, overrides: list[str] | None = None, **data_defaults) -> TrainConfig:
    """Read a YAML config (or start empty), apply overrides, validate into a :class:`TrainConfig`."""
    data: dict = dict(data_defaults)
    lines: dict[str, int] = {}
    overrides = list(overrides or [])
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"config not found: {path}")
        text = path.read_text()
        try:
            loaded = yaml.safe_load(text) or {}
        except yaml.YAMLError as err:
            mark = getattr(err, "problem_mark", None) or getattr(err, "context_mark", None)
            where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark is not None else str(path)
            problem = getattr(err, "problem", None) or str(err).splitlines()[0]
            context = getattr(err, "context", None)
            raise ValueError(f"{where}: invalid YAML: {problem}" + (f" ({context})" if context else "")) from None
        if not isinstance(loaded, dict):
            raise ValueError(f"{path}: a config must be a YAML mapping")
        data.update(loaded)
        lines = _key_lines(text)
    data = apply_overrides(data, overrides)
    from_override = _override_keys(overrides)

    def located(err: ValueError) -> ValueError:
        """Prefix an error about ``err.key`` with where the value came from: its override, or FILE:LINE."""
        key = err.key
        parents = [key.rsplit(".", n)[0] for n in range(key.count(".") + 1)]
        for candidate in parents:
            if candidate in from_override:
                return ValueError(f"override {from_override[candidate]!r}: {err}")
        for candidate in parents:
            if candidate in lines:
                return ValueError(f"{path}:{lines[candidate]}: {err}")
        return ValueError(f"{path or 'config'}: {err}")

    try:
        cfg = _build(TrainConfig, data, str(path) if path else "config")
        _check_values(cfg)
    except (_ConfigTypeError, _ConfigValueError) as err:
        raise located(err) from None
    return cfg
