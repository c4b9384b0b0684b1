"""`manage.py report CLUSTER [--since DATE] [--until DATE] --format csv|json|pdf -o FILE`."""

from __future__ import annotations

from pathlib import Path

from django.core.management.base import CommandError

from console.audit import audit_chain_head
from console.cli import ContractCommand
from reports.reports import FORMATS, ReportError, report_period, report_write


class Command(ContractCommand):
    help = (
        "Write an auditor report of one cluster over a period. CSV/JSON end with a line "
        "carrying report_sha256 (sha256 of every byte before it: `head -n -1 FILE | sha256sum`); "
        "PDF gets FILE.sha256 beside it. Prints the file's sha256 and the audit head."
    )

    def add_arguments(self, parser):
        parser.add_argument("cluster")
        parser.add_argument(
            "--since",
            default="",
            help="YYYY-MM-DD or ISO 8601 (UTC); default 30 days before --until",
        )
        parser.add_argument(
            "--until", default="", help="YYYY-MM-DD (that whole day) or ISO 8601; default now"
        )
        parser.add_argument("--format", dest="fmt", choices=FORMATS, required=True)
        parser.add_argument("-o", "--output", required=True)

    def handle(self, *args, cluster: str, since: str, until: str, fmt: str, output: str, **options):
        try:
            period = report_period(cluster_name=cluster, since=since, until=until)
        except ReportError as exc:
            raise CommandError(str(exc)) from None
        path = Path(output)
        if not path.parent.exists():
            raise CommandError(f"directory {path.parent} does not exist")
        head = audit_chain_head()
        tmp = path.with_name(path.name + ".partial")
        with open(tmp, "wb") as handle:
            file_sha256 = report_write(period, fmt, handle)
        tmp.replace(path)
        if fmt == "pdf":
            path.with_name(path.name + ".sha256").write_text(f"{file_sha256}  {path.name}\n")
        self.stdout.write(f"{path}  sha256={file_sha256}  audit_head={head}")
