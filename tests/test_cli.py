"""End to end through the `ponglab` CLI: the run-folder contract, bad input, Ctrl-C, resume, eval."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from agents.cli import main
from agents.trainer import TrainConfig, Trainer
from games import AtariConfig, make

CONTRACT = ["algo", "game", "steps", "wall_seconds", "train_seconds", "eval_seconds", "sps", "final_eval_return_mean", "final_eval_return_std",
            "final_eval_episodes"]


def scalars(run_dir: Path) -> dict[str, list]:
    acc = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def run_cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "agents.cli", *args], capture_output=True, text=True, timeout=timeout)


def test_pong_smoke_writes_the_run_folder_contract(tmp_path):
    run = tmp_path / "pong"
    # Short episodes (400 frames = 100 steps) so some finish during training and the evaluation is quick.
    main(["train", "ppo", "pong", "--run-dir", str(run), "--steps", "512", "--num-envs", "4", "--num-steps", "64",
          "--eval-episodes", "2", "--eval-envs", "2", "--max-episode-frames", "400", "--no-progress"])
    summary = json.loads((run / "summary.json").read_text())
    for key in CONTRACT:
        assert key in summary, key
    assert summary["algo"] == "ppo" and summary["game"] == "pong" and summary["steps"] == 512
    assert summary["final_eval_episodes"] == 2 and summary["sps"] > 0
    # Evaluation time is kept apart: train_seconds excludes it, wall_seconds covers both.
    assert summary["eval_seconds"] > 0 and 0 < summary["train_seconds"]
    assert summary["train_seconds"] + summary["eval_seconds"] <= summary["wall_seconds"] + 1e-6
    assert (run / "checkpoints" / "latest.pt").exists()
    config = json.loads((run / "config.json").read_text())
    assert config["args"]["ppo"]["num_steps"] == 64 and config["args"]["atari"]["max_episode_frames"] == 400
    tags = scalars(run)
    for tag in ["charts/episodic_return", "charts/episodic_length", "charts/SPS", "charts/learning_rate",
                "losses/policy_loss", "losses/value_loss", "losses/entropy", "losses/approx_kl", "losses/clipfrac"]:
        assert tag in tags, tag
    # Raw Pong scores: a random player loses points, each worth -1 raw; truncated at 2,000 frames
    # at 400 frames it cannot lose all 21, and a score is an integer.
    returns = [v for _, v in tags["charts/episodic_return"]]
    assert all(float(r).is_integer() and -21 <= r <= 21 for r in returns)


class AlwaysFire:
    """A scripted agent: FIRE every step, never learns. Enough to check what the trainer logs."""

    def act(self, obs, explore=True):
        return np.ones(len(obs), dtype=np.int64)

    def observe(self, transition):
        self.rewards_seen = getattr(self, "rewards_seen", set()) | set(np.unique(transition.reward).tolist())

    def ready(self):
        return False

    def update(self, global_step, total_steps):
        return {}

    def state_dict(self):
        return {}

    def load_state_dict(self, state):
        pass


def test_logged_episodic_return_is_the_raw_score(tmp_path):
    """Space Invaders pays 5-30 points per alien; the learner's rewards are clipped to +1. TensorBoard must show
    the raw score: the same number as ale-py's own unclipped reward sum for the same seed and actions."""
    from ale_py.vector_env import AtariVectorEnv

    cfg = AtariConfig(sticky_actions=0.0, max_episode_frames=2000, noop_max=0)
    env = make("space_invaders", num_envs=2, seed=7, atari=cfg)
    agent = AlwaysFire()
    Trainer(agent, env, TrainConfig(steps=2 * 500, num_envs=2, eval_episodes=0, progress=False), tmp_path / "si",
            algo="scripted", game="space_invaders").run()
    assert agent.rewards_seen <= {0.0, 1.0}  # the learner saw clipped rewards
    logged = [v for _, v in scalars(tmp_path / "si")["charts/episodic_return"]]

    ref = AtariVectorEnv("space_invaders", 2, autoreset_mode="SameStep", reward_clipping=False,
                         repeat_action_probability=0.0, max_num_frames_per_episode=2000, noop_max=0)
    ref.reset(seed=7)
    totals = np.zeros(2)
    for _ in range(500):  # 2,000 frames / frameskip 4: both episodes are truncated on the last step
        totals += ref.step(np.ones(2, dtype=np.int64))[1]
    ref.close()
    assert sorted(logged) == sorted(totals.tolist())
    assert max(logged) > 20 and all(r % 5 == 0 for r in logged)  # raw points, not a count of hits


class SlowLearner(AlwaysFire):
    """Learns after every step, and each update takes 50 ms: a run whose training time is known."""

    def ready(self):
        return True

    def __init__(self):
        self.progress = []  # global_step / total_steps at each update: what an lr schedule reads

    def update(self, global_step, total_steps):
        self.progress.append(global_step / total_steps)
        time.sleep(0.05)
        return {}


def test_train_minutes_stops_after_the_budget_and_still_evaluates(tmp_path):
    env = make("cartpole", num_envs=2, seed=1)
    cfg = TrainConfig(steps=1_000_000, num_envs=2, eval_episodes=2, eval_envs=2, progress=False,
                      train_minutes=0.5 / 60)  # 0.5 s of training: ~10 updates of 50 ms
    agent = SlowLearner()
    summary = Trainer(agent, env, cfg, tmp_path / "budget", algo="scripted", game="cartpole",
                      make_eval_env=lambda n: make("cartpole", num_envs=n, seed=99)).run()
    assert summary["stopped_by"] == "train_minutes" and not summary["interrupted"]
    # The horizon the agent sees is where the time runs out, not the 1,000,000 steps: its schedules end with the
    # run. The fraction is the share of the budget spent before each update (0.05 s of 0.5 s per update).
    assert agent.progress == sorted(agent.progress) and agent.progress[0] < 0.05 and agent.progress[-1] > 0.7
    assert 0.5 <= summary["train_seconds"] < 5.0 and 2 * 5 <= summary["steps"] < 2 * 100
    assert summary["final_eval_episodes"] == 2  # the final evaluation still runs
    with pytest.raises(ValueError, match="train_minutes"):
        TrainConfig(train_minutes=-1).validate()


@pytest.mark.parametrize(
    "args, message",
    [
        (["train", "ppo", "pongg"], "Did you mean: pong"),
        (["train", "ppo", "cartpole", "--steps", "0"], "steps must be positive"),
        (["train", "ppo", "cartpole", "--num-envs", "3", "--num-steps", "5", "--num-minibatches", "4"],
         "num_minibatches"),
        (["train", "ppo", "cartpole", "--lr", "-0.1"], "lr must be positive"),
        (["train", "sac", "cartpole"], "unknown algorithm"),
        (["train", "ppo", "cartpole", "--device", "cuda:7"], "device"),
    ],
)
def test_bad_input_gets_a_one_line_error(args, message, capsys, tmp_path):
    with pytest.raises(SystemExit) as exc:
        main(args + ["--run-dir", str(tmp_path / "r")] if len(args) > 3 else args)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_corrupt_checkpoint_gets_a_clear_error(tmp_path, capsys):
    run = tmp_path / "cp"
    main(["train", "ppo", "cartpole", "--run-dir", str(run), "--steps", "512", "--eval-episodes", "0",
          "--no-progress"])
    ckpt = run / "checkpoints" / "latest.pt"
    ckpt.write_bytes(ckpt.read_bytes()[:1000])  # truncated, as if the disk filled up
    with pytest.raises(SystemExit) as exc:
        main(["eval", str(run), "--episodes", "1"])
    assert exc.value.code == 2
    assert "corrupt or truncated" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["eval", str(tmp_path / "nowhere")])


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_ctrl_c_saves_checkpoint_and_summary(tmp_path, sig):
    """Ctrl-C, and SIGTERM (kill, timeout, job schedulers; background jobs ignore SIGINT), save and exit."""
    run = tmp_path / "int"
    proc = subprocess.Popen([sys.executable, "-m", "agents.cli", "train", "ppo", "cartpole", "--run-dir", str(run),
                             "--steps", "100000000", "--no-progress"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    deadline = time.time() + 60
    while not list(run.glob("events.out.tfevents*")) and time.time() < deadline:
        time.sleep(0.2)
    time.sleep(2.0)  # let it train a little
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    summary = json.loads((run / "summary.json").read_text())
    assert summary["interrupted"] is True and summary["steps"] > 0
    assert (run / "checkpoints" / "latest.pt").exists()


def test_first_stop_signal_asks_the_second_aborts():
    """The trainer's handler: the first Ctrl-C / SIGTERM only sets a flag (the loop stops between steps, where no
    lock is held and nothing is half-written); a second raises KeyboardInterrupt at once; the old handlers return."""
    import os

    from agents.trainer import _StopSignals

    before = signal.getsignal(signal.SIGINT)
    stop = _StopSignals()
    try:
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.01)  # the handler runs at the next bytecode
        assert stop.requested
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.01)
    finally:
        stop.restore()
    assert signal.getsignal(signal.SIGINT) is before


def test_resume_continues_step_counter_and_loss_curve(tmp_path):
    run = tmp_path / "res"
    base = ["train", "ppo", "cartpole", "--eval-episodes", "0", "--no-progress"]
    main(base + ["--run-dir", str(run), "--steps", "2048", "--lr", "5e-4"])
    first = scalars(run)["losses/policy_loss"]
    assert first[-1][0] == 2048
    import torch

    adam_steps_before = torch.load(run / "checkpoints" / "latest.pt", weights_only=True)[
        "agent"]["optimizer"]["state"][0]["step"].item()
    main(["train", "ppo", "cartpole", "--resume", str(run), "--steps", "4096"])
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == 4096 and summary["updates"] == 16  # 2048 / (8 envs x 32 steps) = 8 per leg
    losses = scalars(run)["losses/policy_loss"]
    steps = [s for s, _ in losses]
    assert steps == sorted(steps) and steps[-1] == 4096 and len(steps) == 16  # one curve, no restart at 0
    config = json.loads((run / "config.json").read_text())
    assert config["args"]["ppo"]["lr"] == 5e-4  # the saved configuration was kept
    state = torch.load(run / "checkpoints" / "latest.pt", weights_only=True)
    assert state["agent"]["optimizer"]["state"][0]["step"].item() == 2 * adam_steps_before  # Adam state carried on


def test_eval_prints_mean_and_std_and_writes_video(tmp_path):
    run = tmp_path / "ev"
    main(["train", "ppo", "cartpole", "--run-dir", str(run), "--steps", "512", "--eval-episodes", "0",
          "--no-progress"])
    result = run_cli("eval", str(run), "--episodes", "3", "--video")
    assert result.returncode == 0, result.stderr
    assert "±" in result.stdout and "over 3 episodes" in result.stdout
    videos = list((run / "videos").iterdir())
    assert videos and videos[0].stat().st_size > 1000


def test_games_and_help(capsys):
    main(["games"])
    out = capsys.readouterr().out
    assert "pong" in out and "cartpole" in out
    with pytest.raises(SystemExit) as exc:
        main(["train", "ppo", "pong", "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert "Adam learning rate" in out and "default: 0.00025" in out


@pytest.mark.slow
def test_ppo_learns_cartpole(tmp_path):
    """The published CartPole settings reach the maximum score within 100k steps (seeded, CPU)."""
    run = tmp_path / "learn"
    main(["train", "ppo", "cartpole", "--run-dir", str(run), "--steps", "100000", "--seed", "1",
          "--eval-episodes", "20", "--no-progress", "--device", "cpu"])
    summary = json.loads((run / "summary.json").read_text())
    assert summary["final_eval_return_mean"] >= 475, summary
