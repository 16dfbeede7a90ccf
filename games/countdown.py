"""Countdown arithmetic: a safe expression evaluator and a puzzle generator.

The countdown text game asks a language model for an arithmetic expression such as
``(50 + 75) - 4`` that reaches a target using given numbers, each at most once.
The model's answer is untrusted text, so it is never handed to ``eval``: a small
hand-written tokenizer and recursive-descent parser accept exactly this grammar

    expr   := term   (("+" | "-") term)*
    term   := factor (("*" | "/") factor)*
    factor := NUMBER | "(" expr ")"

and nothing else (no unary minus, no exponent, no names, no calls). Every input is
bounded before any work is done, so hostile text fails fast with ``ExpressionError``:

* at most ``MAX_EXPR_CHARS`` characters and ``MAX_TOKENS`` tokens,
* at most ``MAX_NUMBER_DIGITS`` digits per number literal,
* parentheses nested at most ``MAX_DEPTH`` deep (the parser recurses once per level),
* every intermediate value within ``MAX_ABS_VALUE`` in magnitude,
* division must be exact (``7 / 2`` is rejected, as in the TV game), and never by zero.

Arithmetic is on Python ints, so results are exact.
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Sequence

MAX_EXPR_CHARS = 200
MAX_TOKENS = 100
MAX_NUMBER_DIGITS = 6
MAX_DEPTH = 16
MAX_ABS_VALUE = 10**18

# Operators a language model commonly writes, mapped to the four the grammar knows.
_OPERATORS = {
    "+": "+", "-": "-", "*": "*", "/": "/", "(": "(", ")": ")",
    "\u2212": "-",  # − (Unicode minus sign)
    "\u00d7": "*",  # × (multiplication sign)
    "\u00f7": "/",  # ÷ (division sign)
}


class ExpressionError(ValueError):
    """The text is not a valid countdown expression (syntax, limits, or rules)."""


def tokenize(text: str) -> list[int | str]:
    """Split ``text`` into ints and operator characters; raise ExpressionError on anything else."""
    if len(text) > MAX_EXPR_CHARS:
        raise ExpressionError(f"expression longer than {MAX_EXPR_CHARS} characters")
    tokens: list[int | str] = []
    i, n = 0, len(text)
    while i < n:
        c = text[i]
        if c in " \t":
            i += 1
        elif "0" <= c <= "9":  # ASCII digits only: str.isdigit() would accept '٣' or '³'
            j = i
            while j < n and "0" <= text[j] <= "9":
                j += 1
            if j - i > MAX_NUMBER_DIGITS:
                raise ExpressionError(f"number literal longer than {MAX_NUMBER_DIGITS} digits")
            tokens.append(int(text[i:j]))
            i = j
        elif c in _OPERATORS:
            tokens.append(_OPERATORS[c])
            i += 1
        else:
            raise ExpressionError(f"unexpected character {c!r} at position {i}")
        if len(tokens) > MAX_TOKENS:
            raise ExpressionError(f"more than {MAX_TOKENS} tokens")
    return tokens


class _Parser:
    """Recursive-descent evaluator over a token list; records the number literals it uses."""

    def __init__(self, tokens: list[int | str]):
        self.tokens = tokens
        self.pos = 0
        self.depth = 0
        self.used: list[int] = []

    def peek(self) -> int | str | None:
        return self.tokens[self.pos] if self.pos < len(self.tokens) else None

    def parse(self) -> int:
        if not self.tokens:
            raise ExpressionError("empty expression")
        value = self.expr()
        if self.pos != len(self.tokens):
            raise ExpressionError(f"unexpected token {self.tokens[self.pos]!r} after the expression")
        return value

    def expr(self) -> int:
        value = self.term()
        while self.peek() in ("+", "-"):
            op = self.tokens[self.pos]
            self.pos += 1
            value = _apply(op, value, self.term())
        return value

    def term(self) -> int:
        value = self.factor()
        while self.peek() in ("*", "/"):
            op = self.tokens[self.pos]
            self.pos += 1
            value = _apply(op, value, self.factor())
        return value

    def factor(self) -> int:
        tok = self.peek()
        if isinstance(tok, int):
            self.pos += 1
            self.used.append(tok)
            return tok
        if tok == "(":
            self.depth += 1
            if self.depth > MAX_DEPTH:
                raise ExpressionError(f"parentheses nested deeper than {MAX_DEPTH}")
            self.pos += 1
            value = self.expr()
            if self.peek() != ")":
                raise ExpressionError("missing closing parenthesis")
            self.pos += 1
            self.depth -= 1
            return value
        raise ExpressionError(f"expected a number or '(' but found {tok!r}")


def _apply(op: str, a: int, b: int) -> int:
    if op == "+":
        value = a + b
    elif op == "-":
        value = a - b
    elif op == "*":
        value = a * b
    else:
        if b == 0:
            raise ExpressionError("division by zero")
        if a % b != 0:
            raise ExpressionError(f"inexact division {a} / {b}")
        value = a // b
    if abs(value) > MAX_ABS_VALUE:
        raise ExpressionError(f"intermediate value exceeds {MAX_ABS_VALUE}")
    return value


def evaluate(text: str, allowed: Sequence[int] | None = None) -> int:
    """Value of the expression ``text``.

    If ``allowed`` is given, the number literals used must be a sub-multiset of it
    (each given number at most once). Raises ExpressionError on any violation.
    """
    parser = _Parser(tokenize(text))
    value = parser.parse()
    if allowed is not None:
        missing = Counter(parser.used) - Counter(allowed)
        if missing:
            raise ExpressionError(f"uses numbers not available: {sorted(missing.elements())}")
    return value


def check_solution(text: str, numbers: Sequence[int], target: int) -> bool:
    """True iff ``text`` is a valid expression over ``numbers`` (each at most once) equal to ``target``."""
    try:
        return evaluate(text, allowed=numbers) == target
    except ExpressionError:
        return False


def generate_puzzle(
    rng: random.Random, num_numbers: int, max_number: int, max_target: int
) -> tuple[list[int], int, str]:
    """Draw ``(numbers, target, solution)``: a solvable countdown puzzle and one reference solution.

    Numbers are uniform in [1, max_number]. A random subset of at least two of them is
    combined pairwise at random with operators whose result stays a positive integer, so
    the target is reachable by construction. Puzzles whose target lies outside
    [1, max_target] or equals one of the numbers (a trivial solution) are redrawn.
    """
    for _ in range(10_000):
        numbers = [rng.randint(1, max_number) for _ in range(num_numbers)]
        k = rng.randint(2, num_numbers)
        items = [(v, str(v)) for v in rng.sample(numbers, k)]  # (value, expression text)
        while len(items) > 1:
            i, j = rng.sample(range(len(items)), 2)
            (a, ea), (b, eb) = items[i], items[j]
            ops = ["+", "*"]
            if a > b:
                ops.append("-")
            if b > 1 and a % b == 0:
                ops.append("/")
            op = rng.choice(ops)
            combined = (_apply(op, a, b), f"({ea} {op} {eb})")
            items = [it for t, it in enumerate(items) if t not in (i, j)] + [combined]
        target, expr = items[0]
        if 1 <= target <= max_target and target not in numbers:
            return numbers, target, expr[1:-1]  # drop the outermost parentheses
    raise RuntimeError(
        f"could not generate a countdown puzzle with num_numbers={num_numbers}, "
        f"max_number={max_number}, max_target={max_target}; raise max_target"
    )
