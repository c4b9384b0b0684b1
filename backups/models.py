"""Backup sets, restores, approvals and verification runs (DESIGN.md)."""

from django.conf import settings
from django.db import models

from backups.status import (
    CopyStatus,
    PartStatus,
    RequestState,
    ResultStatus,
    RunStatus,
    SetStatus,
    VerificationStatus,
)
from shards.models import Cluster, Instance, Shard

USER = settings.AUTH_USER_MODEL

# DESIGN.md "Methods": the seed's hot, warm and cold backups are these consistency modes.
TEMPERATURE = {"lockfree": "hot", "locked": "warm", "cold": "cold"}


def method_label(consistency: str, method: str) -> str:
    """ "warm (locked), logical" for consistency "locked" and method "logical" (cold: "cold")."""
    temperature = TEMPERATURE.get(consistency, consistency)
    named = temperature if temperature == consistency else f"{temperature} ({consistency})"
    return f"{named}, {method or 'logical'}"


class BackupPolicy(models.Model):
    """Per-cluster schedule, retention, encryption and drill settings."""

    cluster = models.OneToOneField(Cluster, on_delete=models.CASCADE, related_name="policy")
    compression_level = models.PositiveSmallIntegerField(default=1)
    encrypt = models.BooleanField(default=False)
    retention_days = models.PositiveIntegerField(default=30)
    rpo_target_minutes = models.PositiveIntegerField(default=24 * 60)
    # 0 = off. Continuous capture of incrementals every N minutes.
    incremental_every_minutes = models.PositiveIntegerField(default=0)
    verify_automatically = models.BooleanField(default=True)
    drill_every_days = models.PositiveIntegerField(default=0)
    webhook_url = models.URLField(blank=True)
    # Schedules (DESIGN.md "Policies, schedules and retention"); cron is UTC, empty = none.
    full_cron = models.CharField(max_length=200, blank=True)
    full_consistency = models.CharField(max_length=10, default="locked")
    full_method = models.CharField(max_length=10, default="logical")
    # Retention: GFS plus a floor of days.
    keep_full = models.PositiveIntegerField(default=7)
    keep_daily = models.PositiveIntegerField(default=7)
    keep_weekly = models.PositiveIntegerField(default=4)
    keep_monthly = models.PositiveIntegerField(default=6)
    keep_days = models.PositiveIntegerField(default=7)
    copy_to = models.JSONField(default=list, blank=True)  # storage target names
    exclude_tables = models.JSONField(default=list, blank=True)  # "database.table" globs
    max_threads_running = models.PositiveIntegerField(default=0)  # 0 = off
    updated_at = models.DateTimeField(auto_now=True)

    def __str__(self) -> str:
        return f"policy of {self.cluster_id}"


class BackupSet(models.Model):
    class Kind(models.TextChoices):
        FULL = "full"
        INCREMENTAL = "incremental"

    Status = SetStatus

    class Consistency(models.TextChoices):
        LOCKED = "locked"
        LOCKFREE = "lockfree"
        COLD = "cold"

    class Method(models.TextChoices):
        LOGICAL = "logical"
        PHYSICAL = "physical"

    class Trigger(models.TextChoices):
        USER = "user"
        SCHEDULER = "scheduler"

    cluster = models.ForeignKey(Cluster, on_delete=models.PROTECT, related_name="backup_sets")
    kind = models.CharField(max_length=12, choices=Kind.choices, default=Kind.FULL)
    parent = models.ForeignKey(
        "self", null=True, blank=True, on_delete=models.PROTECT, related_name="children"
    )
    status = models.CharField(max_length=12, choices=Status.choices, default=Status.PENDING)
    consistency = models.CharField(
        max_length=10, choices=Consistency.choices, default=Consistency.LOCKED
    )
    method = models.CharField(max_length=10, choices=Method.choices, default=Method.LOGICAL)
    compression_level = models.PositiveSmallIntegerField(default=1)
    encrypted = models.BooleanField(default=False)
    key_id = models.CharField(max_length=32, blank=True)
    wrapped_key = models.TextField(blank=True)  # the set's data key, wrapped by the master key
    storage_url = models.CharField(max_length=500)
    object_prefix = models.CharField(max_length=500, blank=True)  # <prefix>/<cluster>/<set-id>
    manifest_sha256 = models.CharField(max_length=64, blank=True)
    triggered_by = models.ForeignKey(
        USER, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    # "scheduler" for sets the policy's schedule started; "user" otherwise (triggered_by says who).
    trigger = models.CharField(max_length=10, choices=Trigger.choices, default=Trigger.USER)
    job_id = models.CharField(max_length=100, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)
    started_at = models.DateTimeField(null=True, blank=True)
    finished_at = models.DateTimeField(null=True, blank=True)
    # Tables the policy's exclude_tables kept out of the set: ["db.table", ...].
    excluded_tables = models.JSONField(default=list, blank=True)
    # Holds (`backups hold`): a held set is never removed by retention.
    hold_reason = models.TextField(blank=True)
    held_by = models.ForeignKey(
        USER, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    held_at = models.DateTimeField(null=True, blank=True)
    # Retention began removing this set's objects; set until the set is `expired`.
    expiring_since = models.DateTimeField(null=True, blank=True)
    # The instant the set restores to (the cut for locked; the latest shard snapshot for lockfree;
    # the newest event for incrementals).
    consistent_at = models.DateTimeField(null=True, blank=True)
    rows = models.BigIntegerField(default=0)
    raw_bytes = models.BigIntegerField(default=0)
    stored_bytes = models.BigIntegerField(default=0)
    lock_window_ms = models.FloatField(null=True, blank=True)
    # While a cold set holds the global read lock: instance name -> server thread id of the
    # connection holding it, so a cancel can KILL it at once (emptied when the lock is released).
    lock_sessions = models.JSONField(default=dict, blank=True)
    error = models.TextField(blank=True)
    cancel_requested = models.BooleanField(default=False)
    heartbeat_at = models.DateTimeField(null=True, blank=True)
    # Progress for pages: totals and done-so-far, written at most about once a second.
    rows_estimate = models.BigIntegerField(default=0)
    rows_done = models.BigIntegerField(default=0)
    bytes_done = models.BigIntegerField(default=0)
    progress_text = models.CharField(max_length=300, blank=True)
    # Latest verification summary (denormalised from VerificationRun for list pages).
    q = models.FloatField(null=True, blank=True)
    verified_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["-id"]
        indexes = [models.Index(fields=["cluster", "status", "-id"])]

    def __str__(self) -> str:
        return f"set {self.pk} ({self.kind}, {self.cluster_id})"

    @property
    def duration_seconds(self) -> float | None:
        if self.started_at and self.finished_at:
            return (self.finished_at - self.started_at).total_seconds()
        return None

    @property
    def compression_ratio(self) -> float | None:
        return self.raw_bytes / self.stored_bytes if self.stored_bytes else None

    @property
    def method_label(self) -> str:
        """The backup method by name, as every page, report and `--json` shows it:
        "hot (lockfree), logical", "warm (locked), logical", "cold, logical", "..., physical"."""
        return method_label(self.consistency, self.method)

    @property
    def is_active(self) -> bool:
        return self.status in SetStatus.ACTIVE

    @property
    def is_final(self) -> bool:
        return self.status in SetStatus.FINAL

    @property
    def succeeded(self) -> bool:
        """A usable set: every object and the manifest stored and checked."""
        return self.status == SetStatus.SUCCEEDED


class ShardBackup(models.Model):
    """One shard's part of a set: its coordinates, counts and outcome."""

    Status = PartStatus

    backup_set = models.ForeignKey(
        BackupSet, on_delete=models.CASCADE, related_name="shard_backups"
    )
    shard = models.ForeignKey(Shard, on_delete=models.PROTECT, related_name="+")
    # Denormalised so a page can render without the topology (which may change later).
    shard_name = models.CharField(max_length=63)
    instance_name = models.CharField(max_length=63)
    database = models.CharField(max_length=64)
    status = models.CharField(max_length=12, choices=PartStatus.choices, default="pending")
    binlog_file = models.CharField(max_length=255, blank=True)
    binlog_pos = models.BigIntegerField(null=True, blank=True)
    gtid = models.TextField(blank=True)
    # For incrementals: where this set's binlog ends.
    end_binlog_file = models.CharField(max_length=255, blank=True)
    end_binlog_pos = models.BigIntegerField(null=True, blank=True)
    end_gtid = models.TextField(blank=True)
    snapshot_at = models.DateTimeField(null=True, blank=True)
    started_at = models.DateTimeField(null=True, blank=True)
    finished_at = models.DateTimeField(null=True, blank=True)
    rows = models.BigIntegerField(default=0)
    raw_bytes = models.BigIntegerField(default=0)
    stored_bytes = models.BigIntegerField(default=0)
    rows_estimate = models.BigIntegerField(default=0)
    rows_done = models.BigIntegerField(default=0)
    bytes_done = models.BigIntegerField(default=0)
    error = models.TextField(blank=True)
    worker = models.CharField(max_length=255, blank=True)  # host:pid of the process that ran it

    class Meta:
        ordering = ["backup_set", "shard_name"]
        constraints = [
            models.UniqueConstraint(fields=["backup_set", "shard"], name="shard_backup_unique"),
        ]

    def __str__(self) -> str:
        return f"{self.shard_name} of set {self.backup_set_id}"


class TableBackup(models.Model):
    Status = PartStatus

    shard_backup = models.ForeignKey(ShardBackup, on_delete=models.CASCADE, related_name="tables")
    database = models.CharField(max_length=64)
    name = models.CharField(max_length=64)
    engine = models.CharField(max_length=32, blank=True)
    has_primary_key = models.BooleanField(default=True)
    status = models.CharField(max_length=12, choices=PartStatus.choices, default="pending")
    rows = models.BigIntegerField(default=0)
    rows_estimate = models.BigIntegerField(default=0)
    raw_bytes = models.BigIntegerField(default=0)
    stored_bytes = models.BigIntegerField(default=0)
    chunk_count = models.PositiveIntegerField(default=0)
    checksum = models.CharField(max_length=64, blank=True)
    error = models.TextField(blank=True)
    started_at = models.DateTimeField(null=True, blank=True)
    finished_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["shard_backup", "name"]
        constraints = [
            models.UniqueConstraint(fields=["shard_backup", "name"], name="table_backup_unique"),
        ]

    def __str__(self) -> str:
        return f"{self.database}.{self.name}"

    @property
    def is_active(self) -> bool:
        return self.status in PartStatus.ACTIVE


class Chunk(models.Model):
    table_backup = models.ForeignKey(TableBackup, on_delete=models.CASCADE, related_name="chunks")
    index = models.PositiveIntegerField()
    key = models.CharField(max_length=1000)
    rows = models.BigIntegerField(default=0)
    raw_bytes = models.BigIntegerField(default=0)
    stored_bytes = models.BigIntegerField(default=0)
    sha256 = models.CharField(max_length=64)

    class Meta:
        ordering = ["table_backup", "index"]
        constraints = [
            models.UniqueConstraint(fields=["table_backup", "index"], name="chunk_unique_index"),
        ]

    def __str__(self) -> str:
        return self.key


class BinlogSegment(models.Model):
    """A raw binlog byte range of one instance, captured by an incremental set."""

    backup_set = models.ForeignKey(BackupSet, on_delete=models.CASCADE, related_name="segments")
    instance = models.ForeignKey(Instance, on_delete=models.PROTECT, related_name="+")
    instance_name = models.CharField(max_length=63)
    index = models.PositiveIntegerField()
    key = models.CharField(max_length=1000)
    first_file = models.CharField(max_length=255)
    first_pos = models.BigIntegerField()
    last_file = models.CharField(max_length=255)
    last_pos = models.BigIntegerField()
    first_gtid = models.TextField(blank=True)
    last_gtid = models.TextField(blank=True)
    first_event_at = models.DateTimeField(null=True, blank=True)
    last_event_at = models.DateTimeField(null=True, blank=True)
    events = models.BigIntegerField(default=0)
    raw_bytes = models.BigIntegerField(default=0)
    stored_bytes = models.BigIntegerField(default=0)
    sha256 = models.CharField(max_length=64)
    tables = models.JSONField(default=list, blank=True)  # ["db.table", ...] touched

    class Meta:
        ordering = ["backup_set", "instance_name", "index"]

    def __str__(self) -> str:
        return self.key


class RestoreRequest(models.Model):
    State = RequestState

    class Target(models.TextChoices):
        SIDE = "side"
        INSTANCE = "instance"
        INPLACE = "inplace"
        REBUILD = "rebuild"  # a lost instance from a physical set, into an empty datadir

    cluster = models.ForeignKey(Cluster, on_delete=models.PROTECT, related_name="restore_requests")
    source_set = models.ForeignKey(
        BackupSet, null=True, blank=True, on_delete=models.PROTECT, related_name="restore_requests"
    )
    at = models.DateTimeField(null=True, blank=True)  # point-in-time target, if any
    # `--before-gtid`: the GTID whose shard stops right before it (others at its commit second).
    before_gtid = models.CharField(max_length=100, blank=True)
    # `--until INSTANCE:FILE:POS` and the resolved before-gtid position:
    # [{"instance", "file", "pos", "gtid"?, "databases"?}], one per instance.
    stop_positions = models.JSONField(default=list, blank=True)
    # {"shards": [names], "tables": [logical or physical names]}; empty lists mean everything.
    scope = models.JSONField(default=dict, blank=True)
    # Flashback (`--flashback`): {"gtids": [...]} or {"since": ISO, "until": ISO}; empty: none.
    flashback = models.JSONField(default=dict, blank=True)
    # The flashback's generated SQL, stored in the default storage with its sha256.
    artifact_key = models.CharField(max_length=1000, blank=True)
    artifact_sha256 = models.CharField(max_length=64, blank=True)
    artifact_bytes = models.BigIntegerField(default=0)
    target_kind = models.CharField(max_length=10, choices=Target.choices)
    target_instance = models.ForeignKey(
        Instance, null=True, blank=True, on_delete=models.PROTECT, related_name="+"
    )
    # `rebuild` only: the empty data directory the instance is rebuilt into.
    datadir = models.CharField(max_length=500, blank=True)
    reason = models.TextField()
    requested_by = models.ForeignKey(USER, on_delete=models.PROTECT, related_name="+")
    state = models.CharField(
        max_length=20, choices=State.choices, default=State.PENDING_APPROVAL, db_index=True
    )
    approvals_required = models.PositiveSmallIntegerField(default=1)
    plan = models.JSONField(default=dict, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)
    expires_at = models.DateTimeField()
    approved_at = models.DateTimeField(null=True, blank=True)
    decided_at = models.DateTimeField(null=True, blank=True)
    error = models.TextField(blank=True)

    class Meta:
        ordering = ["-id"]

    def __str__(self) -> str:
        return f"restore request {self.pk} ({self.state})"

    @property
    def awaits_decision(self) -> bool:
        return self.state == RequestState.PENDING_APPROVAL

    @property
    def is_approved(self) -> bool:
        return self.state == RequestState.APPROVED

    @property
    def is_flashback(self) -> bool:
        return bool(self.flashback)

    @property
    def target_label(self) -> str:
        if self.target_kind == self.Target.INSTANCE and self.target_instance_id:
            return f"instance:{self.target_instance.name}"
        if self.target_kind == self.Target.REBUILD and self.target_instance_id:
            return f"rebuild:{self.target_instance.name}"
        return self.target_kind


class Approval(models.Model):
    class Decision(models.TextChoices):
        APPROVE = "approve"
        REJECT = "reject"

    request = models.ForeignKey(RestoreRequest, on_delete=models.CASCADE, related_name="approvals")
    approver = models.ForeignKey(USER, on_delete=models.PROTECT, related_name="+")
    decision = models.CharField(max_length=8, choices=Decision.choices)
    comment = models.TextField(blank=True)
    at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["request", "at", "id"]
        constraints = [
            models.UniqueConstraint(fields=["request", "approver"], name="approval_once_per_user"),
        ]

    def __str__(self) -> str:
        return f"{self.decision} by {self.approver_id} on {self.request_id}"


class RestoreRun(models.Model):
    Status = RunStatus

    request = models.ForeignKey(RestoreRequest, on_delete=models.PROTECT, related_name="runs")
    status = models.CharField(max_length=12, choices=RunStatus.choices, default=RunStatus.PENDING)
    job_id = models.CharField(max_length=100, blank=True)
    started_by = models.ForeignKey(
        USER, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    created_at = models.DateTimeField(auto_now_add=True)
    started_at = models.DateTimeField(null=True, blank=True)
    finished_at = models.DateTimeField(null=True, blank=True)
    heartbeat_at = models.DateTimeField(null=True, blank=True)
    cancel_requested = models.BooleanField(default=False)
    rows_estimate = models.BigIntegerField(default=0)
    rows_done = models.BigIntegerField(default=0)
    bytes_done = models.BigIntegerField(default=0)
    progress_text = models.CharField(max_length=300, blank=True)
    t = models.FloatField(null=True, blank=True)
    d = models.FloatField(null=True, blank=True)
    a = models.FloatField(null=True, blank=True)
    q = models.FloatField(null=True, blank=True)
    # For point-in-time restores: the instant each shard was rolled forward to.
    restored_to = models.DateTimeField(null=True, blank=True)
    # Where each shard's binlog apply stopped: [{"shard", "instance", "file", "pos", "gtid",
    # "time", "next_gtid", "reached", "target"}].
    stop_points = models.JSONField(default=list, blank=True)
    # {"objects": {target: objects it served}, "fallbacks": [{"object", "target", "reason",
    #  "served_by"}]}: which storage target served the reads (backups.services.storage_targets)
    served_by = models.JSONField(default=dict, blank=True)
    error = models.TextField(blank=True)

    class Meta:
        ordering = ["-id"]

    def __str__(self) -> str:
        return f"restore run {self.pk} of request {self.request_id}"


class RestoreTableResult(models.Model):
    Status = ResultStatus

    run = models.ForeignKey(RestoreRun, on_delete=models.CASCADE, related_name="results")
    shard_name = models.CharField(max_length=63)
    database = models.CharField(max_length=64)
    table = models.CharField(max_length=64)
    target_instance_name = models.CharField(max_length=63)
    target_database = models.CharField(max_length=64)
    target_table = models.CharField(max_length=64)
    status = models.CharField(max_length=12, choices=ResultStatus.choices, default="pending")
    rows_expected = models.BigIntegerField(default=0)
    rows = models.BigIntegerField(default=0)
    checksum_expected = models.CharField(max_length=64, blank=True)
    checksum = models.CharField(max_length=64, blank=True)
    checksum_ok = models.BooleanField(null=True)
    error = models.TextField(blank=True)
    # host:pid of the worker process that restored the table's shard (a part of the run).
    worker = models.CharField(max_length=100, blank=True)

    class Meta:
        ordering = ["run", "shard_name", "table"]

    def __str__(self) -> str:
        return f"{self.target_database}.{self.target_table}"


class LoadedChunk(models.Model):
    """A chunk already loaded by a run or drill, skipped when it is retried."""

    run = models.ForeignKey(
        RestoreRun, null=True, blank=True, on_delete=models.CASCADE, related_name="loaded_chunks"
    )
    verification = models.ForeignKey(
        "VerificationRun", null=True, blank=True, on_delete=models.CASCADE, related_name="+"
    )
    key = models.CharField(max_length=1000)
    rows = models.BigIntegerField(default=0)
    loaded_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        indexes = [models.Index(fields=["run", "key"])]

    def __str__(self) -> str:
        return self.key


class VerificationRun(models.Model):
    Status = VerificationStatus

    backup_set = models.ForeignKey(
        BackupSet, on_delete=models.CASCADE, related_name="verifications"
    )
    drill = models.BooleanField(default=False)
    status = models.CharField(
        max_length=12, choices=VerificationStatus.choices, default=VerificationStatus.PENDING
    )
    job_id = models.CharField(max_length=100, blank=True)
    triggered_by = models.ForeignKey(
        USER, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    created_at = models.DateTimeField(auto_now_add=True)
    started_at = models.DateTimeField(null=True, blank=True)
    finished_at = models.DateTimeField(null=True, blank=True)
    heartbeat_at = models.DateTimeField(null=True, blank=True)
    progress_text = models.CharField(max_length=300, blank=True)
    t = models.FloatField(null=True, blank=True)
    d = models.FloatField(null=True, blank=True)
    a = models.FloatField(null=True, blank=True)
    q = models.FloatField(null=True, blank=True)
    rto_seconds = models.FloatField(null=True, blank=True)  # drills only
    drill_instance_name = models.CharField(max_length=63, blank=True)
    # "" reads every target with fallback; a target name checks that one copy only.
    target = models.CharField(max_length=63, blank=True)
    # {"objects": {target: objects it served}, "fallbacks": [{"object", "target", "reason",
    #  "served_by"}]}: which storage target served the reads (backups.services.storage_targets)
    served_by = models.JSONField(default=dict, blank=True)
    # [{"object": key} or {"table": "db.t"}, "reason": "..."]
    problems = models.JSONField(default=list, blank=True)
    error = models.TextField(blank=True)

    class Meta:
        ordering = ["-id"]

    def __str__(self) -> str:
        return f"verification {self.pk} of set {self.backup_set_id}"


class ScheduleTick(models.Model):
    """One tick of a cluster's schedule, recorded once: two schedulers that fire the same tick
    meet at the unique constraint, and only the first starts anything."""

    class Outcome(models.TextChoices):
        STARTED = "started"  # a set was recorded (see backup_set; it may have failed to start)
        SKIPPED = "skipped"  # another backup of the cluster was pending or running

    cluster = models.ForeignKey(Cluster, on_delete=models.CASCADE, related_name="schedule_ticks")
    kind = models.CharField(max_length=12)  # "full" or "incremental": which schedule fired
    tick_at = models.DateTimeField()  # the scheduled time (UTC)
    outcome = models.CharField(max_length=10, choices=Outcome.choices)
    backup_set = models.ForeignKey(
        BackupSet, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    note = models.TextField(blank=True)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["-tick_at"]
        constraints = [
            models.UniqueConstraint(
                fields=["cluster", "kind", "tick_at"], name="schedule_tick_once"
            ),
        ]

    def __str__(self) -> str:
        return f"{self.kind} tick {self.tick_at:%Y-%m-%d %H:%M} of {self.cluster_id}"


class StorageTarget(models.Model):
    """A named place that holds copies of sets (DESIGN.md "Storage targets and copies").

    The target named `default` is STORAGE_URL (+ S3_ENDPOINT_URL) and has no row.
    `options` holds S3 options (sse, sse_kms_key_id, storage_class, region,
    addressing_style), applied as the URL's query parameters.
    """

    name = models.CharField(max_length=63, unique=True)
    url = models.CharField(max_length=500)
    endpoint = models.CharField(max_length=500, blank=True)
    options = models.JSONField(default=dict, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)
    created_by = models.ForeignKey(
        USER, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )

    class Meta:
        ordering = ["name"]

    def __str__(self) -> str:
        return self.name


class SetCopy(models.Model):
    """A set's copy on one `copy_to` target."""

    Status = CopyStatus

    backup_set = models.ForeignKey(BackupSet, on_delete=models.CASCADE, related_name="copies")
    target = models.CharField(max_length=63)
    state = models.CharField(max_length=10, choices=CopyStatus.choices, default="pending")
    attempts = models.PositiveIntegerField(default=0)
    objects_copied = models.PositiveIntegerField(default=0)
    bytes = models.BigIntegerField(default=0)
    error = models.TextField(blank=True)
    created_at = models.DateTimeField(auto_now_add=True)
    started_at = models.DateTimeField(null=True, blank=True)
    finished_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["backup_set", "id"]
        constraints = [
            models.UniqueConstraint(fields=["backup_set", "target"], name="set_copy_once"),
        ]

    def __str__(self) -> str:
        return f"copy of set {self.backup_set_id} on {self.target}"


class PhysicalObject(models.Model):
    """One instance's object of a physical set (mariabackup's stream), as its manifest lists
    it: what the set page shows without reading storage."""

    backup_set = models.ForeignKey(
        BackupSet, on_delete=models.CASCADE, related_name="physical_objects"
    )
    instance_name = models.CharField(max_length=63)
    key = models.CharField(max_length=1024)
    sha256 = models.CharField(max_length=64)
    stored_bytes = models.BigIntegerField(default=0)
    raw_bytes = models.BigIntegerField(default=0)
    binlog_file = models.CharField(max_length=255, blank=True)
    binlog_pos = models.BigIntegerField(null=True, blank=True)
    gtid = models.TextField(blank=True)

    class Meta:
        ordering = ["backup_set", "instance_name"]
        constraints = [
            models.UniqueConstraint(
                fields=["backup_set", "instance_name"], name="physical_object_once"
            ),
        ]

    def __str__(self) -> str:
        return f"{self.instance_name} of set {self.backup_set_id}"
