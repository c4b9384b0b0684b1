"""`manage.py housekeeping`: schedule the periodic housekeeping jobs now.

They reap sets and runs whose worker died, expire restore requests and approvals, queue
automatic verifications and drills, and send RPO alerts. Each job reschedules itself;
this command starts the cycle (`make run` calls it) and arms every policy's next scheduled
backups, and is safe to run any number of times.
A worker started with `--with-scheduler` runs them.
"""

from django.core.management.base import BaseCommand, CommandError

from backups import queue
from backups.services.schedules import schedules_arm


class Command(BaseCommand):
    help = "Schedule the periodic housekeeping jobs (needs a worker with --with-scheduler)."

    def handle(self, *args, **options):
        try:
            queue.periodic_ensure_scheduled(best_effort=False)
            schedules_arm()  # each policy's next ticks now, not a minute from now
        except Exception as exc:  # noqa: BLE001 - one line for the operator
            raise CommandError(f"could not schedule housekeeping: {exc}") from None
        self.stdout.write("housekeeping scheduled")
