"""py-consul's OWN test suite, run against the embedded registry.

The sdist of py-consul ships its tests; their fixtures start a Consul agent in Docker. This
test fetches the sdist with pip (nothing is vendored), replaces the root conftest (the Docker
part) with fixtures that start an embedded `Registry` per test instead, and runs the in-scope
test modules: the agent, catalog, health and status APIs. The tests expected to pass are
listed by name below (docs/registry.md says why each of the others is out of scope), so a
regression fails here, and so does a newly passing test until the list is updated.
"""

from __future__ import annotations

import subprocess
import sys
import tarfile
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from meshcore.testing import strict_integration

PY_CONSUL = "py-consul==1.8.0"  # the release the list below was made with
IN_SCOPE = ["tests/api/test_agent.py", "tests/api/test_catalog.py", "tests/api/test_health.py",
            "tests/api/test_status.py"]

# Passing tests of the in-scope modules (class.test). The rest: see docs/registry.md.
EXPECTED_PASS = {
    "TestAgent.test_agent_checks_service_id",
    "TestAgent.test_agent_force_leave_prune",
    "TestAgent.test_agent_members",
    "TestAgent.test_agent_node_maintenance",
    "TestAgent.test_agent_register_check_no_service_id",
    "TestAgent.test_agent_register_enable_tag_override",
    "TestAgent.test_agent_self",
    "TestAgent.test_agent_service_maintenance",
    "TestAgent.test_agent_service_tagged_addresses",
    "TestAgent.test_agent_services",
    "TestAgent.test_agent_services_and_checks_filter",
    "TestAgent.test_agent_token_invalid_type",
    "TestAgent.test_service_dereg_issue_156",
    "TestCatalog.test_catalog_service_peer_unknown",
    "TestHealth.test_health_checks",
    "TestHealth.test_health_checks_filter",
    "TestHealth.test_health_connect",
    "TestHealth.test_health_ingress",
    "TestHealth.test_health_node",
    "TestHealth.test_health_node_filter",
    "TestHealth.test_health_service",
    "TestHealth.test_health_service_filter",
    "TestHealth.test_health_service_merge_central_config",
    "TestHealth.test_health_service_peer",
    "TestHealth.test_health_state",
    "TestHealth.test_health_state_filter",
    "TestStatus.test_status_leader",
    "TestStatus.test_status_peers",
}

# Stands in for py-consul's root conftest.py, which starts `hashicorp/consul` containers:
# the same fixture names, backed by an embedded registry per test (open like `consul agent
# -dev`, or with the given management token like its ACL fixture).
CONFTEST = '''
import collections
import os
import uuid

import pytest
import requests
from meshcore_consul import Registry

ConsulInstance = collections.namedtuple("ConsulInstance", ["container", "port", "version"])


@pytest.fixture(scope="session", autouse=True)
def _unset_consul_token():
    os.environ.pop("CONSUL_HTTP_TOKEN", None)


def _instance(registry):
    version = requests.get(f"{registry.url}/v1/agent/self", timeout=10).json()["Config"]["Version"]
    return ConsulInstance(None, registry.port, version)


@pytest.fixture
def consul_instance():
    with Registry(port=0, open_access=True) as registry:
        yield _instance(registry)


@pytest.fixture
def acl_consul_instance():
    token = uuid.uuid4().hex
    with Registry(port=0, token=token) as registry:
        yield _instance(registry), token


@pytest.fixture
def consul_port(consul_instance):
    return consul_instance.port, consul_instance.version
'''


def _fetch(dest: Path) -> Path:
    """py-consul's sdist, fetched by pip; skips (or fails under strict integration) offline."""
    result = subprocess.run(
        [sys.executable, "-m", "pip", "download", "--no-binary", ":all:", "--no-deps", "--quiet",
         PY_CONSUL, "-d", str(dest)],
        capture_output=True, text=True, timeout=300,
    )
    archives = sorted(dest.glob("py_consul-*.tar.gz"))
    if result.returncode != 0 or not archives:
        message = f"cannot fetch the {PY_CONSUL} sdist with pip: {result.stderr.strip()[-500:]}"
        if strict_integration():
            pytest.fail(message)
        pytest.skip(message)
    return archives[0]


def run_suite(tmp_path: Path) -> dict[str, str]:
    """{"Class.test": "passed" | "failed" | "skipped"} for the in-scope modules."""
    archive = _fetch(tmp_path / "dist")
    src = tmp_path / "src"
    with tarfile.open(archive) as tar:
        members = [m for m in tar.getmembers() if "/tests/" in m.name and m.isfile()]
        tar.extractall(src, members=members, filter="data")
    [root] = [p for p in src.iterdir() if p.is_dir()]
    (root / "conftest.py").write_text(CONFTEST)
    report = tmp_path / "report.xml"
    subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:randomly",
         "--rootdir", str(root), f"--junitxml={report}", "-o", "addopts=", *IN_SCOPE],
        cwd=root, capture_output=True, text=True, timeout=900,
    )
    outcomes: dict[str, str] = {}
    for case in ET.parse(report).getroot().iter("testcase"):
        name = f"{case.get('classname', '').rsplit('.', 1)[-1]}.{case.get('name')}"
        if case.find("failure") is not None or case.find("error") is not None:
            outcomes[name] = "failed"
        elif case.find("skipped") is not None:
            outcomes[name] = "skipped"
        else:
            outcomes[name] = "passed"
    return outcomes


def test_py_consul_own_suite_in_scope_tests_pass(tmp_path):
    outcomes = run_suite(tmp_path)
    passed = {name for name, outcome in outcomes.items() if outcome == "passed"}
    print(f"py-consul {PY_CONSUL}: {len(passed)} of {len(outcomes)} in-scope tests pass")
    assert outcomes, "py-consul's suite ran no tests"
    assert EXPECTED_PASS - passed == set(), "expected to pass, but did not"
    assert passed - EXPECTED_PASS == set(), "pass now: add them to EXPECTED_PASS and docs/registry.md"
