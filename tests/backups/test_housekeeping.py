from io import StringIO

import django_rq
import pytest
from django.core.management import call_command
from rq.registry import ScheduledJobRegistry

from backups import queue as job_queue


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
