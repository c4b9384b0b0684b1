"""ShardVault settings: everything comes from the environment (DESIGN.md, "Environment")."""

import base64
import os
import secrets
from pathlib import Path

import environ

BASE_DIR = Path(__file__).resolve().parent.parent
VAR_DIR = Path(os.environ.get("SHARDVAULT_VAR_DIR", BASE_DIR / "var"))
VAR_DIR.mkdir(parents=True, exist_ok=True)

env = environ.Env()

DEBUG = env.bool("SHARDVAULT_DEBUG", default=False)


def _development_secret(filename: str, make) -> str:
    """Read a secret generated once into var/ (development only)."""
    path = VAR_DIR / filename
    if not path.exists():
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as handle:
            handle.write(make())
    return path.read_text().strip()


# Without SHARDVAULT_SECRET_KEY / SHARDVAULT_DATA_KEY a development key is generated once
# into var/. `manage.py check --deploy` reports an error for that when DEBUG is off
# (console.checks), so production deployments must set both.
SHARDVAULT_SECRET_KEY_FROM_ENV = bool(env.str("SHARDVAULT_SECRET_KEY", default=""))
SHARDVAULT_DATA_KEY_FROM_ENV = bool(env.str("SHARDVAULT_DATA_KEY", default=""))
_secret = env.str("SHARDVAULT_SECRET_KEY", default="")
if not _secret:
    _secret = _development_secret("secret_key", lambda: secrets.token_urlsafe(50))
SECRET_KEY = _secret

_data_key = env.str("SHARDVAULT_DATA_KEY", default="")
if not _data_key:
    _data_key = _development_secret(
        "data_key", lambda: base64.urlsafe_b64encode(secrets.token_bytes(32)).decode()
    )
SHARDVAULT_DATA_KEY = _data_key
# Earlier master keys, kept only to read what they made until `keys rotate` has run.
SHARDVAULT_OLD_DATA_KEYS = env.list("SHARDVAULT_OLD_DATA_KEYS", default=[])
# GET /metrics is served only when this is set, to requests bearing it.
SHARDVAULT_METRICS_TOKEN = env.str("SHARDVAULT_METRICS_TOKEN", default="")
# The key webhook bodies are signed with (X-ShardVault-Signature: sha256=<hex HMAC>).
SHARDVAULT_WEBHOOK_SECRET = env.str("SHARDVAULT_WEBHOOK_SECRET", default="")

ALLOWED_HOSTS = env.list("SHARDVAULT_ALLOWED_HOSTS", default=["127.0.0.1", "localhost", "[::1]"])
CSRF_TRUSTED_ORIGINS = env.list("SHARDVAULT_CSRF_TRUSTED_ORIGINS", default=[])

INSTALLED_APPS = [
    # Without autodiscovery: console/urls.py loads the admin modules, so commands such as
    # `manage.py backup` start without importing the views they never serve.
    "django.contrib.admin.apps.SimpleAdminConfig",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "django.contrib.humanize",
    "django_htmx",
    "django_rq",
    "template_partials",
    "console",
    "shards",
    "backups",
    "notify",
    "reports",
]

MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.auth.middleware.LoginRequiredMiddleware",
    "console.middleware.AuditContextMiddleware",
    "console.middleware.ContentSecurityPolicyMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
    "django_htmx.middleware.HtmxMiddleware",
]

ROOT_URLCONF = "console.urls"
WSGI_APPLICATION = "console.wsgi.application"

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [BASE_DIR / "templates"],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
                "console.context_processors.navigation",
                "backups.context_processors.restore_inbox",
            ],
        },
    }
]

DATABASES = {
    "default": env.db("DATABASE_URL", default=f"sqlite:///{VAR_DIR / 'console.sqlite3'}"),
}
if DATABASES["default"]["ENGINE"] == "django.db.backends.sqlite3":
    # Several processes (web, workers) share the file: wait on locks instead of failing.
    DATABASES["default"].setdefault("OPTIONS", {})
    DATABASES["default"]["OPTIONS"].update(
        {"timeout": 30, "transaction_mode": "IMMEDIATE", "init_command": "PRAGMA journal_mode=WAL;"}
    )
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

REDIS_URL = env.str("REDIS_URL", default="redis://127.0.0.1:6379/0")
RQ_QUEUES = {
    name: {"URL": REDIS_URL, "DEFAULT_TIMEOUT": 6 * 3600}
    for name in ("default", "backups", "restores", "verify")
}
# Host agents: `rqworker host-<name>` on a database host serves the physical backup parts
# of instances whose agent_queue names that queue (list them here so rqworker knows them).
for _agent_queue in env.list("SHARDVAULT_AGENT_QUEUES", default=[]):
    RQ_QUEUES.setdefault(_agent_queue, {"URL": REDIS_URL, "DEFAULT_TIMEOUT": 6 * 3600})
# How long a physical set waits for a host agent to take its part before failing.
PHYSICAL_AGENT_PICKUP_SECONDS = env.int("SHARDVAULT_PHYSICAL_AGENT_PICKUP_SECONDS", default=300)
RQ_SHOW_ADMIN_LINK = False
# Workers arm the periodic jobs (housekeeping, the schedules' re-arming) when they start.
RQ = {"WORKER_CLASS": "backups.queue.ArmingWorker"}

CACHES = {
    "default": {
        "BACKEND": "django.core.cache.backends.redis.RedisCache",
        "LOCATION": REDIS_URL,
        "KEY_PREFIX": env.str("SHARDVAULT_CACHE_PREFIX", default="shardvault"),
    }
}

STORAGE_URL = env.str("STORAGE_URL", default=f"file://{VAR_DIR / 'backups'}")
S3_ENDPOINT_URL = env.str("S3_ENDPOINT_URL", default="") or None

AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.MinimumLengthValidator"},
    {"NAME": "django.contrib.auth.password_validation.CommonPasswordValidator"},
]
LOGIN_URL = "login"
LOGIN_REDIRECT_URL = "dashboard"
LOGOUT_REDIRECT_URL = "login"
# Failed logins allowed per user and per address in LOGIN_THROTTLE_WINDOW seconds.
LOGIN_THROTTLE_ATTEMPTS = env.int("SHARDVAULT_LOGIN_THROTTLE_ATTEMPTS", default=5)
LOGIN_THROTTLE_WINDOW = env.int("SHARDVAULT_LOGIN_THROTTLE_WINDOW", default=60)
# Globs an instance's `password_env` must match (the console's own variables are refused
# whatever this says; see backups.engine.mysql.PASSWORD_ENV_DENYLIST).
SHARDVAULT_PASSWORD_ENV_PATTERN = env.list(
    "SHARDVAULT_PASSWORD_ENV_PATTERN", default=["*_PW", "*_PASSWORD"]
)

LANGUAGE_CODE = "en-us"
TIME_ZONE = "UTC"
USE_I18N = True
USE_TZ = True

STATIC_URL = "static/"
STATIC_ROOT = VAR_DIR / "static"

EMAIL_BACKEND = env.str(
    "SHARDVAULT_EMAIL_BACKEND", default="django.core.mail.backends.console.EmailBackend"
)
DEFAULT_FROM_EMAIL = env.str("SHARDVAULT_FROM_EMAIL", default="shardvault@localhost")
# Who gets alert mail (backups.services.alerts); empty: every admin and operator with an address.
ALERT_EMAILS = env.list("SHARDVAULT_ALERT_EMAILS", default=[])

# Restore approval rules (DESIGN.md, "Restores and approvals").
RESTORE_REQUEST_TTL_HOURS = env.int("SHARDVAULT_RESTORE_REQUEST_TTL_HOURS", default=72)
RESTORE_APPROVAL_TTL_HOURS = env.int("SHARDVAULT_RESTORE_APPROVAL_TTL_HOURS", default=24)

# Engine tuning.
BACKUP_COMPRESSION_LEVEL = env.int("SHARDVAULT_COMPRESSION_LEVEL", default=1)
BACKUP_CHUNK_ROWS = env.int("SHARDVAULT_CHUNK_ROWS", default=200_000)
BACKUP_LOCK_WAIT_TIMEOUT = env.int("SHARDVAULT_LOCK_WAIT_TIMEOUT", default=2)
BACKUP_LOCK_RETRIES = env.int("SHARDVAULT_LOCK_RETRIES", default=5)
# A running job writes a heartbeat at least this often; older means its worker died.
JOB_HEARTBEAT_STALE_SECONDS = env.int("SHARDVAULT_HEARTBEAT_STALE_SECONDS", default=60)
# A part of a job spread over workers (backups.services.parts) that no worker claimed
# within this many seconds is run by the job's owner itself.
PARTS_CLAIM_AFTER_SECONDS = env.float("SHARDVAULT_PARTS_CLAIM_AFTER_SECONDS", default=3.0)
# A set's copy to a storage target that fails is tried again after each of these delays
# (seconds), then alerts (backups.services.copies).
COPY_RETRY_SECONDS = [
    int(v) for v in env.list("SHARDVAULT_COPY_RETRY_SECONDS", default=["30", "120", "600"])
]
# A webhook delivery that fails (no answer, or not 2xx) is tried again after each of these
# delays (seconds), then given up (logged with its event name, never its URL).
WEBHOOK_RETRY_SECONDS = [
    int(v)
    for v in env.list("SHARDVAULT_WEBHOOK_RETRY_SECONDS", default=["10", "60", "300", "1800"])
]

# Fan-out of full logical backups (DESIGN.md "Scale-out"): one part per instance on the
# `backups` queue. "auto": when the cluster has several instances and another worker waits
# on `backups`; "always"; "off": the whole set in the owner's process.
BACKUP_FANOUT = env.str("SHARDVAULT_BACKUP_FANOUT", default="auto")
# Whether the owner runs the parts no other worker took (off: only for tests and for
# operators who never want a backup's dump on the owner's host).
BACKUP_FANOUT_LOCAL_PARTS = env.bool("SHARDVAULT_BACKUP_FANOUT_LOCAL_PARTS", default=True)
# How long the owner waits for every part to connect and report ready for the cut.
BACKUP_FANOUT_READY_SECONDS = env.float("SHARDVAULT_BACKUP_FANOUT_READY_SECONDS", default=120.0)

SESSION_COOKIE_HTTPONLY = True
CSRF_COOKIE_HTTPONLY = False  # HTMX reads nothing from it; the token is put on <body>.
X_FRAME_OPTIONS = "DENY"
SECURE_CONTENT_TYPE_NOSNIFF = True
SECURE_REFERRER_POLICY = "same-origin"
# SHARDVAULT_HTTPS=1: the console is served over HTTPS (directly or behind a TLS proxy that
# sets SHARDVAULT_PROXY_SSL_HEADER, e.g. HTTP_X_FORWARDED_PROTO). With DEBUG off that turns
# on secure cookies and a year of HSTS; each can still be set on its own.
HTTPS = env.bool("SHARDVAULT_HTTPS", default=False)
_proxy_ssl_header = env.str("SHARDVAULT_PROXY_SSL_HEADER", default="")
if _proxy_ssl_header:
    SECURE_PROXY_SSL_HEADER = (_proxy_ssl_header, "https")
if not DEBUG:
    SESSION_COOKIE_SECURE = env.bool("SHARDVAULT_SECURE_COOKIES", default=HTTPS)
    CSRF_COOKIE_SECURE = SESSION_COOKIE_SECURE
    SECURE_SSL_REDIRECT = env.bool("SHARDVAULT_SSL_REDIRECT", default=False)
    SECURE_HSTS_SECONDS = env.int(
        "SHARDVAULT_HSTS_SECONDS", default=365 * 24 * 3600 if HTTPS else 0
    )
    SECURE_HSTS_INCLUDE_SUBDOMAINS = SECURE_HSTS_SECONDS > 0
    SECURE_HSTS_PRELOAD = SECURE_HSTS_SECONDS > 0
# A signed-in session lasts a working day, not Django's two weeks.
SESSION_COOKIE_AGE = env.int("SHARDVAULT_SESSION_SECONDS", default=8 * 3600)
# Scripts and styles only from our own static files (htmx included, configured by a meta
# tag so it injects no <style>); no inline style attributes either (progress bars are
# <progress> elements), so nothing is 'unsafe-inline'.
CONTENT_SECURITY_POLICY = env.str(
    "SHARDVAULT_CONTENT_SECURITY_POLICY",
    default="default-src 'self'; script-src 'self'; style-src 'self'; "
    "style-src-attr 'none'; img-src 'self' data:; object-src 'none'; "
    "base-uri 'self'; form-action 'self'; frame-ancestors 'none'",
)

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "handlers": {"console": {"class": "logging.StreamHandler"}},
    "root": {"handlers": ["console"], "level": env.str("SHARDVAULT_LOG_LEVEL", default="INFO")},
}
