"""Test-wide setup.

Environment variables that the libraries read at import or decoration time are set here, before any
test module imports triton kernels, transformers or diffusers:

* ``TRITON_INTERPRET=1`` when no CUDA device is present, so the Triton kernels run in the interpreter on
  CPU tensors (it is read when ``@triton.jit`` decorates a kernel);
* ``HF_HUB_OFFLINE=1``: nothing may touch a model hub.
"""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module's tests (bit-for-bit comparisons and rollouts depend on the summation
    order), the previous count restored afterwards. Use with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def pipe():
    """The ``tiny`` preset as a pipeline, bar off, one per module (a module may define its own ``pipe``)."""
    from _pipelines import tiny_pipeline

    return tiny_pipeline()


@pytest.fixture(scope="module")
def saved(pipe, tmp_path_factory):
    """The module's ``pipe`` written by ``save_pretrained`` into a fresh folder."""
    path = tmp_path_factory.mktemp("saved") / "tiny"
    pipe.save_pretrained(path)
    return path


# -- shared tiny exports (session-wide: each costs seconds of dynamo export per stage) -----------------------------
# The tiny model at image size 64 and ranges 64..128 px, batch 1, without the parity gate (tests/test_export.py
# checks parity). Read-only by convention: a test that writes into an export copies it first (shutil.copytree).


def _tiny_export(folder, stages, **kwargs):
    from deepgen_components.export.exporter import export_model
    from deepgen_components.export.specs import ExportRanges

    from deepgen_components import DeepGenConfig, deepgen_tiny

    model = deepgen_tiny(seed=0, config=DeepGenConfig(image_size=64))
    return export_model(model, folder, stages=stages, ranges=ExportRanges(min_size=64, max_size=128, max_batch=1),
                        parity=False, progress=False, **kwargs)


@pytest.fixture(scope="session")
def tiny_t2i_export(tmp_path_factory):
    """condition_encoder + dit + vae_decoder of the tiny model, fp32, opset 23: the text-to-image runtimes' input."""
    folder = tmp_path_factory.mktemp("tiny_t2i_export") / "exported"
    _tiny_export(folder, ["condition_encoder", "dit", "vae_decoder"])
    return folder


@pytest.fixture(scope="session")
def tiny_dit_for_tensorrt_10_14(tmp_path_factory):
    """The tiny DiT exported for TensorRT 10.14, which cannot parse the opset-23 graph: the fallback (opset 20)."""
    folder = tmp_path_factory.mktemp("tiny_dit_trt1014") / "exported"
    return folder, _tiny_export(folder, ["dit"], tensorrt_version="10.14")
