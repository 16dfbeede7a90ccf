"""Which configuration each algorithm takes on each kind of game, and how to build its agent and envs.

This is the only place that knows the pairing (algorithm x game kind): the trainer and the agents do not.
Adding an algorithm = one `AlgoSpec` entry in `ALGOS`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Callable

import torch

from agents.ppo import CLASSIC_PPO, PPO, PPOConfig
from agents.trainer import TrainConfig
from games import AtariConfig, GameSpec, make


@dataclass(frozen=True)
class PPOArgs:
    """PPO on Atari or classic control."""

    train: TrainConfig = TrainConfig()
    ppo: PPOConfig = PPOConfig()
    atari: AtariConfig = AtariConfig()
    resume: str | None = None
    """Continue the run in this folder from its latest checkpoint (its saved config is the default; flags override)."""


@dataclass
class AlgoSpec:
    description: str
    args: dict[str, type]  # game kind -> Args dataclass
    defaults: Callable[[GameSpec], Any]  # the published defaults for this kind of game
    build: Callable[[GameSpec, Any, Any, torch.device], Any]  # (spec, args, env, device) -> agent

    def args_for(self, kind: str) -> type:
        if kind not in self.args:
            raise ValueError(f"this algorithm does not train {kind} games (it trains: {', '.join(self.args)}).")
        return self.args[kind]


def _ppo_defaults(spec: GameSpec) -> PPOArgs:
    if spec.kind == "classic":  # rl-zoo3's CartPole settings: solved well inside 100k steps
        return PPOArgs(train=TrainConfig(steps=100_000, num_envs=8, checkpoint_every=50_000), ppo=CLASSIC_PPO)
    return PPOArgs()


def _build_ppo(spec: GameSpec, args: PPOArgs, env, device: torch.device) -> PPO:
    # num_envs from the config, not the env: `ponglab eval` rebuilds the agent around an env of another size.
    return PPO(args.ppo, env.single_observation_space, env.single_action_space, args.train.num_envs, device)


ALGOS: dict[str, AlgoSpec] = {
    "ppo": AlgoSpec(
        description="Train PPO. Defaults: the published Atari settings (8 envs x 128 steps, 4 epochs, 4 minibatches, "
        "lr 2.5e-4, clip 0.1); classic control uses rl-zoo3's CartPole settings.",
        args={"atari": PPOArgs, "classic": PPOArgs},
        defaults=_ppo_defaults,
        build=_build_ppo,
    ),
}


def register(name: str, spec: AlgoSpec) -> None:
    """Add an algorithm (or more game kinds to an existing one)."""
    if name in ALGOS:
        old = ALGOS[name]
        ALGOS[name] = AlgoSpec(old.description, {**old.args, **spec.args},
                               lambda s: (spec if s.kind in spec.args else old).defaults(s),
                               lambda s, a, e, d: (spec if s.kind in spec.args else old).build(s, a, e, d))
    else:
        ALGOS[name] = spec


def _load_plugins() -> None:
    # DQN and the LM agent register themselves when their modules exist (they are separate pieces).
    import importlib

    for mod in ("agents.dqn", "llm_bridge.agent"):
        try:
            m = importlib.import_module(mod)
        except ModuleNotFoundError as e:
            if e.name in (mod, "llm_bridge.agent", "agents.dqn"):
                continue
            raise
        if hasattr(m, "register_algos"):
            m.register_algos(register)


def default_args(algo: str, spec: GameSpec) -> Any:
    return ALGOS[algo].defaults(spec)


def build_agent(algo: str, spec: GameSpec, args: Any, env, device: torch.device) -> Any:
    return ALGOS[algo].build(spec, args, env, device)


def make_env_fn(spec: GameSpec, args: Any, split: str = "train", video: bool = False) -> Callable[[int, int], Any]:
    """A function (num_envs, seed) -> batched env for this game, configured from `args`."""
    options: dict[str, Any] = {}
    if spec.kind == "atari":
        options["atari"] = getattr(args, "atari", AtariConfig())
    elif spec.kind == "classic":
        options["render"] = video
    elif hasattr(args, "env_options"):
        options.update(args.env_options(split))
    return lambda num_envs, seed: make(spec.name, num_envs=num_envs, seed=seed, **options)


def args_to_dict(args: Any) -> dict[str, Any]:
    return dataclasses.asdict(args)


_load_plugins()
