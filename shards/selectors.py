"""Read-side queries for topology."""

from __future__ import annotations

import os

from console.keys import decrypt_secret
from shards.models import Instance
from shards.mysql import Endpoint


class MissingPassword(Exception):
    pass


def instance_endpoint(instance: Instance) -> Endpoint:
    """How to connect to an instance, with its password decrypted or read from its env variable.

    `password_env` is read here, by whichever process connects, each time (DESIGN.md).
    """
    if instance.password_env:
        if instance.password_env not in os.environ:
            raise MissingPassword(
                f"instance {instance.name}: environment variable {instance.password_env} "
                "is not set in this process"
            )
        password = os.environ[instance.password_env]
    else:
        password = decrypt_secret(instance.password_encrypted)
    return Endpoint(
        name=instance.name,
        host=instance.host,
        port=instance.port,
        user=instance.user,
        password=password,
        tls_ca=instance.tls_ca,
        tls_verify=instance.tls_verify,
    )
