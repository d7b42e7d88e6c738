"""meshcore-servicemesh-tls: a mesh CA, mTLS between workloads with SPIFFE identities, authorization, rotation.

Plugin name `tls`. It adds:

- `meshcore -p tls ca init|issue|inspect|intermediate` and `identity serve|token` (the `cli`
  hook), see `_cli.py` and `_identity_cli.py`;
- `IdentityService`, certificates by CSR against a join token or the current certificate
  (`_identity_service.py`), and the workload's identity mode (`_workload_identity.py`);
- the `[tls]` config section (the `section` kind below);
- the security hooks: `client_tls`/`server_tls` give the workload's contexts, `check_peer`
  holds the server to the identity expected for the service, `authorize` applies the policy;
- a lifespan that loads the certificate at start and keeps it fresh (`_runtime.py`).

Everything is inert until `[tls]` names a CA (`ca_dir` or `ca`) or an identity service:
loading the plugin alone changes nothing.

    [tls]
    ca_dir = "/etc/mesh/ca"          # from `meshcore -p tls ca init` (issue mode when ca.key is there)
    service = "orders"               # this workload's identity: .../ns/<namespace>/sa/orders
    namespace = "shop"

    # or, across machines, no CA key on the workload (identity mode):
    # identity_service = "identity.example.org:8443"
    # ca = "/etc/mesh/root.crt"
    # join_token_file = "/run/secrets/join-token"

    [tls.identities]                 # expected server identity per service (default: same
    payments = "spiffe://example.org/ns/billing/sa/payments"   # namespace, sa = service name)

    [[tls.allow]]                    # no rule: any authenticated peer; any rule: default deny
    identities = ["spiffe://example.org/ns/shop/sa/web"]
    methods = ["GET"]
    paths = ["/orders"]
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import meshcore

from ._ca import CA, Issued, describe, parse_spiffe_id, spiffe_id, spiffe_ids_of
from ._identity_service import IdentityService, make_identity_dir
from ._policy import Policy, parse_rules
from ._runtime import MeshTLSContext, Workload, running
from ._tokens import TokenStore

__all__ = [
    "CA",
    "IdentityService",
    "Issued",
    "MeshTLSContext",
    "Policy",
    "TokenStore",
    "Workload",
    "describe",
    "make_identity_dir",
    "parse_rules",
    "spiffe_id",
    "spiffe_ids_of",
    "status",
    "workload",
]


def workload(mesh: meshcore.Mesh) -> Workload | None:
    """The running `Workload` of `mesh` (None when `[tls]` is not configured or not started)."""
    return running(mesh)


def status(mesh: meshcore.Mesh) -> dict[str, Any] | None:
    """Identity, certificate expiry (`expires_at`, Unix seconds) and policy counters of
    `mesh`'s workload; None when TLS is off. The same dict is mesh-wide state,
    `mesh.state()["state"]["tls"]` (what the sidecar's `/state` and `/metrics` show); per
    service, `mesh.state()["services"][<name>]["tls"]` has the `expected_server` identity."""
    w = running(mesh)
    return w.status() if w is not None else None


def _identities(value: Any) -> dict[str, str]:
    if not isinstance(value, Mapping):
        raise ValueError(f'expected a table of service = "spiffe://...", got {value!r}')
    out = {}
    for service, identity in value.items():
        if not isinstance(identity, str):
            raise ValueError(f"{service}: expected a SPIFFE ID string, got {identity!r}")
        parse_spiffe_id(identity)
        out[str(service)] = identity
    return out


def _domain(value: str) -> str:
    if value:
        from ._ca import check_trust_domain

        check_trust_domain(value)
    return value


def _segment(what: str) -> Any:
    def check(value: str) -> str:
        if value:
            from ._ca import check_segment

            check_segment(what, value)
        return value

    return check


@meshcore.hookimpl
def meshcore_kinds() -> list[meshcore.Kind]:
    S = meshcore.Setting
    return [
        meshcore.Kind(
            "tls",
            "section",
            {
                "ca_dir": S(
                    "str",
                    "",
                    "CA directory from `meshcore ca init` (ca.crt; with ca.key the workload issues its own certificate)",
                ),
                "ca": S("str", "", "trusted root bundle (PEM); default <ca_dir>/ca.crt"),
                "cert": S(
                    "str",
                    "",
                    "workload certificate file (PEM, leaf first); reloaded when it changes",
                ),
                "key": S("str", "", "workload private key file (PEM)"),
                "service": S(
                    "str",
                    "",
                    "this workload's service name (issue and identity modes)",
                    convert=_segment("service"),
                ),
                "namespace": S(
                    "str",
                    "default",
                    "namespace of this workload and, by default, of the services it calls",
                    convert=_segment("namespace"),
                ),
                "trust_domain": S(
                    "str",
                    "",
                    "trust domain; default from the root or the workload certificate",
                    convert=_domain,
                ),
                "ttl": S(
                    "duration",
                    24 * 3600.0,
                    "lifetime of self-issued certificates (Linkerd and Istio: 24 h)",
                    min=1.0,
                ),
                "renew_at": S(
                    "float",
                    2 / 3,
                    "renew when this fraction of the lifetime has passed",
                    min=0.1,
                    max=0.95,
                ),
                "reload_interval": S(
                    "duration",
                    10.0,
                    "how often cert/key/ca files are checked for changes",
                    min=0.01,
                ),
                "min_tls_version": S(
                    "str",
                    "1.3",
                    'lowest TLS version between workloads; "1.2" also allows TLS 1.2 with '
                    "ECDHE AEAD suites only (default 1.3, as Linkerd)",
                    choices=("1.2", "1.3"),
                ),
                "identity_service": S(
                    "str",
                    "",
                    "identity service address host:port (identity mode: certificates by CSR)",
                ),
                "identity_service_id": S(
                    "str",
                    "",
                    "SPIFFE ID the identity service must present; default spiffe://<td>/meshcore/identity",
                ),
                "join_token_file": S(
                    "str",
                    "",
                    "file holding the join token for the first certificate (else $MESHCORE_JOIN_TOKEN)",
                ),
                "identity_dir": S(
                    "str",
                    "",
                    "where identity mode keeps its key (0600), certificate and bundle across restarts",
                ),
                "identities": S(
                    "table",
                    {},
                    "expected server identity per service (exact or glob)",
                    convert=_identities,
                ),
                "allow": S(
                    "any",
                    [],
                    "authorization rules: [{identities, methods?, paths?}]",
                    convert=parse_rules,
                ),
            },
            help="mutual TLS with SPIFFE identities, authorization policy, certificate rotation",
        )
    ]


def _enabled(settings: Any) -> bool:
    return bool(settings.get("ca_dir") or settings.get("ca") or settings.get("identity_service"))


@meshcore.hookimpl
def meshcore_lifespan(mesh: meshcore.Mesh) -> Workload | None:
    settings = mesh.config.section("tls")
    if not _enabled(settings):
        return None
    return Workload(mesh, settings)


@meshcore.hookimpl
def meshcore_client_tls(service: str, mesh: meshcore.Mesh) -> MeshTLSContext | None:
    w = running(mesh)
    return w.client if w is not None else None


@meshcore.hookimpl
def meshcore_server_tls(mesh: meshcore.Mesh) -> MeshTLSContext | None:
    w = running(mesh)
    return w.server if w is not None else None


@meshcore.hookimpl
def meshcore_check_peer(
    service: str, endpoint: meshcore.Endpoint, peer: Any, mesh: meshcore.Mesh
) -> None:
    w = running(mesh)
    if w is not None and peer is not None:
        w.check_server(service, endpoint, peer)


@meshcore.hookimpl
def meshcore_authorize(request: meshcore.Request, peer: Any, mesh: meshcore.Mesh) -> str | None:
    w = running(mesh)
    if w is None:
        return None
    if peer is None:
        # A plain connection while this mesh runs mTLS: nobody is authenticated.
        return "a client certificate is required"
    return w.authorize(request, peer)


@meshcore.hookimpl
def meshcore_checks(config: meshcore.MeshConfig) -> list[Any] | None:
    settings = config.section("tls")
    if not _enabled(settings):
        return None
    from ._check import check_tls

    return [lambda: check_tls(settings)]


@meshcore.hookimpl
def meshcore_cli(cli: Any) -> None:
    from ._cli import ca
    from ._identity_cli import identity

    cli.add_command(ca)
    cli.add_command(identity)
