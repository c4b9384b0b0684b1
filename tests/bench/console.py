"""A whole ShardVault console for the benchmark, driven through `manage.py` as a person would.

`console_start()` gives the benchmark its own Redis, SQLite console database and storage
directory, imports the topology (`manage.py topology import`) and creates the users a
restore needs. `Console.workers(n)` starts n real `manage.py rqworker backups restores`
processes and watches the peak RSS (VmHWM) of every process in their trees, which is where
the backup's parts run (RQ forks a work horse per job). `Console.manage(...)` runs one
command and returns its wall time, start-up and status polling included.
"""

from __future__ import annotations

import base64
import json
import os
import secrets
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from tests.servers import free_port

ROOT = Path(__file__).resolve().parents[2]
MANAGE = ROOT / "manage.py"
RSS_POLL_SECONDS = 0.05
WORKER_READY_SECONDS = 60.0


@dataclass
class CommandRun:
    args: list[str]
    code: int
    wall_s: float
    stdout: str
    stderr: str

    @property
    def ok(self) -> bool:
        return self.code == 0

    def json(self) -> dict:
        try:
            return json.loads(self.stdout.strip().splitlines()[-1]) if self.stdout.strip() else {}
        except (json.JSONDecodeError, IndexError):
            return {}

    def error(self) -> str:
        lines = [line for line in self.stderr.strip().splitlines() if line.strip()]
        return f"exit {self.code}: " + (lines[-1] if lines else "no message")


def _vm_hwm_kb(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except (OSError, ValueError):
        return None
    return None


def _children(pid: int) -> list[int]:
    found: list[int] = []
    try:
        for task in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{task}/children") as handle:
                found.extend(int(c) for c in handle.read().split())
    except (OSError, ValueError):
        pass
    return found


class RssWatch:
    """Polls the peak RSS of every process under some root pids (the workers and their horses)."""

    def __init__(self, roots: list[int]):
        self.roots = roots
        self.peaks: dict[int, int] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="bench-rss", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            pending = list(self.roots)
            while pending:
                pid = pending.pop()
                peak = _vm_hwm_kb(pid)
                if peak:
                    self.peaks[pid] = max(self.peaks.get(pid, 0), peak)
                pending.extend(_children(pid))
            self._stop.wait(RSS_POLL_SECONDS)

    def reset(self) -> None:
        self.peaks = {}

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    @property
    def max_kb(self) -> int | None:
        return max(self.peaks.values(), default=None)


@dataclass
class Console:
    root: Path
    env: dict[str, str]
    redis: subprocess.Popen
    operator: str = "bench-operator"
    approver: str = "bench-approver"
    _workers: list[subprocess.Popen] = field(default_factory=list)
    rss: RssWatch | None = None
    last_set: int | None = None  # the newest full set of the whole cluster, for the restores

    @property
    def storage(self) -> Path:
        return self.root / "backups"

    def manage(self, *args: str, timeout: float = 3600, env: dict | None = None) -> CommandRun:
        started = time.monotonic()
        proc = subprocess.run(
            [sys.executable, str(MANAGE), *args],
            env=self.env | (env or {}),
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        return CommandRun(
            list(args), proc.returncode, time.monotonic() - started, proc.stdout, proc.stderr
        )

    def must(self, *args: str) -> CommandRun:
        run = self.manage(*args)
        if not run.ok:
            raise RuntimeError(f"manage.py {' '.join(args)} failed: {run.error()}")
        return run

    def workers(self, count: int, env: dict | None = None) -> None:
        """Exactly `count` workers listening on backups and restores (0 stops them all)."""
        self.workers_stop()
        logs = self.root / "logs"
        logs.mkdir(exist_ok=True)
        for index in range(count):
            log = open(logs / f"worker-{count}-{index}-{time.monotonic_ns()}.log", "wb")
            self._workers.append(
                subprocess.Popen(
                    [sys.executable, str(MANAGE), "rqworker", "backups", "restores"],
                    env=self.env | (env or {}),
                    cwd=ROOT,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
            )
            log.close()
        import redis

        client = redis.Redis.from_url(self.env["REDIS_URL"])
        deadline = time.monotonic() + WORKER_READY_SECONDS
        while client.scard("rq:workers") < count:
            if time.monotonic() > deadline or any(p.poll() is not None for p in self._workers):
                raise RuntimeError(f"{count} rqworker processes did not start (logs in {logs})")
            time.sleep(0.1)
        self.rss = RssWatch([p.pid for p in self._workers])

    def workers_stop(self) -> None:
        if self.rss is not None:
            self.rss.stop()
            self.rss = None
        for proc in self._workers:
            try:
                os.killpg(proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        for proc in self._workers:
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        self._workers = []
        import redis

        client = redis.Redis.from_url(self.env["REDIS_URL"])
        deadline = time.monotonic() + 20
        while client.scard("rq:workers") and time.monotonic() < deadline:
            time.sleep(0.1)

    def stop(self) -> None:
        self.workers_stop()
        self.redis.terminate()
        self.redis.wait(timeout=10)


def topology_yaml(clusters: dict[str, list[tuple[str, object, str]]], max_connections: int) -> str:
    """clusters: {name: [(shard, server, database), ...]}; every server becomes an instance."""
    lines = ["clusters:"]
    for cluster, shards in clusters.items():
        lines += [f"  - name: {cluster}", "    instances:"]
        seen = {}
        for _, server, _ in shards:
            seen.setdefault(server.name, server)
        for server in seen.values():
            lines.append(
                f"      - {{name: {server.name}, host: 127.0.0.1, port: {server.port}, "
                f"user: root, max_connections: {max_connections}}}"
            )
        lines.append("    shards:")
        for shard, server, database in shards:
            lines.append(
                f"      - {{name: {shard}, instance: {server.name}, database: {database}}}"
            )
    return "\n".join(lines) + "\n"


def console_start(workdir: Path, topology: str, *, chunk_rows: int) -> Console:
    root = workdir / "console"
    root.mkdir(parents=True, exist_ok=True)
    port = free_port()
    redis_proc = subprocess.Popen(
        ["redis-server", "--bind", "127.0.0.1", "--port", str(port), "--save", "",
         "--appendonly", "no", "--dir", str(root)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )  # fmt: skip
    env = dict(os.environ)
    env.update(
        {
            "DATABASE_URL": f"sqlite:///{root / 'console.sqlite3'}",
            "REDIS_URL": f"redis://127.0.0.1:{port}/0",
            "STORAGE_URL": f"file://{root / 'backups'}",
            "SHARDVAULT_DATA_KEY": base64.urlsafe_b64encode(secrets.token_bytes(32)).decode(),
            "SHARDVAULT_SECRET_KEY": secrets.token_urlsafe(40),
            "SHARDVAULT_EMAIL_BACKEND": "django.core.mail.backends.dummy.EmailBackend",
            "SHARDVAULT_CHUNK_ROWS": str(chunk_rows),
        }
    )
    console = Console(root=root, env=env, redis=redis_proc)
    try:
        import redis

        client = redis.Redis.from_url(env["REDIS_URL"])
        deadline = time.monotonic() + 20
        while True:
            try:
                client.ping()
                break
            except redis.exceptions.ConnectionError:
                if time.monotonic() > deadline:
                    raise RuntimeError("the benchmark's redis-server did not start") from None
                time.sleep(0.05)
        console.must("migrate", "--noinput")
        (root / "topology.yaml").write_text(topology)
        console.must("topology", "import", str(root / "topology.yaml"))
        for user, role in ((console.operator, "operator"), (console.approver, "approver")):
            console.must("users", "create", user, "--role", role)
    except BaseException:
        console.stop()
        raise
    return console
