"""The one MySQL connection helper and the one SQL identifier quoter.

Plain Python (no Django): the engine, the commands and the pages all connect
through `connect()` and quote every database, table and column name with
`quote_ident()`.
"""

from __future__ import annotations

import ipaddress
import os
import re
import ssl
import threading
from collections.abc import Iterable
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from struct import error as struct_error

import pymysql
import pymysql.constants.CLIENT as CLIENT
from pymysql.constants import CR, ER

from backups.engine.errors import ConnectError

CONNECT_TIMEOUT_SECONDS = 5
# Metadata queries (discovery, connection tests, preflight) answer in well under this; a server
# that takes longer is treated as not answering rather than left to hang a page or a job.
METADATA_TIMEOUT_SECONDS = 30

# Variables that hold the console's own secrets and configuration: never a shard password.
PASSWORD_ENV_DENYLIST = ("SHARDVAULT_*", "DATABASE_URL", "REDIS_URL", "AWS_*", "S3_*")
PASSWORD_ENV_PATTERN_DEFAULT = ("*_PW", "*_PASSWORD")
# Auth plugins that make the client send the password itself rather than a proof of it.
CLEARTEXT_AUTH_PLUGINS = ("mysql_clear_password", "dialog")

_HOST_LABEL = re.compile(r"(?!-)[A-Za-z0-9_-]{1,63}(?<!-)")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


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


def host_refusal(host: str) -> str | None:
    """Why `host` is not a host name or an IP address, or None when it is one."""
    if not isinstance(host, str) or not host:
        return "the host must not be empty"
    if _CONTROL.search(host):
        return "the host contains a control character"
    try:
        ipaddress.ip_address(host.strip("[]") if host.startswith("[") else host)
        return None
    except ValueError:
        pass
    name = host[:-1] if host.endswith(".") else host
    if len(name) > 253 or not all(_HOST_LABEL.fullmatch(label) for label in name.split(".")):
        return f"the host '{host}' is neither a host name nor an IP address"
    return None


def control_character_refusal(value: str | None, what: str) -> str | None:
    """Why `value` may not be used as a connection field (it holds a control character, which
    would let it add lines or options to an option file), or None."""
    if value and _CONTROL.search(str(value)):
        return f"the {what} contains a control character (such as a newline), which is not allowed"
    return None


def endpoint_refusal(endpoint: Endpoint) -> str | None:
    """Why a connection to `endpoint` is refused before anything is sent, or None."""
    problem = host_refusal(endpoint.host)
    if problem is None:
        for value, what in (
            (endpoint.user, "user"),
            (endpoint.password, "password"),
            (endpoint.tls_ca, "TLS CA path"),
        ):
            problem = control_character_refusal(value, what)
            if problem:
                break
    if problem is None:
        try:
            port = int(endpoint.port)
        except (TypeError, ValueError):
            port = 0
        if not 1 <= port <= 65535:
            problem = f"port {endpoint.port} is out of range: use 1 to 65535"
    return problem


def password_env_refusal(
    name: str, patterns: Iterable[str] = PASSWORD_ENV_PATTERN_DEFAULT
) -> str | None:
    """Why the environment variable `name` may not hold a shard password, or None.

    It must match one of `patterns` (SHARDVAULT_PASSWORD_ENV_PATTERN) and may never name one of
    the console's own variables (`PASSWORD_ENV_DENYLIST`), whatever the patterns say.
    """
    if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name or ""):
        return f"password_env '{name}' is not an environment variable name"
    for denied in PASSWORD_ENV_DENYLIST:
        if fnmatchcase(name.upper(), denied):
            return (
                f"password_env {name} names one of the console's own variables ({denied}), "
                "which never holds a shard password"
            )
    patterns = [p.strip() for p in patterns if p.strip()]
    if not any(fnmatchcase(name, p) for p in patterns):
        return (
            f"password_env {name} does not match SHARDVAULT_PASSWORD_ENV_PATTERN "
            f"({','.join(patterns)})"
        )
    return None


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


class _Connection(pymysql.connections.Connection):
    """PyMySQL's connection, with one TLS context per process for each set of TLS settings.

    PyMySQL builds a fresh `ssl.SSLContext` for every connection, also without TLS options
    (it then tries TLS when the server offers it), and loading the system CA bundle costs
    ~35 ms of CPU each time: a backup opens dozens of connections. The context is the same
    for the same settings (and the same CA file, by size and mtime), so it is built once.
    """

    def _create_ssl_ctx(self, sslp):
        if isinstance(sslp, ssl.SSLContext):
            return sslp
        key = _ssl_context_key(sslp)
        with _ssl_contexts_lock:
            context = _ssl_contexts.get(key)
            if context is None:
                context = super()._create_ssl_ctx(sslp)
                _ssl_contexts[key] = context
        return context


_ssl_contexts: dict[tuple, ssl.SSLContext] = {}
_ssl_contexts_lock = threading.Lock()


def _ssl_context_key(sslp: dict) -> tuple:
    files = []
    for option in ("ca", "capath", "cert", "key"):
        path = sslp.get(option)
        try:
            stat = os.stat(path) if path else None
        except OSError:
            stat = None
        files.append((stat.st_size, stat.st_mtime_ns) if stat else None)
    return tuple(sorted((k, repr(v)) for k, v in sslp.items())) + tuple(files)


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

    Refuses, before sending anything: a host that is not a host name or IP address and
    control characters in any field. Refuses during the handshake: a server that asks for
    the password in clear text (`mysql_clear_password`, `dialog`) over a connection without
    TLS. The handshake and the session set-up are bounded by `connect_timeout` on every read
    and write (a server that accepts TCP and never greets cannot hang the caller); after it,
    `read_timeout`/`write_timeout` apply (None: no limit, for long dumps and loads).
    LOAD DATA LOCAL is off unless `local_infile=True` (only the loader asks for it).
    """
    problem = endpoint_refusal(endpoint)
    if problem:
        raise ConnectError(f"refusing to connect to {endpoint.name}: {problem}")
    ssl = None
    if endpoint.tls_ca:
        ssl = {"ca": endpoint.tls_ca, "check_hostname": endpoint.tls_verify}
    handshake_timeout = connect_timeout
    try:
        conn = _Connection(
            host=endpoint.host,
            port=int(endpoint.port),
            user=endpoint.user,
            password=endpoint.password or "",
            database=database,
            connect_timeout=connect_timeout,
            read_timeout=handshake_timeout,
            write_timeout=handshake_timeout,
            charset="utf8mb4",
            autocommit=autocommit,
            local_infile=bool(local_infile),
            ssl=ssl,
            auth_plugin_map={
                name: _refuse_cleartext_without_tls for name in CLEARTEXT_AUTH_PLUGINS
            },
            client_flag=CLIENT.MULTI_RESULTS,
            cursorclass=pymysql.cursors.SSCursor if streaming else pymysql.cursors.Cursor,
            init_command="SET time_zone = '+00:00'",
        )
    except pymysql.err.OperationalError as exc:
        raise ConnectError(describe_error(exc, endpoint, database)) from exc
    except pymysql.MySQLError as exc:
        raise ConnectError(describe_error(exc, endpoint, database)) from exc
    except (OSError, ValueError, IndexError, struct_error, UnicodeDecodeError) as exc:
        # A server that speaks something other than the MySQL protocol.
        raise ConnectError(
            f"cannot connect to {endpoint.name} ({endpoint.address}): "
            f"the server's answer is not a MySQL handshake ({exc or type(exc).__name__})"
        ) from exc
    # PyMySQL applies these on the next read or write; the handshake used handshake_timeout.
    conn._read_timeout = read_timeout
    conn._write_timeout = write_timeout
    return conn


def _refuse_cleartext_without_tls(conn):
    """PyMySQL auth-plugin handler factory for the cleartext plugins: returning None lets
    PyMySQL answer as usual (over TLS); without TLS it refuses before the password is sent."""
    if getattr(conn, "_secure", False):
        return None
    raise pymysql.err.OperationalError(
        CR.CR_AUTH_PLUGIN_CANNOT_LOAD,
        "the server asked for the password in clear text over a connection without TLS; "
        "refused (configure TLS for this instance, or a hashing auth plugin on the server)",
    )


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
    if code == 2013 and "timed out" in str(exc):
        return f"{where} did not answer in time: it accepted the connection but sent no reply"
    if code in (2003, 2013):
        return f"cannot reach {where}: the server did not answer (is it running and reachable?)"
    if code == 2005:
        return f"unknown host '{endpoint.host}' for {endpoint.name}"
    message = exc.args[1] if getattr(exc, "args", None) and len(exc.args) > 1 else str(exc)
    return f"{where}: {message}"


def server_flavour(version: str) -> str:
    """'mariadb' or 'mysql' from a VERSION() string."""
    return "mariadb" if "mariadb" in version.lower() else "mysql"
