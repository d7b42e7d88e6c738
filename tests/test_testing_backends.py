"""meshcore's pytest plugin: the `anyio_backend` that runs is meshcore's, and a missing trio shows.

Run with pytester, as a plugin author's project would run: the plugins load from their modules,
in the order that used to let anyio's own `anyio_backend` (asyncio only without trio) win.
"""

from __future__ import annotations

import pytest

pytest_plugins = ["pytester"]

# meshcore's plugin first, anyio's after: the order in which anyio's fixture used to take over.
PLUGINS = ("-p", "meshcore.testing._plugin", "-p", "anyio.pytest_plugin")

TESTS = """
import pytest
from meshcore.testing import virtual_trio

@pytest.mark.anyio
async def test_plain(anyio_backend):
    pass

@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", [virtual_trio()])
async def test_virtual(anyio_backend):
    pass
"""

HIDE_TRIO = "import sys\nsys.modules['trio'] = None  # as if trio were not installed\n"


@pytest.fixture
def isolated(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> pytest.Pytester:
    monkeypatch.setenv("PYTEST_DISABLE_PLUGIN_AUTOLOAD", "1")
    monkeypatch.delenv("MESHCORE_REQUIRE_INTEGRATION", raising=False)
    pytester.makepyfile(test_backends=TESTS)
    return pytester


def test_both_backends_run_whatever_order_the_plugins_load_in(isolated: pytest.Pytester) -> None:
    result = isolated.runpytest(*PLUGINS, "-v")
    result.assert_outcomes(passed=3)
    result.stdout.fnmatch_lines(
        ["*test_plain?asyncio? PASSED*", "*test_plain?trio? PASSED*", "*test_virtual?trio-virtual? PASSED*"]
    )


def test_without_trio_the_trio_runs_are_visible_skips_saying_what_to_install(
    isolated: pytest.Pytester,
) -> None:
    isolated.makeconftest(HIDE_TRIO)
    result = isolated.runpytest(*PLUGINS, "-v", "-rs")
    result.assert_outcomes(passed=1, skipped=2)
    result.stdout.fnmatch_lines(
        [
            "*test_plain?asyncio? PASSED*",
            "*test_plain?trio? SKIPPED*",
            '*trio is not installed, so this test ran on asyncio only: `pip install "meshcore-servicemesh?trio?"`*',
        ]
    )


def test_without_trio_ci_fails(isolated: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> None:
    isolated.makeconftest(HIDE_TRIO)
    isolated.makepyfile(  # virtual_trio() would stop collection; this is about the fixture
        test_backends="import pytest\n\n@pytest.mark.anyio\nasync def test_plain(anyio_backend):\n    pass\n"
    )
    monkeypatch.setenv("MESHCORE_REQUIRE_INTEGRATION", "1")
    result = isolated.runpytest(*PLUGINS)
    result.assert_outcomes(passed=1, errors=1)  # failed in the fixture: an error, not a skip
    result.stdout.fnmatch_lines(["*MESHCORE_REQUIRE_INTEGRATION=1: trio is not installed*"])
