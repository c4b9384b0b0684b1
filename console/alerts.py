"""Alerts: an email, and a JSON webhook per cluster (BackupPolicy.webhook_url).

Raised when a backup fails, when a verification drops a set's Q below 1 (or cannot run),
and when a cluster's newest recoverable point is older than its RPO target. Call these
after the state change has committed (`transaction.on_commit`); a failing mail server or
webhook is logged and never breaks the caller.

Entry points for other modules:

* `alert_backup_failed(backup_set)` — the backup service, when a set ends `failed`;
* `alert_quality_dropped(verification)` — the verification service;
* `alerts_check_rpo()` — the housekeeping job; one alert per cluster per breach.
"""

from __future__ import annotations

import json
import logging
import urllib.request
from datetime import timedelta

from django.conf import settings
from django.contrib.auth import get_user_model
from django.core.cache import cache
from django.core.mail import send_mail
from django.db.models import Max, Q
from django.utils import timezone

logger = logging.getLogger(__name__)

WEBHOOK_TIMEOUT_SECONDS = 5


def _recipients() -> list[str]:
    configured = list(settings.ALERT_EMAILS)
    if configured:
        return configured
    users = get_user_model().objects.filter(is_active=True).exclude(email="")
    users = users.filter(Q(groups__name__in=["admin", "operator"]) | Q(is_superuser=True))
    return sorted(set(users.values_list("email", flat=True)))


def _webhook_url(cluster) -> str:
    policy = getattr(cluster, "policy", None)  # None when the cluster has no policy
    return policy.webhook_url if policy is not None else ""


def alert_send(*, kind: str, cluster, subject: str, body: str, payload: dict) -> dict:
    """Send one alert by email and, when the cluster has one, to its webhook.

    Returns {"email": bool, "webhook": bool|None} (None: no webhook configured).
    """
    sent = {"email": False, "webhook": None}
    recipients = _recipients()
    if recipients:
        try:
            send_mail(f"[ShardVault] {subject}", body, settings.DEFAULT_FROM_EMAIL, recipients)
            sent["email"] = True
        except Exception:
            logger.exception("alert mail %s could not be sent", kind)
    url = _webhook_url(cluster)
    if url:
        document = {
            "alert": kind,
            "cluster": getattr(cluster, "name", ""),
            "subject": subject,
            "at": timezone.now().isoformat(),
            **payload,
        }
        request = urllib.request.Request(
            url,
            data=json.dumps(document, default=str).encode(),
            headers={"Content-Type": "application/json", "User-Agent": "ShardVault-alerts"},
            method="POST",
        )
        try:
            with urllib.request.urlopen(request, timeout=WEBHOOK_TIMEOUT_SECONDS) as response:  # noqa: S310
                sent["webhook"] = 200 <= response.status < 300
        except Exception:
            logger.exception("alert webhook %s to %s failed", kind, url)
            sent["webhook"] = False
    return sent


def alert_backup_failed(backup_set) -> dict | None:
    """Mail (and webhook) that a set failed; once per set, however often it is called."""
    if not cache.add(f"alert:backup-failed:{backup_set.pk}", 1, timeout=14 * 24 * 3600):
        return None
    cluster = backup_set.cluster
    subject = f"backup set {backup_set.pk} of {cluster.name} failed"
    body = f"{subject}.\n\nReason: {backup_set.error or 'not recorded'}\n"
    return alert_send(
        kind="backup_failed",
        cluster=cluster,
        subject=subject,
        body=body,
        payload={"set": backup_set.pk, "kind": backup_set.kind, "error": backup_set.error},
    )


def alert_quality_dropped(verification) -> dict | None:
    """A verification gave Q < 1, or could not run at all."""
    backup_set = verification.backup_set
    cluster = backup_set.cluster
    if verification.q is not None and verification.q >= 1.0:
        return None
    what = "drill" if verification.drill else "storage check"
    if verification.q is None:
        subject = f"{what} of set {backup_set.pk} of {cluster.name} could not run"
    else:
        subject = f"set {backup_set.pk} of {cluster.name} has Q = {verification.q:.4f} < 1"
    lines = [f"{subject}.", ""]
    if verification.q is not None:
        lines.append(f"T = {verification.t}, D = {verification.d}, A = {verification.a} ({what})")
    if verification.error:
        lines.append(f"Error: {verification.error}")
    for problem in (verification.problems or [])[:20]:
        lines.append(f"- {problem.get('object') or problem.get('table')}: {problem.get('reason')}")
    return alert_send(
        kind="quality_dropped",
        cluster=cluster,
        subject=subject,
        body="\n".join(lines) + "\n",
        payload={
            "set": backup_set.pk,
            "verification": verification.pk,
            "drill": verification.drill,
            "q": verification.q,
            "t": verification.t,
            "d": verification.d,
            "a": verification.a,
            "problems": (verification.problems or [])[:50],
            "error": verification.error,
        },
    )


def alerts_check_failed_backups(*, now=None, window_hours: int = 48) -> list[int]:
    """Alert for sets that failed recently and were not alerted yet (housekeeping backstop
    for callers that did not call `alert_backup_failed` themselves). Returns the set ids."""
    from backups.models import BackupSet

    now = now or timezone.now()
    failed = BackupSet.objects.filter(
        status=BackupSet.Status.FAILED, created_at__gte=now - timedelta(hours=window_hours)
    ).select_related("cluster__policy")
    return [s.pk for s in failed.iterator() if alert_backup_failed(s) is not None]


def alerts_check_rpo(*, now=None) -> list[str]:
    """Alert for every cluster whose newest recoverable point is older than its RPO target.

    Sends once per breach (remembered in the cache until a newer point appears).
    Returns the names of the clusters alerted.
    """
    from backups.models import BackupSet
    from console.selectors import cluster_rpo_target
    from shards.models import Cluster

    now = now or timezone.now()
    alerted = []
    clusters = Cluster.objects.select_related("policy").annotate(
        newest=Max(
            "backup_sets__consistent_at",
            filter=Q(backup_sets__status=BackupSet.Status.SUCCEEDED),
        )
    )
    for cluster in clusters:
        rpo = cluster_rpo_target(cluster)
        newest = cluster.newest
        if newest is not None and now - newest <= rpo:
            continue
        marker = f"rpo-alert:{cluster.pk}:{newest.isoformat() if newest else 'none'}"
        if not cache.add(marker, 1, timeout=7 * 24 * 3600):
            continue
        age = (
            "no recoverable point at all"
            if newest is None
            else f"newest recoverable point is {newest:%Y-%m-%d %H:%M} UTC"
        )
        subject = f"{cluster.name} is past its RPO target"
        alert_send(
            kind="rpo_breached",
            cluster=cluster,
            subject=subject,
            body=f"{subject}: {age}, target {rpo}.\n",
            payload={
                "newest_recoverable_at": newest.isoformat() if newest else None,
                "rpo_target_minutes": int(rpo.total_seconds() // 60),
            },
        )
        alerted.append(cluster.name)
    return alerted
