"""The shapes world: DeepGen's laptop-scale proof, in one home (``deepgen_components.shapes``).

A seeded synthetic world of coloured shapes on plain backgrounds (:class:`ShapesWorld`) with a deterministic
evaluator that reads an image back into a scene (:class:`ShapesEval`). Around them: the base models the chain
starts from (``shapes.base``), the held-out evaluation (``shapes.evaluation``), the stage configs
(``shapes/configs``) and the shipped ``deepgen-shapes`` preset folder (``shapes/preset``). The generic trainer,
the RL recipe and the evaluation harness do not import this package; importing it plugs the world into their
registries (the ``shapes`` data source, prompt source, reward and evaluator). docs/shapes.md has the numbers.
"""

from deepgen_components.shapes.world import (
    BACKGROUND_RGB,
    BACKGROUNDS,
    COLOR_RGB,
    COLORS,
    EDIT_KINDS,
    POSITIONS,
    SHAPES,
    EditTask,
    Instruction,
    ObjectReading,
    Reading,
    Scene,
    SceneObject,
    ShapesEval,
    ShapesWorld,
    apply_instruction,
    caption,
    instruction_text,
    parse_caption,
    parse_instruction,
    to_uint8,
)

__all__ = [
    "SHAPES",
    "COLORS",
    "POSITIONS",
    "BACKGROUNDS",
    "COLOR_RGB",
    "BACKGROUND_RGB",
    "EDIT_KINDS",
    "SceneObject",
    "Scene",
    "Instruction",
    "EditTask",
    "ObjectReading",
    "Reading",
    "ShapesWorld",
    "ShapesEval",
    "caption",
    "parse_caption",
    "instruction_text",
    "parse_instruction",
    "apply_instruction",
    "to_uint8",
]
