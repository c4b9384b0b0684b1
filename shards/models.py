"""Topology: clusters, the servers they span, their shards and tables."""

from django.core.validators import MaxValueValidator, MinValueValidator, RegexValidator
from django.db import models

from backups.status import Lifecycle, lifecycle

NAME_VALIDATOR = RegexValidator(
    r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$",
    "use letters, digits, '_', '.' or '-' (at most 63, starting with a letter or digit)",
)


# Top-level storage prefixes that are not a cluster's `<cluster>/<set-id>/...`: a cluster of
# that name would put its sets (and the orphan sweep's listing) over them.
RESERVED_CLUSTER_NAMES = frozenset({"flashback"})  # flashback/<cluster>/request-<id>.sql


class Severity(models.TextChoices):
    OK = "ok", "ok"
    WARNING = "warning", "warning"
    ERROR = "error", "error"


SEVERITY_RANK = {Severity.OK: 0, Severity.WARNING: 1, Severity.ERROR: 2}


class Cluster(models.Model):
    name = models.CharField(max_length=63, unique=True, validators=[NAME_VALIDATOR])
    shard_key = models.CharField(max_length=64, blank=True)
    description = models.CharField(max_length=300, blank=True)
    drill_instance = models.ForeignKey(
        "Instance", null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    # Approvals required for a restore; DESIGN.md's minimums are 1 and 2.
    approvals_required_side = models.PositiveSmallIntegerField(
        default=1, validators=[MinValueValidator(1), MaxValueValidator(5)]
    )
    approvals_required_inplace = models.PositiveSmallIntegerField(
        default=2, validators=[MinValueValidator(2), MaxValueValidator(5)]
    )
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["name"]

    def __str__(self) -> str:
        return self.name


class Instance(models.Model):
    """One MySQL/MariaDB server of a cluster."""

    cluster = models.ForeignKey(Cluster, on_delete=models.CASCADE, related_name="instances")
    name = models.CharField(max_length=63, validators=[NAME_VALIDATOR])
    host = models.CharField(max_length=255)
    port = models.PositiveIntegerField(
        default=3306, validators=[MinValueValidator(1), MaxValueValidator(65535)]
    )
    user = models.CharField(max_length=80)
    # Fernet token (console.keys.encrypt_secret); never shown again.
    password_encrypted = models.TextField(blank=True)
    # Name of an environment variable read at connect time, instead of a stored password.
    password_env = models.CharField(max_length=128, blank=True)
    tls_ca = models.CharField(max_length=500, blank=True)
    tls_verify = models.BooleanField(default=False)
    max_connections = models.PositiveSmallIntegerField(
        default=4,
        validators=[MinValueValidator(1), MaxValueValidator(64)],
        help_text="Most connections ShardVault opens to this server at once.",
    )
    # The identity its server reported (backups/engine/identity.py) the first time data was
    # sent to it by a drill, and the user@host:port it was recorded for (shards/services/
    # identity.py): later drills refuse a different server behind that address.
    identity = models.CharField(max_length=300, blank=True)
    identity_address = models.CharField(max_length=400, blank=True)
    # Physical backups (mariabackup) read the server's data directory: the path on the
    # database host, and the RQ queue served by a worker there (`host-<name>`); both optional.
    datadir = models.CharField(max_length=500, blank=True)
    agent_queue = models.CharField(max_length=100, blank=True)
    # Filled by discovery.
    server_version = models.CharField(max_length=120, blank=True)
    flavour = models.CharField(max_length=20, blank=True)
    server_id = models.BigIntegerField(null=True, blank=True)
    discovered_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["cluster", "name"]
        constraints = [
            models.UniqueConstraint(fields=["cluster", "name"], name="instance_unique_name"),
        ]

    def __str__(self) -> str:
        return f"{self.name} ({self.host}:{self.port})"


class Shard(models.Model):
    cluster = models.ForeignKey(Cluster, on_delete=models.CASCADE, related_name="shards")
    name = models.CharField(max_length=63, validators=[NAME_VALIDATOR])
    instance = models.ForeignKey(Instance, on_delete=models.PROTECT, related_name="shards")
    database = models.CharField(max_length=64)

    class Meta:
        ordering = ["cluster", "name"]
        constraints = [
            models.UniqueConstraint(fields=["cluster", "name"], name="shard_unique_name"),
            models.UniqueConstraint(fields=["instance", "database"], name="shard_unique_database"),
        ]

    def __str__(self) -> str:
        return f"{self.name} ({self.database})"


class LogicalTable(models.Model):
    """A name for the physical tables, across shards, whose names match `pattern`."""

    cluster = models.ForeignKey(Cluster, on_delete=models.CASCADE, related_name="logical_tables")
    name = models.CharField(max_length=64)
    pattern = models.CharField(max_length=200, help_text="A regular expression matched in full.")

    class Meta:
        ordering = ["cluster", "name"]
        constraints = [
            models.UniqueConstraint(fields=["cluster", "name"], name="logical_table_unique_name"),
        ]

    def __str__(self) -> str:
        return self.name


class PhysicalTable(models.Model):
    """A table found by discovery in one shard's database."""

    shard = models.ForeignKey(Shard, on_delete=models.CASCADE, related_name="tables")
    name = models.CharField(max_length=64)
    engine = models.CharField(max_length=32, blank=True)
    rows_estimate = models.BigIntegerField(default=0)
    data_bytes = models.BigIntegerField(default=0)
    index_bytes = models.BigIntegerField(default=0)
    has_primary_key = models.BooleanField(default=False)
    discovered_at = models.DateTimeField()

    class Meta:
        ordering = ["shard", "name"]
        constraints = [
            models.UniqueConstraint(fields=["shard", "name"], name="physical_table_unique_name"),
        ]

    def __str__(self) -> str:
        return self.name

    @property
    def total_bytes(self) -> int:
        return self.data_bytes + self.index_bytes


@lifecycle(active=("pending", "running"), final=("succeeded", "failed"))
class DiscoveryStatus(Lifecycle):
    """A DiscoveryRun: queued, running, then ended."""

    PENDING = "pending"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"


class DiscoveryRun(models.Model):
    Status = DiscoveryStatus

    cluster = models.ForeignKey(Cluster, on_delete=models.CASCADE, related_name="discoveries")
    status = models.CharField(max_length=16, choices=Status.choices, default=Status.PENDING)
    job_id = models.CharField(max_length=100, blank=True)
    progress = models.PositiveSmallIntegerField(default=0)  # percent
    progress_text = models.CharField(max_length=200, blank=True)
    error = models.TextField(blank=True)
    requested_by = models.ForeignKey(
        "auth.User", null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    created_at = models.DateTimeField(auto_now_add=True)
    finished_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["-id"]

    def __str__(self) -> str:
        return f"discovery #{self.pk} of {self.cluster_id} ({self.status})"

    @property
    def is_active(self) -> bool:
        return self.status in DiscoveryStatus.ACTIVE


class Finding(models.Model):
    """One preflight result from the latest discovery of a cluster."""

    cluster = models.ForeignKey(Cluster, on_delete=models.CASCADE, related_name="findings")
    discovery = models.ForeignKey(
        DiscoveryRun, null=True, blank=True, on_delete=models.CASCADE, related_name="findings"
    )
    severity = models.CharField(max_length=10, choices=Severity.choices)
    code = models.CharField(max_length=60)
    instance = models.ForeignKey(Instance, null=True, blank=True, on_delete=models.CASCADE)
    shard = models.ForeignKey(Shard, null=True, blank=True, on_delete=models.CASCADE)
    table = models.CharField(max_length=64, blank=True)
    message = models.TextField()

    class Meta:
        ordering = ["cluster", "id"]

    def __str__(self) -> str:
        return f"[{self.severity}] {self.message}"
