"""The one MySQL connection helper and the one SQL identifier quoter.

Plain Python (no Django): the engine, the commands and the pages all connect
through `connect()` and quote every database, table and column name with
`quote_ident()`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import pymysql
import pymysql.constants.CLIENT as CLIENT
from pymysql.constants import ER

from backups.engine.errors import ConnectError

CONNECT_TIMEOUT_SECONDS = 5


@dataclass(frozen=True)
class Endpoint:
    """Where and as whom to connect to one MySQL/MariaDB server."""

    name: str
    host: str
    port: int
    user: str
    password: str = field(default="", repr=False)
    tls_ca: str = ""
    tls_verify: bool = False

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"


def quote_ident(name: str) -> str:
    """Quote one SQL identifier (database, table, column) with backticks.

    Backticks inside the name are doubled, which is the only escaping MySQL
    identifiers have; NUL cannot appear in an identifier and is refused.
    """
    if not isinstance(name, str) or name == "":
        raise ValueError("an SQL identifier must be a non-empty string")
    if "\x00" in name:
        raise ValueError("an SQL identifier cannot contain a NUL character")
    return "`" + name.replace("`", "``") + "`"


def quote_qualified(database: str, table: str) -> str:
    """`db`.`table`, each part quoted."""
    return f"{quote_ident(database)}.{quote_ident(table)}"


def connect(
    endpoint: Endpoint,
    database: str | None = None,
    *,
    connect_timeout: int = CONNECT_TIMEOUT_SECONDS,
    read_timeout: int | None = None,
    write_timeout: int | None = None,
    local_infile: bool = False,
    autocommit: bool = True,
    streaming: bool = False,
) -> pymysql.connections.Connection:
    """Open a connection, translating failures into `ConnectError` with a clear sentence.

    `streaming=True` returns rows unbuffered (SSCursor) so large results are never
    held whole in memory. Sessions always use UTC (`time_zone='+00:00'`) and binary-safe
    utf8mb4.
    """
    ssl = None
    if endpoint.tls_ca:
        ssl = {"ca": endpoint.tls_ca, "check_hostname": endpoint.tls_verify}
    try:
        conn = pymysql.connect(
            host=endpoint.host,
            port=int(endpoint.port),
            user=endpoint.user,
            password=endpoint.password or "",
            database=database,
            connect_timeout=connect_timeout,
            read_timeout=read_timeout,
            write_timeout=write_timeout,
            charset="utf8mb4",
            autocommit=autocommit,
            local_infile=local_infile,
            ssl=ssl,
            client_flag=CLIENT.MULTI_RESULTS,
            cursorclass=pymysql.cursors.SSCursor if streaming else pymysql.cursors.Cursor,
            init_command="SET time_zone = '+00:00'",
        )
    except pymysql.err.OperationalError as exc:
        raise ConnectError(describe_error(exc, endpoint, database)) from exc
    except (OSError, ValueError) as exc:
        raise ConnectError(
            f"cannot connect to {endpoint.name} ({endpoint.address}): {exc}"
        ) from exc
    return conn


def describe_error(exc: BaseException, endpoint: Endpoint, database: str | None = None) -> str:
    """One sentence naming the instance and what to change."""
    code = exc.args[0] if getattr(exc, "args", None) else None
    where = f"{endpoint.name} ({endpoint.address})"
    if code == ER.ACCESS_DENIED_ERROR:
        return f"access denied for user '{endpoint.user}' on {where}: check the user and password"
    if code == ER.BAD_DB_ERROR:
        return f"database '{database}' does not exist on {where}"
    if code == ER.DBACCESS_DENIED_ERROR:
        return f"user '{endpoint.user}' may not use database '{database}' on {where}"
    if code in (2003, 2013):
        return f"cannot reach {where}: the server did not answer (is it running and reachable?)"
    if code == 2005:
        return f"unknown host '{endpoint.host}' for {endpoint.name}"
    message = exc.args[1] if getattr(exc, "args", None) and len(exc.args) > 1 else str(exc)
    return f"{where}: {message}"


def server_flavour(version: str) -> str:
    """'mariadb' or 'mysql' from a VERSION() string."""
    return "mariadb" if "mariadb" in version.lower() else "mysql"
