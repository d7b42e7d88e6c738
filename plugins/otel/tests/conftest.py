"""Makes `otlp_receiver` importable (tests run with --import-mode=importlib) and gives the
`receiver` fixture: a real OTLP/HTTP receiver on loopback."""

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from otlp_receiver import OtlpReceiver  # noqa: E402


@pytest.fixture
def receiver() -> Iterator[OtlpReceiver]:
    r = OtlpReceiver()
    yield r
    r.close()
