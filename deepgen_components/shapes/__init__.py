"""The shapes world: DeepGen's laptop-scale proof, in one home (``deepgen_components.shapes``).

A seeded synthetic world of coloured shapes on plain backgrounds (``shapes.world``: :class:`ShapesWorld`) with a
deterministic evaluator that reads an image back into a scene (``shapes.evaluator``: :class:`ShapesEval`). Around
them: the base models the chain starts from (``shapes.base``), the base DiT's own prompt encoder and the stage-1
teacher made of it (``shapes.teacher``), the data and prompt sources (``shapes.data``), the reward
(``shapes.reward``), the held-out evaluation (``shapes.evaluation``), the stage configs (``shapes/configs``) and
the shipped ``deepgen-shapes`` preset folder (``shapes/preset``). docs/shapes.md has the numbers.

The generic trainer, the RL recipe and the evaluation harness do not import this package: importing it plugs the
world into their registries, below. The ``deepgen`` command imports it; a script that trains or evaluates with a
``shapes`` kind without the command imports it first.
"""

from deepgen_components.evaluation.evaluators import register_evaluator
from deepgen_components.evaluation.prompts import register_benchmark
from deepgen_components.rl.rewards import register_reward
from deepgen_components.shapes import data, evaluation, evaluator, reward, teacher, world
from deepgen_components.shapes.evaluator import *  # noqa: F403
from deepgen_components.shapes.world import *  # noqa: F403
from deepgen_components.training.data import register_source
from deepgen_components.training.prompts import register_prompt_source
from deepgen_components.training.teacher import register_teacher

__all__ = [*world.__all__, *evaluator.__all__]

register_source("shapes", data.source_from_config)  # data.sources: [{kind: shapes, ...}]
register_prompt_source("shapes", data.rl_prompts)  # rl.prompt_source: {kind: shapes, ...}
register_teacher("prompt_encoder", teacher.teacher_from_config)  # teacher: {kind: prompt_encoder, ...}
register_reward("shapes", reward.ShapesReward)  # rl.rewards: {NAME: {name: shapes}}
register_reward("shapes_composition", reward.ShapesCompositionReward)  # discrete compositional correctness
register_reward("shapes_placement", reward.ShapesPlacementReward)  # minus the placement error in pixels
register_evaluator("shapes", evaluation.ShapesEvaluator)  # deepgen eval --evaluators shapes
register_benchmark(evaluation.BENCHMARK, evaluation.prompt_records)  # deepgen eval --benchmark shapes
