"""The shapes world: DeepGen's laptop-scale proof, in one home (``deepgen_components.shapes``).

A seeded synthetic world of coloured shapes on plain backgrounds (``shapes.world``: :class:`ShapesWorld`) with a
deterministic evaluator that reads an image back into a scene (``shapes.evaluator``: :class:`ShapesEval`). Around
them: the base models the chain starts from (``shapes.base``), the held-out evaluation (``shapes.evaluation``),
the stage configs (``shapes/configs``) and the shipped ``deepgen-shapes`` preset folder (``shapes/preset``). The
generic trainer, the RL recipe and the evaluation harness do not import this package; importing it plugs the
world into their registries (the ``shapes`` data source, prompt source, reward and evaluator). docs/shapes.md has
the numbers.
"""

from deepgen_components.shapes import evaluator, world
from deepgen_components.shapes.evaluator import *  # noqa: F403
from deepgen_components.shapes.world import *  # noqa: F403

__all__ = [*world.__all__, *evaluator.__all__]
