"""`manage.py audit verify`: walk the audit hash chain; exit 0 intact, 1 naming the first broken event."""

from __future__ import annotations

import sys

from console.audit import audit_verify_chain
from console.cli import ContractCommand


class Command(ContractCommand):
    help = "Audit log tools. `audit verify` checks the whole hash chain."

    def add_arguments(self, parser):
        parser.add_argument("action", choices=["verify"])

    def handle(self, *args, action: str, **options):
        status = audit_verify_chain()
        if status.intact:
            self.stdout.write(f"audit chain intact: {status.count} events, head {status.head}")
            return
        self.stderr.write(
            f"audit chain broken at event #{status.first_broken_id}: {status.reason} "
            f"({status.count - 1} events before it are intact)"
        )
        sys.exit(1)
