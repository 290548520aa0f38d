"""What a caller sends never stalls the real engine for others: a prompt that cannot fit is refused by its size."""

from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from services.mesh.local import LocalMesh
from tests.e2e.helpers import MODEL, create_key, scrape, value

pytestmark = pytest.mark.mesh


def test_a_10_mb_prompt_is_a_fast_400_and_another_tenant_is_not_stalled(mesh: LocalMesh) -> None:
    _, bystander = create_key(mesh, "bystander-engine")
    ejections = value(scrape(mesh, "router"), "meshserve_router_ejections_total")
    huge = json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "word " * 2_000_000}]})

    def other_tenant() -> tuple[int, float]:
        started = time.monotonic()
        r = httpx.post(
            f"{mesh.edge_url}/v1/chat/completions",
            json={"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4},
            headers={"authorization": f"Bearer {bystander}"},
            timeout=60,
        )
        return r.status_code, time.monotonic() - started

    with ThreadPoolExecutor(2) as pool:
        started = time.monotonic()
        big = pool.submit(
            httpx.post,
            f"{mesh.edge_url}/v1/chat/completions",
            content=huge,
            headers={"authorization": f"Bearer {mesh.user_key}", "content-type": "application/json"},
            timeout=60,
        )
        others = [pool.submit(other_tenant) for _ in range(3)]
        refused = big.result()
        took = time.monotonic() - started
        served = [f.result() for f in others]
    assert refused.status_code == 400, refused.text
    assert refused.json()["error"]["type"] == "invalid_request_error"
    assert "cannot fit" in refused.json()["error"]["message"]
    assert took < 5, f"the refusal took {took:.1f}s"
    assert [code for code, _ in served] == [200, 200, 200]
    assert value(scrape(mesh, "router"), "meshserve_router_ejections_total") == ejections
