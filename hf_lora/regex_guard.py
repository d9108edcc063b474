"""A guard for the regexes of a config (target_modules, exclude_modules, layers_pattern, rank_pattern and
alpha_pattern keys), which may come from an untrusted adapter file: Python's `re` backtracks, and a
pattern such as ``(a|a)*b`` or ``(.*)*x`` takes exponential time on a module path, so a load would hang.

The guard reads the pattern's parse tree and refuses the shapes that backtrack catastrophically, before
any match is tried:

* a repeat (also an optional ``x?``) inside a repeat, ``(x+)*`` (exponential: the text splits between
  them in 2^n ways);
* an alternation inside a repeat whose branches do not start with distinct literal characters, ``(a|ab)*``
  (exponential for the same reason);
* more than `MAX_WIDE_REPEATS` repeats of anything but a literal (``.*``, ``\\w+``, ``[^.]*``): k adjacent
  ones cost O(n^k) on an n-character path. Measured on an 89-character module path (CPython 3.11), k
  adjacent ``.*`` then a mismatch: k=3 0.3 ms, k=4 9 ms, k=5 0.18 s, k=6 5.5 s per path (rank_pattern keys
  are matched inside peft's ``(.*\\.)?(key)$``, one more: 5 ms at k=3);
* patterns over `MAX_PATTERN_CHARS` characters.

Everything peft's documentation and the Hub's adapters use passes (dotted names, ``.*`` prefixes,
alternations of names, ``\\d+`` layer indices). The alternative, a linear-time engine (google-re2), would
be a compiled dependency whose syntax is not that of peft's `re` (no lookarounds or backreferences).
"""

from __future__ import annotations

try:
    from re import _parser as sre_parse  # Python 3.11+
except ImportError:  # pragma: no cover - Python 3.10
    import sre_parse  # type: ignore[no-redef]

MAX_PATTERN_CHARS = 1000
MAX_WIDE_REPEATS = 3
_REPEATS = ("MAX_REPEAT", "MIN_REPEAT", "POSSESSIVE_REPEAT")


def backtracking_problem(pattern: str) -> str | None:
    """Why `pattern` may backtrack catastrophically (a phrase for an error message), or None. The pattern
    must compile."""
    if len(pattern) > MAX_PATTERN_CHARS:
        return f"is {len(pattern)} characters long (at most {MAX_PATTERN_CHARS})"
    tree = sre_parse.parse(pattern)
    wide: list[int] = [0]
    problem = _walk(list(tree), inside_repeat=False, wide=wide)
    if problem is None and wide[0] > MAX_WIDE_REPEATS:
        problem = f"has {wide[0]} repeats of wildcards or classes (at most {MAX_WIDE_REPEATS}; e.g. merge .*.* into .*)"
    return problem


def _walk(items: list, inside_repeat: bool, wide: list[int]) -> str | None:
    for op, av in items:
        name = str(op)
        if name in _REPEATS:
            _, high, body = av
            body = list(body)
            if inside_repeat:  # (also an optional part, x?: (.?.?)* splits a text in as many ways)
                return "repeats a group that itself repeats, as in (x+)* (rewrite it without the nesting)"
            if high > 1 and not all(str(o) == "LITERAL" for o, _ in body):
                wide[0] += 1
            if problem := _walk(body, inside_repeat or high > 1, wide):
                return problem
        elif name == "BRANCH":
            branches = [list(b) for b in av[1]]
            if inside_repeat and not _distinct_first_literals(branches):
                return (
                    "repeats an alternation whose branches can start alike, as in (a|ab)* "
                    "(start each branch with a different character, or drop the repeat)"
                )
            for branch in branches:
                if problem := _walk(branch, inside_repeat, wide):
                    return problem
        elif name == "SUBPATTERN":
            if problem := _walk(list(av[-1]), inside_repeat, wide):
                return problem
        elif name in ("ASSERT", "ASSERT_NOT"):
            if problem := _walk(list(av[1]), inside_repeat, wide):
                return problem
        elif name == "ATOMIC_GROUP":
            if problem := _walk(list(av), inside_repeat, wide):
                return problem
        elif name == "GROUPREF_EXISTS":
            for part in av[1:]:
                if part is not None and (problem := _walk(list(part), inside_repeat, wide)):
                    return problem
    return None


def _distinct_first_literals(branches: list[list]) -> bool:
    firsts = []
    for branch in branches:
        if not branch or str(branch[0][0]) != "LITERAL":
            return False
        firsts.append(branch[0][1])
    return len(set(firsts)) == len(firsts)
