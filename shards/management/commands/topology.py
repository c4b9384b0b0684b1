"""`manage.py topology import FILE.yaml | export [--cluster C] | discover CLUSTER [--json]`."""

from __future__ import annotations

import json
import sys

from django.core.management.base import CommandError

from console.cli import ContractCommand
from shards.models import Cluster
from shards.selectors import discovery_report, topology_export
from shards.services.discovery_runs import discovery_run
from shards.services.topology import TopologyError
from shards.services.topology_import import topology_import
from shards.topology_file import MAX_TOPOLOGY_BYTES, TopologyFileError, parse_topology


class Command(ContractCommand):
    help = "Import, export and discover the shard topology (DESIGN.md, 'Command line')."

    def add_arguments(self, parser):
        sub = parser.add_subparsers(dest="subcommand", required=True)
        imp = sub.add_parser("import", help="create/update clusters from a YAML file; idempotent")
        imp.add_argument("file", help="the topology file ('-' for stdin)")
        exp = sub.add_parser("export", help="print YAML that import accepts (never passwords)")
        exp.add_argument("--cluster", default=None)
        disc = sub.add_parser("discover", help="list tables and sizes, run preflight checks")
        disc.add_argument("cluster")
        disc.add_argument("--json", action="store_true", dest="as_json")

    def handle(self, *args, subcommand: str, **options):
        return getattr(self, f"handle_{subcommand}")(**options)

    def handle_import(self, *, file: str, **options):
        try:
            # Never more than one byte past the limit: parse_topology refuses a longer file.
            if file == "-":
                text = sys.stdin.read(MAX_TOPOLOGY_BYTES + 1)
            else:
                with open(file, encoding="utf-8") as handle:
                    text = handle.read(MAX_TOPOLOGY_BYTES + 1)
        except OSError as exc:
            raise CommandError(f"cannot read {file}: {exc.strerror}") from None
        except UnicodeDecodeError:
            raise CommandError(f"{file} is not UTF-8 text") from None
        try:
            summary = topology_import(actor="cli", document=parse_topology(text))
        except TopologyFileError as exc:
            raise CommandError(f"{file}: {exc}") from None
        except TopologyError as exc:
            raise CommandError(str(exc)) from None
        self.stdout.write(summary.as_text())

    def handle_export(self, *, cluster: str | None, **options):
        if cluster is not None and not Cluster.objects.filter(name=cluster).exists():
            raise CommandError(f"no cluster named '{cluster}'")
        self.stdout.write(topology_export(cluster_name=cluster), ending="")

    def handle_discover(self, *, cluster: str, as_json: bool, **options):
        target = Cluster.objects.filter(name=cluster).first()
        if target is None:
            if as_json:
                self.stdout.write(
                    json.dumps(
                        {
                            "cluster": cluster,
                            "shards": [],
                            "findings": [],
                            "error": f"no cluster named '{cluster}'",
                        }
                    )
                )
            raise CommandError(f"no cluster named '{cluster}'")
        try:
            discovery_run(cluster=target, actor="cli")
        except Exception as exc:  # recorded on the run; scripts still get one JSON object
            if as_json:
                report = {**discovery_report(target), "error": str(exc)}
                self.stdout.write(json.dumps(report, ensure_ascii=False))
            raise CommandError(f"discovery of {cluster} failed: {exc}") from None
        report = discovery_report(target)
        if as_json:
            self.stdout.write(json.dumps(report, ensure_ascii=False))
        else:
            for shard in report["shards"]:
                self.stdout.write(
                    f"{shard['name']} ({shard['instance']}/{shard['database']}): {len(shard['tables'])} tables"
                )
                for table in shard["tables"]:
                    pk = "" if table["has_primary_key"] else "  no primary key"
                    self.stdout.write(
                        f"  {table['name']}  {table['engine']}  ~{table['rows']} rows{pk}"
                    )
            for finding in report["findings"]:
                where = "/".join(
                    x for x in (finding["instance"], finding["shard"], finding["table"]) if x
                )
                self.stdout.write(f"[{finding['severity']}] {where}: {finding['message']}")
        errors = [f for f in report["findings"] if f["severity"] == "error"]
        if errors:  # one line on stderr, also with --json (stdout holds the object)
            self.stderr.write(f"{len(errors)} preflight error(s) in cluster {cluster}")
            sys.exit(1)
