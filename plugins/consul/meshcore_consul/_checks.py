"""Which services an answer of `/v1/health/state/any` says moved, without parsing all of it.

The shared watch reads every check of the agent after every change: 3.3 MB for 10,000 checks,
and parsing it all cost the sidecar 22-70 ms per change (json.loads, and the garbage collector
over the 30,000 containers it makes), more than the rest of the change path together. Between
two answers almost every check is the same, and both Consul and the embedded registry encode
an unchanged check to the same bytes in the same place. So `CheckTable` keeps the last answer's
text and where each entry starts and ends, finds the common prefix and suffix of the next
answer (C-speed string compares), and parses only the entries between them.

Why that is exact: the new text before the changed region is the old text, which the parser
left "inside the top-level array, expecting a value" at that point; the new text after it is
the old text, which followed a complete value there. So if the region parses as one or more
comma-separated values, the whole answer parses, and its entries are the old ones outside the
region plus the new ones inside it. Whatever does not fit (a region that is empty or does not
end on a value, a changed opening, entries that are not objects) falls back to a full parse,
which raises on garbage. An entry whose text is unchanged is not reported, so a flip names
only its own service; an entry that appears or disappears names its service too.
"""

from __future__ import annotations

import json
import re
from bisect import bisect_left, bisect_right
from collections.abc import Mapping
from typing import Any, NoReturn

from ._agent import ConsulAnswerError

__all__ = ["CheckTable", "check_key"]

_decode = json.JSONDecoder().raw_decode
_OPEN = re.compile(r"[ \t\n\r]*\[[ \t\n\r]*")
_SEP = re.compile(r"[ \t\n\r]*([,\]])[ \t\n\r]*")
_WS = re.compile(r"[ \t\n\r]*")
# Compared block by block before narrowing down: slicing copies, so not the whole text at once.
_BLOCK = 1 << 16


def check_key(entry: Any, where: str) -> str:
    """The service an entry of /v1/health/state/any belongs to ("" for a node-level check);
    ConsulAnswerError when it is malformed."""
    if not isinstance(entry, Mapping):
        raise ConsulAnswerError(f"{where}: expected an object, got {entry!r:.60}")
    service_id = entry.get("ServiceID") or ""
    name = entry.get("ServiceName") or ""
    status = entry.get("Status")
    if not isinstance(service_id, str) or not isinstance(name, str) or not isinstance(status, str):
        raise ConsulAnswerError(f"{where}: ServiceID, ServiceName or Status of the wrong type")
    return name if service_id else ""


def _common_prefix(a: str, b: str) -> int:
    n = min(len(a), len(b))
    lo = 0
    while lo + _BLOCK <= n and a[lo:lo + _BLOCK] == b[lo:lo + _BLOCK]:
        lo += _BLOCK
    hi = min(lo + _BLOCK, n)
    # a[:lo] == b[:lo]; the first difference, if any, is below hi.
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if a[lo:mid] == b[lo:mid]:
            lo = mid
        else:
            hi = mid - 1
    return lo


def _common_suffix(a: str, b: str, limit: int) -> int:
    """Length of the common suffix of `a` and `b`, at most `limit`."""
    la, lb = len(a), len(b)
    k = 0
    while k + _BLOCK <= limit and a[la - k - _BLOCK:la - k] == b[lb - k - _BLOCK:lb - k]:
        k += _BLOCK
    hi = min(k + _BLOCK, limit)
    while k < hi:
        mid = (k + hi + 1) // 2
        if a[la - mid:la - k] == b[lb - mid:lb - k]:
            k = mid
        else:
            hi = mid - 1
    return k


class CheckTable:
    """The last answer of /v1/health/state/any: its text, each entry's span and service."""

    def __init__(self) -> None:
        self.text = ""
        self.starts: list[int] = []
        self.ends: list[int] = []
        self.keys: list[str | None] = []  # None: a malformed entry (skipped)
        self.full_parses = 0  # answers parsed whole (the first, and whatever did not fit)

    def update(self, body: bytes, skipped: list[str] | None = None) -> set[str]:
        """Take the next answer; returns the services whose entries changed ("" for a
        node-level check). Malformed entries are skipped (their reasons appended to
        `skipped`); an answer that is not a JSON array, or whose every entry is malformed,
        raises ConsulAnswerError and leaves the table as it was."""
        try:
            text = body.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise ConsulAnswerError(f"answer is not JSON: {exc}; body starts {body[:80]!r}") from None
        if self.starts:
            if text == self.text:
                return set()
            changed = self._delta(text, skipped)
            if changed is not None:
                return changed
        return self._full(text, skipped)

    def _full(self, text: str, skipped: list[str] | None) -> set[str]:
        opening = _OPEN.match(text)
        try:
            if opening is None:
                raise ValueError("not an array")
            keys, reasons, starts, ends = _entries(text, opening.end(), len(text), 0, whole=True)
        except (ValueError, RecursionError):
            self._refuse(text)
        if keys and len(reasons) == len(keys):
            raise ConsulAnswerError(f"every check is malformed; {reasons[0]}")
        if skipped is not None:
            skipped.extend(reasons)
        changed = _diff(self.text, self.starts, self.ends, self.keys, text, starts, ends, keys)
        self.text, self.starts, self.ends, self.keys = text, starts, ends, keys
        self.full_parses += 1
        return changed

    @staticmethod
    def _refuse(text: str) -> NoReturn:
        try:
            value = json.loads(text)
        except RecursionError:
            raise ConsulAnswerError("answer is not JSON: nested too deeply") from None
        except ValueError as exc:
            raise ConsulAnswerError(f"answer is not JSON: {exc}; body starts {text[:80]!r}") from None
        raise ConsulAnswerError(f"expected a JSON array of checks, got {type(value).__name__}")

    def _delta(self, text: str, skipped: list[str] | None) -> set[str] | None:
        """The changed services from the region that differs; None when the region does not
        fit (then the caller parses the whole answer)."""
        old, starts, ends = self.text, self.starts, self.ends
        prefix = _common_prefix(old, text)
        suffix = _common_suffix(old, text, min(len(old), len(text)) - prefix)
        # The entries the region touches, and one more on each side: a deleted entry may take
        # a separator with it, which the region must then contain.
        first = max(_last_at_or_before(starts, prefix) - 1, 0)
        last = min(_first_at_or_after(ends, len(old) - suffix) + 1, len(ends) - 1)
        if prefix < starts[0] or len(old) - suffix > ends[-1]:
            return None  # the opening or the closing of the array changed
        delta = len(text) - len(old)
        a, b = starts[first], ends[last] + delta
        if b <= a:
            return None
        try:
            keys, reasons, new_starts, new_ends = _entries(text, a, b, first, whole=False)
        except (ValueError, RecursionError):
            return None
        all_keys = self.keys[:first] + keys + self.keys[last + 1:]
        if all(k is None for k in all_keys):
            return None  # every entry malformed: the full parse says so
        if skipped is not None:
            skipped.extend(reasons)
        changed = _diff(old, starts[first:last + 1], ends[first:last + 1], self.keys[first:last + 1],
                        text, new_starts, new_ends, keys)
        self.text = text
        self.starts = starts[:first] + new_starts + [x + delta for x in starts[last + 1:]]
        self.ends = ends[:first] + new_ends + [x + delta for x in ends[last + 1:]]
        self.keys = all_keys
        return changed


def _diff(
    old: str, old_starts: list[int], old_ends: list[int], old_keys: list[str | None],
    new: str, new_starts: list[int], new_ends: list[int], new_keys: list[str | None],
) -> set[str]:
    """The services of the entries in one list and not the other (compared by their text)."""
    olds: dict[str, list[str | None]] = {}
    for s, e, key in zip(old_starts, old_ends, old_keys, strict=True):
        olds.setdefault(old[s:e], []).append(key)
    changed: set[str] = set()
    for s, e, key in zip(new_starts, new_ends, new_keys, strict=True):
        same = olds.get(new[s:e])
        if same:
            same.pop()
        elif key is not None:
            changed.add(key)
    for left in olds.values():
        changed.update(k for k in left if k is not None)
    return changed


def _last_at_or_before(values: list[int], x: int) -> int:
    return max(bisect_right(values, x) - 1, 0)


def _first_at_or_after(values: list[int], x: int) -> int:
    return min(bisect_left(values, x), len(values) - 1)


def _entries(
    text: str, pos: int, end: int, offset: int, *, whole: bool,
) -> tuple[list[str | None], list[str], list[int], list[int]]:
    """The entries of text[pos:end], comma-separated: each one's service (None when malformed),
    the reasons of the malformed ones, and their spans. `whole`: `end` is the end of the answer
    and the entries are followed by `]` (and whitespace); else they must end exactly at `end`.
    ValueError when the text is not that. Each entry is dropped once its service is known, so
    a 10,000-check answer never holds 10,000 parsed objects at once (the sidecar's RSS)."""
    keys: list[str | None] = []
    reasons: list[str] = []
    starts: list[int] = []
    ends: list[int] = []
    if whole and text.startswith("]", pos):
        trailing = _WS.match(text, pos + 1)
        if trailing is None or trailing.end() != end:
            raise ValueError("text after the array")
        return keys, reasons, starts, ends
    while True:
        value, stop = _decode(text, pos)
        try:
            keys.append(check_key(value, f"check {offset + len(starts)}"))
        except ConsulAnswerError as exc:
            keys.append(None)
            reasons.append(str(exc))
        starts.append(pos)
        ends.append(stop)
        if not whole and stop == end:
            return keys, reasons, starts, ends
        if stop > end:
            raise ValueError("a value runs past the region")
        sep = _SEP.match(text, stop)
        if sep is None:
            raise ValueError("expected , or ]")
        if sep.group(1) == "]":
            if whole and sep.end() == end:
                return keys, reasons, starts, ends
            raise ValueError("unexpected ]")
        pos = sep.end()
        if pos >= end:
            raise ValueError("a separator runs past the region")
