"""PPO's pieces against references: GAE by a naive loop, the loss on [B] and [B, T] inputs, and learning."""

import numpy as np
import pytest
import torch

from agents.ppo import PPOConfig, compute_gae, policy_loss, value_loss


def naive_gae(rewards, values, next_values, terminated, truncated, gamma, lam):
    """Textbook definition, one env and one step at a time: A_t = sum_k (gamma*lam)^k delta_{t+k},
    the sum stopping at the end of the episode. delta uses V(s_{t+1}) unless s_{t+1} is terminal."""
    T, N = rewards.shape
    adv = np.zeros((T, N))
    for n in range(N):
        for t in range(T):
            total, discount = 0.0, 1.0
            for k in range(t, T):
                boot = 0.0 if terminated[k, n] else gamma * next_values[k, n]
                delta = rewards[k, n] + boot - values[k, n]
                total += discount * delta
                if terminated[k, n] or truncated[k, n]:
                    break
                discount *= gamma * lam
            adv[t, n] = total
    return adv


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_gae_matches_naive_loop_with_terminations_and_truncations(seed):
    rng = np.random.default_rng(seed)
    T, N, gamma, lam = 37, 5, 0.97, 0.9
    rewards = rng.normal(size=(T, N))
    values = rng.normal(size=(T, N))
    terminated = rng.random((T, N)) < 0.08
    truncated = (rng.random((T, N)) < 0.08) & ~terminated
    # V(s_{t+1}): the next row's value inside an episode; a fresh V(final_obs) where truncated.
    next_values = np.empty((T, N))
    next_values[:-1] = values[1:]
    next_values[-1] = rng.normal(size=N)
    next_values[truncated] = rng.normal(size=truncated.sum())
    assert terminated.any() and truncated.any()

    t = lambda x: torch.tensor(x, dtype=torch.float64)
    adv, ret = compute_gae(t(rewards), t(values), t(next_values), t(terminated), t(terminated | truncated), gamma, lam)
    expected = naive_gae(rewards, values, next_values, terminated, truncated, gamma, lam)
    np.testing.assert_allclose(adv.numpy(), expected, rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(ret.numpy(), expected + values, rtol=1e-10, atol=1e-10)


def test_truncation_bootstraps_and_termination_does_not():
    # One step, reward 1, V(s)=0, V(s')=10: truncation keeps gamma*10, termination drops it.
    r, v, nv = torch.ones(1, 1), torch.zeros(1, 1), torch.full((1, 1), 10.0)
    one, zero = torch.ones(1, 1), torch.zeros(1, 1)
    adv_trunc, _ = compute_gae(r, v, nv, zero, one, 0.9, 0.95)
    adv_term, _ = compute_gae(r, v, nv, one, one, 0.9, 0.95)
    assert adv_trunc.item() == pytest.approx(1 + 0.9 * 10)
    assert adv_term.item() == pytest.approx(1.0)


def test_policy_loss_per_token_with_mask_equals_flattened_per_sample():
    torch.manual_seed(0)
    B, T = 4, 6
    logp, old = torch.randn(B, T), torch.randn(B, T)
    adv = torch.randn(B)
    mask = torch.ones(B, T)
    mask[0, 3:] = 0
    mask[2, 1:] = 0
    loss_tok, stats_tok = policy_loss(logp, old, adv, 0.2, mask)
    keep = mask.bool()
    loss_flat, stats_flat = policy_loss(logp[keep], old[keep], adv[:, None].expand(B, T)[keep], 0.2)
    assert torch.allclose(loss_tok, loss_flat)
    assert torch.allclose(stats_tok["clipfrac"], stats_flat["clipfrac"])
    # Masked positions carry no gradient.
    logp.requires_grad_(True)
    policy_loss(logp, old, adv, 0.2, mask)[0].backward()
    assert (logp.grad[~keep] == 0).all() and (logp.grad[keep] != 0).any()


def test_policy_loss_is_clipped():
    # A ratio far above 1+eps with a positive advantage gives no gradient: the clip stops the push.
    logp = torch.tensor([1.0], requires_grad=True)
    loss, stats = policy_loss(logp, torch.tensor([0.0]), torch.tensor([1.0]), 0.1)
    loss.backward()
    assert logp.grad.item() == 0.0 and stats["clipfrac"].item() == 1.0
    assert loss.item() == pytest.approx(-1.1)


def test_value_loss_clipping():
    v, old, ret = torch.tensor([2.0]), torch.tensor([0.0]), torch.tensor([0.0])
    assert value_loss(v, old, ret, None).item() == pytest.approx(2.0)  # 0.5 * 2^2
    assert value_loss(v, old, ret, 0.5).item() == pytest.approx(2.0)  # max(4, 0.25) / 2


def test_config_validation_names_the_field():
    with pytest.raises(ValueError, match="num_minibatches"):
        PPOConfig(num_steps=10, num_minibatches=3).validate(num_envs=1)
    with pytest.raises(ValueError, match="lr"):
        PPOConfig(lr=-1).validate(num_envs=1)
