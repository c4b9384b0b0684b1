"""Discovery and preflight: what each shard holds and whether each server can be backed up.

Plain Python (no Django): takes Endpoints and shard targets, connects through
`backups.engine.mysql.connect`, and returns tables and findings. Every finding carries a
severity and one sentence telling the user what to change.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import pymysql

from backups.engine.errors import ConnectError
from backups.engine.exclusions import exclusions_for_server
from backups.engine.mysql import (
    METADATA_TIMEOUT_SECONDS,
    Endpoint,
    connect,
    describe_error,
    server_flavour,
)
from backups.engine.physical import physical_preflight

OK = "ok"
WARNING = "warning"
ERROR = "error"
SEVERITY_RANK = {OK: 0, WARNING: 1, ERROR: 2}

# Privileges the backup user needs on the whole server (DESIGN.md, "Command line").
GLOBAL_PRIVILEGES = ("RELOAD", "REPLICATION CLIENT", "REPLICATION SLAVE", "PROCESS")
# Privileges that may be granted globally or on each shard's database.
DATABASE_PRIVILEGES = ("SELECT", "LOCK TABLES", "SHOW VIEW", "TRIGGER", "EVENT")
# MariaDB 10.5+ renamed some privileges; granting either name is enough.
PRIVILEGE_ALIASES = {
    "BINLOG MONITOR": "REPLICATION CLIENT",
    "REPLICATION REPLICA": "REPLICATION SLAVE",
    "SLAVE MONITOR": "REPLICATION CLIENT",
}


class OddAnswer(Exception):
    """A server answered a metadata query with something no MySQL server sends (no row, too few
    columns, a value of the wrong kind); the message says which question it got wrong."""


# Whatever a server does while answering discovery's questions ends in one of these.
SERVER_PROBLEMS = (pymysql.MySQLError, OddAnswer, ValueError, TypeError, IndexError)


def _metadata_connection(endpoint: Endpoint, database: str | None = None):
    """A connection whose every read and write is bounded: a server that stops answering
    half-way through a question cannot hang discovery or a page."""
    return connect(
        endpoint,
        database,
        read_timeout=METADATA_TIMEOUT_SECONDS,
        write_timeout=METADATA_TIMEOUT_SECONDS,
    )


def _one_row(cur, width: int, question: str) -> tuple:
    row = cur.fetchone()
    if row is None or len(row) < width:
        raise OddAnswer(f"the server gave no answer to {question}")
    return row


def _problem(exc: BaseException, endpoint: Endpoint, database: str | None = None) -> str:
    """One sentence naming the instance and what went wrong, for any of SERVER_PROBLEMS."""
    if isinstance(exc, pymysql.MySQLError):
        return describe_error(exc, endpoint, database)
    if isinstance(exc, OddAnswer):
        return f"{endpoint.name} ({endpoint.address}): {exc}, so it does not behave like MySQL"
    return (
        f"{endpoint.name} ({endpoint.address}) answered with something unexpected ({exc}), "
        "so it does not behave like MySQL"
    )


@dataclass(frozen=True)
class ShardTarget:
    name: str
    instance: str  # instance name, a key of the endpoints mapping
    database: str


@dataclass
class TableInfo:
    name: str
    engine: str
    rows: int
    data_bytes: int
    index_bytes: int
    has_primary_key: bool


@dataclass
class InstanceInfo:
    name: str
    reachable: bool = False
    version: str = ""
    flavour: str = ""
    server_id: int | None = None


@dataclass
class FindingInfo:
    severity: str
    code: str
    message: str
    instance: str = ""
    shard: str = ""
    table: str = ""


@dataclass
class DiscoveryResult:
    instances: dict[str, InstanceInfo] = field(default_factory=dict)
    # Shard name -> tables; a shard missing here could not be read.
    tables: dict[str, list[TableInfo]] = field(default_factory=dict)
    findings: list[FindingInfo] = field(default_factory=list)

    @property
    def worst(self) -> str:
        return max((f.severity for f in self.findings), key=SEVERITY_RANK.get, default=OK)


Progress = Callable[[int, str], None]


def discover(
    endpoints: dict[str, Endpoint],
    shards: list[ShardTarget],
    *,
    progress: Progress | None = None,
    unavailable: dict[str, str] | None = None,
    exclude_tables: Iterable[str] = (),
    cold: bool = False,
    physical: dict[str, tuple[str, str]] | None = None,
    physical_required: bool = False,
) -> DiscoveryResult:
    """Inspect every instance and every shard; never raises for a server problem.

    Tables matching `exclude_tables` (the policy's "database.table" globs) are listed with
    an ok finding saying so, and never refused: they are not backed up at all.
    With `cold` (the policy's scheduled fulls are cold), a non-InnoDB table is a warning,
    not an error: cold backups copy it under the global read lock; hot and warm ones refuse.

    `unavailable` maps instance names to a reason they cannot be tried at all (a
    password variable that is not set); those become error findings. `progress`
    is called with (percent, text) after each instance and shard.

    `physical` maps instance names to (datadir, agent_queue): those instances are checked
    for physical backups here (mariabackup on this worker, its version, the privileges it
    needs, a readable datadir), one finding per missing piece; errors when
    `physical_required` (the policy's fulls are physical), else warnings. An instance with
    an agent queue is checked by its host agent when a part starts.
    """
    result = DiscoveryResult()
    unavailable = unavailable or {}
    steps = max(1, len(endpoints) + len(unavailable) + len(shards))
    done = 0

    def tick(text: str) -> None:
        nonlocal done
        done += 1
        if progress:
            progress(min(99, done * 100 // steps), text)

    grants: dict[str, Grants] = {}
    for name, reason in unavailable.items():
        result.instances[name] = InstanceInfo(name=name)
        result.findings.append(FindingInfo(ERROR, "instance.unavailable", reason, instance=name))
        tick(f"instance {name}")
    for name, endpoint in endpoints.items():
        info, instance_grants = _check_instance(endpoint, result.findings)
        result.instances[name] = info
        if instance_grants is not None:
            grants[name] = instance_grants
        tick(f"instance {name}")

    _check_server_ids(result)

    for shard in shards:
        info = result.instances.get(shard.instance)
        if info is None or not info.reachable:
            result.findings.append(
                FindingInfo(
                    ERROR,
                    "shard.unchecked",
                    f"shard {shard.name} was not checked because instance {shard.instance} "
                    "could not be reached; fix the instance first",
                    instance=shard.instance,
                    shard=shard.name,
                )
            )
            tick(f"shard {shard.name}")
            continue
        tables = _check_shard(
            endpoints[shard.instance], shard, result.findings, tuple(exclude_tables), cold=cold
        )
        if tables is not None:
            result.tables[shard.name] = tables
            if shard.instance in grants:
                _check_database_privileges(grants[shard.instance], shard, result.findings)
        tick(f"shard {shard.name}")
    _check_physical(endpoints, physical or {}, result, required=physical_required)
    if progress:
        progress(100, "done")
    return result


def _check_physical(endpoints, physical: dict, result: DiscoveryResult, *, required: bool):
    severity = ERROR if required else WARNING
    for name, (datadir, agent_queue) in sorted(physical.items()):
        info = result.instances.get(name)
        if info is None or not info.reachable or name not in endpoints:
            continue
        if agent_queue:
            result.findings.append(
                FindingInfo(
                    OK,
                    "physical.agent",
                    f"physical parts of instance {name} run on the worker serving "
                    f"{agent_queue}, which checks mariabackup, its version, the privileges and "
                    "the datadir when a part starts",
                    instance=name,
                )
            )
            continue
        problems = physical_preflight(endpoints[name], datadir)
        for problem in problems:
            result.findings.append(
                FindingInfo(severity, "physical.preflight", problem, instance=name)
            )
        if not problems:
            result.findings.append(
                FindingInfo(
                    OK,
                    "physical.ready",
                    f"instance {name} can be backed up physically from this worker "
                    f"(mariabackup matches the server, datadir {datadir} readable)",
                    instance=name,
                )
            )


def connection_check(endpoint: Endpoint, databases: list[str] | None = None) -> tuple[bool, str]:
    """Connect (and open each database); returns (ok, one sentence)."""
    try:
        conn = _metadata_connection(endpoint)
    except ConnectError as exc:
        return False, str(exc)
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT VERSION()")
            version = str(_one_row(cur, 1, "SELECT VERSION()")[0])
            for database in databases or []:
                cur.execute(
                    "SELECT COUNT(*) FROM information_schema.SCHEMATA WHERE SCHEMA_NAME = %s",
                    (database,),
                )
                if not _one_row(cur, 1, "the list of databases")[0]:
                    return (
                        False,
                        f"database '{database}' does not exist on {endpoint.name} ({endpoint.address})",
                    )
    except SERVER_PROBLEMS as exc:
        return False, _problem(exc, endpoint)
    finally:
        conn.close()
    return (
        True,
        f"connected to {endpoint.name} ({endpoint.address}): {server_flavour(version)} {version}",
    )


# --- instances -------------------------------------------------------------------------


def _variables(cur, names: list[str]) -> dict[str, str]:
    cur.execute(
        "SELECT VARIABLE_NAME, VARIABLE_VALUE FROM information_schema.GLOBAL_VARIABLES "  # noqa: S608
        "WHERE VARIABLE_NAME IN (" + ", ".join(["%s"] * len(names)) + ")",
        [n.upper() for n in names],
    )
    return {str(row[0]).lower(): row[1] for row in cur.fetchall()}


def _global_variables(cur, names: list[str]) -> dict[str, str]:
    try:
        return _variables(cur, names)
    except pymysql.MySQLError:
        # MySQL 5.7+/8.0 moved these to performance_schema; SHOW VARIABLES works everywhere.
        values = {}
        for name in names:
            cur.execute("SHOW GLOBAL VARIABLES LIKE %s", (name,))
            row = cur.fetchone()
            if row and len(row) > 1:
                values[name] = row[1]
        return values


def _check_instance(endpoint: Endpoint, findings: list[FindingInfo]):
    name = endpoint.name
    info = InstanceInfo(name=name)
    try:
        conn = _metadata_connection(endpoint)
    except ConnectError as exc:
        findings.append(FindingInfo(ERROR, "instance.unreachable", str(exc), instance=name))
        return info, None
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT VERSION(), @@server_id")
            version, server_id = _one_row(cur, 2, "SELECT VERSION(), @@server_id")[:2]
            version = str(version)
            server_id = int(server_id)
            info.reachable = True
            info.version = version
            info.flavour = server_flavour(version)
            info.server_id = server_id
            variables = _global_variables(
                cur,
                [
                    "log_bin",
                    "binlog_format",
                    "binlog_row_image",
                    "binlog_row_metadata",
                    "binlog_annotate_row_events",
                    "log_bin_compress",
                    "gtid_mode",
                    "gtid_binlog_pos",
                    "gtid_strict_mode",
                ],
            )
            cur.execute("SHOW GRANTS FOR CURRENT_USER()")
            grants = parse_grants(str(row[0]) for row in cur.fetchall() if row)
    except SERVER_PROBLEMS as exc:
        findings.append(
            FindingInfo(ERROR, "instance.query", _problem(exc, endpoint), instance=name)
        )
        return info, None
    finally:
        conn.close()

    before = len(findings)
    findings.extend(_binlog_findings(name, info, variables))
    missing = [p for p in GLOBAL_PRIVILEGES if not grants.allows(p)]
    if missing:
        findings.append(
            FindingInfo(
                ERROR,
                "privileges.missing",
                f"user '{endpoint.user}' on {name} lacks {', '.join(missing)}: "
                f"GRANT {', '.join(missing)} ON *.* TO the backup user",
                instance=name,
            )
        )
    if info.flavour == "mariadb" and not (grants.allows("BINLOG REPLAY") or grants.allows("SUPER")):
        findings.append(
            FindingInfo(
                WARNING,
                "privileges.binlog_replay",
                f"user '{endpoint.user}' on {name} may not run BINLOG statements, so a "
                f"flashback on {name} is refused: GRANT BINLOG REPLAY ON *.* TO the backup user",
                instance=name,
            )
        )
    if len(findings) == before:
        findings.append(
            FindingInfo(
                OK,
                "instance.ok",
                f"{name} ({endpoint.address}) runs {info.flavour} {version} with a ROW binlog "
                "and the privileges a backup needs",
                instance=name,
            )
        )
    return info, grants


def _binlog_findings(name: str, info: InstanceInfo, variables: dict[str, str]):
    on = str(variables.get("log_bin", "")).upper() in ("ON", "1")
    if not on:
        yield FindingInfo(
            WARNING,
            "binlog.off",
            f"binary logging is off on {name}: full backups work, but incremental backups and "
            "point-in-time restores need log_bin enabled (set log_bin and restart the server)",
            instance=name,
        )
        return
    fmt = str(variables.get("binlog_format", "")).upper()
    if fmt != "ROW":
        yield FindingInfo(
            ERROR,
            "binlog.format",
            f"binlog_format is {fmt or 'unknown'} on {name}: set binlog_format=ROW "
            "(SET GLOBAL binlog_format='ROW' and in the server's configuration) so incrementals "
            "record every row change",
            instance=name,
        )
    image = str(variables.get("binlog_row_image", "")).upper()
    if image and image != "FULL":
        yield FindingInfo(
            ERROR,
            "binlog.row_image",
            f"binlog_row_image is {image} on {name}: set binlog_row_image=FULL so incrementals "
            "can be applied",
            instance=name,
        )
    metadata = variables.get("binlog_row_metadata")
    if metadata is not None and str(metadata).upper() != "FULL":
        yield FindingInfo(
            WARNING,
            "binlog.row_metadata",
            f"binlog_row_metadata is {str(metadata).upper()} on {name}: set "
            "binlog_row_metadata=FULL so incrementals keep column names across schema changes",
            instance=name,
        )
    annotate = variables.get("binlog_annotate_row_events")
    if annotate is not None and str(annotate).upper() not in ("ON", "1"):
        yield FindingInfo(
            WARNING,
            "binlog.annotate",
            f"binlog_annotate_row_events is OFF on {name}: the binlog browser cannot show the "
            "statement behind each transaction; set binlog_annotate_row_events=ON",
            instance=name,
        )
    if str(variables.get("log_bin_compress", "")).upper() in ("ON", "1"):
        yield FindingInfo(
            WARNING,
            "binlog.compress",
            f"log_bin_compress is ON on {name}: point-in-time restores read its compressed "
            "events, but the binlog browser and flashback refuse compressed row events; set "
            "log_bin_compress=OFF to use them",
            instance=name,
        )
    if info.flavour == "mysql":
        gtid = str(variables.get("gtid_mode", "")).upper()
        if gtid != "ON":
            yield FindingInfo(
                WARNING,
                "gtid.off",
                f"gtid_mode is {gtid or 'OFF'} on {name}: backups record file/position "
                "coordinates only; set gtid_mode=ON to record GTID sets too",
                instance=name,
            )


def _check_server_ids(result: DiscoveryResult) -> None:
    by_id: dict[int, list[str]] = {}
    for info in result.instances.values():
        if info.server_id is not None:
            by_id.setdefault(info.server_id, []).append(info.name)
    for server_id, names in sorted(by_id.items()):
        if len(names) > 1:
            for name in names:
                result.findings.append(
                    FindingInfo(
                        ERROR,
                        "server_id.duplicate",
                        f"server_id {server_id} is shared by instances {', '.join(sorted(names))}: "
                        "give every server of the cluster its own server_id (or these entries "
                        "point at the same server)",
                        instance=name,
                    )
                )


# --- grants ----------------------------------------------------------------------------

_GRANT_RE = re.compile(r"^GRANT (?P<privs>.+?) ON (?P<target>.+?) TO ", re.IGNORECASE | re.DOTALL)


@dataclass
class Grants:
    global_privileges: set[str] = field(default_factory=set)
    # (database LIKE-pattern as in the grant, privileges)
    database_privileges: list[tuple[str, set[str]]] = field(default_factory=list)

    def allows(self, privilege: str, database: str | None = None) -> bool:
        if "ALL PRIVILEGES" in self.global_privileges or privilege in self.global_privileges:
            return True
        if database is None:
            return False
        for pattern, privileges in self.database_privileges:
            if _grant_database_matches(pattern, database) and (
                privilege in privileges or "ALL PRIVILEGES" in privileges
            ):
                return True
        return False


def _split_privileges(text: str) -> set[str]:
    # Column grants look like "SELECT (a, b)"; drop the column lists before splitting.
    text = re.sub(r"\([^)]*\)", "", text)
    privileges = set()
    for part in text.split(","):
        privilege = " ".join(part.split()).upper()
        if privilege == "ALL":
            privilege = "ALL PRIVILEGES"
        privileges.add(PRIVILEGE_ALIASES.get(privilege, privilege))
    return privileges


def _unquote(part: str) -> str:
    part = part.strip()
    if len(part) >= 2 and part[0] == part[-1] and part[0] in "`'\"":
        return part[1:-1].replace(part[0] * 2, part[0])
    return part


def parse_grants(lines) -> Grants:
    """Parse `SHOW GRANTS` lines into global and per-database privileges."""
    grants = Grants()
    for line in lines:
        match = _GRANT_RE.match(line)
        if not match:
            continue  # role grants ("GRANT `r` TO u") and proxies
        target = match.group("target").strip()
        if target.upper().startswith(("FUNCTION ", "PROCEDURE ")):
            continue
        privileges = _split_privileges(match.group("privs"))
        if target == "*.*":
            grants.global_privileges |= privileges
            continue
        # `db`.* or `db`.`table`: only whole-database grants count for a shard.
        db_part, _, table_part = _split_target(target)
        if table_part == "*":
            grants.database_privileges.append((_unquote(db_part), privileges))
    return grants


def _split_target(target: str) -> tuple[str, str, str]:
    if target.startswith("`"):
        i = 1
        while i < len(target):
            if target[i] == "`":
                if i + 1 < len(target) and target[i + 1] == "`":
                    i += 2
                    continue
                break
            i += 1
        return target[: i + 1], ".", target[i + 2 :]
    return target.partition(".")


def _grant_database_matches(pattern: str, database: str) -> bool:
    """MySQL database grants are LIKE patterns: '_' and '%' are wildcards, '\\' escapes."""
    regex = []
    i = 0
    while i < len(pattern):
        char = pattern[i]
        if char == "\\" and i + 1 < len(pattern):
            regex.append(re.escape(pattern[i + 1]))
            i += 2
            continue
        regex.append("." if char == "_" else ".*" if char == "%" else re.escape(char))
        i += 1
    return re.fullmatch("".join(regex), database, re.DOTALL) is not None


def _check_database_privileges(grants: Grants, shard: ShardTarget, findings: list[FindingInfo]):
    missing = [p for p in DATABASE_PRIVILEGES if not grants.allows(p, shard.database)]
    if missing:
        findings.append(
            FindingInfo(
                ERROR,
                "privileges.database",
                f"the backup user lacks {', '.join(missing)} on database '{shard.database}' "
                f"(shard {shard.name}): grant them on the database or on *.*",
                instance=shard.instance,
                shard=shard.name,
            )
        )


# --- shards ----------------------------------------------------------------------------


def _check_shard(
    endpoint: Endpoint,
    shard: ShardTarget,
    findings: list[FindingInfo],
    exclude_tables: tuple[str, ...] = (),
    *,
    cold: bool = False,
):
    try:
        conn = _metadata_connection(endpoint, shard.database)
    except ConnectError as exc:
        findings.append(
            FindingInfo(
                ERROR, "shard.database", str(exc), instance=shard.instance, shard=shard.name
            )
        )
        return None
    tables: list[TableInfo] = []
    try:
        with conn.cursor() as cur:
            cur.execute(
                "SELECT t.TABLE_NAME, COALESCE(t.ENGINE, ''), COALESCE(t.TABLE_ROWS, 0), "
                "COALESCE(t.DATA_LENGTH, 0), COALESCE(t.INDEX_LENGTH, 0), "
                "EXISTS(SELECT 1 FROM information_schema.TABLE_CONSTRAINTS c "
                "WHERE c.TABLE_SCHEMA = t.TABLE_SCHEMA AND c.TABLE_NAME = t.TABLE_NAME "
                "AND c.CONSTRAINT_TYPE = 'PRIMARY KEY') "
                "FROM information_schema.TABLES t "
                "WHERE t.TABLE_SCHEMA = %s AND t.TABLE_TYPE = 'BASE TABLE' "
                "ORDER BY t.TABLE_NAME",
                (shard.database,),
            )
            for row in cur.fetchall():
                if len(row) < 6:
                    raise OddAnswer("the server listed the shard's tables with too few columns")
                name, engine, rows, data, index, has_pk = row[:6]
                tables.append(
                    TableInfo(
                        str(name), str(engine or ""), int(rows or 0), int(data or 0),
                        int(index or 0), str(has_pk) not in ("0", "", "None"),
                    )
                )  # fmt: skip
        exclusions = exclusions_for_server(exclude_tables, conn)
    except SERVER_PROBLEMS as exc:
        findings.append(
            FindingInfo(
                ERROR,
                "shard.query",
                _problem(exc, endpoint, shard.database),
                instance=shard.instance,
                shard=shard.name,
            )
        )
        return None
    finally:
        conn.close()

    for table in tables:
        where = dict(instance=shard.instance, shard=shard.name, table=table.name)
        if exclusions.excludes(shard.database, table.name):
            findings.append(
                FindingInfo(
                    OK,
                    "table.excluded",
                    f"table '{table.name}' in shard {shard.name} ({table.engine or 'no engine'}) "
                    "matches the policy's exclude_tables: it is never backed up or restored",
                    **where,
                )
            )
            continue
        if table.engine.upper() != "INNODB" and cold:
            findings.append(
                FindingInfo(
                    WARNING,
                    "table.engine",
                    f"table '{table.name}' in shard {shard.name} uses {table.engine or 'no engine'}: "
                    "the policy's cold backups copy it under the global read lock (writes wait "
                    "for the whole dump); hot and warm backups of this cluster refuse it",
                    **where,
                )
            )
        elif table.engine.upper() != "INNODB":
            findings.append(
                FindingInfo(
                    ERROR,
                    "table.engine",
                    f"table '{table.name}' in shard {shard.name} uses {table.engine or 'no engine'}, "
                    "which a hot backup cannot copy consistently, so backups of this cluster are "
                    "refused: convert it with ALTER TABLE ... ENGINE=InnoDB, exclude it "
                    "with the policy's exclude_tables, or take cold backups (full_consistency "
                    "cold: writes wait for the whole dump)",
                    **where,
                )
            )
        if not table.has_primary_key:
            findings.append(
                FindingInfo(
                    WARNING,
                    "table.primary_key",
                    f"table '{table.name}' in shard {shard.name} has no primary key: add one so it "
                    "can be dumped in chunks and its incrementals applied",
                    **where,
                )
            )
    if not tables:
        findings.append(
            FindingInfo(
                WARNING,
                "shard.empty",
                f"database '{shard.database}' of shard {shard.name} holds no tables: check that "
                "the shard points at the right database",
                instance=shard.instance,
                shard=shard.name,
            )
        )
    return tables
