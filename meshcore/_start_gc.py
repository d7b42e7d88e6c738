"""Fewer cyclic garbage collections while meshcore starts.

A `meshcore run` start allocates some 30,000 container objects that all live on (modules,
classes, functions, the runtime's objects), and the collector's default threshold (700 net
allocations) had it scan them ~50 times before the sidecar was ready: 5-7 ms of CPU, about
4 % of the start (docs/data-path.md, "Start-up time and idle memory"). So `import meshcore`
and `meshcore run` up to ready run with a higher first-generation threshold, high enough for
a typical start to need no collection and low enough that a long start (thousands of
services) still collects; the default comes back after, and the objects allocated
meanwhile go to the oldest generation without a scan, where the next full collection (which
the collector runs rarely) looks at them. Importing this module pauses (it is
`meshcore/__init__.py`'s first import, which resumes at its end); `meshcore._main` pauses
again for a `meshcore run` and `run_sidecar` resumes once the sidecar is ready.
"""

from __future__ import annotations

import gc

__all__ = ["pause", "resume"]

START_THRESHOLD = 100_000

_saved: tuple[int, int, int] | None = None


def pause() -> None:
    """Raise the first generation's threshold until `resume` (no-op when already raised)."""
    global _saved
    if _saved is None:
        _saved = gc.get_threshold()
        gc.set_threshold(max(START_THRESHOLD, _saved[0]), _saved[1], _saved[2])


def resume() -> None:
    """Put back the thresholds `pause` found, with the objects allocated meanwhile moved to the
    oldest generation unscanned (a freeze and unfreeze: two list splices)."""
    global _saved
    if _saved is not None:
        gc.set_threshold(*_saved)
        _saved = None
        # Else the first allocation would scan every object of the start at once, which costs
        # what the skipped collections did; a process that froze objects itself keeps them so.
        if gc.get_freeze_count() == 0:
            gc.freeze()
            gc.unfreeze()


pause()
