"""Auditor reports per cluster and period: CSV and JSON (streamed) and PDF.

Contents (DESIGN.md, "Quality"): every set with kind, times, size, consistency mode, Q and
its factors and verification dates; the success rate; the achieved RPO (largest gap
between recovery points); the measured RTO of drills; every restore with its request,
plan summary, approvals (who, when, comment) and outcome. Every report names the audit
chain head it was built from.

How a report proves itself (the sha256 scheme):

* CSV and JSON: the **last line** of the file carries `report_sha256`, the sha256 of every
  byte before that line. Check with `head -n -1 FILE | sha256sum` and compare it with the
  value on the last line (`tail -n 1 FILE`). The body names `audit_head`; compare it with
  `manage.py audit verify` (which prints the current head) or the audit page.
* PDF: a file cannot contain its own hash, so the command writes `FILE.sha256` beside it
  (`sha256sum -c FILE.sha256` checks it) and prints it; the download carries it in the
  `X-Report-SHA256` header. The PDF states the audit head and `content_sha256`, the sha256
  of the canonical JSON of the data it shows.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from django.db.models import Prefetch
from django.utils import timezone

from backups.models import (
    Approval,
    BackupSet,
    RestoreRequest,
    RestoreRun,
    SetCopy,
    VerificationRun,
)
from backups.selectors.verification import cluster_rpo_target, quality_level, sets_with_quality
from backups.status import SetStatus
from console.audit import audit_chain_head
from console.exports import spreadsheet_safe
from console.selectors import MomentError
from console.selectors import parse_moment as _parse_moment
from reports.pdf import render_pdf
from shards.models import Cluster

FORMATS = ("csv", "json", "pdf")
CONTENT_TYPES = {
    "csv": "text/csv; charset=utf-8",
    "json": "application/json",
    "pdf": "application/pdf",
}
DEFAULT_PERIOD_DAYS = 30


class ReportError(Exception):
    """Bad report parameters; the message is one sentence."""


@dataclass(frozen=True)
class ReportPeriod:
    cluster: Cluster
    since: datetime
    until: datetime

    @property
    def label(self) -> str:
        return f"{self.since:%Y-%m-%d %H:%M} to {self.until:%Y-%m-%d %H:%M} UTC"


def parse_moment(value: str, *, end: bool) -> datetime:
    """A date (YYYY-MM-DD: its start, or with `end` the start of the next day) or an ISO 8601
    moment; naive values are UTC. Raises ReportError with one sentence."""
    try:
        return _parse_moment(value, end=end)
    except MomentError as exc:
        raise ReportError(str(exc)) from exc


def report_period(*, cluster_name: str, since: str = "", until: str = "") -> ReportPeriod:
    """Resolve a cluster and a period; `until` as a date includes that whole day.

    Defaults: until now, since 30 days before `until`.
    """
    cluster = Cluster.objects.filter(name=cluster_name).first()
    if cluster is None:
        raise ReportError(f"no cluster named '{cluster_name}'")
    end = parse_moment(until, end=True) if until else timezone.now()
    start = parse_moment(since, end=False) if since else end - timedelta(days=DEFAULT_PERIOD_DAYS)
    if start >= end:
        raise ReportError("the start of the period must be before its end")
    return ReportPeriod(cluster, start, end)


# ---- data ---------------------------------------------------------------------------------


def _iso(value: datetime | None) -> str | None:
    return value.astimezone(UTC).isoformat() if value else None


def report_sets(period: ReportPeriod) -> Iterator[dict[str, Any]]:
    """Every set created in the period, oldest first, with its quality (streamed)."""
    qs = sets_with_quality(
        BackupSet.objects.filter(
            cluster=period.cluster, created_at__gte=period.since, created_at__lt=period.until
        )
    ).order_by("created_at", "id")
    verifications = VerificationRun.objects.filter(finished_at__isnull=False).order_by(
        "finished_at"
    )
    qs = qs.prefetch_related(
        Prefetch("verifications", queryset=verifications, to_attr="done"),
        Prefetch("copies", queryset=SetCopy.objects.order_by("id"), to_attr="copy_list"),
    )
    for s in qs.iterator(chunk_size=500):
        yield {
            "id": s.pk,
            "kind": s.kind,
            "status": s.status,
            "consistency": s.consistency,
            "method": s.method,
            "method_label": s.method_label,
            "created_at": _iso(s.created_at),
            "started_at": _iso(s.started_at),
            "finished_at": _iso(s.finished_at),
            "consistent_at": _iso(s.consistent_at),
            "rows": s.rows,
            "raw_bytes": s.raw_bytes,
            "stored_bytes": s.stored_bytes,
            "lock_window_ms": s.lock_window_ms,
            "q": s.q,
            "t": s.v_t,
            "d": s.v_d,
            "a": s.v_a,
            "quality": quality_level(s.q) if s.status == SetStatus.SUCCEEDED else "",
            "verified_at": _iso(s.verified_at),
            "last_drill_at": _iso(s.drill_at),
            "drill_q": s.drill_q,
            "verifications": [
                {
                    "id": v.pk,
                    "drill": v.drill,
                    "status": v.status,
                    "at": _iso(v.finished_at),
                    "q": v.q,
                    "target": v.target or None,
                    "problems": v.problems or [],
                }
                for v in s.done
            ],
            "targets": _set_targets(s),
            "problems": s.v_problems or [],
            "error": s.error,
        }


def _set_targets(backup_set) -> list[dict[str, Any]]:
    """A and Q per storage target holding the set: each target's newest `verify --target`."""
    latest = {v.target: v for v in backup_set.done if v.target and v.q is not None}
    rows = [("default", "complete")] + [(c.target, c.state) for c in backup_set.copy_list]
    return [
        {
            "target": name,
            "copy_state": state,
            "a": latest[name].a if name in latest else None,
            "q": latest[name].q if name in latest else None,
            "checked_at": _iso(latest[name].finished_at) if name in latest else None,
        }
        for name, state in rows
    ]


def report_drills(period: ReportPeriod) -> Iterator[dict[str, Any]]:
    qs = (
        VerificationRun.objects.filter(
            backup_set__cluster=period.cluster,
            drill=True,
            finished_at__gte=period.since,
            finished_at__lt=period.until,
        )
        .select_related("backup_set")
        .order_by("finished_at", "id")
    )
    for v in qs.iterator(chunk_size=500):
        yield {
            "id": v.pk,
            "set": v.backup_set_id,
            "finished_at": _iso(v.finished_at),
            "status": v.status,
            "q": v.q,
            "t": v.t,
            "d": v.d,
            "a": v.a,
            "rto_seconds": v.rto_seconds,
            "rows": v.backup_set.rows,
            "stored_bytes": v.backup_set.stored_bytes,
            "drill_instance": v.drill_instance_name,
            "target": v.target or "",
        }


def plan_summary(plan: dict) -> str:
    if not plan:
        return ""
    parts = []
    if isinstance(plan.get("tables"), list):
        parts.append(f"{len(plan['tables'])} tables")
    for key in ("rows", "objects", "bytes", "stored_bytes", "estimated_seconds"):
        if isinstance(plan.get(key), int | float):
            parts.append(f"{key.replace('_', ' ')} {plan[key]}")
    for key in ("conflicts", "warnings"):
        if plan.get(key):
            parts.append(f"{len(plan[key])} {key}")
    return ", ".join(parts)


def report_restores(period: ReportPeriod) -> Iterator[dict[str, Any]]:
    """Every restore request filed in the period with its approvals and runs (streamed)."""
    qs = (
        RestoreRequest.objects.filter(
            cluster=period.cluster, created_at__gte=period.since, created_at__lt=period.until
        )
        .select_related("requested_by", "target_instance")
        .prefetch_related(
            Prefetch("approvals", queryset=Approval.objects.select_related("approver")),
            Prefetch("runs", queryset=RestoreRun.objects.order_by("id")),
        )
        .order_by("created_at", "id")
    )
    for r in qs.iterator(chunk_size=200):
        runs = list(r.runs.all())
        last = runs[-1] if runs else None
        yield {
            "id": r.pk,
            "created_at": _iso(r.created_at),
            "requested_by": r.requested_by.get_username(),
            "reason": r.reason,
            "source_set": r.source_set_id,
            "at": _iso(r.at),
            "scope": r.scope or {},
            "target": r.target_label,
            "approvals_required": r.approvals_required,
            "plan_summary": plan_summary(r.plan or {}),
            "state": r.state,
            "decided_at": _iso(r.decided_at),
            "approvals": [
                {
                    "by": a.approver.get_username(),
                    "decision": a.decision,
                    "comment": a.comment,
                    "at": _iso(a.at),
                }
                for a in r.approvals.all()
            ],
            "runs": [
                {
                    "id": run.pk,
                    "status": run.status,
                    "started_at": _iso(run.started_at),
                    "finished_at": _iso(run.finished_at),
                    "q": run.q,
                    "error": run.error,
                }
                for run in runs
            ],
            "outcome": (last.status if last else r.state),
            "error": r.error or (last.error if last else ""),
        }


def report_summary(period: ReportPeriod, *, gaps: list[dict] | None = None) -> dict[str, Any]:
    """Success rate, achieved RPO and measured RTO, streamed over timestamps only.

    `gaps`: `recovery_gaps(period)` when the caller already has them."""
    sets = BackupSet.objects.filter(
        cluster=period.cluster, created_at__gte=period.since, created_at__lt=period.until
    )
    counts = {status: 0 for status in SetStatus.values}
    for status in sets.values_list("status", flat=True).iterator():
        counts[status] += 1
    finished = counts["succeeded"] + counts["failed"]
    if gaps is None:
        gaps = list(recovery_gaps(period))
    worst = max(gaps, key=lambda g: g["gap_seconds"]) if gaps else None
    rtos = [
        v
        for v in VerificationRun.objects.filter(
            backup_set__cluster=period.cluster,
            drill=True,
            finished_at__gte=period.since,
            finished_at__lt=period.until,
            rto_seconds__isnull=False,
        ).values_list("rto_seconds", flat=True)
    ]
    qs = [q for q in sets.filter(status="succeeded").values_list("q", flat=True)]
    rpo_target = int(cluster_rpo_target(period.cluster).total_seconds())
    return {
        "sets": sum(counts.values()),
        "by_status": counts,
        "success_rate": round(counts["succeeded"] / finished, 6) if finished else None,
        "achieved_rpo_seconds": worst["gap_seconds"] if worst else None,
        "achieved_rpo_between": [worst["from"], worst["to"]] if worst else None,
        "rpo_target_seconds": rpo_target,
        "rpo_met": (worst["gap_seconds"] <= rpo_target) if worst else False,
        "recovery_points": sum(1 for g in gaps if g["point"]),
        "drills": len(rtos),
        "rto_seconds_max": max(rtos) if rtos else None,
        "rto_seconds_mean": round(sum(rtos) / len(rtos), 3) if rtos else None,
        "sets_verified": sum(1 for q in qs if q is not None),
        "sets_unverified": sum(1 for q in qs if q is None),
        "sets_below_q1": sum(1 for q in qs if q is not None and q < 1.0),
    }


def recovery_gaps(period: ReportPeriod) -> Iterator[dict[str, Any]]:
    """Gaps between consecutive recovery points, from the last point before the period to
    the end of the period (or now). Each row: the point, and the gap that ended there."""
    points = BackupSet.objects.filter(
        cluster=period.cluster, status=SetStatus.SUCCEEDED, consistent_at__isnull=False
    )
    before = (
        points.filter(consistent_at__lt=period.since)
        .order_by("-consistent_at")
        .values_list("consistent_at", flat=True)
        .first()
    )
    previous = before
    inside = (
        points.filter(consistent_at__gte=period.since, consistent_at__lt=period.until)
        .order_by("consistent_at")
        .values_list("consistent_at", flat=True)
    )
    for point in inside.iterator():
        if previous is not None:
            yield {
                "point": _iso(point),
                "from": _iso(previous),
                "to": _iso(point),
                "gap_seconds": (point - previous).total_seconds(),
            }
        previous = point
    end = min(period.until, timezone.now())
    if previous is not None and end > previous:
        yield {
            "point": None,
            "from": _iso(previous),
            "to": _iso(end),
            "gap_seconds": (end - previous).total_seconds(),
        }


def _header(period: ReportPeriod, fmt: str) -> dict[str, Any]:
    return {
        "report": "shardvault-cluster-report",
        "format_version": 1,
        "format": fmt,
        "cluster": period.cluster.name,
        "since": _iso(period.since),
        "until": _iso(period.until),
        "generated_at": _iso(timezone.now()),
        "audit_head": audit_chain_head(),
        "sha256_scheme": "report_sha256 on the last line = sha256 of every byte before that line",
    }


# ---- CSV / JSON (streamed, self-hashing) --------------------------------------------------


def _hashed(pieces: Iterator[str], trailer) -> Iterator[str]:
    digest = hashlib.sha256()
    for piece in pieces:
        digest.update(piece.encode())
        yield piece
    yield trailer(digest.hexdigest())


class _Line:
    """A csv.writer target that hands back each written row."""

    def write(self, value: str) -> str:
        return value


SET_COLUMNS = [
    "id", "kind", "status", "consistency", "method", "method_label", "created_at", "started_at", "finished_at",
    "consistent_at", "rows", "raw_bytes", "stored_bytes", "lock_window_ms", "q", "t", "d", "a",
    "quality", "verified_at", "last_drill_at", "drill_q", "verification_dates", "problems", "error",
    "targets",
]  # fmt: skip
RESTORE_COLUMNS = [
    "id", "created_at", "requested_by", "reason", "source_set", "at", "scope", "target",
    "approvals_required", "plan_summary", "state", "decided_at", "approval_chain", "outcome", "error",
]  # fmt: skip
APPROVAL_COLUMNS = ["request", "by", "decision", "at", "comment"]
DRILL_COLUMNS = ["id", "set", "finished_at", "status", "q", "t", "d", "a", "rto_seconds", "rows", "stored_bytes", "drill_instance", "target"]  # fmt: skip


def _cell(value: Any) -> Any:
    if value is None:
        return ""
    if isinstance(value, dict | list):
        return json.dumps(value, sort_keys=True, default=str)
    return spreadsheet_safe(value)


def report_csv(period: ReportPeriod) -> Iterator[str]:
    """Sections of rows whose first cell names the section; a `section,...` row heads each.
    The last line is `report_sha256,<hex>`."""

    def body() -> Iterator[str]:
        w = csv.writer(_Line(), lineterminator="\n")
        yield w.writerow(["section", "key", "value"])
        for key, value in _header(period, "csv").items():
            yield w.writerow(["report", key, _cell(value)])
        yield w.writerow(["section", *SET_COLUMNS])
        for s in report_sets(period):
            s["verification_dates"] = ";".join(
                f"{v['at']} ({'drill' if v['drill'] else 'storage'}, Q={v['q']})"
                for v in s["verifications"]
            )
            s["problems"] = "; ".join(
                f"{p.get('object') or p.get('table')}: {p.get('reason')}" for p in s["problems"]
            )
            s["targets"] = "; ".join(
                f"{t['target']} ({t['copy_state']}): A={_cell(t['a'])} Q={_cell(t['q'])}"
                for t in s["targets"]
            )
            yield w.writerow(["sets", *(_cell(s.get(c)) for c in SET_COLUMNS)])
        yield w.writerow(["section", *DRILL_COLUMNS])
        for d in report_drills(period):
            yield w.writerow(["drills", *(_cell(d.get(c)) for c in DRILL_COLUMNS)])
        yield w.writerow(["section", *RESTORE_COLUMNS])
        approvals: list[dict] = []
        for r in report_restores(period):
            r["approval_chain"] = "; ".join(
                f"{a['decision']} by {a['by']} at {a['at']}"
                + (f" ({a['comment']})" if a["comment"] else "")
                for a in r["approvals"]
            )
            yield w.writerow(["restores", *(_cell(r.get(c)) for c in RESTORE_COLUMNS)])
            approvals.extend({"request": r["id"], **a} for a in r["approvals"])
        yield w.writerow(["section", *APPROVAL_COLUMNS])
        for a in approvals:
            yield w.writerow(["approvals", *(_cell(a.get(c)) for c in APPROVAL_COLUMNS)])
        yield w.writerow(["section", "metric", "value"])
        for key, value in report_summary(period).items():
            yield w.writerow(["summary", key, _cell(value)])

    return _hashed(body(), lambda hexdigest: f"report_sha256,{hexdigest}\n")


def report_json(period: ReportPeriod) -> Iterator[str]:
    """One JSON object; its last line is `"report_sha256": "<hex>"}`."""

    def dump(value: Any) -> str:
        return json.dumps(value, sort_keys=True, default=str)

    def array(name: str, items: Iterator[dict]) -> Iterator[str]:
        yield f"{dump(name)}: [\n"
        first = True
        for item in items:
            yield ("" if first else ",\n") + dump(item)
            first = False
        yield "\n],\n"

    def body() -> Iterator[str]:
        header = _header(period, "json")
        yield "{\n" + ",\n".join(f"{dump(k)}: {dump(v)}" for k, v in header.items()) + ",\n"
        yield from array("sets", report_sets(period))
        yield from array("drills", report_drills(period))
        yield from array("restores", report_restores(period))
        yield f'"summary": {dump(report_summary(period))},\n'

    return _hashed(body(), lambda hexdigest: f'"report_sha256": "{hexdigest}"}}\n')


def report_check(content: bytes) -> bool:
    """True when a CSV or JSON report's last line matches the sha256 of what precedes it."""
    body, _, last = content.rstrip(b"\n").rpartition(b"\n")
    body += b"\n"
    claimed = last.decode().replace('"', "").replace("}", "").split(",")[-1].split(":")[-1].strip()
    return hashlib.sha256(body).hexdigest() == claimed


# ---- PDF ----------------------------------------------------------------------------------


def report_data(period: ReportPeriod) -> dict[str, Any]:
    """The whole report as one dict (the PDF is small enough to lay out in memory)."""
    gaps = list(recovery_gaps(period))
    return {
        **_header(period, "pdf"),
        "sets": list(report_sets(period)),
        "drills": list(report_drills(period)),
        "restores": list(report_restores(period)),
        "gaps": gaps,
        "summary": report_summary(period, gaps=gaps),
    }


def report_pdf(period: ReportPeriod) -> bytes:
    data = report_data(period)
    canonical = {k: v for k, v in data.items() if k not in ("generated_at", "format")}
    data["content_sha256"] = hashlib.sha256(
        json.dumps(canonical, sort_keys=True, default=str).encode()
    ).hexdigest()
    return render_pdf(data)


def report_stream(period: ReportPeriod, fmt: str) -> Iterator[str]:
    if fmt == "csv":
        return report_csv(period)
    if fmt == "json":
        return report_json(period)
    raise ReportError(f"unknown format '{fmt}': choose csv, json or pdf")


def report_filename(period: ReportPeriod, fmt: str) -> str:
    return f"shardvault-{period.cluster.name}-{period.since:%Y%m%d}-{period.until:%Y%m%d}.{fmt}"


def report_write(period: ReportPeriod, fmt: str, handle: io.BufferedIOBase) -> str:
    """Write a report to a binary file; returns the file's sha256."""
    digest = hashlib.sha256()
    if fmt == "pdf":
        content = report_pdf(period)
        handle.write(content)
        digest.update(content)
        return digest.hexdigest()
    for piece in report_stream(period, fmt):
        raw = piece.encode()
        digest.update(raw)
        handle.write(raw)
    return digest.hexdigest()
