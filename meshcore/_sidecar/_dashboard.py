"""The dashboard page the sidecar's admin listener serves at `/`.

One static HTML file with its CSS and JavaScript inline (no build step, no external assets, so
it works offline and behind any proxy); it reads `/state` once a second. Read once and cached:
the admin handler calls `page()` per request.
"""

from __future__ import annotations

from functools import cache

__all__ = ["page"]


@cache
def page() -> bytes:
    # Imported on the first request for the page: importlib.resources brings tempfile, shutil
    # and the compression modules, ~10 ms and memory every sidecar would pay at start.
    from importlib.resources import files

    return files(__package__).joinpath("dashboard.html").read_bytes()
