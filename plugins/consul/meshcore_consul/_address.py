"""What counts as an address: a host name or an IP literal, nothing else.

Used on both sides: the registry refuses a registration whose `Address` is not one (a
`host:port` typo or a CR/LF would otherwise reach every client's URL or Host header), and
discovery skips an entry that carries one (a single bad instance must not cost the others).
"""

from __future__ import annotations

import ipaddress
import re
from functools import lru_cache

__all__ = ["address_problem"]

# RFC 1123 labels, plus "_" which Consul node and service names allow and some resolvers
# accept; at most 253 characters in all (RFC 1035 2.3.4).
_LABEL = re.compile(r"^[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?$")


# Cached: a sidecar watching 1,000 services checks the same few addresses thousands of times
# (every instance of every answer), and ipaddress's parse was a quarter of parsing an answer.
@lru_cache(maxsize=4096)
def address_problem(value: str) -> str | None:
    """None when `value` is a host name or an IP literal, else why it is not one."""
    if not value:
        return "empty"
    try:
        ipaddress.ip_address(value)
        return None
    except ValueError:
        pass
    if any(c in value for c in "\r\n\t \0"):
        return "contains whitespace or control characters"
    if value.startswith("[") or value.count(":") == 1:
        return "looks like host:port; the port goes in Port"
    if ":" in value:
        return "not a valid IP literal"
    if len(value) > 253:
        return "longer than 253 characters"
    labels = value[:-1].split(".") if value.endswith(".") else value.split(".")
    if not all(_LABEL.match(label) for label in labels):
        return "not a host name or IP literal"
    return None
