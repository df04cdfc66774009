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
