"""The Policy page's form: every policy field as text; the policies service checks the values,
so the page, `manage.py policy set` and the topology file refuse the same things alike."""

from __future__ import annotations

from django import forms

from backups.services.policies import (
    CONSISTENCIES,
    METHODS,
    POLICY_FIELDS,
    policy_changes_errors,
)

LIST_FIELDS = ("copy_to", "exclude_tables")
HELP = {
    "full_cron": "Five fields, UTC (minute hour day-of-month month day-of-week), e.g. 0 2 * * *. "
    "Empty: no scheduled full backups.",
    "full_consistency": "lockfree = hot: no lock, each shard by itself (InnoDB); locked = warm: "
    "a global read lock of a few ms, one instant across shards (InnoDB); cold: writes blocked "
    "on every instance for the whole dump, one instant, every engine (MyISAM included).",
    "full_method": "logical: rows, table by table (restore any table); physical: data files "
    "copied with mariabackup (rebuild a lost instance fast).",
    "incremental_every_minutes": "Continuous binlog capture every N minutes; 0 = off.",
    "keep_full": "Newest full chains always kept.",
    "keep_daily": "Newest full of each of the last N days kept, with its chain.",
    "keep_weekly": "Newest full of each of the last N ISO weeks kept.",
    "keep_monthly": "Newest full of each of the last N months kept.",
    "keep_days": "Nothing younger than this is ever removed.",
    "copy_to": "Storage targets that receive a verified copy, comma-separated.",
    "exclude_tables": "database.table globs never dumped or restored, comma-separated "
    "(e.g. scratch.*, *.tmp_*).",
    "max_threads_running": "Pause new chunks while Threads_running is above this; 0 = off.",
    "compression_level": "zstd level, 1 to 22.",
    "drill_every_days": "Restore drill of the newest set every N days; 0 = off.",
}


class PolicyForm(forms.Form):
    def __init__(self, *args, validate_url: str = "", **kwargs):
        super().__init__(*args, **kwargs)
        for name in POLICY_FIELDS:
            if name == "encrypt":
                field = forms.BooleanField(required=False, label="Encrypt backups")
            elif name == "full_consistency":
                field = forms.ChoiceField(choices=[(c, c) for c in CONSISTENCIES])
            elif name == "full_method":
                field = forms.ChoiceField(choices=[(m, m) for m in METHODS])
            else:
                field = forms.CharField(required=False, strip=True)
            field.label = field.label or name.replace("_", " ").capitalize()
            field.help_text = HELP.get(name, "")
            field.widget.attrs.update({"id": f"id_{name}"})
            self.fields[name] = field
        if validate_url:
            # Inline validation: each change posts the form to the validate endpoint, which
            # renders the form partial; only its error lists and the preview are swapped in,
            # so nothing the person is typing in another field is overwritten.
            fragments = ",".join(["#next-runs", *(f"#errors-{n}" for n in POLICY_FIELDS)])
            for field in self.fields.values():
                field.widget.attrs.update(
                    {
                        "hx-post": validate_url,
                        "hx-trigger": "change",
                        "hx-swap": "none",
                        "hx-select-oob": fragments,
                    }
                )

    def clean(self):
        data = super().clean()
        for name, message in policy_changes_errors(self.changes()).items():
            if name in self.fields and name not in self.errors:
                self.add_error(name, message)
        return data

    def changes(self) -> dict:
        """The submitted values, as the policies service takes them."""
        return {
            name: self.cleaned_data.get(name) for name in POLICY_FIELDS if name in self.cleaned_data
        }


def policy_initial(values: dict) -> dict:
    """A policy's values as the form shows them (lists comma-separated)."""
    return {k: ", ".join(v) if k in LIST_FIELDS else v for k, v in values.items()}
