"""The one module that talks to RQ: queue names, enqueue by dotted path, job ids, periodic jobs.

Services enqueue through here by the job function's dotted path, so they never import a
job module; no other module imports `rq` or `django_rq` (`make lint` holds this).

Job ids are derived from what a job works on (`backup-<set>`, `restore-<run>`, ...): a
second `enqueue` of an id whose job is still waiting or running is refused (returns None).

Every periodic job is declared once, in PERIODIC. `periodic_ensure_scheduled()` arms them
on RQ's scheduler (workers started with `--with-scheduler`); each run re-arms itself.
"""

from __future__ import annotations

import importlib
import logging
import pkgutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import django_rq
from django.conf import settings
from redis.exceptions import RedisError
from rq import Callback, Retry, Worker, get_current_job
from rq.exceptions import NoSuchJobError
from rq.job import Job

log = logging.getLogger(__name__)

BACKUPS = "backups"
RESTORES = "restores"
VERIFY = "verify"
DEFAULT = "default"  # discovery and housekeeping
QUEUES = (BACKUPS, RESTORES, VERIFY, DEFAULT)

# RQ statuses of a job that still counts as waiting or running.
LIVE_STATUSES = ("queued", "started", "deferred", "scheduled")

QueueUnavailable = RedisError  # what callers catch when Redis cannot be reached


def redis_connection(queue: str = DEFAULT):
    """The Redis connection RQ uses (for connection slots and barriers). A queue that is not
    configured (a host agent's `host-<name>`) lives on the default queue's Redis."""
    if queue not in settings.RQ_QUEUES:
        queue = DEFAULT
    return django_rq.get_connection(queue)


def _rq_queue(queue: str, **options):
    """The RQ queue `queue`; a host agent's queue need not be configured in RQ_QUEUES."""
    if queue in settings.RQ_QUEUES:
        return django_rq.get_queue(queue, **options)
    from rq import Queue

    return Queue(queue, connection=redis_connection(queue))


def job_outcome(job_id: str, *, queue: str) -> tuple[str, Any]:
    """(status, what the job returned) once it finished, (status, the end of its traceback)
    when it failed, else (status, None). Status as `job_status` says it."""
    try:
        job = Job.fetch(job_id, connection=redis_connection(queue))
    except NoSuchJobError:
        return "missing", None
    except Exception:  # noqa: BLE001 - Redis down
        return "unknown", None
    status = str(getattr(job.get_status(refresh=False), "value", "") or "unknown")
    if status == "finished":
        return status, job.return_value()
    if status == "failed":
        result = job.latest_result()
        text = (getattr(result, "exc_string", "") or "").strip().splitlines()
        return status, text[-1] if text else "the job failed"
    return status, None


def job_status(job_id: str, *, queue: str = DEFAULT) -> str:
    """RQ's status of a job: `queued`, `started`, `finished`, `failed`, ..., `missing` when
    RQ has no such job, `unknown` when Redis cannot be asked (never guess a death from it)."""
    if not job_id:
        return "missing"
    try:
        job = Job.fetch(job_id, connection=redis_connection(queue))
    except NoSuchJobError:
        return "missing"
    except Exception:  # noqa: BLE001 - Redis down
        return "unknown"
    status = job.get_status(refresh=False)
    return str(getattr(status, "value", status) or "unknown")


def enqueue(
    path: str,
    *args: Any,
    queue: str,
    job_id: str | None = None,
    description: str = "",
    timeout: int | None = None,
    on_failure: str | None = None,
    at: datetime | None = None,
    after: timedelta | None = None,
    result_ttl: int = 7 * 24 * 3600,
    failure_ttl: int = 30 * 24 * 3600,
    retry_after: list[int] | None = None,
) -> str | None:
    """Queue `path(*args)` on `queue` (now, `at` a time, or `after` a delay).

    `retry_after` (seconds) lets RQ run a job that raised again after each delay in turn.
    Returns the job id, or None when a job with `job_id` is still waiting or running (a
    duplicate is never queued). Raises QueueUnavailable when Redis cannot be reached.
    """
    # Callers defer to transaction.on_commit themselves; "auto" enqueues now even inside an
    # atomic block (django-rq's default would defer it there and return None, and a Redis
    # failure would surface later instead of here).
    rq_queue = _rq_queue(queue, commit_mode="auto")
    if job_id and job_status(job_id, queue=queue) in LIVE_STATUSES:
        return None
    options: dict[str, Any] = {
        "job_id": job_id,
        "description": description or None,
        "result_ttl": result_ttl,
        "failure_ttl": failure_ttl,
    }
    if timeout is not None:
        options["job_timeout"] = timeout
    if on_failure:
        options["on_failure"] = Callback(on_failure)
    if retry_after:
        options["retry"] = Retry(max=len(retry_after), interval=list(retry_after))
    if at is not None:
        job = rq_queue.enqueue_at(at, path, *args, **options)
    elif after is not None:
        job = rq_queue.enqueue_in(after, path, *args, **options)
    else:
        job = rq_queue.enqueue(path, *args, **options)
    return job.id


def cancel(job_id: str, *, queue: str = DEFAULT) -> None:
    """Cancel a job that has not run yet; a job already gone is not an error."""
    if not job_id:
        return
    try:
        Job.fetch(job_id, connection=redis_connection(queue)).cancel()
    except Exception:  # noqa: BLE001 - the job may be gone already; the database state decides
        log.info("RQ job %s could not be cancelled (already gone?)", job_id)


def dequeue_if_waiting(job_id: str, *, queue: str) -> bool:
    """Take a job off its queue if no worker has picked it up yet (to run it in-process)."""
    rq_queue = _rq_queue(queue)
    try:
        job = Job.fetch(job_id, connection=rq_queue.connection)
    except NoSuchJobError:
        return False
    if job.get_status(refresh=True) != "queued":
        return False
    return rq_queue.remove(job_id) > 0


def idle_workers(queue: str) -> int:
    """How many registered workers listening on `queue` wait for work right now."""
    rq_queue = _rq_queue(queue)
    try:
        workers = Worker.all(queue=rq_queue)
        return sum(
            1 for w in workers if str(getattr(w.get_state(), "value", w.get_state())) == "idle"
        )
    except Exception:  # noqa: BLE001 - Redis down: assume someone may be there
        return 1


def scheduled_job_ids(queue: str) -> list[str]:
    """Ids of the jobs waiting on `queue`'s scheduler."""
    return list(django_rq.get_queue(queue).scheduled_job_registry.get_job_ids())


def queue_lengths() -> dict[str, int]:
    """Jobs waiting per queue (for pages and metrics)."""
    return {name: django_rq.get_queue(name).count for name in QUEUES}


class CurrentJob:
    """The RQ job this code runs in, if any: its id and a best-effort `job.meta` writer."""

    def __init__(self) -> None:
        self._job = get_current_job()

    @property
    def id(self) -> str:
        return self._job.id if self._job is not None else ""

    @property
    def attempt(self) -> int:
        """1 on a job's first run, 2 on its first retry (enqueued with `retry_after`), ..."""
        job = self._job
        intervals = getattr(job, "retry_intervals", None) if job is not None else None
        if not intervals or job.retries_left is None:
            return 1
        return max(1, len(intervals) - job.retries_left + 1)

    def publish(self, meta: dict[str, Any]) -> None:
        """Merge `meta` into the job's meta (RQ's own dashboard reads it)."""
        if self._job is None:
            return
        try:
            self._job.meta.update(meta)
            self._job.save_meta()
        except Exception:  # noqa: BLE001 - RQ's dashboard is a convenience, never a failure
            log.debug("could not save job.meta of %s", self._job.id)


# ------------------------------------------------------------------------- periodic jobs


@dataclass(frozen=True)
class Periodic:
    """A job that runs every `every()` seconds on `queue`, re-armed by each run."""

    name: str
    path: str
    every: Callable[[], int]
    description: str
    queue: str = DEFAULT

    @property
    def gate_key(self) -> str:
        return f"shardvault:periodic:{self.name}"


def _reap_interval() -> int:
    return max(10, int(settings.JOB_HEARTBEAT_STALE_SECONDS))


PERIODIC: dict[str, Periodic] = {
    p.name: p
    for p in (
        Periodic(
            name="reap",
            path="backups.services.housekeeping.housekeeping_reap",
            every=_reap_interval,
            description="fail or resume work whose worker died; expire restore requests",
        ),
        Periodic(
            name="checks",
            path="backups.services.housekeeping.housekeeping_checks",
            every=lambda: 3600,
            description="storage checks, due drills, RPO and failed-backup alerts",
        ),
        Periodic(
            name="schedules",
            path="backups.services.schedules.schedules_arm",
            every=lambda: 60,
            description="arm each policy's next scheduled full and incremental backup",
        ),
        Periodic(
            name="retention",
            path="backups.services.retention.retention_apply_all",
            every=lambda: 24 * 3600,
            description="apply every cluster's retention (each cluster on its own)",
        ),
    )
}


SCHEDULER_TAKEOVER_SECONDS = 10


# What the jobs run, imported once by each worker before it takes jobs: the work horse RQ
# forks per job then starts with them loaded instead of importing them itself (about 0.3 s a
# job). Every module of backups.jobs is found by walking the package; these are the modules
# the services load only when a job runs (backups/services/full_backups.py), so commands such
# as `manage.py backup` start without them.
JOB_MODULES = (
    "backups.engine.dump",
    "backups.services.backup_spec",
    "backups.services.backup_parts",
    "backups.services.cold_locks",
    "backups.services.fanout",
    "backups.services.incrementals",
    "backups.services.physical",
    "backups.services.verification",
)


def jobs_preload() -> None:
    # By name, like every job: services and selectors import this module, never the jobs.
    package = importlib.import_module("backups.jobs")
    jobs = [f"{package.__name__}.{m.name}" for m in pkgutil.iter_modules(package.__path__)]
    for name in (*jobs, *JOB_MODULES):
        try:
            importlib.import_module(name)
        except Exception:  # noqa: BLE001 - the job itself will report the failure to import
            log.exception("preloading %s failed", name)


class ArmingWorker(Worker):
    """The workers' class (settings.RQ["WORKER_CLASS"]): arms the periodic jobs when it starts,
    so a Redis that lost its scheduled jobs (a restart without persistence) gets housekeeping
    and, through the periodic job "schedules", every policy's scheduled backups back."""

    def work(self, *args: Any, **kwargs: Any) -> bool:
        periodic_ensure_scheduled()  # best effort: a Redis failure is logged, the worker runs
        jobs_preload()
        return super().work(*args, **kwargs)

    # Scheduler takeover. RQ's scheduler lock lives `interval + 60` s (61 s) unless its holder
    # refreshes it, but a worker without the lock only tries to take it in its maintenance
    # tasks (every 10 minutes), and an idle worker blocks on its queues for `worker_ttl - 15`
    # s between checks. So after a SIGKILLed lock holder, scheduled jobs (ticks, periodic
    # housekeeping) waited ~10 minutes. Here a worker started `--with-scheduler` tries the
    # lock every SCHEDULER_TAKEOVER_SECONDS and wakes at least that often, so it takes over
    # within ~61 + 10 s; registry cleaning keeps RQ's own interval.

    @property
    def dequeue_timeout(self) -> int:
        return min(super().dequeue_timeout, SCHEDULER_TAKEOVER_SECONDS)

    @property
    def should_run_maintenance_tasks(self) -> bool:
        # RQ asks this before each blocking dequeue: the cheap place to check the lock.
        self._scheduler_take_over_if_free()
        return super().should_run_maintenance_tasks

    def _scheduler_take_over_if_free(self) -> None:
        scheduler = getattr(self, "scheduler", None)
        if scheduler is None or self.last_cleaned_at is None:  # not started with the scheduler
            return
        if scheduler._process is not None and scheduler._process.is_alive():
            return  # ours runs (and refreshes its lock)
        moment = time.monotonic()
        if moment - getattr(self, "_scheduler_checked_at", 0.0) < SCHEDULER_TAKEOVER_SECONDS:
            return
        self._scheduler_checked_at = moment
        try:
            if scheduler.acquire_locks(auto_start=True):
                log.info("worker %s took over RQ's scheduler", self.name)
        except RedisError:
            log.exception("could not check RQ's scheduler lock")


def periodic_ensure_scheduled(
    names: tuple[str, ...] | None = None, *, best_effort: bool = True
) -> list[str]:
    """Arm each periodic job (all, or `names`) unless it is already armed.

    A Redis key set with NX for a little under one interval gates each, so any number of
    callers arm one job. Returns the names armed by this call. Services call it best effort
    (a failure is logged and the next call tries again); with `best_effort=False` a Redis
    failure raises QueueUnavailable, for a command that must say it could not.
    """
    armed = []
    for periodic in PERIODIC.values():
        if names is not None and periodic.name not in names:
            continue
        seconds = periodic.every()
        try:
            conn = redis_connection(periodic.queue)
            if not conn.set(periodic.gate_key, "1", nx=True, ex=max(1, seconds - 5)):
                continue
            django_rq.get_queue(periodic.queue).enqueue_in(
                timedelta(seconds=seconds),
                "backups.jobs.housekeeping.periodic_job",
                periodic.name,
                description=periodic.description,
                result_ttl=600,
                failure_ttl=24 * 3600,
            )
        except Exception:  # noqa: BLE001 - the next caller arms it
            if not best_effort:
                raise
            log.exception("could not schedule the periodic job %s", periodic.name)
            continue
        armed.append(periodic.name)
    return armed
