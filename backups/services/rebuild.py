"""Fault recovery: rebuild a lost instance from a physical set (DESIGN.md, Methods).

`restore request --set PHYSICAL_SET --target rebuild:INSTANCE --datadir PATH [--at ISO]`
files a request whose plan comes from `rebuild_plan.rebuild_plan_build`; once two approvers signed,
the run (`rebuild_execute`, called by the restore executor) does:

1. stream the instance's `backup.mbstream.zst[.enc]` down (sha256 checked), decode it and
   unpack it with `mbstream -x` into a scratch directory beside PATH;
2. `mariabackup --prepare`;
3. move the files into the empty PATH (a non-empty PATH is refused, at filing and again
   at the run);
4. with `--at`: start a throwaway `mariadbd` on PATH (free loopback port, no grant
   checks, no binlog), apply the chain's stored binlog to every shard database of the
   instance up to the requested second (the logical PITR's `chain_apply`), stop it;
5. hand PATH to the data directory's owner (`mysql` when PATH belongs to root).

Q of the run: A = the object read back whole (sha256, decryption); T = D = 1 when the
files prepared (and rolled forward) without error. The run does not start the rebuilt
instance for service: that is the operator's step once the run succeeded.
"""

from __future__ import annotations

import shutil
import time
from datetime import datetime
from pathlib import Path

from backups.engine.binlog_apply import applied_marker_drop
from backups.engine.errors import Cancelled, ConnectError, EngineError, IntegrityError
from backups.engine.physical import (
    ThrowawayServer,
    datadir_install,
    datadir_owner,
    datadir_problem,
    physical_extract,
    physical_prepare,
)
from backups.models import BackupSet, RestoreRequest, RestoreRun
from backups.services.errors import RestoreError
from backups.services.physical import physical_search_path
from backups.services.pitr import chain_apply
from backups.services.progress import JobTracker
from backups.services.restore_run_states import restore_run_finish
from backups.services.sets import set_data_key, set_manifest
from backups.services.storage_targets import set_read_storage
from backups.status import RunStatus

Target = RestoreRequest.Target


def rebuild_execute(*, run: RestoreRun, request: RestoreRequest, tracker: JobTracker) -> RestoreRun:
    """Run an approved rebuild to its end (see the module docstring); always ends the run."""
    plan = request.plan
    datadir = plan["datadir"]
    started = time.monotonic()
    scratch = None
    a = None
    try:
        problem = datadir_problem(datadir)
        if problem:
            raise RestoreError(problem)
        target = Path(datadir)
        owner = datadir_owner(target)
        parent = target.parent
        parent.mkdir(parents=True, exist_ok=True)
        # Beside PATH, so the final move is a rename on the same file system.
        scratch = parent / f".sv-rebuild-{run.pk}"
        shutil.rmtree(scratch, ignore_errors=True)
        files = scratch / "files"
        tracker.say(f"streaming {plan['object']['key']} down")
        source_set = request.source_set
        try:
            raw = physical_extract(
                set_read_storage(source_set),
                plan["object"],
                data_key=set_data_key(source_set),
                target_dir=files,
                should_cancel=tracker.should_cancel,
                search_path=physical_search_path(),
            )
        except IntegrityError:
            a = 0.0
            raise
        a = 1.0
        tracker.say("mariabackup --prepare")
        physical_prepare(files, search_path=physical_search_path())
        if tracker.should_cancel():
            raise Cancelled("the rebuild was cancelled")
        tracker.say(f"moving the prepared files into {datadir}")
        datadir_install(files, datadir, owner=None)
        note = ""
        if plan.get("needs_incrementals"):
            note = _roll_forward(run, request, plan, target, scratch, tracker)
        if owner is not None:
            datadir_install_owner(target, owner)
        seconds = time.monotonic() - started
        done_note = f"rebuilt {request.target_instance.name} into {datadir} in {seconds:.1f} s"
        if note:
            done_note += f"; {note}"
        tracker.stop()
        # After the tracker's last write: the raw bytes are what later estimates divide by.
        RestoreRun.objects.filter(pk=run.pk).update(bytes_done=raw)
        return restore_run_finish(
            run=run, status=RunStatus.SUCCEEDED, t=1.0, d=1.0, a=1.0, note=done_note
        )
    except Cancelled:
        tracker.stop()
        return restore_run_finish(
            run=run, status=RunStatus.CANCELLED, error="cancelled; " + _leftover(datadir)
        )
    except (RestoreError, EngineError, ConnectError, OSError) as exc:
        tracker.stop()
        return restore_run_finish(
            run=run,
            status=RunStatus.FAILED,
            error=f"{exc}; {_leftover(datadir)}",
            t=0.0,
            d=0.0,
            a=a,
        )
    finally:
        if scratch is not None:
            shutil.rmtree(scratch, ignore_errors=True)


def _leftover(datadir: str) -> str:
    target = Path(datadir)
    if target.is_dir() and any(target.iterdir()):
        return f"{datadir} holds a partial rebuild: empty it before filing a new request"
    return f"{datadir} was left empty"


def datadir_install_owner(target: Path, owner: tuple[int, int]) -> None:
    """chown -R: the throwaway server (run as root) may have created files of its own."""
    import os

    uid, gid = owner
    if os.geteuid() != 0:
        return
    os.chown(target, uid, gid)
    for root, dirs, files in os.walk(target):
        for name in dirs + files:
            os.lchown(os.path.join(root, name), uid, gid)


def _roll_forward(run, request, plan, target: Path, scratch: Path, tracker) -> str:
    """Start a throwaway server on the rebuilt files and apply the chain up to `at`."""
    at = datetime.fromisoformat(plan["at"])
    chain = list(BackupSet.objects.filter(pk__in=plan["chain"]).order_by("id"))
    doc = set_manifest(request.source_set)
    shard_entries = [
        s for s in doc.get("shards") or [] if s.get("instance") == plan["target_instance"]
    ]
    tracker.say(f"starting a throwaway mariadbd on {target} to roll it forward")
    server = ThrowawayServer(datadir=target, run_dir=scratch / "run")
    server.start()
    try:
        applied = 0
        for shard in shard_entries:
            tracker.say(f"applying the binlog of {shard['database']} up to {at.isoformat()}")
            result = chain_apply(
                chain=chain,
                shard=shard,
                target=server.endpoint,
                target_database=shard["database"],
                until=at,
                progress=tracker.progress,
                should_cancel=tracker.should_cancel,
            )
            applied += result.transactions
            applied_marker_drop(server.endpoint, shard["database"])
    finally:
        server.stop()
    RestoreRun.objects.filter(pk=run.pk).update(restored_to=at.replace(microsecond=0))
    return f"rolled forward to {at.isoformat()} ({applied} transactions)"
