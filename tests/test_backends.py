"""The event loop `meshcore run` and `meshcore demo` pick by default."""

from __future__ import annotations

import importlib.util

import pytest

from meshcore._backends import default_backend, run


def test_the_environment_variable_wins(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MESHCORE_BACKEND", "asyncio")
    assert default_backend() == "asyncio"


def test_uvloop_first_then_trio(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MESHCORE_BACKEND", raising=False)
    expected = "uvloop" if importlib.util.find_spec("uvloop") else "trio"
    assert default_backend() == expected
    monkeypatch.setitem(__import__("sys").modules, "uvloop", None)  # as if not installed
    assert default_backend() == "trio"


@pytest.mark.parametrize("backend", ["uvloop", "trio", "asyncio"])
def test_run_runs_on_the_named_loop(backend: str) -> None:
    async def which() -> str:
        import sniffio

        name = sniffio.current_async_library()
        if name == "asyncio":
            import asyncio

            return "uvloop" if "uvloop" in type(asyncio.get_running_loop()).__module__ else name
        return name

    assert run(which, backend) == backend
