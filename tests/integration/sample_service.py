"""A service on the shared runtime whose warm-up waits for a file: for the runtime's own tests."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

from services.runtime.server import Runtime, serve
from services.runtime.settings import ServiceSettings


def main() -> None:
    settings = ServiceSettings()
    gate = Path(os.environ["SAMPLE_GATE"])

    async def setup(rt: Runtime) -> None:
        async def wait_for_gate() -> None:
            # The test opens the gate from another process: a file is the simplest signal.
            while not await asyncio.to_thread(gate.exists):  # noqa: ASYNC110
                await asyncio.sleep(0.05)
            if await asyncio.to_thread(gate.read_text) == "fail":
                raise RuntimeError("warm-up failed on purpose")

        rt.warm_up_with(wait_for_gate)

    serve("sample", settings, ["meshserve.sample.v1.SampleService"], setup)


if __name__ == "__main__":
    main()
