"""Secure by default: a write token made at first start and kept 0600 in the data directory,
clients that find it there or in the environment, read protection, and running open only
when asked (with a warning)."""

from __future__ import annotations

import logging
import os
import stat

import anyio
import httpx
import pytest
from consul_testkit import ports, register
from meshcore_consul import Registry, TokenFileError, registration_of

TOKEN_FILE = "acl-token"


def test_first_start_makes_a_0600_token_that_later_starts_reuse(tmp_path):
    data = tmp_path / "data"
    with Registry(port=0, data_dir=data) as first:
        assert first.token_created and len(first.token) >= 40
        info = os.stat(data / TOKEN_FILE)
        assert stat.S_IMODE(info.st_mode) == 0o600
        assert stat.S_IMODE(os.stat(data).st_mode) == 0o700
        token = first.token
    with Registry(port=0, data_dir=data) as again:
        assert again.token == token and not again.token_created


def test_writes_need_the_token_by_default_reads_do_not(tmp_path):
    with Registry(port=0, data_dir=tmp_path) as reg, httpx.Client(base_url=reg.url) as http:
        body = {"Name": "web", "Port": 80}
        r = http.put("/v1/agent/service/register", json=body)
        assert r.status_code == 403 and "Permission denied" in r.text
        r = http.put("/v1/agent/service/deregister/web", headers={"X-Consul-Token": reg.token[:-1] + "x"})
        assert (r.status_code, r.text) == (403, "ACL not found")
        assert http.put("/v1/agent/service/register", json=body,
                        headers={"X-Consul-Token": reg.token}).status_code == 200
        assert http.get("/v1/health/service/web").status_code == 200
        assert reg.catalog.services.keys() == {"web"}


def test_an_in_memory_registry_has_a_token_too():
    with Registry(port=0) as reg, httpx.Client(base_url=reg.url) as http:
        assert reg.token and reg.token_file is None
        assert http.put("/v1/agent/service/register", json={"Name": "web"}).status_code == 403


def test_a_planted_symlink_is_not_followed(tmp_path):
    target = tmp_path / "attacker-owned"
    target.write_text("known-token\n")
    data = tmp_path / "data"
    data.mkdir()
    (data / TOKEN_FILE).symlink_to(target)
    with pytest.raises(TokenFileError, match="symbolic link"):
        Registry(port=0, data_dir=data)


def test_a_token_file_others_can_read_is_refused_with_the_fix(tmp_path):
    (tmp_path / TOKEN_FILE).write_text("tok\n")
    os.chmod(tmp_path / TOKEN_FILE, 0o644)
    with pytest.raises(TokenFileError, match=r"mode 644\); run `chmod 600 "):
        Registry(port=0, data_dir=tmp_path)


def test_running_open_is_explicit_and_warns(caplog):
    with caplog.at_level(logging.WARNING, logger="meshcore_consul.registry"):
        with Registry(port=0, open_access=True) as reg, httpx.Client(base_url=reg.url) as http:
            assert reg.token is None
            assert http.put("/v1/agent/service/register", json={"Name": "web"}).status_code == 200
    assert any("runs OPEN" in r.getMessage() for r in caplog.records)
    with pytest.raises(ValueError, match="open_access"):
        Registry(port=0, open_access=True, token="x")


def test_read_protection_is_consul_default_policy_deny():
    with Registry(port=0, token="t", read_protected=True) as reg, httpx.Client(base_url=reg.url) as http:
        r = http.get("/v1/health/service/web")
        assert r.status_code == 403 and "service:read" in r.text
        assert http.get("/v1/catalog/services", headers={"Authorization": "Bearer t"}).status_code == 200
        r = http.get("/v1/health/service/web", headers={"X-Consul-Token": "t"})
        assert r.status_code == 200 and r.headers["x-consul-default-acl-policy"] == "deny"
        assert http.get("/v1/status/leader").status_code == 200  # as Consul: status needs no token


@pytest.mark.anyio
async def test_registration_reads_the_token_file(tmp_path, mesh_factory, monkeypatch):
    monkeypatch.delenv("CONSUL_HTTP_TOKEN", raising=False)
    monkeypatch.delenv("MESHCORE_REGISTRY_TOKEN", raising=False)
    with Registry(port=0, data_dir=tmp_path / "reg") as registry:
        config = {"consul-registration": {"agent": registry.url, "name": "orders", "address": "127.0.0.1",
                                          "port": 8123, "token_file": str(registry.token_file)}}
        async with mesh_factory(config, plugins=["consul"]) as mesh:
            assert registration_of(mesh).status == "registered"
            assert "orders-127.0.0.1-8123" in registry.catalog.services


@pytest.mark.anyio
async def test_registration_finds_the_default_data_directory(tmp_path, mesh_factory, monkeypatch):
    monkeypatch.delenv("CONSUL_HTTP_TOKEN", raising=False)
    monkeypatch.delenv("MESHCORE_REGISTRY_TOKEN", raising=False)
    monkeypatch.chdir(tmp_path)  # where `meshcore registry` ran with its default --data-dir
    with Registry(port=0, data_dir=tmp_path / ".meshcore-registry") as registry:
        config = {"consul-registration": {"agent": registry.url, "name": "orders", "port": 8123}}
        async with mesh_factory(config, plugins=["consul"]) as mesh:
            assert registration_of(mesh).status == "registered"


@pytest.mark.anyio
async def test_discovery_of_a_read_protected_registry_uses_the_environment(consul_mesh, watcher, monkeypatch):
    monkeypatch.delenv("CONSUL_HTTP_TOKEN", raising=False)
    monkeypatch.setenv("MESHCORE_REGISTRY_TOKEN", "r-token")
    with Registry(port=0, token="r-token", read_protected=True) as registry:
        register(registry, "api", 7001, ttl="30s")
        async with consul_mesh(registry.url):
            await watcher.until("api", lambda snap: ports(snap) == {7001})
        monkeypatch.setenv("MESHCORE_REGISTRY_TOKEN", "wrong")
        async with consul_mesh(registry.url, backoff=0.01) as mesh:
            status = mesh.upstreams["api"].discovery_status
            with anyio.fail_after(5):
                while status.errors < 1:
                    await anyio.sleep(0.01)
            assert "403" in status.last_error and "ACL not found" in status.last_error


@pytest.mark.anyio
async def test_a_bad_token_file_is_a_config_error_naming_the_key(tmp_path, mesh_factory):
    import meshcore

    (tmp_path / "tok").write_text("x\n")
    os.chmod(tmp_path / "tok", 0o640)
    config = {"consul-registration": {"name": "orders", "port": 8123, "token_file": str(tmp_path / "tok")}}
    with pytest.raises(meshcore.ConfigError, match=r"consul-registration\.token_file: .*chmod 600"):
        async with mesh_factory(config, plugins=["consul"]):
            pass
