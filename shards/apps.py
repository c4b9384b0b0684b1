from django.apps import AppConfig


class ShardsConfig(AppConfig):
    name = "shards"
    default_auto_field = "django.db.models.BigAutoField"
