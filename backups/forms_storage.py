"""The admin page's form for a new storage target (the service validates the rest)."""

from __future__ import annotations

from django import forms


class StorageTargetForm(forms.Form):
    name = forms.CharField(max_length=63, help_text="lowercase letters, digits, - and _")
    url = forms.CharField(
        max_length=500, label="URL", help_text="file:///absolute/path or s3://bucket/prefix"
    )
    endpoint = forms.CharField(
        max_length=500, required=False, help_text="S3-compatible endpoint (empty: AWS)"
    )
    sse = forms.ChoiceField(
        choices=[("", "none"), ("AES256", "AES256"), ("aws:kms", "aws:kms")],
        required=False,
        label="Server-side encryption",
    )
    storage_class = forms.CharField(max_length=40, required=False)

    def options(self) -> dict:
        data = self.cleaned_data
        return {k: data[k] for k in ("sse", "storage_class") if data.get(k)}
