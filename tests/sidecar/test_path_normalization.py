"""`meshcore.normalize_path`: the one spelling of a path that the policy judges and the sidecar
forwards (meshcore/_paths.py). Pure functions: examples from RFC 3986 and the Istio advisories,
and properties over generated paths."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st
from meshcore_tls._policy import normalize_path as policy_normal

from meshcore import PathRejected, has_escaped_slash, normalize_path, normalize_target
from meshcore._paths import ESCAPED_SLASH_ACTIONS, PATH_NORMALIZATIONS

NORMALIZING = [n for n in PATH_NORMALIZATIONS if n != "NONE"]


@pytest.mark.parametrize(
    "path, normal",
    [
        # RFC 3986 §5.4.2 abnormal examples, resolved against the root
        ("/a/b/c/./../../g", "/a/g"),
        ("/mid/content=5/../6", "/mid/6"),
        ("/a/b/..", "/a/"),
        ("/..", "/"),
        ("/../../g", "/g"),
        ("/g.", "/g."),
        ("/.g", "/.g"),
        ("/g..", "/g.."),
        ("/..g", "/..g"),
        ("/./../g", "/g"),
        ("/./g/.", "/g/"),
        # unreserved escapes decoded (§2.3), others upper-cased (§6.2.2.1)
        ("/%61dmin", "/admin"),
        ("/%7Euser/%7e", "/~user/~"),
        ("/public/%2e%2e/admin", "/admin"),
        ("/public/.%2E/admin", "/admin"),
        ("/x%3bp", "/x%3Bp"),
        ("/public/%252e%252e/admin", "/public/%252e%252e/admin"),  # decoded once, by the app
        ("//admin", "//admin"),  # BASE keeps empty segments
        ("/public//../admin", "/public/admin"),
        ("*", "*"),
    ],
)
def test_base_normalization(path, normal):
    assert normalize_path(path) == normal


@pytest.mark.parametrize(
    "path, why",
    [
        ("/admin#x", "'#'"),
        ("/public#/../admin", "'#'"),
        ("/public\\..\\admin", "backslash"),
        ("/admin%2fx", "escaped slash"),
        ("/public/..%2Fadmin", "escaped slash"),
        ("/public/..%5cadmin", "escaped slash"),
        ("/public/..;/admin", "dot segment with parameters"),
        ("/public/%2e%2e;x/admin", "dot segment with parameters"),
        ("/x%zz", "malformed"),
        ("/x%4", "malformed"),
        ("admin", "does not start with '/'"),
    ],
)
def test_what_cannot_be_judged_is_refused(path, why):
    with pytest.raises(PathRejected, match=why):
        normalize_path(path)


def test_escaped_slash_actions_and_modes():
    path = "/public/..%2fadmin"
    assert normalize_path(path, "BASE", "KEEP_UNCHANGED") == "/public/..%2Fadmin"
    assert normalize_path(path, "BASE", "UNESCAPE_AND_FORWARD") == "/admin"
    assert normalize_path(path, "BASE", "UNESCAPE_AND_REDIRECT") == "/admin"
    assert normalize_path("/a%5Cb", "BASE", "UNESCAPE_AND_FORWARD") == "/a/b"
    # Istio's DECODE_AND_MERGE_SLASHES decodes escaped slashes whatever the action says
    assert normalize_path("/a%2F%2fb", "DECODE_AND_MERGE_SLASHES") == "/a/b"
    assert normalize_path("//a//b/", "MERGE_SLASHES") == "/a/b/"
    assert normalize_path("/a/../%61", "NONE") == "/a/../%61"
    with pytest.raises(PathRejected):
        normalize_path("/a#b", "NONE")
    assert has_escaped_slash("/a%2fb") and has_escaped_slash("/a%5C") and not has_escaped_slash("/a%25")


def test_target_keeps_the_query_as_sent():
    assert normalize_target("/a/./b/../c?x=/../y&z=%2f") == "/a/c?x=/../y&z=%2f"
    with pytest.raises(PathRejected):
        normalize_target("/a?b#c")


def test_unknown_setting_names_the_choices():
    with pytest.raises(ValueError, match="MERGE_SLASHES"):
        normalize_path("/", "merge")
    with pytest.raises(ValueError, match="KEEP_UNCHANGED"):
        normalize_path("/", "BASE", "keep")


paths = st.text(alphabet="/.%25fFcCeE2a\\;#?x", max_size=40).map(lambda s: "/" + s)
modes = st.sampled_from(PATH_NORMALIZATIONS)
actions = st.sampled_from(ESCAPED_SLASH_ACTIONS)


@given(paths, modes, actions)
def test_idempotent(path, mode, action):
    try:
        once = normalize_target(path, mode, action)
    except PathRejected:
        return
    assert normalize_target(once, mode, action) == once


@given(paths, st.sampled_from(NORMALIZING), actions)
def test_never_leaves_dot_segments_or_unsafe_characters(path, mode, action):
    try:
        normal = normalize_path(path.partition("?")[0], mode, action)
    except PathRejected:
        return
    segments = normal.split("/")
    assert ".." not in segments and "." not in segments
    assert "\\" not in normal and "#" not in normal
    if action != "KEEP_UNCHANGED":
        assert not has_escaped_slash(normal)
    if mode != "BASE":
        assert "//" not in normal


@given(paths, st.sampled_from(NORMALIZING), actions)
def test_the_policy_judges_what_is_forwarded(path, mode, action):
    """What the sidecar forwards normalizes, under the policy's own rules, to itself: the
    policy judges exactly the path the app receives."""
    try:
        forwarded = normalize_path(path.partition("?")[0], mode, action)
    except PathRejected:
        return
    assert policy_normal(forwarded) == forwarded
