"""`manage.py verify SET_ID [--drill] [--target NAME] [--json]`: prove a set restorable and
print Q. Without --target the set is read with fallback (default target first, then complete
copies); --target checks that one storage target's copy alone."""

from __future__ import annotations

import json
import sys

from django.contrib.auth import get_user_model
from django.core.management.base import CommandError

from backups.models import BackupSet
from backups.services.errors import VerificationError
from backups.services.verification import verification_run_now, verification_summary
from console.cli import ContractCommand
from console.roles import RoleDenied


class Command(ContractCommand):
    help = "Verify a backup set (storage check; --drill also restores it) and print Q. Exit 1 when Q < 1."

    def add_arguments(self, parser):
        parser.add_argument("set_id", type=int)
        parser.add_argument(
            "--drill", action="store_true", help="also restore into scratch databases"
        )
        parser.add_argument("--target", default="", help="check this storage target's copy only")
        parser.add_argument("--json", action="store_true", dest="as_json")
        parser.add_argument("--as", dest="as_user", default="", help="run as this user (operator)")

    def handle(
        self,
        *args,
        set_id: int,
        drill: bool,
        as_json: bool,
        as_user: str,
        target: str = "",
        **options,
    ):
        def fail(message: str):
            if as_json:  # one object with the contract's keys, also when the command fails
                doc = dict.fromkeys(("q", "t", "d", "a")) | {"set": set_id, "drill": drill}
                self.stdout.write(json.dumps(doc | {"problems": [], "error": message}))
            raise CommandError(message)

        user = None
        if as_user:
            user = get_user_model().objects.filter(username=as_user).first()
            if user is None:
                fail(f"no user named '{as_user}'")
        backup_set = BackupSet.objects.select_related("cluster").filter(pk=set_id).first()
        if backup_set is None:
            fail(f"backup set {set_id} does not exist")
        try:
            run = verification_run_now(backup_set=backup_set, user=user, drill=drill, target=target)
        except (VerificationError, RoleDenied) as exc:
            fail(str(exc))
        summary = verification_summary(run)
        if as_json:
            self.stdout.write(json.dumps(summary))
        else:
            self._print(summary)
        if run.error:
            self.stderr.write(f"verification of set {set_id} failed: {run.error}")
            sys.exit(1)
        if run.q is None or run.q < 1.0:
            first = (run.problems or [{}])[0]
            where = first.get("object") or first.get("table") or ""
            detail = (
                f" ({len(run.problems)} problem(s), first: {where}: {first.get('reason')})"
                if where
                else ""
            )
            q = "unknown" if run.q is None else f"{run.q:.4f}"
            self.stderr.write(f"set {set_id} has Q = {q} < 1{detail}")
            sys.exit(1)

    def _print(self, s: dict) -> None:
        kind = "drill" if s["drill"] else "storage check"

        def f(x):
            return "-" if x is None else f"{x:.4f}"

        where = f" on target {s['target']}" if s.get("target") else ""
        self.stdout.write(
            f"set {s['set']} ({kind}{where}): Q={f(s['q'])} T={f(s['t'])} D={f(s['d'])} "
            f"A={f(s['a'])}"
        )
        served = s.get("served_by") or {}
        if served:
            self.stdout.write(
                "served by: " + ", ".join(f"{name} ({n} objects)" for name, n in served.items())
            )
        if s["rto_seconds"] is not None:
            self.stdout.write(f"measured RTO: {s['rto_seconds']:.1f} s")
        for w in s["warnings"]:
            self.stdout.write(w)
        for p in s["problems"]:
            what = p.get("object") or p.get("table")
            on = f" on {p['target']}" if p.get("target") else ""
            then = f" (read from {p['served_by']} instead)" if p.get("served_by") else ""
            self.stdout.write(f"  problem: {what}{on}: {p.get('reason')}{then}")
