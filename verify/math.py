"""Math answers: extract the final answer of a completion and decide whether it equals the gold.

    from verify.math import extract_answer, gold_answer, is_equivalent, verify
    extract_answer(text) -> str | None
    gold_answer(text) -> str | None           # the answer a gold (bare or worked solution) states
    is_equivalent(pred, gold, *, timeout_s=5.0, rel_tol=1e-6) -> bool
    verify(completion, gold) -> bool          # extract_answer, then is_equivalent; False if none

This is the accuracy reward of GRPO on MATH/AIME/GSM8K-style data: a verifier that accepts a wrong
answer or rejects a right one teaches the model the wrong thing, so every policy below is deliberate.
Model output is untrusted: nothing reaches eval/exec or sympy's string parser; a hand-written
parser (verify/latex.py) builds sympy values and refuses inputs whose exact value is too big.

Normalisation (verify/latex.py clean_latex): unicode minus and symbols; $, \\$, \\( \\), \\left/\\right
dropped; thousands separators joined: a braced comma or a spacing command between digit groups
wherever it stands ("10,\\!080", "1{,}000", "1{, }000", "1\\,000", "1\\;000"), a plain comma or one
spaced with \\; \\: or a control space only when the number is the whole answer ("58,500",
"10,\\;000"; in "(100,\\ 200)" and "5, 1,000" it separates items); \\dfrac/\\tfrac -> \\frac; degrees
(^\\circ, °) dropped; \\% remembered; \\text{} units ("5\\text{ cm}", "\\mbox{ inches}^2") dropped,
other \\text{} unwrapped; spacing (\\! \\, \\; \\ ) removed; trailing unit words ("5 dollars")
dropped; "1.5e3" read as scientific notation.

Answer structure (this module): "A \\cup B" is a union of intervals; a bare comma list "1, 2" is an
unordered list of answers (the solutions of an equation), like the set "\\{1, 2\\}" and a plain group
"{1, 2}" (how \\boxed{1, 2} reads, and a set written without \\{ \\}; "{5}" is 5); "(1, 2)",
"[a, b)" are ordered (a tuple or an interval: the two read the same, open/closed ends matter);
pmatrix/bmatrix are matrices (a one-row or one-column matrix also equals the tuple of its entries);
"x = 5" is an equation, "x > 3" / "3 < x" / "x \\in (3, \\infty)" the same interval, and so is an
inequality or chain linear in one variable, solved for it ("2x + 1 > 5", "5 \\ge 3 - x",
"3 < 2x - 1 \\le 7" is (2, 4]; a negative factor flips it: "-x < 3" is x > -3); the names in
"(x, y) = (1, 2)" and "f(x) = 2x + 3" are dropped (the answer is the right-hand side), and so is
an approximation after the exact value ("3\\sqrt2 \\approx 4.24" is 3\\sqrt2); "a \\pm b" is the
unordered pair {a + b, a - b}. A one-element list or set equals its element; lists and sets
compare as sets (each element of one equals some element of the other, so repeats do not count);
a tuple "(1, 2)" never equals the list "1, 2".

Several boxes: a gold whose complete top-level \\boxed{}/\\fbox{} do not all state the same answer
("\\boxed{2} and \\boxed{3}": the parts of a question) is one answer, the boxes in order; gold_answer
returns it as "\\boxed{2}, \\boxed{3}", the form is_equivalent and verify read that way. A prediction
answers it with its own boxes or the items of its comma list ("2, 3", "x = 2, y = 3"), one for one
and in order: "3", "3, 2", the set "\\{2, 3\\}" and the tuple "(2, 3)" do not. A completion's answer
to it is its final run of boxes (the last ones written one after another, only commas, "and",
part labels, "y =", spacing between them) when there are two or more, else its extract_answer.
Boxes that all state one answer (a solution boxing it once per method, or in two forms) are that
answer, and a gold with one box or none is read as before.

Comparison order, cheapest first (the first that decides wins):
  1. string: the raw strings are identical -> equal
  2. special forms: a gold that is a choice letter ("(C)", "\\text{(C)}") needs the same letter; a
     gold that is words ("\\text{Evelyn}", "east") needs the same words, case-insensitively;
     otherwise identical normalised strings -> equal
  3. numeric: two plain decimal numbers compare as exact fractions (no sympy); after parsing,
     two rational values compare exactly (so 1/3 != 0.333333 and 0.5 == 1/2), any other constant
     (sqrt 2, pi) compares by value at 30 digits within rel_tol (default 1e-6, relative to the larger
     magnitude) or ABS_TOL (1e-12) near zero
  4. symbolic: pred - gold, as sympy builds it and then after sympy.simplify (within a share of the
     time limit), is 0 -> equal; is a constant -> equal only if it is 0 within ABS_TOL (so a
     decimal approximation inside a symbolic answer, "x + 1.4142136" for "x + \\sqrt2", is wrong)
  5. numeric at random points, when simplify cannot decide: both sides at RANDOM_POINTS seeded
     points (each symbol drawn from [0.5, 2.5], so sqrt(x^2) equals x) agree within POINT_REL_TOL
     (1e-10) at all of at least MIN_VALID_POINTS points where both are finite -> equal
Equations compare by their right-hand sides when the left-hand sides are the same symbol
("y = 2x + 3"), else as proportional (a = b equals c = d when a - b = k (c - d), k != 0 constant);
"x = 5" also equals "5". Inequalities that are not intervals (x^2 > 4, x + y > 1) compare as f > 0
with a positive factor.

Policies: percent — "50\\%" equals both "50" and "0.5" (a percent sign may be read or ignored,
in either argument); without a percent sign on either side 50 != 0.5. Degrees are dropped, so
30^\\circ equals 30 but not \\pi/6. "52_8" is an integer in base 8: it equals "52_8", "42" written as
"42_{10}", and (since the question asked for base 8) a bare "52"; "2\\frac12" is the mixed number
5/2. "i" is the imaginary unit and "e" Euler's number. \\infty equals only \\infty (-\\infty only
-\\infty); an undefined value (0/0, 1/0) equals nothing but the identical string.

Time limits: each is_equivalent call runs under signal.setitimer(ITIMER_REAL) + SIGALRM when it is
in the main thread of its process; a timeout means "not equivalent". In other threads no alarm is
possible: callers there should use the worker pool (verify/pool.py), which gives each item its own
time limit and kills hung workers. Cheap guards run before sympy in every thread: answers over
MAX_ANSWER_CHARS are compared as strings only, and verify/latex.py refuses values with more than
10 000 digits (10^{10^{10}}), exponents over 10 000 and huge factorials (then only the strings are
compared), so even without an alarm no single sympy call gets an astronomically large number.
is_equivalent is a trust boundary: any error while reading model text counts as "not equivalent".
"""
from __future__ import annotations

import random
import re
import signal
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from fractions import Fraction

import mpmath
import sympy

from verify.latex import PM, LatexParseError, clean_latex, group_end, parse_latex

DEFAULT_REL_TOL = 1e-6
ABS_TOL = 1e-12             # values this close to each other are equal whatever their size
MAX_ANSWER_CHARS = 2000     # longer answers are compared as strings only
RANDOM_POINTS = 6
POINT_REL_TOL = 1e-10       # identical expressions evaluated at 30 digits agree far closer than this
MIN_VALID_POINTS = 3        # points where both sides evaluate to finite numbers
SYMBOLIC_SHARE = 0.4        # of timeout_s, the most one simplify() may take
HEAVY_EXPONENT = 64         # (expr)^n with larger n skips simplify() (expansion blows up)
HEAVY_NODES = 400           # so does an expression tree with more nodes


# ---------------------------------------------------------------------------------------------
# Extraction
# ---------------------------------------------------------------------------------------------

_BOXED = re.compile(r"\\(?:boxed|fbox)(?![a-zA-Z])")
_ANSWER_TAG = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)
_ANSWER_PHRASE = re.compile(r"\banswer\s*(?:is\b\s*:?|:|=)[ \t]*|####[ \t]*", re.IGNORECASE)


def _box_at(text: str, m: re.Match) -> tuple[str, int] | None:
    """(content, end) of the box whose command `m` matched: its balanced {...} group, or the next
    word of `\\boxed 5`; None when the group is unclosed (a truncated completion)."""
    j = m.end()
    while j < len(text) and text[j] in " \t":
        j += 1
    if j < len(text) and text[j] == "{":
        end = group_end(text, j)
        return (text[j + 1:end - 1], end) if end > 0 else None
    bare = re.match(r"[^\s${}\\][^\s$]*", text[j:])   # "\boxed 5", "\boxed5": the next word
    return (bare.group(0), j + bare.end()) if bare else None


def _last_boxed(text: str) -> str | None:
    """Content of the last complete \\boxed{...} / \\fbox{...} (or `\\boxed 5`); an unclosed last
    one (a truncated completion) is skipped in favour of the one before."""
    for m in reversed(list(_BOXED.finditer(text))):
        box = _box_at(text, m)
        if box is not None:
            return box[0]
    return None


def _top_boxes(text: str) -> list[tuple[int, int, str]]:
    """(start, end, content) of every complete box that is not inside another one, in order."""
    boxes, pos = [], 0
    while True:
        m = _BOXED.search(text, pos)
        if m is None:
            return boxes
        box = _box_at(text, m)
        if box is None:                 # unclosed (truncated): no box; the boxes after it still count
            pos = m.end()
            continue
        boxes.append((m.start(), box[1], box[0].strip()))
        pos = box[1]


# What may stand between two boxes of one answer: spacing, punctuation, math delimiters, "and" /
# "or", a part label "(b)" / "b)" / "(ii)" / "2." and a variable's name "y =" (\text{...} groups are
# unwrapped first). Any other word ends the run: "\boxed{2} is wrong, so \boxed{3}" is one answer, 3.
_BOX_GAP_TEXT = re.compile(r"\\(?:text|textbf|textit|textrm|mbox|mathrm)\s*\{([^{}]*)\}")
_BOX_GAP = re.compile(r"(?:\s|[$,;:.&*]|\\[()\[\]!,:; ]|\\\\|\\q?quad(?![a-zA-Z])|\b(?:and|or)\b"
                      r"|\((?:[a-z]|[ivx]+|\d+)\)|\b(?:[a-z]|\d+)[).]|[a-z](?:_\{?\w+\}?)?\s*=)*", re.IGNORECASE)


def _final_run(text: str) -> list[str]:
    """Contents of the last boxes a completion writes one after another ("\\boxed{2} and \\boxed{3}",
    "$x = \\boxed{2}$, $y = \\boxed{3}$"): from its last box back while only _BOX_GAP separates a box
    from the next. Boxes before that (scratch work, an answer retracted in prose) do not count."""
    boxes = _top_boxes(text)
    run = boxes[-1:]
    for box in reversed(boxes[:-1]):
        gap = _BOX_GAP_TEXT.sub(r" \1 ", text[box[1]:run[0][0]])
        if not _BOX_GAP.fullmatch(gap):
            break
        run.insert(0, box)
    return [content for _, _, content in run]


def _box_list(contents: list[str]) -> str:
    """The one-string form of several boxes, "\\boxed{a}, \\boxed{b}" (see gold_answer)."""
    return ", ".join("\\boxed{" + c + "}" for c in contents)


def _phrase_answer(rest: str) -> str:
    """The answer after "the answer is" / "####": a $...$ span if it starts one, else to the end of
    the line or sentence (blank lines right after the phrase are skipped)."""
    rest = rest.lstrip().split("\n", 1)[0].strip().lstrip("*").strip()
    math_span = re.match(r"\$\$?(.+?)\$\$?", rest)
    if math_span:
        return math_span.group(1).strip()
    return re.split(r"\.(?:\s|$)", rest, maxsplit=1)[0].strip().rstrip("*.").strip()


def extract_answer(text: str) -> str | None:
    """The final answer written in a completion, or None when it states none.

    Tried in order, the first form present wins:
      1. the last \\boxed{...} or \\fbox{...} with balanced braces (nested braces and \\{ \\} are
         fine; `\\boxed 5` without braces takes the next token; an unclosed last box is skipped)
      2. the last <answer>...</answer>, stripped of whitespace and surrounding $
      3. the last "answer is X" / "answer: X" (any case; "The final answer is $X$.") or "#### X":
         X is the first $...$ after it, else the rest of the line up to a full stop
    Returns the content stripped of surrounding whitespace (it may be "" for an empty box).
    """
    if not isinstance(text, str) or not text:
        return None
    boxed = _last_boxed(text)
    if boxed is not None:
        return boxed.strip()
    tags = _ANSWER_TAG.findall(text)
    if tags:
        return tags[-1].strip().strip("$").strip()
    phrases = list(_ANSWER_PHRASE.finditer(text))
    for m in reversed(phrases):
        answer = _phrase_answer(text[m.end():])
        if answer:
            return answer
    return None


_SOLUTION_MARKERS = ("\\boxed", "\\fbox", "<answer>", "####")   # a gold holding these is a worked solution


def _gold_parts(gold: str) -> list[str] | None:
    """The answers of a gold with two or more complete top-level boxes, in order: all its boxes, or
    only the last one when every box states the same answer as the last (a solution that boxes its
    answer once per method, or in two forms: "\\boxed{15\\frac{39}{40}}, or \\boxed{\\frac{639}{40}}").
    None for a gold with fewer boxes, and for boxes inside boxes (read as before; this also keeps
    the comparisons below from recursing)."""
    boxes = [content for _, _, content in _top_boxes(gold)]
    if len(boxes) < 2 or any(_BOXED.search(box) for box in boxes):
        return None
    if all(is_equivalent(box, boxes[-1]) for box in boxes[:-1]):
        return boxes[-1:]
    return boxes


def gold_answer(text: str) -> str | None:
    """The answer a gold states, a bare answer ("5") or a worked solution ("... so \\boxed{5}.").

    A gold whose complete top-level boxes do not all state the same answer is one answer made of
    all of them, returned as "\\boxed{a}, \\boxed{b}": is_equivalent and verify read a gold of that
    form box by box, in order ("\\boxed{2} and \\boxed{3}" is answered by 2 then 3, not by 3, and
    not by 3, 2). Otherwise: a worked solution gives its extract_answer (the last box, ...), and a
    text with no answer form is the answer itself. None for an empty text and for a worked
    solution whose answer cannot be extracted (an unclosed \\boxed{, an empty "####").
    """
    if not isinstance(text, str) or not text.strip():
        return None
    text = text.strip()
    parts = _gold_parts(text)
    if parts is not None and len(parts) > 1:
        return _box_list(parts)
    extracted = extract_answer(text)
    if extracted is None:
        return None if any(marker in text for marker in _SOLUTION_MARKERS) else text
    return extracted or None


# ---------------------------------------------------------------------------------------------
# Time limits
# ---------------------------------------------------------------------------------------------

class TimeLimitExceeded(Exception):
    """Raised by the SIGALRM handler of time_limit."""


def _on_alarm(signum, frame):
    raise TimeLimitExceeded()


@contextmanager
def time_limit(seconds: float):
    """Raise TimeLimitExceeded in the body after `seconds` (ITIMER_REAL + SIGALRM).

    Nests: an inner limit never outlives an enclosing one, and the enclosing timer and handler
    are restored on exit. Off the main thread (or without setitimer) it does nothing: guards and
    the worker pool have to bound the work there.
    """
    if not hasattr(signal, "setitimer") or threading.current_thread() is not threading.main_thread():
        yield
        return
    outer_left, _ = signal.getitimer(signal.ITIMER_REAL)
    previous = signal.signal(signal.SIGALRM, _on_alarm)
    start = time.monotonic()
    signal.setitimer(signal.ITIMER_REAL, max(min(seconds, outer_left) if outer_left > 0 else seconds, 1e-4))
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
        if outer_left > 0:
            signal.setitimer(signal.ITIMER_REAL, max(outer_left - (time.monotonic() - start), 1e-4))


# ---------------------------------------------------------------------------------------------
# Answer structure
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Ordered:
    """A tuple, point, vector or interval: "(1, 2)", "[a, b)"; brackets and order matter."""
    left: str
    right: str
    items: tuple


@dataclass(frozen=True)
class Unordered:
    """A set "\\{1, 2\\}" or a bare list "1, 2" of answers; order does not matter."""
    items: tuple


@dataclass(frozen=True)
class Union:
    """Intervals joined by \\cup; compared as an unordered collection of intervals."""
    parts: tuple


@dataclass(frozen=True)
class Matrix:
    rows: tuple   # tuple of rows, each a tuple of values


@dataclass(frozen=True)
class Relation:
    """lhs = rhs, or f > 0 / f >= 0 (inequalities are normalised to that form, rhs = 0)."""
    lhs: sympy.Expr
    op: str
    rhs: sympy.Expr


_OPENERS, _CLOSERS = {"(", "[", "{", r"\{"}, {")", "]", "}", r"\}"}
_RELATIONS = {"=": "=", "<": "<", ">": ">", r"\le": "<=", r"\ge": ">=", r"\ne": "!="}
_NAMED_VALUE = re.compile(r"\(\s*[a-zA-Z](?:\s*,\s*[a-zA-Z])+\s*\)\s*=|[a-zA-Z](?:\^\{?-1\}?)?\s*\(\s*[a-zA-Z]\s*\)\s*=")
_MATRIX = re.compile(r"\\begin\{([pbBvV]?matrix|array)\}(?:\{[^{}]*\})?(.*)\\end\{\1\}", re.DOTALL)


def _scan(s: str):
    """(index, token, depth) for the tokens of s: a command (\\cup, \\{) or one character; depth
    counts ( [ { \\{ against ) ] } \\} together, so "[a, b)" balances."""
    depth, i = 0, 0
    while i < len(s):
        if s[i] == "\\":
            m = re.match(r"\\(?:[a-zA-Z]+|.)", s[i:])
            tok = m.group(0)
        else:
            tok = s[i]
        if tok in _CLOSERS:
            depth -= 1
        yield i, tok, depth
        if tok in _OPENERS:
            depth += 1
        i += len(tok)


def _split_top(s: str, seps: set[str]) -> tuple[list[str], list[str]]:
    """Pieces of s between separators found at bracket depth 0, and the separators themselves."""
    pieces, found, start = [], [], 0
    for i, tok, depth in _scan(s):
        if depth == 0 and tok in seps:
            pieces.append(s[start:i])
            found.append(tok)
            start = i + len(tok)
    pieces.append(s[start:])
    return pieces, found


def _wrapped(s: str) -> bool:
    """s is one bracket pair around everything: "(1, 2]" yes, "(1)(2)" no."""
    if len(s) < 2 or s[0] not in "([" or s[-1] not in ")]":
        return False
    for i, tok, depth in _scan(s):
        if depth == 0 and tok in _CLOSERS:
            return i == len(s) - 1
    return False


def _parse_value(s: str):
    e = parse_latex(s)
    if e.has(PM):
        return Unordered((e.subs(PM, 1), e.subs(PM, -1)))
    return e


def _unordered(items: list):
    """Flatten nested lists (from \\pm inside a list) into one Unordered."""
    flat = []
    for item in items:
        flat.extend(item.items if isinstance(item, Unordered) else [item])
    return Unordered(tuple(flat))


def _interval(var: sympy.Expr, op: str, bound: sympy.Expr) -> Ordered:
    """The interval of `var op bound` (op one of < <= > >=)."""
    if op in (">", ">="):
        return Ordered("(" if op == ">" else "[", ")", (bound, sympy.oo))
    return Ordered("(", ")" if op == "<" else "]", (-sympy.oo, bound))


_FLIP = {"<": ">", "<=": ">=", ">": "<", ">=": "<=", "=": "="}


def _parse_relation(pieces: list[str], ops: list[str]):
    ops = [_RELATIONS[o] for o in ops]
    if "!=" in ops:
        raise LatexParseError("\\ne answers are not supported")
    sides = [parse_latex(p) for p in pieces]
    if any(side.has(PM) for side in sides):
        return Unordered(tuple(_parse_relation_values([s.subs(PM, v) for s in sides], ops) for v in (1, -1)))
    return _parse_relation_values(sides, ops)


def _solve_linear(f: sympy.Expr, op: str) -> tuple[sympy.Symbol, str, sympy.Expr] | None:
    """`f op 0` solved for its variable, as (var, op, bound) for `var op bound`, when f = c var + d
    with one symbol var, a constant c whose sign sympy decides (op flips when c < 0) and a finite real
    bound -d/c; None for anything else (x^2 > 4, x + y > 1, 1/x > 2, i x > 1): those stay Relations."""
    if len(f.free_symbols) != 1 or _heavy(f):
        return None
    (var,) = f.free_symbols
    poly = f.as_poly(var)
    if poly is None or poly.degree() != 1:
        return None
    c, d = poly.all_coeffs()
    if c.is_negative:
        op = _FLIP[op]
    elif not c.is_positive:
        return None
    bound = -d / c
    return (var, op, bound) if bound.is_real and bound.is_finite else None


def _parse_relation_values(sides: list, ops: list[str]):
    if len(sides) == 2:
        a, op, b = sides[0], ops[0], sides[1]
        if op == "=":
            return Relation(a, "=", b)
        if isinstance(b, sympy.Symbol) and not a.free_symbols:
            a, op, b = b, _FLIP[op], a
        if isinstance(a, sympy.Symbol) and not b.free_symbols:
            return _interval(a, op, b)
        solved = _solve_linear(a - b, op)          # "2x + 1 > 5", "-x < 3", "5 \ge 3 - x": an interval
        if solved is not None:
            return _interval(*solved)
        f = a - b if op in (">", ">=") else b - a
        return Relation(f, ">" if op in ("<", ">") else ">=", sympy.Integer(0))
    if len(sides) == 3 and not sides[0].free_symbols and not sides[2].free_symbols:
        if isinstance(sides[1], sympy.Symbol):
            if all(o in ("<", "<=") for o in ops):
                return Ordered("(" if ops[0] == "<" else "[", ")" if ops[1] == "<" else "]", (sides[0], sides[2]))
            if all(o in (">", ">=") for o in ops):
                return Ordered("(" if ops[1] == ">" else "[", ")" if ops[0] == ">" else "]", (sides[2], sides[0]))
        else:                                      # "3 < 2x - 1 \le 7": each link solved for x
            links = [_solve_linear(sides[1] - sides[0], _FLIP[ops[0]]), _solve_linear(sides[1] - sides[2], ops[1])]
            if all(links) and links[0][0] == links[1][0]:
                lower = [(op, bound) for _, op, bound in links if op in (">", ">=")]
                upper = [(op, bound) for _, op, bound in links if op in ("<", "<=")]
                if len(lower) == 1 and len(upper) == 1:    # a chain that runs one way ("3 < 2x > 1" does not)
                    (lo_op, lo), (hi_op, hi) = lower[0], upper[0]
                    return Ordered("(" if lo_op == ">" else "[", ")" if hi_op == "<" else "]", (lo, hi))
    raise LatexParseError("unsupported chain of relations")


def _parse_matrix(body: str) -> Matrix:
    rows = [r for r in re.split(r"\\\\", body) if r.strip()]
    cells = [tuple(parse_latex(c) for c in r.split("&")) for r in rows]
    if not cells or len({len(r) for r in cells}) != 1:
        raise LatexParseError("ragged or empty matrix")
    return Matrix(tuple(cells))


def parse_answer(text: str):
    """The structure of a cleaned answer string: a sympy value, Relation, Ordered, Unordered,
    Union or Matrix (see the module docstring). Raises LatexParseError."""
    s = text.strip()
    if not s:
        raise LatexParseError("empty answer")
    parts, _ = _split_top(s, {r"\cup"})
    if len(parts) > 1:
        return Union(tuple(_parse_item(p) for p in parts))
    items, _ = _split_top(s, {",", ";"})
    if len(items) > 1:
        return _unordered([_parse_item(p) for p in items])
    return _parse_item(s)


def _parse_item(s: str):
    s = s.strip()
    if not s:
        raise LatexParseError("empty list item")
    inner = s
    while inner[:1] == "{" and group_end(inner, 0) == len(inner):   # plain groups around it all: "{5}", "{1, 2}"
        inner = inner[1:-1].strip()                                 # (a loop: "{{{...}}}" recurses no deeper)
    if inner is not s:
        return parse_answer(_join_thousands(inner))
    member = re.match(r"[a-zA-Z](?:_\{?\w+\}?)?\s*\\in(?![a-zA-Z])", s)
    if member:                                   # "x \in [-2, 7]"
        return parse_answer(s[member.end():])
    if s == r"\reals":
        return Ordered("(", ")", (-sympy.oo, sympy.oo))
    if _wrapped(s) and _MATRIX.fullmatch(s[1:-1].strip()):     # \left(\begin{matrix}..\end{matrix}\right)
        s = s[1:-1].strip()
    m = _MATRIX.fullmatch(s)
    if m:
        if m.group(1).lower() == "vmatrix":
            raise LatexParseError("determinants are not supported")
        return _parse_matrix(m.group(2))
    if s.startswith(r"\{") and s.endswith(r"\}"):
        inner = s[2:-2]
        items = _split_top(inner, {","})[0] if inner.strip() else []
        return _unordered([_parse_item(p) for p in items])
    if _wrapped(s):
        items, _ = _split_top(s[1:-1], {","})
        if len(items) > 1:
            return Ordered(s[0], s[-1], tuple(_parse_item(p) for p in items))
    named = _NAMED_VALUE.match(s)
    if named and "=" not in s[named.end():]:      # "(x, y) = (1, 2)", "f(x) = 2x + 3": the value
        return _parse_item(s[named.end():])
    pieces, ops = _split_top(s, {r"\approx"})
    if len(pieces) == 2:                   # "3\sqrt2 \approx 4.24": the exact value; "x \approx 4.24": 4.24
        return _parse_item(pieces[1] if re.fullmatch(r"\s*[a-zA-Z]\s*", pieces[0]) else pieces[0])
    pieces, ops = _split_top(s, set(_RELATIONS))
    if ops:
        return _parse_relation(pieces, ops)
    return _parse_value(s)


# ---------------------------------------------------------------------------------------------
# Comparison
# ---------------------------------------------------------------------------------------------

class _Budget:
    """Comparison settings and the deadline shared by one is_equivalent call."""

    def __init__(self, timeout_s: float, rel_tol: float):
        self.timeout_s = timeout_s
        self.rel_tol = rel_tol
        self.deadline = time.monotonic() + timeout_s


def _value(e: sympy.Expr):
    """e as an mpmath complex at 30 digits, or None when it is not a finite number."""
    v = e.evalf(30)
    re_, im_ = v.as_real_imag()
    if not (re_.is_Number and im_.is_Number) or not (re_.is_finite and im_.is_finite):
        return None
    return mpmath.mpc(mpmath.mpf(re_._to_mpmath(100)), mpmath.mpf(im_._to_mpmath(100)))


def _close(x, y, rel_tol: float) -> bool:
    return abs(x - y) <= max(rel_tol * max(abs(x), abs(y)), ABS_TOL)


def _heavy(e: sympy.Expr) -> bool:
    """simplify() could take very long: big powers of non-numbers or a big tree."""
    for n, node in enumerate(sympy.preorder_traversal(e)):
        if n > HEAVY_NODES:
            return True
        if node.is_Pow and not node.base.is_number and node.exp.is_Integer and abs(node.exp) > HEAVY_EXPONENT:
            return True
    return False


_UNDEFINED = (sympy.nan, sympy.zoo, sympy.oo, -sympy.oo)


def _simplify_diff(a: sympy.Expr, b: sympy.Expr, budget: _Budget) -> sympy.Expr | None:
    """simplify(a - b) within SYMBOLIC_SHARE of the time limit; None when it ran out."""
    try:
        with time_limit(budget.timeout_s * SYMBOLIC_SHARE):
            return sympy.simplify(a - b)
    except TimeLimitExceeded:
        if time.monotonic() >= budget.deadline - 1e-3:
            raise
        return None


def _same_at_points(a: sympy.Expr, b: sympy.Expr) -> bool:
    symbols = sorted(a.free_symbols | b.free_symbols, key=lambda s: s.name)
    rng = random.Random(0)
    valid = 0
    for _ in range(RANDOM_POINTS):
        point = {s: sympy.Float(rng.uniform(0.5, 2.5), 30) for s in symbols}
        va, vb = _value(a.subs(point)), _value(b.subs(point))
        if va is None or vb is None:
            continue
        if not _close(va, vb, POINT_REL_TOL):
            return False
        valid += 1
    return valid >= MIN_VALID_POINTS


def _zero_difference(d: sympy.Expr) -> bool | None:
    """True/False when the difference d decides the comparison, None when it still has symbols."""
    if d == 0:
        return True
    if d.free_symbols:
        return None
    v = _value(d)
    return v is not None and abs(v) <= ABS_TOL


def _same_expr(a: sympy.Expr, b: sympy.Expr, budget: _Budget) -> bool:
    if a == b:
        return not a.has(sympy.nan, sympy.zoo)
    if a.has(*_UNDEFINED) or b.has(*_UNDEFINED):
        return False
    if not a.free_symbols and not b.free_symbols:
        if a.is_Rational and b.is_Rational:
            return False                      # canonical exact rationals, and a != b
        va, vb = _value(a), _value(b)
        return va is not None and vb is not None and _close(va, vb, budget.rel_tol)
    decided = _zero_difference(a - b)         # sympy cancels like terms on construction
    if decided is not None:
        return decided
    if not (_heavy(a) or _heavy(b)):
        d = _simplify_diff(a, b, budget)
        decided = None if d is None else _zero_difference(d)
        if decided is not None:
            return decided
    return _same_at_points(a, b)


def _proportional(f: sympy.Expr, g: sympy.Expr, budget: _Budget, positive: bool) -> bool:
    """f = k g for a constant k != 0 (k > 0 when `positive`)."""
    if f == 0 or g == 0:
        return f == g
    ratio = sympy.simplify(f / g) if not (_heavy(f) or _heavy(g)) else f / g
    if ratio.free_symbols:
        symbols = sorted(ratio.free_symbols, key=lambda s: s.name)
        rng = random.Random(1)
        values = []
        for _ in range(RANDOM_POINTS):
            v = _value(ratio.subs({s: sympy.Float(rng.uniform(0.5, 2.5), 30) for s in symbols}))
            if v is not None:
                values.append(v)
        if len(values) < MIN_VALID_POINTS or not all(_close(v, values[0], POINT_REL_TOL) for v in values):
            return False
        k = values[0]
    else:
        k = _value(ratio)
        if k is None:
            return False
    if abs(k) <= ABS_TOL:
        return False
    return not positive or (abs(k.imag) <= ABS_TOL and k.real > 0)


def _same_relation(a, b, budget: _Budget) -> bool:
    if isinstance(a, Relation) and isinstance(b, Relation):
        if a.op != b.op:
            return False
        if a.op != "=":
            return _proportional(a.lhs, b.lhs, budget, positive=True)
        if isinstance(a.lhs, sympy.Symbol) and a.lhs == b.lhs and _same(a.rhs, b.rhs, budget):
            return True
        return _proportional(a.lhs - a.rhs, b.lhs - b.rhs, budget, positive=False)
    rel, other = (a, b) if isinstance(a, Relation) else (b, a)
    if rel.op != "=" or not isinstance(other, sympy.Expr):
        return False
    # "x = 5" vs "5" (or "5 = x"): the value of the variable; "x" alone never answers "x = 5".
    return any(isinstance(var, sympy.Symbol) and other != var and _same(value, other, budget)
               for var, value in ((rel.lhs, rel.rhs), (rel.rhs, rel.lhs)))


def _same_collection(xs: tuple, ys: tuple, budget: _Budget) -> bool:
    """Set equality under _same: every x matches some y and every y some x."""
    return all(any(_same(x, y, budget) for y in ys) for x in xs) and \
        all(any(_same(x, y, budget) for x in xs) for y in ys)


def _vector(m: Matrix) -> tuple | None:
    if len(m.rows) == 1:
        return m.rows[0]
    if all(len(r) == 1 for r in m.rows):
        return tuple(r[0] for r in m.rows)
    return None


def _same(a, b, budget: _Budget) -> bool:
    """Structural equivalence of two parsed answers (see the module docstring)."""
    if isinstance(a, Unordered) and len(a.items) == 1:
        a = a.items[0]
    if isinstance(b, Unordered) and len(b.items) == 1:
        b = b.items[0]
    if isinstance(a, sympy.Expr) and isinstance(b, sympy.Expr):
        return _same_expr(a, b, budget)
    if isinstance(a, Relation) or isinstance(b, Relation):
        return _same_relation(a, b, budget)
    if isinstance(a, Unordered) and isinstance(b, Unordered):
        return _same_collection(a.items, b.items, budget)
    if isinstance(a, Union) and isinstance(b, Union):
        return _same_collection(a.parts, b.parts, budget)
    if isinstance(a, Ordered) and isinstance(b, Ordered):
        return (a.left, a.right) == (b.left, b.right) and len(a.items) == len(b.items) and \
            all(_same(x, y, budget) for x, y in zip(a.items, b.items))
    if isinstance(a, Matrix) and isinstance(b, Matrix):
        return len(a.rows) == len(b.rows) and all(len(r) == len(s) for r, s in zip(a.rows, b.rows)) and \
            all(_same(x, y, budget) for r, s in zip(a.rows, b.rows) for x, y in zip(r, s))
    if isinstance(a, Matrix) or isinstance(b, Matrix):       # a vector written as a tuple
        m, t = (a, b) if isinstance(a, Matrix) else (b, a)
        v = _vector(m)
        return isinstance(t, Ordered) and v is not None and len(v) == len(t.items) and \
            all(_same(x, y, budget) for x, y in zip(v, t.items))
    return False


# ---------------------------------------------------------------------------------------------
# Public entry points
# ---------------------------------------------------------------------------------------------

_TEXT_GROUP = re.compile(r"\\(?:text|textbf|textit|textrm|textsf|mbox|mathrm|mathbf|emph|boxed)\s*\{([^{}]*)\}")
_CHOICE = re.compile(r"\(?([A-Ea-e])\)?")
_PLAIN_NUMBER = re.compile(r"[+-]?(?:\d+(?:\.\d+)?|\.\d+)")
_BASED = re.compile(r"\w+_\{?(\d+)\}?")


def _unwrap_text(s: str) -> str:
    s = s.replace("$", " ")
    for _ in range(3):
        s = _TEXT_GROUP.sub(r"\1", s)
    return re.sub(r"\s+", " ", s).strip().rstrip(".").strip()


def _choice_letter(s: str) -> str | None:
    m = _CHOICE.fullmatch(_unwrap_text(s).replace(" ", ""))
    return m.group(1) if m else None


def _text_words(s: str) -> str | None:
    """The lower-cased words of an answer made only of words ("\\text{Evelyn}", "east"), else None."""
    t = _unwrap_text(s)
    if re.fullmatch(r"[A-Za-z][A-Za-z .'\-]*", t) and re.search(r"[A-Za-z]{3,}", t):
        return t.lower()
    return None


def _with_percent(x, percent: bool, other_percent: bool) -> list:
    """x, plus x/100 when only this side wrote a percent sign."""
    if percent and not other_percent and isinstance(x, (sympy.Expr, Fraction)):
        return [x, x / 100]
    return [x]


def _same_in_order(pred: str, parts: list[str], budget: _Budget) -> bool:
    """pred answers a gold of several boxes `parts` (see gold_answer): pred's own boxes, when it has
    two or more, else the items of its comma list, equal the parts one by one, in order. A set
    "\\{2, 3\\}" or tuple "(2, 3)" is one item, so it never answers two boxes."""
    boxes = [content for _, _, content in _top_boxes(pred)]
    if len(boxes) > 1:
        items = boxes
    else:
        cleaned = clean_latex(boxes[0] if boxes else pred)
        pieces, _ = _split_top(_join_thousands(cleaned.text), {",", ";"})
        items = [p + ("\\%" if cleaned.percent else "") for p in pieces]   # the list's percent sign, on each item
    return len(items) == len(parts) and all(_equivalent(p, g, budget) for p, g in zip(items, parts))


def _equivalent(pred: str, gold: str, budget: _Budget) -> bool:
    parts = _gold_parts(gold)
    if parts is not None:               # a gold of several boxes
        if len(parts) > 1:
            return _same_in_order(pred, parts, budget)
        gold = parts[0]                 # ... that all state one answer
    letter = _choice_letter(gold)
    if letter is not None and letter.isupper():   # a multiple-choice gold: "(C)", "\\text{(C)}", "C"
        answer = _choice_letter(pred)
        return answer is not None and answer.upper() == letter
    words = _text_words(gold)
    if words is not None:
        return _unwrap_text(pred).lower() == words
    cp, cg = clean_latex(pred), clean_latex(gold)
    p_text, g_text = _join_thousands(cp.text), _join_thousands(cg.text)
    based = _BASED.fullmatch(g_text)
    if based and p_text.isdigit():           # "52" answers "52_8": the digits in the asked base
        p_text = f"{p_text}_{{{based.group(1)}}}"
    if p_text == g_text and cp.percent == cg.percent:
        return True
    if not p_text or not g_text:
        return False
    if _PLAIN_NUMBER.fullmatch(p_text) and _PLAIN_NUMBER.fullmatch(g_text):
        p_values = _with_percent(Fraction(p_text), cp.percent, cg.percent)
        g_values = _with_percent(Fraction(g_text), cg.percent, cp.percent)
        return any(x == y for x in p_values for y in g_values)
    p_answer, g_answer = parse_answer(p_text), parse_answer(g_text)
    return any(_same(x, y, budget) for x in _with_percent(p_answer, cp.percent, cg.percent)
               for y in _with_percent(g_answer, cg.percent, cp.percent))


def _join_thousands(s: str) -> str:
    """'58,500' or '58 500' -> '58500' when the whole answer is one grouped number (else "1,500"
    inside a tuple or list stays a list)."""
    if re.fullmatch(r"[+-]?\d{1,3}(?:,\d{3})+(?:\.\d+)?|[+-]?\d{1,3}(?: \d{3})+(?:\.\d+)?", s):
        return s.replace(",", "").replace(" ", "")
    return s


def is_equivalent(pred: str, gold: str, *, timeout_s: float = 5.0, rel_tol: float = DEFAULT_REL_TOL) -> bool:
    """Whether answer string `pred` means the same as gold answer string `gold`.

    The normalisation, the comparison order and the policies are in the module docstring. Never
    raises on any input: a parse failure of either side (after string comparison), a guard that
    refuses a huge value, or a timeout (timeout_s, main thread only) all give False.
    """
    if not isinstance(pred, str) or not isinstance(gold, str):
        return False
    pred, gold = pred.strip(), gold.strip()
    if not pred or not gold:
        return False
    if pred == gold:
        return True
    if len(pred) > MAX_ANSWER_CHARS or len(gold) > MAX_ANSWER_CHARS:
        return False
    budget = _Budget(timeout_s, rel_tol)
    try:
        with time_limit(timeout_s):
            return _equivalent(pred, gold, budget)
    except Exception:   # the trust boundary: unreadable or hostile model text is simply wrong
        return False


def verify(completion: str, gold: str) -> bool:
    """extract_answer(completion), then is_equivalent(answer, gold); False when nothing is extracted.

    Against a gold of several boxes (gold_answer) the completion's answer is its final run of boxes
    (_final_run: the last boxes written one after another) when that run has two or more, else its
    extract_answer as usual (one box "2, 3" answers "\\boxed{2}, \\boxed{3}" item by item)."""
    answer = extract_answer(completion)
    if answer is not None and isinstance(gold, str):
        parts = _gold_parts(gold)
        run = _final_run(completion) if parts is not None and len(parts) > 1 else []
        if len(run) > 1:
            answer = _box_list(run)
    return answer is not None and is_equivalent(answer, gold)
