"""Conformance suites per hook family: subclass one in your plugin's tests.

- `meshcore.testing.conformance.balancer.BalancerConformance`
- `meshcore.testing.conformance.layer.LayerConformance`
- `meshcore.testing.conformance.discovery.DiscoveryConformance`
- `meshcore.testing.conformance.routing.RouteMatchConformance` and `RouteFilterConformance`

Each is a plain test class with abstract factory methods; pytest collects the inherited
tests in your subclass, so every plugin is held to the same contract.
"""
