"""Assert tests (MBPP's test_list): which names in them are the program's, decided statically.

    plan = assert_plan(asserts, setup)     # names to forward, modules to import, object positions
    module_classes(code)                   # classes a program defines at module level (parsed only)

verify/code.py runs assert tests in a judge sandbox with each of plan.names bound to a stand-in that
forwards calls to the candidate sandbox; its module docstring gives the rules (what is forwarded,
what is refused and why). Everything here reads source with `ast` and runs nothing.
"""
from __future__ import annotations

import ast
import builtins
import functools
import sys
from dataclasses import dataclass


_BUILTIN_NAMES = frozenset(dir(builtins))


@dataclass(frozen=True)
class AssertPlan:
    names: tuple             # forwarded to the candidate sandbox by name
    modules: tuple           # standard-library modules the judge imports (used only as `mod.attr`)
    builtins_used: tuple     # builtins the tests read (named when nothing is left to forward)
    object_names: frozenset  # forwarded names in an object position (see the module docstring)


def _bound_names(tree: ast.AST) -> set:
    """Every name the code binds anywhere: assignments, parameters, imports, defs, handlers, ..."""
    out = set()
    for n in ast.walk(tree):
        if isinstance(n, ast.Name) and not isinstance(n.ctx, ast.Load):
            out.add(n.id)
        elif isinstance(n, ast.arg):
            out.add(n.arg)
        elif isinstance(n, ast.alias):
            out.add(n.asname or n.name.split(".")[0])
        elif isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            out.add(n.name)
        elif isinstance(n, (ast.ExceptHandler, ast.MatchAs, ast.MatchStar)) and n.name:
            out.add(n.name)
        elif isinstance(n, ast.MatchMapping) and n.rest:
            out.add(n.rest)
    return out


def _read_names(tree: ast.AST) -> tuple[set, set]:
    """(names read, names read other than as the `x` of `x.attr`)."""
    read, plain = set(), set()
    for parent in ast.walk(tree):
        for child in ast.iter_child_nodes(parent):
            if isinstance(child, ast.Name) and isinstance(child.ctx, ast.Load):
                read.add(child.id)
                if not (isinstance(parent, ast.Attribute) and parent.value is child):
                    plain.add(child.id)
    return read, plain


@functools.lru_cache(maxsize=1024)
def assert_plan(asserts: tuple, setup: str) -> AssertPlan:
    """What the judge binds for these asserts (the rules are in the module docstring). A name bound
    inside an assert (a comprehension variable, a lambda parameter) is not free in that assert; a
    name the setup binds is free in none."""
    setup = ast.parse(setup)
    asserts = [ast.parse(a) for a in asserts]
    setup_bound = _bound_names(setup)
    free, plain = set(), set()
    for tree in [setup, *asserts]:
        read, plain_read = _read_names(tree)
        free |= read - _bound_names(tree) - setup_bound
        plain |= plain_read
    modules = {n for n in free - _BUILTIN_NAMES if n in sys.stdlib_module_names and n not in plain}
    names = free - _BUILTIN_NAMES - modules
    objects = {n.id for n in ast.walk(setup) if isinstance(n, ast.Name)} & names
    for tree in asserts:
        for n in ast.walk(tree):
            if isinstance(n, ast.Call) and isinstance(n.func, ast.Name) and n.func.id in names:
                for arg in [*n.args, *n.keywords]:
                    objects |= {m.id for m in ast.walk(arg) if isinstance(m, ast.Name)} & names
            elif isinstance(n, ast.Attribute):
                base = n.value.func if isinstance(n.value, ast.Call) else n.value
                if isinstance(base, ast.Name) and base.id in names:
                    objects.add(base.id)
    return AssertPlan(tuple(sorted(names)), tuple(sorted(modules)), tuple(sorted(free & _BUILTIN_NAMES)),
                       frozenset(objects))


def module_classes(code: str) -> set:
    """Names of the classes the program's `class` statements define at module level (also inside a
    module-level if/try/with/for/while). Parsed only, never run; unparsable code has none (its run
    reports the syntax error)."""
    try:
        tree = ast.parse(code)
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        return set()
    out, todo = set(), list(tree.body)
    while todo:
        node = todo.pop()
        if isinstance(node, ast.ClassDef):
            out.add(node.name)
        elif not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            for key in ("body", "orelse", "finalbody", "handlers"):
                todo.extend(getattr(node, key, None) or [])
            todo.extend(stmt for case in getattr(node, "cases", None) or [] for stmt in case.body)
    return out
