"""Which server an instance's address leads to, pinned for drills (issue 12).

A drill sends a set's decrypted rows to the cluster's drill instance. Like an approved restore
(DESIGN.md, "Restores and approvals"), it binds the server it was set up for: the first drill
to an instance's address (user@host:port) records the identity that server reports
(`backups.engine.identity.server_identity`); every later drill asks again before sending
anything and is refused when another server answers there. Moving the instance to another
address needs its password again (DESIGN.md, topology notes) and starts a new record; saving
its password again (after a deliberate server replacement) drops the record, and the next
drill records the new server.
"""

from __future__ import annotations

from django.db import transaction

from backups.engine.errors import ConnectError
from backups.engine.identity import server_identity
from console.audit import audit_record
from shards.models import Instance
from shards.selectors import instance_endpoint


class IdentityChanged(ConnectError):
    """Another server answers at an address whose server identity was recorded."""


def instance_address(instance: Instance) -> str:
    return f"{instance.user}@{instance.host}:{instance.port}"


def instance_identity_check(*, instance: Instance, role: str = "drill instance") -> str:
    """The identity of the server behind `instance`, checked against the one recorded for its
    address (recorded, and audited, when there is none yet). Connects once, before any data
    is sent; raises ConnectError (one sentence) when the server cannot say who it is and
    IdentityChanged when it is not the recorded server."""
    address = instance_address(instance)
    live = server_identity(instance_endpoint(instance))
    with transaction.atomic():
        locked = Instance.objects.select_for_update().get(pk=instance.pk)
        if instance_address(locked) != address:
            raise ConnectError(
                f"{role} {locked.name} was moved to {instance_address(locked)} while its server "
                "was being asked who it is; nothing was sent to it, try again"
            )
        if locked.identity and locked.identity_address == address:
            if locked.identity == live:
                return live
            recorded = locked.identity
        else:
            locked.identity, locked.identity_address = live, address
            locked.save(update_fields=["identity", "identity_address"])
            audit_record(
                actor="worker",
                action="instance.identity_recorded",
                obj=locked,
                details={"address": address, "identity": live, "for": role},
            )
            return live
    audit_record(
        actor="worker",
        action="instance.identity_mismatch",
        obj=instance,
        details={"address": address, "recorded": recorded, "reported": live, "for": role},
    )
    raise IdentityChanged(
        f"{role} {instance.name} ({address}) now answers as another server ({live}) than the "
        f"one recorded for it ({recorded}), so nothing was sent to it; if the server was "
        "replaced on purpose, save the instance's password again"
    )
