"""Regenerate docs/hooks.md from meshcore/hookspecs.py (the docstrings are the reference).

    python docs/gen_hooks.py > docs/hooks.md

tests/test_docs.py fails when docs/hooks.md is out of date or a hook has no test.
"""

from __future__ import annotations

import inspect
import re

from meshcore import hookspecs

INTRO = """# Hook reference

Generated from `meshcore/hookspecs.py` by `python docs/gen_hooks.py > docs/hooks.md`; edit the
docstrings there, not this file. For a walk-through, see [writing a plugin](writing-a-plugin.md).

{module_doc}
"""


def families() -> list[tuple[str, list[str]]]:
    """Hook names grouped under the banner comments of hookspecs.py, in source order."""
    source = inspect.getsource(hookspecs)
    groups: list[tuple[str, list[str]]] = []
    for line in source.splitlines():
        banner = re.match(r"^# (\w[\w ]*)$", line)
        if banner and groups is not None:
            groups.append((banner.group(1), []))
        hook = re.match(r"^def (meshcore_\w+)\(", line)
        if hook:
            groups[-1][1].append(hook.group(1))
    return [(name, hooks) for name, hooks in groups if hooks]


def render() -> str:
    out = [INTRO.format(module_doc=inspect.getdoc(hookspecs))]
    for family, hooks in families():
        out.append(f"\n## {family}\n")
        for name in hooks:
            func = getattr(hookspecs, name)
            sig = str(inspect.signature(func)).replace("'", "")
            first = " *(firstresult)*" if func.meshcore_spec["firstresult"] else ""
            out.append(f"\n### `{name}`{first}\n\n```python\ndef {name}{sig}\n```\n")
            out.append(inspect.getdoc(func) + "\n")
    return "".join(out)


if __name__ == "__main__":
    print(render(), end="")
