import pytest

from tests.factories import make_cluster, make_user


@pytest.mark.django_db
def test_factory_cluster_has_real_rows_on_every_server(mariadb_servers, unique_name):
    cluster = make_cluster(mariadb_servers, name=f"f{unique_name}", shards_per_instance=2)
    shards = list(cluster.shards.select_related("instance"))
    assert len(shards) == 6
    by_port = {s.endpoint.port: s for s in mariadb_servers}
    for shard in shards:
        server = by_port[shard.instance.port]
        assert server.execute("SELECT COUNT(*) FROM t_order", database=shard.database)[0][0] == 20
    assert make_user("operator").groups.filter(name="operator").exists()
