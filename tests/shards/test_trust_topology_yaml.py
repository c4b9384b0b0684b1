"""Issue 12, item 17 (follow-up): YAML anchors and aliases cannot blow a topology file up.

An alias repeats a node wherever it is named, so a short file could stand for millions of
clusters, shards or values ("billion laughs"). Topology files need neither anchors nor
aliases: the parser refuses the first one, quickly, in one sentence naming its line."""

from __future__ import annotations

import io
import time

import pytest

from shards.topology_file import TopologyFileError, parse_topology


def _amplified(shards: int, clusters: int) -> str:
    """~50 KB that, with aliases followed, lists `shards * clusters` valid shards."""
    listed = ", ".join(f"{{name: s{i}, instance: m0, database: d{i}}}" for i in range(shards))
    lines = [
        "clusters:",
        "  - {name: c0, instances: &I [{name: m0, host: 127.0.0.1, user: u}],"
        f" shards: &S [{listed}]}}",
    ]
    lines += [f"  - {{name: c{k}, instances: *I, shards: *S}}" for k in range(1, clusters)]
    return "\n".join(lines) + "\n"


def _billion_laughs() -> str:
    """The classic: ten levels of ten aliases each, 10**10 'lol's once expanded."""
    lines = ["x0: &x0 [lol, lol, lol, lol, lol, lol, lol, lol, lol, lol]"]
    for level in range(1, 10):
        lines.append(f"x{level}: &x{level} [" + ", ".join([f"*x{level - 1}"] * 10) + "]")
    lines += ["clusters:", "  - name: c", "    description: *x9"]
    return "\n".join(lines) + "\n"


def _refusal(text: str) -> tuple[str, float]:
    started = time.monotonic()
    with pytest.raises(TopologyFileError) as refused:
        parse_topology(text)
    return str(refused.value), time.monotonic() - started


def test_an_alias_amplified_file_is_refused_at_once_instead_of_expanding():
    """Before: this 50 KB file parsed into 100,000 shards (and took tens of seconds)."""
    text = _amplified(shards=1000, clusters=100)
    assert len(text) < 60_000
    message, seconds = _refusal(text)
    assert seconds < 2, seconds
    assert message.startswith("line 2: ") and "anchor &I" in message
    assert "may not use anchors or aliases" in message and "\n" not in message


def test_a_billion_laughs_file_is_refused_quickly_in_one_sentence():
    message, seconds = _refusal(_billion_laughs())
    assert seconds < 2, seconds
    assert message.startswith("line 1: ") and "anchor &x0" in message
    assert "may not use anchors or aliases" in message and "\n" not in message


def test_an_ordinary_file_still_parses():
    document = parse_topology(
        "clusters:\n"
        "  - name: shop\n"
        "    instances:\n"
        "      - {name: m0, host: 127.0.0.1, user: backup, password_env: SHOP_PW}\n"
        "    shards:\n"
        "      - {name: s0, instance: m0, database: shop_0}\n"
        "      - {name: s1, instance: m0, database: shop_1}\n"
    )
    (cluster,) = document.clusters
    assert [s.name for s in cluster.shards] == ["s0", "s1"]
    with pytest.raises(TopologyFileError, match="shard 's0' appears twice"):
        parse_topology(
            "clusters:\n  - name: shop\n    instances: [{name: m0, host: h, user: u}]\n"
            "    shards:\n      - {name: s0, instance: m0, database: a}\n"
            "      - {name: s0, instance: m0, database: b}\n"
        )


@pytest.mark.django_db
def test_the_import_command_and_page_refuse_an_alias_amplified_file(tmp_path, client):
    from django.core.files.uploadedfile import SimpleUploadedFile
    from django.core.management import call_command
    from django.core.management.base import CommandError
    from django.urls import reverse

    from shards.models import Cluster
    from tests.factories import make_user

    text = _amplified(shards=200, clusters=50)
    path = tmp_path / "amplified.yaml"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(CommandError) as refused:
        call_command("topology", "import", str(path), stdout=io.StringIO())
    assert "may not use anchors or aliases" in str(refused.value)
    assert "\n" not in str(refused.value)

    client.force_login(make_user("operator"))
    upload = SimpleUploadedFile("amplified.yaml", text.encode(), "application/yaml")
    response = client.post(reverse("shards:topology_import"), {"file": upload})
    assert response.status_code == 200
    assert "may not use anchors or aliases" in response.content.decode()
    assert not Cluster.objects.filter(name__in=["c0", "c1"]).exists()
