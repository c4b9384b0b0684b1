"""Mail (Django's mail framework; console backend by default) and JSON webhooks.

Signed webhooks: `webhook_deliver` POSTs a JSON body with `X-ShardVault-Signature:
sha256=<hex HMAC-SHA256 of the body>` keyed by SHARDVAULT_WEBHOOK_SECRET, and raises
WebhookFailed when the receiver does not answer 2xx, so the RQ job that called it is
retried (queued by backups.services.webhooks). A webhook's URL and the secret are never
logged: log lines and errors name the event and the attempt only.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import urllib.error
import urllib.request
from collections.abc import Iterable

from django.conf import settings
from django.contrib.auth import get_user_model
from django.core.cache import cache
from django.core.mail import send_mail
from django.db.models import Q

from console.roles import ADMIN

log = logging.getLogger(__name__)

SUBJECT_PREFIX = "[ShardVault] "
WEBHOOK_TIMEOUT_SECONDS = 5


def role_emails(*roles: str, exclude_user_id: int | None = None) -> list[str]:
    """The addresses of active users holding any of `roles` (`admin`, which superusers hold,
    holds every role), sorted, without duplicates; `exclude_user_id` left out."""
    users = (
        get_user_model()
        .objects.filter(is_active=True)
        .exclude(email="")
        .filter(Q(groups__name__in=sorted({*roles, ADMIN})) | Q(is_superuser=True))
    )
    if exclude_user_id is not None:
        users = users.exclude(pk=exclude_user_id)
    return sorted(set(users.values_list("email", flat=True)))


def first_time(key: str, *, seconds: int) -> bool:
    """True the first time `key` is seen in `seconds` (throttles a repeated notification)."""
    return cache.add(key, 1, timeout=seconds)


def send(
    *,
    subject: str,
    body: str,
    emails: Iterable[str] = (),
    roles: Iterable[str] = (),
    exclude_user_id: int | None = None,
    webhook_url: str = "",
    payload: dict | None = None,
) -> dict:
    """Mail `subject` (prefixed "[ShardVault] ") and `body` to `emails` and to the holders
    of `roles`, and POST `payload` as JSON to `webhook_url` when one is given.

    Returns {"email": bool, "webhook": bool|None} (None: no webhook given). Never raises.
    """
    sent: dict = {"email": False, "webhook": None}
    roles = tuple(roles)
    recipients = set(emails)
    if roles:
        recipients.update(role_emails(*roles, exclude_user_id=exclude_user_id))
    recipients = sorted(r for r in recipients if r)
    if recipients:
        try:
            send_mail(SUBJECT_PREFIX + subject, body, settings.DEFAULT_FROM_EMAIL, recipients)
            sent["email"] = True
        except Exception:  # noqa: BLE001 - a mail outage must not break the caller
            log.exception("could not send mail %r", subject)
    if webhook_url:
        sent["webhook"] = _post(webhook_url, payload or {})
    return sent


def _post(url: str, document: dict) -> bool:
    request = urllib.request.Request(
        url,
        data=json.dumps(document, default=str).encode(),
        headers={"Content-Type": "application/json", "User-Agent": "ShardVault-alerts"},
        method="POST",
    )
    try:
        with urllib.request.urlopen(request, timeout=WEBHOOK_TIMEOUT_SECONDS) as response:  # noqa: S310
            return 200 <= response.status < 300
    except Exception as exc:  # noqa: BLE001 - a webhook outage must not break the caller
        log.warning("webhook failed: %s", type(exc).__name__)  # never the URL
        return False


SIGNATURE_HEADER = "X-ShardVault-Signature"


class WebhookFailed(Exception):
    """A delivery the receiver did not accept (its message names no URL and no secret)."""


def webhook_body(document: dict) -> bytes:
    """The exact bytes a webhook sends (and signs) for `document`."""
    return json.dumps(document, default=str, sort_keys=True, separators=(",", ":")).encode()


def webhook_signature(body: bytes, secret: str) -> str:
    """`sha256=<hex HMAC-SHA256 of body keyed by secret>`, the X-ShardVault-Signature value."""
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def webhook_deliver(
    *, url: str, body: bytes, event: str, secret: str, attempt: int = 1, delivery: str = ""
) -> int:
    """POST `body` to `url`, signed with `secret` (unsigned when there is none); returns the
    HTTP status. Raises WebhookFailed on no answer or a status outside 2xx."""
    headers = {
        "Content-Type": "application/json",
        "User-Agent": "ShardVault-webhooks",
        "X-ShardVault-Event": event,
    }
    if delivery:
        headers["X-ShardVault-Delivery"] = delivery
    if secret:
        headers[SIGNATURE_HEADER] = webhook_signature(body, secret)
    request = urllib.request.Request(url, data=body, headers=headers, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=WEBHOOK_TIMEOUT_SECONDS) as response:  # noqa: S310
            status = response.status
    except urllib.error.HTTPError as exc:
        status = exc.code
    except Exception as exc:  # noqa: BLE001 - any transport failure is one failed attempt
        log.warning("webhook %s attempt %d: no answer (%s)", event, attempt, type(exc).__name__)
        raise WebhookFailed(
            f"webhook {event} attempt {attempt}: no answer ({type(exc).__name__})"
        ) from None
    if not 200 <= status < 300:
        log.warning("webhook %s attempt %d: HTTP %d", event, attempt, status)
        raise WebhookFailed(f"webhook {event} attempt {attempt}: HTTP {status}")
    log.info("webhook %s attempt %d: delivered (HTTP %d)", event, attempt, status)
    return status
