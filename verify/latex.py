"""LaTeX answer strings -> clean text -> sympy expressions, without eval and with size guards.

Public functions, used by verify/math.py:

    clean_latex(s) -> Cleaned(text, percent)   # normalisation, pure string work
    parse_latex(text) -> sympy.Expr            # a recursive-descent parser of the cleaned text
    group_end(s, i) -> int                     # end of the balanced {...} group at s[i]

clean_latex steps, in order:
  1. unicode forms: − – to "-", × · ÷ √ π ∞ ≤ ≥ ± ∪ ∈ ° to their LaTeX commands, nbsp to space;
     \\emptyset, \\varnothing, ∅ to "\\{\\}"; a repeating decimal "0.\\overline{3}" to its fraction
  2. math delimiters dropped: \\$ (a dollar amount), $, \\( \\) \\[ \\], \\displaystyle, \\left and \\right
     (and \\big...), \\left. / \\right.
  3. thousands separators, between a digit and exactly 3 digits: a braced comma (spaced in or around
     the braces, or followed by a spacing command: "1{,}000", "1{, }000", "1 {,} 000", "1{,}\\!000"),
     a comma with \\! or \\, ("10,\\!080", "1,\\,000") and a spacing command alone ("1\\,000",
     "1\\ 000", "1\\;000", "1\\:000") are dropped wherever they stand: no list is written that way. A
     comma followed by \\; \\: or a control space ("10,\\;000", "10,\\ 000") is also how items are
     spaced ("(100,\\ 200)"), so it only loses the spacing: math.py joins "10,000" when it is the
     whole answer, as for any plain comma
  4. \\dfrac \\tfrac \\cfrac -> \\frac, \\dbinom \\tbinom -> \\binom, \\lbrace \\rbrace -> \\{ \\},
     \\langle \\rangle -> ( ), \\leq \\geq \\neq \\lt \\gt -> \\le \\ge \\ne < >, \\lvert \\rvert -> |,
     \\mathbb{R} -> \\reals, "inf" / "infinity" / \\infin -> \\infty
  5. degrees dropped: ^\\circ, ^{\\circ}, \\circ, \\degree (30^\\circ reads as 30, never as pi/6)
  6. percent: \\% or % dropped, remembered in Cleaned.percent (math.py decides what it means)
  7. text groups (\\text \\textbf \\mbox \\mathrm \\operatorname ...): "and"/"or" become a comma;
     a word without digits (a unit: "\\text{ cm}", "\\mbox{ inches}^2") is dropped with its
     power; anything else is unwrapped. \\boxed, \\fbox, \\mathbf, \\bm are always unwrapped
  8. spacing (\\! \\, \\: \\; \\  ~ \\quad \\qquad) to a space
  9. trailing unit words from a fixed list ("5 dollars", "3 cm^2", "12 square units", "5cm") dropped,
     "percent" setting the percent flag; then any trailing words of 3+ letters after a number and a
     space ("12 eggs", "7 red apples")
 10. scientific "1.5e-3" -> "1.5\\times10^{-3}"; surrounding whitespace and trailing . , ; dropped

parse_latex grammar (implicit multiplication binds like "*"; "^", "_", \\frac and \\sqrt take
one character or one {group}, so "\\frac12" is 1/2 and "x^23" is x^2*3, as LaTeX typesets them):

    expr    := term (("+" | "-" | \\pm | \\mp) term)*
    term    := unary ((\\cdot | \\times | "*" | "/" | \\div) unary | implicit power)*
    unary   := ("-" | "+" | \\pm) unary | power
    power   := postfix ("^" arg)?        postfix := atom "!"*
    atom    := number [ "_" base ] | number \\frac{int}{int} (a mixed number: 2\\frac12 = 5/2)
             | letter [ "_" sub ] | \\pi | \\infty | greek | ( expr ) | [ expr ] | { expr } | |expr|
             | \\frac arg arg | \\sqrt[n] arg | \\binom arg arg | \\lfloor expr \\rfloor | \\lceil ..
             | function [^arg] [_arg] (paren group | tight product)   (\\sin \\log_2 \\ln \\exp ...;
               \\sin^{-1} is arcsin)

Numbers are exact: "0.35" is 7/20. "i" is the imaginary unit, "e" Euler's number. "52_8" is an
integer written in base 8 (the whole digit run after "_" is the base). \\pm yields an expression in
the symbol PM (math.py expands it into the two values PM=+1 and PM=-1).

Guards (hostile model output must stay cheap): TooLarge is raised, instead of computing, for a
number literal over MAX_LITERAL_DIGITS digits, a numeric power whose exact value would have over
MAX_RESULT_DIGITS digits (10^{10^{10}}), any integer exponent over MAX_EXPONENT in absolute value,
and factorials / binomials of arguments over MAX_FACTORIAL. Nesting deeper than MAX_DEPTH is a
LatexParseError (never a RecursionError).
"""
from __future__ import annotations

import math
import re
from fractions import Fraction
from typing import NamedTuple

import sympy

MAX_LITERAL_DIGITS = 1000
MAX_RESULT_DIGITS = 10_000
MAX_EXPONENT = 10_000
MAX_FACTORIAL = 1000
MAX_DEPTH = 100

PM = sympy.Symbol("PM")  # the sign of a \pm; math.py substitutes +1 and -1


class LatexParseError(ValueError):
    """The text is not in the grammar of parse_latex."""


class TooLarge(LatexParseError):
    """Evaluating the text exactly would cost more than the guards allow (10^{10^{10}}, 10^6!)."""


class Cleaned(NamedTuple):
    text: str       # normalised LaTeX
    percent: bool   # a percent sign (or the unit "percent") was removed


# ---------------------------------------------------------------------------------------------
# Normalisation
# ---------------------------------------------------------------------------------------------

_UNICODE = {"−": "-", "–": "-", "—": "-", "×": r"\times ", "·": r"\cdot ", "÷": r"\div ",
            "√": r"\sqrt", "π": r"\pi ", "∞": r"\infty ", "≤": r"\le ", "≥": r"\ge ", "≠": r"\ne ",
            "±": r"\pm ", "∪": r"\cup ", "∈": r"\in ", "°": r"^\circ", "\u00a0": " ", "\u2009": " "}
_COMMAND_ALIASES = [(r"\\[dtc]frac(?![a-zA-Z])", r"\\frac"), (r"\\[dt]binom(?![a-zA-Z])", r"\\binom"),
                    (r"\\lbrace(?![a-zA-Z])", r"\\{"), (r"\\rbrace(?![a-zA-Z])", r"\\}"),
                    (r"\\langle(?![a-zA-Z])", "("), (r"\\rangle(?![a-zA-Z])", ")"),
                    (r"\\leqslant(?![a-zA-Z])|\\leq(?![a-zA-Z])", r"\\le "),
                    (r"\\geqslant(?![a-zA-Z])|\\geq(?![a-zA-Z])", r"\\ge "),
                    (r"\\neq(?![a-zA-Z])", r"\\ne "), (r"\\lt(?![a-zA-Z])", "<"), (r"\\gt(?![a-zA-Z])", ">"),
                    (r"\\mathbb\s*\{?\s*R\s*\}?", r"\\reals "), (r"\\infin(?:ity)?(?![a-zA-Z])", r"\\infty "),
                    (r"(?<![a-zA-Z\\])inf(?:inity)?(?![a-zA-Z])", r"\\infty "),
                    (r"\\[lr]?vert(?![a-zA-Z])", "|")]
_SIZING = re.compile(r"\\(?:left|right|bigl|bigr|Bigl|Bigr|biggl|biggr|Biggl|Biggr|big|Big|bigg|Bigg)"
                     r"(?![a-zA-Z])\s*(\.)?")
# Step 3. _THOUSANDS drops the separators that only a number uses; _SPACED_COMMA turns ",\;" into ","
# (a list's comma or a thousands comma: the whole-answer rule in math.py tells them apart).
_SPACE_CMD = r"\\[!,:; ]\s*"       # \! \, \: \; and "\ " (a control space), with the blanks after them
_THOUSANDS = re.compile(rf"(?<=\d)(?:\s*\{{\s*,\s*\}}\s*|,\\[!,]\s*|{_SPACE_CMD})(?:{_SPACE_CMD})*(?=\d{{3}}(?!\d))")
_SPACED_COMMA = re.compile(rf"(?<=\d),(?:\\[:; ]\s*)(?:{_SPACE_CMD})*(?=\d{{3}}(?!\d))")
_DEGREES = re.compile(r"\^\s*\{\s*\\circ\s*\}|\^\s*\\circ|\\circ|\^\s*\{\s*\\degree\s*\}|\\degree(?![a-zA-Z])")
_SPACING = re.compile(r"(\\\\)|\\[!,:;> ]|~|\\q?quad(?![a-zA-Z])|\\hspace\*?\{[^{}]*\}")  # \\ (a row break) kept
_SCIENTIFIC = re.compile(r"(\d)[eE]([+-]?\d+)(?![\d.])")
_ALWAYS_UNWRAP = {"boxed", "fbox", "mathbf", "bm", "boldsymbol", "mathit", "mathnormal", "displaystyle"}
_TEXTLIKE = {"text", "textbf", "textit", "textrm", "textsf", "texttt", "textnormal", "mbox", "hbox",
             "mathrm", "mathsf", "mathtt", "operatorname", "emph"}
_GROUP_COMMAND = re.compile(r"\\(" + "|".join(sorted(_ALWAYS_UNWRAP | _TEXTLIKE, key=len, reverse=True))
                            + r")\s*\{")
_UNIT_WORDS = ("cm mm km m meters metres meter metre feet foot ft inches inch yards yard yd miles mile mph "
               "kph hours hour hrs hr minutes minute mins min seconds second secs sec days day weeks week "
               "months month years year dollars dollar cents cent degrees degree deg units unit square sq "
               "cubic grams gram kg kilograms pounds pound lbs lb ounces ounce oz liters litres liter "
               "gallons gallon ml people students points percent ways").split()
_TRAILING_WORDS = re.compile(r"(?<=[\d})])\s+[a-zA-Z]{3,}(?:\s+[a-zA-Z]{2,})*\.?\s*$")  # "5 apples"
_REPEATING = re.compile(r"(\d*)\.(\d*)\\overline\s*\{(\d+)\}")
_EMPTY_SET = re.compile(r"\\(?:emptyset|varnothing)(?![a-zA-Z])|∅")
_TRAILING_UNITS = re.compile(r"(?<=[\d})])(?:\s*(?<![a-zA-Z])(?:" + "|".join(w for w in _UNIT_WORDS if len(w) > 1)
                             + r")\b\.?|\s+m\b\.?)+\s*(?:\^\s*\{?\s*[23]\s*\}?)?\s*$")


def group_end(s: str, i: int) -> int:
    """Index just past the {...} group opening at s[i] == "{" (backslash escapes skipped); -1 if unclosed."""
    depth, j = 0, i
    while j < len(s):
        c = s[j]
        if c == "\\":
            j += 2
            continue
        if c == "{":
            depth += 1
        elif c == "}":
            depth -= 1
            if depth == 0:
                return j + 1
        j += 1
    return -1


def _unwrap_text_groups(s: str) -> str:
    """Step 7 of clean_latex: resolve \\text-like groups (units dropped, connectives to commas).

    A group without digits is a unit, and dropped, when it has a word of 2+ letters, starts with a
    space ("\\text{ m}") or follows a number or bracket ("5\\text{s}"); else it is unwrapped
    ("\\text{(A)}" -> "{(A)}", "\\text{5}" -> "{5}").
    """
    out, pos = [], 0
    while True:
        m = _GROUP_COMMAND.search(s, pos)
        if m is None:
            out.append(s[pos:])
            return "".join(out)
        brace = m.end() - 1
        end = group_end(s, brace)
        if end < 0:
            raise LatexParseError(f"unbalanced braces after \\{m.group(1)} in {s[:80]!r}")
        out.append(s[pos:m.start()])
        inner = _unwrap_text_groups(s[brace + 1:end - 1])
        word = inner.strip().lower()
        pos = end
        if m.group(1) in _ALWAYS_UNWRAP:
            out.append("{" + inner + "}")
        elif word in ("and", "or", ",", "and,", ", and", "or,"):
            out.append(",")
        elif not re.search(r"\d", inner) and (re.search(r"[a-zA-Z]{2,}", inner) or inner[:1].isspace()
                                             or re.search(r"[\d})]\s*$", "".join(out))):
            unit_power = re.match(r"\s*\^\s*(?:\{\s*\d\s*\}|\d)", s[pos:])   # "\mbox{ cm}^2"
            if unit_power:
                pos += unit_power.end()
            out.append(" ")
        else:
            out.append("{" + inner + "}")


def _repeating_decimal(m: re.Match) -> str:
    """"0.1\\overline{6}" -> "\\frac{1}{6}": the exact value of a repeating decimal."""
    whole, fixed, period = m.group(1) or "0", m.group(2), m.group(3)
    value = Fraction(int(whole)) + Fraction(int(fixed or "0"), 10 ** len(fixed)) + \
        Fraction(int(period), (10 ** len(period) - 1) * 10 ** len(fixed))
    return f"\\frac{{{value.numerator}}}{{{value.denominator}}}"


def clean_latex(s: str) -> Cleaned:
    """Normalise an answer string (the steps are listed in the module docstring)."""
    for k, v in _UNICODE.items():
        s = s.replace(k, v)
    s = _EMPTY_SET.sub(r"\\{\\}", s)
    s = _REPEATING.sub(_repeating_decimal, s)
    s = s.replace("\\$", " ").replace("$", " ")
    s = re.sub(r"(\\\\)|\\[()\[\]]", lambda m: m.group(1) or " ", s)
    s = re.sub(r"\\(?:displaystyle|textstyle)(?![a-zA-Z])", " ", s)
    s = _SIZING.sub("", s)
    s = _THOUSANDS.sub("", s)
    s = _SPACED_COMMA.sub(",", s)
    for pattern, repl in _COMMAND_ALIASES:
        s = re.sub(pattern, repl, s)
    s = _DEGREES.sub(" ", s)
    percent = "%" in s
    s = s.replace("\\%", " ").replace("%", " ")
    s = _unwrap_text_groups(s)
    s = _SPACING.sub(lambda m: m.group(1) or " ", s)
    s = re.sub(r"\s+", " ", s).strip()
    s = re.sub(r"(?<=[\d})\s])\s*\b(?:and|or)\b\s*", ", ", s)  # "3 and 5" is the list "3, 5"
    for trailing in (_TRAILING_UNITS, _TRAILING_WORDS):
        m = trailing.search(s)
        if m and m.start() > 0:
            percent = percent or "percent" in m.group(0)
            s = s[:m.start()]
    s = _SCIENTIFIC.sub(r"\1\\times10^{\2}", s)
    s = re.sub(r"(?:\\\\|[\s.,;])+$", "", s).strip()
    return Cleaned(s, percent)


# ---------------------------------------------------------------------------------------------
# Tokens
# ---------------------------------------------------------------------------------------------

_TOKEN = re.compile(r"\s*(?:(\d+(?:\.\d+)?|\.\d+)|(\\[a-zA-Z]+|\\.)|(\S))")

_FUNCTIONS = {"sin": sympy.sin, "cos": sympy.cos, "tan": sympy.tan, "cot": sympy.cot, "sec": sympy.sec,
              "csc": sympy.csc, "arcsin": sympy.asin, "arccos": sympy.acos, "arctan": sympy.atan,
              "sinh": sympy.sinh, "cosh": sympy.cosh, "tanh": sympy.tanh, "exp": sympy.exp,
              "ln": sympy.log, "log": sympy.log, "lg": lambda x: sympy.log(x, 10)}
_INVERSES = {"sin": sympy.asin, "cos": sympy.acos, "tan": sympy.atan}
_GREEK = set("alpha beta gamma delta epsilon varepsilon zeta eta theta vartheta iota kappa lambda mu nu "
             "xi omicron rho sigma tau upsilon phi varphi chi psi omega Gamma Delta Theta Lambda Xi Sigma "
             "Phi Psi Omega ell".split())
_MUL = {"*", r"\cdot", r"\times", r"\ast"}
_DIV = {"/", r"\div"}
_ATOM_COMMANDS = {r"\frac", r"\sqrt", r"\binom", r"\pi", r"\infty", r"\lfloor", r"\lceil"} | \
                 {"\\" + f for f in _FUNCTIONS} | {"\\" + g for g in _GREEK}


class _Tok(NamedTuple):
    kind: str   # "num" | "cmd" | "ch"
    text: str


def _tokenize(s: str) -> list[_Tok]:
    toks, pos = [], 0
    while pos < len(s):
        m = _TOKEN.match(s, pos)
        if m is None:   # only trailing whitespace is left
            break
        pos = m.end()
        if m.group(1):
            toks.append(_Tok("num", m.group(1)))
        elif m.group(2):
            toks.append(_Tok("cmd", m.group(2)))
        else:
            toks.append(_Tok("ch", m.group(3)))
    return toks


# ---------------------------------------------------------------------------------------------
# Guarded constructors
# ---------------------------------------------------------------------------------------------

def _digits(x: sympy.Rational) -> float:
    """log10 of the larger of |numerator|, |denominator| (an upper bound of the digit count)."""
    p, q = abs(int(x.p)), abs(int(x.q))
    return max(p.bit_length(), q.bit_length()) * math.log10(2)


def _pow(base: sympy.Expr, exp: sympy.Expr) -> sympy.Expr:
    """base^exp, refusing what sympy would expand into a huge exact number: (c*sqrt(2))^n is
    computed as c^n * 2^(n/2), so every rational inside a numeric base is raised to |n|."""
    if exp.is_Integer and abs(int(exp)) > MAX_EXPONENT:
        raise TooLarge(f"exponent {int(exp)} is over {MAX_EXPONENT}")
    if exp.is_Rational and base.is_number:
        biggest = max((_digits(r) for r in base.atoms(sympy.Rational) if not r.is_zero), default=0.0)
        if abs(int(exp.p)) * biggest > MAX_RESULT_DIGITS:
            raise TooLarge(f"a power with more than {MAX_RESULT_DIGITS} digits")
    return sympy.Pow(base, exp)


def _factorial(n: sympy.Expr) -> sympy.Expr:
    if n.is_Number and abs(n) > MAX_FACTORIAL:
        raise TooLarge(f"factorial of a number over {MAX_FACTORIAL}")
    return sympy.factorial(n)


def _binomial(n: sympy.Expr, k: sympy.Expr) -> sympy.Expr:
    if n.is_Number and abs(n) > MAX_FACTORIAL:
        raise TooLarge(f"binomial of a number over {MAX_FACTORIAL}")
    return sympy.binomial(n, k)


def _number(text: str) -> sympy.Rational:
    if len(text.replace(".", "")) > MAX_LITERAL_DIGITS:
        raise TooLarge(f"a number literal with more than {MAX_LITERAL_DIGITS} digits")
    return sympy.Rational(text)


# ---------------------------------------------------------------------------------------------
# Parser
# ---------------------------------------------------------------------------------------------

class _Parser:
    """Recursive descent over the token list; every method returns a sympy expression."""

    def __init__(self, text: str):
        self.toks = _tokenize(text)
        self.i = 0
        self.depth = 0
        self.in_abs = 0

    # -- token helpers
    def peek(self, k: int = 0) -> _Tok | None:
        j = self.i + k
        return self.toks[j] if j < len(self.toks) else None

    def is_(self, text: str, k: int = 0) -> bool:
        t = self.peek(k)
        return t is not None and t.kind != "num" and t.text == text

    def take(self) -> _Tok:
        t = self.peek()
        if t is None:
            raise LatexParseError("unexpected end of input")
        self.i += 1
        return t

    def expect(self, text: str) -> None:
        t = self.take()
        if t.text != text or t.kind == "num":
            raise LatexParseError(f"expected {text!r}, found {t.text!r}")

    def enter(self) -> None:
        self.depth += 1
        if self.depth > MAX_DEPTH:
            raise LatexParseError(f"nesting deeper than {MAX_DEPTH}")

    # -- grammar
    def parse(self) -> sympy.Expr:
        if not self.toks:
            raise LatexParseError("empty expression")
        e = self.expr()
        if self.peek() is not None:
            raise LatexParseError(f"unexpected {self.peek().text!r}")
        return e

    def expr(self) -> sympy.Expr:
        self.enter()
        e = self.term()
        while True:
            t = self.peek()
            if t is None or t.kind == "num":
                break
            if t.text == "+":
                self.take(); e = e + self.term()
            elif t.text == "-":
                self.take(); e = e - self.term()
            elif t.text == r"\pm":
                self.take(); e = e + PM * self.term()
            elif t.text == r"\mp":
                self.take(); e = e - PM * self.term()
            else:
                break
        self.depth -= 1
        return e

    def term(self) -> sympy.Expr:
        return self._products(self.unary())

    def _products(self, f: sympy.Expr) -> sympy.Expr:
        while True:
            t = self.peek()
            if t is None:
                return f
            if t.kind != "num" and t.text in _MUL:
                self.take(); f = f * self.unary()
            elif t.kind != "num" and t.text in _DIV:
                self.take(); f = f / self.unary()
            elif self.starts_atom():
                f = f * self.power()
            else:
                return f

    def unary(self) -> sympy.Expr:
        sign = 1
        while self.is_("-") or self.is_("+") or self.is_(r"\pm") or self.is_(r"\mp"):   # "--5" is 5
            t = self.take().text
            sign = sign * (-1 if t == "-" else PM if t in (r"\pm", r"\mp") else 1)
        return sign * self.power()

    def starts_atom(self) -> bool:
        t = self.peek()
        if t is None:
            return False
        if t.kind == "num":   # "2 3" is no product (and "1 000" no number): refuse it
            return self.i == 0 or self.toks[self.i - 1].kind != "num"
        if t.kind == "cmd":
            return t.text in _ATOM_COMMANDS
        return t.text.isalpha() or t.text in "({" or (t.text == "|" and not self.in_abs)

    def power(self) -> sympy.Expr:
        base = self.postfix()
        if self.is_("^"):
            self.take()
            return _pow(base, self.arg(signed=True))
        return base

    def postfix(self) -> sympy.Expr:
        a = self.atom()
        while self.is_("!"):
            self.take()
            a = _factorial(a)
        return a

    def arg(self, signed: bool = False) -> sympy.Expr:
        """A macro argument: {group}, one digit (the rest of the number stays), one letter or command."""
        self.enter()
        t = self.peek()
        if t is None:
            raise LatexParseError("missing argument")
        if t.kind == "num":
            if len(t.text) > 1 and t.text[0] != ".":   # \frac12: split off the first digit
                self.toks[self.i:self.i + 1] = [_Tok("num", t.text[0]), _Tok("num", t.text[1:])]
            value = _number(self.take().text)
        elif signed and t.text in ("-", "+"):
            self.take()
            value = self.arg() * (-1 if t.text == "-" else 1)
        elif t.text == "{":
            self.take()
            value = self.expr()
            self.expect("}")
        elif t.kind == "ch" and t.text.isalpha():
            value = self.atom()
        elif t.kind == "cmd":
            value = self.atom()
        else:
            raise LatexParseError(f"bad argument {t.text!r}")
        self.depth -= 1
        return value

    def raw_sub(self) -> str:
        """The text of a subscript: one character or a {group} of plain tokens."""
        if self.is_("{"):
            self.take()
            parts = []
            while not self.is_("}"):
                parts.append(self.take().text)
            self.take()
            return "".join(parts)
        return self.take().text

    def atom(self) -> sympy.Expr:
        self.enter()
        t = self.take()
        if t.kind == "num":
            value = self.number(t.text)
        elif t.kind == "ch":
            value = self.char_atom(t.text)
        else:
            value = self.command(t.text)
        self.depth -= 1
        return value

    def number(self, text: str) -> sympy.Expr:
        if self.is_("_") and "." not in text:          # 52_8: an integer written in base 8
            self.take()
            base_text = self.raw_sub()
            if not base_text.isdigit() or not 2 <= int(base_text) <= 36:
                raise LatexParseError(f"bad base {base_text!r}")
            try:
                return sympy.Integer(int(text, int(base_text)))
            except ValueError:
                raise LatexParseError(f"{text} is not a numeral in base {base_text}") from None
        value = _number(text)
        if self.is_(r"\frac") and "." not in text:     # 2\frac{1}{2}: a mixed number
            fraction = self.mixed_fraction()
            if fraction is not None:
                return value + fraction
        return value

    def mixed_fraction(self) -> sympy.Expr | None:
        """After an integer: \\frac{p}{q} with integer literals p, q > 0 is the fraction of a mixed
        number; anything else (2\\frac{\\pi}{3}) is left for implicit multiplication (returns None)."""
        save_i, save_toks = self.i, list(self.toks)
        self.take()
        parts = []
        for _ in range(2):
            start = self.i
            value = self.arg()
            consumed = [t.text for t in self.toks[start:self.i]]
            if len(consumed) == 3 and consumed[0] == "{" and consumed[2] == "}":
                consumed = consumed[1:2]
            parts.append(value if len(consumed) == 1 and consumed[0].isdigit() else None)
        if all(p is not None and p > 0 for p in parts):
            return parts[0] / parts[1]
        self.i, self.toks = save_i, save_toks
        return None

    def char_atom(self, c: str) -> sympy.Expr:
        if c == "(":
            e = self.expr(); self.expect(")"); return e
        if c == "[":
            e = self.expr(); self.expect("]"); return e
        if c == "{":
            e = self.expr(); self.expect("}"); return e
        if c == "|":
            self.in_abs += 1
            e = self.expr()
            self.in_abs -= 1
            self.expect("|")
            return sympy.Abs(e)
        if c.isalpha() and c.isascii():
            if self.is_("_"):
                self.take()
                return sympy.Symbol(f"{c}_{self.raw_sub()}")
            if c == "i":
                return sympy.I
            if c == "e":
                return sympy.E
            return sympy.Symbol(c)
        raise LatexParseError(f"unexpected {c!r}")

    def command(self, cmd: str) -> sympy.Expr:
        name = cmd[1:]
        if name == "frac":
            num = self.arg()
            return num / self.arg()
        if name == "sqrt":
            index = None
            if self.is_("["):
                self.take(); index = self.expr(); self.expect("]")
            radicand = self.arg()
            return sympy.sqrt(radicand) if index is None else sympy.root(radicand, index)
        if name == "binom":
            n = self.arg()
            return _binomial(n, self.arg())
        if name == "pi":
            return sympy.pi
        if name == "infty":
            return sympy.oo
        if name in ("lfloor", "lceil"):
            e = self.expr()
            self.expect(r"\rfloor" if name == "lfloor" else r"\rceil")
            return sympy.floor(e) if name == "lfloor" else sympy.ceiling(e)
        if name in _GREEK:
            return sympy.Symbol(name)
        if name in _FUNCTIONS:
            return self.function(name)
        raise LatexParseError(f"unsupported command {cmd}")

    def function(self, name: str) -> sympy.Expr:
        power = base = None
        for _ in range(2):
            if self.is_("^"):
                self.take(); power = self.arg(signed=True)
            elif self.is_("_"):
                self.take(); base = self.arg()
        if self.is_("("):
            self.take(); x = self.expr(); self.expect(")")
        else:   # \sin 2x, \cot x: the tight product that follows
            x = self._tight_product()
        if power == -1 and name in _INVERSES:          # \tan^{-1} x is arctan x
            return _INVERSES[name](x)
        f = sympy.log(x, base) if base is not None and name == "log" else _FUNCTIONS[name](x)
        return f if power is None else _pow(f, power)

    def _tight_product(self) -> sympy.Expr:
        f = self.power()
        while self.starts_atom() and not (self.peek().kind == "cmd" and self.peek().text[1:] in _FUNCTIONS):
            f = f * self.power()
        return f


def parse_latex(text: str) -> sympy.Expr:
    """The sympy value of a cleaned LaTeX expression (no relations, commas or intervals: math.py
    splits those off first). Raises LatexParseError (or its subclass TooLarge)."""
    return _Parser(text).parse()
