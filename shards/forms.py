"""Forms for the topology pages. Passwords are write-only: blank on edit means "keep"."""

from __future__ import annotations

from django import forms

from shards.models import NAME_VALIDATOR, Instance


class ClusterForm(forms.Form):
    name = forms.CharField(max_length=63, validators=[NAME_VALIDATOR])
    shard_key = forms.CharField(max_length=64, required=False)
    description = forms.CharField(max_length=300, required=False)

    def __init__(self, *args, editing: bool = False, **kwargs):
        super().__init__(*args, **kwargs)
        if editing:
            del self.fields["name"]


class InstanceForm(forms.Form):
    name = forms.CharField(max_length=63, validators=[NAME_VALIDATOR])
    host = forms.CharField(max_length=255)
    port = forms.IntegerField(
        initial=3306,
        min_value=1,
        max_value=65535,
        error_messages={
            "min_value": "The port is out of range: use 1 to 65535.",
            "max_value": "The port is out of range: use 1 to 65535.",
        },
    )
    user = forms.CharField(max_length=80)
    password = forms.CharField(
        required=False,
        strip=False,
        widget=forms.PasswordInput(render_value=False, attrs={"autocomplete": "new-password"}),
    )
    password_env = forms.RegexField(
        regex=r"^[A-Za-z_][A-Za-z0-9_]*$",
        max_length=128,
        required=False,
        label="Password environment variable",
        help_text="Instead of a stored password: the variable each worker reads when it connects.",
        error_messages={"invalid": "Use an environment variable name (letters, digits, '_')."},
    )
    tls_ca = forms.CharField(max_length=500, required=False, label="TLS CA file")
    tls_verify = forms.BooleanField(required=False, label="Verify the server's TLS host name")
    max_connections = forms.IntegerField(initial=4, min_value=1, max_value=64)
    datadir = forms.RegexField(
        regex=r"^/",
        max_length=500,
        required=False,
        label="Data directory",
        help_text="For physical backups: the server's data directory on its host.",
        error_messages={"invalid": "Give an absolute path."},
    )
    agent_queue = forms.RegexField(
        regex=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$",
        max_length=100,
        required=False,
        label="Agent queue",
        help_text="For physical backups: the queue of a worker on the database host (host-<name>).",
        error_messages={"invalid": "Use a queue name (letters, digits, '-', '_', '.')."},
    )

    def __init__(self, *args, editing: bool = False, **kwargs):
        super().__init__(*args, **kwargs)
        self.editing = editing
        if editing:
            del self.fields["name"]
            self.fields["password"].help_text = "Leave blank to keep the stored password."

    def clean(self):
        data = super().clean()
        if data.get("password") and data.get("password_env"):
            raise forms.ValidationError("Give a password or a password variable, not both.")
        return data

    @staticmethod
    def initial_for(instance: Instance) -> dict:
        return {
            "host": instance.host,
            "port": instance.port,
            "user": instance.user,
            "password_env": instance.password_env,
            "tls_ca": instance.tls_ca,
            "tls_verify": instance.tls_verify,
            "max_connections": instance.max_connections,
            "datadir": instance.datadir,
            "agent_queue": instance.agent_queue,
        }


class ShardForm(forms.Form):
    name = forms.CharField(max_length=63, validators=[NAME_VALIDATOR])
    instance = forms.ModelChoiceField(
        queryset=Instance.objects.none(),
        to_field_name="name",
        error_messages={"invalid_choice": "Choose an instance of this cluster."},
    )
    database = forms.CharField(max_length=64, strip=False)

    def __init__(self, *args, cluster, editing: bool = False, **kwargs):
        super().__init__(*args, **kwargs)
        self.fields["instance"].queryset = cluster.instances.order_by("name")
        if editing:
            del self.fields["name"]


class ImportForm(forms.Form):
    file = forms.FileField(label="Topology file (YAML)")
