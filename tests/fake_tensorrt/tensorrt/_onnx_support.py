"""What the emulated ONNX parser accepts, per TensorRT version: the fake's own small table, deliberately independent of
the library's compatibility table (the fake is a check on that table, not a copy of it).

Sources (read 2026-12):
* opset range: onnx-tensorrt ``docs/operators.md`` — "TensorRT 10.0 supports operators in the inclusive range of
  opset 9 to opset 20" (the 10.0 branch) and "TensorRT 10.15 supports operators in the inclusive range of opset 9 to
  opset 24" (the 10.15 branch). 10.14 parses ``Attention``, an opset-23 operator, so it reads at least opset 23; the
  fake takes exactly 23 there and 20 for 10.0-10.13 (conservative: no source states their upper bound). 11.x is taken
  as 10.15's range (assumption, no operators.md for 11.x was available).
* new operators: NVIDIA/TensorRT ``CHANGELOG.md`` "10.14 GA - Parsers: Added support for the `Attention` operator";
  onnx-tensorrt ``docs/Changelog.md`` "TensorRT 10.15 GA Release: Added support for `RotaryEmbedding`,
  `RMSNormalization` and `TensorScatter`".
* never supported: the rows marked ``N`` in onnx-tensorrt ``docs/operators.md`` (10.15 branch).
"""

from __future__ import annotations

# (first TensorRT version whose parser imports the operator) — earlier versions fail on it.
FIRST_VERSION_WITH_OP: dict[str, tuple[int, int]] = {
    "Attention": (10, 14),
    "RMSNormalization": (10, 15),
    "RotaryEmbedding": (10, 15),
    "TensorScatter": (10, 15),
}

# Rows marked "N" (not supported) in operators.md at 10.15.
NEVER_SUPPORTED: frozenset[str] = frozenset({
    "AffineGrid", "Bernoulli", "BitShift", "BitwiseAnd", "BitwiseNot", "BitwiseOr", "BitwiseXor", "CenterCropPad",
    "Col2Im", "Compress", "ConcatFromSequence", "ConvInteger", "DFT", "Det", "DynamicQuantizeLinear", "ImageDecoder",
    "MatMulInteger", "MaxRoiPool", "MaxUnpool", "MelWeightMatrix", "Multinomial", "NegativeLogLikelihoodLoss",
    "Optional", "OptionalGetElement", "OptionalHasElement", "QLinearConv", "QLinearMatMul", "RegexFullMatch",
    "SequenceAt", "SequenceConstruct", "SequenceEmpty", "SequenceErase", "SequenceInsert", "SequenceLength",
    "SequenceMap", "SoftmaxCrossEntropyLoss",
})

MIN_OPSET = 9
# (first version, highest default-domain opset the parser reads), newest last.
MAX_OPSET: tuple[tuple[tuple[int, int], int], ...] = (((10, 0), 20), ((10, 14), 23), ((10, 15), 24), ((11, 0), 24))


def max_opset(version: tuple[int, ...]) -> int:
    best = MAX_OPSET[0][1]
    for first, opset in MAX_OPSET:
        if version[:2] >= first:
            best = opset
    return best


def op_supported(op_type: str, domain: str, version: tuple[int, ...]) -> bool:
    """Whether this TensorRT version imports ``op_type`` natively (anything else falls back to a plugin lookup,
    which finds nothing here: the fake registers no plugins)."""
    if domain not in ("", "ai.onnx"):
        return False
    if op_type in NEVER_SUPPORTED:
        return False
    first = FIRST_VERSION_WITH_OP.get(op_type)
    return first is None or version[:2] >= first
