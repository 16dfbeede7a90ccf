"""Replay memory for DQN: every frame stored once, stacks and n-step returns rebuilt on the device.

Usage (one `add` per `env.step` of a vector env with autoreset_mode="SameStep"):

    mem = ReplayMemory(capacity=1_000_000, num_envs=8, obs_shape=(4, 84, 84), frame_stack=4,
                       gamma=0.99, n_step=3, prioritized=False)        # CartPole: obs_shape=(4,),
    obs, _ = envs.reset(seed=0)                                        # obs_dtype=torch.float32
    next_obs, reward, terminated, truncated, info = envs.step(action)
    mem.add(obs, action, reward, terminated, truncated, info.get("final_obs"))
    obs = next_obs
    batch = mem.sample(32)                       # ReplayBatch of tensors on mem.device
    target = batch.returns + (1 - batch.dones) * batch.discounts * q_target(batch.next_obs).max(-1).values
    loss = (batch.weights * huber(q(batch.obs).gather(...) - target)).mean()
    mem.update_priorities(batch.indices, td_errors)                   # only matters if prioritized
    mem.save(path) / mem.load(path)       # atomic, weights_only; see start_new_episodes() for resume
    ReplayMemory.bytes_needed(capacity, obs_shape, obs_dtype, frame_stack, prioritized)  # -> bytes
    # The constructor raises ReplayMemoryTooLarge (a MemoryError) before allocating if it cannot fit.

`add` takes the *raw* env rewards (numpy or torch, leading dim N = num_envs); the memory keeps them and
their clipped sign (Nature DQN) which is what `returns` sums when `clip_rewards=True`. `final_obs` is the
true last observation of the envs whose episode ended this step (ALE `info["final_obs"]`, or gymnasium's
object array with None elsewhere); it may be None when no env is done.

Layout. Env e owns slots [e*C, (e+1)*C) (C = capacity // num_envs) of flat per-slot tensors; each slot
holds the newest frame of one observation (84*84 bytes for Atari) plus the transition taken from it.
A write cursor per env moves on one slot per step, plus one extra slot when an episode ends to hold
the final frame (it has no action), so stacks are rebuilt from consecutive slots of the same env.
The first `add` also writes the S-1 older frames of its stack, so that stack is rebuilt exactly.
ALE fills the stack with zeros at reset (checked: the reset obs of AtariVectorEnv is [0, 0, 0, f0]),
so frames from before an episode start are zeros (`pad="zeros"`; `pad="repeat"` copies the first
frame, like gymnasium's FrameStackObservation).

Validity. A slot can be sampled iff it holds a transition, its stack does not reach overwritten or
unwritten slots (crossing an episode start is fine: that part is padding), and its n-step look-ahead
is complete: n steps, or fewer if the episode ended (terminated: done=1; truncated: bootstrap from the
final obs). Validity only changes near the write cursors, so `add` recomputes it in a small window and
keeps it as the leaves of a sum tree (leaf = validity x priority^alpha), from which `sample` draws.
"""
from __future__ import annotations

import math
import os
from typing import NamedTuple

import numpy as np
import torch


class ReplayBatch(NamedTuple):
    obs: torch.Tensor        # [B, *obs_shape] stored dtype (uint8 for Atari): exactly what the env gave
    actions: torch.Tensor    # [B] int64
    returns: torch.Tensor    # [B] float32, sum_{j<k} gamma^j r_{t+j} (clipped rewards if clip_rewards)
    next_obs: torch.Tensor   # [B, *obs_shape] observation k steps later (the final obs if the episode ended)
    dones: torch.Tensor      # [B] float32, 1 = terminated within the k steps: do not bootstrap
    discounts: torch.Tensor  # [B] float32, gamma^k for the bootstrap term
    indices: torch.Tensor    # [B] int64 slot ids, to pass back to update_priorities
    weights: torch.Tensor    # [B] float32 importance weights (all 1 for uniform replay)


class ReplayMemoryTooLarge(MemoryError):
    """The requested buffer does not fit in the memory of its storage device."""


class _SumTree:
    """K-ary sum tree in flat tensors: levels[0] = leaves, levels[-1] = root [1].

    Why a tree and not torch.multinomial over all priorities: multinomial costs O(capacity) per batch
    (a 1M-element cumsum on every sample), the tree O(B * K * log_K capacity), without host sync.
    K = 64 keeps the tree 4 levels deep for 1M leaves (3 for 200k), so few kernel launches per batch.
    """
    K = 64

    @staticmethod
    def sizes(n: int) -> list[int]:
        out = []
        while n > 1:
            n = -(-n // _SumTree.K) * _SumTree.K  # pad each level to a multiple of K
            out.append(n)
            n //= _SumTree.K
        return out + [1]

    def __init__(self, n: int, device: torch.device):
        self.levels = [torch.zeros(s, dtype=torch.float64, device=device) for s in self.sizes(n)]

    def update(self, idx: torch.Tensor, values: torch.Tensor) -> None:
        """Set leaves[idx] = values [K] and recompute their ancestors from their children (no drift)."""
        self.levels[0][idx] = values.double()
        for d in range(1, len(self.levels)):
            idx = idx // self.K
            self.levels[d][idx] = self.levels[d - 1].view(-1, self.K)[idx].sum(-1)

    def rebuild(self, leaves: torch.Tensor) -> None:
        """Set all leaves [n] at once and recompute every level, O(n)."""
        self.levels[0].zero_()
        self.levels[0][: len(leaves)] = leaves.double()
        for d in range(1, len(self.levels)):
            parents = self.levels[d - 1].view(-1, self.K).sum(-1)
            self.levels[d][: len(parents)] = parents

    def find(self, u: torch.Tensor) -> torch.Tensor:
        """Leaf i such that cumsum(leaves)[i-1] <= u < cumsum(leaves)[i], for u [B] in [0, total)."""
        idx = torch.zeros_like(u, dtype=torch.long)
        ar = torch.arange(self.K, device=u.device)
        for d in range(len(self.levels) - 2, -1, -1):
            children = self.levels[d].view(-1, self.K)[idx]  # [B, K]
            csum = children.cumsum(-1)                       # [B, K]
            j = torch.searchsorted(csum, u[:, None], right=True)[:, 0]  # first child with cumsum > u
            # Rounding can push u past the last cumsum: never step into an empty (invalid) child.
            j = torch.minimum(j, ((children > 0) * ar).amax(-1))
            u = u - torch.where(j > 0, csum.gather(1, (j - 1).clamp(min=0)[:, None])[:, 0], 0.0)
            idx = idx * self.K + j
        return idx


class ReplayMemory:
    def __init__(self, capacity: int, num_envs: int, obs_shape: tuple[int, ...],
                 obs_dtype: torch.dtype = torch.uint8, frame_stack: int = 1, *, gamma: float = 0.99,
                 n_step: int = 1, clip_rewards: bool = True, pad: str = "zeros",
                 prioritized: bool = False, alpha: float = 0.6, beta0: float = 0.4,
                 beta_steps: int = 1_000_000, priority_eps: float = 1e-6,
                 device: str | torch.device | None = None, pin_memory: bool = False,
                 seed: int | None = None):
        """capacity: total transitions over all envs. obs_shape: one env's observation, e.g. (4, 84, 84)
        with frame_stack=4 (axis 0 is the stack), or (4,) with frame_stack=1 (the obs is one frame).
        prioritized: proportional PER (Schaul et al. 2016) with exponent alpha; importance weights use
        beta annealed linearly from beta0 to 1 over beta_steps calls of sample().
        device: training device (default CUDA if present). pin_memory: keep the storage in (page-locked)
        host RAM and move each sampled batch to `device`, for buffers larger than the GPU."""
        S, N = frame_stack, num_envs
        if S > 1 and (len(obs_shape) < 2 or obs_shape[0] != S):
            raise ValueError(f"obs_shape {obs_shape}: with frame_stack={S} axis 0 must be the stack")
        if pad not in ("zeros", "repeat"):
            raise ValueError(f"pad must be 'zeros' (ALE) or 'repeat' (gymnasium), got {pad!r}")
        self.C = capacity // N  # slots per env
        if self.C < n_step + 2 * S + 4:
            raise ValueError(f"capacity {capacity} gives {self.C} slots per env; need >= n_step+2*frame_stack+4")
        self.N, self.S, self.n, self.gamma, self.pad = N, S, n_step, gamma, pad
        self.obs_shape, self.frame_shape = tuple(obs_shape), tuple(obs_shape[1:] if S > 1 else obs_shape)
        self.clip_rewards, self.prioritized = clip_rewards, prioritized
        self.alpha, self.beta0, self.beta_steps, self.eps = alpha, beta0, beta_steps, priority_eps
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.store = torch.device("cpu") if pin_memory else self.device
        pin = pin_memory and torch.cuda.is_available()

        # Check before allocating anything: a clear error now beats an OOM hours into training.
        need = self.bytes_needed(self.C * N, obs_shape, obs_dtype, S, prioritized)
        avail, where = _available_bytes(self.store)
        if need > 0.9 * avail:
            raise ReplayMemoryTooLarge(
                f"Replay memory of {self.C * N:,} transitions needs {need / 1e9:.1f} GB on {where}, but only "
                f"{avail / 1e9:.1f} GB is available (10% kept free). Use a smaller buffer_size "
                f"({need / (self.C * N) / 1e3:.1f} KB per transition)"
                + (", or pin_memory=True to keep it in host RAM." if self.store.type == "cuda" else "."))

        M = self.C * N
        z = lambda dt, *shape: torch.zeros(M, *shape, dtype=dt, device=self.store, pin_memory=pin)
        self.frames = z(obs_dtype, *self.frame_shape)  # [M, *frame] newest frame of each stored obs
        self.actions = z(torch.int64)                   # [M] action taken from that obs
        self.rewards = z(torch.float32)                 # [M] clipped (or raw) reward used for returns
        self.raw_rewards = z(torch.float32)             # [M] env reward, kept for logging/analysis
        self.terminated, self.truncated = z(torch.bool), z(torch.bool)  # [M] episode ended after it
        self.first = z(torch.bool)     # [M] first frame of an episode: older slots are padding
        self.has_next = z(torch.bool)  # [M] an action was taken here (False: final frame, stack prefix)
        self.valid = z(torch.bool)     # [M] can be sampled now (see module docstring)
        self.prio = z(torch.float32) if prioritized else None  # [M] priority^alpha
        self.tree = _SumTree(M, self.store)
        self.head = torch.zeros(N, dtype=torch.long, device=self.store)   # [N] next slot to write
        self.count = torch.zeros(N, dtype=torch.long, device=self.store)  # [N] slots written (<= C)
        self.next_first = torch.zeros(N, dtype=torch.bool, device=self.store)  # [N] last add ended it
        self.max_prio = torch.ones((), device=self.store)  # new transitions get the max priority seen
        self.base = torch.arange(N, device=self.store) * self.C  # [N] first slot of each env
        self.gen = torch.Generator(device=self.store)
        self.gen.manual_seed(seed if seed is not None else torch.seed())
        self.steps_added = self.num_sampled = 0

    @staticmethod
    def bytes_needed(capacity: int, obs_shape: tuple[int, ...], obs_dtype: torch.dtype = torch.uint8,
                     frame_stack: int = 1, prioritized: bool = False) -> int:
        """Bytes this memory allocates for `capacity` transitions (frames + metadata + sum tree)."""
        frame = math.prod(obs_shape[1:] if frame_stack > 1 else obs_shape)
        per_slot = frame * obs_dtype.itemsize + 8 + 4 + 4 + 5  # frame, action, 2 rewards, 5 flags
        return capacity * (per_slot + 4 * prioritized) + 8 * sum(_SumTree.sizes(capacity))

    def __len__(self) -> int:
        """Slots written over all envs (host sync: for logging, not for the training loop)."""
        return int(self.count.sum())

    def _as_tensor(self, x, dtype=None) -> torch.Tensor:
        return torch.as_tensor(np.asarray(x) if not torch.is_tensor(x) else x, dtype=dtype).to(self.store)

    @torch.no_grad()
    def add(self, obs, actions, rewards, terminated, truncated, final_obs=None) -> None:
        """Store one vector-env step: obs [N, *obs_shape] the obs the actions [N] were taken in, raw
        rewards [N], terminated/truncated [N] bool, final_obs [N, *obs_shape] (rows of done envs used)."""
        N, S, C = self.N, self.S, self.C
        if tuple(obs.shape) != (N, *self.obs_shape):
            raise ValueError(f"obs has shape {tuple(obs.shape)}, expected {(N, *self.obs_shape)}")
        term = self._as_tensor(terminated, torch.bool)  # [N]
        trunc = self._as_tensor(truncated, torch.bool)  # [N]
        done = term | trunc
        old_head = self.head.clone()
        if self.steps_added == 0 and S > 1:  # stack prefix: the S-1 older frames of the first obs
            for k in range(S - 1):
                self.frames.index_copy_(0, self.base + k, self._as_tensor(obs[:, k], self.frames.dtype))
            self.head += S - 1
            self.count += S - 1
        raw = self._as_tensor(rewards, torch.float32)
        slot = self.base + self.head  # [N]
        self.frames.index_copy_(0, slot, self._as_tensor(obs[:, -1] if S > 1 else obs, self.frames.dtype))
        self.actions[slot] = self._as_tensor(actions).long()
        self.raw_rewards[slot] = raw
        self.rewards[slot] = raw.sign() if self.clip_rewards else raw
        self.terminated[slot], self.truncated[slot] = term, trunc
        self.first[slot], self.has_next[slot] = self.next_first, True
        if self.prioritized:
            self.prio[slot] = self.max_prio
        self.head = (self.head + 1) % C
        self.count = (self.count + 1).clamp(max=C)

        if final_obs is None:
            if bool(done.any()):
                raise ValueError("an episode ended but final_obs is None: pass info['final_obs'] "
                                 "(vector env with autoreset_mode='SameStep')")
        else:  # one extra slot per ended episode for its final frame; other envs keep the slot as is
            if isinstance(final_obs, np.ndarray) and final_obs.dtype == object:  # gymnasium: None rows
                final_obs = np.stack([f if f is not None else np.asarray(o) for f, o in zip(final_obs, obs)])
            fin = self._as_tensor(final_obs[:, -1] if S > 1 else final_obs, self.frames.dtype)  # [N, *frame]
            slot = self.base + self.head
            mask = done.view(N, *[1] * len(self.frame_shape))
            self.frames.index_copy_(0, slot, torch.where(mask, fin, self.frames.index_select(0, slot)))
            self.has_next[slot] &= ~done
            self.first[slot] &= ~done
            self.head = (self.head + done) % C
            self.count = (self.count + done).clamp(max=C)
        self.next_first = done
        self.steps_added += 1

        # Only slots within n+1 before the old cursor (their look-ahead grew) or up to S-1 after the
        # new one (their history got overwritten) can change validity: recompute that window [N, W].
        W = self.n + 2 * S + 3
        pos = (old_head[:, None] - self.n - 1 + torch.arange(W, device=self.store)) % C  # [N, W]
        idx = (self.base[:, None] + pos).flatten()                                        # [N*W]
        self.valid[idx] = self._lookahead(idx)[-1]
        self.tree.update(idx, self.valid[idx] * (self.prio[idx] if self.prioritized else 1.0))

    def _lookahead(self, idx: torch.Tensor, check: bool = True):
        """For slots idx [K]: (n-step return, done, discount, slot of the next obs, valid), all [K].
        check=False skips the validity test (valid=None): sample() only draws slots known to be valid."""
        C, p = self.C, idx % self.C
        base = idx - p
        ret = torch.zeros(idx.shape, device=idx.device)
        disc, done = torch.ones_like(ret), torch.zeros_like(idx, dtype=torch.bool)
        ended, m = torch.zeros_like(done), torch.zeros_like(idx)  # m: steps actually used, <= n
        cut = torch.zeros_like(done)  # look-ahead runs into another episode without an end (resume)
        for j in range(self.n):
            q = base + (p + j) % C
            active = ~ended
            if check and j:
                cut = cut | (active & self.first[q])
            ret = ret + active * disc * self.rewards[q]
            disc = torch.where(active, disc * self.gamma, disc)
            m = m + active
            done = done | (active & self.terminated[q])
            ended = ended | (active & (self.terminated[q] | self.truncated[q]))
        nxt = base + (p + m) % C
        if not check:
            return ret, done, disc, nxt, None
        e = idx // C
        count = self.count[e]
        age = (p - self.head[e]) % C - (C - count)  # [K] write order, 0 = oldest, < 0 = not written
        # All m look-ahead transitions and the bootstrap frame after them must be written (slots read
        # beyond the cursor hold stale data, but then age + m >= count and the slot is invalid anyway).
        ok = (age >= 0) & self.has_next[idx] & (age + m < count) & ~cut & (ended | ~self.first[nxt])
        alive = torch.ones_like(ok)  # frame p-k is in the same episode as p
        for k in range(1, self.S):
            alive = alive & ~self.first[base + (p - k + 1) % C]
            ok = ok & (~alive | (age >= k))  # a frame of the stack must not be overwritten
        return ret, done, disc, nxt, ok

    def _stack(self, idx: torch.Tensor) -> torch.Tensor:
        """Rebuild the observations [K, *obs_shape] whose newest frames are at slots idx [K]."""
        if self.S == 1:
            return self.frames.index_select(0, idx)  # index_select: much faster than frames[idx]
        K, C, p = len(idx), self.C, idx % self.C
        base = idx - p
        slots = idx[:, None].repeat(1, self.S)                 # [K, S] oldest ... newest
        alive = torch.ones_like(slots, dtype=torch.bool)       # [K, S] frame is from idx's episode
        for k in range(1, self.S):
            alive[:, -1 - k] = alive[:, -k] & ~self.first[base + (p - k + 1) % C]
            # Before the episode start, point at its first frame: that is the "repeat" padding.
            slots[:, -1 - k] = torch.where(alive[:, -1 - k], base + (p - k) % C, slots[:, -k])
        out = self.frames.index_select(0, slots.flatten()).view(K, self.S, *self.frame_shape)
        if self.pad == "zeros":  # ALE pads with zeros (mul_: much faster than a broadcast masked_fill_ on CPU)
            out.mul_(alive.view(K, self.S, *[1] * len(self.frame_shape)))
        return out

    def start_new_episodes(self) -> None:
        """The envs were reset without their episodes ending in add() (e.g. on resume after load(), when
        the last step was not stored as truncated): the next add() starts a new episode in every env,
        and no stack or n-step return will cross this cut (those transitions become invalid)."""
        self.next_first.fill_(True)

    def beta(self) -> float:
        return self.beta0 + (1 - self.beta0) * min(1.0, self.num_sampled / max(1, self.beta_steps))

    @torch.no_grad()
    def sample(self, batch_size: int, beta: float | None = None) -> ReplayBatch:
        """Draw batch_size valid transitions (with replacement), uniformly or by priority."""
        if self.steps_added <= self.n:
            raise ValueError(f"sample() needs more than n_step={self.n} add() calls first "
                             f"(got {self.steps_added}); start learning later")
        total = self.tree.levels[-1]  # [1]
        u = torch.rand(batch_size, dtype=torch.float64, device=self.store, generator=self.gen) * total
        idx = self.tree.find(torch.minimum(u, torch.nextafter(total, torch.zeros_like(total))))  # [B]
        ret, done, disc, nxt, _ = self._lookahead(idx, check=False)
        if self.prioritized:  # w_i = (M P_i)^-beta / max_batch w_j = (min_batch P_j / P_i)^beta
            prob = self.tree.levels[0][idx] / total
            weights = ((prob.min() / prob) ** (self.beta() if beta is None else beta)).float()
        else:
            weights = torch.ones_like(ret)
        self.num_sampled += 1
        obs, next_obs = self._stack(torch.cat([idx, nxt])).split(batch_size)  # one gather for both
        batch = ReplayBatch(obs, self.actions[idx], ret, next_obs, done.float(), disc, idx, weights)
        if self.store != self.device:  # host storage: one transfer per batch
            batch = ReplayBatch(*(t.to(self.device, non_blocking=True) for t in batch))
        return batch

    @torch.no_grad()
    def update_priorities(self, indices: torch.Tensor, td_errors: torch.Tensor) -> None:
        """Proportional PER: priority = (|td_error| + eps)^alpha for the sampled slots [B]."""
        if not self.prioritized:
            raise ValueError("update_priorities needs ReplayMemory(..., prioritized=True)")
        idx = indices.to(self.store)
        p = (td_errors.detach().to(self.store).abs().float() + self.eps) ** self.alpha  # [B]
        self.prio[idx] = p
        self.max_prio = torch.maximum(self.max_prio, p.max())
        self.tree.update(idx, self.valid[idx] * self.prio[idx])  # a slot that became invalid stays 0

    _TENSORS = ("frames", "actions", "rewards", "raw_rewards", "terminated", "truncated", "first",
                "has_next", "valid", "prio", "head", "count", "next_first", "max_prio")

    def _config(self) -> dict:
        return dict(C=self.C, N=self.N, S=self.S, n=self.n, gamma=self.gamma, obs_shape=self.obs_shape,
                    dtype=str(self.frames.dtype), prioritized=self.prioritized, pad=self.pad)

    def state_dict(self) -> dict:
        sd = {k: getattr(self, k) for k in self._TENSORS if getattr(self, k) is not None}
        return sd | dict(config=self._config(), steps_added=self.steps_added,
                         num_sampled=self.num_sampled, rng=self.gen.get_state())

    def load_state_dict(self, sd: dict) -> None:
        if sd["config"] != self._config():
            raise ValueError(f"checkpoint replay config {sd['config']} != this memory {self._config()}")
        for k in self._TENSORS:
            if getattr(self, k) is not None:
                getattr(self, k).copy_(sd[k])
        self.steps_added, self.num_sampled = sd["steps_added"], sd["num_sampled"]
        self.gen.set_state(sd["rng"])
        self.tree.rebuild(self.valid * (self.prio if self.prioritized else 1.0))

    def save(self, path: str) -> None:
        """Atomic: write a temp file, then rename, so a crash never leaves a half-written buffer."""
        tmp = f"{path}.tmp"
        torch.save(self.state_dict(), tmp)
        os.replace(tmp, path)

    def load(self, path: str) -> None:
        # mmap: the file is paged in while copying, not loaded into RAM a second time.
        self.load_state_dict(torch.load(path, map_location="cpu", weights_only=True, mmap=True))


def _available_bytes(device: torch.device) -> tuple[int, str]:
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0], f"GPU {device}"
    try:
        with open("/proc/meminfo") as f:
            kb = next(int(line.split()[1]) for line in f if line.startswith("MemAvailable:"))
        return kb * 1024, "host RAM"
    except (OSError, StopIteration):
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"), "host RAM"
