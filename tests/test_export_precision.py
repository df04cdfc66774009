"""Export at another precision and from the model's own device; half-precision parity (tiny preset, CPU).

Specification: ``export_model(..., dtype=...)`` exports a cast copy of each stage (the caller's model is left as
it is) with fp32 islands (attention softmax, norm statistics; at opset 20 the decomposed ``Softmax`` is wrapped in
casts); fp16 / bf16 graphs are parity-checked against PyTorch at the same dtype within
``max(2 x |torch_half - torch_fp32|, floor)`` (fp16 on the ONNX Runtime CPU EP, bf16 on ``onnx.reference``,
since the CPU EP has no bf16 kernels); a graph of other weights fails that gate; inputs follow the module's
device; ``deepgen export --dtype float16`` works, and ``--device cuda`` on a GPU machine.
"""

import numpy as np
import pytest
import torch
from deepgen_components.export import parity
from deepgen_components.export.exporter import export_model
from deepgen_components.export.specs import ExportRanges, build_specs

from deepgen_components import DeepGenConfig, deepgen_tiny

RANGES = ExportRanges(min_size=64, max_size=128, max_batch=1)


@pytest.fixture(scope="module")
def model():
    return deepgen_tiny(seed=0, config=DeepGenConfig(image_size=64))


@pytest.fixture(scope="module")
def fp16_export(model, tmp_path_factory):
    before = {name: value.clone() for name, value in model.state_dict().items()}
    out = tmp_path_factory.mktemp("fp16")
    manifest = export_model(model, out, stages=["vision_encoder", "dit"], ranges=RANGES, progress=False,
                            dtype="float16")
    return out, manifest, before


@pytest.fixture(scope="module")
def bf16_export(model, tmp_path_factory):
    out = tmp_path_factory.mktemp("bf16")
    return out, export_model(model, out, stages=["vae_decoder"], ranges=RANGES, progress=False, dtype="bfloat16")


def test_float16_export_of_an_fp32_model_leaves_the_model_as_it_was(model, fp16_export):
    _, manifest, before = fp16_export
    assert manifest["dtype"] == "float16" and manifest["model_dtype"] == "float32" and manifest["device"] == "cpu"
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert all(torch.equal(before[name], value) for name, value in model.state_dict().items())
    inputs = {t["name"]: t["dtype"] for t in manifest["stages"]["dit"]["inputs"]}
    assert inputs["hidden_states"] == "float16" and inputs["timestep"] == "float32"


def test_float16_stages_keep_softmax_and_norm_statistics_in_fp32(fp16_export):
    for entry in fp16_export[1]["stages"].values():
        precision = entry["precision"]
        assert precision["attention_nodes"] > 0
        assert precision["attention_with_fp32_softmax"] == precision["attention_nodes"]
        assert precision["norms_with_fp32_statistics"] > 0
        assert precision["nodes_by_output_dtype"]["FLOAT16"] > precision["nodes_by_output_dtype"].get("FLOAT", 0)


def test_float16_parity_runs_on_the_cpu_ep_within_twice_pytorchs_own_fp16_error(fp16_export):
    for stage, entry in fp16_export[1]["stages"].items():
        assert entry["runnable_on_cpu_ep"], stage
        record = entry["parity"]
        assert record["passed"] and record["runtime"] == "onnxruntime CPUExecutionProvider"
        assert record["tolerance"] == parity.HALF_RULE and record["floor"] == 2.0**-9
        assert len(record["shapes"]) == 3
        for shape in record["shapes"]:
            for output in shape["outputs"].values():
                assert 0 < output["torch_vs_fp32"] < 1e-2  # fp16 costs PyTorch ~1e-3 here (measured)
                assert output["bound"] == max(2 * output["torch_vs_fp32"], 2.0**-9)
                assert output["relative"] <= output["bound"]


def test_bfloat16_parity_runs_on_the_reference_evaluator_where_the_cpu_ep_has_no_kernels(bf16_export):
    entry = bf16_export[1]["stages"]["vae_decoder"]
    assert not entry["runnable_on_cpu_ep"] and "NOT_IMPLEMENTED" in entry["cpu_ep_error"]
    record = entry["parity"]
    assert record["passed"] and record["runtime"] == "onnx.reference.ReferenceEvaluator"
    assert record["floor"] == 2.0**-6 and record["min_bound"] >= 2.0**-6
    assert 0 < record["max_relative"] <= 2 * record["max_torch_vs_fp32"] or record["max_relative"] <= 2.0**-6


def test_half_precision_gate_fails_a_graph_of_other_weights(fp16_export):
    out, _, _ = fp16_export
    other = deepgen_tiny(seed=1, config=DeepGenConfig(image_size=64))
    spec = build_specs(other, RANGES, ["vision_encoder"], "float16")["vision_encoder"]
    module = spec.module_factory().eval()
    reference = type(module)(other).eval()
    module = module.half()  # the other model in fp16; the file holds seed 0's weights
    with pytest.raises(parity.ParityError, match=r"vision_encoder: .*features at .*relative error"):
        parity.check_parity(spec, out / "vision_encoder.onnx", module, spec.parity_values(1),
                            reference_module=reference.float())
    with pytest.raises(ValueError, match="reference_module: a float16 stage is checked against its float32 module"):
        parity.check_parity(spec, out / "vision_encoder.onnx", module, spec.parity_values(1))


def test_inputs_follow_the_module_device_and_keep_their_half_dtype(model, fp16_export):
    assert parity.module_device(model.dit) == torch.device("cpu")
    half = np.ones((2, 3), np.float16)
    assert parity.to_torch(half).dtype == torch.float16
    import ml_dtypes

    brain = parity.to_torch(np.ones(2, ml_dtypes.bfloat16), device="cpu")
    assert brain.dtype == torch.bfloat16 and brain.device == torch.device("cpu")
    # The gate with the device given explicitly ("cpu") records exactly what the default (the parameters') gives.
    out, _, _ = fp16_export
    spec = build_specs(model, RANGES, ["vision_encoder"], "float16")["vision_encoder"]
    fp32 = spec.module_factory().eval()
    import copy

    fp16 = copy.deepcopy(fp32).half()
    points = spec.parity_values(1)
    default = parity.check_parity(spec, out / "vision_encoder.onnx", fp16, points, reference_module=fp32)
    explicit = parity.check_parity(spec, out / "vision_encoder.onnx", fp16, points, reference_module=fp32, device="cpu")
    assert default == explicit


def test_opset_20_half_export_runs_softmax_in_fp32(model, tmp_path):
    manifest = export_model(model, tmp_path, stages=["vision_encoder"], ranges=RANGES, progress=False,
                            dtype="float16", opset=20, fallback_opset=None, parity_points=1)
    precision = manifest["stages"]["vision_encoder"]["precision"]
    assert precision["attention_nodes"] == 0 and precision["softmax_nodes"] > 0
    assert precision["softmax_in_fp32"] == precision["softmax_nodes"]
    assert manifest["stages"]["vision_encoder"]["parity"]["passed"]


def test_export_refuses_an_unknown_dtype(model, tmp_path):
    with pytest.raises(ValueError, match="dtype: export supports float32, float16, bfloat16, got 'float64'"):
        export_model(model, tmp_path, dtype="float64", progress=False)


def test_cli_exports_float16_and_prints_the_derived_bound(tmp_path, capsys):
    from deepgen_components.cli import main

    out = tmp_path / "cli16"
    code = main(["export", "--preset", "tiny", "--out", str(out), "--stages", "vision_encoder", "--max-size", "256",
                 "--dtype", "float16", "--quiet"])
    printed = capsys.readouterr().out
    assert code == 0 and (out / "vision_encoder.onnx").is_file()
    assert "(float16 on cpu, 1 stages)" in printed and "torch float16 vs fp32" in printed


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_cli_exports_a_cuda_model_at_every_dtype(tmp_path, capsys, dtype):
    from deepgen_components.cli import main

    out = tmp_path / dtype
    code = main(["export", "--preset", "tiny", "--out", str(out), "--stages", "vision_encoder,dit", "--max-size", "256",
                 "--device", "cuda", "--dtype", dtype, "--quiet"])
    printed = capsys.readouterr()
    assert code == 0, printed.err
    assert f"({dtype} on cuda:0, 2 stages)" in printed.out
