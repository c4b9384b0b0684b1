"""Forms of the backup pages (they parse; services decide)."""

from __future__ import annotations

from django import forms

from backups.models import BackupSet
from shards.models import Cluster


class BackupStartForm(forms.Form):
    """The "Back up now" form."""

    cluster = forms.ModelChoiceField(queryset=Cluster.objects.all(), to_field_name="name")
    kind = forms.ChoiceField(choices=BackupSet.Kind.choices, initial=BackupSet.Kind.FULL)
    consistency = forms.ChoiceField(
        choices=BackupSet.Consistency.choices,
        initial=BackupSet.Consistency.LOCKED,
        help_text="locked: one instant across every shard (a few ms of global lock); "
        "lockfree: each shard consistent by itself, no lock.",
    )
    compression_level = forms.IntegerField(
        min_value=1, max_value=22, required=False, help_text="zstd level; empty: the policy's"
    )
    encrypt = forms.ChoiceField(
        choices=[("", "as the policy says"), ("yes", "encrypt"), ("no", "do not encrypt")],
        required=False,
    )

    def clean_encrypt(self) -> bool | None:
        return {"yes": True, "no": False}.get(self.cleaned_data.get("encrypt") or "")


class BackupFilterForm(forms.Form):
    """Filters of the backups list (GET)."""

    cluster = forms.ModelChoiceField(
        queryset=Cluster.objects.all(), to_field_name="name", required=False, empty_label="all"
    )
    kind = forms.ChoiceField(choices=[("", "all"), *BackupSet.Kind.choices], required=False)
    status = forms.ChoiceField(choices=[("", "all"), *BackupSet.Status.choices], required=False)
