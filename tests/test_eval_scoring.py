"""The evaluators of `deepgen eval`: OCR (real RapidOCR) on rendered text with known answers, CVTG-2K word accuracy
and NED arithmetic, the official-scorer command and its parsed output, the WISE-style judge over HTTP, CLIP."""

from __future__ import annotations

import json
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageFont

from deepgen_components.cli import main
from deepgen_components.evaluation import (
    PromptRecord,
    Sample,
    build_evaluator,
    cvtg_text_scores,
    parse_wise_answer,
    quoted_texts,
)

TOY = ["--preset", "tiny", "--steps", "2", "--height", "32", "--width", "32", "--quiet"]
FONT = Path("/usr/share/fonts/truetype/dejavu/DejaVuSans-Bold.ttf")


def _text_image(lines: list[str], size: int = 384) -> Image.Image:
    image = Image.new("RGB", (size, size), "white")
    draw = ImageDraw.Draw(image)
    font = ImageFont.truetype(str(FONT), 44) if FONT.exists() else ImageFont.load_default(size=44)
    for i, line in enumerate(lines):
        draw.text((24, 60 + i * 110), line, fill="black", font=font)
    return image


def test_cvtg_word_accuracy_and_ned_arithmetic():
    assert quoted_texts('a shop sign "OPEN NOW" and a \u201cSALE\u201d banner') == ["OPEN NOW", "SALE"]
    assert cvtg_text_scores("open now sale", ["OPEN NOW", "SALE"]) == (3, 3, 1.0)
    # 'open' found once; 'now' missing; NED over "open" vs "open now": 1 - 4/8
    assert cvtg_text_scores("Open", ["OPEN NOW"]) == (1, 2, 0.5)
    matched, words, ned = cvtg_text_scores("open open", ["OPEN"])  # one OCR word matches one target word
    assert (matched, words) == (1, 1) and ned == pytest.approx(1 - 5 / 9)
    assert cvtg_text_scores("", ["CAFE"]) == (0, 1, 0.0)


def test_ocr_evaluator_reads_rendered_text_with_known_answers():
    pytest.importorskip("rapidocr_onnxruntime")
    evaluator = build_evaluator("ocr")
    samples = [
        Sample(PromptRecord(0, "a", 'a sign that says "OPEN" above a door that says "PUSH"', "two"),
               [_text_image(["OPEN", "PUSH"])]),
        Sample(PromptRecord(1, "b", 'a poster with the words "HELLO WORLD"', "one"), [_text_image(["HELLO WORLD"])]),
        Sample(PromptRecord(2, "c", 'a sign that says "CLOSED"', "one"), [_text_image(["OPEN"])]),
        Sample(PromptRecord(3, "d", "a photo of a cat", "none"), [_text_image([])]),
    ]
    result = evaluator.evaluate(samples, Path("."))
    rows = {row["id"]: row for row in result.per_prompt}
    assert rows["a"]["matched"] == 2 and rows["a"]["ned"] == 1.0, rows["a"]
    assert rows["b"]["matched"] == 2 and rows["b"]["ned"] == 1.0, rows["b"]
    assert rows["c"]["matched"] == 0, rows["c"]
    assert rows["c"]["ned"] == pytest.approx(1 - 4 / 6)  # "open" vs "closed": 4 edits over 6 characters
    assert result.metrics["skipped"] == 1 and "d" not in rows
    assert result.overall == pytest.approx(4 / 5)  # 4 of 5 target words, over the set
    assert result.metrics["ned"] == pytest.approx((1 + 1 + 1 / 3) / 3)
    assert result.categories == {"one": pytest.approx(0.5), "two": 1.0}


_GENEVAL_SCORER = """
import json, pathlib, sys
images, out = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])
with open(out / "results.jsonl", "w") as f:
    for folder in sorted(images.iterdir()):
        tag = json.loads((folder / "metadata.jsonl").read_text())["tag"]
        for sample in sorted((folder / "samples").iterdir()):
            f.write(json.dumps({"filename": str(sample), "tag": tag, "correct": sample.stem in ("0000", "0002")}) + "\\n")
print("scored")
"""


def test_official_scorer_command_runs_on_our_layout_and_its_results_are_summarised(tmp_path):
    """A stand-in for GenEval's evaluate_images.py that reads the layout as the real one does."""
    script = tmp_path / "fake_geneval.py"
    script.write_text(_GENEVAL_SCORER)
    out = tmp_path / "run"
    command = f"{sys.executable} {script} {{images}} {{out}}"
    assert main(["eval", "--benchmark", "geneval", "--limit", "3", "--out", str(out), "--scorer-cmd", command,
                 *TOY]) == 0
    summary = json.loads((out / "summary.json").read_text())
    (scorer,) = summary["scores"]
    assert scorer["categories"] == {"single_object": 0.5} and scorer["overall"] == 0.5
    assert scorer["metrics"]["images"] == 12
    assert (out / "scorer_output.txt").read_text().strip() == "scored"
    assert "## scorer: overall 0.5000" in (out / "summary.md").read_text()


def test_a_scorer_that_prints_its_score_and_one_that_fails(tmp_path, capsys):
    script = tmp_path / "fake_dpg.py"
    script.write_text("import os, sys\nprint(len(os.listdir(sys.argv[1])), 'grids')\nprint('DPG-Bench score: 81.25')\n")
    out = tmp_path / "dpg"
    assert main(["eval", "--benchmark", "dpg", "--limit", "2", "--out", str(out), "--scorer-cmd",
                 f"{sys.executable} {script} {{images}}", *TOY]) == 0
    assert json.loads((out / "summary.json").read_text())["scores"][0]["overall"] == 81.25
    (tmp_path / "bad.py").write_text("import sys\nsys.exit('no detector here')\n")
    assert main(["eval", "--benchmark", "dpg", "--limit", "2", "--out", str(out), "--scorer-cmd",
                 f"{sys.executable} {tmp_path / 'bad.py'} {{images}}", *TOY]) == 2
    assert "--scorer-cmd exited 1" in capsys.readouterr().err


class _WiseJudge(BaseHTTPRequestHandler):
    """Answers like a WISE judge: bright images (mean > 127) get consistency 2, dark ones 0; 'garbage' for the prompt
    'unanswerable'."""

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        content = body["messages"][0]["content"]
        import base64
        import io

        url = content[0]["image_url"]["url"]
        image = Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1])))
        bright = np.asarray(image).mean() > 127
        text = "I cannot say" if "unanswerable" in content[1]["text"] else (
            f"Consistency: {2 if bright else 0}\nRealism: 1\nAesthetic Quality: 2")
        answer = json.dumps({"choices": [{"message": {"content": text}}]}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(answer)))
        self.end_headers()
        self.wfile.write(answer)

    def log_message(self, *args):
        pass


def test_wise_style_judge_over_http():
    assert parse_wise_answer("Consistency: 2\nRealism: **1**\nAesthetic Quality: 0") == {
        "consistency": 2.0, "realism": 1.0, "aesthetic": 0.0}
    assert parse_wise_answer("Consistency: 2") is None
    server = ThreadingHTTPServer(("127.0.0.1", 0), _WiseJudge)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        evaluator = build_evaluator("judge", judge_url=f"http://127.0.0.1:{server.server_port}", judge_retries=0)
        white, black = Image.new("RGB", (64, 64), "white"), Image.new("RGB", (64, 64), "black")
        samples = [Sample(PromptRecord(0, "w", "a snowfield at noon", "nature"), [white]),
                   Sample(PromptRecord(1, "b", "a snowfield at noon", "nature"), [black]),
                   Sample(PromptRecord(2, "u", "unanswerable", "other"), [white])]
        result = evaluator.evaluate(samples, Path("."))
    finally:
        server.shutdown()
    # WiScore = (0.7 C + 0.2 R + 0.1 A) / 2: white (1.4 + 0.2 + 0.2) / 2 = 0.9, black (0 + 0.2 + 0.2) / 2 = 0.2
    assert [row["wiscore"] for row in result.per_prompt] == pytest.approx([0.9, 0.2])
    assert result.overall == pytest.approx(0.55) and result.metrics["unparsed"] == 1
    assert result.categories == {"nature": pytest.approx(0.55)}


def test_clip_evaluator_is_the_mean_clip_reward(tmp_path):
    from test_rewards import _write_tiny_clip  # the tiny random CLIP checkpoint of the rewards tests

    from deepgen_components.rl.rewards import ClipReward

    _write_tiny_clip(tmp_path / "clip")
    images = [Image.new("RGB", (32, 32), c) for c in ("red", "blue", "white")]
    samples = [Sample(PromptRecord(0, "a", "a red square", "x"), images[:2]),
               Sample(PromptRecord(1, "b", "a white square", "y"), images[2:])]
    result = build_evaluator("clip", clip_model=str(tmp_path / "clip")).evaluate(samples, Path("."))
    expected = ClipReward(tmp_path / "clip").score(images, ["a red square"] * 2 + ["a white square"]).tolist()
    assert result.overall == pytest.approx(sum(expected) / 3)
    assert result.categories == {"x": pytest.approx(sum(expected[:2]) / 2), "y": pytest.approx(expected[2])}
    with pytest.raises(FileNotFoundError, match="--clip-model"):
        build_evaluator("clip", clip_model=str(tmp_path / "missing"))
