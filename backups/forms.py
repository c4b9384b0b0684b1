"""Forms of the backup pages (they parse; services decide)."""

from __future__ import annotations

from django import forms

from backups.models import BackupSet
from shards.models import Cluster

# DESIGN.md "Methods": each choice says what it costs production, in one line.
CONSISTENCY_CHOICES = [
    ("lockfree", "hot (lockfree): no lock, each shard consistent by itself"),
    ("locked", "warm (locked): a global read lock of a few ms"),
    ("cold", "cold: writes blocked on every instance for the whole dump"),
]
METHOD_CHOICES = [
    ("logical", "logical: rows, table by table"),
    ("physical", "physical: data files (mariabackup)"),
]
COLD_WARNING = (
    "A cold backup holds the global read lock on every instance of the cluster until the "
    "whole dump is done: every write waits for that long. It is the one method that copies "
    "MyISAM and other non-InnoDB tables."
)


class BackupStartForm(forms.Form):
    """The "Back up now" form."""

    cluster = forms.ModelChoiceField(queryset=Cluster.objects.all(), to_field_name="name")
    kind = forms.ChoiceField(choices=BackupSet.Kind.choices, initial=BackupSet.Kind.FULL)
    consistency = forms.ChoiceField(
        choices=CONSISTENCY_CHOICES,
        initial=BackupSet.Consistency.LOCKED,
        help_text="hot (lockfree): costs production nothing, no lock; each shard consistent "
        "by itself (InnoDB). warm (locked): a global read lock of a few ms; every shard at one "
        "instant (InnoDB). cold: writes blocked on every instance for the whole dump; every "
        "shard at one instant, every engine (MyISAM included).",
    )
    method = forms.ChoiceField(
        choices=METHOD_CHOICES,
        initial=BackupSet.Method.LOGICAL,
        required=False,
        help_text="logical: rows dumped table by table, restorable per table; physical: the "
        "data files copied with mariabackup, fastest to rebuild a lost instance.",
    )
    compression_level = forms.IntegerField(
        min_value=1, max_value=22, required=False, help_text="zstd level; empty: the policy's"
    )
    encrypt = forms.ChoiceField(
        choices=[("", "as the policy says"), ("yes", "encrypt"), ("no", "do not encrypt")],
        required=False,
    )

    def clean_method(self) -> str:
        return self.cleaned_data.get("method") or BackupSet.Method.LOGICAL

    def clean_encrypt(self) -> bool | None:
        return {"yes": True, "no": False}.get(self.cleaned_data.get("encrypt") or "")


class BackupFilterForm(forms.Form):
    """Filters of the backups list (GET)."""

    cluster = forms.ModelChoiceField(
        queryset=Cluster.objects.all(), to_field_name="name", required=False, empty_label="all"
    )
    kind = forms.ChoiceField(choices=[("", "all"), *BackupSet.Kind.choices], required=False)
    status = forms.ChoiceField(choices=[("", "all"), *BackupSet.Status.choices], required=False)
