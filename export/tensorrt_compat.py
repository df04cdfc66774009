"""A static TensorRT-compatibility gate for exported ONNX graphs (torch-free: onnx and the JSON table only).

``data/tensorrt_onnx_support.json`` records, with its sources (onnx/onnx-tensorrt ``docs/operators.md`` and
``docs/Changelog.md``, NVIDIA/TensorRT ``CHANGELOG.md``), which TensorRT ONNX-parser version first imports each
operator, operator version (opset) and data type. From a graph's op types, opset and the dtypes of its nodes'
data inputs this module derives:

* :func:`graph_requirements` — the minimum TensorRT version a graph needs, and why (for the manifest);
* :func:`parse_problems` — why a given TensorRT version's parser would reject the graph (empty when fine), so the
  export can fall back to a lower opset (decomposed RMSNorm/attention) for an older TensorRT.

The table is a static reading of NVIDIA's documentation, not TensorRT itself: a clean result means "no known
reason to fail", and an engine build on the GPU stays the final word. Facts the sources did not establish are
``"unknown"`` in the data and reported as ``unverified``, never guessed.
"""

from __future__ import annotations

import functools
import json
import os
import re
from pathlib import Path

__all__ = [
    "DEFAULT_TENSORRT_FLOOR",
    "graph_requirements",
    "parse_problems",
    "support_table",
    "version_tuple",
]

TABLE_PATH = Path(__file__).with_name("data") / "tensorrt_onnx_support.json"
# The lowest TensorRT whose parser reads the default (opset-23) export: RMSNormalization needs 10.15. Equals the
# floor of pyproject.toml's `tensorrt` extra (tests/test_tensorrt_compat.py checks both).
DEFAULT_TENSORRT_FLOOR = "10.15"
_VERSION = re.compile(r"^\d+(\.\d+)*$")
_DEFAULT_DOMAINS = ("", "ai.onnx")


@functools.cache
def support_table() -> dict:
    """The support table (``export/data/tensorrt_onnx_support.json``), loaded once. Treat it as read-only."""
    return json.loads(TABLE_PATH.read_text())


def version_tuple(version: str) -> tuple[int, ...]:
    """``"10.15.1.29"`` -> ``(10, 15, 1, 29)``, trailing zeros dropped so that ``"10.15" == "10.15.0"``."""
    if not isinstance(version, str) or not _VERSION.match(version.strip()):
        raise ValueError(f"tensorrt_version: expected a dotted version such as '10.15' or '10.15.1.29', got {version!r}")
    parts = [int(p) for p in version.strip().split(".")]
    while len(parts) > 1 and parts[-1] == 0:
        parts.pop()
    return tuple(parts)


def _at_least(version: str, since: str) -> bool:
    return version_tuple(version) >= version_tuple(since)


def _latest(versions) -> str:
    return max(versions, key=version_tuple)


# -- reading the graph -----------------------------------------------------------------------------------------


def _load(onnx_path):
    import onnx

    path = Path(onnx_path)
    if not path.is_file():
        raise FileNotFoundError(f"onnx_path: {path} is not a file")
    return onnx.load(str(path), load_external_data=False)


def _graph_opset(proto) -> int:
    for entry in proto.opset_import:
        if entry.domain in _DEFAULT_DOMAINS:
            return entry.version
    raise ValueError("onnx_path: the model imports no default-domain (ai.onnx) opset")


def _nodes(graph):
    """Every node, subgraphs (If/Loop/Scan bodies) included."""
    for node in graph.node:
        yield node
        for attribute in node.attribute:
            for sub in [attribute.g, *attribute.graphs] if attribute.type in (5, 10) else []:
                yield from _nodes(sub)


def _elem_types(proto) -> dict[str, int]:
    """Element type of every named tensor: shape inference on a copy without initializer data (types only)."""
    import onnx

    types = {t.name: t.data_type for t in proto.graph.initializer}
    try:
        inferred = onnx.shape_inference.infer_shapes(proto, strict_mode=False, data_prop=False)
    except Exception:  # an op unknown to this onnx version: keep what the file itself declares
        inferred = proto
    graph = inferred.graph
    for value in [*graph.input, *graph.output, *graph.value_info]:
        if value.type.HasField("tensor_type") and value.type.tensor_type.elem_type:
            types[value.name] = value.type.tensor_type.elem_type
    for node in graph.node:
        if node.op_type == "Constant":
            for attribute in node.attribute:
                if attribute.name == "value":
                    types[node.output[0]] = attribute.t.data_type
    return types


def _ranks(proto) -> dict[str, int]:
    import onnx

    try:
        graph = onnx.shape_inference.infer_shapes(proto, strict_mode=False).graph
    except Exception:
        graph = proto.graph
    return {
        v.name: len(v.type.tensor_type.shape.dim)
        for v in [*graph.input, *graph.output, *graph.value_info]
        if v.type.HasField("tensor_type") and v.type.tensor_type.HasField("shape")
    }


def _dtype_name(elem_type: int) -> str:
    import onnx

    onnx_name = onnx.TensorProto.DataType.Name(elem_type)
    return support_table()["dtypes"]["names"].get(onnx_name, onnx_name)


def _node_dtype(node, types: dict[str, int]) -> str | None:
    """The dtype the table's type column describes: the node's data tensor (first input; Constant: its output).
    Shape, index and scale inputs (Reshape's shape, Gather's indices, Resize's sizes) are not what it lists."""
    name = node.output[0] if node.op_type == "Constant" or not node.input else node.input[0]
    return _dtype_name(types[name]) if name and types.get(name) else None


# -- the requirements --------------------------------------------------------------------------------------------


def _op_requirement(op: str, entry: dict, opset: int, dtype: str | None) -> tuple[str, str]:
    """(since, why) of one op type at this opset and data type; since may be 'unknown' or 'none'."""
    since, why = entry["since"], entry.get("note", f"{op}: {entry.get('source', '')}")
    for from_opset, (version, _source, note) in entry.get("since_by_opset", {}).items():
        if opset >= int(from_opset) and since not in ("none", "unknown") and _at_least(version, since):
            since, why = version, f"{op} (opset >= {from_opset}): {note}"
    if dtype is not None:
        type_since = entry.get("type_since", {}).get(dtype)
        if type_since and since not in ("none", "unknown") and _at_least(type_since[0], since):
            since, why = type_since[0], f"{op} in {dtype}: {type_since[2]}"
    return since, why


def _opset_floor(opset: int) -> str | None:
    """The earliest documented version whose parser range includes ``opset``; None if no version read does."""
    covering = [v for v, info in support_table()["versions"].items() if info["opsets"][0] <= opset <= info["opsets"][1]]
    return min(covering, key=version_tuple) if covering else None


def graph_requirements(onnx_path: str | os.PathLike) -> dict:
    """What the TensorRT ONNX parser needs to read this graph.

    Returns ``{"min_tensorrt", "opset", "ops" {op: since}, "dtypes", "needs_newer" {op: since above the table
    floor}, "unsupported" [reasons no version read supports], "unknown_ops", "unverified" [facts taken from the
    table but not established by its sources], "reasons" {version-raising item: why}, "table": the versions read}``.
    ``min_tensorrt`` is None when something is unsupported or unknown to the table."""
    table = support_table()
    floor = table["table_floor"]
    proto = _load(onnx_path)
    opset = _graph_opset(proto)
    types = _elem_types(proto)
    ranks = _ranks(proto)

    ops: dict[str, str] = {}
    reasons: dict[str, str] = {}
    unsupported: list[str] = []
    unknown_ops: list[str] = []
    unverified: list[str] = []
    dtypes: set[str] = set()
    for node in _nodes(proto.graph):
        if node.domain not in _DEFAULT_DOMAINS:
            key = f"{node.domain}::{node.op_type}"
            if key not in unknown_ops:
                unknown_ops.append(key)
            continue
        dtype = _node_dtype(node, types)
        dtypes.update(_dtype_name(types[n]) for n in [*node.input, *node.output] if n and types.get(n))
        entry = table["ops"].get(node.op_type)
        if entry is None:
            if node.op_type not in unknown_ops:
                unknown_ops.append(node.op_type)
            continue
        since, why = _op_requirement(node.op_type, entry, opset, dtype)
        if since == "none":
            unsupported.append(f"{node.op_type}: {entry.get('note', 'not supported')}")
        elif since == "unknown":
            unverified.append(f"{node.op_type}: {entry['note']}")
        elif dtype is not None and dtype not in entry["types"] and dtype != "DOUBLE":
            unsupported.append(f"{node.op_type} on {dtype}: the table lists only {', '.join(entry['types'])}")
        else:
            unsupported.extend(_node_restrictions(node, ranks))
        if since not in ("none", "unknown") and (node.op_type not in ops or _at_least(since, ops[node.op_type])):
            if ops.get(node.op_type) != since:
                reasons[node.op_type] = why
            ops[node.op_type] = since
            if entry.get("confidence") == "inferred" and not any(u.startswith(f"{node.op_type}:") for u in unverified):
                unverified.append(f"{node.op_type}: {entry['note']}")
        elif node.op_type not in ops:
            ops[node.op_type] = since
    for dtype, (version, _source, note) in table["dtypes"].get("since", {}).items():
        if dtype in dtypes:
            ops[f"dtype {dtype}"] = version
            reasons[f"dtype {dtype}"] = note

    opset_floor = _opset_floor(opset)
    if opset_floor is None:
        documented = ", ".join(f"{v}: opsets {i['opsets'][0]}-{i['opsets'][1]}" for v, i in table["versions"].items())
        unsupported.append(f"opset {opset}: no TensorRT version read documents it ({documented})")
    else:
        reasons[f"opset {opset}"] = (f"the earliest version read whose documented parser range includes opset {opset} "
                                     f"({table['versions'][opset_floor]['source']})")
    known = [v for v in ops.values() if v not in ("none", "unknown")]
    blocked = unsupported or unknown_ops or any(v == "unknown" for v in ops.values())
    min_tensorrt = None if blocked else _latest([floor, *known, *([opset_floor] if opset_floor else [])])
    return {
        "min_tensorrt": min_tensorrt,
        "opset": opset,
        "ops": dict(sorted(ops.items())),
        "dtypes": sorted(dtypes),
        "needs_newer": {op: v for op, v in sorted(ops.items()) if v not in ("none", "unknown") and not _at_least(floor, v)},
        "unsupported": sorted(set(unsupported)),
        "unknown_ops": sorted(unknown_ops),
        "unverified": sorted(set(unverified)),
        "reasons": {k: why for k, why in sorted(reasons.items()) if k.startswith("opset") or not _at_least(floor, ops[k])},
        "table": {"floor": floor, "newest_version_read": table["newest_version_read"]},
    }


def _node_restrictions(node, ranks: dict[str, int]) -> list[str]:
    """The table's restrictions that a graph check can see (only ``Attention`` for now: our exporter's use)."""
    import onnx

    if node.op_type != "Attention":
        return []
    problems = []
    # Inputs: Q K V attn_mask past_key past_value nonpad_kv_seqlen; outputs: Y present_key present_value qk_matmul.
    for index in (4, 5, 6):
        if len(node.input) > index and node.input[index]:
            problems.append(f"Attention {node.name!r}: input {index} (past_key/past_value/nonpad_kv_seqlen) is unsupported")
    if any(name for name in node.output[1:]):
        problems.append(f"Attention {node.name!r}: only output Y is supported (present_key/present_value/qk_matmul_output)")
    for attribute in node.attribute:
        # The exporter writes both at their defaults (0: the table means the non-default behaviour).
        if attribute.name in ("qk_matmul_output_mode", "softcap") and onnx.helper.get_attribute_value(attribute):
            problems.append(f"Attention {node.name!r}: attribute {attribute.name} != 0 is unsupported")
    for index, name in enumerate(node.input[:4]):
        if name and ranks.get(name, 4) != 4:
            problems.append(f"Attention {node.name!r}: input {index} has rank {ranks[name]}; TensorRT needs 4-D Q, K, V "
                            "and attn_mask (heads as axis 1)")
    return problems


def parse_problems(onnx_path: str | os.PathLike, tensorrt_version: str) -> list[str]:
    """Why TensorRT ``tensorrt_version``'s ONNX parser would reject this graph, one readable line each; empty when
    the table knows no reason. Versions compare as dotted numbers (``"10.15.1" >= "10.15"``). Facts the table does
    not establish (``unverified``) are not problems."""
    version_tuple(tensorrt_version)
    table = support_table()
    requirements = graph_requirements(onnx_path)
    problems = list(requirements["unsupported"])
    problems += [f"{op}: not in the support table (no TensorRT importer known)" for op in requirements["unknown_ops"]]
    if not _at_least(tensorrt_version, table["table_floor"]):
        problems.append(f"TensorRT {tensorrt_version} is older than the table floor {table['table_floor']} "
                        "(this project needs TensorRT 10 or newer)")
    for op, since in requirements["ops"].items():
        if since not in ("none", "unknown") and not _at_least(tensorrt_version, since):
            why = requirements["reasons"].get(op, "")
            problems.append(f"{op} needs TensorRT >= {since}" + (f" ({why})" if why else ""))
    opset = requirements["opset"]
    newer_documented = [v for v, info in table["versions"].items()
                        if _at_least(v, tensorrt_version) and info["opsets"][1] < opset]
    if newer_documented:
        version = min(newer_documented, key=version_tuple)
        problems.append(f"opset {opset}: TensorRT {version} documents its parser for opsets up to "
                        f"{table['versions'][version]['opsets'][1]}, so {tensorrt_version} cannot read it")
    return problems
