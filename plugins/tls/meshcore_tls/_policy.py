"""Authorization policy: which peer identities may call this service, per method and path.

Semantics follow Istio's AuthorizationPolicy and Consul's intentions
(shared/reference/data-plane-anchors.md): with no rule at all every authenticated peer is
allowed; as soon as one rule exists, a request is allowed only when some rule matches it and
everything else is denied. Rules only ever allow, so their order does not matter.

    [[tls.allow]]
    identities = ["spiffe://example.org/ns/shop/sa/web"]    # exact, or a glob: ".../ns/ops/*"
    methods = ["GET", "HEAD"]                               # optional, default any method
    paths = ["/orders"]                                      # optional prefixes, default any

Paths are matched on whole segments (`/orders` matches `/orders` and `/orders/7`, not
`/ordersx`) after `meshcore.normalize_path` (RFC 3986 dot segments removed, unreserved escapes
decoded): the sidecar forwards exactly that normalized path (docs/sidecar.md, "Path
normalization"), so `/orders/../admin` is judged as `/admin` and the app receives `/admin`. A
path holding `%2F` or `%5C` (only possible when the sidecar keeps them,
`path_with_escaped_slashes_action = "KEEP_UNCHANGED"`) is allowed only when both spellings are:
the escapes kept and decoded to `/` (CVE-2021-31920); one holding `//` only when its
slash-merged spelling is allowed too. A path that cannot be judged (`#`, a raw backslash, a bad
escape, or dot segments, which only reach the policy under `path_normalization = "NONE"`) is
denied.

Everything is precomputed at load: exact identities go into a set, so a check is a few set
and prefix tests per rule.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import meshcore

__all__ = ["Policy", "Rule", "normalize_path", "parse_rules"]

_RULE_KEYS = {"identities", "methods", "paths"}
_METHOD = re.compile(r"^[A-Z]+$")
_EXAMPLE = '{ identities = ["spiffe://example.org/ns/shop/sa/web"], methods = ["GET"], paths = ["/orders"] }'


def normalize_path(path: str) -> str:
    """The path as judged (see the module docstring); raises meshcore.PathRejected."""
    return meshcore.normalize_path(path, "BASE", "KEEP_UNCHANGED")


def _has_dot_segment(path: str) -> bool:
    """Whether a `.` or `..` segment (also spelled `%2e`) is in `path`."""
    for segment in path.split("?")[0].split("/"):
        if segment and segment.lower().replace("%2e", ".") in (".", ".."):
            return True
    return False


@dataclass(frozen=True)
class Rule:
    exact: frozenset[str]
    patterns: tuple[str, ...]
    methods: frozenset[str] | None
    paths: tuple[str, ...] | None

    def allows_identity(self, identity: str) -> bool:
        if identity in self.exact:
            return True
        return any(fnmatch.fnmatchcase(identity, p) for p in self.patterns)

    def matches(self, identity: str, method: str, path: str) -> bool:
        if self.methods is not None and method not in self.methods:
            return False
        if self.paths is not None and not any(
            p == "/" or path == p or path.startswith(p + "/") for p in self.paths
        ):
            return False
        return self.allows_identity(identity)


class Policy:
    """The allow rules of `[tls]`; `check` returns None to allow or a short reason to deny."""

    def __init__(self, rules: Sequence[Rule] = ()) -> None:
        self.rules = tuple(rules)

    def __bool__(self) -> bool:
        return bool(self.rules)

    def check(self, identity: str, method: str, path: str) -> str | None:
        if not self.rules:
            return None
        try:
            if ("/." in path or "%2" in path) and _has_dot_segment(path):
                raise meshcore.PathRejected(
                    "dot segments (the app may resolve them differently; the sidecar "
                    "removes them unless path_normalization = NONE)"
                )
            normal = normalize_path(path)
            spellings = [normal]
            if meshcore.has_escaped_slash(normal):
                spellings.append(meshcore.normalize_path(path, "BASE", "UNESCAPE_AND_FORWARD"))
            if "//" in normal:  # nginx and others merge slashes
                spellings.append(meshcore.normalize_path(normal, "MERGE_SLASHES", "KEEP_UNCHANGED"))
        except meshcore.PathRejected as exc:
            return f"the path cannot be judged: {exc}"
        for rule in self.rules:
            if all(rule.matches(identity, method, p) for p in spellings):
                return None
        shown = normal if len(normal) <= 64 else normal[:61] + "..."
        return f"{identity} is not allowed to {method} {shown}"


def _strings(value: Any, where: str, key: str) -> list[str]:
    if not isinstance(value, list) or not value or not all(isinstance(v, str) and v for v in value):
        raise ValueError(f"{where}: {key}: expected a non-empty list of strings, got {value!r}")
    return value


def parse_rules(value: Any) -> Policy:
    """`allow = [ {identities, methods?, paths?}, ... ]` -> Policy (ValueError names the rule)."""
    if isinstance(value, Policy):
        return value
    if not isinstance(value, list):
        raise ValueError(f"expected a list of rules like {_EXAMPLE}, got {value!r}")
    rules = []
    for i, item in enumerate(value):
        where = f"rule {i}"
        if not isinstance(item, Mapping):
            raise ValueError(f"{where}: expected a table like {_EXAMPLE}, got {item!r}")
        unknown = set(item) - _RULE_KEYS
        if unknown:
            raise ValueError(
                f"{where}: unknown key(s) {sorted(unknown)}; known: {sorted(_RULE_KEYS)}"
            )
        if "identities" not in item:
            raise ValueError(
                f'{where}: identities is required (use ["*"] for any authenticated peer)'
            )
        identities = _strings(item["identities"], where, "identities")
        for ident in identities:
            if ident != "*" and not ident.startswith("spiffe://"):
                raise ValueError(
                    f"{where}: identities: {ident!r} is not a SPIFFE ID or pattern (spiffe://...)"
                )
        methods = None
        if "methods" in item:
            methods = [m.upper() for m in _strings(item["methods"], where, "methods")]
            for m in methods:
                if not _METHOD.match(m):
                    raise ValueError(f"{where}: methods: {m!r} is not an HTTP method")
        paths = None
        if "paths" in item:
            paths = _strings(item["paths"], where, "paths")
            for p in paths:
                if not p.startswith("/"):
                    raise ValueError(f"{where}: paths: {p!r} must start with '/'")
            try:
                paths = [
                    meshcore.normalize_path(p, "MERGE_SLASHES", "REJECT_REQUEST").rstrip("/") or "/"
                    for p in paths
                ]
            except meshcore.PathRejected as exc:
                raise ValueError(f"{where}: paths: {exc}") from None
        rules.append(
            Rule(
                exact=frozenset(i for i in identities if not _is_glob(i)),
                patterns=tuple(i for i in identities if _is_glob(i)),
                methods=frozenset(methods) if methods is not None else None,
                paths=tuple(paths) if paths is not None else None,
            )
        )
    return Policy(rules)


def _is_glob(text: str) -> bool:
    return any(c in text for c in "*?[")
