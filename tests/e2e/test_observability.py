"""Metrics on the real mesh: counts after known traffic, and every metric the rules and dashboard name exists."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

from services.mesh.local import LocalMesh
from tests.e2e.helpers import MODEL, QUESTION, create_key, openai_client, scrape, value
from tests.e2e.test_billing import ledger_line
from tests.e2e.test_spend_budgets import stopped_at_budget

pytestmark = pytest.mark.mesh

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"


def test_known_traffic_shows_in_the_routers_counts_and_histograms(mesh: LocalMesh) -> None:
    key, secret = create_key(mesh, "observed")
    client = openai_client(mesh, secret)
    before = scrape(mesh, "router")
    told = []
    for i in range(5):
        reply = client.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=3 + i, temperature=0)
        assert reply.usage is not None
        told.append((reply.usage.prompt_tokens, reply.usage.completion_tokens))
    after = scrape(mesh, "router")

    def delta(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    assert delta("meshserve_router_requests_total", model=MODEL, outcome="completed") == 5
    tenant = {"model": MODEL, "tenant": "observed"}
    assert delta("meshserve_router_tokens_total", kind="prompt", **tenant) == sum(p for p, _ in told)
    assert delta("meshserve_router_tokens_total", kind="completion", **tenant) == sum(c for _, c in told)
    assert delta("meshserve_router_time_to_first_token_seconds_count", model=MODEL) == 5
    assert delta("meshserve_router_queue_wait_seconds_count", model=MODEL) == 5
    # One inter-token gap per token after each request's first.
    assert delta("meshserve_router_inter_token_latency_seconds_count", model=MODEL) == sum(c - 1 for _, c in told)
    ttft_sum = delta("meshserve_router_time_to_first_token_seconds_sum", model=MODEL)
    assert 0 < ttft_sum < 5 * 60
    # The edge's call counter saw the same five calls, all OK.
    calls = delta("meshserve_rpc_requests_total", service="router", code="OK")
    assert calls >= 5
    ledger_line(mesh, key.key_id, 5)


def exported_names(mesh: LocalMesh) -> set[str]:
    names: set[str] = set()
    for proc in mesh.procs.values():
        # Earlier tests may have stopped a service for good (draining, restarts); the live ones count.
        if proc.metrics_port and proc.alive():
            with urllib.request.urlopen(f"http://127.0.0.1:{proc.metrics_port}/metrics", timeout=5) as r:
                names |= {m.group(1) for m in re.finditer(r"^(meshserve_[a-z0-9_]+)", r.read().decode(), re.M)}
    return names


def test_every_metric_the_rules_and_the_dashboard_name_is_exported_by_the_mesh(mesh: LocalMesh) -> None:
    key, secret = create_key(mesh, "named")
    openai_client(mesh, secret).chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=2)
    ledger_line(mesh, key.key_id, 1)  # billing has counted it
    stopped_at_budget(mesh)  # the spend budgets' metrics: a tenant's budget drawn on, a stream stopped
    rules = (DEPLOY / "prometheus" / "rules.yaml").read_text()
    dashboard = json.loads((DEPLOY / "grafana" / "meshserve.json").read_text())
    queries = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    named = set(re.findall(r"\b(meshserve_[a-z0-9_]+)", rules + "\n".join(queries)))
    exported = exported_names(mesh)
    assert named and named <= exported, sorted(named - exported)


def test_meshserve_top_summarises_the_running_mesh(mesh: LocalMesh) -> None:
    client = openai_client(mesh)
    cli = [str(Path(sys.executable).parent / "meshserve"), "top", "--once", "--interval", "3"]
    with subprocess.Popen(
        [*cli, "--state", str(mesh.options.state_dir)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "COLUMNS": "200"},
    ) as top:
        # Requests one after another for as long as top runs, so some fall between its two scrapes
        # however long it takes to start.
        while top.poll() is None:
            client.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=4)
        output, errors = top.communicate(timeout=60)
    assert top.returncode == 0, errors
    [model_row] = [line for line in output.splitlines() if MODEL in line and "ms" in line]
    assert "inference" in output and "services:" in output
    assert "ms" in model_row  # a TTFT percentile over the interval, not "-"
