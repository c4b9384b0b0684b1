"""Which server is behind an address: the identity a MySQL or MariaDB server reports.

An approval covers the server it was given for (DESIGN.md, "Restores and approvals"), so
the plan records this identity and a run compares it before touching anything. MySQL
reports a `server_uuid` that it generates once per data directory and keeps across
restarts. MariaDB has none; there the identity is the server's own `hostname`, `port`,
`datadir` and `server_id`, which together tell apart two servers behind one address
(another machine answering, another instance moved to the port, a re-created data
directory on a new host) yet stay the same across restarts of one server.
"""

from __future__ import annotations

import pymysql

from backups.engine.errors import ConnectError
from backups.engine.mysql import Endpoint, connect

IDENTITY_READ_TIMEOUT_SECONDS = 10


def server_identity(endpoint: Endpoint) -> str:
    """`mysql:<server_uuid>` or `mariadb:<hostname>:<port>:<datadir>:<server_id>`.

    Raises ConnectError (one sentence) when the server cannot be reached or does not
    say who it is.
    """
    conn = connect(endpoint, read_timeout=IDENTITY_READ_TIMEOUT_SECONDS)
    try:
        with conn.cursor() as cur:
            try:
                cur.execute("SELECT @@global.server_uuid")
                row = cur.fetchone()
                if row and row[0]:
                    return f"mysql:{row[0]}"
            except pymysql.MySQLError:
                pass  # MariaDB: "Unknown system variable 'server_uuid'"
            cur.execute("SELECT @@hostname, @@port, @@datadir, @@server_id")
            row = cur.fetchone()
    except pymysql.MySQLError as exc:
        raise ConnectError(
            f"{endpoint.name} ({endpoint.address}) did not say which server it is: {exc}"
        ) from exc
    finally:
        conn.close()
    if not row or len(row) < 4 or any(value is None for value in row):
        raise ConnectError(f"{endpoint.name} ({endpoint.address}) did not say which server it is")
    hostname, port, datadir, server_id = row
    return f"mariadb:{hostname}:{port}:{datadir}:{server_id}"
