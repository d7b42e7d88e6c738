"""Request-path normalization: the one spelling of a path that is both judged and forwarded.

An authorization decision is only as good as the agreement between the path it judged and the
path the application routes on. Istio had exactly this gap twice: CVE-2021-31920 (`%2F` and
`%5C` let `/public%2F..%2Fadmin` pass a `/public` rule and reach `/admin`) and CVE-2021-39156
(a `#fragment` in the path was judged without it but routed with it). Its fix, followed here,
is to normalize the path once, judge that, forward that, and refuse what cannot be judged
safely. The vocabulary is Istio's `meshConfig.pathNormalization` and Envoy's
`path_with_escaped_slashes_action`:

- `BASE` (default): RFC 3986 §6.2.2 syntax-based normalization: percent-encoded unreserved
  characters decoded (`%61` -> `a`, `%2e` -> `.`, §2.3), other escapes' hex in upper case
  (§6.2.2.1), dot segments removed (§5.2.4); `MERGE_SLASHES` also merges runs of `/`;
  `DECODE_AND_MERGE_SLASHES` also decodes `%2F` and `%5C` to `/` (Istio's meaning); `NONE`
  changes nothing (not recommended: the policy then judges a path the application may resolve
  differently).
- escaped slashes (`%2F`, `%5C`, any case): `REJECT_REQUEST` (default), `KEEP_UNCHANGED`,
  `UNESCAPE_AND_FORWARD` (decoded to `/`), `UNESCAPE_AND_REDIRECT` (the same, answered as a
  redirect to the decoded path when the path had any).

Whatever the settings, these are refused (`PathRejected`): a `#` anywhere in the target (a
fragment is never part of a request target, RFC 9112 §3.2), a raw backslash (Windows-flavoured
servers treat it as `/`), a malformed `%` escape, and a `.` or `..` segment carrying `;`
parameters (`/public/..;/admin` is `/admin` to Tomcat and Spring).
"""

from __future__ import annotations

__all__ = [
    "ESCAPED_SLASH_ACTIONS",
    "PATH_NORMALIZATIONS",
    "PathRejected",
    "has_escaped_slash",
    "normalize_path",
    "normalize_target",
]

PATH_NORMALIZATIONS = ("BASE", "MERGE_SLASHES", "DECODE_AND_MERGE_SLASHES", "NONE")
ESCAPED_SLASH_ACTIONS = (
    "REJECT_REQUEST",
    "KEEP_UNCHANGED",
    "UNESCAPE_AND_FORWARD",
    "UNESCAPE_AND_REDIRECT",
)

_HEX = frozenset("0123456789abcdefABCDEF")
# RFC 3986 §2.3: ALPHA / DIGIT / "-" / "." / "_" / "~"
_UNRESERVED = frozenset(
    "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~"
)
_SLASH_ESCAPES = ("2F", "5C")


class PathRejected(ValueError):
    """A request path that cannot be judged safely; the message says why (one line)."""


def has_escaped_slash(path: str) -> bool:
    """Whether `path` holds `%2F` or `%5C` (any case)."""
    if "%" not in path:
        return False
    upper = path.upper()
    return "%2F" in upper or "%5C" in upper


def _decode(path: str, decode_unreserved: bool, slashes: str) -> str:
    """Percent escapes resolved per the settings; raises PathRejected for a bad escape."""
    out: list[str] = []
    i = 0
    n = len(path)
    while i < n:
        c = path[i]
        if c != "%":
            out.append(c)
            i += 1
            continue
        pair = path[i + 1 : i + 3]
        if len(pair) < 2 or pair[0] not in _HEX or pair[1] not in _HEX:
            raise PathRejected(f"malformed percent-encoding at {path[i:i + 3]!r}")
        pair = pair.upper()
        if pair in _SLASH_ESCAPES:
            if slashes == "REJECT_REQUEST":
                raise PathRejected(
                    "escaped slash or backslash (%2F, %5C) in the path "
                    "(path_with_escaped_slashes_action = REJECT_REQUEST)"
                )
            out.append("/" if slashes.startswith("UNESCAPE") else "%" + pair)
        else:
            char = chr(int(pair, 16))
            out.append(char if decode_unreserved and char in _UNRESERVED else "%" + pair)
        i += 3
    return "".join(out)


def _remove_dot_segments(path: str) -> str:
    """RFC 3986 §5.2.4 for an absolute path (starting with `/`)."""
    segments = path.split("/")[1:]
    out: list[str] = []
    last = len(segments) - 1
    for i, segment in enumerate(segments):
        if segment == "." or segment == "..":
            if segment == ".." and out:
                out.pop()
            if i == last:
                out.append("")  # `/a/b/..` is `/a/`: the directory, not `/a`
            continue
        out.append(segment)
    return "/" + "/".join(out)


def _merge_slashes(path: str) -> str:
    while "//" in path:
        path = path.replace("//", "/")
    return path


def normalize_path(
    path: str, normalization: str = "BASE", escaped_slashes: str = "REJECT_REQUEST"
) -> str:
    """`path` (no query) as it is judged and forwarded; raises PathRejected.

    Idempotent for every setting: a normalized path normalizes to itself.
    """
    if normalization not in PATH_NORMALIZATIONS:
        raise ValueError(f"normalization: expected one of {PATH_NORMALIZATIONS}, got {normalization!r}")
    if escaped_slashes not in ESCAPED_SLASH_ACTIONS:
        raise ValueError(
            f"escaped_slashes: expected one of {ESCAPED_SLASH_ACTIONS}, got {escaped_slashes!r}"
        )
    if "#" in path:
        raise PathRejected("'#' in the request target (a fragment is never sent, RFC 9112 §3.2)")
    if "\\" in path:
        raise PathRejected("raw backslash in the path")
    if path == "*":  # OPTIONS * (RFC 9112 §3.2.4)
        return path
    if not path.startswith("/"):
        raise PathRejected(f"the path does not start with '/': {path[:32]!r}")
    if normalization == "DECODE_AND_MERGE_SLASHES" and not escaped_slashes.startswith("UNESCAPE"):
        escaped_slashes = "UNESCAPE_AND_FORWARD"  # Istio's meaning of this mode
    normalize = normalization != "NONE"
    if "%" in path:
        path = _decode(path, normalize, escaped_slashes)
    if ";" in path:
        for segment in path.split("/"):
            if segment.partition(";")[0] in (".", "..") and ";" in segment:
                raise PathRejected(f"dot segment with parameters {segment[:16]!r} in the path")
    if not normalize:
        return path
    if normalization != "BASE":
        path = _merge_slashes(path)
    if "/." in path:  # a dot segment always follows a `/` (the path starts with one)
        path = _remove_dot_segments(path)
    return path


def normalize_target(
    target: str, normalization: str = "BASE", escaped_slashes: str = "REJECT_REQUEST"
) -> str:
    """A request target (path and query) with its path normalized; the query is kept as sent
    (a `#` in it is refused too)."""
    path, mark, query = target.partition("?")
    if "#" in query:
        raise PathRejected("'#' in the request target (a fragment is never sent, RFC 9112 §3.2)")
    return normalize_path(path, normalization, escaped_slashes) + mark + query
