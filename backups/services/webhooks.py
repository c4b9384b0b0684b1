"""Signed webhooks for what an outside system must learn without opening the console.

`webhook_event(cluster, event, payload)` queues one delivery (queue `default`, after the
caller's transaction commits) to the cluster policy's `webhook_url`; the delivery job
POSTs the JSON body signed with SHARDVAULT_WEBHOOK_SECRET (notify.sender.webhook_deliver)
and raises on failure, so RQ runs it again after each of WEBHOOK_RETRY_SECONDS in turn.

The URL is read from the policy when the job runs (it is never in the queue, the job's
description or a log line); the secret is read from settings then too.

Events: backup_failed, quality_dropped (Q below 1), rpo_breached, copy_failed,
restore_requested, restore_approved, restore_rejected, restore_succeeded, restore_failed,
restore_cancelled, retention_removed.

The body: {"event", "cluster", "at", "delivery", ...payload}.
"""

from __future__ import annotations

import json
import logging
import uuid

from django.conf import settings
from django.db import transaction
from django.utils import timezone

from backups import queue
from backups.models import BackupPolicy
from notify.sender import webhook_body, webhook_deliver
from shards.models import Cluster

log = logging.getLogger(__name__)

DELIVERY_JOB = "backups.jobs.webhooks.webhook_delivery_job"


def _webhook_url(cluster_id: int) -> str:
    return (
        BackupPolicy.objects.filter(cluster_id=cluster_id)
        .values_list("webhook_url", flat=True)
        .first()
        or ""
    )


def webhook_event(cluster: Cluster, event: str, payload: dict | None = None) -> dict | None:
    """Queue a signed webhook about `event` on `cluster` when its policy names a webhook URL.

    Returns the document that will be sent, or None when the cluster has no webhook. The
    enqueue waits for the current transaction to commit; a queue that cannot be reached is
    logged (event name only) and never breaks the caller.
    """
    if not _webhook_url(cluster.pk):
        return None
    document = {
        **(payload or {}),
        "event": event,
        "cluster": cluster.name,
        "at": timezone.now().isoformat(),
        "delivery": uuid.uuid4().hex,
    }
    body = webhook_body(document).decode()

    def enqueue() -> None:
        try:
            queue.enqueue(
                DELIVERY_JOB,
                cluster.pk,
                event,
                body,
                queue=queue.DEFAULT,
                job_id=f"webhook-{document['delivery']}",
                description=f"webhook {event} for cluster {cluster.name}",
                retry_after=list(settings.WEBHOOK_RETRY_SECONDS),
            )
        except queue.QueueUnavailable:
            log.warning(
                "webhook %s for cluster %s not queued: Redis unreachable", event, cluster.pk
            )

    transaction.on_commit(enqueue)
    return json.loads(body)


def webhook_delivery_attempt(*, cluster_id: int, event: str, body: str, attempt: int) -> int:
    """One delivery attempt of a queued webhook; raises notify.sender.WebhookFailed when the
    receiver does not take it (the job is then retried). A cluster whose policy no longer
    names a webhook gets nothing (returns 0)."""
    url = _webhook_url(cluster_id)
    if not url:
        log.info("webhook %s for cluster %s dropped: no webhook configured now", event, cluster_id)
        return 0
    delivery = json.loads(body).get("delivery", "")
    return webhook_deliver(
        url=url,
        body=body.encode(),
        event=event,
        secret=settings.SHARDVAULT_WEBHOOK_SECRET,
        attempt=attempt,
        delivery=delivery,
    )


def webhook_retention_removed(cluster: Cluster, removed: list[dict]) -> dict | None:
    """The webhook for sets retention removed: `removed` is [{"set", "reason"}] as
    `retention apply --json` prints it (nothing is sent for an empty list)."""
    if not removed:
        return None
    return webhook_event(cluster, "retention_removed", {"removed": removed})
