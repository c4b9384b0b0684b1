"""RQ job delivering one signed webhook (queue `default`, `webhook-<delivery>`)."""

from __future__ import annotations

from backups.queue import CurrentJob
from backups.services.webhooks import webhook_delivery_attempt


def webhook_delivery_job(cluster_id: int, event: str, body: str) -> int:
    """POST the webhook; a refused or unanswered attempt raises so RQ retries it."""
    return webhook_delivery_attempt(
        cluster_id=cluster_id, event=event, body=body, attempt=CurrentJob().attempt
    )
