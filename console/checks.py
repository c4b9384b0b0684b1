"""Deployment checks: production must not run on development keys."""

from django.conf import settings
from django.core.checks import Error, Tags, register


@register(Tags.security, deploy=True)
def production_keys_check(app_configs, **kwargs):
    if settings.DEBUG:
        return []
    errors = []
    if not settings.SHARDVAULT_SECRET_KEY_FROM_ENV:
        errors.append(
            Error(
                "SHARDVAULT_SECRET_KEY is not set: a development key from var/ is in use.",
                hint="Set SHARDVAULT_SECRET_KEY in the environment when DEBUG is off.",
                id="shardvault.E001",
            )
        )
    if not settings.SHARDVAULT_DATA_KEY_FROM_ENV:
        errors.append(
            Error(
                "SHARDVAULT_DATA_KEY is not set: a development data key from var/ is in use.",
                hint="Set SHARDVAULT_DATA_KEY (32 random bytes, URL-safe base64) and keep a copy "
                "of it: backups and stored passwords cannot be read without it.",
                id="shardvault.E002",
            )
        )
    return errors
