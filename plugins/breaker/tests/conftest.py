"""Makes `breaker_testkit` importable (tests run with --import-mode=importlib) and its
fixtures available."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from breaker_testkit import scripted_mesh  # noqa: F401
