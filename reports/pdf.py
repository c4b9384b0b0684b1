"""Lay out a cluster report as PDF with fpdf2: title page, summary with a chart of Q and
RPO over the period (drawn with fpdf2 primitives), then the tables."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from fpdf import FPDF

GREEN = (31, 138, 76)
AMBER = (183, 121, 31)
RED = (197, 48, 48)
GREY = (102, 113, 126)


def _t(value: Any) -> str:
    """Core PDF fonts are Latin-1: replace anything else rather than fail."""
    text = "" if value is None else str(value)
    return text.encode("latin-1", "replace").decode("latin-1")


def _q(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


def _when(value: str | None) -> str:
    return value[:19].replace("T", " ") if value else "-"


def _size(n: int | None) -> str:
    n = n or 0
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    seconds = float(seconds)
    if seconds < 120:
        return f"{seconds:.1f} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


def _colour(level: str) -> tuple[int, int, int]:
    return {"good": GREEN, "warn": AMBER, "bad": RED}.get(level, GREY)


class _Report(FPDF):
    def __init__(self, data: dict[str, Any]):
        super().__init__(orientation="L", unit="mm", format="A4")
        self.data = data
        self.set_auto_page_break(auto=True, margin=14)
        self.set_title(_t(f"ShardVault report: {data['cluster']}"))
        self.set_author("ShardVault")

    def footer(self):
        self.set_y(-10)
        self.set_font("Helvetica", size=7)
        self.set_text_color(*GREY)
        self.cell(
            0,
            5,
            _t(
                f"{self.data['cluster']} | audit head {self.data['audit_head']} | page {self.page_no()}"
            ),
            align="C",
        )
        self.set_text_color(0, 0, 0)


def render_pdf(data: dict[str, Any]) -> bytes:
    pdf = _Report(data)
    _title_page(pdf, data)
    _summary_page(pdf, data)
    _sets_table(pdf, data)
    _targets_table(pdf, data)
    _drills_table(pdf, data)
    _restores_table(pdf, data)
    return bytes(pdf.output())


def _title_page(pdf: _Report, data: dict) -> None:
    pdf.add_page()
    pdf.set_font("Helvetica", "B", 26)
    pdf.ln(35)
    pdf.cell(
        0, 14, "ShardVault backup and restore report", new_x="LMARGIN", new_y="NEXT", align="C"
    )
    pdf.set_font("Helvetica", size=16)
    pdf.cell(0, 10, _t(f"Cluster {data['cluster']}"), new_x="LMARGIN", new_y="NEXT", align="C")
    pdf.set_font("Helvetica", size=12)
    pdf.cell(
        0, 8, _t(f"Period {_when(data['since'])} to {_when(data['until'])} UTC"),
        new_x="LMARGIN", new_y="NEXT", align="C",
    )  # fmt: skip
    pdf.cell(
        0,
        8,
        _t(f"Generated {_when(data['generated_at'])} UTC"),
        new_x="LMARGIN",
        new_y="NEXT",
        align="C",
    )
    pdf.ln(12)
    pdf.set_font("Courier", size=9)
    for line in (
        f"Audit log head hash: {data['audit_head']}",
        f"Content sha256:      {data.get('content_sha256', '')}",
    ):
        pdf.cell(0, 6, _t(line), new_x="LMARGIN", new_y="NEXT", align="C")
    pdf.ln(6)
    pdf.set_font("Helvetica", size=9)
    pdf.multi_cell(
        0,
        5,
        _t(
            "The file's own sha256 is delivered beside it (FILE.sha256 from `manage.py report`, "
            "or the X-Report-SHA256 header of the download). Content sha256 is the sha256 of the "
            "canonical JSON (sorted keys) of the data shown here. Check the audit chain with "
            "`manage.py audit verify`; the head above must appear in the audit log."
        ),
        align="C",
    )


def _summary_page(pdf: _Report, data: dict) -> None:
    s = data["summary"]
    pdf.add_page()
    pdf.set_font("Helvetica", "B", 16)
    pdf.cell(0, 10, "Summary", new_x="LMARGIN", new_y="NEXT")
    pdf.set_font("Helvetica", size=10)
    rate = "-" if s["success_rate"] is None else f"{s['success_rate'] * 100:.1f} %"
    rows = [
        ("Backup sets in period", s["sets"]),
        ("Succeeded / failed / cancelled", f"{s['by_status']['succeeded']} / {s['by_status']['failed']} / {s['by_status']['cancelled']}"),
        ("Success rate", rate),
        ("Achieved RPO (largest gap between recovery points)", _duration(s["achieved_rpo_seconds"])),
        ("RPO target", _duration(s["rpo_target_seconds"]) + ("  (met)" if s["rpo_met"] else "  (NOT met)")),
        ("Restore drills / measured RTO max / mean", f"{s['drills']} / {_duration(s['rto_seconds_max'])} / {_duration(s['rto_seconds_mean'])}"),
        ("Succeeded sets verified / unverified / with Q < 1", f"{s['sets_verified']} / {s['sets_unverified']} / {s['sets_below_q1']}"),
        ("Restore requests", len(data["restores"])),
    ]  # fmt: skip
    for label, value in rows:
        pdf.cell(110, 6, _t(label))
        pdf.cell(0, 6, _t(value), new_x="LMARGIN", new_y="NEXT")
    pdf.ln(4)
    top = pdf.get_y()
    _chart_q(pdf, data, x=pdf.l_margin, y=top, w=128, h=70)
    _chart_rpo(pdf, data, x=pdf.l_margin + 140, y=top, w=128, h=70)
    pdf.set_xy(pdf.l_margin, top + 78)
    pdf.set_font("Helvetica", size=7.5)
    pdf.set_text_color(*GREY)
    pdf.multi_cell(
        0,
        4,
        "Left: Q of each verified set by creation time (green Q = 1, amber 0.99 to < 1, red lower, "
        "clipped at 0.90); red squares on the axis are failed backups. Right: each bar is the gap "
        "that ended at a recovery point (or at the end of the period); red bars exceed the RPO "
        "target (dashed line).",
    )
    pdf.set_text_color(0, 0, 0)


def _span(data: dict) -> tuple[float, float]:
    start = datetime.fromisoformat(data["since"]).timestamp()
    end = datetime.fromisoformat(data["until"]).timestamp()
    return start, max(end, start + 1)


def _axes(pdf: FPDF, *, x: float, y: float, w: float, h: float, title: str, data: dict) -> None:
    pdf.set_font("Helvetica", "B", 10)
    pdf.text(x, y + 4, _t(title))
    pdf.set_draw_color(0, 0, 0)
    pdf.set_line_width(0.3)
    pdf.line(x + 12, y + 8, x + 12, y + h)
    pdf.line(x + 12, y + h, x + w, y + h)
    pdf.set_font("Helvetica", size=7)
    pdf.text(x + 12, y + h + 4, _t(_when(data["since"])[:10]))
    pdf.text(x + w - 18, y + h + 4, _t(_when(data["until"])[:10]))


def _chart_q(pdf: FPDF, data: dict, *, x, y, w, h) -> None:
    """Q of each verified set at its creation time; y from 0.9 to 1 (lower clipped to 0.9)."""
    _axes(pdf, x=x, y=y, w=w, h=h, title="Quality Q of each set over the period", data=data)
    start, end = _span(data)
    plot_x, plot_w, plot_top, plot_h = x + 12, w - 14, y + 10, h - 10
    floor = 0.9
    for mark in (0.9, 0.95, 0.99, 1.0):
        my = plot_top + (1 - (mark - floor) / (1 - floor)) * plot_h
        pdf.set_draw_color(220, 220, 220)
        pdf.line(plot_x, my, plot_x + plot_w, my)
        pdf.text(x, my + 1, f"{mark:.2f}")
    for s in data["sets"]:
        moment = datetime.fromisoformat(s["created_at"]).timestamp()
        px = plot_x + (moment - start) / (end - start) * plot_w
        if s["q"] is None:
            if s["status"] == "failed":
                pdf.set_fill_color(*RED)
                pdf.rect(
                    px - 1, plot_top + plot_h - 2, 2, 2, style="F"
                )  # failed: square on the axis
            continue
        q = max(floor, min(1.0, s["q"]))
        py = plot_top + (1 - (q - floor) / (1 - floor)) * plot_h
        pdf.set_fill_color(*_colour(s["quality"] or "warn"))
        pdf.ellipse(px - 1.2, py - 1.2, 2.4, 2.4, style="F")
    pdf.set_draw_color(0, 0, 0)


def _chart_rpo(pdf: FPDF, data: dict, *, x, y, w, h) -> None:
    """Each gap between recovery points as a bar ending at the point; dashed line = target."""
    _axes(pdf, x=x, y=y, w=w, h=h, title="Gap between recovery points (RPO) vs target", data=data)
    start, end = _span(data)
    plot_x, plot_w, plot_top, plot_h = x + 12, w - 14, y + 10, h - 10
    target = data["summary"]["rpo_target_seconds"]
    gaps = data["gaps"]
    top = max([target * 1.25] + [g["gap_seconds"] for g in gaps])
    ty = plot_top + (1 - target / top) * plot_h
    pdf.set_draw_color(*RED)
    pdf.set_dash_pattern(dash=1.5, gap=1)
    pdf.line(plot_x, ty, plot_x + plot_w, ty)
    pdf.set_dash_pattern()
    pdf.set_font("Helvetica", size=7)
    pdf.text(x, ty + 1, _t(_duration(target)))
    for g in gaps:
        moment = datetime.fromisoformat(g["to"]).timestamp()
        px = plot_x + max(0.0, min(1.0, (moment - start) / (end - start))) * plot_w
        bar_h = g["gap_seconds"] / top * plot_h
        pdf.set_fill_color(*(RED if g["gap_seconds"] > target else GREEN))
        pdf.rect(px - 1, plot_top + plot_h - bar_h, 2, bar_h, style="F")
    pdf.set_draw_color(0, 0, 0)


def _table(pdf: FPDF, title: str, columns: list[tuple[str, float]], rows, empty: str) -> None:
    pdf.add_page()
    pdf.set_font("Helvetica", "B", 14)
    pdf.cell(0, 9, _t(title), new_x="LMARGIN", new_y="NEXT")

    def head():
        pdf.set_font("Helvetica", "B", 7.5)
        pdf.set_fill_color(230, 234, 238)
        for name, width in columns:
            pdf.cell(width, 6, _t(name), border=1, fill=True)
        pdf.ln()

    head()
    pdf.set_font("Helvetica", size=7.5)
    count = 0
    for cells, colour in rows:
        count += 1
        lines = max(
            1,
            *(
                len(pdf.multi_cell(w, 4, _t(v), dry_run=True, output="LINES"))
                for v, (_, w) in zip(cells, columns, strict=True)
            ),
        )
        height = 4 * lines
        if pdf.get_y() + height > pdf.h - pdf.b_margin:
            pdf.add_page()
            head()
            pdf.set_font("Helvetica", size=7.5)
        y0 = pdf.get_y()
        xpos = pdf.l_margin
        for index, (value, (_, width)) in enumerate(zip(cells, columns, strict=True)):
            pdf.set_xy(xpos, y0)
            if colour and index == colour[0]:
                pdf.set_text_color(*colour[1])
            pdf.multi_cell(width, 4, _t(value), border=0)
            pdf.set_text_color(0, 0, 0)
            pdf.rect(xpos, y0, width, height)
            xpos += width
        pdf.set_xy(pdf.l_margin, y0 + height)
    if not count:
        pdf.set_font("Helvetica", "I", 9)
        pdf.cell(0, 7, _t(empty), new_x="LMARGIN", new_y="NEXT")


def _sets_table(pdf: FPDF, data: dict) -> None:
    columns = [
        ("Set", 12), ("Kind", 18), ("Status", 17), ("Method", 15), ("Started (UTC)", 28),
        ("Finished (UTC)", 28), ("Size stored", 18), ("Rows", 16), ("Q", 14), ("T / D / A", 32),
        ("Verified", 26), ("Last drill", 26), ("Problems / error", 27),
    ]  # fmt: skip

    def rows():
        for s in data["sets"]:
            problems = "; ".join(
                f"{p.get('object') or p.get('table')}: {p.get('reason')}" for p in s["problems"]
            )
            q_text = "unverified" if s["q"] is None and s["status"] == "succeeded" else _q(s["q"])
            cells = [
                s["id"], s["kind"], s["status"], s["method_label"], _when(s["started_at"]),
                _when(s["finished_at"]), _size(s["stored_bytes"]), s["rows"], q_text,
                f"{_q(s['t'])} / {_q(s['d'])} / {_q(s['a'])}", _when(s["verified_at"]),
                _when(s["last_drill_at"]), problems or s["error"] or "",
            ]  # fmt: skip
            yield cells, (8, _colour(s["quality"] or ("bad" if s["status"] == "failed" else "")))

    _table(pdf, "Backup sets", columns, rows(), "No backup sets in this period.")


def _targets_table(pdf: FPDF, data: dict) -> None:
    """A and Q per storage target holding each set (the newest `verify --target` there)."""
    columns = [("Set", 15), ("Target", 45), ("Copy", 30), ("A", 25), ("Q", 25),
               ("Checked (UTC)", 40)]  # fmt: skip

    def rows():
        for s in data["sets"]:
            for t in s.get("targets") or []:
                level = "" if t["q"] is None else ("good" if t["q"] >= 1 else "bad")
                yield [s["id"], t["target"], t["copy_state"], _q(t["a"]), _q(t["q"]),
                       _when(t["checked_at"])], (4, _colour(level))  # fmt: skip

    _table(pdf, "Storage targets: A and Q per target", columns, rows(), "No sets in this period.")


def _drills_table(pdf: FPDF, data: dict) -> None:
    columns = [("Drill", 15), ("Set", 15), ("Finished (UTC)", 35), ("Q", 20), ("T", 20), ("D", 20),
               ("A", 20), ("Measured RTO", 30), ("Rows", 25), ("Stored", 25), ("Drill instance", 52)]  # fmt: skip

    def rows():
        for d in data["drills"]:
            level = "good" if (d["q"] or 0) >= 1 else "bad"
            yield [d["id"], d["set"], _when(d["finished_at"]), _q(d["q"]), _q(d["t"]), _q(d["d"]),
                   _q(d["a"]), _duration(d["rto_seconds"]), d["rows"], _size(d["stored_bytes"]),
                   d["drill_instance"] or "shard instances"], (3, _colour(level))  # fmt: skip

    _table(
        pdf, "Restore drills (measured RTO)", columns, rows(), "No restore drills in this period."
    )


def _restores_table(pdf: FPDF, data: dict) -> None:
    columns = [("Req.", 11), ("Filed (UTC)", 27), ("Requested by", 24), ("Source", 20),
               ("Target", 20), ("Reason", 40), ("Plan", 38), ("Approvals (who, when, comment)", 60),
               ("State / outcome", 37)]  # fmt: skip

    def rows():
        for r in data["restores"]:
            chain = (
                "\n".join(
                    f"{a['decision']} by {a['by']} at {_when(a['at'])}"
                    + (f": {a['comment']}" if a["comment"] else "")
                    for a in r["approvals"]
                )
                or "none"
            )
            source = f"set {r['source_set']}" if r["source_set"] else f"at {_when(r['at'])}"
            outcome = (
                r["state"] if r["outcome"] == r["state"] else f"{r['state']}; run {r['outcome']}"
            )
            if r["error"]:
                outcome += f": {r['error']}"
            level = {"succeeded": "good", "rejected": "bad", "failed": "bad"}.get(
                r["outcome"], "warn"
            )
            yield [r["id"], _when(r["created_at"]), r["requested_by"], source, r["target"], r["reason"],
                   r["plan_summary"], chain, outcome], (8, _colour(level))  # fmt: skip

    _table(
        pdf,
        "Restores and their approval chains",
        columns,
        rows(),
        "No restore requests in this period.",
    )
