"""games.make: names, the batched-env contract (same-step autoreset, final_obs, raw scores)."""

import numpy as np
import pytest

from games import AtariConfig, UnknownGameError, list_games, make, resolve


def test_resolve_names():
    assert resolve("pong").kind == "atari"
    assert resolve("ALE/Pong-v5").name == "pong"
    assert resolve("ALE/SpaceInvaders-v5").name == "space_invaders"
    assert resolve("CartPole-v1").name == "cartpole"
    assert resolve("cartpole").backend_id == "CartPole-v1"
    games = list_games()
    assert "breakout" in games["atari"] and "cartpole" in games["classic"]


def test_unknown_game_lists_close_matches():
    with pytest.raises(UnknownGameError, match="Did you mean: pong"):
        resolve("pongg")
    with pytest.raises(UnknownGameError, match="ponglab games"):
        resolve("zzzzqqq")


def test_classic_same_step_autoreset_and_final_obs():
    env = make("cartpole", num_envs=3, seed=0)
    obs, _ = env.reset()
    assert obs.shape == (3, 4) and obs.dtype == np.float32
    for _ in range(200):
        prev = obs
        obs, rew, term, trunc, info = env.step(np.ones(3, dtype=np.int64))  # always push right: falls fast
        done = term | trunc
        if done.any():
            i = np.flatnonzero(done)[0]
            # final_obs is the fallen pole (close to the previous state), obs is a fresh start (near 0).
            assert np.abs(info["final_obs"][i] - prev[i]).max() < 1.0
            assert np.abs(obs[i]).max() <= 0.05
            assert info["_episode"][i] and info["episode"]["l"][i] == info["episode"]["r"][i]
            break
    else:
        pytest.fail("no episode ended")
    env.close()


def test_atari_raw_scores_while_learning_rewards_are_clipped():
    """A scripted Space Invaders player (always FIRE) scores 5-30 points per alien. The env's reward for
    learning is clipped to +1 but info['episode']['r'] must be the raw score: compare it with an independent
    run of ale-py's vector env with unclipped rewards, same seed and same actions."""
    from ale_py.vector_env import AtariVectorEnv

    cfg = AtariConfig(sticky_actions=0.0, max_episode_frames=4000, noop_max=0)
    env = make("space_invaders", num_envs=2, seed=3, atari=cfg)
    ref = AtariVectorEnv("space_invaders", 2, autoreset_mode="SameStep", reward_clipping=False,
                         repeat_action_probability=0.0, max_num_frames_per_episode=4000, noop_max=0)
    obs, _ = env.reset()
    ref_obs, _ = ref.reset(seed=3)
    np.testing.assert_array_equal(obs, ref_obs)
    fire = np.ones(2, dtype=np.int64)
    ref_total, clipped_total = np.zeros(2), np.zeros(2)
    for _ in range(2000):
        obs, rew, term, trunc, info = env.step(fire)
        _, ref_rew, _, _, _ = ref.step(fire)
        ref_total += ref_rew
        clipped_total += rew
        assert set(np.unique(rew)) <= {-1.0, 0.0, 1.0}
        if info["_episode"][0]:
            assert info["episode"]["r"][0] == ref_total[0]
            assert info["episode"]["r"][0] > clipped_total[0] > 0  # raw points exceed the clipped count
            break
    else:
        pytest.fail("the episode did not end")
    env.close()
    ref.close()


def test_atari_obs_are_uint8_stacks():
    env = make("ALE/Breakout-v5", num_envs=2, seed=0)
    obs, _ = env.reset()
    assert obs.shape == (2, 4, 84, 84) and obs.dtype == np.uint8
    obs, *_ , info = env.step(np.zeros(2, dtype=np.int64))
    assert info["final_obs"].shape == obs.shape
    assert env.frame(obs).shape == (336, 336, 3)
    env.close()


def test_make_rejects_bad_num_envs():
    with pytest.raises(ValueError, match="num_envs"):
        make("cartpole", num_envs=0)
