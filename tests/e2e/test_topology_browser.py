"""In the browser: log in, add an instance and a shard, test the connection, discover, see tables."""

from __future__ import annotations

import time

import pytest
from playwright.sync_api import expect

from backups.engine.mysql import quote_ident
from shards.models import Cluster, DiscoveryRun, Instance, Shard

pytestmark = pytest.mark.django_db(transaction=True)


def test_operator_registers_a_shard_and_discovers_its_tables(
    logged_in_page, mariadb_servers, unique_name, run_jobs
):
    server = mariadb_servers[0]
    database = f"e2e_{unique_name}"
    server.execute(
        f"CREATE DATABASE {quote_ident(database)}",
        f"CREATE TABLE {quote_ident(database)}.t_order_0 (id INT PRIMARY KEY) ENGINE=InnoDB",
        f"CREATE TABLE {quote_ident(database)}.{quote_ident('odd `näme`')} (a INT) ENGINE=InnoDB",
    )
    try:
        page = logged_in_page("operator")
        name = f"web{unique_name}"

        page.click("text=Clusters")
        page.click("text=New cluster")
        page.fill("#id_name", name)
        page.click("button:has-text('Save')")
        expect(page.locator("h1")).to_have_text(f"Cluster {name}")

        page.click("text=Add instance")
        page.fill("#id_name", "db1")
        page.fill("#id_host", "127.0.0.1")
        page.fill("#id_port", "70000")
        page.fill("#id_user", "root")
        page.click("button:has-text('Save')")
        # Inline validation: the form is re-rendered in place with the field's error.
        expect(page.locator("#errors-port")).to_contain_text("out of range")
        page.fill("#id_port", str(server.port))
        page.click("#test-connection")
        expect(page.locator("#connection-result")).to_contain_text(
            f"connected to db1 (127.0.0.1:{server.port})"
        )
        page.click("button:has-text('Save')")
        expect(page.locator("h1")).to_have_text(f"Cluster {name}")

        page.click("text=Add shard")
        page.fill("#id_name", "s00")
        page.select_option("#id_instance", "db1")
        page.fill("#id_database", database)
        page.click("button:has-text('Save')")
        expect(page.locator('[data-shard="s00"]')).to_contain_text("No tables known yet")

        page.click("#discover-button")
        expect(page.locator("#discovery-status")).to_contain_text("Discovery")
        cluster = Cluster.objects.get(name=name)
        deadline = time.monotonic() + 15
        while (
            not DiscoveryRun.objects.filter(cluster=cluster).exists()
            and time.monotonic() < deadline
        ):
            time.sleep(0.1)
        run_jobs("default")
        # Polling notices the finished job, stops, and swaps in the new grid.
        expect(page.locator('[data-table="t_order_0"]')).to_be_visible()
        expect(page.locator('[data-table="odd `näme`"]')).to_be_visible()
        expect(page.locator("[data-discovery-status]")).to_have_text("Last discovery succeeded")
        expect(page.locator(".findings")).to_contain_text("has no primary key")
    finally:
        server.execute(f"DROP DATABASE IF EXISTS {quote_ident(database)}")


def test_auditor_sees_the_topology_but_no_edit_controls(logged_in_page, live_server):
    cluster = Cluster.objects.create(name="readonly")
    instance = Instance.objects.create(cluster=cluster, name="i0", host="127.0.0.1", user="u")
    Shard.objects.create(cluster=cluster, name="s0", instance=instance, database="d0")
    page = logged_in_page("auditor")
    page.goto("/topology/clusters/readonly/")
    expect(page.locator('[data-shard="s0"]')).to_be_visible()
    expect(page.locator("#discover-button")).to_have_count(0)
    expect(page.locator("text=Add instance")).to_have_count(0)
    response = page.goto("/topology/clusters/readonly/instances/new/")
    assert response.status == 403
