"""One JSON Lines reader (deepgen_components.jsonl) behind the training manifests, the benchmark prompt files and the
RL prompt pools: each names its file, line and argument on a bad line."""

from __future__ import annotations

import pytest
from deepgen_components.training.data import ManifestError, ManifestSource
from deepgen_components.training.prompts import read_prompt_file

from deepgen_components.evaluation.prompts import load_prompt_file
from deepgen_components.jsonl import read_objects


def test_read_objects_skips_blank_lines_and_numbers_lines_from_one(tmp_path):
    path = tmp_path / "a.jsonl"
    path.write_text('{"a": 1}\n\n  \n{"b": [2]}\n', encoding="utf-8")
    assert read_objects(path) == [(1, '{"a": 1}', {"a": 1}), (4, '{"b": [2]}', {"b": [2]})]


@pytest.mark.parametrize(("text", "message"), [
    ('{"a": 1}\n{"a": \n', r"--flag \S+a\.jsonl:2: not valid JSON"),
    ('{"a": 1}\n[1, 2]\n', r"--flag \S+a\.jsonl:2: expected a JSON object, got list"),
])
def test_read_objects_names_argument_file_and_line(tmp_path, text, message):
    path = tmp_path / "a.jsonl"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(KeyError, match=message):
        read_objects(path, argument="--flag", error=KeyError)


@pytest.mark.parametrize("loader", ["manifest", "eval_prompts", "rl_prompts"])
def test_every_caller_reports_a_bad_line_with_its_argument(tmp_path, loader):
    path = tmp_path / "p.jsonl"
    path.write_text('{"prompt": "a red circle", "image": "x.png", "caption": "a"}\n"just a string"\n',
                    encoding="utf-8")
    expected = {"manifest": (ManifestError, r"p\.jsonl:2: expected a JSON object, got str"),
                "eval_prompts": (ValueError, r"--prompts \S+p\.jsonl:2: expected a JSON object, got str"),
                "rl_prompts": (ValueError, r"rl\.prompt_files \S+p\.jsonl:2: expected a JSON object, got str")}
    error, message = expected[loader]
    with pytest.raises(error, match=message):
        if loader == "manifest":
            source = ManifestSource(path, image_size=64)
            source[0]
        elif loader == "eval_prompts":
            load_prompt_file(path)
        else:
            read_prompt_file(path)
