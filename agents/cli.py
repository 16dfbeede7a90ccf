"""The `ponglab` command line.

    ponglab games                          list every trainable game
    ponglab train ALGO GAME [options]      train, writing a run folder (options: ponglab train ALGO GAME --help)
    ponglab eval RUN_DIR [--episodes N] [--video]

Options are read by `tyro` from the config dataclasses (TrainConfig, PPOConfig, AtariConfig, ...): every
field's docstring is its --help text. Flags are flat (`--lr`, not `--ppo.lr`), so field names are unique
across the configs of one algorithm.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import tyro

from agents.builders import ALGOS, AlgoSpec, build_agent, default_args, make_env_fn
from agents.checkpoint import CheckpointError, load_checkpoint
from agents.common import resolve_device, seed_everything
from agents.trainer import Trainer, evaluate, write_json, write_text

USAGE = """usage: ponglab {games,train,eval} ...

  ponglab games                          list every trainable game
  ponglab train ALGO GAME [options]      train ALGO (ppo, dqn) on GAME; see: ponglab train ppo pong --help
  ponglab eval RUN_DIR [options]         play a trained agent; see: ponglab eval --help
"""


def _fail(msg: str) -> None:
    print(f"ponglab: error: {msg}", file=sys.stderr)
    raise SystemExit(2)


def from_dict(cls, data: dict[str, Any]):
    """Rebuild a (nested) config dataclass from `dataclasses.asdict` output, ignoring unknown keys."""
    kwargs = {}
    defaults = cls()
    for f in dataclasses.fields(cls):
        if f.name not in data:
            continue
        default = getattr(defaults, f.name)
        if dataclasses.is_dataclass(default):
            kwargs[f.name] = from_dict(type(default), data[f.name])
        elif isinstance(default, tuple) and isinstance(data[f.name], list):
            kwargs[f.name] = tuple(data[f.name])
        else:
            kwargs[f.name] = data[f.name]
    return cls(**kwargs)


def cmd_games(argv: list[str]) -> None:
    if argv and argv[0] in ("-h", "--help"):
        print("usage: ponglab games\n\nList every game `ponglab train` accepts, by kind.")
        return
    from games import list_games

    for kind, names in list_games().items():
        print(f"{kind} ({len(names)}):")
        print("  " + ", ".join(names))
    print("\nAtari games also accept full ids (ALE/Pong-v5); classic ones their gymnasium ids (CartPole-v1).")


def cmd_train(argv: list[str]) -> None:
    if len(argv) < 2 or argv[0].startswith("-") or argv[1].startswith("-"):
        print("usage: ponglab train ALGO GAME [options]\n\n"
              f"  ALGO  one of: {', '.join(ALGOS)}\n"
              "  GAME  any name from `ponglab games` (pong, breakout, cartpole, addition, ...)\n\n"
              "Options depend on ALGO and GAME: ponglab train ppo pong --help")
        if not any(a in ("-h", "--help") for a in argv):
            raise SystemExit(2)
        return
    algo, game, rest = argv[0].lower(), argv[1], argv[2:]
    if algo not in ALGOS:
        _fail(f"unknown algorithm {algo!r}; choose one of: {', '.join(ALGOS)}.")
    from games import UnknownGameError, resolve

    try:
        spec = resolve(game)
    except UnknownGameError as e:
        _fail(str(e))
    algo_spec: AlgoSpec = ALGOS[algo]
    args_cls = algo_spec.args_for(spec.kind)

    # --resume DIR: the saved configuration is the default, flags given now override it.
    resume_dir = None
    for i, a in enumerate(rest):
        if a == "--resume" and i + 1 < len(rest):
            resume_dir = rest[i + 1]
        elif a.startswith("--resume="):
            resume_dir = a.split("=", 1)[1]
    default = default_args(algo, spec)
    if resume_dir is not None:
        cfg_path = Path(resume_dir) / "config.json"
        if not cfg_path.exists():
            _fail(f"--resume {resume_dir}: no config.json there. Give the run folder of an earlier `ponglab train`.")
        saved = json.loads(cfg_path.read_text())
        default = from_dict(args_cls, saved["args"])
    args = tyro.cli(args_cls, args=rest, default=default, prog=f"ponglab train {algo} {game}",
                    config=(tyro.conf.OmitArgPrefixes,), description=algo_spec.description)
    try:
        summary = train(algo, spec.name, args, resume_dir=resume_dir)
    except (ValueError, CheckpointError, MemoryError) as e:
        _fail(str(e))
    except KeyboardInterrupt:
        raise SystemExit(130)
    print(json.dumps({k: v for k, v in summary.items() if k != "final_eval_returns"}, indent=2))


def train(algo: str, game: str, args, resume_dir: str | None = None) -> dict[str, Any]:
    """Train `algo` on `game` with the resolved `args` (the algorithm's Args dataclass); returns the summary."""
    from games import resolve

    spec = resolve(game)
    tc = args.train
    run_dir = Path(resume_dir or tc.run_dir or f"runs/{algo}_{spec.name}_{tc.seed}_{time.strftime('%Y%m%d-%H%M%S')}")
    resume_state = load_checkpoint(run_dir) if resume_dir else None
    seed_everything(tc.seed)
    device = resolve_device(tc.device)
    env_fn = make_env_fn(spec, args)
    env = env_fn(tc.num_envs, tc.seed)
    try:
        agent = build_agent(algo, spec, args, env, device)
        run_dir.mkdir(parents=True, exist_ok=True)
        config = {"algo": algo, "game": spec.name, "game_kind": spec.kind, "device": str(device),
                  "args": dataclasses.asdict(args), "versions": _versions()}
        hparams = _flatten(dataclasses.asdict(args))
        eval_fn = make_env_fn(spec, args, split="test")  # text games: the fixed held-out set
        trainer = Trainer(agent, env, tc, run_dir, algo=algo, game=spec.name, hparams=hparams,
                          make_eval_env=lambda n: eval_fn(n, tc.seed + 10_000),
                          score_name="accuracy" if spec.kind == "text" else "return", run_config=config)
        return trainer.run(resume=resume_state)
    finally:
        env.close()


def cmd_eval(argv: list[str]) -> None:
    @dataclasses.dataclass(frozen=True)
    class EvalArgs:
        """Play a trained agent greedily and report its raw game score (mean ± std)."""

        run_dir: tyro.conf.Positional[str]
        """Run folder written by `ponglab train`."""
        episodes: int = 10
        """Episodes to play (text games: held-out problems)."""
        envs: int = 0
        """Envs to play them on (0: the run's eval_envs)."""
        video: bool = False
        """Also write RUN_DIR/videos/eval.mp4 of the first episode of env 0 (a GIF if ffmpeg is missing)."""
        device: str = "auto"
        """Device to run the network on."""
        seed: int = 12345
        """Seed of the evaluation envs."""
        completions: bool = False
        """Text games: also write RUN_DIR/eval_completions.jsonl, one line per held-out problem (prompt, answer,
        completion, score), to see what the model gets wrong."""

    a = tyro.cli(EvalArgs, args=argv, prog="ponglab eval")
    run_dir = Path(a.run_dir)
    if not (run_dir / "config.json").exists():
        _fail(f"{run_dir} has no config.json: give a run folder written by `ponglab train`.")
    if a.episodes <= 0:
        _fail(f"episodes must be positive, got {a.episodes}.")
    saved = json.loads((run_dir / "config.json").read_text())
    from games import resolve

    algo, spec = saved["algo"], resolve(saved["game"])
    args = from_dict(ALGOS[algo].args_for(spec.kind), saved["args"])
    try:
        state = load_checkpoint(run_dir)
        device = resolve_device(a.device)
    except (CheckpointError, ValueError) as e:
        _fail(str(e))
    seed_everything(a.seed)
    env_fn = make_env_fn(spec, args, split="test", video=a.video)
    env = env_fn(a.envs or args.train.eval_envs, a.seed)
    agent = build_agent(algo, spec, args, env, device)
    agent.load_state_dict(state["agent"])
    frames: list | None = [] if a.video else None
    transcript: list | None = [] if a.completions else None
    result = evaluate(agent, env, a.episodes, video=frames, transcript=transcript)
    env.close()
    print(f"{algo} on {spec.name}: {result['return_mean']:.2f} ± {result['return_std']:.2f} "
          f"over {result['episodes']} episodes (raw game score; step {state['trainer']['global_step']})")
    write_json(run_dir / "eval.json", {**result, "checkpoint_step": state["trainer"]["global_step"]})
    if frames:
        print(f"video: {save_video(frames, run_dir / 'videos')}")
    if a.completions:
        if not transcript:
            _fail(f"--completions is for text games; {spec.name} has no completions to write.")
        path = run_dir / "eval_completions.jsonl"
        write_text(path, "".join(json.dumps(rec) + "\n" for rec in transcript))
        print(f"completions: {path} ({sum(rec['score'] < 1 for rec in transcript)} of {len(transcript)} scored below 1)")


def save_video(frames: list, folder: Path, fps: int = 30) -> Path:
    import imageio.v2 as imageio

    folder.mkdir(parents=True, exist_ok=True)
    try:
        path = folder / "eval.mp4"
        imageio.mimsave(path, frames, fps=fps, macro_block_size=1)
    except Exception:  # no ffmpeg backend: a GIF needs nothing extra
        path = folder / "eval.gif"
        imageio.mimsave(path, frames, duration=1 / fps)
    return path


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {}
    for pkg in ("torch", "gymnasium", "ale-py", "numpy", "transformers"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    out["python"] = sys.version.split()[0]
    return out


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # models come from installed packages or local paths
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return
    commands = {"games": cmd_games, "train": cmd_train, "eval": cmd_eval}
    if argv[0] not in commands:
        _fail(f"unknown command {argv[0]!r}.\n{USAGE}")
    commands[argv[0]](argv[1:])


if __name__ == "__main__":
    main()
