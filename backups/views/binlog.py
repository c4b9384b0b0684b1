"""The Transactions page (binlog browser), the flashback form and the flashback SQL download."""

from __future__ import annotations

from datetime import UTC, datetime

from django.contrib import messages
from django.http import Http404, StreamingHttpResponse
from django.shortcuts import get_object_or_404, redirect, render
from django.utils.http import urlencode
from django.views.decorators.http import require_GET, require_http_methods

from backups.engine.errors import EngineError
from backups.models import RestoreRequest
from backups.selectors.binlog_browser import PAGE_SIZE, binlog_transactions_page
from backups.services.errors import RestoreError
from backups.services.flashback import (
    flashback_artifact_open,
    flashback_preview,
    flashback_request_file,
)
from console.roles import OPERATOR, has_role, role_required
from shards.models import Cluster


def _time(text: str) -> datetime | None:
    text = (text or "").strip()
    if not text:
        return None
    value = datetime.fromisoformat(text.replace("Z", "+00:00"))
    return value if value.tzinfo else value.replace(tzinfo=UTC)


def _names(text: str) -> list[str]:
    return [part.strip() for part in (text or "").split(",") if part.strip()]


@require_GET
@role_required()
def transactions(request, cluster: str):
    """Stored transactions of one cluster, filtered by time, shard and table, paginated."""
    cluster_obj = get_object_or_404(Cluster, name=cluster)
    query = request.GET
    context = {
        "cluster": cluster_obj,
        "shards": cluster_obj.shards.order_by("name"),
        "since": query.get("since", ""),
        "until": query.get("until", ""),
        "shard": query.get("shard", ""),
        "tables": query.get("tables", ""),
        "rows": [],
        "page": 1,
        "more": False,
        "error": "",
        "can_request": has_role(request.user, OPERATOR),
        "page_size": PAGE_SIZE,
    }
    try:
        page = max(1, int(query.get("page", "1") or 1))
    except ValueError:
        page = 1
    context["page"] = page
    try:  # only the times: a ValueError from decoding is not the person's typing
        since, until = _time(context["since"]), _time(context["until"])
    except ValueError:
        context["error"] = "times are ISO 8601, e.g. 2026-01-31T12:00:00"
        return render(request, "backups/transactions.html", context, status=400)
    try:
        rows, more = binlog_transactions_page(
            cluster=cluster_obj,
            page=page,
            since=since,
            until=until,
            shards=_names(context["shard"]),
            tables=_names(context["tables"]),
        )
    except (RestoreError, EngineError) as exc:
        context["error"] = str(exc)
        return render(request, "backups/transactions.html", context, status=400)
    context.update(rows=rows, more=more)
    filters = {k: context[k] for k in ("since", "until", "shard", "tables") if context[k]}
    context["filter_query"] = urlencode(filters)
    return render(request, "backups/transactions.html", context)


@require_http_methods(["GET", "POST"])
@role_required(OPERATOR)
def flashback_new(request):
    """The flashback form: prefilled from the Transactions page (cluster, GTID)."""
    source = request.POST if request.method == "POST" else request.GET
    context = {
        "clusters": Cluster.objects.order_by("name"),
        "cluster_name": source.get("cluster", ""),
        "gtid": source.get("gtid", ""),
        "since": source.get("since", ""),
        "until": source.get("until", ""),
        "shards": source.get("shards", ""),
        "tables": source.get("tables", ""),
        "reason": source.get("reason", ""),
        "error": "",
    }
    if request.method == "GET":
        return render(request, "backups/flashback_new.html", context)
    cluster = Cluster.objects.filter(name=context["cluster_name"]).first()
    try:
        if cluster is None:
            raise RestoreError("choose a cluster")
        try:
            since, until = _time(context["since"]), _time(context["until"])
        except ValueError as exc:
            raise RestoreError("times are ISO 8601, e.g. 2026-01-31T12:00:00") from exc
        scope = {
            "cluster": cluster,
            "gtids": _names(context["gtid"]),
            "since": since,
            "until": until,
            "shards": _names(context["shards"]),
            "tables": _names(context["tables"]),
        }
        if "preview" in request.POST:
            context["plan"] = flashback_preview(**scope)
            return render(request, "backups/flashback_new.html", context)
        filed = flashback_request_file(requester=request.user, reason=context["reason"], **scope)
    except RestoreError as exc:
        context["error"] = str(exc)
        return render(request, "backups/flashback_new.html", context, status=400)
    messages.success(request, f"Flashback request {filed.pk} filed; two approvers must sign off.")
    return redirect("restores:request_detail", pk=filed.pk)


@require_GET
@role_required()
def flashback_artifact(request, pk: int):
    """The flashback's generated SQL, streamed from storage and checked against its sha256."""
    restore = RestoreRequest.objects.filter(pk=pk).first()
    if restore is None or not restore.artifact_key:
        raise Http404("no flashback SQL for this request")
    try:
        chunks = flashback_artifact_open(restore)
    except (RestoreError, EngineError) as exc:
        raise Http404(str(exc)) from exc
    response = StreamingHttpResponse(chunks, content_type="application/sql")
    response["Content-Disposition"] = f'attachment; filename="flashback-{restore.pk}.sql"'
    response["X-Content-SHA256"] = restore.artifact_sha256
    return response
