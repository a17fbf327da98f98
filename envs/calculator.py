"""The calculator tool: exact arithmetic on rational numbers, parsed here (no `eval`, no `ast`
execution), in-process.

    evaluate("12 * (3 + 4) / 8")  -> Fraction(21, 2)
    format_value(Fraction(21, 2)) -> "10.5"

Grammar (usual precedence; `**` binds tighter than unary minus on its left and is right-assoc.,
as in Python: -2**2 = -4, 2**3**2 = 512):

    expr   := term (("+" | "-") term)*
    term   := unary (("*" | "/" | "//" | "%") unary)*
    unary  := ("+" | "-") unary | power
    power  := atom ("**" unary)?
    atom   := number | "(" expr ")"
    number := digits ["." digits] | "." digits   (also 1_000 and "x" / "×" / "÷" / "^" as * / / **)

Limits keep a call cheap whatever the model writes: at most MAX_CHARS characters and MAX_DEPTH
nested parentheses, integer exponents only (|e| <= MAX_EXPONENT), and no value beyond MAX_DIGITS
digits in numerator or denominator. Anything else is a CalculatorError naming what was wrong (the
tool turns it into an error observation).
"""
from __future__ import annotations

import re
from fractions import Fraction

MAX_CHARS = 500
MAX_DEPTH = 50
MAX_EXPONENT = 1000
MAX_DIGITS = 2000

_TOKEN = re.compile(r"\s*(?:(\d[\d_]*(?:\.\d+)?|\.\d+)|(\*\*|//|[-+*/%()^x×÷]))")
_ALIASES = {"x": "*", "×": "*", "÷": "/", "^": "**"}


class CalculatorError(ValueError):
    """An expression the calculator refuses or cannot evaluate (the message says why)."""


def _tokens(text: str) -> list[str | Fraction]:
    out, pos = [], 0
    text = text.strip()
    while pos < len(text):
        m = _TOKEN.match(text, pos)
        if m is None or m.end() == pos:
            rest = text[pos:].lstrip()
            raise CalculatorError(f"unexpected {rest[:12]!r} at character {len(text) - len(rest) + 1}")
        number, op = m.groups()
        if number is not None:
            out.append(Fraction(number.replace("_", "")))
        else:
            out.append(_ALIASES.get(op, op))
        pos = m.end()
    return out


class _Parser:
    def __init__(self, tokens: list):
        self.tokens, self.i, self.depth = tokens, 0, 0

    def peek(self):
        return self.tokens[self.i] if self.i < len(self.tokens) else None

    def take(self):
        t = self.peek()
        self.i += 1
        return t

    def expr(self) -> Fraction:
        value = self.term()
        while self.peek() in ("+", "-"):
            op = self.take()
            value = _checked(value + self.term() if op == "+" else value - self.term())
        return value

    def term(self) -> Fraction:
        value = self.unary()
        while self.peek() in ("*", "/", "//", "%"):
            op = self.take()
            rhs = self.unary()
            if op == "*":
                value = value * rhs
            elif rhs == 0:
                raise CalculatorError("division by zero")
            elif op == "/":
                value = value / rhs
            elif op == "//":
                value = Fraction(value // rhs)
            else:
                value = value % rhs
            value = _checked(value)
        return value

    def unary(self) -> Fraction:
        if self.peek() in ("+", "-"):
            sign = self.take()
            value = self.unary()
            return -value if sign == "-" else value
        return self.power()

    def power(self) -> Fraction:
        base = self.atom()
        if self.peek() != "**":
            return base
        self.take()
        exponent = self.unary()
        if exponent.denominator != 1:
            raise CalculatorError(f"only integer exponents are supported, got {_plain(exponent)}")
        if abs(exponent) > MAX_EXPONENT:
            raise CalculatorError(f"exponent {exponent} is beyond the limit of {MAX_EXPONENT}")
        if base == 0 and exponent < 0:
            raise CalculatorError("division by zero (0 to a negative power)")
        bits = max(abs(base.numerator), abs(base.denominator)).bit_length() * abs(int(exponent))
        if bits * 0.30103 > MAX_DIGITS:
            raise CalculatorError(f"the result would have more than {MAX_DIGITS} digits")
        return _checked(base ** int(exponent))

    def atom(self) -> Fraction:
        t = self.take()
        if isinstance(t, Fraction):
            return t
        if t == "(":
            self.depth += 1
            if self.depth > MAX_DEPTH:
                raise CalculatorError(f"more than {MAX_DEPTH} nested parentheses")
            value = self.expr()
            if self.take() != ")":
                raise CalculatorError("a '(' is not closed")
            self.depth -= 1
            return value
        if t is None:
            raise CalculatorError("the expression ends too early")
        raise CalculatorError(f"unexpected {t!r}")


def _checked(value: Fraction) -> Fraction:
    if max(abs(value.numerator), value.denominator).bit_length() * 0.30103 > MAX_DIGITS:
        raise CalculatorError(f"a value has more than {MAX_DIGITS} digits")
    return value


def evaluate(text: str) -> Fraction:
    """The exact value of an arithmetic expression (module docstring), or CalculatorError."""
    if not isinstance(text, str) or not text.strip():
        raise CalculatorError("empty expression")
    if len(text) > MAX_CHARS:
        raise CalculatorError(f"the expression has {len(text)} characters, more than {MAX_CHARS}")
    parser = _Parser(_tokens(text))
    value = parser.expr()
    if parser.peek() is not None:
        raise CalculatorError(f"unexpected {parser.peek()!r} after a complete expression")
    return value


def _plain(value: Fraction) -> str:
    return str(value.numerator) if value.denominator == 1 else f"{value.numerator}/{value.denominator}"


def format_value(value: Fraction, places: int = 12) -> str:
    """An integer as itself, a terminating decimal exactly ("10.5"), any other fraction as p/q with a
    rounded decimal beside it ("1/3 ≈ 0.333333333333")."""
    if value.denominator == 1:
        return str(value.numerator)
    d = value.denominator
    for p in (2, 5):
        while d % p == 0:
            d //= p
    if d == 1:   # terminating: print every digit
        sign = "-" if value < 0 else ""
        n, q = abs(value.numerator), value.denominator
        whole, rest = divmod(n, q)
        digits = ""
        while rest:
            rest *= 10
            digit, rest = divmod(rest, q)
            digits += str(digit)
        return f"{sign}{whole}.{digits}"
    approx = round(value, places)
    return f"{_plain(value)} ≈ {format_value(Fraction(approx)) if approx.denominator != 1 else approx.numerator}"
