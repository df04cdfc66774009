"""MR-GRPO components (reference ``mr-grpo.md`` §3, §5, §6, §7): the CPS and Flow-GRPO steps, rollouts,
on-policy ratios, GDPO / GRPO advantages, timestep selection and the loss, on real tiny components.

The OCR-per-image defect fix is covered in ``tests/test_rewards.py`` (``test_ocr_reward_real_engine_mixed_batch``
and ``test_ocr_reward_engine_contract_and_failures``); the recipe-level checks (update modes, resume, the tiny
run) are in ``tests/test_rl_recipe.py``.
"""

from __future__ import annotations

import copy
import math
import random

import pytest
import torch

from deepgen_components.bridge import BridgeOutput
from deepgen_components.builders import deepgen_tiny
from deepgen_components.rl.grpo import (
    MRGRPOLoss,
    gdpo_advantages,
    grpo_advantages,
    policy_step_log_prob,
    rollout,
    select_timesteps,
)
from deepgen_components.rl.sampling import cps_step, flow_grpo_step

LOG_SQRT_2PI = 0.5 * math.log(2 * math.pi)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny():
    return deepgen_tiny(0)


def _condition(model, prompts, group):
    with torch.no_grad():
        c = model.encode_condition(prompts)
    return BridgeOutput(c.context.repeat_interleave(group, 0), c.pooled.repeat_interleave(group, 0),
                        c.mask.repeat_interleave(group, 0))


def _generator(seed=0):
    return torch.Generator().manual_seed(seed)


# -- the CPS step ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("eta", [1.0, 0.7, 0.3])
def test_cps_step_matches_formulas(eta):
    g = _generator(1)
    x, v, eps = (torch.randn(3, 4, 6, 6, generator=g) for _ in range(3))
    sigma, sigma_next = 0.8, 0.55
    x_new, log_prob, mean = cps_step(x, v, sigma, sigma_next, eta, eps)
    x64, v64, e64 = x.double(), v.double(), eps.double()
    x0_hat = x64 - sigma * v64
    x1_hat = x64 + (1 - sigma) * v64
    s = sigma_next * math.sin(eta * math.pi / 2)
    mu = (1 - sigma_next) * x0_hat + math.sqrt(sigma_next**2 - s**2) * x1_hat
    torch.testing.assert_close(mean.double(), mu, rtol=0, atol=1e-5)
    torch.testing.assert_close(x_new.double(), mu + s * e64, rtol=0, atol=1e-5)
    torch.testing.assert_close(log_prob.double(), -((s * e64) ** 2).flatten(1).mean(1), rtol=0, atol=1e-6)
    assert x_new.dtype == log_prob.dtype == mean.dtype == torch.float32
    assert log_prob.shape == (3,)


@pytest.mark.parametrize("eta", [1.0, 0.5, 0.2])
def test_cps_coefficient_on_x0_hat_is_one_minus_sigma_next(eta):
    """For any eta the x0_hat coefficient is (1 - sigma'): choose v so that x1_hat = 0, then mu = (1 - sigma') x0_hat."""
    sigma, sigma_next = 0.6, 0.35
    x = torch.randn(2, 4, 4, 4, generator=_generator(2))
    v = -x / (1 - sigma)  # x1_hat = x + (1 - sigma) v = 0
    x0_hat = x - sigma * v
    _, _, mean = cps_step(x, v, sigma, sigma_next, eta, torch.zeros_like(x))
    torch.testing.assert_close(mean, (1 - sigma_next) * x0_hat, rtol=0, atol=1e-6)


@pytest.mark.parametrize("eta", [1.0, 0.5])
def test_cps_noise_level_stays_sigma_next(eta):
    """x = (1 - sigma) x0 + sigma n with v = n - x0 exact: x' = (1 - sigma') x0 + noise of total std sigma'."""
    g = _generator(3)
    sigma, sigma_next = 0.9, 0.4
    x0 = torch.randn(1, 16, 64, 64, generator=g)
    n = torch.randn(1, 16, 64, 64, generator=g)
    x = (1 - sigma) * x0 + sigma * n
    x_new, _, _ = cps_step(x, n - x0, sigma, sigma_next, eta, generator=g)
    residual = x_new - (1 - sigma_next) * x0
    assert residual.std().item() == pytest.approx(sigma_next, rel=0.01)


def test_cps_eta_one_conditional_variance_is_sigma_next_squared():
    """eta = 1: Var(x' | x) = sigma'^2 (the x1_hat term vanishes, x' = (1 - sigma') x0_hat + sigma' eps)."""
    g = _generator(4)
    x = torch.randn(1, 4, 8, 8, generator=g).expand(4096, -1, -1, -1)
    v = torch.randn(1, 4, 8, 8, generator=g).expand(4096, -1, -1, -1)
    sigma, sigma_next = 0.7, 0.45
    x_new, _, mean = cps_step(x, v, sigma, sigma_next, 1.0, generator=g)
    torch.testing.assert_close(mean[0], (1 - sigma_next) * (x[0] - sigma * v[0]), rtol=0, atol=1e-6)
    variance = x_new.var(0, unbiased=True)
    assert variance.mean().item() == pytest.approx(sigma_next**2, rel=0.02)
    assert (variance / sigma_next**2).sub(1).abs().max().item() < 0.15  # every element, 4096 samples


def test_cps_last_step_is_deterministic():
    g = _generator(5)
    x, v = torch.randn(2, 4, 4, 4, generator=g), torch.randn(2, 4, 4, 4, generator=g)
    sigma = 0.0089
    a, lp_a, _ = cps_step(x, v, sigma, 0.0, 1.0, torch.randn(2, 4, 4, 4, generator=g))
    b, lp_b, _ = cps_step(x, v, sigma, 0.0, 1.0, torch.randn(2, 4, 4, 4, generator=g))
    torch.testing.assert_close(a, x - sigma * v, rtol=0, atol=0)
    assert torch.equal(a, b)
    assert torch.equal(lp_a, torch.zeros(2)) and torch.equal(lp_b, torch.zeros(2))


def test_cps_step_is_fp32_for_bf16_inputs():
    g = _generator(6)
    x = torch.randn(2, 4, 4, 4, generator=g).bfloat16()
    v = torch.randn(2, 4, 4, 4, generator=g).bfloat16()
    eps = torch.randn(2, 4, 4, 4, generator=g)
    x_new, log_prob, mean = cps_step(x, v, 0.5, 0.3, 1.0, eps)
    assert x_new.dtype == log_prob.dtype == mean.dtype == torch.float32
    expected = (1 - 0.3) * (x.float() - 0.5 * v.float())
    torch.testing.assert_close(mean, expected, rtol=0, atol=1e-6)  # fp32 arithmetic on the bf16 values


@pytest.mark.parametrize("eta", [1.0, 0.6])
def test_cps_mean_squared_is_affine_in_the_gaussian_log_density(eta):
    """mean_squared = 2 s^2 (gaussian + log s + 1/2 log 2 pi) per step, and back; the Gaussian is torch's Normal."""
    g = _generator(7)
    sigma, sigma_next = 0.75, 0.5
    s = sigma_next * math.sin(eta * math.pi / 2)
    x, v = torch.randn(4, 4, 6, 6, generator=g), torch.randn(4, 4, 6, 6, generator=g)
    x_new, lp_ms, mean = cps_step(x, v, sigma, sigma_next, eta, torch.randn(4, 4, 6, 6, generator=g))
    _, lp_g, _ = cps_step(x, v, sigma, sigma_next, eta, prev_sample=x_new, logprob="gaussian")
    normal = torch.distributions.Normal(mean.double(), s).log_prob(x_new.double()).flatten(1).mean(1)
    torch.testing.assert_close(lp_g.double(), normal, rtol=0, atol=1e-5)
    torch.testing.assert_close(lp_ms.double(), 2 * s * s * (lp_g.double() + math.log(s) + LOG_SQRT_2PI), rtol=0, atol=1e-5)
    torch.testing.assert_close(lp_g.double(), lp_ms.double() / (2 * s * s) - math.log(s) - LOG_SQRT_2PI, rtol=0, atol=1e-5)
    # The same affine map for any x' of that step: differences scale by 2 s^2 (only the ratio's temperature changes).
    other = x_new + 0.1 * torch.randn(x_new.shape, generator=g)
    _, lp_ms2, _ = cps_step(x, v, sigma, sigma_next, eta, prev_sample=other)
    _, lp_g2, _ = cps_step(x, v, sigma, sigma_next, eta, prev_sample=other, logprob="gaussian")
    torch.testing.assert_close(lp_ms - lp_ms2, 2 * s * s * (lp_g - lp_g2), rtol=1e-4, atol=1e-6)
    with pytest.raises(ValueError, match="logprob"):
        cps_step(x, v, sigma, sigma_next, eta, prev_sample=x_new, logprob="nope")


def test_cps_prev_sample_evaluation():
    g = _generator(8)
    x, v = torch.randn(3, 4, 4, 4, generator=g), torch.randn(3, 4, 4, 4, generator=g)
    x_new, lp, mean = cps_step(x, v, 0.5, 0.25, 1.0, generator=_generator(9))
    again, lp_again, mean_again = cps_step(x, v, 0.5, 0.25, 1.0, prev_sample=x_new)
    assert torch.equal(again, x_new) and torch.equal(lp_again, lp) and torch.equal(mean_again, mean)
    # The sampled x' is data: a log-prob evaluated at it carries gradient only through the mean.
    v_req = v.clone().requires_grad_(True)
    _, lp_req, mean_req = cps_step(x, v_req, 0.5, 0.25, 1.0, prev_sample=x_new)
    (grad,) = torch.autograd.grad(lp_req.sum(), v_req)
    # d/dv of -mean((x' - mu)^2) with mu = (1 - s') (x - s v): -2 (x' - mu) (1 - s') s / numel
    expected = -2 * (x_new - mean_req.detach()) * (1 - 0.25) * 0.5 / (4 * 4 * 4)
    torch.testing.assert_close(grad, expected, rtol=1e-5, atol=1e-9)
    # Reproducible from the generator.
    x_same, _, _ = cps_step(x, v, 0.5, 0.25, 1.0, generator=_generator(9))
    assert torch.equal(x_same, x_new)


# -- the Flow-GRPO step ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("sigma,sigma_next", [(1.0, 0.96), (0.9133, 0.86), (0.278, 0.0089)])
def test_flow_grpo_step_formula_and_gaussian_log_prob(sigma, sigma_next):
    g = _generator(10)
    a, sigma_max = 0.7, 0.9601
    x, v, eps = (torch.randn(2, 4, 6, 6, generator=g).double() for _ in range(3))
    x_new, log_prob, mean = flow_grpo_step(x.float(), v.float(), sigma, sigma_next, a, eps.float(), sigma_max=sigma_max)
    denominator_sigma = sigma_max if sigma == 1 else sigma  # Flow-GRPO: torch.where(sigma == 1, sigmas[1], sigma)
    sigma_t = a * math.sqrt(sigma / (1 - denominator_sigma))
    dt = sigma_next - sigma
    mu = x * (1 + sigma_t**2 / (2 * sigma) * dt) + v * (1 + sigma_t**2 * (1 - sigma) / (2 * sigma)) * dt
    std = sigma_t * math.sqrt(-dt)
    torch.testing.assert_close(mean.double(), mu, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x_new.double(), mu + std * eps, rtol=1e-5, atol=1e-5)
    normal = torch.distributions.Normal(mean.double(), std).log_prob(x_new.double()).flatten(1).mean(1)
    torch.testing.assert_close(log_prob.double(), normal, rtol=1e-5, atol=1e-5)
    _, lp_again, _ = flow_grpo_step(x.float(), v.float(), sigma, sigma_next, a, prev_sample=x_new, sigma_max=sigma_max)
    assert torch.equal(lp_again, log_prob)


def test_flow_grpo_step_needs_sigma_max_at_sigma_one():
    x = torch.randn(1, 4, 4, 4)
    with pytest.raises(ValueError, match="sigma_max"):
        flow_grpo_step(x, x, 1.0, 0.9, 0.7, torch.zeros_like(x))
    flow_grpo_step(x, x, 0.9, 0.8, 0.7, torch.zeros_like(x))  # below 1 it is not needed


# -- rollouts -------------------------------------------------------------------------------------------------


def test_rollout_records_fp32_trajectories(tiny):
    cond = _condition(tiny, ["a red circle", "a blue square"], 4)
    traj = rollout(tiny, cond, height=64, width=64, num_steps=6, group_size=4, generator=_generator(0), micro_batch=4)
    assert traj.latents.shape == (8, 7, 16, 8, 8)
    assert traj.log_probs.shape == (8, 6) and traj.timesteps.shape == (6,) and traj.sigmas.shape == (7,)
    assert traj.latents.dtype == traj.log_probs.dtype == traj.timesteps.dtype == traj.sigmas.dtype == torch.float32
    assert traj.sigmas[0] == 1 and traj.sigmas[-1] == 0
    torch.testing.assert_close(traj.timesteps, 1000 * traj.sigmas[:-1])
    assert torch.equal(traj.final, traj.latents[:, -1])
    # Same initial noise within a group, different across groups; the per-step noise differs within a group.
    start = traj.latents[:, 0]
    for g in range(2):
        for j in range(1, 4):
            assert torch.equal(start[4 * g], start[4 * g + j])
    assert not torch.equal(start[0], start[4])
    assert not torch.equal(traj.latents[0, 1], traj.latents[1, 1])
    # On-policy log p ~ -sigma'^2 with eta = 1; the last step (sigma' = 0) has log p = 0.
    torch.testing.assert_close(traj.log_probs[:, :-1].mean(0), -traj.sigmas[1:-1] ** 2, rtol=0.15, atol=2e-3)
    assert torch.equal(traj.log_probs[:, -1], torch.zeros(8))
    # Each transition is a CPS step from the stored latent (the final one is x0_hat exactly).
    with torch.no_grad():
        t = traj.timesteps[-1].expand(4)
        v = tiny.velocity(traj.latents[:4, -2], t, cond.select(slice(0, 4)))
    torch.testing.assert_close(traj.latents[:4, -1], traj.latents[:4, -2] - traj.sigmas[-2] * v, rtol=0, atol=1e-6)


def test_rollout_noise_options_and_determinism(tiny):
    cond = _condition(tiny, ["a red circle", "a blue square"], 4)
    kwargs = dict(height=64, width=64, num_steps=4, group_size=4, micro_batch=8)
    a = rollout(tiny, cond, generator=_generator(1), **kwargs)
    b = rollout(tiny, cond, generator=_generator(1), **kwargs)
    c = rollout(tiny, cond, generator=_generator(2), **kwargs)
    assert torch.equal(a.latents, b.latents) and torch.equal(a.log_probs, b.log_probs)
    assert not torch.equal(a.latents[:, 0], c.latents[:, 0])
    d = rollout(tiny, cond, generator=_generator(1), same_noise_in_group=False, **kwargs)
    starts = d.latents[:, 0].flatten(1)
    assert torch.cdist(starts, starts).add(torch.eye(8) * 1e9).min() > 1  # 8 distinct initial latents
    with pytest.raises(ValueError, match="groups"):
        rollout(tiny, cond, generator=_generator(1), **{**kwargs, "group_size": 3})


def test_rollout_log_probs_equal_recomputation(tiny):
    cond = _condition(tiny, ["a red circle"], 4)
    traj = rollout(tiny, cond, height=64, width=64, num_steps=5, group_size=4, generator=_generator(3), micro_batch=2)
    with torch.no_grad():
        for i in range(5):
            for rows in (slice(0, 2), slice(2, 4)):
                lp, _ = policy_step_log_prob(tiny, traj.latents[rows, i], traj.latents[rows, i + 1], i, traj.sigmas,
                                             traj.timesteps, cond.select(rows))
                assert torch.equal(lp, traj.log_probs[rows, i])


def test_rollout_flow_grpo_sampler_recomputes(tiny):
    cond = _condition(tiny, ["a red circle"], 2)
    traj = rollout(tiny, cond, height=64, width=64, num_steps=4, group_size=2, generator=_generator(4),
                   sampler="flow_grpo", noise_level=0.7)
    assert torch.isfinite(traj.log_probs[:, :-1]).all()
    with torch.no_grad():
        lp, _ = policy_step_log_prob(tiny, traj.latents[:, 0], traj.latents[:, 1], 0, traj.sigmas, traj.timesteps,
                                     cond, sampler="flow_grpo", noise_level=0.7)
    assert torch.equal(lp, traj.log_probs[:, 0])


def test_first_update_ratio_is_exactly_one_and_kl_zero(tiny):
    """On-policy, fp32, same micro-batches: exp(new - old) == 1.0 exactly, with gradients through the DiT; KL to a
    copy of the policy is exactly 0 (reference §7 'bf16 old log-probs': the official bf16 rounding breaks this)."""
    model = copy.deepcopy(tiny)
    reference = copy.deepcopy(model.dit).requires_grad_(False)
    model.requires_grad_(False)
    model.dit.requires_grad_(True)
    cond = _condition(model, ["a red circle", "a blue square"], 4)
    traj = rollout(model, cond, height=64, width=64, num_steps=8, group_size=4, generator=_generator(5), micro_batch=4)
    advantages = torch.linspace(-1, 1, 8)
    loss_fn = MRGRPOLoss()
    model.dit.train()
    for i in select_timesteps(8, 1.0, rng=random.Random(0)):  # every non-final step
        for rows in (slice(0, 4), slice(4, 8)):
            c = cond.select(rows)
            log_prob, velocity = policy_step_log_prob(model, traj.latents[rows, i], traj.latents[rows, i + 1], i,
                                                      traj.sigmas, traj.timesteps, c)
            assert log_prob.requires_grad and log_prob.dtype == torch.float32
            ratio = torch.exp(log_prob - traj.log_probs[rows, i])
            assert torch.equal(ratio.detach(), torch.ones(4)), (i, ratio)
            with torch.no_grad():
                ref_v = reference(traj.latents[rows, i], traj.timesteps[i].expand(4), c.context, c.pooled,
                                  context_mask=c.mask)
            terms = loss_fn(log_prob, traj.log_probs[rows, i], advantages[rows], velocity=velocity,
                            reference_velocity=ref_v, sigma_next=traj.sigmas[i + 1])
            assert terms["kl"].item() == 0.0 and terms["ratio_mean"].item() == 1.0
            assert terms["clip_fraction"].item() == 0.0
            terms["loss"].backward()
    grads = [p.grad for p in model.dit.parameters() if p.grad is not None]
    assert grads and sum(float(g.abs().sum()) for g in grads) > 0


def test_bf16_old_log_probs_would_break_the_clip_range(tiny):
    """The official defect in numbers: log p ~ -sigma'^2 in [-1, 0]; rounding it to bf16 (spacing 2^-9..2^-8 there)
    moves on-policy ratios by ~1e-3, outside [1 - 1e-4, 1 + 1e-4] for most steps. Ours stay fp32: exactly 1."""
    cond = _condition(tiny, ["a red circle"], 4)
    traj = rollout(tiny, cond, height=64, width=64, num_steps=50, group_size=4, generator=_generator(6), micro_batch=4)
    typical = traj.log_probs[:, :-1][traj.log_probs[:, :-1] < -0.05]  # sigma' > ~0.22: most of the 49 steps
    assert typical.numel() > 100 and typical.min() > -1.2
    ratio_bf16 = torch.exp(typical - typical.bfloat16().float())
    outside = ((ratio_bf16 - 1).abs() > 1e-4).float().mean().item()
    assert outside > 0.8, outside
    assert (ratio_bf16 - 1).abs().max().item() > 1e-3
    assert torch.equal(torch.exp(typical - typical.clone()), torch.ones_like(typical))


# -- advantages -----------------------------------------------------------------------------------------------


R1 = [1.0, 2.0, 3.0, 0.0, 0.0, 3.0]
R2 = [5.0, 5.0, 5.0, 1.0, 2.0, 3.0]  # constant within the first group
WEIGHTS = [[0.7, 0.3]] * 3 + [[0.2, 0.8]] * 3  # group 1: "general", group 2: "text_rendering"


def _hand_gdpo(eps=1e-4, clip=5.0):
    """GDPO by hand (groups of 3, unbiased std, eps 1e-4)."""
    s3 = math.sqrt(3.0)
    # reward 1: group 1 mean 2, std 1 -> (-1, 0, 1) / (1 + eps); group 2 (0, 0, 3): mean 1, std sqrt(3)
    a1 = [-1 / (1 + eps), 0.0, 1 / (1 + eps), -1 / (s3 + eps), -1 / (s3 + eps), 2 / (s3 + eps)]
    # reward 2: group 1 constant -> 0; group 2 (1, 2, 3): mean 2, std 1
    a2 = [0.0, 0.0, 0.0, -1 / (1 + eps), 0.0, 1 / (1 + eps)]
    combined = [w1 * x + w2 * y for (w1, w2), x, y in zip(WEIGHTS, a1, a2)]
    mean = sum(combined) / 6
    std = math.sqrt(sum((c - mean) ** 2 for c in combined) / 5)
    return [max(-clip, min(clip, (c - mean) / (std + eps))) for c in combined]


def test_gdpo_against_hand_computation():
    rewards = torch.tensor([R1, R2]).T
    weights = torch.tensor(WEIGHTS)
    adv = gdpo_advantages(rewards, weights, group_size=3)
    expected = torch.tensor(_hand_gdpo(), dtype=torch.float64)
    # the numbers: [-0.91993, 0, 0.91993, -1.20311, -0.15176, 1.35486]
    torch.testing.assert_close(expected, torch.tensor([-0.919931, 0.0, 0.919931, -1.203105, -0.151756, 1.354861],
                                                      dtype=torch.float64), rtol=0, atol=1e-6)
    torch.testing.assert_close(adv.double(), expected, rtol=0, atol=1e-6)
    # A clip below the largest |A| clamps exactly there.
    clipped = gdpo_advantages(rewards, weights, group_size=3, clip=1.0)
    torch.testing.assert_close(clipped.double(), torch.tensor(_hand_gdpo(clip=1.0), dtype=torch.float64), atol=1e-6, rtol=0)
    assert clipped.max().item() == 1.0 and clipped.min().item() == -1.0


def test_gdpo_constant_reward_and_per_category_weights():
    # A reward that is constant within every group contributes nothing, whatever its weight.
    rewards = torch.tensor([[1.0, 7.0], [2.0, 7.0], [3.0, 7.0], [4.0, 7.0]])
    only_first = gdpo_advantages(rewards[:, :1], torch.ones(4, 1), 2)
    both = gdpo_advantages(rewards, torch.tensor([[1.0, 5.0]] * 4), 2)
    torch.testing.assert_close(both, only_first)
    constant = gdpo_advantages(torch.full((4, 1), 3.0), torch.ones(4, 1), 2)
    assert torch.equal(constant, torch.zeros(4))
    # Per-category weights: the same rewards under another category's weights give a different advantage.
    rewards = torch.tensor([R1, R2]).T
    general_everywhere = gdpo_advantages(rewards, torch.tensor([[0.7, 0.3]] * 6), 3)
    per_category = gdpo_advantages(rewards, torch.tensor(WEIGHTS), 3)
    torch.testing.assert_close(per_category[:3] / per_category[:3].abs().max(),
                               general_everywhere[:3] / general_everywhere[:3].abs().max(), rtol=1e-5, atol=1e-6)
    assert not torch.allclose(per_category[3:], general_everywhere[3:], atol=1e-2)


def test_gdpo_batch_normalisation_and_clamp_at_five():
    # 4 groups of 8; one outlier: group-normalised (7/8)/sqrt(1/8) = 2.4749, the batch std is sqrt(7/31) = 0.4752,
    # so its batch-normalised advantage is 5.208 and is clamped to 5.
    rewards = torch.zeros(32, 1)
    rewards[7, 0] = 1.0
    adv = gdpo_advantages(rewards, torch.ones(32, 1), 8)
    assert adv[7].item() == 5.0
    group = (7 / 8) / (math.sqrt(1 / 8) + 1e-4)
    others = -(1 / 8) / (math.sqrt(1 / 8) + 1e-4)
    std = math.sqrt((group**2 + 7 * others**2) / 31)
    assert group / (std + 1e-4) == pytest.approx(5.2072, abs=1e-3)
    torch.testing.assert_close(adv[:7], torch.full((7,), others / (std + 1e-4)), rtol=0, atol=1e-5)
    assert torch.equal(adv[8:], torch.zeros(24))
    unclipped = gdpo_advantages(rewards, torch.ones(32, 1), 8, clip=100.0)
    assert unclipped[7].item() == pytest.approx(group / (std + 1e-4), rel=1e-5)
    # Batch normalisation: mean 0, unbiased std 1 - eps-ish, without a clamp.
    rewards = torch.rand(24, 2, generator=_generator(11))
    adv = gdpo_advantages(rewards, torch.rand(24, 2, generator=_generator(12)), 4, clip=100.0)
    assert abs(adv.mean().item()) < 1e-5 and adv.std(unbiased=True).item() == pytest.approx(1.0, abs=1e-3)


def test_gdpo_gather_over_two_ranks_equals_the_concatenated_batch():
    g = _generator(13)
    rewards = torch.rand(16, 2, generator=g)
    weights = torch.tensor([[0.7, 0.3]] * 8 + [[0.2, 0.8]] * 8)
    full = gdpo_advantages(rewards, weights, 4)
    locals_ = {}
    gdpo_advantages(rewards[:8], weights[:8], 4, gather=lambda t: locals_.setdefault(0, t))
    gdpo_advantages(rewards[8:], weights[8:], 4, gather=lambda t: locals_.setdefault(1, t))
    rank0 = gdpo_advantages(rewards[:8], weights[:8], 4, gather=lambda t: torch.cat([t, locals_[1]]))
    rank1 = gdpo_advantages(rewards[8:], weights[8:], 4, gather=lambda t: torch.cat([locals_[0], t]))
    torch.testing.assert_close(torch.cat([rank0, rank1]), full, rtol=0, atol=1e-6)
    local_only = torch.cat([gdpo_advantages(rewards[:8], weights[:8], 4), gdpo_advantages(rewards[8:], weights[8:], 4)])
    assert not torch.allclose(local_only, full, atol=1e-3)  # the official per-GPU normalisation differs


def test_grpo_alternative_against_hand_computation():
    rewards = torch.tensor([R1, R2]).T
    adv = grpo_advantages(rewards, torch.tensor(WEIGHTS), 3)
    # weighted sums: (2.2, 2.9, 3.6 | 0.8, 1.6, 3.0); group 1 mean 2.9 std 0.7, group 2 mean 1.8 std 1.11355
    s2 = math.sqrt(((0.8 - 1.8) ** 2 + (1.6 - 1.8) ** 2 + (3.0 - 1.8) ** 2) / 2)
    expected = [-0.7 / (0.7 + 1e-4), 0.0, 0.7 / (0.7 + 1e-4), -1.0 / (s2 + 1e-4), -0.2 / (s2 + 1e-4), 1.2 / (s2 + 1e-4)]
    torch.testing.assert_close(adv.double(), torch.tensor(expected, dtype=torch.float64), rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="group"):
        grpo_advantages(rewards[:5], torch.tensor(WEIGHTS)[:5], 3)
    with pytest.raises(ValueError, match=">= 2"):
        gdpo_advantages(rewards, torch.tensor(WEIGHTS), 1)


# -- timestep selection ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("num_steps,count", [(50, 30), (8, 4), (10, 6)])
def test_select_timesteps(num_steps, count):
    chosen = select_timesteps(num_steps, 0.6, rng=random.Random(0))
    assert len(chosen) == count == int(num_steps * 0.6)
    assert chosen == sorted(set(chosen)) and num_steps - 1 not in chosen and min(chosen) >= 0
    assert chosen == select_timesteps(num_steps, 0.6, rng=random.Random(0))
    assert any(select_timesteps(num_steps, 0.6, rng=random.Random(s)) != chosen for s in range(1, 5))
    with_last = {t for s in range(50) for t in select_timesteps(num_steps, 0.6, include_last=True, rng=random.Random(s))}
    assert num_steps - 1 in with_last
    assert select_timesteps(num_steps, 1.0, rng=random.Random(0)) == list(range(num_steps - 1))


# -- the loss -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("advantage", [1.0, -1.0])
def test_loss_gradient_moves_the_log_prob_with_the_advantage(tiny, advantage):
    """One SGD step on the tiny DiT raises log p of a transition with A > 0 and lowers it with A < 0."""
    model = copy.deepcopy(tiny)
    model.requires_grad_(False)
    model.dit.requires_grad_(True)
    cond = _condition(model, ["a red circle"], 2)
    traj = rollout(model, cond, height=64, width=64, num_steps=6, group_size=2, generator=_generator(14))
    step, rows = 2, slice(0, 1)
    c = cond.select(rows)

    def log_prob():
        return policy_step_log_prob(model, traj.latents[rows, step], traj.latents[rows, step + 1], step,
                                    traj.sigmas, traj.timesteps, c)[0]

    before = log_prob()
    loss = MRGRPOLoss()(before, traj.log_probs[rows, step], torch.tensor([advantage]))["loss"]
    params = [p for p in model.dit.parameters() if p.requires_grad]
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    norm2 = sum(float((g**2).sum()) for g in grads if g is not None)
    lr = 1e-3 / norm2  # first-order change of -loss: lr * |g|^2 = 1e-3 of log p (|A| = 1, ratio 1)
    with torch.no_grad():
        for p, g in zip(params, grads):
            if g is not None:
                p -= lr * g
        after = log_prob()
    change = float(after - before.detach())
    assert change * advantage > 5e-4, change
    assert abs(change) < 2e-3


def test_clipping_zeroes_the_gradient_when_the_clipped_term_is_active():
    c = 1e-4
    loss_fn = MRGRPOLoss(clip_range=c)
    old = torch.zeros(4)
    # ratios e^{+-2c} (outside) and e^{+-c/2} (inside); advantages +1 / -1
    deltas = torch.tensor([2 * c, -2 * c, 2 * c, -2 * c])
    advantages = torch.tensor([1.0, -1.0, -1.0, 1.0])
    new = deltas.clone().requires_grad_(True)
    loss_fn(new, old, advantages)["policy_loss"].backward()
    ratio = torch.exp(deltas)
    # A > 0 and r > 1 + c, A < 0 and r < 1 - c: the clipped term wins, no gradient.
    assert new.grad[0].item() == 0.0 and new.grad[1].item() == 0.0
    # A < 0 and r > 1 + c, A > 0 and r < 1 - c: the unclipped term wins: d(-A r)/d log p = -A r / B.
    torch.testing.assert_close(new.grad[2:], -advantages[2:] * ratio[2:] / 4)
    inside = torch.tensor([c / 2, -c / 2], requires_grad=True)
    out = loss_fn(inside, torch.zeros(2), torch.tensor([1.0, 1.0]))
    out["policy_loss"].backward()
    assert (inside.grad != 0).all() and out["clip_fraction"].item() == 0.0
    assert loss_fn(deltas, old, advantages)["clip_fraction"].item() == 1.0


@pytest.mark.parametrize("eta", [1.0, 0.5])
def test_kl_scaling_and_total(eta):
    g = _generator(15)
    v, v_ref = torch.randn(3, 4, 4, 4, generator=g), torch.randn(3, 4, 4, 4, generator=g)
    sigma_next = 0.3
    loss_fn = MRGRPOLoss(clip_range=1e-4, kl_beta=0.25, sft_lambda=0.1, eta=eta)
    out = loss_fn(torch.zeros(3), torch.zeros(3), torch.tensor([1.0, 0.0, -2.0]), velocity=v, reference_velocity=v_ref,
                  sigma_next=sigma_next)
    s = sigma_next * math.sin(eta * math.pi / 2)
    kl = (((v - v_ref) ** 2).flatten(1).mean(1) / (2 * s * s + 1e-7)).mean()
    torch.testing.assert_close(out["kl"], kl)
    torch.testing.assert_close(out["policy_loss"], torch.tensor((-1.0 + 0.0 + 2.0) / 3))
    torch.testing.assert_close(out["loss"], out["policy_loss"] + 0.25 * kl)
    # The deterministic last step (sigma' = 0) divides by 1e-7 only.
    last = loss_fn(torch.zeros(3), torch.zeros(3), torch.zeros(3), velocity=v, reference_velocity=v_ref, sigma_next=0.0)
    torch.testing.assert_close(last["kl"], ((v - v_ref) ** 2).flatten(1).mean(1).mean() / 1e-7)
    # total = (1 - lambda) GRPO + lambda SFT
    grpo, sft = torch.tensor(2.0), torch.tensor(5.0)
    assert loss_fn.combine(grpo, sft).item() == pytest.approx(0.9 * 2.0 + 0.1 * 5.0)
    assert loss_fn.combine(grpo, None).item() == pytest.approx(0.9 * 2.0)
    with pytest.raises(ValueError, match="sigma_next"):
        loss_fn(torch.zeros(3), torch.zeros(3), torch.zeros(3), velocity=v, reference_velocity=v_ref)
    with pytest.raises(ValueError, match="clip_range"):
        MRGRPOLoss(clip_range=0)
    with pytest.raises(ValueError, match="sft_lambda"):
        MRGRPOLoss(sft_lambda=1.5)


@pytest.mark.gpu
def test_first_update_ratio_is_exactly_one_under_cuda_bf16_autocast():
    """The recipe's CUDA path (precision auto = bf16 autocast for the DiT, fp32 step arithmetic): the on-policy
    recomputation with gradients still reproduces the stored log-probs bit for bit."""
    model = deepgen_tiny(0, device="cuda")
    model.requires_grad_(False)
    model.dit.requires_grad_(True)
    cond = _condition(model, ["a red circle", "a blue square"], 4)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        traj = rollout(model, cond, height=64, width=64, num_steps=8, group_size=4,
                       generator=torch.Generator("cuda").manual_seed(0), micro_batch=4)
    assert traj.log_probs.dtype == torch.float32
    model.dit.train()
    for i in range(7):
        for rows in (slice(0, 4), slice(4, 8)):
            with torch.autocast("cuda", dtype=torch.bfloat16):
                log_prob, _ = policy_step_log_prob(model, traj.latents[rows, i], traj.latents[rows, i + 1], i,
                                                   traj.sigmas, traj.timesteps, cond.select(rows))
            assert torch.equal(torch.exp(log_prob - traj.log_probs[rows, i]).detach(), torch.ones(4, device="cuda"))


def test_mr_grpo_components_are_public_names_of_their_packages():
    """MR-GRPO is public under deepgen_components.rl and the world under deepgen_components.shapes; the old top-level
    names still resolve to the same objects for one release, each with a DeprecationWarning naming the new home."""
    import deepgen_components
    from deepgen_components import rl, shapes
    from deepgen_components.rl import grpo, sampling

    for name, module in {"MRGRPOLoss": grpo, "gdpo_advantages": grpo, "grpo_advantages": grpo, "rollout": grpo,
                         "cps_step": sampling, "flow_grpo_step": sampling, "ShapesWorld": shapes,
                         "ShapesEval": shapes}.items():
        home = shapes if module is shapes else rl
        assert getattr(home, name) is getattr(module, name)
        assert name in home.__all__
        with pytest.warns(DeprecationWarning, match=f"moved to {home.__name__}.{name}"):
            assert getattr(deepgen_components, name) is getattr(module, name)
        assert name not in deepgen_components.__all__
