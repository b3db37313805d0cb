"""The server as a process whose batches wait for the test: `python -m tests.service.gated_server
--model-repository ... [any server flag]` runs `service.server.serve` with every batch held at
a gate that SIGUSR1 opens. A subprocess test can then know which calls were taken before it
sends SIGTERM, however fast the machine computes.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import sys

import numpy as np

from service.engine.batcher import RunBatch
from service.server import event_loop_factory, serve
from service.settings import settings_from


def main() -> int:
    settings = settings_from(sys.argv[1:])
    logging.basicConfig(
        level=settings.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )

    async def run() -> int:
        opened = asyncio.Event()
        asyncio.get_running_loop().add_signal_handler(signal.SIGUSR1, opened.set)

        def wrap(run_batch: RunBatch) -> RunBatch:
            async def gated(items: np.ndarray) -> np.ndarray:
                await opened.wait()
                return await run_batch(items)

            return gated

        return await serve(settings, wrap_run=wrap)

    with asyncio.Runner(loop_factory=event_loop_factory(settings.event_loop)) as runner:
        return runner.run(run())


if __name__ == "__main__":
    sys.exit(main())
