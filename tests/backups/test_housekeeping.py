from io import StringIO

import django_rq
import pytest
from django.core.management import call_command
from rq.registry import ScheduledJobRegistry


@pytest.mark.django_db
def test_housekeeping_command_schedules_every_periodic_job_once():
    queue = django_rq.get_queue("default")
    registry = ScheduledJobRegistry(queue=queue)
    for _ in range(2):  # running it twice schedules nothing more
        out = StringIO()
        call_command("housekeeping", stdout=out)
        assert "housekeeping scheduled" in out.getvalue()
    functions = sorted(queue.fetch_job(job_id).func_name for job_id in registry.get_job_ids())
    assert functions == sorted(
        [
            "backups.jobs.backups.housekeeping_job",
            "backups.jobs.restores.restore_housekeeping_job",
            "backups.jobs.verification.verification_housekeeping_job",
        ]
    )
