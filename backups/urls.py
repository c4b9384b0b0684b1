from django.urls import path

from backups.views import binlog, keys, policy, sets, storage, verify

app_name = "backups"
urlpatterns = [
    path("", sets.set_list, name="set_list"),
    path("start/", sets.set_start, name="set_start"),
    path("transactions/<str:cluster>/", binlog.transactions, name="transactions"),
    path("<int:pk>/", sets.set_detail, name="set_detail"),
    path("<int:pk>/progress/", sets.set_progress, name="set_progress"),
    path("<int:pk>/shards/", sets.set_shards, name="set_shards"),
    path("<int:pk>/cancel/", sets.set_cancel, name="set_cancel"),
    path("<int:pk>/hold/", sets.set_hold, name="set_hold"),
    path("<int:pk>/release/", sets.set_release, name="set_release"),
    path("<int:set_id>/verify/", verify.verify_start, name="verify_start"),
    path("<int:set_id>/quality/", verify.set_quality_view, name="set_quality"),
    path("policy/<str:cluster>/", policy.policy_edit, name="policy"),
    path("policy/<str:cluster>/validate/", policy.policy_validate, name="policy_validate"),
    path("storage/", storage.storage_targets, name="storage_targets"),
    path("keys/", keys.key_ids, name="key_ids"),
]
