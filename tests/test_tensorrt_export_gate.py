"""The TensorRT compatibility gate inside the export, and `deepgen export --engine`.

Specification: every stage's manifest entry records the minimum TensorRT its graph needs (from the compatibility
table, ``export/data/tensorrt_onnx_support.json``) and the manifest the maximum over stages; the default opset-23
export needs exactly the floor of pyproject's ``tensorrt`` extra (10.15: ``RMSNormalization``); with
``tensorrt_version`` older than that, a stage falls back to the decomposed opset-20 graph and the manifest says why;
``deepgen export --engine`` builds the engines ahead of time (here through the fake ``tensorrt`` of
tests/fake_tensorrt: TensorRT cannot be installed on our machines) and a second run keeps them.
"""

import json

import pytest
from _fake_trt import install
from deepgen_components.export.exporter import export_model
from deepgen_components.export.specs import ExportRanges
from deepgen_components.export.tensorrt_compat import DEFAULT_TENSORRT_FLOOR

from deepgen_components import DeepGenConfig, deepgen_tiny
from deepgen_components.cli import main

RANGES = ExportRanges(min_size=64, max_size=128, max_batch=1)


@pytest.fixture(scope="module")
def model():
    return deepgen_tiny(seed=0, config=DeepGenConfig(image_size=64))


def test_manifest_records_the_minimum_tensorrt_and_an_older_target_falls_back(
    model, tiny_t2i_export, tiny_dit_for_tensorrt_10_14, tmp_path
):
    default = json.loads((tiny_t2i_export / "manifest.json").read_text())
    entry = default["stages"]["dit"]
    assert entry["opset"] == 23 and entry["tensorrt"]["min_tensorrt"] == DEFAULT_TENSORRT_FLOOR
    assert "RMSNormalization" in entry["tensorrt"]["needs_newer"]
    assert default["min_tensorrt"] == DEFAULT_TENSORRT_FLOOR
    _, old = tiny_dit_for_tensorrt_10_14  # export_model(..., tensorrt_version="10.14")
    entry = old["stages"]["dit"]
    assert entry["opset"] == 20
    assert "TensorRT 10.14 cannot parse it" in entry["fallback"]["error"]
    assert "RMSNormalization" in entry["fallback"]["error"]
    assert entry["tensorrt"]["min_tensorrt"] == "10.0" and old["min_tensorrt"] == "10.0"
    with pytest.raises(ValueError, match="tensorrt_version"):
        export_model(model, tmp_path / "bad", stages=["dit"], ranges=RANGES, progress=False, tensorrt_version="ten")


def test_deepgen_export_engine_builds_ahead_of_time_and_keeps_up_to_date_engines(monkeypatch, tmp_path, capsys):
    install(monkeypatch)
    out = tmp_path / "exported"
    argv = ["export", "--preset", "tiny", "--out", str(out), "--stages", "vae_decoder", "--min-size", "64",
            "--max-size", "128", "--max-batch", "1", "--no-parity", "--quiet", "--engine"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert f"engine vae_decoder: {out}/engines/vae_decoder.engine" in printed
    assert ">=10.15" in printed
    sidecar = json.loads((out / "engines" / "vae_decoder.engine.json").read_text())
    assert sidecar["key"]["profiles"]["latents"][2] == [1, 16, 16, 16]
    # Re-export with other ranges: the engine no longer fits the ONNX file and the profiles, so it is rebuilt.
    assert main(argv[:-7] + ["--min-size", "64", "--max-size", "64", "--max-batch", "1", "--no-parity", "--quiet",
                             "--engine"]) == 0
    rebuilt = json.loads((out / "engines" / "vae_decoder.engine.json").read_text())
    assert rebuilt["key"]["profiles"]["latents"][2] == [1, 16, 8, 8]
    assert rebuilt["key"]["onnx_sha256"] != sidecar["key"]["onnx_sha256"] or rebuilt["key"] != sidecar["key"]
