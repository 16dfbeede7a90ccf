"""Tests of agents/replay.py against a naive reference that stores full stacks per transition."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from agents.replay import ReplayMemory, ReplayMemoryTooLarge, _SumTree


@pytest.fixture(autouse=True)
def one_torch_thread():
    """These tensors are tiny: with 2 busy cores torch's thread pool costs more than it saves."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


class FakeVecEnv:
    """Emulates ale_py AtariVectorEnv(autoreset_mode="SameStep") frame stacking on random frames:
    obs[i] = last S frames of env i's episode, padded at the front with zeros (ALE) or the first
    frame (pad="repeat"); when an episode ends the step returns the reset obs of the next episode
    and final_obs[i] holds the true last stack (rows of envs that are not done hold garbage)."""

    def __init__(self, N, S, frame_shape, dtype, pad, p_term, p_trunc, seed):
        self.N, self.S, self.shape, self.dtype, self.pad = N, S, frame_shape, dtype, pad
        self.p_term, self.p_trunc, self.rng = p_term, p_trunc, np.random.default_rng(seed)

    def _frame(self):  # random frames are unique, so a frame identifies its step
        if self.dtype == np.uint8:
            return self.rng.integers(0, 256, self.shape, dtype=np.uint8)
        return self.rng.normal(size=self.shape).astype(self.dtype)

    def _obs(self, i):
        frames = self.hist[i][-self.S:]
        fill = np.zeros_like(frames[0]) if self.pad == "zeros" else frames[0]
        stack = np.stack([fill] * (self.S - len(frames)) + frames)
        return stack if self.S > 1 else stack[0]

    def reset(self):
        self.hist = [[self._frame()] for _ in range(self.N)]
        return np.stack([self._obs(i) for i in range(self.N)])

    def step(self, actions):
        raw = self.rng.choice([-3.0, -1.0, 0.0, 0.0, 0.5, 1.0, 2.0], self.N).astype(np.float32)
        term = self.rng.random(self.N) < self.p_term
        trunc = ~term & (self.rng.random(self.N) < self.p_trunc)
        final = np.stack([self._obs(i) for i in range(self.N)])
        final = self.rng.integers(0, 9, final.shape).astype(final.dtype)  # garbage rows
        for i in range(self.N):
            self.hist[i].append(self._frame())
            if term[i] or trunc[i]:
                final[i] = self._obs(i)
                self.hist[i] = [self._frame()]
        return np.stack([self._obs(i) for i in range(self.N)]), raw, term, trunc, final


class NaiveReplay:
    """Plain-Python reference: every transition with its full obs and next obs. Capacity follows the
    memory's documented layout: per env, S-1 prefix slots, one slot per step, one per episode end,
    the last C slots kept."""

    def __init__(self, N, S, C, n, gamma, clip=True):
        self.S, self.C, self.n, self.gamma, self.clip = S, C, n, gamma, clip
        self.trans = [[] for _ in range(N)]
        self.slots = [S - 1 if S > 1 else 0] * N
        self.episode, self.ep_step = [0] * N, [0] * N
        self.cuts = [set() for _ in range(N)]  # transitions after which the envs were reset (resume)

    def cut(self):
        """The run was resumed: every env restarts with reset(); the open episodes stop without an end."""
        for i, T in enumerate(self.trans):
            self.cuts[i].add(len(T) - 1)
            self.episode[i], self.ep_step[i] = self.episode[i] + 1, 0

    def add(self, i, obs, action, raw, term, trunc, next_obs):
        self.trans[i].append(dict(obs=np.array(obs), action=int(action), term=bool(term), trunc=bool(trunc),
                                  r=float(np.sign(raw)) if self.clip else float(raw), next=np.array(next_obs),
                                  slot=self.slots[i], first_ep=self.episode[i] == 0, ep_step=self.ep_step[i]))
        self.slots[i] += 1 + bool(term or trunc)
        self.episode[i] += bool(term or trunc)
        self.ep_step[i] = 0 if (term or trunc) else self.ep_step[i] + 1

    def expected(self, i, t):
        """What sampling transition t of env i must give, or None if it must never be sampled."""
        T, x, total = self.trans[i], self.trans[i][t], self.slots[i]
        lookback = self.S - 1 if x["first_ep"] else min(x["ep_step"], self.S - 1)
        if x["slot"] - lookback < total - self.C:  # a frame of its stack was overwritten
            return None
        ret, disc, done, m = 0.0, 1.0, False, 0
        for j in range(self.n):
            if t + j >= len(T):  # n-step look-ahead not complete yet
                return None
            if t + j - 1 in self.cuts[i] and j:  # the episode was interrupted: no n-step return
                return None
            y = T[t + j]
            ret, disc, m = ret + disc * y["r"], disc * self.gamma, m + 1
            done = done or y["term"]
            if y["term"] or y["trunc"]:
                break
        last = T[t + m - 1]
        if t + m - 1 in self.cuts[i] and not (last["term"] or last["trunc"]):
            return None  # its next obs was never seen
        if last["slot"] + 1 >= total:  # the bootstrap frame is not written yet
            return None
        return dict(obs=x["obs"], action=x["action"], ret=ret, next=last["next"], done=done, disc=disc)


def newest(obs, S):
    return (obs[-1] if S > 1 else obs).tobytes()


def check_against_reference(mem, ref, S, B, unique=True):
    """Sample B transitions; each must equal a valid reference transition in every field."""
    valid = {}
    for i, T in enumerate(ref.trans):
        for t in range(len(T)):
            e = ref.expected(i, t)
            if e is not None:
                valid.setdefault(newest(e["obs"], S), []).append(((i, t), e))
    batch = mem.sample(B)
    b = {k: v.cpu().numpy() for k, v in batch._asdict().items()}
    seen = set()
    for k in range(B):
        for key, e in valid.get(newest(b["obs"][k], S), []):
            if (np.array_equal(b["obs"][k], e["obs"]) and b["actions"][k] == e["action"]
                    and np.array_equal(b["next_obs"][k], e["next"])
                    and math.isclose(b["returns"][k], e["ret"], rel_tol=1e-5, abs_tol=1e-5)
                    and b["dones"][k] == float(e["done"])
                    and math.isclose(b["discounts"][k], e["disc"], rel_tol=1e-5)):
                seen.add(key)
                break
        else:
            raise AssertionError(f"sample {k} (slot {b['indices'][k]}) matches no valid reference transition")
    if unique:  # every valid transition can be drawn: the valid sets are equal
        assert seen == {key for v in valid.values() for key, _ in v}


CONFIGS = [  # N, S, frame shape, dtype, pad, n_step, slots per env, prioritized
    (3, 4, (6, 6), np.uint8, "zeros", 3, 37, False),
    (2, 4, (5, 5), np.uint8, "repeat", 1, 30, False),
    (3, 1, (4,), np.float32, "zeros", 5, 29, False),
    (2, 2, (3,), np.float32, "zeros", 2, 24, True),
]


@pytest.mark.parametrize("N,S,shape,dtype,pad,n,C,per", CONFIGS)
def test_matches_naive_reference(N, S, shape, dtype, pad, n, C, per):
    env = FakeVecEnv(N, S, shape, dtype, pad, p_term=0.06, p_trunc=0.05, seed=1)
    obs_shape = (S, *shape) if S > 1 else shape
    mem = ReplayMemory(N * C, N, obs_shape, torch.from_numpy(np.zeros(0, dtype)).dtype, S, gamma=0.9,
                       n_step=n, pad=pad, prioritized=per, device="cpu", seed=0)
    ref = NaiveReplay(N, S, C, n, 0.9)
    rng = np.random.default_rng(2)
    obs = env.reset()
    for step in range(260):  # ~8 wrap-arounds of the write cursors, ~20 episodes per env
        actions = rng.integers(0, 6, N)
        next_obs, raw, term, trunc, final = env.step(actions)
        mem.add(obs, actions, raw, term, trunc, final)
        for i in range(N):
            ref.add(i, obs[i], actions[i], raw[i], term[i], trunc[i], final[i] if term[i] | trunc[i] else next_obs[i])
        obs = next_obs
        if step > n and step % 23 == 0:
            check_against_reference(mem, ref, S, B=2500)
    assert sum(ref.episode) > 10 * N  # the stream did cross many episode ends


def _run_real_env(envs, mem, ref, steps, S, B, unique, seed):
    rng = np.random.default_rng(seed)
    obs, _ = envs.reset(seed=seed)
    for step in range(steps):
        actions = rng.integers(0, envs.single_action_space.n, envs.num_envs)
        next_obs, raw, term, trunc, info = envs.step(actions)
        mem.add(obs, actions, raw, term, trunc, info.get("final_obs"))
        for i in range(envs.num_envs):
            done = term[i] | trunc[i]
            ref.add(i, obs[i], actions[i], raw[i], term[i], trunc[i], info["final_obs"][i] if done else next_obs[i])
        obs = next_obs
        if step > 4 and step % 40 == 0:
            check_against_reference(mem, ref, S, B=B, unique=unique)
    return ref


def test_real_ale_stacks_and_episode_ends():
    """Real AtariVectorEnv: life losses terminate (episodic_life), a short frame limit truncates."""
    ale_vec = pytest.importorskip("ale_py.vector_env")
    envs = ale_vec.AtariVectorEnv("breakout", 2, autoreset_mode="SameStep", reward_clipping=False,
                                  episodic_life=True, max_num_frames_per_episode=80, num_threads=1)
    C = 70
    mem = ReplayMemory(2 * C, 2, (4, 84, 84), torch.uint8, 4, gamma=0.99, n_step=3, device="cpu", seed=0)
    ref = _run_real_env(envs, mem, NaiveReplay(2, 4, C, 3, 0.99), 241, 4, B=200, unique=False, seed=3)
    envs.close()
    ends = [(x["term"], x["trunc"]) for T in ref.trans for x in T]
    assert (True, False) in ends and (False, True) in ends  # both kinds of episode end happened


def test_real_cartpole_gymnasium_final_obs():
    """gymnasium SameStep vector env: final_obs is an object array with None for running envs."""
    import gymnasium as gym
    envs = gym.make_vec("CartPole-v1", num_envs=3, vectorization_mode="sync",
                        vector_kwargs={"autoreset_mode": gym.vector.AutoresetMode.SAME_STEP})
    mem = ReplayMemory(3 * 40, 3, (4,), torch.float32, 1, gamma=0.99, n_step=3, clip_rewards=False,
                       device="cpu", seed=0)
    ref = _run_real_env(envs, mem, NaiveReplay(3, 1, 40, 3, 0.99, clip=False), 201, 1, B=2000, unique=True, seed=4)
    assert sum(ref.episode) >= 5


def _filled_memory(prioritized, seed=0, steps=150, **kw):
    N, C = 2, 100
    env = FakeVecEnv(N, 1, (4,), np.float32, "zeros", p_term=0.05, p_trunc=0.03, seed=seed)
    mem = ReplayMemory(N * C, N, (4,), torch.float32, 1, n_step=2, prioritized=prioritized, device="cpu",
                       seed=seed, **kw)
    obs = env.reset()
    for _ in range(steps):
        next_obs, raw, term, trunc, final = env.step(np.zeros(N, dtype=np.int64))
        mem.add(obs, np.zeros(N, dtype=np.int64), raw, term, trunc, final)
        obs = next_obs
    return mem, env, obs


def test_prioritized_frequencies_and_weights():
    alpha = 0.7
    mem, _, _ = _filled_memory(True, alpha=alpha)
    valid = torch.unique(torch.cat([mem.sample(1000).indices for _ in range(40)]))  # all priorities = 1
    gen = torch.Generator().manual_seed(0)
    td = torch.rand(len(valid), generator=gen) * 5 - 2.5  # signed TD errors
    td[:5] = 0.0  # zero errors keep a small priority (eps)
    mem.update_priorities(valid, td)
    p = (td.abs() + mem.eps) ** alpha
    expected = (p / p.sum()).double()  # [V]

    counts = torch.zeros(mem.C * mem.N, dtype=torch.float64)
    draws = 0
    for _ in range(100):
        idx = mem.sample(1000).indices
        counts += torch.bincount(idx, minlength=len(counts)).double()
        draws += len(idx)
    assert counts.sum() == counts[valid].sum()  # never an invalid slot
    E, obs_c = expected * draws, counts[valid]
    chi2 = ((obs_c - E) ** 2 / E).sum().item()
    df = len(valid) - 1
    assert chi2 < df + 5 * (2 * df) ** 0.5, (chi2, df)
    E_uniform = torch.full_like(E, draws / len(valid))  # the test can tell proportional from uniform
    assert ((obs_c - E_uniform) ** 2 / E_uniform).sum().item() > 10 * df

    batch = mem.sample(256, beta=0.5)
    prob = torch.zeros(len(counts), dtype=torch.float64)
    prob[valid] = expected
    P = prob[batch.indices]
    w = (len(valid) * P) ** -0.5
    assert torch.allclose(batch.weights.double(), w / w.max(), rtol=1e-4)
    assert mem.beta() == pytest.approx(mem.beta0 + (1 - mem.beta0) * mem.num_sampled / mem.beta_steps)


def test_sum_tree_never_returns_an_empty_leaf():
    tree = _SumTree(3000, torch.device("cpu"))
    leaves = torch.zeros(3000, dtype=torch.float64)
    leaves[[5, 40, 1500, 2100]] = torch.tensor([0.1, 0.7, 0.2, 0.3], dtype=torch.float64)
    tree.rebuild(leaves)
    total = tree.levels[-1]
    u = torch.cat([torch.rand(2000, dtype=torch.float64) * total, total, total * (1 + 1e-12)])
    idx = tree.find(u)  # u >= total can only come from rounding; it must still land on a real leaf
    assert set(idx.tolist()) == {5, 40, 1500, 2100}
    assert idx[-1] == 2100 and idx[-2] == 2100


def test_uniform_weights_are_one():
    mem, _, _ = _filled_memory(False)
    assert torch.equal(mem.sample(64).weights, torch.ones(64))
    with pytest.raises(ValueError, match="prioritized=True"):
        mem.update_priorities(torch.zeros(1, dtype=torch.long), torch.zeros(1))


def test_absurd_buffer_raises_before_allocating(monkeypatch):
    def boom(*a, **k):
        raise AssertionError("allocated before checking memory")
    monkeypatch.setattr(torch, "zeros", boom)
    with pytest.raises(ReplayMemoryTooLarge, match=r"needs [\d.]+ GB.*smaller buffer_size"):
        ReplayMemory(10**9, 8, (4, 84, 84), torch.uint8, 4, device="cpu")


def test_bytes_needed_matches_allocation():
    per = ReplayMemory.bytes_needed(1_000_000, (4, 84, 84), torch.uint8, 4) / 1e6
    assert 84 * 84 < per < 84 * 84 * 1.03  # a frame stored once, ~7 KB per transition
    mem = ReplayMemory(8 * 500, 8, (4, 84, 84), torch.uint8, 4, prioritized=True, device="cpu")
    per_slot = [getattr(mem, k) for k in mem._TENSORS if k not in ("head", "count", "next_first", "max_prio")]
    allocated = sum(t.nbytes for t in per_slot + mem.tree.levels)
    assert allocated == ReplayMemory.bytes_needed(8 * 500, (4, 84, 84), torch.uint8, 4, True)


def test_missing_final_obs_is_an_error():
    mem = ReplayMemory(200, 2, (4,), torch.float32, device="cpu")
    with pytest.raises(ValueError, match="final_obs"):
        mem.add(np.zeros((2, 4)), np.zeros(2), np.zeros(2), np.array([True, False]), np.zeros(2, bool))


def test_save_load_round_trip(tmp_path):
    mem, _, _ = _filled_memory(True, seed=5)
    b = mem.sample(64)
    mem.update_priorities(b.indices, torch.linspace(-3, 3, 64))
    mem.save(str(tmp_path / "replay.pt"))
    other = ReplayMemory(200, 2, (4,), torch.float32, 1, n_step=2, prioritized=True, device="cpu", seed=99)
    other.load(str(tmp_path / "replay.pt"))
    assert not (tmp_path / "replay.pt.tmp").exists()
    for _ in range(3):  # same contents, priorities and generator state: identical batches
        for x, y in zip(mem.sample(128), other.sample(128)):
            assert torch.equal(x, y)
    wrong = ReplayMemory(200, 2, (4,), torch.float32, 1, n_step=3, prioritized=True, device="cpu")
    with pytest.raises(ValueError, match="config"):
        wrong.load(str(tmp_path / "replay.pt"))


@pytest.mark.parametrize("how", ["start_new_episodes", "store_last_step_as_truncated"])
def test_resume_after_load_matches_reference(tmp_path, how):
    """--resume: the buffer is restored but the envs restart from reset(). Either the memory is told
    (start_new_episodes) or the last step, held back before saving, is added as truncated (what
    agents/dqn.py does). No stack or n-step return may mix the interrupted episodes with the new ones."""
    N, S, C, n = 2, 4, 40, 3
    mem = ReplayMemory(N * C, N, (S, 6, 6), torch.uint8, S, gamma=0.9, n_step=n, device="cpu", seed=0)
    ref = NaiveReplay(N, S, C, n, 0.9)
    rng = np.random.default_rng(0)

    def add(mem, obs, actions, raw, term, trunc, next_obs, final):
        mem.add(obs, actions, raw, term, trunc, final)
        for i in range(N):
            ref.add(i, obs[i], actions[i], raw[i], term[i], trunc[i], final[i] if term[i] | trunc[i] else next_obs[i])

    def run(env, mem, steps, hold_last=False):
        obs = env.reset()
        for step in range(steps):
            actions = rng.integers(0, 6, N)
            next_obs, raw, term, trunc, final = env.step(actions)
            if hold_last and step == steps - 1:
                return obs, actions, raw, term, trunc, next_obs, np.where((term | trunc)[:, None, None, None], final, next_obs)
            add(mem, obs, actions, raw, term, trunc, next_obs, final)
            obs = next_obs
            if step % 11 == 5:
                check_against_reference(mem, ref, S, B=2000)

    pending = run(FakeVecEnv(N, S, (6, 6), np.uint8, "zeros", 0.03, 0.02, seed=7), mem, 60, hold_last=True)
    mem.save(str(tmp_path / "replay.pt"))
    resumed = ReplayMemory(N * C, N, (S, 6, 6), torch.uint8, S, gamma=0.9, n_step=n, device="cpu", seed=1)
    resumed.load(str(tmp_path / "replay.pt"))
    if how == "start_new_episodes":
        resumed.start_new_episodes()
        ref.cut()
    else:
        obs, actions, raw, term, trunc, next_obs, final = pending
        add(resumed, obs, actions, raw, term, ~term, next_obs, final)
    run(FakeVecEnv(N, S, (6, 6), np.uint8, "zeros", 0.03, 0.02, seed=8), resumed, 30)
