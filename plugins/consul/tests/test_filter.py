"""Consul's `?filter=` language (go-bexpr) as the registry evaluates it on answer items."""

from __future__ import annotations

import pytest
from meshcore_consul import RegistryError
from meshcore_consul._filter import compile_filter

ENTRY = {
    "Node": {"Node": "n1", "Meta": {}},
    "Service": {"ID": "web-1", "Tags": ["prod", "v2"], "Meta": {"env": "prod"}, "Port": 8080,
                "EnableTagOverride": False},
    "Checks": [{"CheckID": "serfHealth", "Status": "passing"}, {"CheckID": "service:web-1", "Status": "critical"}],
}


@pytest.mark.parametrize(
    ("expression", "expected"),
    [
        ('"prod" in Service.Tags', True),
        ('"dev" in Service.Tags', False),
        ('"dev" not in Service.Tags', True),
        ('Service.Tags contains "v2"', True),
        ('Service.Tags not contains "v2"', False),
        ("Service.Meta.env == prod", True),
        ('Service.Meta["env"] == "prod"', True),
        ("Service.Meta.zone is empty", True),  # a map's missing key is empty
        ("Service.Tags is not empty", True),
        ("Service.Port == 8080", True),
        ("Service.Port != 8080", False),
        ("Service.EnableTagOverride == false", True),
        ('Service.ID matches "^web-[0-9]+$"', True),
        ('Service.ID not matches "^db"', True),
        ("Checks.Status == critical", True),  # through a list: any element
        ("Checks.CheckID == `serfHealth`", True),
        ('Node.Node == "n1" and (Service.Port == 1 or not Service.ID == "x")', True),
        ('not ("prod" in Service.Tags)', False),
    ],
)
def test_expressions(expression, expected):
    predicate = compile_filter(expression)
    assert predicate is not None and predicate(ENTRY) is expected


@pytest.mark.parametrize(
    ("expression", "message"),
    [
        ("", "empty expression"),
        ("not a valid expression((", "expected an operator"),
        ("Service.ID ==", "expected a value"),
        ('(Service.ID == "x"', "missing closing parenthesis"),
        ("Service.ID > 3", "unexpected input"),
        ('Service.ID matches "("', "invalid regular expression"),
        ('Service.ID == "x" extra', "unexpected 'extra'"),
    ],
)
def test_bad_expressions_are_400(expression, message):
    with pytest.raises(RegistryError) as info:
        compile_filter(expression)
    assert info.value.status == 400 and message in info.value.message


def test_a_field_the_answer_lacks_is_400_not_false():
    predicate = compile_filter('Service.Nope == "x"')
    assert predicate is not None
    with pytest.raises(RegistryError, match='Selector "Service.Nope" is not valid'):
        predicate(ENTRY)


def test_no_filter_is_none():
    assert compile_filter(None) is None
