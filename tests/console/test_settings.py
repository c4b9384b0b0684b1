import base64
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _check_deploy(extra_env: dict) -> subprocess.CompletedProcess:
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("SHARDVAULT_") and k != "DJANGO_ALLOW_ASYNC_UNSAFE"
    }
    env.update(extra_env)
    return subprocess.run(
        [sys.executable, "manage.py", "check", "--deploy", "--fail-level", "WARNING"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_check_deploy_is_clean_with_production_settings():
    result = _check_deploy(
        {
            "SHARDVAULT_SECRET_KEY": "x" * 20 + base64.urlsafe_b64encode(os.urandom(40)).decode(),
            "SHARDVAULT_DATA_KEY": base64.urlsafe_b64encode(os.urandom(32)).decode(),
            "SHARDVAULT_SECURE_COOKIES": "1",
            "SHARDVAULT_SSL_REDIRECT": "1",
            "SHARDVAULT_HSTS_SECONDS": "31536000",
            "SHARDVAULT_ALLOWED_HOSTS": "shardvault.example.internal",
        }
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_check_deploy_refuses_development_keys_when_debug_is_off():
    result = _check_deploy(
        {
            "SHARDVAULT_SECURE_COOKIES": "1",
            "SHARDVAULT_SSL_REDIRECT": "1",
            "SHARDVAULT_HSTS_SECONDS": "31536000",
        }
    )
    assert result.returncode != 0
    assert "SHARDVAULT_SECRET_KEY is not set" in result.stdout + result.stderr
