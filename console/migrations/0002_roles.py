"""Create the four role groups of DESIGN.md with their model permissions."""

from django.db import migrations

READ = ("view",)
ALL = ("add", "change", "delete", "view")

# role -> {app_label.model: actions}
ROLE_PERMISSIONS = {
    "operator": {
        "shards.cluster": ALL,
        "shards.instance": ALL,
        "shards.shard": ALL,
        "shards.logicaltable": ALL,
        "shards.physicaltable": READ,
        "shards.finding": READ,
        "shards.discoveryrun": ("add", "view"),
        "backups.backupset": ("add", "change", "view"),
        "backups.shardbackup": READ,
        "backups.tablebackup": READ,
        "backups.chunk": READ,
        "backups.binlogsegment": READ,
        "backups.restorerequest": ("add", "view"),
        "backups.approval": READ,
        "backups.restorerun": READ,
        "backups.restoretableresult": READ,
        "backups.verificationrun": ("add", "view"),
        "backups.backuppolicy": READ,
    },
    "approver": {
        "backups.restorerequest": READ,
        "backups.approval": ("add", "view"),
        "backups.backupset": READ,
        "backups.restorerun": READ,
        "backups.restoretableresult": READ,
        "shards.cluster": READ,
    },
    "auditor": {
        "console.auditevent": READ,
        "shards.cluster": READ,
        "shards.instance": READ,
        "shards.shard": READ,
        "shards.logicaltable": READ,
        "shards.physicaltable": READ,
        "shards.finding": READ,
        "backups.backupset": READ,
        "backups.shardbackup": READ,
        "backups.tablebackup": READ,
        "backups.restorerequest": READ,
        "backups.approval": READ,
        "backups.restorerun": READ,
        "backups.verificationrun": READ,
        "backups.backuppolicy": READ,
    },
}


def create_roles(apps, schema_editor):
    from django.contrib.auth.management import create_permissions

    for app_config in apps.get_app_configs():
        app_config.models_module = True
        create_permissions(app_config, verbosity=0, apps=apps)
        app_config.models_module = None

    Group = apps.get_model("auth", "Group")
    Permission = apps.get_model("auth", "Permission")
    for role, grants in ROLE_PERMISSIONS.items():
        group, _ = Group.objects.get_or_create(name=role)
        for label, actions in grants.items():
            app_label, model = label.split(".")
            for action in actions:
                perm = Permission.objects.filter(
                    content_type__app_label=app_label, codename=f"{action}_{model}"
                ).first()
                if perm:
                    group.permissions.add(perm)
    admin, _ = Group.objects.get_or_create(name="admin")
    admin.permissions.set(Permission.objects.all())


def drop_roles(apps, schema_editor):
    apps.get_model("auth", "Group").objects.filter(
        name__in=["operator", "approver", "auditor", "admin"]
    ).delete()


class Migration(migrations.Migration):
    dependencies = [
        ("console", "0001_initial"),
        ("shards", "0001_initial"),
        ("backups", "0001_initial"),
        ("auth", "0012_alter_user_first_name_max_length"),
        ("contenttypes", "0002_remove_content_type_name"),
    ]
    operations = [migrations.RunPython(create_roles, drop_roles)]
