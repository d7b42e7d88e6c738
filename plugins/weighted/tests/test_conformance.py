"""Every kind of this plugin (and each least-request mode) passes the shared balancer suite."""

from __future__ import annotations

from typing import ClassVar

from meshcore.testing.conformance.balancer import BalancerConformance


class TestWeightedConformance(BalancerConformance):
    plugins = ("weighted",)
    kind = "weighted"


class TestRandomConformance(BalancerConformance):
    plugins = ("weighted",)
    kind = "random"


class TestLeastRequestConformance(BalancerConformance):
    plugins = ("weighted",)
    kind = "least-request"


class TestPeakEwmaConformance(BalancerConformance):
    plugins = ("weighted",)
    kind = "least-request"
    settings: ClassVar = {"mode": "peak-ewma", "decay": "5s"}


class TestSlowStartConformance(BalancerConformance):
    plugins = ("weighted",)
    kind = "weighted"
    settings: ClassVar = {"slow-start-window": "30s"}
