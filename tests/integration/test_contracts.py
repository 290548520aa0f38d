"""The contracts and generated artefacts: buf lint, stubs in gen/ current, Envoy accepts its config."""

from __future__ import annotations

import subprocess
from pathlib import Path

from deploy.envoy.config import Address, EdgeConfig, write
from services.cli import protogen
from services.mesh.local import envoy_binary


def test_buf_lint_passes() -> None:
    result = protogen.buf("lint")
    assert result.returncode == 0, result.stdout + result.stderr


def test_buf_format_is_clean() -> None:
    result = protogen.buf("format", "--diff", "--exit-code")
    assert result.returncode == 0, result.stdout + result.stderr


def test_generated_stubs_are_current() -> None:
    stale = protogen.stale_files()
    assert stale == [], f"gen/ is stale, run `make gen`: {stale}"


def test_envoy_accepts_the_generated_config(tmp_path: Path) -> None:
    config = write(
        EdgeConfig(
            listen=Address("127.0.0.1", 0),
            admin=Address("127.0.0.1", 0),
            router=Address("127.0.0.1", 50051),
            auth=Address("127.0.0.1", 50052),
            ratelimit=Address("127.0.0.1", 50053),
        ),
        tmp_path / "envoy.yaml",
    )
    result = subprocess.run(
        [envoy_binary(), "--mode", "validate", "-c", str(config)], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert "OK" in result.stdout + result.stderr


def test_no_breaking_change_against_main() -> None:
    result = protogen.buf("breaking", "--against", ".git#branch=main")
    assert result.returncode == 0, result.stdout + result.stderr
