import pytest


@pytest.mark.django_db
def test_login_page_renders_and_dashboard_requires_login(client):
    response = client.get("/")
    assert response.status_code == 302
    assert "/login/" in response["Location"]
    assert b"Sign in" in client.get("/login/").content


def test_mariadb_servers_have_row_binlogs(mariadb_servers):
    ids = {s.execute("SELECT @@server_id")[0][0] for s in mariadb_servers}
    assert len(ids) == 3
    assert mariadb_servers[0].execute("SELECT @@binlog_format")[0][0] == "ROW"
