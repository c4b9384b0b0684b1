"""The role matrix: every named URL of the project against every role, allowed or 403.

Data-driven over the URL resolver, so a view someone adds later is covered
automatically, and the test fails loudly until its expectation is written here.
"""

from __future__ import annotations

import pytest
from django.test import Client
from django.urls import URLPattern, URLResolver, get_resolver, reverse

from console.roles import ADMIN, APPROVER, AUDITOR, OPERATOR
from shards.models import Cluster, DiscoveryRun, Instance, Shard
from tests.factories import make_user

pytestmark = pytest.mark.django_db

ALL = frozenset({OPERATOR, APPROVER, AUDITOR, ADMIN})
OPS = frozenset({OPERATOR, ADMIN})
APPROVERS = frozenset({APPROVER, ADMIN})
AUDITORS = frozenset({AUDITOR, ADMIN})

# URL name -> (HTTP method to try, roles allowed through). Every other role must get 403.
# Where a view lets every role in and its service decides (restore approve/reject), the
# service's own tests prove the rule; here it is ALL.
EXPECTATIONS: dict[str, tuple[str, frozenset]] = {
    "dashboard": ("GET", ALL),
    "shards:cluster_list": ("GET", ALL),
    "shards:cluster_detail": ("GET", ALL),
    "shards:topology_export": ("GET", ALL),
    "shards:discovery_progress": ("GET", ALL),
    "shards:cluster_create": ("GET", OPS),
    "shards:cluster_edit": ("GET", OPS),
    "shards:topology_import": ("GET", OPS),
    "shards:instance_create": ("GET", OPS),
    "shards:instance_edit": ("GET", OPS),
    "shards:instance_test": ("POST", OPS),
    "shards:shard_create": ("GET", OPS),
    "shards:shard_edit": ("GET", OPS),
    "shards:shard_test": ("POST", OPS),
    "shards:discovery_start": ("POST", OPS),
    "backups:set_list": ("GET", ALL),
    "backups:set_detail": ("GET", ALL),
    "backups:set_progress": ("GET", ALL),
    "backups:set_shards": ("GET", ALL),
    "backups:set_quality": ("GET", ALL),
    "backups:set_start": ("POST", OPS),
    "backups:set_cancel": ("POST", OPS),
    "backups:verify_start": ("POST", OPS),
    "backups:set_hold": ("POST", OPS),
    "backups:set_release": ("POST", frozenset({ADMIN})),
    "backups:policy": ("GET", frozenset({ADMIN})),
    "backups:policy_validate": ("POST", frozenset({ADMIN})),
    "backups:transactions": ("GET", ALL),
    "backups:storage_targets": ("GET", frozenset({ADMIN})),
    "backups:key_ids": ("GET", frozenset({ADMIN})),
    "restores:request_list": ("GET", ALL),
    "restores:request_detail": ("GET", ALL),
    "restores:run_progress": ("GET", ALL),
    "restores:inbox": ("GET", APPROVERS),
    "restores:request_new": ("GET", OPS),
    "restores:flashback_new": ("GET", OPS),
    "restores:flashback_artifact": ("GET", ALL),
    "restores:request_approve": ("POST", ALL),
    "restores:request_reject": ("POST", ALL),
    "restores:run_start": ("POST", OPS),
    "restores:run_cancel": ("POST", OPS),
    "audit_log": ("GET", AUDITORS),
    "audit_export": ("GET", AUDITORS),
    "reports": ("GET", AUDITORS),
}
# Reachable without a role (and without logging in).
PUBLIC = {
    "login",
    "logout",
    "metrics",
}  # metrics: its own bearer token (tests/backups/test_metrics.py)
# The Django admin has its own login and is checked separately below.
SKIPPED_NAMESPACES = {"admin"}


def named_urls() -> dict[str, URLPattern]:
    found: dict[str, URLPattern] = {}

    def walk(resolver, namespace: str | None):
        for pattern in resolver.url_patterns:
            if isinstance(pattern, URLResolver):
                inner = pattern.namespace
                if inner in SKIPPED_NAMESPACES:
                    continue
                walk(pattern, f"{namespace}:{inner}" if namespace and inner else inner or namespace)
            elif pattern.name:
                found[f"{namespace}:{pattern.name}" if namespace else pattern.name] = pattern

    walk(get_resolver(), None)
    return found


@pytest.fixture
def topology():
    cluster = Cluster.objects.create(name="matrix")
    instance = Instance.objects.create(
        cluster=cluster, name="i0", host="127.0.0.1", port=1, user="u"
    )
    shard = Shard.objects.create(cluster=cluster, name="s0", instance=instance, database="d0")
    run = DiscoveryRun.objects.create(cluster=cluster, status="succeeded")
    return {"cluster": cluster.name, "instance": instance.name, "shard": shard.name, "run": run.pk}


def _url(name: str, pattern: URLPattern, sample: dict) -> str:
    kwargs = {}
    for key, converter in pattern.pattern.converters.items():
        if key in sample:
            kwargs[key] = sample[key]
        else:
            # Objects of other apps need not exist: the role check comes before the lookup.
            kwargs[key] = 999_999 if converter.regex == "[0-9]+" else "x"
    return reverse(name, kwargs=kwargs)


def test_every_named_url_has_an_expectation():
    missing = sorted(set(named_urls()) - set(EXPECTATIONS) - PUBLIC)
    assert not missing, (
        f"views without a role expectation: {missing}; add each to EXPECTATIONS in "
        "tests/console/test_roles.py with the roles that may use it"
    )
    stale = sorted(set(EXPECTATIONS) - set(named_urls()))
    assert not stale, f"expectations for URLs that no longer exist: {stale}"


@pytest.mark.parametrize("role", [OPERATOR, APPROVER, AUDITOR, ADMIN, None])
def test_role_matrix(role, topology):
    client = Client()
    client.force_login(make_user(role))
    problems = []
    for name, pattern in sorted(named_urls().items()):
        if name in PUBLIC:
            continue
        method, allowed = EXPECTATIONS[name]
        url = _url(name, pattern, topology)
        response = client.post(url) if method == "POST" else client.get(url)
        if role in allowed:
            if response.status_code == 403 or response.status_code >= 500:
                problems.append(
                    f"{role} should be allowed {method} {name} ({url}), got {response.status_code}"
                )
        elif response.status_code != 403:
            problems.append(
                f"{role or 'a user without a role'} should get 403 on {method} {name}, got {response.status_code}"
            )
    assert not problems, "\n".join(problems)


def test_anonymous_users_are_sent_to_login_everywhere(topology):
    client = Client()
    for name, pattern in named_urls().items():
        if name in PUBLIC:
            continue
        method, _ = EXPECTATIONS[name]
        url = _url(name, pattern, topology)
        response = client.post(url) if method == "POST" else client.get(url)
        assert response.status_code == 302 and "/login/" in response["Location"], name


@pytest.mark.parametrize("role", [OPERATOR, APPROVER, AUDITOR, ADMIN])
def test_django_admin_is_for_the_admin_role_only(role):
    client = Client()
    client.force_login(make_user(role))
    response = client.get(reverse("admin:index"))
    if role == ADMIN:
        assert response.status_code == 200
    else:
        assert response.status_code == 302 and "/admin/login/" in response["Location"]
