"""`manage.py keys status [--json]` and `manage.py keys rotate [--json]`: the master keys.

Both print {"current", "keys": [{"id", "sets", "passwords", "manifests"}]}: per key id
(never a key), how many encrypted sets' data keys, stored passwords and stored manifests
it protects. `rotate` moves all of it to SHARDVAULT_DATA_KEY (see backups.services.keys)
and adds "rotated" (what it changed, sets still running it left alone, problems); it
exits 1 when a problem kept something on an old key.
"""

from __future__ import annotations

import getpass
import json

from django.core.management.base import CommandError

from backups.engine.errors import EngineError
from backups.services.keys import keys_rotate, keys_status
from console.cli import ContractCommand


class Command(ContractCommand):
    help = "Master keys: what each key id protects (status), or move it all to the current key."

    def add_arguments(self, parser):
        sub = parser.add_subparsers(dest="action", required=True)
        for name, text in (
            ("status", "count what each key id still protects"),
            ("rotate", "rewrap, re-encrypt and re-sign everything with the current key"),
        ):
            action = sub.add_parser(name, help=text)
            action.add_argument("--json", action="store_true", dest="as_json")

    def handle(self, *args, action: str, as_json: bool, **options):
        try:
            if action == "status":
                result = keys_status()
            else:
                result = keys_rotate(actor=f"os:{_os_user()}")
        except EngineError as exc:
            if as_json:
                self.stdout.write(json.dumps({"current": "", "keys": [], "error": str(exc)}))
            raise CommandError(str(exc)) from None
        problems = (result.get("rotated") or {}).get("problems") or []
        if as_json:
            self.stdout.write(json.dumps({**result, "error": "; ".join(problems)}))
        else:
            self.stdout.write(f"current key id: {result['current']}")
            for key in result["keys"]:
                mark = " (current)" if key["id"] == result["current"] else ""
                self.stdout.write(
                    f"{key['id']}{mark}: {key['sets']} sets, {key['passwords']} passwords, "
                    f"{key['manifests']} manifests"
                )
            rotated = result.get("rotated")
            if rotated:
                self.stdout.write(
                    f"rotated: {rotated['sets']} set keys, {rotated['passwords']} passwords, "
                    f"{rotated['manifests']} manifests; {rotated['skipped_running']} running "
                    "sets left for a later run"
                )
        if problems:
            raise CommandError(f"{len(problems)} item(s) not rotated: {problems[0]}")


def _os_user() -> str:
    try:
        return getpass.getuser()
    except Exception:  # noqa: BLE001 - no user name in this environment
        return "unknown"
