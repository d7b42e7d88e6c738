"""The check every suite shares: a plugin's factories answer only for the kinds it declares."""

from __future__ import annotations

from typing import Any

from ... import Settings

__all__ = ["answers_for_foreign_kinds"]


def answers_for_foreign_kinds(mesh: Any, kind: str) -> list[str]:
    """What the plugin owning `kind` answers, on each factory hook it implements, for kinds it
    does not declare (other plugins' kinds and a made-up one): one line per wrong answer.

    Called through pluggy with every other plugin left out (`pm.subset_hook_caller`), so only
    the owner's own implementations answer. `mesh` must be running (an Upstream is needed).
    """
    plugins = mesh.plugins
    owner = plugins.kind_owner[kind]
    own = {name for name, plugin in plugins.kind_owner.items() if plugin == owner}
    foreign = sorted(set(plugins.kinds) - own | {f"not-{kind}"})
    others = [plugin for name, plugin in plugins.pm.list_name_plugin() if name != owner]
    upstream = next(iter(mesh.upstreams.values()))
    hooks = {
        "meshcore_discovery": {"service": upstream.name},
        "meshcore_balancer": {"upstream": upstream},
        "meshcore_layer": {"upstream": upstream},
    }
    wrong = []
    for hook, args in hooks.items():
        caller = plugins.pm.subset_hook_caller(hook, others)
        if not any(impl.plugin_name == owner for impl in caller.get_hookimpls()):
            continue
        for other in foreign:
            try:
                answer = caller(kind=other, settings=Settings(), **args)
            except Exception as exc:  # noqa: BLE001 - reported: the rule is "return None"
                answer = f"raised {type(exc).__name__}: {exc}"
            if answer is not None:
                wrong.append(
                    f"plugin {owner!r}: {hook}(kind={other!r}) answered {answer!r}; a factory "
                    "must return None for kinds it does not declare"
                )
    return wrong
