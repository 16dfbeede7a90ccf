"""Verifiable text games: prompts whose answers a program checks, for reward-only RL on language models.

Each task draws problems from a seeded ``random.Random`` and scores a completion with a
program (no judge model). ``TextGame`` batches prompts like a vector env, so the same
loop that plays Atari plays these: ``obs = prompts``, ``action = completions``, every
episode lasts one step, and ``info["episode"]["r"]`` is the task score (so an episodic
return is an accuracy).

Where the answer ends. The prompt asks for the answer first, so a completion is scored up to the
blank line that closes its first paragraph holding a number (``TextTask.cut``; "37 + 48 = 85\n\nBut
wait, the answer is 86" scores 85). Nothing the policy writes after that can change its reward,
so the LM sampler stops there (``TextGame.answer_done``) instead of paying for, and then training
on, tokens that the reward never read.

Answer extraction (integers), in order of precedence, on the first ``MAX_COMPLETION_CHARS`` of the cut:

1. the last ``\\boxed{N}``;
2. the last "answer" tag: "Answer: 85", "The answer is **85**.", "answer = $85$";
3. the last number of the first paragraph that contains a number ("**85**", "37 + 48 = 85.").

A number is ASCII digits with an optional sign ("-" or the Unicode minus "−"), optional
thousands commas ("1,234") and an optional decimal part ("85.0" counts as 85, "85.5" as a
non-integer, hence wrong). Only ASCII digits 0-9 count: a number written in other digits
(Arabic-Indic "٨٥", fullwidth "８５", superscripts) is not read, and digits glued to such
characters are rejected, so those answers score 0. The prompt asks for a plain number, and
accepting every Unicode digit would make checking ambiguous. Numbers longer than
``MAX_NUMBER_DIGITS`` digits are rejected without conversion, so "9" * 100000 costs
one regex scan and scores 0.
"""

from __future__ import annotations

import collections
import random
import re
import string
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

import numpy as np
from gymnasium.spaces import Text

from games.countdown import ExpressionError, evaluate, generate_puzzle

MAX_COMPLETION_CHARS = 4000  # only this prefix of a completion is read (bounds regex work)
MAX_NUMBER_DIGITS = 40  # longer digit runs are not numbers we will convert
MAX_LIST_LENGTH = 100  # sorting answers with more numbers are rejected
TEST_SEED = 1234  # default seed of the held-out test sets
TEST_SIZE = 500  # default size of the held-out test sets

# ----------------------------------------------------------------------------------------------
# Answer extraction
# ----------------------------------------------------------------------------------------------
# Lookarounds use \d and \w, which in Python match *Unicode* digits/letters: "8٥" is rejected
# as a whole rather than read as 8. The digits themselves are [0-9] (ASCII only).
_SIGN = r"(?:(?<![\w)\]])[-\u2212])?"  # a sign only when not glued to a word, digit or ")"
_NUMBER = _SIGN + r"(?<![\d.])(?:[0-9]{1,3}(?:,[0-9]{3})+|[0-9]+)(?:\.[0-9]+)?(?![\d\w])"
_NUMBER_RE = re.compile(_NUMBER)
_BOXED_RE = re.compile(r"\\boxed\s*\{\s*(" + _NUMBER + r")\s*\}")
# "answer" then only connective glue ("is", ":", "=", markdown/LaTeX marks) before the number, so
# "the answer by adding 37 and 48" does not read 37.
_ANSWER_RE = re.compile(r"\banswer\b\**(?:\s+is\b|\s*[:=])?[\s:*$`]{0,8}(" + _NUMBER + r")", re.IGNORECASE)
_DIGIT_RE = re.compile(r"[0-9]")
_PARAGRAPH_RE = re.compile(r"\n[ \t]*\n")
_PLAIN_NUMBER_RE = re.compile(r"\s*(" + _NUMBER + r")\.?\s*")
# For lists we read integers without thousands separators: "3,7,19" is three numbers.
_LIST_ITEM_RE = re.compile(r"(?:(?<![\w)\]])[-\u2212])?(?<![\d.])[0-9]+(?:\.[0-9]+)?(?![\d\w])")


def parse_number(token: str) -> int | None:
    """Integer value of a matched number token, or None if too long or not an integer."""
    token = token.replace(",", "").replace("\u2212", "-")
    whole, _, frac = token.partition(".")
    if frac.strip("0"):
        return None  # a genuine fraction: never equal to an integer answer
    if len(whole.lstrip("-")) > MAX_NUMBER_DIGITS:
        return None
    return int(whole)


def first_paragraph_with(text: str, pattern: re.Pattern[str]) -> str | None:
    """The first blank-line-separated paragraph of ``text`` in which ``pattern`` occurs."""
    for paragraph in _PARAGRAPH_RE.split(text):
        if pattern.search(paragraph):
            return paragraph
    return None


def cut_after_paragraph_with(text: str, pattern: re.Pattern[str]) -> str:
    """``text`` up to the blank line that ends its first paragraph in which ``pattern`` occurs (all of it if
    that paragraph is still open, or if no paragraph matches). Like extraction, it reads only the first
    ``MAX_COMPLETION_CHARS`` (later text is never scored anyway)."""
    start = 0
    for brk in _PARAGRAPH_RE.finditer(text, 0, MAX_COMPLETION_CHARS):
        if pattern.search(text, start, brk.start()):
            return text[: brk.start()]
        start = brk.end()
    return text


def extract_int(text: str) -> int | None:
    """The integer answer in a free-text completion (rules in the module docstring), or None."""
    text = text[:MAX_COMPLETION_CHARS]
    for pattern in (_BOXED_RE, _ANSWER_RE):
        matches = pattern.findall(text)
        if matches:
            return parse_number(matches[-1])
    paragraph = first_paragraph_with(text, _NUMBER_RE)
    if paragraph is None:
        return None
    return parse_number(_NUMBER_RE.findall(paragraph)[-1])


def _answer_region(text: str) -> str | None:
    """The part of a completion that holds a non-numeric answer (a list, an expression).

    The last ``\\boxed{...}``, else the rest of the line after the last "answer:"/"answer is",
    else the first paragraph that contains an ASCII digit.
    """
    text = text[:MAX_COMPLETION_CHARS]
    boxed = re.findall(r"\\boxed\s*\{([^{}\n]*)\}", text)
    if boxed:
        return boxed[-1]
    tagged = re.findall(r"\banswer\b\**[ \t]*(?:is\b|[:=])([^\n]*)", text, re.IGNORECASE)
    if tagged:
        return tagged[-1]
    return first_paragraph_with(text, _DIGIT_RE)


def _strip_markup(s: str) -> str:
    """Remove surrounding whitespace, markdown bold/code, LaTeX dollars and a final period."""
    for _ in range(3):
        s = s.strip().strip("`$").strip()
        if s.startswith("**"):
            s = s[2:]
        if s.endswith("**"):
            s = s[:-2]
        s = s.strip().rstrip(".")
    return s


def extract_int_list(text: str) -> list[int] | None:
    """The list of integers in the answer region (see ``_answer_region``), or None."""
    region = _answer_region(text)
    if region is None:
        return None
    tokens = _LIST_ITEM_RE.findall(region)
    if not tokens or len(tokens) > MAX_LIST_LENGTH:
        return None
    values = [parse_number(t) for t in tokens]
    if any(v is None for v in values):
        return None
    return values  # type: ignore[return-value]


def extract_expression_sides(text: str) -> list[str]:
    """Candidate expressions in a completion: the sides of "a = b" in the answer region."""
    region = _answer_region(text)
    if region is None:
        return []
    region = region.strip().split("\n")[0]  # one line: "(50 + 75) - 4 = 121"
    region = region.replace("\\times", "*").replace("\\cdot", "*").replace("\\div", "/")
    sides = region.split("=")
    if len(sides) > 3:
        return []
    return [s for s in (_strip_markup(side) for side in sides) if s]


# ----------------------------------------------------------------------------------------------
# Problems and tasks
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Problem:
    prompt: str
    """The user message shown to the policy (the LM policy applies its chat template)."""
    answer: str | int
    """The reference answer (for countdown: one valid expression; the score checks the rules)."""
    meta: dict[str, Any] = field(default_factory=dict, hash=False)
    """Task data needed to score (operands, numbers, target, ...) and ``key``: the problem's identity."""

    @property
    def key(self) -> str:
        """Identity used to keep test problems out of training (independent of prompt wording)."""
        return self.meta.get("key", self.prompt)


class TextTask(Protocol):
    name: str
    num_problems: int | None  # size of the problem space, None if too large to matter

    def sample(self, rng: random.Random) -> Problem: ...

    def score(self, completion: str, problem: Problem) -> float:
        """Correctness in [0, 1] (1 = right answer); 0 for anything unreadable."""
        ...

    def format_ok(self, completion: str, problem: Problem) -> bool:
        """True iff the completion is exactly in the format the prompt asks for (right or wrong)."""
        ...

    def cut(self, completion: str) -> str:
        """The part of a completion that is scored (optional: tasks without it score the whole text)."""
        ...


def _operand_range(digits: int) -> tuple[int, int]:
    if not 1 <= digits <= 9:
        raise ValueError(f"digits must be in 1..9, got {digits}")
    return (0 if digits == 1 else 10 ** (digits - 1)), 10**digits - 1


@dataclass(frozen=True)
class Arithmetic:
    """Binary arithmetic on ``digits``-digit operands: "What is 37 + 48? Answer with just the number."."""

    op: Literal["+", "*"] = "+"
    """Operator: "+" (task ``addition``) or "*" (task ``multiplication``)."""
    digits: int = 2
    """Number of digits of each operand (1 means 0..9)."""

    def __post_init__(self) -> None:
        _operand_range(self.digits)
        if self.op not in ("+", "*"):
            raise ValueError(f"op must be '+' or '*', got {self.op!r}")

    @property
    def name(self) -> str:
        return "addition" if self.op == "+" else "multiplication"

    @property
    def num_problems(self) -> int:
        lo, hi = _operand_range(self.digits)
        return (hi - lo + 1) ** 2

    def sample(self, rng: random.Random) -> Problem:
        lo, hi = _operand_range(self.digits)
        a, b = rng.randint(lo, hi), rng.randint(lo, hi)
        answer = a + b if self.op == "+" else a * b
        prompt = f"What is {a} {self.op} {b}? Answer with just the number."
        return Problem(prompt, answer, {"a": a, "b": b, "key": f"{a}{self.op}{b}"})

    def cut(self, completion: str) -> str:
        return cut_after_paragraph_with(completion, _NUMBER_RE)  # extract_int reads that paragraph

    def score(self, completion: str, problem: Problem) -> float:
        return float(extract_int(completion) == problem.answer)

    def format_ok(self, completion: str, problem: Problem) -> bool:
        return _PLAIN_NUMBER_RE.fullmatch(completion[:MAX_COMPLETION_CHARS]) is not None


@dataclass(frozen=True)
class Sorting:
    """Sort a list of integers ascending; the answer must be the whole list, exactly."""

    length: int = 5
    """How many numbers to sort."""
    max_value: int = 99
    """Numbers are uniform in [0, max_value] (repeats allowed)."""

    name = "sorting"
    num_problems = None

    def __post_init__(self) -> None:
        if not 2 <= self.length <= MAX_LIST_LENGTH or self.max_value < 1:
            raise ValueError(f"need 2 <= length <= {MAX_LIST_LENGTH} and max_value >= 1")

    def sample(self, rng: random.Random) -> Problem:
        values = [rng.randint(0, self.max_value) for _ in range(self.length)]
        shown = ", ".join(map(str, values))
        prompt = (f"Sort these numbers from smallest to largest: {shown}. "
                  "Answer with just the sorted numbers, separated by commas.")
        answer = ", ".join(map(str, sorted(values)))
        return Problem(prompt, answer, {"values": values, "key": shown})

    def cut(self, completion: str) -> str:
        return cut_after_paragraph_with(completion, _DIGIT_RE)  # _answer_region's last resort

    def score(self, completion: str, problem: Problem) -> float:
        return float(extract_int_list(completion) == sorted(problem.meta["values"]))

    def format_ok(self, completion: str, problem: Problem) -> bool:
        return re.fullmatch(r"\s*[0-9]+(?:\s*,\s*[0-9]+)*\.?\s*", completion[:MAX_COMPLETION_CHARS]) is not None


@dataclass(frozen=True)
class Countdown:
    """Reach a target with + - * / and parentheses, using each given number at most once."""

    num_numbers: int = 4
    """How many numbers are given."""
    max_number: int = 25
    """Given numbers are uniform in [1, max_number]."""
    max_target: int = 100
    """Targets lie in [1, max_target] (and never equal a given number)."""

    name = "countdown"
    num_problems = None

    def __post_init__(self) -> None:
        if not 2 <= self.num_numbers <= 8 or self.max_number < 2 or self.max_target < 2:
            raise ValueError("need 2 <= num_numbers <= 8, max_number >= 2, max_target >= 2")

    def sample(self, rng: random.Random) -> Problem:
        numbers, target, solution = generate_puzzle(rng, self.num_numbers, self.max_number, self.max_target)
        shown = ", ".join(map(str, numbers))
        prompt = (f"Using the numbers {shown}, write an arithmetic expression that equals {target}. "
                  "You may use +, -, *, / and parentheses, and each number at most once. "
                  "Answer with just the expression.")
        key = f"{sorted(numbers)}->{target}"
        return Problem(prompt, solution, {"numbers": numbers, "target": target, "key": key})

    def cut(self, completion: str) -> str:
        return cut_after_paragraph_with(completion, _DIGIT_RE)  # _answer_region's last resort

    def score(self, completion: str, problem: Problem) -> float:
        # Any side of "lhs = rhs" that is a valid expression equal to the target counts; a bare
        # echo of the target fails the number-usage check since the target is never given.
        numbers, target = problem.meta["numbers"], problem.meta["target"]
        for side in extract_expression_sides(completion):
            try:
                if evaluate(side, allowed=numbers) == target:
                    return 1.0
            except ExpressionError:
                pass
        return 0.0

    def format_ok(self, completion: str, problem: Problem) -> bool:
        text = completion[:MAX_COMPLETION_CHARS].strip().rstrip(".")
        if "\n" in text:
            return False
        lhs, _, rhs = text.partition("=")
        try:
            evaluate(lhs)
        except ExpressionError:
            return False
        return rhs.strip() in ("", str(problem.meta["target"]))


@dataclass(frozen=True)
class Repeat:
    """Toy task with a dense reward: score = fraction of the completion's characters equal to a digit.

    A random policy scores about 1/vocabulary; raising the probability of one character
    raises the reward smoothly, so a tiny randomly initialised LM learns it from reward alone.
    """

    digit: int | None = 7
    """The digit to repeat; None draws one per problem (the policy must then read the prompt)."""

    name = "repeat"

    def __post_init__(self) -> None:
        if self.digit is not None and self.digit not in range(10):
            raise ValueError(f"digit must be 0..9 or None, got {self.digit!r}")

    @property
    def num_problems(self) -> int:
        return 1 if self.digit is not None else 10

    def sample(self, rng: random.Random) -> Problem:
        d = self.digit if self.digit is not None else rng.randint(0, 9)
        return Problem(f"Repeat the digit {d}.", str(d), {"key": str(d)})

    def score(self, completion: str, problem: Problem) -> float:
        if not completion:
            return 0.0
        return completion.count(str(problem.answer)) / len(completion)  # O(len) in C: no cap needed

    def format_ok(self, completion: str, problem: Problem) -> bool:
        return self.score(completion, problem) == 1.0


TASKS: dict[str, Callable[..., TextTask]] = {
    "addition": lambda digits=2: Arithmetic("+", digits),
    "multiplication": lambda digits=2: Arithmetic("*", digits),
    "sorting": Sorting,
    "countdown": Countdown,
    "repeat": Repeat,
}


def list_text_games() -> list[str]:
    return sorted(TASKS)


def make_task(name: str, **options: Any) -> TextTask:
    """Build a task by name, e.g. ``make_task("addition", digits=3)``."""
    if name not in TASKS:
        raise ValueError(f"unknown text game {name!r}; available: {', '.join(list_text_games())}")
    try:
        return TASKS[name](**options)
    except TypeError as e:
        raise ValueError(f"bad options {options} for text game {name!r}: {e}") from None


# ----------------------------------------------------------------------------------------------
# Held-out test sets
# ----------------------------------------------------------------------------------------------
def is_disjoint_feasible(task: TextTask, n: int) -> bool:
    """Whether a test set of ``n`` distinct problems can be held out of training.

    Only when the problem space is at least 4x the test set: excluding the test set then
    removes at most a quarter of the training problems (e.g. 2-digit addition: 500 of 8100).
    Tiny spaces (1-digit arithmetic, ``repeat``) get an i.i.d. test set that overlaps training.
    """
    return task.num_problems is None or task.num_problems >= 4 * n


def test_set(task: TextTask, n: int = TEST_SIZE, seed: int = TEST_SEED) -> list[Problem]:
    """The fixed held-out problems of ``task``: deterministic in (task options, n, seed)."""
    rng = random.Random(f"ponglab-test:{task!r}:{seed}")  # str seeds are hashed with sha512: stable
    if not is_disjoint_feasible(task, n):
        return [task.sample(rng) for _ in range(n)]
    problems: dict[str, Problem] = {}
    for _ in range(100 * n):
        p = task.sample(rng)
        problems.setdefault(p.key, p)
        if len(problems) == n:
            return list(problems.values())
    raise RuntimeError(f"could not draw {n} distinct problems of {task!r}")


test_set.__test__ = False  # type: ignore[attr-defined]  # not a pytest test despite its name


# ----------------------------------------------------------------------------------------------
# The batched environment
# ----------------------------------------------------------------------------------------------
class TextGame:
    """A batch of one-step episodes: prompts in, completions out, rewards from a program.

    ``num_envs`` slots are split into groups of ``group_size`` consecutive slots that share a
    prompt, so a GRPO-style learner can use the group mean as baseline. ``split="train"``
    samples fresh problems each step (never a test problem when that is feasible);
    ``split="test"`` walks the held-out set in order from problem 0 after every ``reset``,
    so n evaluation episodes are the first n held-out problems.

    ``revisit`` (training, groups of 2 or more): that fraction of each batch's groups re-asks a recent
    problem whose group came back *mixed* (some samples right, some wrong), the most recent first, each
    at most ``revisit_max`` times. Uniformly drawn problems are soon all right (or all wrong) for every
    sample of a group, which gives a group baseline nothing to learn from; a mixed group is one the
    policy is unsure of, and asking it again while it still is keeps the batch informative (in the
    spirit of DAPO's dynamic sampling and online difficulty filtering, without discarding samples).
    It uses the scores alone, never the held-out set.

    ``set_group_size`` (training) changes the completions per prompt from the next batch drawn on; the
    prompts per batch stay ``num_envs // group_size`` of the constructor, so ``num_envs`` (the slots of the
    batch waiting for completions) grows with the groups. A learner grows its groups once most come back
    all right (`llm_bridge.agent.LMConfig.grow_group_size`).
    """

    def __init__(
        self,
        task: TextTask,
        num_envs: int,
        group_size: int = 1,
        split: Literal["train", "test"] = "train",
        seed: int = 0,
        format_reward: float = 0.0,
        test_size: int = TEST_SIZE,
        test_seed: int = TEST_SEED,
        revisit: float = 0.0,
        revisit_max: int = 3,
    ):
        if num_envs < 1 or group_size < 1 or num_envs % group_size:
            raise ValueError(f"num_envs ({num_envs}) must be a positive multiple of group_size ({group_size})")
        if split not in ("train", "test"):
            raise ValueError(f"split must be 'train' or 'test', got {split!r}")
        if split == "test" and group_size != 1:
            raise ValueError("split='test' evaluates each held-out problem once: use group_size=1")
        self.task, self.num_envs, self.group_size, self.split = task, num_envs, group_size, split
        self.prompts_per_batch = num_envs // group_size
        self.format_reward = float(format_reward)
        if not 0.0 <= revisit <= 1.0 or revisit_max < 1:
            raise ValueError(f"revisit must be in [0, 1] and revisit_max >= 1, got {revisit} and {revisit_max}")
        if revisit > 0 and (split != "train" or group_size < 2):
            raise ValueError("revisit re-asks problems whose group was mixed: it needs split='train' and group_size >= 2")
        self.revisit, self.revisit_max = float(revisit), int(revisit_max)
        self.test_problems = test_set(task, test_size, test_seed)
        self.disjoint = is_disjoint_feasible(task, test_size)
        self._test_keys = {p.key for p in self.test_problems} if self.disjoint else set()
        # Prompts are ASCII text; completions are arbitrary strings, so no action space is declared.
        self.single_observation_space = Text(max_length=4096, min_length=1, charset=string.printable)
        self.single_action_space = None
        self.seed = seed
        self.reset(seed=seed)

    def _sample_train(self) -> Problem:
        for _ in range(1000):
            p = self.task.sample(self._rng)
            if p.key not in self._test_keys:
                return p
        raise RuntimeError(f"1000 draws of {self.task!r} all hit the test set")

    def _next_problems(self) -> tuple[list[Problem], np.ndarray]:
        if self.split == "test":
            n = len(self.test_problems)
            index = (self._cursor + np.arange(self.num_envs)) % n  # [N]
            self._cursor += self.num_envs
            return [self.test_problems[i] for i in index], index
        self.num_envs = self.prompts_per_batch * self.group_size  # the slots of this batch (set_group_size)
        n_groups = self.prompts_per_batch
        again = [self._mixed.pop() for _ in range(min(round(self.revisit * n_groups), len(self._mixed)))]
        self._asked = [n + 1 for _, n in again] + [0] * (n_groups - len(again))  # [groups] times re-asked
        groups = [p for p, _ in again] + [self._sample_train() for _ in range(n_groups - len(again))]
        problems = [p for p in groups for _ in range(self.group_size)]  # slot g*G+j holds groups[g]
        return problems, np.full(self.num_envs, -1)

    def reset(self, seed: int | None = None) -> tuple[list[str], dict[str, Any]]:
        """Draw a fresh batch of problems (test split: restart at held-out problem 0)."""
        if seed is not None:
            self.seed = seed
            self._rng = random.Random(f"ponglab-train:{self.task!r}:{seed}")
        self._cursor = 0
        # Recent mixed groups, (problem, times re-asked), newest last; bounded so that stale ones fall out.
        self._mixed: collections.deque[tuple[Problem, int]] = collections.deque(maxlen=4 * self.num_envs)
        self.problems, self.problem_index = self._next_problems()
        return [p.prompt for p in self.problems], {"problems": self.problems, "problem_index": self.problem_index}

    def set_group_size(self, group_size: int) -> None:
        """Lay out the batches drawn from now on as groups of `group_size` (the batch already drawn keeps its own)."""
        if self.split != "train":
            raise ValueError("set_group_size: the held-out split asks each problem once (group_size 1)")
        if group_size < 1:
            raise ValueError(f"group_size must be >= 1, got {group_size}")
        if self.revisit > 0 and group_size < 2:
            raise ValueError("revisit needs groups of 2 or more")
        self.group_size = int(group_size)

    def step(self, completions: list[str]) -> tuple[list[str], np.ndarray, np.ndarray, np.ndarray, dict[str, Any]]:
        """Score one completion per slot, then draw the next problems (every episode ends here)."""
        if len(completions) != self.num_envs:
            raise ValueError(f"expected {self.num_envs} completions, got {len(completions)}")
        bad = [type(c).__name__ for c in completions if not isinstance(c, str)]
        if bad:
            raise TypeError(f"completions must be decoded str, got {bad[0]}")
        scored, G = self.problems, self.num_envs // self.prompts_per_batch if self.split == "train" else 1
        completions = [self.cut(c) for c in completions]  # what the reward reads (see answer_done)
        score = np.array([self.task.score(c, p) for c, p in zip(completions, scored)], dtype=np.float32)  # [N]
        fmt = np.array([self.task.format_ok(c, p) for c, p in zip(completions, scored)], dtype=bool)  # [N]
        reward = score + np.float32(self.format_reward) * fmt  # [N] learning signal; score alone is "r"
        info = {
            "episode": {"r": score, "l": np.ones(self.num_envs, dtype=np.int32)},  # one step per episode
            "_episode": np.ones(self.num_envs, dtype=bool),
            "correct": score >= 1.0,
            "format_ok": fmt,
            "completions": list(completions),
            "problems": scored,
            "problem_index": self.problem_index,
            "completion_chars": np.array([len(c) for c in completions], dtype=np.int32),
        }
        if self.revisit > 0:
            for g, group_score in enumerate(score.reshape(-1, G)):  # [groups, G]
                if 0 < group_score.mean() < 1 and self._asked[g] < self.revisit_max:
                    self._mixed.append((scored[g * G], self._asked[g]))
            info["revisited_groups"] = sum(n > 0 for n in self._asked)
        self.problems, self.problem_index = self._next_problems()
        terminated = np.ones(len(scored), dtype=bool)
        truncated = np.zeros(len(scored), dtype=bool)
        return [p.prompt for p in self.problems], reward.astype(np.float32), terminated, truncated, info

    def cut(self, completion: str) -> str:
        """The scored part of a completion: ``task.cut`` if the task defines one, else all of it."""
        cut = getattr(self.task, "cut", None)
        return completion if cut is None else cut(completion)

    def answer_done(self, completion: str) -> bool:
        """True once more text cannot change the reward: ``completion`` already runs past its cut.

        An LM policy checks this after every sampled token and stops the completion there (the stop
        token is kept, like EOS): same reward, fewer tokens to generate and to train on."""
        return len(self.cut(completion)) < len(completion)

    def close(self) -> None:
        pass

    def __repr__(self) -> str:
        return (f"TextGame({self.task!r}, num_envs={self.num_envs}, group_size={self.group_size}, "
                f"split={self.split!r}, seed={self.seed}, format_reward={self.format_reward})")


def make_text_game(
    name: str,
    num_envs: int,
    seed: int = 0,
    *,
    group_size: int = 1,
    split: Literal["train", "test"] = "train",
    format_reward: float = 0.0,
    test_size: int = TEST_SIZE,
    revisit: float = 0.0,
    **task_options: Any,
) -> TextGame:
    """E.g. ``make_text_game("addition", num_envs=16, group_size=8, digits=3)``."""
    task = make_task(name, **task_options)
    return TextGame(task, num_envs, group_size=group_size, split=split, seed=seed,
                    format_reward=format_reward, test_size=test_size, revisit=revisit)
