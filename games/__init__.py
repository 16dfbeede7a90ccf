"""Every game ponglab can train on, made by one function: `make(name, num_envs, seed)`.

Whatever the game, `make` returns a batched environment with the Gymnasium 1.x vector-env shape:

    obs, info = env.reset(seed=0)                         # obs: [N, ...]
    obs, reward, terminated, truncated, info = env.step(actions)

with *same-step* autoreset (the returned `obs` of a finished env is the first observation of its next
episode), `info["final_obs"]` (dense `[N, ...]`: the true last observation where an episode ended),
and `info["episode"]["r"]` / `info["episode"]["l"]` masked by `info["_episode"]`: the raw score and
length of every episode that ended this step. `reward` is what the learner sees (clipped on Atari).

Names: any ALE ROM by short name (`pong`, `space_invaders`) or full id (`ALE/Pong-v5`), classic control
(`cartpole`, `acrobot`, `mountaincar` or their gymnasium ids) and verifiable text games (`addition`, ...).
"""

from __future__ import annotations

import difflib
import re
from typing import Any

from games.atari import AtariConfig, AtariGame, rom_ids
from games.classic import CLASSIC_GAMES, ClassicGame

__all__ = ["AtariConfig", "GameSpec", "UnknownGameError", "list_games", "make", "resolve"]


class UnknownGameError(ValueError):
    """Raised for a game name that matches nothing ponglab knows."""


def _text_games() -> list[str]:
    try:
        from games.text import list_text_games
    except ImportError:
        return []
    return list_text_games()


def list_games() -> dict[str, list[str]]:
    """Short names of every trainable game, grouped by kind."""
    return {"atari": rom_ids(), "classic": sorted(CLASSIC_GAMES), "text": sorted(_text_games())}


class GameSpec:
    """A resolved game name: its kind (`atari`, `classic`, `text`) and the id its backend understands."""

    def __init__(self, kind: str, name: str, backend_id: str):
        self.kind, self.name, self.backend_id = kind, name, backend_id

    def __repr__(self) -> str:
        return f"GameSpec(kind={self.kind!r}, name={self.name!r}, backend_id={self.backend_id!r})"


def _snake(camel: str) -> str:
    # "SpaceInvaders" -> "space_invaders", "MsPacman" -> "ms_pacman"
    return re.sub(r"(?<!^)(?=[A-Z])", "_", camel).lower()


def resolve(name: str) -> GameSpec:
    """Map a user-typed game name to a `GameSpec`, or raise `UnknownGameError` listing close matches."""
    key = name.strip()
    m = re.fullmatch(r"(?:ALE/)?([A-Za-z0-9]+)(?:NoFrameskip)?-v\d+", key)
    if key.startswith("ALE/") and m:
        key = _snake(m.group(1))
    low = key.lower().replace("-", "_")
    roms = rom_ids()
    if low in roms:
        return GameSpec("atari", low, low)
    if low in CLASSIC_GAMES:
        return GameSpec("classic", low, CLASSIC_GAMES[low])
    for short, gym_id in CLASSIC_GAMES.items():
        if key == gym_id:
            return GameSpec("classic", short, gym_id)
    if low in _text_games():
        return GameSpec("text", low, low)
    candidates = roms + sorted(CLASSIC_GAMES) + _text_games()
    close = difflib.get_close_matches(low, candidates, n=5, cutoff=0.6)
    hint = f" Did you mean: {', '.join(close)}?" if close else ""
    raise UnknownGameError(f"Unknown game {name!r}.{hint} Run `ponglab games` to list every game.")


def make(
    name: str,
    num_envs: int = 8,
    seed: int = 0,
    atari: AtariConfig | None = None,
    render: bool = False,
    **text_options: Any,
):
    """Make `num_envs` copies of game `name`, stepped as one batch.

    `atari` configures Atari preprocessing; `render=True` lets classic games draw frames for videos;
    `text_options` (e.g. `group_size=4`, `digits=3`, `split="test"`) go to text games.
    """
    if num_envs <= 0:
        raise ValueError(f"num_envs must be positive, got {num_envs}.")
    spec = resolve(name)
    if spec.kind == "atari":
        env = AtariGame(spec.backend_id, num_envs, seed=seed, config=atari or AtariConfig())
    elif spec.kind == "classic":
        env = ClassicGame(spec.backend_id, num_envs, seed=seed, render=render)
    else:
        from games.text import make_text_game

        env = make_text_game(spec.backend_id, num_envs, seed=seed, **text_options)
    env.spec = spec
    return env
