from io import StringIO

import django_rq
import pytest
from django.core.management import call_command
from django.core.management.base import CommandError
from rq.registry import ScheduledJobRegistry

from backups import queue as job_queue
from backups.services import housekeeping


@pytest.mark.django_db
def test_housekeeping_command_schedules_every_periodic_job_once():
    queue = django_rq.get_queue(job_queue.DEFAULT)
    registry = ScheduledJobRegistry(queue=queue)
    for _ in range(2):  # running it twice schedules nothing more
        out = StringIO()
        call_command("housekeeping", stdout=out)
        assert "housekeeping scheduled" in out.getvalue()
    jobs = [queue.fetch_job(job_id) for job_id in registry.get_job_ids()]
    assert {job.func_name for job in jobs} == {"backups.jobs.housekeeping.periodic_job"}
    assert sorted(job.args[0] for job in jobs) == sorted(job_queue.PERIODIC)


@pytest.mark.django_db
def test_a_reaper_that_breaks_does_not_stop_the_other_housekeeping_steps(monkeypatch, caplog):
    def broken():
        raise RuntimeError("console database hiccup")

    monkeypatch.setattr(housekeeping, "backups_reap_stale", broken)
    result = housekeeping.housekeeping_reap()
    assert result["backups_failed"] == "failed: console database hiccup"
    # The steps after it still ran: restore runs resumed, requests expired (none due here).
    assert result["restores_resumed"] == []
    assert result["requests_expired"] == 0
    assert "housekeeping step backups_failed failed" in caplog.text


@pytest.mark.django_db
def test_housekeeping_command_without_redis_fails_with_one_sentence(settings):
    for config in settings.RQ_QUEUES.values():
        config["URL"] = "redis://127.0.0.1:1/0"  # nothing listens there
    with pytest.raises(CommandError, match="^could not schedule housekeeping: .*(refused|connect)"):
        call_command("housekeeping", stdout=StringIO())
