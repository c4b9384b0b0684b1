"""Restore runs: every state transition of a `RestoreRun`, one function each (DESIGN.md).

Start (or resume) a run of an approved request, begin it on the worker, finish it with
its outcome, cancel it; and put its job on the `restores` queue or take it off. Each
transition locks its rows, checks the current state, writes an audit event in the same
transaction and defers mail and enqueues to `transaction.on_commit`. The executor
(`restore_runs`) calls `restore_run_begin` and `restore_run_finish`; runs are enqueued
through `backups.queue` by the job's dotted path. The request's own transitions (file,
approve, reject, expire) are in `restore_requests`.
"""

from __future__ import annotations

import logging
from datetime import datetime, timedelta

from django.conf import settings
from django.db import transaction
from django.utils import timezone

from backups import queue
from backups.models import RestoreRequest, RestoreRun
from backups.services.alerts import notify_run_finished
from backups.services.errors import RestoreDenied, RestoreError
from backups.services.restore_plan import restore_plan_targets_registered
from backups.services.restore_requests import restore_request_expire_if_due, restore_request_lock
from backups.status import RequestState, RunStatus
from console.audit import audit_record
from console.models import AuditEvent
from console.roles import OPERATOR, has_role

State = RequestState
MAX_RESUMES = 3  # a run that keeps killing its worker stops being retried
RUN_JOB = "backups.jobs.restores.restore_run_job"
RUN_JOB_TIMEOUT_SECONDS = 24 * 3600

log = logging.getLogger(__name__)


def restore_run_is_stale(run: RestoreRun, now: datetime) -> bool:
    """True when the run's worker has not beaten for JOB_HEARTBEAT_STALE_SECONDS."""
    limit = timedelta(seconds=settings.JOB_HEARTBEAT_STALE_SECONDS)
    seen = run.heartbeat_at or run.started_at or run.created_at
    return seen is None or now - seen >= limit


def restore_run_start(*, request: RestoreRequest, actor=None) -> RestoreRun:
    """Start (enqueue) the run of an approved request, or resume a crashed one.

    Refused unless the request is `approved` and its approval has not lapsed. A request
    that is `running` but whose run stopped beating (its worker died) is re-enqueued: the
    run resumes and skips the chunks it already loaded.
    """
    if actor is not None and not has_role(actor, OPERATOR):
        raise RestoreDenied(f"{actor.get_username()} may not run restores (operators only)")
    now = timezone.now()
    expired = False
    with transaction.atomic():
        locked = restore_request_lock(request)
        expired = restore_request_expire_if_due(locked, now)
        if not expired:
            if locked.state == State.RUNNING:
                run = RestoreRun.objects.select_for_update().filter(request=locked).first()
                if run is None or not restore_run_is_stale(run, now):
                    raise RestoreError(f"restore {locked.pk} is already running")
                resumes = AuditEvent.objects.filter(
                    action="restore.run_resumed",
                    object_id=str(locked.pk),
                    object_type="backups.restorerequest",
                ).count()
                if resumes >= MAX_RESUMES:
                    raise RestoreError(
                        f"restore {locked.pk} was resumed {resumes} times and died each time; "
                        "look at the worker's log, then file a new request"
                    )
                audit_record(
                    actor=actor or "system",
                    action="restore.run_resumed",
                    obj=locked,
                    details={"run": run.pk, "last_heartbeat": run.heartbeat_at},
                )
            elif locked.state != State.APPROVED:
                raise RestoreError(
                    f"restore {locked.pk} is {locked.state}; only approved requests can run"
                )
            else:
                # A target re-pointed since approval is refused now; the worker also asks
                # the servers who they are before it touches them.
                restore_plan_targets_registered(locked)
                run = RestoreRun.objects.filter(
                    request=locked, status=RunStatus.PENDING
                ).first() or RestoreRun.objects.create(
                    request=locked,
                    started_by=actor,
                    rows_estimate=int(locked.plan.get("rows", 0)),
                )
                run.job_id = restore_job_id(run.pk)
                run.save(update_fields=["job_id"])
                audit_record(
                    actor=actor or "system",
                    action="restore.run_queued",
                    obj=locked,
                    details={"run": run.pk, "job_id": run.job_id},
                )
            transaction.on_commit(lambda: _enqueue_or_explain(run.pk))
    if expired:
        raise RestoreError(f"the approval of restore {locked.pk} has expired; file a new request")
    return run


def restore_job_id(run_id: int) -> str:
    return f"restore-{run_id}"


def restore_run_queue(run_id: int) -> str:
    """The queue a run's job goes to: `restores`, except a rebuild of an instance that names
    an agent queue, which runs on that host's agent (it writes the instance's datadir)."""
    request = (
        RestoreRequest.objects.filter(runs__pk=run_id)
        .values("target_kind", "target_instance__agent_queue")
        .first()
    )
    if (
        request
        and request["target_kind"] == RestoreRequest.Target.REBUILD
        and request["target_instance__agent_queue"]
    ):
        return request["target_instance__agent_queue"]
    return queue.RESTORES


def restore_run_enqueue(*, run_id: int) -> str | None:
    """Queue the run's job (`restore-<run id>` on `restores`, or a rebuild's host agent
    queue) unless it is already waiting.

    A job RQ still counts as started, deferred or scheduled is cancelled first: the run is
    only (re-)enqueued once its worker stopped beating, so that job's worker is gone.
    """
    job_id = restore_job_id(run_id)
    run_queue = restore_run_queue(run_id)
    status = queue.job_status(job_id, queue=run_queue)
    if status == "queued":
        return None
    queue.periodic_ensure_scheduled()  # the reaper that resumes this run if its worker dies
    if status in queue.LIVE_STATUSES:
        queue.cancel(job_id, queue=run_queue)
    queued = queue.enqueue(
        RUN_JOB, run_id, queue=run_queue, job_id=job_id, timeout=RUN_JOB_TIMEOUT_SECONDS
    )
    if queued is None:
        # The stale job could not be cancelled: say so, the reaper retries on its next run.
        log.warning(
            "restore run %s was not queued again: RQ still holds its job %s", run_id, job_id
        )
    return queued


def restore_run_dequeue(*, run_id: int) -> bool:
    """Take a run's job off the queue if no worker has picked it up (to run it in-process)."""
    return queue.dequeue_if_waiting(restore_job_id(run_id), queue=restore_run_queue(run_id))


def _enqueue_or_explain(run_id: int) -> None:
    try:
        restore_run_enqueue(run_id=run_id)
    except Exception as exc:  # noqa: BLE001 - Redis down: the run stays pending, retry later
        raise RestoreError(
            f"restore run {run_id} is recorded but could not be queued: the job queue (Redis) "
            f"is unreachable ({exc}); run it again once Redis is back"
        ) from exc


def restore_run_begin(*, run: RestoreRun) -> bool:
    """Called by the worker before touching any target. True when this is a resume.

    The job re-checks the rules itself: a job enqueued by hand for a request that is not
    approved (or whose approval lapsed) is refused here, before anything is written.
    """
    now = timezone.now()
    expired = False
    with transaction.atomic():
        request = RestoreRequest.objects.select_for_update().get(pk=run.request_id)
        locked = RestoreRun.objects.select_for_update().get(pk=run.pk)
        # The approval lapses 24 h after it was given unless a run has begun by then: what
        # counts is now, not when the run was queued.
        if locked.status == RunStatus.PENDING and restore_request_expire_if_due(request, now):
            expired = True
        elif request.state == State.RUNNING and locked.status == RunStatus.RUNNING:
            if not restore_run_is_stale(locked, now):
                # Another worker is still beating for this run: never load twice at once.
                raise RestoreError(f"restore run {locked.pk} is already running in another worker")
            locked.heartbeat_at = now
            locked.save(update_fields=["heartbeat_at"])
            audit_record(
                actor="worker", action="restore.run_resuming", obj=request, details={"run": run.pk}
            )
            resume = True
        else:
            if request.state != State.APPROVED:
                raise RestoreError(
                    f"restore {request.pk} is {request.state}, not approved; the run refuses to start"
                )
            if locked.status != RunStatus.PENDING:
                raise RestoreError(
                    f"restore run {locked.pk} is {locked.status}; it cannot start again"
                )
            if locked.cancel_requested:
                raise RestoreError(f"restore run {locked.pk} was cancelled")
            request.state = State.RUNNING
            request.save(update_fields=["state"])
            locked.status = RunStatus.RUNNING
            locked.started_at = now
            locked.heartbeat_at = now
            locked.save(update_fields=["status", "started_at", "heartbeat_at"])
            audit_record(
                actor="worker", action="restore.run_started", obj=request, details={"run": run.pk}
            )
            resume = False
    if expired:
        raise RestoreError(
            f"the approval of restore {request.pk} has expired; the run refuses to start "
            "(file a new request)"
        )
    run.refresh_from_db()
    return resume


def restore_run_finish(
    *, run: RestoreRun, status: str, error: str = "", t=None, d=None, a=None, note: str = ""
) -> RestoreRun:
    """Record a run's outcome (succeeded, failed or cancelled) and tell the requester."""
    if status not in RunStatus.FINAL:
        raise ValueError(f"not a final run status: {status}")
    now = timezone.now()
    with transaction.atomic():
        request = RestoreRequest.objects.select_for_update().get(pk=run.request_id)
        locked = RestoreRun.objects.select_for_update().get(pk=run.pk)
        if locked.status in RunStatus.FINAL:
            return locked
        q = t * d * a if None not in (t, d, a) else None
        locked.status = status
        locked.error = error[:2000]
        locked.finished_at = now
        locked.heartbeat_at = now
        locked.t, locked.d, locked.a, locked.q = t, d, a, q
        locked.progress_text = (
            {"succeeded": "done", "failed": "failed", "cancelled": "cancelled"}[status]
            + (f"; note: {note}" if note else "")
        )[:300]
        locked.save(
            update_fields=[
                "status",
                "error",
                "finished_at",
                "heartbeat_at",
                "t",
                "d",
                "a",
                "q",
                "progress_text",
            ]
        )
        request.state = {
            RunStatus.SUCCEEDED: State.SUCCEEDED,
            RunStatus.FAILED: State.FAILED,
            RunStatus.CANCELLED: State.CANCELLED,
        }[status]
        request.error = error[:2000]
        request.save(update_fields=["state", "error"])
        audit_record(
            actor="worker",
            action=f"restore.run_{status}",
            obj=request,
            details={
                "run": locked.pk,
                "error": error,
                "note": note,
                "t": t,
                "d": d,
                "a": a,
                "q": q,
            },
        )
        transaction.on_commit(lambda: notify_run_finished(run_id=locked.pk))
    run.refresh_from_db()
    return locked


def restore_run_cancel(*, run: RestoreRun, actor) -> RestoreRun:
    """Ask a run to stop. A run no worker has begun is cancelled at once."""
    if not has_role(actor, OPERATOR):
        raise RestoreDenied(f"{actor.get_username()} may not cancel restores (operators only)")
    with transaction.atomic():
        request = RestoreRequest.objects.select_for_update().get(pk=run.request_id)
        locked = RestoreRun.objects.select_for_update().get(pk=run.pk)
        if locked.status not in RunStatus.ACTIVE:
            raise RestoreError(f"restore run {locked.pk} is {locked.status}; nothing to cancel")
        locked.cancel_requested = True
        locked.save(update_fields=["cancel_requested"])
        audit_record(
            actor=actor, action="restore.cancel_requested", obj=request, details={"run": locked.pk}
        )
        if locked.status == RunStatus.PENDING:
            locked.status = RunStatus.CANCELLED
            locked.finished_at = timezone.now()
            locked.progress_text = "cancelled before it started"
            locked.save(update_fields=["status", "finished_at", "progress_text"])
            request.state = State.CANCELLED
            request.save(update_fields=["state"])
            audit_record(
                actor=actor, action="restore.run_cancelled", obj=request, details={"run": locked.pk}
            )
            transaction.on_commit(lambda: _dequeue_quietly(locked.pk))
    run.refresh_from_db()
    return run


def _dequeue_quietly(run_id: int) -> None:
    try:
        restore_run_dequeue(run_id=run_id)
    except Exception:  # noqa: BLE001 - the job refuses a cancelled run anyway
        pass
