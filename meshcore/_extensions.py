"""The `extensions` keys layers and the core share: the contract a third-party layer joins.

A request's `extensions` dict travels through every layer to the terminal; a response's comes
back out. These keys are the ones the core reads or writes, and the ones first-party layers
use to cooperate (timeout publishes a deadline that retry and the core respect; retry keeps
attempts that timeout reports), so a layer of anyone's can take either side. Values are
documented in docs/writing-a-plugin.md ("What a layer can read and set").
"""

from __future__ import annotations

from typing import Final

__all__ = ["ATTEMPTS", "DEADLINE", "ENDPOINT", "EXCLUDE"]

# request: the anyio clock time by which the response head must have arrived. Set by a
# deadline layer (outer deadlines win: keep the earlier one); read by retry (no backoff past
# it) and by the core (a cancellation past it counts as the endpoint's timeout).
DEADLINE: Final = "meshcore.deadline"
# request: endpoints the balancer must not pick for this attempt (a collection of Endpoint).
# Set by a retry layer so a retry goes to another endpoint; read by the core's terminal.
EXCLUDE: Final = "meshcore.exclude"
# request: a list of `meshcore.Attempt`, one per finished attempt. Appended by a retry layer;
# read by a deadline layer, whose DeadlineExceeded lists them.
ATTEMPTS: Final = "meshcore.attempts"
# response: the Endpoint that answered. Set by the core's terminal.
ENDPOINT: Final = "meshcore.endpoint"
