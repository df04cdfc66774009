"""The fake ``tensorrt`` module (tests/fake_tensorrt) behaves like TensorRT's Python API where our code depends on it.

Specification: the whole flow (parse -> profile -> build -> deserialize -> context -> shapes -> addresses of CPU torch
tensors -> execute_async_v3) gives ONNX Runtime's outputs; each misuse fails the way TensorRT fails (False / None with
a logged error, or the binding's exception): a shape outside the profile, a missing address, an engine from another
version, an operator or opset too new for the parser, a precision flag on a strongly typed 10.x network, BuilderFlag.FP16
on 11.x. Behaviours and their sources: tests/fake_tensorrt/README.md.
"""

import sys

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from _fake_trt import install
from onnx import TensorProto, helper, numpy_helper

WEIGHT = np.random.default_rng(0).standard_normal((4, 3)).astype(np.float32)
BIAS = np.arange(3, dtype=np.float32)


def _linear_model(opset: int = 17, elem_type: int = TensorProto.FLOAT) -> onnx.ModelProto:
    """y = x @ W + b with a dynamic batch axis."""
    x = helper.make_tensor_value_info("x", elem_type, ["batch", 4])
    y = helper.make_tensor_value_info("y", elem_type, ["batch", 3])
    to = {TensorProto.FLOAT: np.float32, TensorProto.FLOAT16: np.float16}.get(elem_type, np.float32)
    nodes = [helper.make_node("MatMul", ["x", "w"], ["h"], name="matmul"),
             helper.make_node("Add", ["h", "b"], ["y"], name="add")]
    if elem_type == TensorProto.BFLOAT16:  # bf16 weights via casts (numpy has no bf16)
        nodes = [helper.make_node("Cast", ["w32"], ["w"], to=elem_type), helper.make_node("Cast", ["b32"], ["b"],
                 to=elem_type)] + nodes
        inits = [numpy_helper.from_array(WEIGHT, "w32"), numpy_helper.from_array(BIAS, "b32")]
    else:
        inits = [numpy_helper.from_array(WEIGHT.astype(to), "w"), numpy_helper.from_array(BIAS.astype(to), "b")]
    graph = helper.make_graph(nodes, "linear", [x], [y], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=9)


def _save(model: onnx.ModelProto, path) -> str:
    """With the weights as external data beside the file, like the exporter writes them."""
    onnx.save(model, path, save_as_external_data=True, all_tensors_to_one_file=True, location=path.name + ".data",
              size_threshold=0)
    return str(path)


def _network(trt, path: str, *, strongly_typed: bool = True):
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    flags = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED) if strongly_typed else 0
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    return logger, builder, network, parser, parser.parse_from_file(path)


def _build(trt, path: str, profiles: dict, *, strongly_typed: bool = True, flags=()):
    logger, builder, network, parser, parsed = _network(trt, path, strongly_typed=strongly_typed)
    assert parsed, [str(parser.get_error(i)) for i in range(parser.num_errors)]
    config = builder.create_builder_config()
    config.builder_optimization_level = 3
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, 1 << 28)
    profile = builder.create_optimization_profile()
    for name, (low, opt, high) in profiles.items():
        profile.set_shape(name, low, opt, high)
    assert config.add_optimization_profile(profile) == 0
    for flag in flags:
        config.set_flag(flag)
    return builder.build_serialized_network(network, config)


@pytest.fixture
def linear_onnx(tmp_path):
    return _save(_linear_model(), tmp_path / "linear.onnx")


@pytest.fixture
def trt(monkeypatch):
    return install(monkeypatch, version="10.15.1")


def _run(trt, plan, feeds: dict[str, torch.Tensor], outputs: dict[str, torch.Tensor]):
    engine = trt.Runtime(trt.Logger()).deserialize_cuda_engine(plan)
    context = engine.create_execution_context()
    for name, tensor in feeds.items():
        assert context.set_input_shape(name, tuple(tensor.shape))
        assert context.set_tensor_address(name, tensor.data_ptr())
    for name, tensor in outputs.items():
        assert context.set_tensor_address(name, tensor.data_ptr())
    return context.execute_async_v3(0)


def test_the_full_flow_on_cpu_torch_tensors_gives_onnx_runtimes_outputs(trt, linear_onnx):
    plan = _build(trt, linear_onnx, {"x": ((1, 4), (2, 4), (8, 4))})
    assert isinstance(plan, trt.IHostMemory) and plan.nbytes == len(bytes(plan)) == len(memoryview(plan))
    engine = trt.Runtime(trt.Logger()).deserialize_cuda_engine(bytes(plan))
    names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
    assert names == ["x", "y"]
    assert [engine.get_tensor_mode(n) for n in names] == [trt.TensorIOMode.INPUT, trt.TensorIOMode.OUTPUT]
    assert engine.get_tensor_dtype("y") == trt.DataType.FLOAT
    assert engine.get_tensor_shape("x") == (-1, 4)
    assert engine.get_tensor_profile_shape("x", 0) == [(1, 4), (2, 4), (8, 4)]
    assert engine.num_optimization_profiles == 1
    context = engine.create_execution_context()
    assert not context.all_input_dimensions_specified
    assert context.get_tensor_shape("y") == (-1, 3)  # unknown until every input shape is set
    x = torch.randn(5, 4)
    assert context.set_input_shape("x", (5, 4))
    assert context.all_input_dimensions_specified and context.get_tensor_shape("y") == (5, 3)
    y = torch.full(tuple(context.get_tensor_shape("y")), float("nan"))
    assert context.set_tensor_address("x", x.data_ptr()) and context.set_tensor_address("y", y.data_ptr())
    assert context.get_tensor_address("y") == y.data_ptr()
    assert context.execute_async_v3(0)  # any stream handle; the fake runs synchronously
    reference = ort.InferenceSession(linear_onnx, providers=["CPUExecutionProvider"]).run(None, {"x": x.numpy()})[0]
    np.testing.assert_allclose(y.numpy(), reference, rtol=1e-6, atol=1e-6)
    assert engine.serialize() == bytes(plan)  # re-serializing gives the same engine


def test_a_shape_outside_the_profile_is_refused_with_a_logged_error(trt, linear_onnx, capsys):
    context = trt.Runtime(trt.Logger()).deserialize_cuda_engine(
        _build(trt, linear_onnx, {"x": ((1, 4), (2, 4), (8, 4))})).create_execution_context()
    assert not context.set_input_shape("x", (9, 4))
    assert not context.set_input_shape("x", (2, 5))  # a static dimension changed
    errors = trt.fake_messages()
    assert "satisfyProfile Runtime dimension does not satisfy any optimization profile" in errors[0]
    assert "Static dimension mismatch" in errors[1]
    assert "[TRT] [E] IExecutionContext::setInputShape" in capsys.readouterr().err  # printed like the real logger
    assert not context.all_input_dimensions_specified


def test_execute_without_an_address_fails_and_names_the_tensor(trt, linear_onnx):
    context = trt.Runtime(trt.Logger()).deserialize_cuda_engine(
        _build(trt, linear_onnx, {"x": ((1, 4), (2, 4), (8, 4))})).create_execution_context()
    assert not context.execute_async_v3(0)
    assert "Following input tensors' dimensions are not specified: x" in trt.fake_messages()[-1]
    x = torch.randn(2, 4)
    context.set_input_shape("x", (2, 4))
    assert not context.execute_async_v3(0)
    assert "Address is not set for input tensor x" in trt.fake_messages()[-1]
    context.set_tensor_address("x", x.data_ptr())
    assert not context.execute_async_v3(0)
    assert "Neither address or allocator is set for output tensor y" in trt.fake_messages()[-1]
    assert not context.set_tensor_address("z", x.data_ptr())
    with pytest.raises(TypeError, match="stream_handle"):
        context.execute_async_v3(None)


def test_an_engine_from_another_version_or_garbage_bytes_is_refused(monkeypatch, trt, linear_onnx):
    plan = _build(trt, linear_onnx, {"x": ((1, 4), (2, 4), (8, 4))})
    runtime = trt.Runtime(trt.Logger())
    assert runtime.deserialize_cuda_engine(b"not an engine") is None
    assert "Magic tag does not match" in trt.fake_messages()[-1]
    monkeypatch.setattr(trt, "__version__", "10.14.1")
    assert runtime.deserialize_cuda_engine(plan) is None
    assert "Version tag does not match. Note: Current Version: 10.14.1, Serialized Engine Version: 10.15.1" in (
        trt.fake_messages()[-1])


def _attention_model(op: str) -> onnx.ModelProto:
    """A single opset-23 node: Attention(Q, K, V) or RMSNormalization(X, scale)."""
    if op == "Attention":
        inputs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, [1, 2, 3, 4]) for n in "qkv"]
        node = helper.make_node("Attention", ["q", "k", "v"], ["y"], name="attn")
        output = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2, 3, 4])
    else:
        inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4])]
        node = helper.make_node("RMSNormalization", ["x", "scale"], ["y"], name="norm", axis=-1)
        output = helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 4])
    scale = [numpy_helper.from_array(np.ones(4, np.float32), "scale")] if op != "Attention" else []
    graph = helper.make_graph([node], "g", inputs, [output], scale)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 23)], ir_version=10)


@pytest.mark.parametrize(("op", "too_old", "first"), [("Attention", "10.13.0", "10.14.1"),
                                                      ("RMSNormalization", "10.14.1", "10.15.1")])
def test_an_operator_newer_than_the_parser_fails_the_parse_naming_the_node(monkeypatch, tmp_path, op, too_old, first):
    path = _save(_attention_model(op), tmp_path / f"{op}.onnx")
    trt = install(monkeypatch, version=too_old)
    *_, network, parser, parsed = _network(trt, path)
    assert not parsed and parser.num_errors == 1
    error = parser.get_error(0)
    assert error.code() == trt.ErrorCode.INVALID_NODE and error.node() == 0 and error.node_operator() == op
    assert str(error).startswith(f"In node 0 with name: {'attn' if op == 'Attention' else 'norm'} and operator: {op} "
                                 "(checkFallbackPluginImporter): INVALID_NODE")
    assert not parser.supports_operator(op)
    parser.clear_errors()
    assert parser.num_errors == 0 and parser.get_error(0) is None
    monkeypatch.setattr(trt, "__version__", first)
    assert _network(trt, path)[-1]
    reference = ort.InferenceSession(path, providers=["CPUExecutionProvider"])  # the same model runs in ORT
    assert reference.get_outputs()[0].name == "y"


def test_an_opset_newer_than_the_parser_fails_the_parse(monkeypatch, tmp_path):
    path = _save(_linear_model(opset=24), tmp_path / "opset24.onnx")
    trt = install(monkeypatch, version="10.14.1")
    *_, parser, parsed = _network(trt, path)
    assert not parsed and "opset 24 is outside the opsets 9..23" in parser.get_error(0).desc()
    monkeypatch.setattr(trt, "__version__", "10.15.1")
    assert _network(trt, path)[-1]


def test_a_precision_flag_on_a_strongly_typed_10x_network_fails_the_build(trt, linear_onnx):
    profile = {"x": ((1, 4), (2, 4), (8, 4))}
    assert _build(trt, linear_onnx, profile, flags=[trt.BuilderFlag.FP16]) is None
    assert trt.fake_messages()[-1] == ("IBuilder::buildSerializedNetwork: Error Code 3: API Usage Error (Parameter "
                                       "check failed, condition: !config.getFlag(BuilderFlag::kFP16). )")
    weakly_typed = _build(trt, linear_onnx, profile, strongly_typed=False, flags=[trt.BuilderFlag.FP16])
    engine = trt.Runtime(trt.Logger()).deserialize_cuda_engine(weakly_typed)
    assert engine.fake_header["builder_flags"] == ["FP16", "TF32"] and not engine.fake_header["strongly_typed"]


def test_tensorrt_11_has_no_precision_builder_flags_and_is_always_strongly_typed(monkeypatch, linear_onnx):
    trt = install(monkeypatch, version="11.4.0")
    for name in ("FP16", "BF16", "INT8", "FP8", "OBEY_PRECISION_CONSTRAINTS"):
        with pytest.raises(AttributeError, match=f"'tensorrt.tensorrt.BuilderFlag' has no attribute '{name}'"):
            getattr(trt.BuilderFlag, name)
    assert "FP16" not in trt.BuilderFlag.__members__ and trt.BuilderFlag.TF32 in list(trt.BuilderFlag)
    with pytest.raises(AttributeError, match="EXPLICIT_BATCH"):
        _ = trt.NetworkDefinitionCreationFlag.EXPLICIT_BATCH
    *_, network, _, parsed = _network(trt, linear_onnx, strongly_typed=False)  # flags=0: still strongly typed
    assert parsed and network.get_flag(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    x, y = torch.randn(3, 4), torch.empty(3, 3)
    plan = _build(trt, linear_onnx, {"x": ((1, 4), (2, 4), (8, 4))}, strongly_typed=False)
    assert _run(trt, plan, {"x": x}, {"y": y})
    np.testing.assert_allclose(y.numpy(), x.numpy() @ WEIGHT + BIAS, rtol=1e-5, atol=1e-5)
    monkeypatch.setattr(trt, "__version__", "10.15.1")  # read at every access
    assert trt.BuilderFlag.FP16.name == "FP16"


def test_profiles_are_validated_like_tensorrt(trt, linear_onnx):
    logger, builder, network, _, parsed = _network(trt, linear_onnx)
    config = builder.create_builder_config()
    assert builder.build_serialized_network(network, config) is None
    assert "Network has dynamic or shape inputs, but no optimization profile has been defined" in (
        trt.fake_messages()[-1])
    profile = builder.create_optimization_profile()
    with pytest.raises(RuntimeError, match="Shape provided for opt is inconsistent with other shapes"):
        profile.set_shape("x", (2, 4), (1, 4), (8, 4))
    assert config.add_optimization_profile(profile) == -1  # min set, opt and max not: not a valid profile
    with pytest.raises(RuntimeError, match="Shape provided for min is inconsistent"):
        builder.create_optimization_profile().set_shape("x", (-1, 4), (1, 4), (8, 4))
    wrong_static = builder.create_optimization_profile()
    wrong_static.set_shape("x", (1, 5), (2, 5), (8, 5))
    assert wrong_static.get_shape("x") == [(1, 5), (2, 5), (8, 5)]
    assert config.add_optimization_profile(wrong_static) == 0
    assert builder.build_serialized_network(network, config) is None
    assert "x: for dimension number 1 in profile 0 does not match network definition" in trt.fake_messages()[-1]
    config.builder_optimization_level = 9
    assert config.builder_optimization_level == 3 and "level must be in 0..5" in trt.fake_messages()[-1]


def test_the_timing_cache_round_trips_and_is_reused(trt, linear_onnx, tmp_path):
    logger, builder, network, _, _ = _network(trt, linear_onnx)

    def config_with(cache_bytes: bytes, *, strict: bool):
        config = builder.create_builder_config()
        profile = builder.create_optimization_profile()
        profile.set_shape("x", (1, 4), (2, 4), (8, 4))
        config.add_optimization_profile(profile)
        if strict:
            config.set_flag(trt.BuilderFlag.ERROR_ON_TIMING_CACHE_MISS)
        assert config.set_timing_cache(config.create_timing_cache(cache_bytes), ignore_mismatch=False)
        return config

    assert builder.build_serialized_network(network, config_with(b"", strict=True)) is None  # every layer misses
    config = config_with(b"", strict=False)
    assert builder.build_serialized_network(network, config) is not None
    saved = bytes(config.get_timing_cache().serialize())
    assert builder.build_serialized_network(network, config_with(saved, strict=True)) is not None  # all hits
    assert config_with(b"garbage", strict=False).get_timing_cache().serialize() != saved  # unreadable -> empty
    assert "The timing cache will not be used!" in trt.fake_messages()[-1]
    with pytest.raises(TypeError, match="ITimingCache"):
        config.set_timing_cache(saved, ignore_mismatch=False)


def test_a_bf16_engine_builds_but_onnx_runtime_on_the_cpu_cannot_run_it(trt, tmp_path):
    path = _save(_linear_model(opset=20, elem_type=TensorProto.BFLOAT16), tmp_path / "bf16.onnx")
    plan = _build(trt, path, {"x": ((1, 4), (2, 4), (8, 4))})
    engine = trt.Runtime(trt.Logger()).deserialize_cuda_engine(plan)
    assert engine.get_tensor_dtype("x") == trt.DataType.BF16
    x, y = torch.randn(2, 4, dtype=torch.bfloat16), torch.empty(2, 3, dtype=torch.bfloat16)
    assert not _run(trt, plan, {"x": x}, {"y": y})
    assert "(fake) ONNX Runtime cannot run this engine on the CPU" in trt.fake_messages()[-1]


def test_install_swaps_the_module_in_and_back_out():
    before = {name: module for name, module in sys.modules.items() if name.split(".")[0] == "tensorrt"}
    with pytest.MonkeyPatch.context() as patch:
        trt = install(patch, version="11.4.0")
        import tensorrt

        assert tensorrt is trt and trt.__version__ == "11.4.0" and trt.fake_log == []
        with pytest.raises(ValueError, match="version must look like"):
            install(patch, version="11")
    assert {name: module for name, module in sys.modules.items() if name.split(".")[0] == "tensorrt"} == before


# -- one real stage -----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def vae_decoder(tiny_t2i_export):
    return tiny_t2i_export / "vae_decoder.onnx"  # the session's tiny export (read only)


def test_an_exported_stage_runs_through_the_fake_engine_like_onnx_runtime(monkeypatch, vae_decoder):
    trt = install(monkeypatch, version="10.15.1")
    plan = _build(trt, str(vae_decoder), {"latents": ((1, 16, 8, 8), (1, 16, 8, 8), (1, 16, 16, 16))})
    latents = torch.randn(1, 16, 8, 12, generator=torch.Generator().manual_seed(0))
    engine = trt.Runtime(trt.Logger()).deserialize_cuda_engine(plan)
    context = engine.create_execution_context()
    assert context.set_input_shape("latents", tuple(latents.shape))
    pixels = torch.empty(tuple(context.get_tensor_shape("pixels")))
    assert pixels.shape == (1, 3, 64, 96)
    assert _run(trt, plan, {"latents": latents}, {"pixels": pixels})
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    reference = ort.InferenceSession(str(vae_decoder), options, providers=["CPUExecutionProvider"])
    np.testing.assert_array_equal(pixels.numpy(), reference.run(None, {"latents": latents.numpy()})[0])
    # The exporter writes opset 23 with the fused Attention operator where it can: a TensorRT older than 10.14
    # cannot parse that graph, and the parser names the node.
    ops = {node.op_type for node in onnx.load(str(vae_decoder), load_external_data=False).graph.node}
    monkeypatch.setattr(trt, "__version__", "10.13.0")
    *_, parser, parsed = _network(trt, str(vae_decoder))
    if "Attention" in ops:
        assert not parsed and parser.get_error(0).node_operator() == "Attention"
    else:  # the recorded fallback (opset 20, attention decomposed) parses on 10.0-10.13 too
        assert parsed
