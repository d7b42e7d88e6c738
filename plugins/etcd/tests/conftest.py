"""Makes `etcd_testkit` importable (tests run with --import-mode=importlib) and its fixtures
available."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from etcd_testkit import admin, etcd, etcd_cluster  # noqa: E402, F401
