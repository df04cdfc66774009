"""The static TensorRT-compatibility gate: a graph's op types, opset and data types against the support table.

Specification: every operator carries the TensorRT version whose ONNX parser first imports it (with its source);
a graph needs the newest of its operators' versions and of the earliest version documented for its opset; an
operator newer than the asked version, an operator no version supports, an operator the table does not know and a
data type the operator does not take are each a readable reason; the default (opset 23) export needs the
TensorRT floor that pyproject.toml declares, the opset-20 fallback an older one.
"""

import tomllib
from pathlib import Path

import numpy as np
import onnx
import pytest
from deepgen_components.export.tensorrt_compat import (
    DEFAULT_TENSORRT_FLOOR,
    graph_requirements,
    parse_problems,
    support_table,
    version_tuple,
)
from onnx import TensorProto, helper

ROOT = Path(__file__).resolve().parents[1]


def _save(tmp_path, nodes, *, opset, inputs, outputs, initializers=(), name="graph.onnx"):
    graph = helper.make_graph(nodes, "g", inputs, outputs, initializer=list(initializers))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    path = tmp_path / name
    onnx.save(model, str(path))
    return path


def _tensor(name, elem, shape):
    return helper.make_tensor_value_info(name, elem, shape)


def _rms_norm_graph(tmp_path, opset=23):
    scale = onnx.numpy_helper.from_array(np.ones(8, np.float32), "scale")
    node = helper.make_node("RMSNormalization", ["x", "scale"], ["y"], axis=-1)
    return _save(tmp_path, [node], opset=opset, inputs=[_tensor("x", TensorProto.FLOAT, [2, 8])],
                 outputs=[_tensor("y", TensorProto.FLOAT, [2, 8])], initializers=[scale])


def _resize_graph(tmp_path, elem):
    scales = onnx.numpy_helper.from_array(np.array([1, 1, 2, 2], np.float32), "scales")
    node = helper.make_node("Resize", ["x", "", "scales"], ["y"], mode="nearest")
    return _save(tmp_path, [node], opset=20, inputs=[_tensor("x", elem, [1, 4, 8, 8])],
                 outputs=[_tensor("y", elem, [1, 4, 16, 16])], initializers=[scales], name=f"resize_{elem}.onnx")


def test_every_supported_operator_names_a_version_types_and_a_source_that_the_table_defines():
    table = support_table()
    assert table["table_floor"] == "10.0"
    for op, entry in table["ops"].items():
        assert entry["source"] in table["sources"], op
        if entry["since"] in ("none", "unknown"):
            continue
        version_tuple(entry["since"])
        assert entry["types"], op
    assert table["ops"]["Attention"]["since"] == "10.14"
    assert table["ops"]["RMSNormalization"]["since"] == table["ops"]["RotaryEmbedding"]["since"] == "10.15"


def test_versions_compare_as_dotted_numbers():
    assert version_tuple("10.15.1.29") > version_tuple("10.15") == version_tuple("10.15.0")
    assert version_tuple("10.9") < version_tuple("10.14") < version_tuple("11.0")
    for bad in ("ten", "10.x", "", None):
        with pytest.raises(ValueError, match="tensorrt_version"):
            version_tuple(bad)


def test_an_operator_above_the_floor_raises_the_minimum_and_older_parsers_reject_it(tmp_path):
    path = _rms_norm_graph(tmp_path)
    requirements = graph_requirements(path)
    assert requirements["min_tensorrt"] == "10.15"
    assert requirements["needs_newer"] == {"RMSNormalization": "10.15"}
    assert requirements["opset"] == 23 and requirements["dtypes"] == ["FP32"]
    problems = parse_problems(path, "10.14")
    assert any(p.startswith("RMSNormalization needs TensorRT >= 10.15") for p in problems)
    assert parse_problems(path, "10.15") == parse_problems(path, "10.15.1.29") == []


def test_a_graph_opset_beyond_a_documented_parser_range_is_a_problem(tmp_path):
    node = helper.make_node("Relu", ["x"], ["y"])
    path = _save(tmp_path, [node], opset=23, inputs=[_tensor("x", TensorProto.FLOAT, [4])],
                 outputs=[_tensor("y", TensorProto.FLOAT, [4])])
    assert graph_requirements(path)["min_tensorrt"] == "10.15"  # 10.0 documents opsets 9-20; 10.15 9-24
    assert any("opset 23" in p for p in parse_problems(path, "10.0"))


def test_an_unknown_operator_and_an_unsupported_operator_block_the_graph(tmp_path):
    custom = helper.make_node("MyFusedNorm", ["x"], ["y"], domain="com.example")
    unique = helper.make_node("Unique", ["y"], ["z"])
    path = _save(tmp_path, [custom, unique], opset=20, inputs=[_tensor("x", TensorProto.FLOAT, [4])],
                 outputs=[_tensor("z", TensorProto.FLOAT, None)])
    model = onnx.load(str(path))
    model.opset_import.append(helper.make_opsetid("com.example", 1))
    onnx.save(model, str(path))
    requirements = graph_requirements(path)
    assert requirements["min_tensorrt"] is None
    assert requirements["unknown_ops"] == ["com.example::MyFusedNorm"]
    assert any(u.startswith("Unique") for u in requirements["unsupported"])
    problems = parse_problems(path, "11.5")
    assert any("com.example::MyFusedNorm" in p for p in problems) and any(p.startswith("Unique") for p in problems)


def test_a_bf16_resize_needs_the_version_that_lists_bf16_while_fp32_resize_does_not(tmp_path):
    fp32 = graph_requirements(_resize_graph(tmp_path, TensorProto.FLOAT))
    bf16 = graph_requirements(_resize_graph(tmp_path, TensorProto.BFLOAT16))
    assert fp32["min_tensorrt"] == "10.0" and "Resize" not in fp32["needs_newer"]
    assert bf16["needs_newer"] == {"Resize": "10.15"} and "BF16" in bf16["dtypes"]
    assert any("Resize needs TensorRT >= 10.15" in p for p in parse_problems(_resize_graph(tmp_path, TensorProto.BFLOAT16), "10.14"))


def test_a_data_type_the_operator_does_not_take_is_unsupported(tmp_path):
    node = helper.make_node("Sin", ["x"], ["y"])
    path = _save(tmp_path, [node], opset=20, inputs=[_tensor("x", TensorProto.INT64, [4])],
                 outputs=[_tensor("y", TensorProto.INT64, [4])])
    assert graph_requirements(path)["unsupported"] == ["Sin on INT64: the table lists only FP32, FP16, BF16"]


def test_attention_with_3d_inputs_is_reported_because_tensorrt_needs_4d(tmp_path):
    node = helper.make_node("Attention", ["q", "k", "v"], ["y"], q_num_heads=2, kv_num_heads=2)
    inputs = [_tensor(n, TensorProto.FLOAT, [1, 5, 8]) for n in "qkv"]
    path = _save(tmp_path, [node], opset=23, inputs=inputs, outputs=[_tensor("y", TensorProto.FLOAT, [1, 5, 8])])
    assert any("rank 3" in u for u in graph_requirements(path)["unsupported"])


def test_bad_arguments_get_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="onnx_path"):
        graph_requirements(tmp_path / "missing.onnx")
    with pytest.raises(ValueError, match="tensorrt_version"):
        parse_problems(_rms_norm_graph(tmp_path), "latest")


def test_pyproject_tensorrt_floor_is_the_default_exports_floor():
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert extras["tensorrt"] == [f"tensorrt>={DEFAULT_TENSORRT_FLOOR}"]
    package_data = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    assert "data/*.json" in package_data["deepgen_components.export"]


@pytest.fixture(scope="module")
def tiny_dit_exports(tiny_t2i_export, tiny_dit_for_tensorrt_10_14):
    """The tiny DiT at opset 23 (the session's export) and at opset 20 (exported for TensorRT 10.14: the fallback)."""
    folder, manifest = tiny_dit_for_tensorrt_10_14
    assert manifest["stages"]["dit"]["opset"] == 20
    return {23: tiny_t2i_export / "dit.onnx", 20: folder / "dit.onnx"}


def test_the_default_export_needs_the_declared_floor_and_the_fallback_an_older_tensorrt(tiny_dit_exports):
    default = graph_requirements(tiny_dit_exports[23])
    assert default["min_tensorrt"] == DEFAULT_TENSORRT_FLOOR
    assert default["needs_newer"] == {"Attention": "10.14", "RMSNormalization": "10.15"}
    assert default["unsupported"] == [] and default["unknown_ops"] == []
    fallback = graph_requirements(tiny_dit_exports[20])
    assert version_tuple(fallback["min_tensorrt"]) < version_tuple(DEFAULT_TENSORRT_FLOOR)
    assert fallback["needs_newer"] == {} and fallback["unsupported"] == []
    assert parse_problems(tiny_dit_exports[23], "10.14") and parse_problems(tiny_dit_exports[20], "10.14") == []
