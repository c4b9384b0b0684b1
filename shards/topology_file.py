"""The topology file (DESIGN.md, "Topology file"): parse, validate, dump.

Plain Python. Errors name the line (from PyYAML's marks) and the field, so a
person can fix the file without guessing.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import yaml

from shards.table_patterns import pattern_refusal

# A topology file is a few kilobytes per cluster; anything near this is a mistake or an attack.
MAX_TOPOLOGY_BYTES = 1 << 20
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")


class TopologyFileError(Exception):
    """The file cannot be used; the message is one sentence naming the line or field."""


def topology_too_large() -> str:
    return (
        f"the file is larger than {MAX_TOPOLOGY_BYTES // 1024} KiB, the most a topology file may be"
    )


@dataclass
class InstanceSpec:
    name: str
    host: str
    port: int = 3306
    user: str = ""
    password: str | None = None  # inline; None means "keep what is stored"
    password_env: str = ""
    tls_ca: str = ""
    tls_verify: bool = False
    max_connections: int = 4
    datadir: str = ""
    agent_queue: str = ""
    line: int = 0


@dataclass
class ShardSpec:
    name: str
    instance: str
    database: str
    line: int = 0


@dataclass
class LogicalTableSpec:
    name: str
    pattern: str
    line: int = 0


@dataclass
class ClusterSpec:
    name: str
    shard_key: str = ""
    description: str = ""
    instances: list[InstanceSpec] = field(default_factory=list)
    shards: list[ShardSpec] = field(default_factory=list)
    logical_tables: list[LogicalTableSpec] = field(default_factory=list)
    drill_instance: str = ""
    # The `policy:` block as given (field -> text or list of text); None when absent, so an
    # import leaves the policy alone.
    policy: dict | None = None
    line: int = 0


@dataclass
class TopologyDocument:
    clusters: list[ClusterSpec] = field(default_factory=list)


CLUSTER_KEYS = {
    "name",
    "shard_key",
    "description",
    "instances",
    "shards",
    "logical_tables",
    "drill_instance",
    "policy",
}
# The fields of a cluster's policy (DESIGN.md "Policies"; backups.services.policies checks
# their values when the file is imported).
POLICY_KEYS = {
    "full_cron",
    "full_consistency",
    "full_method",
    "incremental_every_minutes",
    "keep_full",
    "keep_daily",
    "keep_weekly",
    "keep_monthly",
    "keep_days",
    "copy_to",
    "exclude_tables",
    "max_threads_running",
    "encrypt",
    "compression_level",
    "rpo_target_minutes",
    "drill_every_days",
    "webhook_url",
}
INSTANCE_KEYS = {
    "name",
    "host",
    "port",
    "user",
    "password",
    "password_env",
    "tls_ca",
    "tls_verify",
    "max_connections",
    "datadir",
    "agent_queue",
}
SHARD_KEYS = {"name", "instance", "database"}
LOGICAL_TABLE_KEYS = {"name", "pattern"}


def _line(node) -> int:
    return node.start_mark.line + 1


def _fail(node, message: str):
    raise TopologyFileError(f"line {_line(node)}: {message}")


def _mapping(node, what: str, known: set[str], required: tuple[str, ...]) -> dict:
    if not isinstance(node, yaml.MappingNode):
        _fail(node, f"{what} must be a mapping of keys to values")
    values: dict = {}
    # Name the entry ("instance 'a'") when it has a name, so errors point at it.
    for key_node, value_node in node.value:
        if getattr(key_node, "value", None) == "name" and isinstance(value_node, yaml.ScalarNode):
            kind = what.split(" ", 1)[1] if what.startswith(("a ", "an ")) else what
            kind, _, context = kind.partition(" of ")
            what = f"{kind} '{value_node.value}'" + (f" of {context}" if context else "")
    for key_node, value_node in node.value:
        if not isinstance(key_node, yaml.ScalarNode):
            _fail(key_node, f"{what} has a key that is not a plain name")
        key = key_node.value
        if key not in known:
            _fail(
                key_node, f"unknown key '{key}' in {what} (known keys: {', '.join(sorted(known))})"
            )
        if key in values:
            _fail(key_node, f"key '{key}' appears twice in {what}")
        values[key] = value_node
    for key in required:
        if key not in values:
            _fail(node, f"{what} is missing the required key '{key}'")
    return values


def _scalar(node, what: str, *, allow_empty: bool = False) -> str:
    if not isinstance(node, yaml.ScalarNode):
        _fail(node, f"{what} must be a single value, not a list or mapping")
    value = node.value
    if node.tag == "tag:yaml.org,2002:null" or (not allow_empty and value.strip() == ""):
        if allow_empty:
            return ""
        _fail(node, f"{what} must not be empty")
    return value


def _name(node, what: str) -> str:
    value = _scalar(node, what)
    if not NAME_RE.match(value):
        _fail(
            node,
            f"{what} '{value}' is not a valid name: use letters, digits, '_', '.' or '-' (at most 63, starting with a letter or digit)",
        )
    return value


def _int(node, what: str, low: int, high: int) -> int:
    value = _scalar(node, what)
    try:
        number = int(value)
    except ValueError:
        _fail(node, f"{what} must be a whole number, not '{value}'")
    if not low <= number <= high:
        _fail(node, f"{what} {number} is out of range: use {low} to {high}")
    return number


def _bool(node, what: str) -> bool:
    value = _scalar(node, what).lower()
    if value in ("true", "yes", "on", "1"):
        return True
    if value in ("false", "no", "off", "0"):
        return False
    _fail(node, f"{what} must be true or false, not '{value}'")


def _sequence(node, what: str) -> list:
    if isinstance(node, yaml.ScalarNode) and node.tag == "tag:yaml.org,2002:null":
        return []
    if not isinstance(node, yaml.SequenceNode):
        _fail(node, f"{what} must be a list")
    return node.value


class _PlainLoader(yaml.SafeLoader):
    """SafeLoader without anchors and aliases. An alias makes one node appear many times,
    so a few kilobytes could stand for millions of entries ("billion laughs"); a topology
    file never needs one, so the first anchor or alias ends the parse, before any node is
    repeated."""

    def compose_node(self, parent, index):
        event = self.peek_event()
        if isinstance(event, yaml.AliasEvent) or getattr(event, "anchor", None):
            sign = "*" if isinstance(event, yaml.AliasEvent) else "&"
            raise TopologyFileError(
                f"line {event.start_mark.line + 1}: the file uses the YAML "
                f"{'alias' if sign == '*' else 'anchor'} {sign}{event.anchor}; topology files "
                "may not use anchors or aliases, write each entry out in full"
            )
        return super().compose_node(parent, index)


def parse_topology(text: str) -> TopologyDocument:
    """Parse and validate a topology file; raises TopologyFileError with the line and field."""
    if len(text) > MAX_TOPOLOGY_BYTES or len(text.encode("utf-8")) > MAX_TOPOLOGY_BYTES:
        raise TopologyFileError(topology_too_large())
    try:
        root = yaml.compose(text, Loader=_PlainLoader)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else "somewhere"
        raise TopologyFileError(
            f"{where}: the file is not valid YAML ({exc.problem or exc.context})"
        ) from None
    except yaml.YAMLError as exc:
        raise TopologyFileError(f"the file is not valid YAML ({exc})") from None
    if root is None:
        raise TopologyFileError("the file is empty: it needs a top-level 'clusters:' list")
    top = _mapping(root, "the file", {"clusters"}, ("clusters",))
    document = TopologyDocument()
    seen: set[str] = set()
    for cluster_node in _sequence(top["clusters"], "'clusters'"):
        cluster = _parse_cluster(cluster_node)
        if cluster.name in seen:
            _fail(cluster_node, f"cluster '{cluster.name}' appears twice")
        seen.add(cluster.name)
        document.clusters.append(cluster)
    return document


def _parse_cluster(node) -> ClusterSpec:
    values = _mapping(node, "a cluster", CLUSTER_KEYS, ("name",))
    name = _name(values["name"], "cluster name")
    what = f"cluster '{name}'"
    cluster = ClusterSpec(name=name, line=_line(node))
    if "shard_key" in values:
        cluster.shard_key = _scalar(values["shard_key"], f"{what} shard_key", allow_empty=True)
    if "description" in values:
        cluster.description = _scalar(
            values["description"], f"{what} description", allow_empty=True
        )

    # Duplicates are looked up in sets: a long list must not cost its length squared.
    instance_names: set[str] = set()
    for inode in _sequence(
        values.get("instances", yaml.ScalarNode("tag:yaml.org,2002:null", "")), f"{what} instances"
    ):
        instance = _parse_instance(inode, what)
        if instance.name in instance_names:
            _fail(inode, f"instance '{instance.name}' appears twice in {what}")
        instance_names.add(instance.name)
        cluster.instances.append(instance)

    shard_names: set[str] = set()
    shard_databases: set[tuple[str, str]] = set()
    for snode in _sequence(
        values.get("shards", yaml.ScalarNode("tag:yaml.org,2002:null", "")), f"{what} shards"
    ):
        svalues = _mapping(
            snode, f"a shard of {what}", SHARD_KEYS, ("name", "instance", "database")
        )
        shard = ShardSpec(
            name=_name(svalues["name"], f"shard name in {what}"),
            instance=_scalar(svalues["instance"], "shard instance"),
            database=_scalar(svalues["database"], "shard database"),
            line=_line(snode),
        )
        if len(shard.database) > 64:
            _fail(
                svalues["database"],
                f"database name of shard '{shard.name}' is longer than 64 characters",
            )
        if shard.instance not in instance_names:
            _fail(
                svalues["instance"],
                f"shard '{shard.name}' points at instance '{shard.instance}', which {what} does not list",
            )
        if shard.name in shard_names:
            _fail(snode, f"shard '{shard.name}' appears twice in {what}")
        if (shard.instance, shard.database) in shard_databases:
            _fail(
                snode,
                f"shard '{shard.name}' uses database '{shard.database}' on instance '{shard.instance}', which another shard already uses",
            )
        shard_names.add(shard.name)
        shard_databases.add((shard.instance, shard.database))
        cluster.shards.append(shard)

    table_names: set[str] = set()
    for tnode in _sequence(
        values.get("logical_tables", yaml.ScalarNode("tag:yaml.org,2002:null", "")),
        f"{what} logical_tables",
    ):
        tvalues = _mapping(
            tnode, f"a logical table of {what}", LOGICAL_TABLE_KEYS, ("name", "pattern")
        )
        table = LogicalTableSpec(
            name=_scalar(tvalues["name"], "logical table name"),
            pattern=_scalar(tvalues["pattern"], "logical table pattern"),
            line=_line(tnode),
        )
        refused = pattern_refusal(table.pattern)
        if refused:
            _fail(tvalues["pattern"], f"logical table '{table.name}': {refused}")
        if table.name in table_names:
            _fail(tnode, f"logical table '{table.name}' appears twice in {what}")
        table_names.add(table.name)
        cluster.logical_tables.append(table)

    if "drill_instance" in values:
        drill = _scalar(values["drill_instance"], f"{what} drill_instance", allow_empty=True)
        if drill and drill not in instance_names:
            _fail(
                values["drill_instance"], f"drill_instance '{drill}' is not an instance of {what}"
            )
        cluster.drill_instance = drill
    if "policy" in values:
        cluster.policy = _parse_policy(values["policy"], what)
    return cluster


def _parse_policy(node, cluster_what: str) -> dict:
    """The policy block's values as text (lists as lists of text); values are checked on import."""
    if isinstance(node, yaml.ScalarNode) and node.tag == "tag:yaml.org,2002:null":
        return {}
    values = _mapping(node, f"the policy of {cluster_what}", POLICY_KEYS, ())
    policy: dict = {}
    for key, value in values.items():
        if isinstance(value, yaml.SequenceNode):
            policy[key] = [
                _scalar(item, f"{cluster_what} policy {key} entry") for item in value.value
            ]
        else:
            policy[key] = _scalar(value, f"{cluster_what} policy {key}", allow_empty=True)
    return policy


def _parse_instance(node, cluster_what: str) -> InstanceSpec:
    values = _mapping(
        node, f"an instance of {cluster_what}", INSTANCE_KEYS, ("name", "host", "user")
    )
    name = _name(values["name"], f"instance name in {cluster_what}")
    what = f"instance '{name}'"
    instance = InstanceSpec(
        name=name,
        host=_scalar(values["host"], f"{what} host"),
        user=_scalar(values["user"], f"{what} user"),
        line=_line(node),
    )
    if "port" in values:
        instance.port = _int(values["port"], f"{what} port", 1, 65535)
    if "max_connections" in values:
        instance.max_connections = _int(values["max_connections"], f"{what} max_connections", 1, 64)
    if "password" in values:
        instance.password = _scalar(values["password"], f"{what} password", allow_empty=True)
    if "password_env" in values:
        instance.password_env = _scalar(values["password_env"], f"{what} password_env")
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", instance.password_env):
            _fail(
                values["password_env"], f"{what} password_env must be an environment variable name"
            )
        if instance.password is not None:
            _fail(values["password_env"], f"{what} gives both password and password_env: keep one")
    if "tls_ca" in values:
        instance.tls_ca = _scalar(values["tls_ca"], f"{what} tls_ca", allow_empty=True)
    if "tls_verify" in values:
        instance.tls_verify = _bool(values["tls_verify"], f"{what} tls_verify")
    if "datadir" in values:
        instance.datadir = _scalar(values["datadir"], f"{what} datadir", allow_empty=True)
        if instance.datadir and not instance.datadir.startswith("/"):
            _fail(values["datadir"], f"{what} datadir must be an absolute path")
    if "agent_queue" in values:
        instance.agent_queue = _scalar(
            values["agent_queue"], f"{what} agent_queue", allow_empty=True
        )
        if instance.agent_queue and not re.fullmatch(
            r"[A-Za-z0-9][A-Za-z0-9_.-]*", instance.agent_queue
        ):
            _fail(
                values["agent_queue"],
                f"{what} agent_queue must be a queue name (letters, digits, '-', '_', '.')",
            )
    return instance


def dump_topology(clusters: list[dict]) -> str:
    """YAML for a list of plain cluster dicts (keys as in the file); never holds passwords."""
    return yaml.safe_dump(
        {"clusters": clusters}, sort_keys=False, allow_unicode=True, default_flow_style=False
    )
