"""The fake's serialized formats: the engine ("plan") and the timing cache.

An engine is self-contained like a real one: ``MAGIC`` + 4-byte header length + a JSON header (TensorRT version, I/O
tensors with modes, dtypes and shapes, optimisation profiles, builder settings) + the ONNX model bytes with every
external tensor embedded. A timing cache is ``CACHE_MAGIC`` + JSON (version, entries).
"""

from __future__ import annotations

import json
import struct

MAGIC = b"FAKETRT-PLAN\x00\x01"
CACHE_MAGIC = b"FAKETRT-TIMING\x00\x01"


class SerializationError(ValueError):
    """The blob is not a fake plan / timing cache; ``kind`` says whether the magic or the version tag failed."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


def dump_plan(header: dict, onnx_bytes: bytes) -> bytes:
    encoded = json.dumps(header, sort_keys=True).encode()
    return MAGIC + struct.pack("<I", len(encoded)) + encoded + onnx_bytes


def load_plan(blob: bytes) -> tuple[dict, bytes]:
    if not blob.startswith(MAGIC) or len(blob) < len(MAGIC) + 4:
        raise SerializationError("magic", "Magic tag does not match")
    (length,) = struct.unpack_from("<I", blob, len(MAGIC))
    start = len(MAGIC) + 4
    try:
        header = json.loads(blob[start:start + length])
    except ValueError as err:
        raise SerializationError("magic", f"corrupt engine header ({err})") from err
    return header, blob[start + length:]


def dump_cache(version: str, entries: dict[str, str]) -> bytes:
    return CACHE_MAGIC + json.dumps({"tensorrt_version": version, "entries": entries}, sort_keys=True).encode()


def load_cache(blob: bytes) -> tuple[str, dict[str, str]]:
    if not blob.startswith(CACHE_MAGIC):
        raise SerializationError("magic", "Magic tag does not match")
    try:
        data = json.loads(blob[len(CACHE_MAGIC):])
    except ValueError as err:
        raise SerializationError("magic", f"corrupt timing cache ({err})") from err
    return data["tensorrt_version"], dict(data["entries"])
