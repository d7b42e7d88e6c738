"""Policy semantics and the `[tls]` section's validation (bad config fails with its key path)."""

from __future__ import annotations

import meshcore
import pytest
from hypothesis import given
from hypothesis import strategies as st

from meshcore_tls import parse_rules
from meshcore_tls._policy import normalize_path

WEB = "spiffe://example.org/ns/shop/sa/web"


def test_no_rules_allow_everyone_and_any_rule_denies_the_rest():
    assert parse_rules([]).check(WEB, "DELETE", "/anything") is None
    policy = parse_rules([{"identities": [WEB], "methods": ["get"], "paths": ["/orders/"]}])
    assert policy.check(WEB, "GET", "/orders") is None
    assert policy.check(WEB, "GET", "/orders/7?x=1".partition("?")[0]) is None
    assert policy.check(WEB, "POST", "/orders/7") is not None
    assert policy.check(WEB, "GET", "/ordersx") is not None
    assert policy.check("spiffe://example.org/ns/shop/sa/webx", "GET", "/orders") is not None


def test_glob_identities_and_root_path():
    policy = parse_rules(
        [
            {"identities": ["spiffe://example.org/ns/ops/*"], "paths": ["/"]},
            {"identities": ["*"], "paths": ["/health"]},
        ]
    )
    assert policy.check("spiffe://example.org/ns/ops/sa/admin", "POST", "/x") is None
    assert policy.check("spiffe://other.org/ns/x/sa/y", "GET", "/health") is None
    assert policy.check("spiffe://other.org/ns/x/sa/y", "GET", "/x") is not None


@pytest.mark.parametrize(
    "path",
    [
        "/orders/../admin",
        "/orders/%2e%2e/admin",
        "//admin",
        "/orders/..%2fadmin",
        "/orders\\..\\admin",
        "/./admin",
    ],
)
def test_paths_are_judged_as_the_application_resolves_them(path):
    policy = parse_rules([{"identities": [WEB], "paths": ["/orders"]}])
    assert policy.check(WEB, "GET", path) is not None


@given(st.text(alphabet="/.%2efadmin\\ors", max_size=30))
def test_an_allowed_path_is_always_under_the_prefix(path):
    policy = parse_rules([{"identities": [WEB], "paths": ["/orders"]}])
    if policy.check(WEB, "GET", path) is None:
        normal = normalize_path(path)
        assert normal == "/orders" or normal.startswith("/orders/")
        assert ".." not in normal.split("/")


def test_reason_is_short():
    policy = parse_rules([{"identities": [WEB]}])
    reason = policy.check("spiffe://example.org/ns/a/sa/b", "GET", "/" + "x" * 500)
    assert len(reason) < 160 and reason.endswith("...")


@pytest.mark.parametrize(
    "rules, message",
    [
        ({"identities": [WEB]}, "expected a list of rules"),
        (["x"], "rule 0: expected a table"),
        ([{"methods": ["GET"]}], "identities is required"),
        ([{"identities": []}], "non-empty list"),
        ([{"identities": ["web"]}], "not a SPIFFE ID"),
        ([{"identities": [WEB], "methods": ["GE T"]}], "not an HTTP method"),
        ([{"identities": [WEB], "paths": ["orders"]}], "must start with '/'"),
        ([{"identities": [WEB], "path": ["/x"]}], "unknown key"),
    ],
)
def test_bad_rules(rules, message):
    with pytest.raises(ValueError, match=message):
        parse_rules(rules)


@pytest.mark.parametrize(
    "tls, path, message",
    [
        ({"allow": [{"identities": ["nope"]}]}, "tls.allow", "not a SPIFFE ID"),
        ({"identities": {"orders": "http://x"}}, "tls.identities", "not a SPIFFE ID"),
        ({"renew_at": 1.5}, "tls.renew_at", "between"),
        ({"namespace": "a/b"}, "tls.namespace", "namespace"),
        ({"trust_domain": "EXAMPLE"}, "tls.trust_domain", "trust domain"),
        ({"cert_file": "x"}, "tls.cert_file", "unknown setting"),
    ],
)
def test_bad_section_fails_at_load_with_the_key_path(tls, path, message):
    with pytest.raises(meshcore.ConfigError) as info:
        meshcore.Mesh({"tls": tls}, ["tls"])
    assert info.value.path == path and message in str(info.value)


@pytest.mark.anyio
@pytest.mark.parametrize(
    "tls, message",
    [
        ({"ca_dir": "MISSING", "service": "web"}, "no certificate"),
        ({"ca_dir": "CA"}, "needs `service`"),
        ({"ca": "CA/ca.crt", "cert": "CA/ca.crt"}, "`cert` and `key` go together"),
        ({"ca": "CA/ca.crt", "cert": "CA/ca.crt", "key": "CA/nope.key"}, "nope.key"),
        ({"ca": "CA/ca.crt", "cert": "CA/ca.crt", "key": "CA/ca.key"}, "not an X.509-SVID of a workload"),
        ({"ca": "CA/ca.crt", "cert": "LEAF", "key": "CA/ca.key"}, "does not belong"),
        ({"ca": "CA/ca.crt", "cert": "EXPIRED", "key": "EXPIRED_KEY"}, "expired"),
    ],
)
async def test_bad_material_fails_at_start(tls, message, ca_dir, kit, tmp_path):
    import datetime as dt

    leaf, _ = kit.write_leaf(ca_dir, tmp_path / "leaf", "web")
    past = dt.datetime.now(dt.UTC) - dt.timedelta(days=1)
    expired, expired_key = kit.write_leaf(ca_dir, tmp_path / "old", "web", now=past, ttl=60)
    names = {
        "MISSING": str(tmp_path / "missing"),
        "LEAF": str(leaf),
        "EXPIRED": str(expired),
        "EXPIRED_KEY": str(expired_key),
    }
    tls = {k: names.get(v, v.replace("CA", str(ca_dir))) for k, v in tls.items()}
    mesh = meshcore.Mesh({"tls": tls}, ["tls"])
    with pytest.raises(meshcore.ConfigError, match=message) as info:
        async with mesh:
            pass
    assert "PRIVATE KEY" not in str(info.value) and "BEGIN" not in str(info.value)


@pytest.mark.anyio
async def test_plugin_is_inert_without_a_tls_section(upstream):
    from meshcore.testing import static_service

    server = upstream()
    async with meshcore.Mesh({"services": {"orders": static_service([server])}}, ["tls"]) as mesh:
        assert mesh.plugins.client_tls("orders", mesh) is None
        assert mesh.plugins.server_tls(mesh) is None
        async with mesh.client() as client:
            assert (await client.get("http://orders/")).status_code == 200
        assert "tls" not in mesh.state()["services"]["orders"]


def test_a_path_that_cannot_be_judged_is_denied_and_escaped_slashes_need_both_spellings():
    """The sidecar normalizes before the policy; called with a raw path (another caller, or
    `path_with_escaped_slashes_action = "KEEP_UNCHANGED"`), the policy still never allows a
    spelling that an app decoding `%2F` resolves outside the rule."""
    policy = parse_rules([{"identities": [WEB], "paths": ["/orders"]}])
    assert "cannot be judged" in policy.check(WEB, "GET", "/orders#/../admin")
    assert "cannot be judged" in policy.check(WEB, "GET", "/orders\\x")
    assert policy.check(WEB, "GET", "/orders/..%2Fadmin") is not None  # decoded: /admin
    assert policy.check(WEB, "GET", "/orders/a%2Fb") is None  # both spellings under /orders
    assert policy.check(WEB, "GET", "/%6Frders/7") is None  # unreserved escapes decoded
