"""The LM bridge through the shared trainer: a tiny LM learns from the score alone; the run folder holds."""

import json

import numpy as np
import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from agents.cli import main, train
from agents.trainer import TrainConfig
from games.text import make_task, test_set
from llm_bridge.agent import LMArgs, LMConfig


def scalars(run_dir, tag):
    acc = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
    acc.Reload()
    return [e.value for e in acc.Scalars(tag)]


def tiny_args(run_dir, advantage: str, steps: int = 40 * 64) -> LMArgs:
    return LMArgs(
        train=TrainConfig(steps=steps, num_envs=64, seed=0, run_dir=str(run_dir), eval_episodes=8, eval_envs=8,
                          eval_at_start=True, progress=False, device="cpu"),
        # float32 pinned: "auto" would pick bfloat16 autocast on CPUs that have it, and the ratio checks are exact.
        lm=LMConfig(model="tiny-bytes", group_size=8, max_new_tokens=8, llm_lr=3e-3, advantage=advantage,
                    dtype="float32"),
    )


@pytest.mark.slow
@pytest.mark.parametrize("advantage", ["group", "value"])
def test_tiny_lm_learns_from_reward_alone(tmp_path, advantage):
    """`repeat`: the reward is the fraction of characters that are '7'. A random byte-level LM scores ~0.004;
    40 updates of the shared PPO loss must lift the batch reward well above that."""
    summary = train("ppo", "repeat", tiny_args(tmp_path / advantage, advantage))
    rewards = scalars(tmp_path / advantage, "charts/reward_mean")
    assert len(rewards) == 40
    start, end = np.mean(rewards[:3]), np.mean(rewards[-3:])
    assert start < 0.05, start
    assert end > 0.5, (start, end)
    assert summary["final_eval_accuracy"] > summary["initial_eval_accuracy"]
    if advantage == "group":
        assert "charts/frac_zero_std_groups" in EventAccumulator(str(tmp_path / advantage)).Reload().Tags()["scalars"]


def test_first_epoch_is_exactly_on_policy(tmp_path):
    """Token ids go from sampling straight into training: with one epoch the PPO ratio is 1 (KL 0, nothing clipped)."""
    train("ppo", "repeat", tiny_args(tmp_path / "r", "group", steps=2 * 64))
    assert max(abs(v) for v in scalars(tmp_path / "r", "losses/approx_kl")) < 1e-5
    assert max(scalars(tmp_path / "r", "losses/clipfrac")) == 0.0


def test_cli_text_game_run_folder_and_eval(tmp_path, capsys):
    run = tmp_path / "add"
    main(["train", "ppo", "addition", "--model", "tiny-bytes", "--run-dir", str(run), "--steps", "16",
          "--num-envs", "8", "--group-size", "4", "--max-new-tokens", "4", "--eval-episodes", "10",
          "--eval-envs", "5", "--no-progress"])
    summary = json.loads((run / "summary.json").read_text())
    for key in ("algo", "game", "steps", "wall_seconds", "train_seconds", "eval_seconds", "sps", "final_eval_return_mean", "final_eval_return_std",
                "final_eval_episodes", "initial_eval_accuracy", "final_eval_accuracy"):
        assert key in summary, key
    assert summary["game"] == "addition" and summary["final_eval_episodes"] == 10
    assert 0.0 <= summary["final_eval_accuracy"] <= 1.0
    config = json.loads((run / "config.json").read_text())
    assert config["args"]["lm"]["model"] == "tiny-bytes"
    # The default command's recipe: adapters at their own default rate, dynamic sampling, a weight average.
    lm = config["args"]["lm"]
    assert (lm["lora_rank"], lm["llm_lr"], lm["min_informative"], lm["ema_decay"]) == (16, None, 16, 0.95)
    capsys.readouterr()
    main(["eval", str(run), "--episodes", "10"])
    assert "over 10 episodes" in capsys.readouterr().out
    # --completions: one line per held-out problem, in order, and their scores are the eval's returns.
    main(["eval", str(run), "--episodes", "7", "--completions"])
    records = [json.loads(line) for line in (run / "eval_completions.jsonl").read_text().splitlines()]
    held_out = test_set(make_task("addition"))[:7]
    assert [r["prompt"] for r in records] == [p.prompt for p in held_out]
    assert [r["answer"] for r in records] == [p.answer for p in held_out]
    assert [r["score"] for r in records] == json.loads((run / "eval.json").read_text())["returns"]


def test_resume_takes_the_learning_rate_given_now(tmp_path):
    """The checkpoint's optimizer state holds the learning rate it ran with; `--resume RUN --llm-lr X` must train
    at X, not silently at the saved rate."""
    run = tmp_path / "lr"
    base = ["--model", "tiny-bytes", "--num-envs", "8", "--group-size", "4", "--max-new-tokens", "4",
            "--eval-episodes", "0", "--no-progress", "--dtype", "float32", "--min-informative", "0"]  # an update a batch
    main(["train", "ppo", "repeat", "--run-dir", str(run), "--steps", "16", "--llm-lr", "1e-4", *base])
    main(["train", "ppo", "repeat", "--resume", str(run), "--steps", "32", "--llm-lr", "3e-4"])
    lrs = scalars(run, "charts/learning_rate")
    assert lrs == pytest.approx([1e-4, 1e-4, 3e-4, 3e-4])


def test_lr_cooldown_holds_then_decays_to_zero(tmp_path):
    """--lr-cooldown F: the learning rate stays at its value for the first 1 - F of the run, then falls linearly
    to 0 at its end (read at the start of each batch, over `steps` here)."""
    run = tmp_path / "cool"
    main(["train", "ppo", "repeat", "--run-dir", str(run), "--model", "tiny-bytes", "--num-envs", "8",
          "--group-size", "4", "--max-new-tokens", "4", "--eval-episodes", "0", "--no-progress", "--dtype", "float32",
          "--min-informative", "0", "--steps", "80", "--llm-lr", "1e-4", "--lr-cooldown", "0.4"])
    lrs = scalars(run, "charts/learning_rate")  # batch k (0..9) starts at step 8k of 80: 1 - k/10 of the run left
    assert lrs == pytest.approx([1e-4] * 7 + [0.75e-4, 0.5e-4, 0.25e-4])
    with pytest.raises(ValueError, match="lr_cooldown"):
        LMConfig(lr_cooldown=1.5).validate(8)


def test_default_learning_rate_depends_on_what_trains():
    assert LMConfig().lm_lr == 5e-6 and LMConfig(lora_rank=16).lm_lr == 3e-4
    assert LMConfig(lora_rank=16, llm_lr=1.5e-4).lm_lr == 1.5e-4 and LMConfig(llm_lr=1e-5).lm_lr == 1e-5
    import torch

    from llm_bridge.agent import LMAgent

    agent = LMAgent(LMConfig(model="tiny-bytes", group_size=4, lora_rank=4), 8, torch.device("cpu"))
    assert agent.optimizer.param_groups[0]["lr"] == 3e-4


@pytest.mark.parametrize(
    "flags, message",
    [(["--group-size", "3"], "group_size"), (["--group-size", "1"], "group_size"), (["--llm-lr", "0"], "llm_lr"),
     (["--beam", "9"], "beam must be in"), (["--beam", "2", "--kl-coef", "0.1"], "advantage=group with kl_coef=0"),
     (["--beam", "2", "--beam-min-prob", "0"], "beam_min_prob"), (["--kl-groups", "-1"], "kl_groups"),
     (["--step-rows", "-2"], "step_rows"), (["--all-wrong-weight", "-1"], "all_wrong_weight"),
     (["--all-wrong-weight", "1", "--advantage", "value"], "all_wrong_weight"),
     (["--lora-b-lr-ratio", "0"], "lora_b_lr_ratio must be > 0"),
     (["--lora-rank", "0", "--lora-b-lr-ratio", "4"], "pass --lora-rank R")],
)
def test_lm_bad_hyperparameters(tmp_path, capsys, flags, message):
    with pytest.raises(SystemExit) as exc:
        main(["train", "ppo", "addition", "--model", "tiny-bytes", "--num-envs", "8", "--run-dir", str(tmp_path),
              *flags])
    assert exc.value.code == 2 and message in capsys.readouterr().err


PROMPTS = ["What is 1 + 2?"] * 4 + ["hi"] * 4  # two groups of 4


def sgd_step(monkeypatch, reward: list[int], rows: list[int] | None = None, **cfg):
    """One update of a tiny agent on PROMPTS with plain SGD at lr 1 (so the parameter change is -grad, exactly).
    `rows` re-indexes the sampled rollout first (to plant copies). Returns (sizes of the batches that went
    through the training pass, parameter change, metrics)."""
    import torch

    from agents.common import Transition
    from llm_bridge.agent import LMAgent

    torch.manual_seed(0)
    # draft=0: the planted rows rely on what this seed samples, and guessed tokens change which uniform draws what.
    config = LMConfig(model="tiny-bytes", group_size=4, max_new_tokens=4, llm_lr=1e-2, dtype="float32",
                      grad_clip=1e9, **{"draft": 0, **cfg})
    agent = LMAgent(config, num_envs=8, device=torch.device("cpu"), seed=0)
    agent.optimizer = torch.optim.SGD(agent.policy.trainable_parameters(), lr=1.0)
    seen: list[int] = []
    evaluate = agent.policy.evaluate
    monkeypatch.setattr(agent.policy, "evaluate", lambda b, *a, **k: seen.append(len(b)) or evaluate(b, *a, **k))
    agent.act(PROMPTS)
    if rows is not None:
        agent.rollout = agent.rollout[rows]
    r = np.array(reward, dtype=np.float32)
    n = len(PROMPTS)
    agent.observe(Transition(PROMPTS, agent.rollout.texts, r, np.ones(n, bool), np.zeros(n, bool),
                             PROMPTS, PROMPTS, {"episode": {"r": r}}))
    rollout = agent.rollout  # the update clears it
    before = [p.detach().clone() for p in agent.policy.trainable_parameters()]
    metrics = agent.update(8, 8)
    delta = torch.cat([(p.detach() - b).flatten() for p, b in zip(agent.policy.trainable_parameters(), before)])
    return seen, delta, metrics, rollout


def test_zero_advantage_completions_skip_the_training_pass(monkeypatch):
    """A group whose samples all scored the same has advantage 0 everywhere: exactly no gradient, so its rows are
    left out of the forward/backward. The parameter step is the same as training on every row, up to the loss's
    token-mean normaliser (informative tokens instead of all tokens)."""
    import torch

    reward = [1, 1, 1, 1, 1, 0, 0, 1]  # group 0: no signal; group 1: mixed
    seen_skip, delta_skip, m_skip, _ = sgd_step(monkeypatch, reward, skip_zero_advantage=True)
    seen_all, delta_all, m_all, _ = sgd_step(monkeypatch, reward, skip_zero_advantage=False)
    assert m_skip["charts/trained_completions"] == 4 and m_all["charts/trained_completions"] == 8
    assert seen_skip == [4] and seen_all == [8]
    cos = torch.nn.functional.cosine_similarity(delta_skip, delta_all, dim=0)
    assert cos > 0.9999 and delta_skip.norm() > delta_all.norm()  # same direction, larger (fewer tokens averaged)


def test_sampled_loss_norm_makes_skipping_exact(monkeypatch):
    """loss_norm="sampled" divides the token sum by the tokens of every sampled completion: skipping the
    zero-advantage rows then gives exactly the step of training them all, i.e. a step that shrinks with the share
    of the batch that carries signal, where "trained" (the default) makes it full size."""
    import torch

    reward = [1, 1, 1, 1, 1, 0, 0, 1]  # group 0: no signal; group 1: mixed
    seen_skip, delta_skip, _, _ = sgd_step(monkeypatch, reward, loss_norm="sampled")
    seen_all, delta_all, _, _ = sgd_step(monkeypatch, reward, loss_norm="sampled", skip_zero_advantage=False)
    _, delta_trained, _, ro = sgd_step(monkeypatch, reward)
    assert seen_skip == [4] and seen_all == [8] and delta_all.norm() > 0
    torch.testing.assert_close(delta_skip, delta_all, rtol=1e-4, atol=1e-7)
    # The default's step is the same one scaled up by all tokens / informative tokens.
    lengths = ro.completion_mask.sum(1).float()
    torch.testing.assert_close(delta_trained * (lengths[4:].sum() / lengths.sum()), delta_skip, rtol=1e-4, atol=1e-7)


def test_identical_completions_train_as_one_weighted_row(monkeypatch):
    """Copies of a completion in a group have the same loss terms: one row counted k times in the token mean gives
    the same parameter step as the k rows, with fewer rows through the training pass."""
    import torch

    # Copies as a confident model samples them: group 0 = a, a, b, a; group 1 = c, d, d, d.
    rows, reward = [0, 0, 1, 0, 4, 5, 5, 5], [1, 1, 0, 1, 1, 0, 0, 0]
    seen_merged, delta_merged, m_merged, ro = sgd_step(monkeypatch, reward, rows, merge_duplicates=True)
    seen_all, delta_all, m_all, _ = sgd_step(monkeypatch, reward, rows, merge_duplicates=False)
    assert ro.texts[0] != ro.texts[2] and ro.texts[4] != ro.texts[5]
    assert seen_merged == [4] and seen_all == [8]
    assert m_merged["charts/trained_completions"] == m_all["charts/trained_completions"] == 8
    assert m_merged["charts/trained_rows"] == 4
    assert delta_all.norm() > 0
    torch.testing.assert_close(delta_merged, delta_all, rtol=1e-4, atol=1e-7)
    assert m_merged["losses/entropy"] == pytest.approx(m_all["losses/entropy"], rel=1e-4)


def test_all_wrong_groups_are_trained_against_the_batch_mean():
    """--all-wrong-weight w: a group whose samples all scored alike and below the batch's mean reward gets advantage
    w x (r - batch mean) per sample; all-right groups still get 0, mixed groups their group advantage; and a group
    of identical non-integer rewards is exactly 0 (no float noise over std + 1e-4)."""
    import torch

    from llm_bridge.agent import LMAgent

    rewards = torch.tensor([1, 1, 1, 1, 0, 0, 0, 0, 1, 0, 0, 0, 0.1, 0.1, 0.1, 0.1])  # right, wrong, mixed, 0.1s
    mean = float(rewards.mean())
    off = LMAgent(LMConfig(model="tiny-bytes", group_size=4), 16, torch.device("cpu"))
    on = LMAgent(LMConfig(model="tiny-bytes", group_size=4, all_wrong_weight=2.0), 16, torch.device("cpu"))
    (a_off, m_off), (a_on, m_on) = off._advantages(None, rewards), on._advantages(None, rewards)
    assert (a_off.view(4, 4)[[0, 1, 3]] == 0).all()  # no signal without the flag, the 0.1s included
    torch.testing.assert_close(a_on.view(4, 4)[2], a_off.view(4, 4)[2])  # the mixed group is unchanged
    assert (a_on.view(4, 4)[0] == 0).all()  # the policy is sure of these
    torch.testing.assert_close(a_on.view(4, 4)[1], torch.full((4,), 2.0 * (0 - mean)))
    torch.testing.assert_close(a_on.view(4, 4)[3], torch.full((4,), 2.0 * (0.1 - mean)))
    assert m_on["charts/frac_all_wrong_groups"] == 0.5 and m_on["charts/frac_zero_std_groups"] == 0.75


def test_all_wrong_groups_push_their_answer_down(monkeypatch):
    """An all-wrong group beside an all-right one: GRPO trains neither; with the flag the all-wrong group goes
    through the training pass alone, and a small step along the update lowers its completions' probability."""
    import torch

    reward = [0, 0, 0, 0, 1, 1, 1, 1]
    seen_off, _, m_off, _ = sgd_step(monkeypatch, reward)
    _, delta, m_on, ro = sgd_step(monkeypatch, reward, all_wrong_weight=1.0)
    assert m_off["charts/trained_completions"] == 0 and seen_off == []
    assert m_on["charts/trained_completions"] == 4 and m_on["charts/frac_all_wrong_groups"] == 0.5
    assert delta.norm() > 0
    # The same initial weights (same seed): group 0's log-probs before and after a small step along the update.
    from llm_bridge.agent import LMAgent

    torch.manual_seed(0)
    agent = LMAgent(LMConfig(model="tiny-bytes", group_size=4, max_new_tokens=4, dtype="float32", draft=0), 8,
                    torch.device("cpu"), seed=0)
    params = list(agent.policy.trainable_parameters())
    with torch.no_grad():
        before = agent.policy.evaluate(ro[[0, 1, 2, 3]], 1.0).logprobs.sum()
        torch.nn.utils.vector_to_parameters(torch.nn.utils.parameters_to_vector(params) + 1e-2 * delta, params)
        after = agent.policy.evaluate(ro[[0, 1, 2, 3]], 1.0).logprobs.sum()
    assert after < before


def test_beam_groups_step_along_the_exact_gradient_over_their_candidates(monkeypatch):
    """With group_from=beam a group is its prompt's most probable distinct completions, and the update is the
    exact gradient of their probability-weighted reward J = sum_i w_i R_i, w = softmax(log p(y_i)) over the
    group: the parameter step (plain SGD) points along grad J. A filler row (a copy of the best candidate) adds
    nothing, and a group whose candidates all scored alike gives no signal and is not trained."""
    import torch

    from llm_bridge.agent import LMAgent

    # Group 0: candidates y0, y1, y2, and a filler repeating y0; group 1: four candidates, all wrong.
    rows, reward = [0, 1, 2, 0, 4, 5, 6, 7], [1, 0, 1, 1, 0, 0, 0, 0]
    # A low temperature spreads the candidates' probabilities apart (a random tiny model's are nearly equal).
    cfg = dict(beam=4, beam_min_prob=1e-300, temperature=0.1)
    seen, delta, metrics, ro = sgd_step(monkeypatch, reward, rows, **cfg)
    assert len(set(ro.texts[:3])) == 3 and ro.texts[3] == ro.texts[0]
    assert metrics["charts/trained_completions"] == 3 and seen == [3]
    assert metrics["charts/frac_zero_std_groups"] == 0.5
    # The same initial weights (same seed), and grad J by autograd over the three candidates of group 0.
    torch.manual_seed(0)
    agent = LMAgent(LMConfig(model="tiny-bytes", group_size=4, max_new_tokens=4, dtype="float32", **cfg),
                    num_envs=8, device=torch.device("cpu"), seed=0)
    logp = agent.policy.evaluate(ro[[0, 1, 2]], temperature=0.1).logprobs.sum(1)  # [3] log p(y_i), with grad
    assert logp.softmax(0).max() > 0.5  # far from equal weights
    J = (logp.softmax(0) * torch.tensor([1.0, 0.0, 1.0])).sum()
    grads = torch.autograd.grad(J, agent.policy.trainable_parameters(), allow_unused=True)
    grad = torch.cat([(torch.zeros_like(p) if g is None else g).flatten()
                      for p, g in zip(agent.policy.trainable_parameters(), grads)])
    # The loss is a token mean of advantage x ratio, with advantages G w_i (R_i - J) / std_w(R): so -grad(loss),
    # the SGD step, is grad J x G / (std + 1e-4) / (tokens of the three rows).
    w, R = logp.detach().softmax(0), torch.tensor([1.0, 0.0, 1.0])
    std = (w * (R - (w * R).sum()) ** 2).sum().sqrt()
    tokens = ro.completion_mask[:3].sum()
    expected = grad * 4 / (std + 1e-4) / tokens
    torch.testing.assert_close(delta, expected, rtol=1e-3, atol=1e-4 * float(expected.abs().max()))
    assert metrics["charts/beam_candidates"] == 3.5  # 3 distinct in group 0, 4 in group 1
    assert 0 < metrics["charts/beam_mass"] <= 1


def test_beam_plus_samples_counts_the_beam_exactly_and_samples_outside_it(monkeypatch):
    """beam=K < group_size ("sum and sample"): the K beam rows enter with weight p(y), the samples with 1/M each,
    except a sample that repeats a beam candidate (already counted exactly), which gets nothing."""
    import torch

    from llm_bridge.agent import LMAgent

    # Group 0: beam rows y0, y1, then a sample that repeats y0 and a sample s of its own; group 1: all wrong.
    rows, reward = [0, 1, 0, 3, 4, 5, 6, 7], [1, 0, 1, 1, 0, 0, 0, 0]
    cfg = dict(beam=2, beam_min_prob=1e-300, temperature=0.2)
    seen, delta, metrics, ro = sgd_step(monkeypatch, reward, rows, **cfg)
    assert ro.texts[3] not in (ro.texts[0], ro.texts[1]) and ro.texts[0] != ro.texts[1]
    assert metrics["charts/trained_completions"] == 3 and seen == [3]
    torch.manual_seed(0)
    agent = LMAgent(LMConfig(model="tiny-bytes", group_size=4, max_new_tokens=4, dtype="float32", **cfg),
                    num_envs=8, device=torch.device("cpu"), seed=0)
    logp = agent.policy.evaluate(ro[[0, 1, 3]], temperature=0.2).logprobs.sum(1)  # [3]: y0, y1, s
    R = torch.tensor([1.0, 0.0, 1.0])
    w = torch.cat([logp[:2].detach().exp(), torch.tensor([1 / 2])])  # p(y0), p(y1), 1/M for s
    J = (w * R).sum()
    adv = 4 * w * (R - J) / ((w * (R - J) ** 2).sum().sqrt() + 1e-4)
    loss = (adv * logp).sum() / ro.completion_mask[[0, 1, 3]].sum()
    grads = torch.autograd.grad(loss, agent.policy.trainable_parameters(), allow_unused=True)
    grad = torch.cat([(torch.zeros_like(p) if g is None else g).flatten()
                      for p, g in zip(agent.policy.trainable_parameters(), grads)])
    torch.testing.assert_close(delta, grad, rtol=1e-3, atol=1e-4 * float(grad.abs().max()))


def test_beam_plus_samples_estimates_the_policy_gradient():
    """Unbiased up to the group baseline's usual shrink: over one-token answers (where the exact gradient of
    J = sum_v p(v) R(v) is one softmax away), the mean update direction of beam=2 + 2 samples is grad J."""
    import torch

    from llm_bridge.agent import LMAgent

    torch.manual_seed(0)
    cfg = LMConfig(model="tiny-bytes", group_size=4, beam=2, max_new_tokens=1, dtype="float32", scale_by_std=False,
                   temperature=0.3)
    agent = LMAgent(cfg, num_envs=4, device=torch.device("cpu"), seed=0)
    policy, params = agent.policy, agent.policy.trainable_parameters()

    def flat(grads):
        return torch.cat([(torch.zeros_like(p) if g is None else g).flatten() for p, g in zip(params, grads)])

    def reward(tokens):
        return (tokens % 3 == 0).float()  # a third of the vocabulary is "right"

    logits = policy.model(input_ids=torch.tensor(policy.encode_prompts(["hi"]))).logits[0, -1] / 0.3
    probs = logits.softmax(-1)
    assert 0.05 < probs.topk(2).values.sum() < 0.95  # the beam holds some of the mass, not all
    exact = flat(torch.autograd.grad((probs * reward(torch.arange(len(probs)))).sum(), params, allow_unused=True))
    total, n = torch.zeros_like(exact), 150
    for _ in range(n):
        agent.act(["hi"] * 4)
        ro = agent.rollout
        adv, _ = agent._beam_advantages(ro, reward(ro.completion_ids[:, 0]))
        if adv.any():
            logp = policy.evaluate(ro, 0.3).logprobs.sum(1)
            total += flat(torch.autograd.grad((adv * logp).sum(), params, allow_unused=True))
    estimate = total / n / 4  # advantages carry x G
    assert torch.nn.functional.cosine_similarity(estimate, exact, dim=0) > 0.85
    assert 0.5 < estimate.norm() / exact.norm() < 1.0  # the baseline includes the samples: (M - 1) / M shrink


def test_dynamic_sampling_waits_for_informative_completions():
    """With `min_informative`, batches whose groups all scored alike are kept sampling past: the update waits
    until enough completions carry a nonzero advantage, then trains on the informative rows of every batch sampled
    since the last update (here: none of the first batch, all of the second), or gives up after
    `max_sample_batches`."""
    import torch

    from agents.common import Transition
    from llm_bridge.agent import LMAgent

    torch.manual_seed(0)
    cfg = LMConfig(model="tiny-bytes", group_size=4, max_new_tokens=4, llm_lr=1e-2, min_informative=8,
                   max_sample_batches=3, dtype="float32")
    agent = LMAgent(cfg, num_envs=8, device=torch.device("cpu"), seed=0)
    prompts = ["What is 1 + 2?"] * 4 + ["hi"] * 4
    seen: list[int] = []
    evaluate = agent.policy.evaluate
    agent.policy.evaluate = lambda b, *a, **k: seen.append(len(b)) or evaluate(b, *a, **k)

    def sample(reward: list[int]) -> None:
        agent.act(prompts)
        r = np.array(reward, dtype=np.float32)
        agent.observe(Transition(prompts, agent.rollout.texts, r, np.ones(8, bool), np.zeros(8, bool),
                                 prompts, prompts, {"episode": {"r": r}}))

    sample([1, 1, 1, 1, 0, 0, 0, 0])  # no signal at all
    assert not agent.ready()
    sample([1, 0, 0, 0, 1, 1, 1, 1])  # 4 informative completions: still fewer than 8
    assert not agent.ready()
    sample([1, 1, 0, 0, 0, 1, 0, 0])  # 8 more
    assert agent.ready()
    metrics = agent.update(24, 24)
    assert metrics["charts/sample_batches"] == 3 and metrics["charts/trained_completions"] == 12
    assert seen == [metrics["charts/trained_rows"]] and metrics["charts/trained_rows"] <= 12
    assert metrics["charts/frac_zero_std_groups"] == pytest.approx((1 + 0.5 + 0) / 3)
    assert metrics["charts/reward_mean"] == pytest.approx(12 / 24)
    # The cap: three batches without signal give an update that trains on nothing (no step).
    for _ in range(3):
        assert not agent.ready()
        sample([0] * 8)
    assert agent.ready()
    metrics = agent.update(48, 48)
    assert metrics["charts/trained_completions"] == 0 and metrics["charts/sample_batches"] == 3
    # Where leaving out the all-same groups would change the loss (a critic, a KL or entropy term), it is off.
    assert not LMConfig(min_informative=8, advantage="value").dynamic_sampling
    assert not LMConfig(min_informative=8, kl_coef=0.1).dynamic_sampling


def test_adaptive_temperature_steers_toward_mixed_groups(tmp_path):
    """`target_mixed`: after an update whose groups all agreed the temperature goes up (as far as
    max_temperature), after one whose groups were all mixed it comes down (never below `temperature`), and the
    next batch is sampled and trained at the new value: the first epoch stays exactly on-policy (ratio 1)."""
    import torch

    from agents.common import Transition
    from llm_bridge.agent import TEMPERATURE_GAIN, LMAgent

    torch.manual_seed(0)
    cfg = LMConfig(model="tiny-bytes", group_size=4, max_new_tokens=4, llm_lr=1e-2, dtype="float32",
                   target_mixed=0.5, max_temperature=1.2)
    agent = LMAgent(cfg, num_envs=8, device=torch.device("cpu"), seed=0)
    prompts = ["What is 1 + 2?"] * 4 + ["hi"] * 4
    used: list[float] = []
    generate = agent.policy.generate
    agent.policy.generate = lambda *a, **k: used.append(k["temperature"]) or generate(*a, **k)

    def step(reward: list[int]) -> dict:
        agent.act(prompts)
        r = np.array(reward, dtype=np.float32)
        agent.observe(Transition(prompts, agent.rollout.texts, r, np.ones(8, bool), np.zeros(8, bool),
                                 prompts, prompts, {"episode": {"r": r}}))
        return agent.update(8, 8)

    m = step([1, 1, 1, 1, 0, 0, 0, 0])  # no group mixed: 0.5 below the target
    assert m["charts/temperature"] == 1.0 and agent.temperature == pytest.approx(np.exp(TEMPERATURE_GAIN * 0.5))
    m = step([1, 1, 1, 1, 1, 1, 1, 1])
    assert m["charts/temperature"] == used[-1] == pytest.approx(np.exp(TEMPERATURE_GAIN * 0.5))
    assert agent.temperature == 1.2  # capped
    m = step([1, 0, 0, 0, 1, 1, 0, 1])  # sampled at 1.2, trained at 1.2: still on-policy
    assert used[-1] == m["charts/temperature"] == 1.2 and abs(m["losses/approx_kl"]) < 1e-6
    assert agent.temperature == pytest.approx(1.2 * np.exp(-TEMPERATURE_GAIN * 0.5))
    for _ in range(3):
        step([1, 0, 1, 0, 0, 1, 0, 1])
    assert agent.temperature == 1.0  # floored at cfg.temperature
    agent.temperature = 1.1
    resumed = LMAgent(cfg, num_envs=8, device=torch.device("cpu"), seed=0)
    resumed.load_state_dict(agent.state_dict())
    assert resumed.temperature == 1.1
    with pytest.raises(ValueError, match="max_temperature"):
        LMConfig(target_mixed=0.4, temperature=1.6).validate(8)
    with pytest.raises(ValueError, match="target_mixed"):
        LMConfig(target_mixed=0.4, advantage="value").validate(8)


def test_greedy_evaluation_uses_the_weights_moving_average(tmp_path):
    """With `ema_decay`, act(explore=False) runs on avg = d * avg + (1 - d) * weights (updated after every step),
    training samples on the live weights, and a checkpoint restores both."""
    import torch

    from agents.common import Transition
    from llm_bridge.agent import LMAgent

    torch.manual_seed(0)
    cfg = LMConfig(model="tiny-bytes", group_size=4, max_new_tokens=4, llm_lr=1e-2, ema_decay=0.75, dtype="float32")
    agent = LMAgent(cfg, num_envs=8, device=torch.device("cpu"), seed=0)
    first = agent.policy.trainable_parameters()[0]
    start = first.detach().clone()
    seen = []
    generate = agent.policy.generate
    agent.policy.generate = lambda *a, **k: seen.append(first.detach().clone()) or generate(*a, **k)
    prompts = ["What is 1 + 2?"] * 4 + ["hi"] * 4
    agent.act(prompts)
    r = np.array([1, 0, 0, 1, 0, 1, 1, 1], dtype=np.float32)
    agent.observe(Transition(prompts, agent.rollout.texts, r, np.ones(8, bool), np.zeros(8, bool),
                             prompts, prompts, {"episode": {"r": r}}))
    agent.update(8, 8)
    live = first.detach().clone()
    assert not torch.equal(live, start)
    agent.act(prompts[:2], explore=False)
    torch.testing.assert_close(seen[-1], 0.75 * start + 0.25 * live)  # evaluated on the average
    assert torch.equal(first.detach(), live)  # and the live weights are back
    agent.act(prompts)
    assert torch.equal(seen[-1], live)  # training samples on the live weights
    restored = LMAgent(cfg, num_envs=8, device=torch.device("cpu"), seed=0)
    restored.load_state_dict(agent.state_dict())
    torch.testing.assert_close(restored.ema[0], 0.75 * start + 0.25 * live)
    with pytest.raises(ValueError, match="ema_decay"):
        LMConfig(ema_decay=1.0).validate(8)
    with pytest.raises(ValueError, match="draft must be >= 0"):
        LMConfig(draft=-1).validate(8)


def test_value_head_has_its_own_learning_rate():
    """The value head is a new layer: at an LM's learning rate (here 1e-6) it would not move, and `--advantage value`
    would have no critic. With its own `value_lr` it learns a constant reward of 1 within a few updates."""
    import torch

    from agents.common import Transition
    from llm_bridge.agent import LMAgent

    def value_mean_after(value_lr: float, updates: int = 12) -> float:
        torch.manual_seed(0)
        cfg = LMConfig(model="tiny-bytes", group_size=4, max_new_tokens=4, llm_lr=1e-6, value_lr=value_lr, dtype="float32",
                       advantage="value")
        agent = LMAgent(cfg, num_envs=8, device=torch.device("cpu"), seed=0)
        assert [g["lr"] for g in agent.optimizer.param_groups] == [1e-6, value_lr]
        prompts, reward = ["What is 1 + 2?"] * 4 + ["hi"] * 4, np.ones(8, dtype=np.float32)
        for _ in range(updates + 1):
            agent.act(prompts)
            agent.observe(Transition(prompts, agent.rollout.texts, reward, np.ones(8, bool), np.zeros(8, bool),
                                     prompts, prompts, {"episode": {"r": reward}}))
            metrics = agent.update(8, 8)
        return metrics["charts/value_mean"]  # V on the last batch, before its update

    assert value_mean_after(1e-2) > 0.5
    assert abs(value_mean_after(1e-6)) < 0.05


def test_lora_adapters_learn_from_reward_alone_and_resume(tmp_path, monkeypatch, capsys):
    """`--lora-rank 8`: only the adapters train, and they lift the `repeat` reward from ~0 as full fine-tuning does.
    LoRA presumes a pretrained model whose frozen LM head can be confident: a random tiny model's head is not (its
    logits span ~1, so no hidden state puts more than ~1.5% on any token), hence the embedding table x 5 here.
    A checkpoint restores the adapters; resuming it with another rank is refused with the flag to pass."""
    import torch

    from llm_bridge import models

    def pretrained_like(*args, **kwargs):
        model = tiny_lm(*args, **kwargs)
        with torch.no_grad():
            model.get_input_embeddings().weight.mul_(5.0)
        return model

    tiny_lm = models.tiny_lm
    monkeypatch.setattr(models, "tiny_lm", pretrained_like)
    args = tiny_args(tmp_path / "lora", "group")
    args = LMArgs(train=args.train, lm=LMConfig(**{**args.lm.__dict__, "lora_rank": 8, "llm_lr": 1e-2}))
    train("ppo", "repeat", args)
    rewards = scalars(tmp_path / "lora", "charts/reward_mean")
    start, end = np.mean(rewards[:3]), np.mean(rewards[-3:])
    assert start < 0.05 and end > 0.4, (start, end)
    with pytest.raises(SystemExit):
        main(["train", "ppo", "repeat", "--resume", str(tmp_path / "lora"), "--steps", str(41 * 64),
              "--lora-rank", "4"])
    err = capsys.readouterr().err
    assert "holds rank-8 LoRA adapters" in err and "pass --lora-rank 8" in err
    saved = json.loads((tmp_path / "lora" / "config.json").read_text())["args"]["lm"]
    assert saved["lora_rank"] == 8  # the refused resume left the run's config alone
    main(["train", "ppo", "repeat", "--resume", str(tmp_path / "lora"), "--steps", str(42 * 64)])
    resumed = scalars(tmp_path / "lora", "charts/reward_mean")[40:]
    assert len(resumed) == 2 and min(resumed) > 0.3, resumed  # the adapters came back (fresh ones score ~0)


def test_lora_plus_gives_the_b_matrices_their_own_rate(tmp_path, capsys):
    """`--lora-b-lr-ratio 8`: the B matrices in a group of their own at 8x the rate of the A matrices. Adam's first
    step moves every weight with a gradient by its group's rate (|m / sqrt(v)| = 1), and only B has one at the start
    (B = 0, so A's gradient B^T dL/dy is 0). A resume must keep the groups: another ratio is refused, with the flag."""
    import torch

    from agents.common import Transition
    from llm_bridge.agent import LMAgent
    from llm_bridge.lora import lora_layers

    torch.manual_seed(0)
    cfg = LMConfig(model="tiny-bytes", group_size=4, max_new_tokens=4, lora_rank=4, llm_lr=1e-4, lora_b_lr_ratio=8,
                   dtype="float32", grad_clip=1e9, draft=0)
    agent = LMAgent(cfg, num_envs=8, device=torch.device("cpu"), seed=0)
    layers = lora_layers(agent.policy.model)
    a_group, b_group = agent.optimizer.param_groups
    assert (a_group["lr"], b_group["lr"]) == (1e-4, pytest.approx(8e-4))
    assert {id(p) for p in b_group["params"]} == {id(layer.lora_b) for layer in layers}
    assert {id(p) for p in a_group["params"]} == {id(layer.lora_a) for layer in layers}
    before = [(layer.lora_a.detach().clone(), layer.lora_b.detach().clone()) for layer in layers]
    agent.act(PROMPTS)
    r = np.array([1, 0, 0, 1, 0, 1, 1, 0], dtype=np.float32)  # both groups mixed
    agent.observe(Transition(PROMPTS, agent.rollout.texts, r, np.ones(8, bool), np.zeros(8, bool), PROMPTS, PROMPTS,
                             {"episode": {"r": r}}))
    agent.update(8, 8)
    moved_a = max((layer.lora_a - a).abs().max().item() for layer, (a, _) in zip(layers, before))
    moved_b = max((layer.lora_b - b).abs().max().item() for layer, (_, b) in zip(layers, before))
    assert moved_a == 0 and moved_b == pytest.approx(8e-4, rel=1e-3), (moved_a, moved_b)

    run = tmp_path / "plus"
    base = ["--model", "tiny-bytes", "--num-envs", "8", "--group-size", "4", "--max-new-tokens", "4",
            "--eval-episodes", "0", "--no-progress", "--dtype", "float32", "--min-informative", "0", "--lora-rank", "4"]
    main(["train", "ppo", "repeat", "--run-dir", str(run), "--steps", "8", "--lora-b-lr-ratio", "8", *base])
    with pytest.raises(SystemExit):
        main(["train", "ppo", "repeat", "--resume", str(run), "--steps", "16", "--lora-b-lr-ratio", "1"])
    assert "resume with the --lora-b-lr-ratio" in capsys.readouterr().err
    main(["train", "ppo", "repeat", "--resume", str(run), "--steps", "16"])  # the saved ratio: resumes
    assert len(scalars(run, "charts/learning_rate")) == 2


def test_step_rows_splits_an_update_into_steps_of_whole_groups(monkeypatch):
    """`step_rows`: an update with more distinct completions than the cap takes one AdamW step per minibatch of
    whole groups (every row once per epoch); one that fits takes a single step, as without the cap."""
    import torch

    from llm_bridge.agent import LMAgent

    agent = LMAgent.__new__(LMAgent)
    agent.cfg = LMConfig(step_rows=5, group_size=4)
    group = torch.arange(24) // 4  # 6 groups of 4
    rows = torch.tensor([0, 1, 2, 4, 5, 8, 9, 10, 11, 13, 14, 20, 21, 22])  # 14 rows of groups 0, 1, 2, 3, 5
    torch.manual_seed(0)
    parts = agent._minibatches(rows, group)
    assert len(parts) == 3  # ceil(14 / 5)
    assert sorted(torch.cat(parts).tolist()) == rows.tolist()
    for part in parts:  # no group is cut in two
        for g in group[part].unique():
            assert set(part[group[part] == g].tolist()) == set(rows[group[rows] == g].tolist())
    assert len(agent._minibatches(rows[:5], group)) == 1  # within the cap: one step

    # Through an update: group 1 (rows 4-7) and group 0 are both mixed, 8 distinct rows, a cap of 4: two steps.
    reward = [1, 0, 0, 1, 0, 1, 1, 0]
    seen, delta, metrics, _ = sgd_step(monkeypatch, reward, step_rows=4, merge_duplicates=False)
    assert seen == [4, 4] and metrics["charts/trained_rows"] == 8 and delta.norm() > 0
    seen, _, _, _ = sgd_step(monkeypatch, reward, merge_duplicates=False)
    assert seen == [8]


def test_kl_to_initial_is_estimated_on_kl_groups(monkeypatch):
    """The logged KL runs the frozen reference over the first `kl_groups` groups of the batch only (it is training
    time); 0 means every group."""
    from llm_bridge.policy import LMPolicy

    sizes: list[int] = []
    ref = LMPolicy.ref_token_logprobs
    monkeypatch.setattr(LMPolicy, "ref_token_logprobs", lambda self, b, *a: sizes.append(len(b)) or ref(self, b, *a))
    reward = [1, 0, 0, 1, 0, 1, 1, 0]
    _, _, metrics, _ = sgd_step(monkeypatch, reward, kl_groups=1)
    _, _, metrics_all, _ = sgd_step(monkeypatch, reward, kl_groups=0)
    assert sizes == [4, 8]
    assert metrics["charts/kl_to_initial"] >= 0 and metrics_all["charts/kl_to_initial"] >= 0


def test_groups_grow_once_most_come_back_all_right():
    """`grow_group_size`: after an update in which at least `grow_at` of the groups were all right, the env is told
    to lay out its batches in groups of the larger size (same prompts per batch). The batch it had already drawn
    is sampled and scored in its own groups; the ones after in the new ones; a checkpoint keeps the grown size."""
    import torch

    from agents.common import Transition
    from games.text import make_text_game
    from llm_bridge.agent import LMAgent

    torch.manual_seed(0)
    cfg = LMConfig(model="tiny-bytes", group_size=4, grow_group_size=8, grow_at=0.5, max_new_tokens=4,
                   dtype="float32", min_informative=1)
    env = make_text_game("addition", num_envs=8, group_size=4, seed=0)
    told: list[int] = []
    agent = LMAgent(cfg, num_envs=8, device=torch.device("cpu"), seed=0,
                    regroup=lambda g: told.append(g) or env.set_group_size(g))
    obs, _ = env.reset(seed=0)

    def sample(pattern: str) -> dict:
        """One batch through the env; the rewards are planted (`pattern`: r = right, w = wrong, one per slot)."""
        nonlocal obs
        texts = agent.act(obs)
        assert len(texts) == len(pattern)
        obs, *_ = env.step(texts)
        r = np.array([c == "r" for c in pattern], dtype=np.float32)
        agent.observe(Transition(obs, texts, r, np.ones(len(r), bool), np.zeros(len(r), bool), obs, obs,
                                 {"episode": {"r": r}}))
        return agent.update(0, 1) if agent.ready() else {}

    metrics = sample("rrrr" "rwww")  # one group of two all right: 0.5 >= grow_at
    assert metrics["charts/frac_solved_groups"] == 0.5 and metrics["charts/group_size"] == 4
    assert agent.group_size == 8 and told == []  # the env hears of it before the next batch is sampled
    metrics = sample("rwww" "rrww")  # drawn before the env was told: still two groups of 4
    assert told == [8] and metrics["charts/group_size"] == 4 and len(obs) == 16
    metrics = sample("rwwwwwww" "rrrrrrrr")  # two groups of 8: one mixed, one all right
    assert metrics["charts/group_size"] == 8 and metrics["charts/frac_zero_std_groups"] == 0.5
    assert metrics["charts/trained_completions"] == 8 and told == [8]

    resumed = LMAgent(cfg, num_envs=8, device=torch.device("cpu"), seed=0, regroup=told.append)
    resumed.load_state_dict(agent.state_dict())
    assert resumed.group_size == 8
    resumed.act(["What is 1 + 2?"] * 8 + ["hi"] * 8)
    assert told == [8, 8] and resumed.rollout_group == 8

    with pytest.raises(ValueError, match="larger than group_size"):
        LMConfig(group_size=8, grow_group_size=8).validate(8)
    with pytest.raises(ValueError, match="grow_at"):
        LMConfig(group_size=4, grow_group_size=8, grow_at=0).validate(8)
    with pytest.raises(ValueError, match="set_group_size"):
        LMAgent(cfg, num_envs=8, device=torch.device("cpu"))
