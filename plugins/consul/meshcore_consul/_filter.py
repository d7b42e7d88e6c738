"""Consul's `?filter=` expressions (hashicorp/go-bexpr), evaluated on the JSON the endpoint
answers, so a filter sees exactly the field names the client reads.

Grammar (api-docs/features/filtering.mdx): `<Selector> == <Value>`, `!=`, `is empty`,
`is not empty`, `<Value> in <Selector>`, `not in`, `<Selector> contains <Value>`,
`not contains`, `matches "<regex>"`, `not matches`; `and`, `or`, `not`, parentheses. Values
are "double-quoted", `backquoted` (raw), numbers, true/false, or bare words. Selectors are
dotted (`Service.Meta.env`) or indexed (`Service.Meta["env"]`); a selector through a list
(`Checks.Status`) yields every element's value, and `==` holds when any of them equals.

A filter that does not parse, or names a field the answer does not have, is answered 400 as
Consul does: a filter is never silently ignored.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from typing import Any

from ._catalog import RegistryError

__all__ = ["compile_filter"]

_TOKEN = re.compile(
    r"""\s*(?:
        (?P<paren>[()])
      | (?P<op>==|!=)
      | (?P<dq>"(?:[^"\\]|\\.)*")
      | (?P<bq>`[^`]*`)
      | (?P<num>-?\d+(?:\.\d+)?(?![A-Za-z_]))
      | (?P<sel>[A-Za-z_][A-Za-z0-9_\-]*(?:\.[A-Za-z0-9_\-]+|\[\s*"(?:[^"\\]|\\.)*"\s*\])*)
    )""",
    re.VERBOSE,
)
_KEYWORDS = {"and", "or", "not", "in", "is", "empty", "contains", "matches"}
_SEGMENT = re.compile(r"""\.?([A-Za-z0-9_\-]+)|\[\s*"((?:[^"\\]|\\.)*)"\s*\]""")
# Fields that are maps in Consul's structs: any key may be asked for, a missing one is empty.
_MAPS = {"Meta", "NodeMeta", "ServiceMeta", "TaggedAddresses", "ServiceTaggedAddresses", "Header"}

Predicate = Callable[[Any], bool]


def _error(detail: str) -> RegistryError:
    return RegistryError(400, f"Failed to create boolean expression evaluator: {detail}")


def _tokens(text: str) -> list[tuple[str, str]]:
    out: list[tuple[str, str]] = []
    pos = 0
    text = text.rstrip()
    while pos < len(text):
        m = _TOKEN.match(text, pos)
        if m is None or m.end() == pos:
            raise _error(f"unexpected input at offset {pos}: {text[pos:pos + 20]!r}")
        kind = m.lastgroup or ""
        value = m.group(kind)
        if kind == "sel" and value in _KEYWORDS:
            kind = "kw"
        out.append((kind, value))
        pos = m.end()
    return out


def _unquote(kind: str, text: str) -> Any:
    if kind == "dq":
        return re.sub(r"\\(.)", r"\1", text[1:-1])
    if kind == "bq":
        return text[1:-1]
    if kind == "num":
        return float(text) if "." in text else int(text)
    return text  # a bare word is a string value (`Status == passing`)


def _path(selector: str) -> list[str]:
    return [m.group(1) if m.group(1) is not None else re.sub(r"\\(.)", r"\1", m.group(2))
            for m in _SEGMENT.finditer(selector)]


class _Parser:
    def __init__(self, text: str) -> None:
        self.tokens = _tokens(text)
        self.i = 0
        self.selectors: list[list[str]] = []

    def peek(self, offset: int = 0) -> tuple[str, str]:
        j = self.i + offset
        return self.tokens[j] if j < len(self.tokens) else ("end", "")

    def take(self) -> tuple[str, str]:
        token = self.peek()
        self.i += 1
        return token

    def keyword(self, word: str) -> bool:
        if self.peek() == ("kw", word):
            self.i += 1
            return True
        return False

    def parse(self) -> Predicate:
        if not self.tokens:
            raise _error("empty expression")
        pred = self.or_()
        if self.peek()[0] != "end":
            raise _error(f"unexpected {self.peek()[1]!r}")
        return pred

    def or_(self) -> Predicate:
        parts = [self.and_()]
        while self.keyword("or"):
            parts.append(self.and_())
        return parts[0] if len(parts) == 1 else (lambda item: any(p(item) for p in parts))

    def and_(self) -> Predicate:
        parts = [self.not_()]
        while self.keyword("and"):
            parts.append(self.not_())
        return parts[0] if len(parts) == 1 else (lambda item: all(p(item) for p in parts))

    def not_(self) -> Predicate:
        if self.keyword("not"):
            inner = self.not_()
            return lambda item: not inner(item)
        if self.peek() == ("paren", "("):
            self.take()
            inner = self.or_()
            if self.take() != ("paren", ")"):
                raise _error("missing closing parenthesis")
            return inner
        return self.match()

    def selector(self) -> list[str]:
        kind, text = self.take()
        if kind != "sel":
            raise _error(f"expected a selector, got {text or 'the end'!r}")
        path = _path(text)
        self.selectors.append(path)
        return path

    def value(self) -> Any:
        kind, text = self.take()
        if kind not in ("dq", "bq", "num", "sel"):
            raise _error(f"expected a value, got {text or 'the end'!r}")
        return _unquote(kind, text)

    def match(self) -> Predicate:
        # `<Value> [not] in <Selector>` starts with a value; everything else with a selector.
        after = self.peek(1)
        if after == ("kw", "in") or (after == ("kw", "not") and self.peek(2) == ("kw", "in")):
            value = self.value()
            negate = self.keyword("not")
            self.keyword("in")
            path = self.selector()
            return _negate(negate, lambda item: _contains(_resolve(item, path), value))
        path = self.selector()
        kind, text = self.take()
        if kind == "op":
            value = self.value()
            if text == "==":
                return lambda item: _equals(_resolve(item, path), value)
            return lambda item: not _equals(_resolve(item, path), value)
        if (kind, text) == ("kw", "is"):
            negate = self.keyword("not")
            if not self.keyword("empty"):
                raise _error("expected `empty` after `is`")
            return _negate(negate, lambda item: _empty(_resolve(item, path)))
        negate = (kind, text) == ("kw", "not")
        if negate:
            kind, text = self.take()
        if (kind, text) == ("kw", "contains"):
            value = self.value()
            return _negate(negate, lambda item: _contains(_resolve(item, path), value))
        if (kind, text) == ("kw", "matches"):
            pattern = self.value()
            try:
                regex = re.compile(str(pattern))
            except re.error as exc:
                raise _error(f"invalid regular expression {pattern!r}: {exc}") from None
            return _negate(negate, lambda item: _matches(_resolve(item, path), regex))
        raise _error(f"expected an operator after the selector, got {text or 'the end'!r}")


def _negate(negate: bool, pred: Predicate) -> Predicate:
    return (lambda item: not pred(item)) if negate else pred


class _Many(list[object]):
    """Values collected through a list (`Checks.Status`): comparisons hold for any of them."""


def _resolve(item: Any, path: list[str]) -> Any:
    current: Any = item
    parent = ""
    for segment in path:
        if isinstance(current, _Many):
            current = _Many(_resolve(c, [segment]) for c in current)
        elif isinstance(current, list):
            current = _Many(_resolve(c, [segment]) for c in current)
        elif isinstance(current, Mapping):
            if segment in current:
                current = current[segment]
            elif parent in _MAPS:
                return None
            else:
                raise RegistryError(400, f'Selector "{".".join(path)}" is not valid')
        else:
            return None
        parent = segment
    return current


def _coerce(target: Any, value: Any) -> Any:
    if isinstance(target, bool):
        return str(value).lower() == "true" if not isinstance(value, bool) else value
    if isinstance(target, int | float) and not isinstance(value, bool):
        try:
            return type(target)(value)
        except (TypeError, ValueError):
            return value
    return value if isinstance(value, str) else str(value).lower() if isinstance(value, bool) else str(value)


def _equals(found: Any, value: Any) -> bool:
    if isinstance(found, _Many):
        return any(_equals(f, value) for f in found)
    if found is None:
        return bool(value == "")
    return bool(found == _coerce(found, value))


def _empty(found: Any) -> bool:
    if isinstance(found, _Many):
        return all(_empty(f) for f in found)
    return found is None or found == "" or found == [] or found == {}


def _contains(found: Any, value: Any) -> bool:
    if isinstance(found, _Many):
        return any(_contains(f, value) for f in found)
    if isinstance(found, str):
        return str(value) in found
    if isinstance(found, list):
        return any(_equals(f, value) for f in found)
    if isinstance(found, Mapping):
        return str(value) in found
    return False


def _matches(found: Any, regex: re.Pattern[str]) -> bool:
    if isinstance(found, _Many):
        return any(_matches(f, regex) for f in found)
    return isinstance(found, str) and regex.search(found) is not None


def compile_filter(text: str | None) -> Predicate | None:
    """A predicate over one answer item, None for no filter; RegistryError(400) when bad."""
    if text is None:
        return None
    return _Parser(text).parse()
