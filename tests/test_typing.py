"""What the type check promises beyond what mypy enforces by itself.

mypy (`tox -e type`, `.ci/run`; settings in pyproject.toml's `[tool.mypy]`) checks the core,
every plugin package, the examples the docs show and tests/typecheck/public_api.py (documented
calls with the types they must give), strictly. These tests keep the rest of
the promise: every `# type: ignore` names its error code and says why, the public API is fully
annotated and never in a module the check exempts, and CI runs the checker before the tests.
"""

from __future__ import annotations

import configparser
import fnmatch
import inspect
import io
import re
import tokenize
import tomllib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import meshcore
import meshcore.testing
from meshcore import hookspecs
from meshcore.testing.conformance import balancer, discovery, layer

ROOT = Path(__file__).resolve().parent.parent
MYPY = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["mypy"]
# `# type: ignore[code, ...]  # reason`: the codes, then a comment of its own saying why.
IGNORE = re.compile(r"#\s*type:\s*ignore\b(?P<codes>\[[^\]]*\])?(?P<rest>.*)")
REASON = re.compile(r"\s+#\s*\S")


def checked_files() -> list[Path]:
    """The files of mypy's `files` setting, as mypy expands them."""
    found: set[Path] = set()
    for pattern in MYPY["files"]:
        for path in ROOT.glob(pattern):
            found.update(path.rglob("*.py") if path.is_dir() else [path])
    return sorted(found)


def module_of(path: Path) -> str:
    """`meshcore/_http/_client.py` -> `meshcore._http._client` (a plugin's from its folder;
    a file outside the packages, such as an example, by its path)."""
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    top = next((i for i, p in enumerate(parts) if p == "meshcore" or p.startswith("meshcore_")), 0)
    parts = parts[top:]
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def exempt(module: str) -> bool:
    """Whether an `ignore_errors` override covers `module` (mypy's `pkg.*` includes `pkg`)."""
    for override in MYPY.get("overrides", []):
        if override.get("ignore_errors"):
            for pattern in override["module"]:
                if fnmatch.fnmatchcase(module, pattern) or module == pattern.removesuffix(".*"):
                    return True
    return False


def ignores(path: Path) -> Iterator[tuple[int, str]]:
    """(line, comment) of every `# type: ignore` comment in `path` (comments only, not strings)."""
    for token in tokenize.generate_tokens(io.StringIO(path.read_text()).readline):
        if token.type == tokenize.COMMENT and IGNORE.search(token.string):
            yield token.start[0], token.string


def test_the_check_covers_the_core_and_every_plugin_package():
    files = checked_files()
    packages = {module_of(f).split(".")[0] for f in files}
    plugins = {p.parent.name for p in ROOT.glob("plugins/*/meshcore_*/__init__.py")}
    assert {"meshcore", "meshcore_stamp", *plugins} <= packages
    assert ROOT / "tests" / "typecheck" / "public_api.py" in files
    assert len(plugins) >= 7


def test_every_ignore_names_its_error_code_and_a_reason():
    bad = []
    for path in checked_files():
        if exempt(module_of(path)):
            continue  # renovated in parallel: its ignores are checked when the exemption goes
        for line, comment in ignores(path):
            match = IGNORE.search(comment)
            assert match is not None
            if not match["codes"] or not REASON.match(match["rest"]):
                bad.append(f"{path.relative_to(ROOT)}:{line}: {comment}")
    assert not bad, "write `# type: ignore[code]  # why`:\n" + "\n".join(bad)


def test_the_ignore_rule_catches_what_it_should(tmp_path):
    sample = tmp_path / "sample.py"
    sample.write_text(
        "a = 1  # type: ignore\n"
        "b = 2  # type: ignore[misc]\n"
        "c = 3  # type: ignore[misc]  # the reason\n"
        "d = '# type: ignore'\n"
    )
    found = {line: IGNORE.search(comment) for line, comment in ignores(sample)}
    assert sorted(found) == [1, 2, 3]  # the string on line 4 is not a comment
    complete = {n for n, m in found.items() if m and m["codes"] and REASON.match(m["rest"])}
    assert complete == {3}


def public_objects() -> Iterator[tuple[str, Any]]:
    """What users and plugin authors call: the package exports, the testing kit, the hooks,
    and the conformance suites' classes."""
    for package in (meshcore, meshcore.testing):
        for name in package.__all__:
            yield f"{package.__name__}.{name}", getattr(package, name)
    for name in dir(hookspecs):
        if name.startswith("meshcore_"):
            yield f"meshcore.hookspecs.{name}", getattr(hookspecs, name)
    for module in (balancer, discovery, layer):
        for name, value in vars(module).items():
            if inspect.isclass(value) and value.__module__ == module.__name__:
                if not name.startswith("_"):
                    yield f"{module.__name__}.{name}", value


def callables_of(name: str, obj: Any) -> Iterator[tuple[str, Callable[..., Any]]]:
    if inspect.isfunction(obj):
        yield name, obj
        return
    if not inspect.isclass(obj):
        return
    for attr, value in vars(obj).items():
        if attr.startswith("_") and attr not in ("__init__", "__call__"):
            continue
        if isinstance(value, (staticmethod, classmethod)):
            value = value.__func__
        elif isinstance(value, property):
            value = value.fget
        # Only our own code: a Protocol's __init__ is typing's.
        if inspect.isfunction(value) and value.__module__.startswith("meshcore"):
            yield f"{name}.{attr}", value


def test_the_public_api_is_fully_annotated():
    missing = []
    for name, obj in public_objects():
        for qualname, function in callables_of(name, obj):
            signature = inspect.signature(function)
            params = [
                p.name
                for i, p in enumerate(signature.parameters.values())
                if p.annotation is inspect.Parameter.empty
                and not (i == 0 and p.name in ("self", "cls"))
            ]
            if params or signature.return_annotation is inspect.Signature.empty:
                missing.append(f"{qualname}: {params or 'return'}")
    assert not missing, "unannotated public API:\n" + "\n".join(missing)


def test_no_public_module_is_exempt_from_the_check():
    modules = {getattr(obj, "__module__", None) for _, obj in public_objects()}
    modules |= {"meshcore", "meshcore.hookspecs", "meshcore.testing"}
    assert not [m for m in modules if m and exempt(m)]


def test_ci_runs_the_checker_before_the_readme_test_command():
    lines = [
        line.strip()
        for line in (ROOT / ".ci" / "run").read_text().splitlines()
        if line.strip() and not line.lstrip().startswith("#")
    ]
    readme = (ROOT / "README.md").read_text()
    assert lines[-1] in readme, ".ci/run must end with the README's test command"
    assert "mypy" in lines[:-1], ".ci/run must run mypy before the tests"
    tox = configparser.ConfigParser()
    tox.read(ROOT / "tox.ini")
    assert tox["testenv:type"]["commands"].split()[0] == "mypy"
    assert re.search(r"^mypy==", (ROOT / "requirements-dev.txt").read_text(), re.M)
