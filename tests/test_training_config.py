"""Training configs (``deepgen_components.training.config``): one YAML per stage x scale, ``a.b=value`` overrides
parsed as YAML, unknown keys named in the error. The shipped configs carry the official recipe (reference §6-7)
at DeepGen 1.0 scale and a CPU-sized version of it for the tiny preset.
"""

from pathlib import Path

import deepgen_components.training as training_package
import pytest
from deepgen_components.training.config import TrainConfig, apply_overrides, load_config

CONFIGS = Path(training_package.__file__).parent / "configs"
SHAPES_CONFIGS = Path(training_package.__file__).resolve().parents[1] / "deepgen_components" / "shapes" / "configs"


def cycle(cfg: TrainConfig) -> dict[str, int]:
    return {src.task: src.repeat for src in cfg.data.sources}


# -- the shipped configs ----------------------------------------------------------------------------------


def test_deepgen1_stage1_config_is_the_official_alignment_recipe():
    cfg = load_config(CONFIGS / "align_deepgen1.yaml")
    assert cfg.stage == "align" and cfg.lora is None
    assert cycle(cfg) == {"edit": 1, "t2i": 3}  # one optimizer step sees one 1 edit : 3 T2I cycle
    assert cfg.optim.grad_accum == 4 and cfg.data.batch_size == 4
    assert cfg.optim.lr == 1e-4 and cfg.optim.betas == (0.9, 0.95) and cfg.optim.weight_decay == 0.05
    assert cfg.optim.warmup_ratio == 0.01 and cfg.optim.warmup_start_factor == 1e-5
    assert cfg.optim.schedule == "cosine" and cfg.optim.grad_clip == 1.0
    assert cfg.trainer.max_steps == 50_000  # 200k micro-batches / 4
    assert cfg.model.condition_dropout == 0.1 and cfg.data.image_size == 512


def test_deepgen1_stage2_config_is_the_official_sft_recipe():
    cfg = load_config(CONFIGS / "sft_deepgen1.yaml")
    assert cfg.stage == "sft"
    assert cycle(cfg) == {"edit": 1, "t2i": 2}
    assert cfg.optim.grad_accum == 3 and cfg.optim.lr == 5e-5
    assert cfg.trainer.max_steps == 133_334  # 400k micro-batches / 3, rounded up
    assert (cfg.lora.r, cfg.lora.alpha, cfg.lora.dropout, cfg.lora.init) == (64, 128.0, 0.05, "gaussian")
    assert cfg.model.init_from  # stage 2 starts from the stage-1 checkpoint
    assert cfg.trainer.distributed == "fsdp"


@pytest.mark.parametrize(
    ("name", "repeats"), [("align_tiny", {"edit": 1, "t2i": 3}), ("sft_tiny", {"edit": 1, "t2i": 2})]
)
def test_tiny_configs_keep_the_official_task_cycle_on_the_shapes_world(name, repeats):
    cfg = load_config(CONFIGS / f"{name}.yaml")
    assert cycle(cfg) == repeats
    assert {src.kind for src in cfg.data.sources} == {"shapes"}
    assert cfg.model.preset == "tiny" and cfg.data.image_size == 64
    assert cfg.trainer.max_steps == 50


# -- overrides ----------------------------------------------------------------------------------------------


def test_overrides_are_parsed_as_yaml_values():
    cfg = load_config(
        CONFIGS / "sft_tiny.yaml",
        ["optim.lr=5e-5", "data.batch_size=2", "trainer.tensorboard=false", "model.init_from=null",
         "data.sources.1.repeat=5", "lora.targets=[q_proj, v_proj]"],
    )
    assert cfg.optim.lr == 5e-5 and isinstance(cfg.optim.lr, float)
    assert cfg.data.batch_size == 2
    assert cfg.trainer.tensorboard is False
    assert cfg.model.init_from is None
    assert cfg.data.sources[1].repeat == 5 and cfg.data.sources[0].repeat == 1
    assert cfg.lora.targets == ["q_proj", "v_proj"]


def test_apply_overrides_does_not_modify_its_input():
    data = {"optim": {"lr": 1.0}}
    assert apply_overrides(data, ["optim.lr=2"]) == {"optim": {"lr": 2}}
    assert data == {"optim": {"lr": 1.0}}


def test_floats_written_like_1e_4_are_floats(tmp_path):
    # PyYAML reads "1e-4" (no dot) as a string; the loader coerces the float fields.
    path = tmp_path / "c.yaml"
    path.write_text("stage: align\noptim:\n  lr: 1e-4\n  warmup_start_factor: 1e-5\n"
                    "model:\n  condition_dropout: 1e-1\n")
    cfg = load_config(path)
    assert cfg.optim.lr == 1e-4 and cfg.optim.warmup_start_factor == 1e-5 and cfg.model.condition_dropout == 0.1


def test_defaults_are_the_official_shared_hyperparameters():
    cfg = TrainConfig()
    assert cfg.optim.betas == (0.9, 0.95) and cfg.optim.weight_decay == 0.05 and cfg.optim.grad_clip == 1.0
    assert cfg.optim.warmup_ratio == 0.01 and cfg.optim.warmup_start_factor == 1e-5 and cfg.optim.schedule == "cosine"


# -- errors ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("override", "named"),
    [
        ("optim.learning_rate=1e-4", r"align_tiny\.yaml\.optim: unknown keys \['learning_rate'\]"),
        ("trainer.max_step=3", r"align_tiny\.yaml\.trainer: unknown keys \['max_step'\]"),
        ("data.sources.0.repeats=2", r"align_tiny\.yaml\.data\.sources\[0\]: unknown keys \['repeats'\]"),
        ("epochs=3", r"align_tiny\.yaml: unknown keys \['epochs'\]"),
    ],
)
def test_an_unknown_key_is_named_with_its_section(override, named):
    with pytest.raises(ValueError, match=named):
        load_config(CONFIGS / "align_tiny.yaml", [override])


def test_an_unknown_key_in_a_file_names_the_file(tmp_path):
    path = tmp_path / "typo.yaml"
    path.write_text("stage: align\ntrainer:\n  chekpoint_every: 5\n")
    with pytest.raises(ValueError, match=rf"{path}\.trainer: unknown keys \['chekpoint_every'\]"):
        load_config(path)


def test_an_override_needs_an_equals_sign():
    with pytest.raises(ValueError, match="expected key=value"):
        load_config(CONFIGS / "align_tiny.yaml", ["optim.lr"])


def test_unknown_stage_missing_file_and_non_mapping_are_rejected(tmp_path):
    with pytest.raises(ValueError, match="stage must be one of"):
        load_config(CONFIGS / "align_tiny.yaml", ["stage=pretrain"])
    with pytest.raises(FileNotFoundError, match="config not found"):
        load_config(tmp_path / "missing.yaml")
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(ValueError, match="must be a YAML mapping"):
        load_config(tmp_path / "list.yaml")


def test_the_stage1_teacher_settings_are_checked():
    cfg = load_config(SHAPES_CONFIGS / "align_shapes.yaml")
    assert cfg.teacher.kind == "prompt_encoder" and cfg.teacher.options == {"base": "runs/shapes/base"}
    assert cfg.teacher.features == 1.0 and cfg.teacher.target is False
    assert load_config(CONFIGS / "align_tiny.yaml").teacher is None  # DeepGen's recipe: no teacher
    with pytest.raises(ValueError, match=r"teacher: missing keys \['kind'\]"):  # a feature weight needs a teacher
        load_config(CONFIGS / "align_tiny.yaml", ["teacher.features=1.0"])
    with pytest.raises(ValueError, match="teacher.features must be >= 0"):
        load_config(SHAPES_CONFIGS / "align_shapes.yaml", ["teacher.features=-1"])
    assert load_config(SHAPES_CONFIGS / "align_shapes.yaml").model.flow_weight == 0.0  # the feature loss alone
    assert load_config(CONFIGS / "align_tiny.yaml").model.flow_weight == 1.0  # DeepGen's loss by default
    with pytest.raises(ValueError, match="model.flow_weight must be >= 0"):
        load_config(SHAPES_CONFIGS / "align_shapes.yaml", ["model.flow_weight=-0.5"])
    with pytest.raises(ValueError, match="model.flow_weight: 0 leaves no loss"):
        load_config(SHAPES_CONFIGS / "align_shapes.yaml", ["teacher.features=0"])
    with pytest.raises(ValueError, match="model.flow_weight: 0 leaves no loss"):
        load_config(CONFIGS / "align_tiny.yaml", ["model.flow_weight=0"])
    with pytest.raises(ValueError, match="for stage 'align' only"):
        load_config(SHAPES_CONFIGS / "sft_shapes.yaml", ["model.flow_weight=0", "teacher.kind=prompt_encoder",
                                                 "teacher.features=1"])


def test_shapes_only_options_are_not_keys_of_the_generic_config():
    """The shapes world's settings live in its own entries: a source's ``options``, the teacher's ``options``."""
    from deepgen_components.training.config import ModelSpec, SourceConfig

    assert not {"teacher", "teacher_target", "teacher_features"} & set(ModelSpec.__dataclass_fields__)
    assert not {"foreground_weight", "edit_kinds", "length"} & set(SourceConfig.__dataclass_fields__)
    cfg = load_config(SHAPES_CONFIGS / "align_shapes.yaml")
    assert [src.options for src in cfg.data.sources] == [{"foreground_weight": 4.0}] * 2
    with pytest.raises(ValueError, match=r"data\.sources\[0\]: unknown keys \['foreground_weight'\]"):
        load_config(CONFIGS / "align_tiny.yaml", ["data.sources.0.foreground_weight=4"])
