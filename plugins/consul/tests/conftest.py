"""Makes `consul_testkit` importable (tests run with --import-mode=importlib) and its
fixtures available."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from consul_testkit import consul_mesh, raw_server, registry, watcher  # noqa: F401
