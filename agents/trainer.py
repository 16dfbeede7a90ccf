"""The one training loop, shared by every agent and every game (Atari, classic control, language models).

    collect -> learn -> log -> checkpoint -> evaluate

The trainer steps a batched env, hands each transition to the agent, asks it to learn when it is ready, and
owns everything around that: the run folder, TensorBoard, checkpoints (atomic), Ctrl-C, resume and the final
evaluation. Agents plug in through `agents.common.Agent` (act / observe / ready / update / state_dict).

Run folder contract (later tools rely on it):
    config.json          the resolved configuration
    events.out.tfevents* TensorBoard logs
    checkpoints/latest.pt  agent + optimizer + step counter + RNG states, written atomically
    summary.json         algo, game, steps, wall_seconds, train_seconds (wall minus evaluations), eval_seconds,
                         sps, final_eval_return_{mean,std}, final_eval_episodes, interrupted, stopped_by
"""

from __future__ import annotations

import json
import math
import signal
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from tqdm import tqdm

from agents.checkpoint import rng_state, save_checkpoint, set_rng_state
from agents.common import Agent, Transition
from agents.logger import Logger


@dataclass(frozen=True)
class TrainConfig:
    """What every run has, whatever the agent: length, envs, seed, device, logging, checkpoints, evaluation."""

    steps: int = 10_000_000
    """Total env steps (agent decisions, summed over envs; one Atari step is `frameskip` frames)."""
    num_envs: int = 8
    """Envs stepped together as one batch."""
    seed: int = 1
    """Seed for the envs, torch, numpy and Python."""
    device: str = "auto"
    """Training device: auto (CUDA when present, else CPU), cpu, cuda, cuda:N."""
    run_dir: str | None = None
    """Run folder (default: runs/<algo>_<game>_<seed>_<timestamp>)."""
    eval_episodes: int = 10
    """Episodes played (greedy) for the final evaluation; for text games, held-out problems."""
    eval_envs: int = 8
    """Envs used for evaluation."""
    eval_every: int = 0
    """Evaluate every this many steps during training (0: only at the end)."""
    eval_at_start: bool = False
    """Also evaluate before the first update (shows the starting point, e.g. an LM's initial accuracy)."""
    checkpoint_every: int = 100_000
    """Write checkpoints/latest.pt every this many steps (and always at the end or on Ctrl-C)."""
    progress: bool = True
    """Show a progress bar with steps/s and the recent episodic return."""
    train_minutes: float = 0.0
    """Stop once this many minutes have gone into training (evaluations excluded), then evaluate as at the end of
    a run; `summary.json` says `"stopped_by": "train_minutes"` (0: no limit, stop at `steps`). Counts this
    invocation only: a resumed run gets the budget afresh."""

    def validate(self) -> None:
        for name in ("steps", "num_envs", "eval_envs", "checkpoint_every"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}.")
        if self.eval_episodes < 0 or self.eval_every < 0:
            raise ValueError("eval_episodes and eval_every must be >= 0.")
        if not self.train_minutes >= 0:
            raise ValueError(f"train_minutes must be >= 0 (0 = no limit), got {self.train_minutes}.")


def evaluate(agent: Agent, env, episodes: int, video: list | None = None,
             transcript: list | None = None) -> dict[str, Any]:
    """Play `episodes` episodes greedily and return their raw scores.

    Each env plays the same number of episodes (ceil(episodes / num_envs)) and we keep them in round-robin
    order: stopping at the first `episodes` finished ones would favour short episodes. `video`, if a list,
    receives env 0's frames (RGB arrays) until its first episode ends. `transcript`, if a list, receives one dict
    per kept episode of a text game, in the order of `returns`: prompt, reference answer, completion, score.
    """
    n = env.num_envs
    quota = math.ceil(episodes / n)
    done_eps: list[list[tuple[float, int, dict | None]]] = [[] for _ in range(n)]
    obs, _ = env.reset()
    recording = video is not None and hasattr(env, "frame")
    while any(len(d) < quota for d in done_eps):
        if recording:
            video.append(env.frame(obs, 0))
        obs, _, _, _, info = env.step(agent.act(obs, explore=False))
        for i in np.flatnonzero(info["_episode"]):
            if len(done_eps[i]) < quota:
                record = None
                if transcript is not None and "completions" in info:  # text games: info holds what was scored
                    p = info["problems"][i]
                    record = {"prompt": p.prompt, "answer": p.answer, "completion": info["completions"][i],
                              "score": float(info["episode"]["r"][i])}
                done_eps[i].append((float(info["episode"]["r"][i]), int(info["episode"]["l"][i]), record))
            if i == 0:
                recording = False
    ordered = [done_eps[i][k] for k in range(quota) for i in range(n)][:episodes]
    returns = np.array([r for r, _, _ in ordered])
    if transcript is not None:
        transcript.extend(rec for _, _, rec in ordered if rec is not None)
    return {
        "return_mean": float(returns.mean()) if len(returns) else float("nan"),
        "return_std": float(returns.std()) if len(returns) else float("nan"),
        "length_mean": float(np.mean([l for _, l, _ in ordered])) if ordered else float("nan"),
        "episodes": len(ordered),
        "returns": returns.tolist(),
    }


class Trainer:
    """Runs `agent` on `env` for `config.steps` steps, writing everything into `run_dir`."""

    def __init__(
        self,
        agent: Agent,
        env,
        config: TrainConfig,
        run_dir: str | Path,
        *,
        algo: str,
        game: str,
        hparams: dict[str, Any] | None = None,
        make_eval_env: Callable[[int], Any] | None = None,
        score_name: str = "return",
        run_config: dict[str, Any] | None = None,
    ):
        config.validate()
        self.agent, self.env, self.cfg = agent, env, config
        self.run_dir = Path(run_dir)
        self.algo, self.game = algo, game
        self.hparams = hparams or {}
        self.run_config = run_config  # written to config.json by run(), once a resumed checkpoint has loaded
        self.make_eval_env = make_eval_env
        self.score_name = score_name  # "accuracy" for text games: their episodic return is 1 if correct, else 0
        self.global_step = 0
        self.updates = 0
        self.np_rng = np.random.default_rng(config.seed)
        self.ckpt_path = self.run_dir / "checkpoints" / "latest.pt"
        self.extra_summary: dict[str, Any] = {}
        self.eval_seconds = 0.0  # time spent in evaluate(), initial / periodic / final

    # -- checkpoints ---------------------------------------------------------------------------------
    def save(self) -> None:
        save_checkpoint(self.ckpt_path, {
            "agent": self.agent.state_dict(),
            "trainer": {"global_step": self.global_step, "updates": self.updates, "algo": self.algo,
                        "game": self.game, "extra_summary": self.extra_summary},
            "rng": rng_state(self.np_rng),
        })

    def restore(self, state: dict[str, Any]) -> None:
        t = state["trainer"]
        if (t["algo"], t["game"]) != (self.algo, self.game):
            raise ValueError(f"Cannot resume: the checkpoint is {t['algo']} on {t['game']}, not {self.algo} on {self.game}.")
        self.agent.load_state_dict(state["agent"])
        self.global_step, self.updates = int(t["global_step"]), int(t["updates"])
        self.extra_summary = dict(t.get("extra_summary", {}))
        set_rng_state(state["rng"], self.np_rng)

    # -- evaluation ----------------------------------------------------------------------------------
    def evaluate(self, episodes: int) -> dict[str, Any]:
        t0 = time.time()
        try:
            return self._evaluate(episodes)
        finally:
            self.eval_seconds += time.time() - t0  # kept apart, so train_seconds is the cost of learning alone

    def _evaluate(self, episodes: int) -> dict[str, Any]:
        env = self.make_eval_env(self.cfg.eval_envs) if self.make_eval_env else None
        if env is None:
            return {}
        try:
            return evaluate(self.agent, env, episodes)
        finally:
            env.close()

    # -- the loop ------------------------------------------------------------------------------------
    def _horizon(self, start_step: int, trained: float, budget: float) -> int:
        """The step at which this run will end: `steps`, or with `train_minutes` the step it reaches when the
        time runs out at its pace so far, if that comes first. Agents read their schedules (PPO's and the LM's
        `--anneal-lr`) as global_step / horizon, so a run stopped by time ends them with the run instead of
        part-way (1 - global_step / steps, when far fewer steps fit). From a fresh start this fraction is
        exactly trained / budget: the schedule runs on training seconds."""
        steps = self.cfg.steps
        if budget == math.inf or trained <= 0:
            return steps
        return max(1, min(steps, round(start_step + (self.global_step - start_step) * budget / trained)))

    def run(self, resume: dict[str, Any] | None = None) -> dict[str, Any]:
        cfg = self.cfg
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if resume is not None:
            self.restore(resume)
        if self.run_config is not None:  # after the restore: a refused resume leaves the run's config as it was
            write_json(self.run_dir / "config.json", self.run_config)
        # On resume, drop events a crashed run logged after its last checkpoint (steps > the checkpoint's).
        logger = Logger(str(self.run_dir), purge_step=self.global_step + 1 if resume else None)
        if resume is None:
            logger.hparams(self.hparams)
        start_step, start_time = self.global_step, time.time()
        self.eval_seconds = 0.0
        recent_returns: deque[float] = deque(maxlen=20)
        interrupted, stopped_by = False, "steps"
        budget = cfg.train_minutes * 60 if cfg.train_minutes else math.inf  # seconds of training, evals excluded
        bar = tqdm(total=cfg.steps, initial=self.global_step, disable=not cfg.progress, unit="step",
                   dynamic_ncols=True, mininterval=1.0)
        next_ckpt = self.global_step + cfg.checkpoint_every
        next_eval = self.global_step + cfg.eval_every if cfg.eval_every else math.inf
        stop = _StopSignals()  # Ctrl-C and SIGTERM: finish the step, then save and exit
        try:
            if cfg.eval_at_start and resume is None and cfg.eval_episodes:
                ev = self.evaluate(cfg.eval_episodes)
                self.extra_summary[f"initial_eval_{self.score_name}"] = ev.get("return_mean")
                self._log_eval(logger, ev)
            obs, _ = self.env.reset(seed=cfg.seed + self.global_step)
            while self.global_step < cfg.steps:
                if stop.requested:
                    raise KeyboardInterrupt  # here, between steps: nothing is half-written
                action = self.agent.act(obs)
                next_obs, reward, terminated, truncated, info = self.env.step(action)
                self.agent.observe(Transition(obs, action, reward, terminated, truncated, next_obs,
                                              info.get("final_obs", next_obs), info))
                obs = next_obs
                # The slots just stepped (a text game may lay out its next batch with more: set_group_size).
                self.global_step += len(reward)
                bar.update(len(reward))

                for i in np.flatnonzero(info["_episode"]):  # raw game scores of finished episodes
                    r, l = float(info["episode"]["r"][i]), int(info["episode"]["l"][i])
                    recent_returns.append(r)
                    logger.writer.add_scalar("charts/episodic_return", r, self.global_step)
                    logger.writer.add_scalar("charts/episodic_length", l, self.global_step)

                if self.agent.ready():
                    horizon = self._horizon(start_step, time.time() - start_time - self.eval_seconds, budget)
                    for k, v in self.agent.update(self.global_step, horizon).items():
                        logger.record(k, v)
                    self.updates += 1
                    sps = (self.global_step - start_step) / max(time.time() - start_time, 1e-9)
                    logger.record("charts/SPS", sps)
                    trained = time.time() - start_time - self.eval_seconds
                    logger.record("charts/train_seconds", trained)
                    logger.dump(self.global_step)
                    if recent_returns:
                        bar.set_postfix(sps=f"{sps:.0f}", ret=f"{np.mean(recent_returns):.2f}", refresh=False)
                    if trained >= budget:  # checked after an update, so the budget's last update is complete
                        stopped_by = "train_minutes"
                        break
                if self.global_step >= next_eval and self.global_step < cfg.steps:  # the final one follows
                    self._log_eval(logger, self.evaluate(cfg.eval_episodes))
                    next_eval += cfg.eval_every
                if self.global_step >= next_ckpt:
                    self.save()
                    next_ckpt += cfg.checkpoint_every
        except KeyboardInterrupt:
            interrupted = True  # save what we have before exiting: nothing is lost
            bar.write(f"Interrupted at step {self.global_step}: saving checkpoint and summary to {self.run_dir}")
        finally:
            bar.close()
            stop.restore()
        wall = time.time() - start_time
        train_seconds = wall - self.eval_seconds  # evaluations during training excluded
        self.save()
        final = {} if interrupted or not cfg.eval_episodes else self.evaluate(cfg.eval_episodes)
        if final:
            self._log_eval(logger, final)
        logger.close()
        summary = {
            "algo": self.algo,
            "game": self.game,
            "steps": self.global_step,
            "wall_seconds": time.time() - start_time,  # all of it: wall = train_seconds + eval_seconds + saving
            "train_seconds": train_seconds,
            "eval_seconds": self.eval_seconds,
            "sps": (self.global_step - start_step) / max(wall, 1e-9),
            "updates": self.updates,
            "interrupted": interrupted,
            "stopped_by": "interrupt" if interrupted else stopped_by,
            "final_eval_return_mean": final.get("return_mean"),
            "final_eval_return_std": final.get("return_std"),
            "final_eval_episodes": final.get("episodes", 0),
            "final_eval_returns": final.get("returns", []),
            **self.extra_summary,
        }
        if self.score_name != "return":
            summary[f"final_eval_{self.score_name}"] = final.get("return_mean")
        write_json(self.run_dir / "summary.json", summary)
        if interrupted:
            raise KeyboardInterrupt
        return summary

    def _log_eval(self, logger: Logger, ev: dict[str, Any]) -> None:
        if not ev:
            return
        logger.record("eval/return_mean", ev["return_mean"])
        logger.record("eval/return_std", ev["return_std"])
        if self.score_name != "return":
            logger.record(f"eval/{self.score_name}", ev["return_mean"])
        logger.dump(self.global_step)


class _StopSignals:
    """Ctrl-C (SIGINT) and SIGTERM (`kill`, `timeout`, a job scheduler; also background jobs, for which the shell
    ignores SIGINT) during training. The first only asks the loop to stop: it ends the current step, saves a
    checkpoint and the summary, and exits. A second raises KeyboardInterrupt at once (the run still saves).

    Why not raise at once, as Python's default handler does: the exception fires at whatever bytecode is
    running, possibly inside code that holds a lock (TensorBoard's event queue, a file being written), and the
    save that follows can then wait on it forever. Seen once in CI before this handler: a CartPole run that had
    not exited 60 s after Ctrl-C, with nothing printed."""

    def __init__(self) -> None:
        self.requested = False
        self.previous: dict[int, Any] = {}
        if threading.current_thread() is threading.main_thread():  # signal handlers live on the main thread
            for sig in (signal.SIGINT, signal.SIGTERM):
                self.previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested:
            raise KeyboardInterrupt(f"signal {signum}")
        self.requested = True
        print(f"\nponglab: signal {signum}: stopping after this step, then saving (again to stop at once)",
              file=sys.stderr, flush=True)

    def restore(self) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


def write_text(path: Path, text: str) -> None:
    """Write a run file atomically (a reader never sees half a file)."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)


def write_json(path: Path, data: dict[str, Any]) -> None:
    """Write JSON atomically."""
    write_text(path, json.dumps(data, indent=2, default=str) + "\n")
