"""Topology uploads are bounded (issue 12, item 17): a size limit on the page and the command,
and logical-table patterns that cannot hang a worker or a page with catastrophic backtracking."""

from __future__ import annotations

import io
import time

import pytest
from django.core.files.uploadedfile import SimpleUploadedFile
from django.core.management import call_command
from django.core.management.base import CommandError
from django.urls import reverse

from shards.models import Cluster
from shards.table_patterns import PatternError, pattern_fullmatch
from shards.topology_file import MAX_TOPOLOGY_BYTES, TopologyFileError, parse_topology
from tests.factories import make_user

pytestmark = pytest.mark.django_db

CATASTROPHIC = "(a|aa)+"


def _big_file(name: str) -> str:
    head = f"clusters:\n  - name: {name}\n    description: "
    return head + "x" * (MAX_TOPOLOGY_BYTES - len(head) + 10) + "\n"


def test_the_import_page_refuses_an_oversized_file_with_one_sentence(client, unique_name):
    client.force_login(make_user("operator"))
    name = f"big{unique_name}"
    upload = SimpleUploadedFile("big.yaml", _big_file(name).encode(), "application/yaml")
    response = client.post(reverse("shards:topology_import"), {"file": upload})
    html = response.content.decode()
    assert response.status_code == 200
    assert "larger than 1024 KiB" in html
    assert not Cluster.objects.filter(name=name).exists()


def test_the_import_command_refuses_an_oversized_file(tmp_path, unique_name):
    path = tmp_path / "big.yaml"
    name = f"big{unique_name}"
    path.write_text(_big_file(name), encoding="utf-8")
    with pytest.raises(CommandError) as refused:
        call_command("topology", "import", str(path), stdout=io.StringIO())
    assert "larger than 1024 KiB" in str(refused.value) and "\n" not in str(refused.value)
    assert not Cluster.objects.filter(name=name).exists()


@pytest.mark.parametrize("pattern", [CATASTROPHIC, "(x+x+)+y" * 40])
def test_catastrophic_or_overlong_logical_table_patterns_are_refused_quickly(pattern):
    text = (
        "clusters:\n  - name: c1\n    instances: []\n"
        f"    logical_tables:\n      - {{name: t, pattern: '{pattern}'}}\n"
    )
    started = time.monotonic()
    with pytest.raises(TopologyFileError) as refused:
        parse_topology(text)
    assert time.monotonic() - started < 5
    assert "logical table 't'" in str(refused.value)


def test_matching_a_catastrophic_pattern_stored_earlier_stops_with_a_sentence():
    """A pattern saved before the rule: matching it times out instead of hanging."""
    started = time.monotonic()
    with pytest.raises(PatternError) as refused:
        pattern_fullmatch(CATASTROPHIC + "$", "a" * 60 + "!")
    assert time.monotonic() - started < 5
    assert "took too long" in str(refused.value)
    assert pattern_fullmatch("t_order_[0-9]+", "t_order_12")
    assert not pattern_fullmatch("t_order_[0-9]+", "t_order_x")
