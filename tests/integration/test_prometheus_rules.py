"""The shipped Prometheus rules: valid for promtool, and the billing drift rules behave on sample series."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

RULES = Path(__file__).resolve().parents[2] / "deploy" / "prometheus"


def promtool(*args: str) -> subprocess.CompletedProcess[str]:
    exe = shutil.which("promtool")
    if exe is None:
        pytest.fail("promtool not found: scripts/bootstrap.sh installs Debian's prometheus package")
    return subprocess.run([exe, *args], cwd=RULES, capture_output=True, text=True, timeout=60)


def test_the_rules_pass_promtool_check() -> None:
    result = promtool("check", "rules", "rules.yaml")
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_drift_alert_fires_on_unbilled_tokens_and_only_then() -> None:
    result = promtool("test", "rules", "rules_test.yaml")
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_cluster_ships_the_same_rules() -> None:
    from tests.integration.test_k8s_manifests import _generated, named

    shipped = named("gpu", "ConfigMap", _generated("gpu", "prometheus-rules"))["data"]["meshserve.rules.yaml"]
    assert shipped == (RULES / "rules.yaml").read_text()
