"""Tests of the verifiable text games: answer extraction, the safe countdown parser, hostile
completions, held-out test sets, and the TextGame vector-env semantics."""

from __future__ import annotations

import random
import time

import numpy as np
import pytest

from games.countdown import MAX_DEPTH, ExpressionError, check_solution, evaluate, generate_puzzle
from games.text import (
    TASKS,
    Problem,
    TextGame,
    extract_expression_sides,
    extract_int,
    extract_int_list,
    is_disjoint_feasible,
    list_text_games,
    make_task,
    make_text_game,
    test_set,
)

# ---------------------------------------------------------------------------------------------- extraction
INT_CASES = [
    ("85", 85),
    ("  85.\n", 85),
    ("The answer is 85.", 85),
    ("Answer: 85", 85),
    ("**Answer:** 85", 85),
    ("The final answer is $85$.", 85),
    ("\\boxed{85}", 85),
    ("So 37 + 48 = 84? No: \\boxed{85}. Check: 85 - 48 = 37", 85),  # boxed wins over later numbers
    ("**85**", 85),
    ("37 + 48 = 85", 85),  # last number of the first paragraph
    ("Sure!\n\n37 + 48 = 85\n\nI hope this helps with problem 3.", 85),  # first paragraph *with* a number
    ("Let me find the answer by adding 37 and 48: 85", 85),  # "answer by adding" is not an answer tag
    ("1,234", 1234),
    ("12,345,678.", 12345678),
    ("-5", -5),
    ("\u22125", -5),  # Unicode minus sign
    ("Answer: -5", -5),
    ("37-48", 48),  # a '-' glued to a digit is subtraction, not a sign
    ("85.0", 85),
    ("85.5", None),  # a genuine fraction is never an integer answer
    ("(85)", 85),
    ("", None),
    ("no digits here", None),
    ("\u0668\u0665", None),  # Arabic-Indic 85: not accepted
    ("\uff18\uff15", None),  # fullwidth 85: not accepted
    ("8\u0665", None),  # ASCII digit glued to a non-ASCII digit: rejected as a whole
    ("The answer is \u0668\u0665", None),
    ("\u00b2", None),  # superscript two
    ("9" * 41, None),  # longer than MAX_NUMBER_DIGITS
]


@pytest.mark.parametrize("text,expected", INT_CASES)
def test_extract_int(text: str, expected: int | None) -> None:
    assert extract_int(text) == expected


def test_extract_int_list_and_expression() -> None:
    assert extract_int_list("3, 7, 19, 42, 88") == [3, 7, 19, 42, 88]
    assert extract_int_list("3,7,19") == [3, 7, 19]  # commas separate items here, not thousands
    assert extract_int_list("Answer: [3, 7, 19]") == [3, 7, 19]
    assert extract_int_list("Let me see.\n\n1\n2\n3") == [1, 2, 3]  # first paragraph with a number
    assert extract_int_list("Sorted:\n1\n2\n3\n\nDone in 2 steps.") == [1, 2, 3]
    assert extract_int_list("\\boxed{1, 2, 3}") == [1, 2, 3]
    assert extract_int_list("1.5, 2") is None
    assert extract_int_list("") is None
    assert extract_expression_sides("(50 + 75) - 4 = 121.") == ["(50 + 75) - 4", "121"]
    assert extract_expression_sides("**Answer:** `50*2+21`") == ["50*2+21"]
    assert extract_expression_sides("$50 \\times 2$") == ["50 * 2"]
    assert extract_expression_sides("1=2=3=4") == []


# ---------------------------------------------------------------------------------------------- countdown parser
def test_countdown_parser_semantics() -> None:
    assert evaluate("2 + 3 * 4") == 14  # precedence
    assert evaluate("(2 + 3) * 4") == 20
    assert evaluate("10 - 3 - 2") == 5  # left associative
    assert evaluate("16 / 4 / 2") == 2
    assert evaluate("6 \u00d7 7 \u2212 2 \u00f7 2") == 41  # × − ÷ aliases
    for bad in ["7 / 2", "1 / 0", "-3 + 5", "2 ** 3", "2 3", "(1 + 2", "1 + 2)", "", "()", "abs(3)", "1e3", "\u0663"]:
        with pytest.raises(ExpressionError):
            evaluate(bad)
    # Number usage: each given number at most once, duplicates only if given twice.
    assert check_solution("(50 + 75) - 4", [4, 50, 75, 3], 121)
    assert not check_solution("50 + 50 + 21", [50, 21, 3], 121)
    assert check_solution("50 + 50 + 21", [50, 21, 50], 121)
    assert not check_solution("121", [50, 71], 121)
    assert not check_solution("50 + 71", [50, 71], 120)
    # Depth limit: MAX_DEPTH levels are fine, one more is rejected (not a RecursionError).
    assert evaluate("(" * MAX_DEPTH + "1" + ")" * MAX_DEPTH) == 1
    with pytest.raises(ExpressionError):
        evaluate("(" * (MAX_DEPTH + 1) + "1" + ")" * (MAX_DEPTH + 1))


def test_countdown_generator_is_solvable() -> None:
    rng = random.Random(0)
    for _ in range(300):
        numbers, target, solution = generate_puzzle(rng, 4, 25, 100)
        assert len(numbers) == 4 and all(1 <= n <= 25 for n in numbers)
        assert 1 <= target <= 100 and target not in numbers
        assert check_solution(solution, numbers, target), (numbers, target, solution)


def test_countdown_scoring() -> None:
    task = make_task("countdown")
    p = Problem("", "(50 + 75) - 4", {"numbers": [50, 75, 4, 3], "target": 121})
    right = ["(50 + 75) - 4", "50 + 75 - 4 = 121.", "Answer: `75 + 50 - 4`", "121 = 75 - 4 + 50", "\\boxed{(50+75)-4}"]
    wrong = ["50 + 75", "50 + 75 + 4 = 121", "(50 + 75) - 4 - 3 + 3", "75 + 50 - 4 + 0", "121", "50+75=125, 125-4=121"]
    assert [task.score(c, p) for c in right] == [1.0] * len(right)
    assert [task.score(c, p) for c in wrong] == [0.0] * len(wrong)
    assert task.format_ok("(50 + 75) - 4", p) and task.format_ok("50+75-4 = 121", p)
    assert not task.format_ok("The answer is 50+75-4", p)


# ---------------------------------------------------------------------------------------------- hostile input
HOSTILE = [
    "9" * 100_000,
    "1" * 5000,  # beyond Python's default int-from-str limit (4300 digits) if converted
    "(" * 10_000 + "1" + ")" * 10_000,
    "(" * 10_000,
    "\u0668\u0665",
    "\uff18\uff15",
    "__import__('os').system('ls')",
    "exec('import os')",
    "",
    "x" * 1_000_000,
    "1," * 500_000,
    "\\boxed{" * 10_000,
    "Answer: " * 10_000,
    "-" * 100_000 + "1",
    "1/0",
    "\x00\ud800",  # NUL and a lone surrogate
    "99999 * 99999 * 99999 * 99999 * 99999 * 99999",
    "\n\n" * 500_000 + "85",  # a million blank lines before a number
]


@pytest.mark.parametrize("name", ["addition", "multiplication", "sorting", "countdown"])
def test_hostile_completions_score_zero_fast(name: str) -> None:
    task = make_task(name)
    problems = test_set(task, n=5)
    start = time.perf_counter()
    for p in problems:
        for c in HOSTILE:
            assert task.score(c, p) == 0.0, (name, c[:50])
            task.format_ok(c, p)  # must not raise or hang either
            task.cut(c)
        assert task.score(str(p.answer), p) == 1.0  # the same problems do reward a right answer
    assert time.perf_counter() - start < 2.0


def test_repeat_reward_is_dense() -> None:
    task = make_task("repeat")
    p = task.sample(random.Random(0))
    assert p.prompt == "Repeat the digit 7."
    assert task.score("7777", p) == 1.0 and task.score("7a7b", p) == 0.5 and task.score("", p) == 0.0
    assert task.score("\u0667", p) == 0.0  # Arabic-Indic seven
    for c in HOSTILE:
        assert 0.0 <= task.score(c, p) <= 1.0
    with pytest.raises(ValueError):
        make_task("repeat", digit=12)


# ---------------------------------------------------------------------------------------------- tasks and test sets
@pytest.mark.parametrize("name", sorted(TASKS))
def test_reference_answer_scores_one_and_wrong_scores_zero(name: str) -> None:
    task = make_task(name)
    for p in test_set(task, n=50):
        assert task.score(str(p.answer), p) == 1.0 and task.format_ok(str(p.answer), p)
        wrong = "0" if name == "repeat" else "1 + 1 = 2"
        assert task.score(wrong, p) == 0.0


def test_arithmetic_answers() -> None:
    add, mul = make_task("addition", digits=3), make_task("multiplication", digits=3)
    rng = random.Random(1)
    for _ in range(100):
        p, q = add.sample(rng), mul.sample(rng)
        a, b = p.meta["a"], p.meta["b"]
        assert 100 <= a <= 999 and 100 <= b <= 999 and p.answer == a + b
        assert p.prompt == f"What is {a} + {b}? Answer with just the number."
        assert q.answer == q.meta["a"] * q.meta["b"]
        assert add.score(f"The answer is {a + b:,}.", p) == 1.0
        assert add.score(str(a + b + 1), p) == 0.0


def test_test_set_is_deterministic_and_distinct() -> None:
    for name in list_text_games():
        task = make_task(name)
        a, b = test_set(task), test_set(task)
        assert len(a) == 500 and a == b
        if is_disjoint_feasible(task, 500):
            assert len({p.key for p in a}) == 500
            assert test_set(task, seed=1) != a
    assert test_set(make_task("addition")) != test_set(make_task("multiplication"))
    # A smaller test set is a prefix of the default one: "first n held-out problems" is well defined.
    assert test_set(make_task("addition"), n=100) == test_set(make_task("addition"))[:100]


def test_train_problems_avoid_test_set() -> None:
    # 2-digit addition has 8100 problems; 3200 training draws would hit ~200 of the 500 test
    # problems by chance, so this fails if the exclusion is broken.
    env = make_text_game("addition", num_envs=16, seed=3)
    test_keys = {p.key for p in env.test_problems}
    assert env.disjoint
    seen = set()
    for _ in range(200):
        seen |= {p.key for p in env.problems}
        env.step(["0"] * 16)
    assert len(seen) > 2000 and not seen & test_keys
    # Tiny problem spaces cannot be held out; the env says so.
    assert not make_text_game("addition", num_envs=2, digits=1).disjoint


# ---------------------------------------------------------------------------------------------- TextGame
def test_grouping_and_step_semantics() -> None:
    env = make_text_game("addition", num_envs=8, group_size=4, seed=0, format_reward=0.1)
    prompts, info = env.reset(seed=5)
    assert len(prompts) == 8 and all(env.single_observation_space.contains(x) for x in prompts)
    assert len(set(prompts[:4])) == 1 and len(set(prompts[4:])) == 1 and prompts[0] != prompts[4]
    answers = [p.answer for p in info["problems"]]
    completions = [str(answers[0]), f"The answer is {answers[1]}.", str(answers[2] + 1), "",
                   "\u0668\u0665", f"**{answers[5]}**", "I don't know", str(answers[7])]
    next_prompts, reward, terminated, truncated, info = env.step(completions)
    np.testing.assert_allclose(info["episode"]["r"], [1, 1, 0, 0, 0, 1, 0, 1])
    np.testing.assert_allclose(reward, [1.1, 1, 0.1, 0, 0, 1, 0, 1.1], rtol=1e-6)  # format bonus: bare number
    assert reward.dtype == np.float32 and reward.shape == (8,)
    assert terminated.all() and not truncated.any() and info["_episode"].all()
    assert info["correct"].tolist() == [True, True, False, False, False, True, False, True]
    assert info["completions"] == completions and info["problems"][0].answer == answers[0]
    assert next_prompts != prompts and len(set(next_prompts[:4])) == 1
    # Same seed, same problems.
    assert env.reset(seed=5)[0] == prompts
    with pytest.raises(ValueError, match="expected 8 completions"):
        env.step(["1"])
    with pytest.raises(ValueError, match="multiple of group_size"):
        make_text_game("addition", num_envs=6, group_size=4)
    with pytest.raises(ValueError, match="available"):
        make_text_game("chess", num_envs=1)
    with pytest.raises(ValueError, match="bad options"):
        make_text_game("addition", num_envs=1, digts=3)


CUT_CASES = [  # (completion, scored part) for addition
    ("37 + 48 = 85\n\nBut wait, the answer is 86.", "37 + 48 = 85"),  # the first answer counts
    ("Sure!\n\n37 + 48 = 85\n\nI hope this helps.", "Sure!\n\n37 + 48 = 85"),  # first paragraph *with* a number
    ("85\n \t\nmore", "85"),  # a blank line may hold spaces
    ("85\n", "85\n"),  # one newline does not end a paragraph
    ("85", "85"),
    ("Hmm.\n\nLet me think", "Hmm.\n\nLet me think"),  # no number yet: still open
    ("", ""),
]


@pytest.mark.parametrize("text,scored", CUT_CASES)
def test_answer_cut(text: str, scored: str) -> None:
    env = make_text_game("addition", num_envs=1)
    assert env.cut(text) == scored
    assert env.answer_done(text) == (scored != text)


@pytest.mark.parametrize("name", ["addition", "sorting", "countdown"])
def test_text_after_answer_done_never_changes_the_reward(name: str) -> None:
    """What justifies stopping the sampler at `answer_done`: once it is True for a prefix, no continuation of
    that prefix scores differently. Checked for every prefix of completions built to break it."""
    env = make_text_game(name, num_envs=1, seed=3)
    problem = env.problems[0]
    right = str(problem.answer)
    completions = [f"{right}\n\nNo, the answer is 1.", "7\n\nAnswer: " + right, f"So:\n\n{right}\n\n\\boxed{{1}}",
                   f"x\n\n{right}.\n \n{right}", f"**{right}**\n\n1, 2, 3 = 4"]
    tails = ["", "\n\nThe answer is 0.", " = 5", f"\n\n\\boxed{{{right}}}", "\n\n1", "9"]
    checked = 0
    for text in completions:
        for end in range(len(text) + 1):
            prefix = text[:end]
            if not env.answer_done(prefix):
                continue
            reward = env.task.score(env.cut(prefix), problem)
            for tail in tails:
                assert env.cut(prefix + tail) == env.cut(prefix)
                assert env.task.score(env.cut(prefix + tail), problem) == reward, (prefix, tail)
            checked += 1
    assert checked > 10
    # And the game scores the cut text: a later "correction" earns nothing.
    _, reward, *_ = env.step([f"0\n\nThe answer is {right}"])
    assert reward[0] == 0.0


def test_revisit_re_asks_recent_mixed_groups_a_bounded_number_of_times() -> None:
    env = make_text_game("addition", num_envs=16, group_size=4, seed=0, revisit=0.5)
    assert env.revisit_max == 3

    def answer(pattern: str) -> list[str]:
        """One completion per slot: 'r' = right, 'w' = wrong, for the current 4 groups of 4."""
        return [str(p.answer) if c == "r" else "-1" for p, c in zip(env.problems, pattern)]

    asked = env.problems[::4]
    _, _, _, _, info = env.step(answer("rwww" "rrrr" "wrww" "wwww"))  # groups 0 and 2 mixed
    assert info["revisited_groups"] == 0
    again = env.problems[::4]
    assert again[:2] == [asked[2], asked[0]]  # the newest mixed group first, 2 of 4 groups (revisit=0.5)
    assert all(p not in asked for p in again[2:])  # the rest are fresh draws
    assert all(len(set(env.problems[g * 4 : g * 4 + 4])) == 1 for g in range(4))  # still groups of 4
    # Keep the first group mixed: it is re-asked revisit_max = 3 times, then no more.
    seen = 1
    for _ in range(5):
        problem = env.problems[0]
        _, _, _, _, info = env.step(answer("rwww" "wwww" "wwww" "wwww"))
        if env.problems[0] != problem:
            break
        seen += 1
    assert seen == 3, seen
    with pytest.raises(ValueError, match="group_size >= 2"):
        make_text_game("addition", num_envs=4, revisit=0.5)
    with pytest.raises(ValueError, match="revisit must be"):
        make_text_game("addition", num_envs=4, group_size=2, revisit=1.5)


def test_set_group_size_lays_out_the_next_batch_in_larger_groups() -> None:
    """The batch in hand keeps its groups (it was drawn before); from the next draw on, the same number of prompts
    comes in groups of the new size, `num_envs` follows, and revisits read the groups of the batch they score."""
    env = make_text_game("addition", num_envs=8, group_size=4, seed=0, revisit=0.5)
    assert env.prompts_per_batch == 2
    env.set_group_size(8)
    assert env.num_envs == 8 and len(env.problems) == 8  # the batch in hand: still 2 groups of 4
    second = env.problems[4]
    completions = [str(p.answer) if i in (0, 5) else "-1" for i, p in enumerate(env.problems)]  # both groups mixed
    obs, reward, terminated, truncated, info = env.step(completions)
    assert len(reward) == len(terminated) == len(truncated) == 8 and reward.sum() == 2
    assert len(obs) == env.num_envs == 16  # 2 prompts x 8
    assert all(len(set(env.problems[g * 8 : g * 8 + 8])) == 1 for g in range(2))
    assert env.problems[0] == second  # revisit=0.5: the first group re-asks the newest mixed problem
    with pytest.raises(ValueError, match="expected 16 completions"):
        env.step(["0"] * 8)
    _, reward, *_ = env.step(["0"] * 16)
    assert len(reward) == 16
    with pytest.raises(ValueError, match="held-out split"):
        make_text_game("addition", num_envs=4, split="test").set_group_size(8)
    with pytest.raises(ValueError, match="group_size must be >= 1"):
        env.set_group_size(0)


def test_test_split_walks_held_out_set_in_order() -> None:
    env = make_text_game("multiplication", num_envs=4, split="test")
    held_out = test_set(make_task("multiplication"))
    seen = []
    prompts, _ = env.reset()
    for _ in range(3):
        seen += prompts
        prompts, *_ = env.step(["0"] * 4)
    assert seen == [p.prompt for p in held_out[:12]]
    assert env.reset()[0] == [p.prompt for p in held_out[:4]]  # reset restarts the pass
    with pytest.raises(ValueError, match="group_size=1"):
        make_text_game("addition", num_envs=4, group_size=2, split="test")


def test_reward_alone_teaches_a_tiny_policy() -> None:
    """REINFORCE with a group baseline on ``repeat``: a per-position softmax over 12 characters,
    updated only from TextGame rewards, goes from ~1/12 to mostly '7'. Checks the reward is dense
    enough to learn from and that the group layout gives a usable baseline."""
    vocab = list("0123456789 a")
    rng = np.random.default_rng(0)
    length, lr = 6, 5.0
    logits = np.zeros((length, len(vocab)))  # [T, V]
    env = make_text_game("repeat", num_envs=32, group_size=8)
    env.reset(seed=0)
    first = None
    for _ in range(100):
        probs = np.exp(logits - logits.max(-1, keepdims=True))
        probs /= probs.sum(-1, keepdims=True)  # [T, V]
        tokens = np.stack([rng.choice(len(vocab), size=32, p=probs[t]) for t in range(length)], 1)  # [N, T]
        _, reward, _, _, info = env.step(["".join(vocab[i] for i in row) for row in tokens])
        first = info["episode"]["r"].mean() if first is None else first
        adv = reward.reshape(-1, 8) - reward.reshape(-1, 8).mean(1, keepdims=True)  # [N/G, G] group baseline
        adv = adv.reshape(-1)  # [N]
        onehot = np.eye(len(vocab))[tokens]  # [N, T, V]
        logits += lr * np.einsum("n,ntv->tv", adv, onehot - probs[None]) / 32  # ascent on E[adv * log p]
    assert first < 0.3
    assert info["episode"]["r"].mean() > 0.8
