"""A loopback stand-in for the UnifiedReward pairwise judge (an OpenAI-compatible ``/v1/chat/completions``).

The real judge is ``UnifiedReward-Think-qwen3vl-8b`` served by vLLM, which cannot run here (reference §8). This
server decodes the two base64 JPEG images of each request and answers deterministically: the brighter image
(higher mean pixel value) is better; equal brightness (within 1 grey level) is a tie. That exercises the HTTP
path, the payload format, retries, answer parsing and the win-rate arithmetic.

The behaviour is chosen per request by the ``model`` field of the payload:

* ``"bright"``: ``<think>…</think><answer>Image k is better</answer>`` (k by brightness), or a tie answer;
* ``"notag"``: a well-formed completion without an ``<answer>`` tag;
* ``"garbage"``: HTTP 200 with a body that is not JSON;
* ``"http500"``: HTTP 500;
* ``"slow"``: sleeps ``slow_seconds`` before answering like ``"bright"``.

Every request is recorded in ``server.requests`` (model name, prompt text, temperature, number of images).
"""

from __future__ import annotations

import base64
import io
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
from PIL import Image

__all__ = ["FakeJudgeServer"]


def _decode_data_url(url: str) -> Image.Image:
    prefix = "data:image/jpeg;base64,"
    assert url.startswith(prefix), url[:40]
    return Image.open(io.BytesIO(base64.b64decode(url[len(prefix) :]))).convert("RGB")


class _Handler(BaseHTTPRequestHandler):
    server: _Server

    def log_message(self, format, *args):  # keep the test output quiet
        pass

    def _send(self, code: int, body: bytes, content_type: str = "application/json") -> None:
        try:
            self.send_response(code)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
        except (BrokenPipeError, ConnectionResetError):  # the client gave up (timeout test)
            pass

    def do_POST(self) -> None:
        if self.path != "/v1/chat/completions":
            self._send(404, b'{"error": "not found"}')
            return
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        content = body["messages"][0]["content"]
        urls = [p["image_url"]["url"] for p in content if p["type"] == "image_url"]
        text = "".join(p["text"] for p in content if p["type"] == "text")
        mode = body["model"]
        with self.server.lock:
            self.server.requests.append(
                {
                    "model": mode,
                    "text": text,
                    "temperature": body.get("temperature"),
                    "n_images": len(urls),
                    "auth": self.headers.get("Authorization"),
                }
            )
        if mode == "http500":
            self._send(500, b'{"error": "internal"}')
            return
        if mode == "garbage":
            self._send(200, b"<html>this is not json", "text/html")
            return
        if mode == "slow":
            time.sleep(self.server.slow_seconds)
        if mode == "notag":
            answer = "I think both images are quite nice."
        else:
            b1, b2 = (float(np.asarray(_decode_data_url(u), dtype=np.float32).mean()) for u in urls)
            if abs(b1 - b2) <= 1.0:
                verdict = "Both images are equally good"
            else:
                verdict = "Image 1 is better" if b1 > b2 else "Image 2 is better"
            answer = f"<think>Image 1 brightness {b1:.1f}, image 2 brightness {b2:.1f}.</think><answer>{verdict}</answer>"
        reply = {
            "id": "cmpl-fake",
            "object": "chat.completion",
            "model": mode,
            "choices": [
                {"index": 0, "message": {"role": "assistant", "content": answer}, "finish_reason": "stop"}
            ],
        }
        self._send(200, json.dumps(reply).encode())


class _Server(ThreadingHTTPServer):
    daemon_threads = True  # a sleeping "slow" handler must not block shutdown
    requests: list[dict]
    lock: threading.Lock
    slow_seconds: float


class FakeJudgeServer:
    """Start with ``with FakeJudgeServer() as srv:``; ``srv.base_url`` is ``http://127.0.0.1:<port>``."""

    def __init__(self, slow_seconds: float = 1.0):
        self._server = _Server(("127.0.0.1", 0), _Handler)
        self._server.requests = []
        self._server.lock = threading.Lock()
        self._server.slow_seconds = slow_seconds
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )

    @property
    def base_url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    @property
    def requests(self) -> list[dict]:
        return self._server.requests

    def clear(self) -> None:
        with self._server.lock:
            self._server.requests.clear()

    def __enter__(self) -> FakeJudgeServer:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)
