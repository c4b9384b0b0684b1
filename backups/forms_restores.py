"""The restore wizard's form: cluster, source (set, time or stop point), scope, target, reason."""

from __future__ import annotations

from django import forms

from backups.models import BackupSet
from shards.models import Cluster


def _names(text: str) -> list[str]:
    return [part.strip() for part in (text or "").replace("\n", ",").split(",") if part.strip()]


def _set_choice_label(backup_set: BackupSet) -> str:
    """ "#12 warm (locked), logical · 2026-03-01 02:00:04 UTC": each set with its method."""
    at = backup_set.consistent_at or backup_set.created_at
    return f"#{backup_set.pk} {backup_set.method_label} · {at:%Y-%m-%d %H:%M:%S} UTC"


class RestoreRequestForm(forms.Form):
    cluster = forms.ModelChoiceField(queryset=Cluster.objects.all(), to_field_name="name")
    source_set = forms.ModelChoiceField(
        queryset=BackupSet.objects.none(), required=False, label="Backup set"
    )
    at = forms.DateTimeField(
        required=False,
        label="Or a point in time (UTC)",
        help_text="ISO 8601, e.g. 2026-01-31 12:00:00; without an offset it means UTC.",
    )
    before_gtid = forms.CharField(
        required=False,
        max_length=100,
        label="Or stop right before GTID",
        help_text="The GTID's shard stops right before that transaction; every other shard "
        "at its commit second (e.g. 0-1-123, as listed on the Transactions page).",
    )
    until = forms.CharField(
        required=False,
        label="Or stop at binlog positions",
        help_text="INSTANCE:FILE:POS, one per instance in scope, comma-separated.",
    )
    shards = forms.MultipleChoiceField(
        required=False, widget=forms.CheckboxSelectMultiple, help_text="None chosen: every shard."
    )
    tables = forms.CharField(
        required=False,
        help_text="Logical or physical table names, comma-separated. Empty: every table.",
    )
    target = forms.ChoiceField(choices=())
    datadir = forms.CharField(
        required=False,
        max_length=4096,
        label="Data directory (rebuild only)",
        help_text="rebuild:INSTANCE only: the empty directory, an absolute path on the "
        "instance's host, that the physical copy is prepared and moved into.",
    )
    reason = forms.CharField(required=False, widget=forms.Textarea(attrs={"rows": 3}))

    def __init__(self, *args, cluster: Cluster | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.cluster_obj = cluster
        targets = [("side", "side: new databases <db>__r<id> on the same instances")]
        if cluster is not None:
            self.fields["source_set"].queryset = BackupSet.objects.filter(
                cluster=cluster, kind=BackupSet.Kind.FULL, status=BackupSet.Status.SUCCEEDED
            ).order_by("-id")
            self.fields["source_set"].label_from_instance = _set_choice_label
            self.fields["shards"].choices = [
                (s.name, f"{s.name} ({s.database} on {s.instance.name})")
                for s in cluster.shards.select_related("instance")
            ]
            targets += [
                (f"instance:{i.name}", f"instance:{i.name} (same database names on {i.name})")
                for i in cluster.instances.all()
            ]
        targets.append(("inplace", "inplace: replace the live tables (needs two approvals)"))
        if (
            cluster is not None
            and self.fields["source_set"].queryset.filter(method=BackupSet.Method.PHYSICAL).exists()
        ):
            # Fault recovery: a lost instance from a physical set (CLI: --target rebuild:NAME).
            targets += [
                (
                    f"rebuild:{i.name}",
                    f"rebuild:{i.name} (a physical set's copy of {i.name} into an empty data "
                    "directory; needs two approvals)",
                )
                for i in cluster.instances.all()
            ]
        self.fields["target"].choices = targets

    def clean(self):
        data = super().clean()
        data["before_gtid"] = (data.get("before_gtid") or "").strip()
        data["until_positions"] = _names(data.get("until", ""))
        chosen = [
            bool(data.get("source_set")),
            bool(data.get("at")),
            bool(data["before_gtid"]),
            bool(data["until_positions"]),
        ]
        if sum(chosen) > 1:
            raise forms.ValidationError(
                "Choose one source: a backup set, a point in time, a GTID or positions."
            )
        if not any(chosen):
            raise forms.ValidationError(
                "Choose a backup set, a point in time, a GTID to stop before, or positions."
            )
        data["table_names"] = _names(data.get("tables", ""))
        data["datadir"] = (data.get("datadir") or "").strip()
        rebuild = (data.get("target") or "").startswith("rebuild:")
        if rebuild and not data["datadir"]:
            self.add_error("datadir", "A rebuild needs the empty data directory to fill.")
        elif rebuild and (data["before_gtid"] or data["until_positions"]):
            raise forms.ValidationError(
                "A rebuild rolls forward to a point in time only, not to a GTID or positions."
            )
        elif data["datadir"] and not rebuild:
            self.add_error("datadir", "A data directory is only for a rebuild:INSTANCE target.")
        return data
