"""Run a checks module on 8 simulated CPU devices in a subprocess (XLA_FLAGS must be set
before jax is imported) and read the JSON object it prints last."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent


def run_checks(module: str) -> dict[str, Any]:
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
    env["JAX_PLATFORMS"] = "cpu"
    result = subprocess.run(
        [sys.executable, "-m", module], cwd=ROOT, env=env, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def ok(checks: dict[str, Any], name: str) -> Any:
    """One check's result; a check that raised fails the test with its traceback."""
    got = checks[name]
    assert not (isinstance(got, dict) and "error" in got), got.get("error")
    return got


def report(checks: dict[str, Callable[[], Any]]) -> None:
    """In the subprocess: run each check and print every result as one JSON line; a check
    that raises is reported with its traceback, so the test naming it fails with it."""
    results: dict[str, Any] = {}
    for name, fn in checks.items():
        try:
            results[name] = fn()
        except Exception:
            results[name] = {"error": traceback.format_exc()}
    print(json.dumps(results))
