"""uvicorn with a draining SIGTERM: stop admitting (503), let in-flight requests finish, then exit.

Plain uvicorn closes the listening socket on SIGTERM, so new clients would see "connection refused" rather than a
503 they can retry elsewhere; and it cancels streams after its graceful timeout. Here the first SIGTERM only flips
the engine client into draining; the server exits once nothing is in flight (or after --drain-timeout). A second
SIGTERM, or SIGINT (Ctrl+C), falls back to uvicorn's own quick shutdown. A model that fails to load ends the
process with exit code 1 (the error is in the log) instead of a server that can only answer 503.
"""

from __future__ import annotations

import logging
import signal
import time

import uvicorn

from service.engine_client import EngineClient

logger = logging.getLogger("staticmoe.service")


class DrainingServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, engine_client: EngineClient, drain_timeout_s: float):
        super().__init__(config)
        self.engine_client = engine_client
        self.drain_timeout_s = drain_timeout_s
        self.drain_started: float | None = None
        self.exit_code = 0

    def handle_exit(self, sig: int, frame) -> None:
        if sig == signal.SIGTERM and self.drain_started is None:
            self.drain_started = time.monotonic()
            self.engine_client.begin_drain()
            return
        super().handle_exit(sig, frame)

    async def on_tick(self, counter: int) -> bool:
        if self.engine_client.load_error is not None and not self.should_exit:
            logger.error("the model failed to load (%s); exiting", self.engine_client.load_error)
            self.exit_code = 1
            self.should_exit = True
        if self.drain_started is not None and not self.should_exit:
            waited = time.monotonic() - self.drain_started
            if self.engine_client.is_drained():
                logger.info("drained in %.1f s; shutting down", waited)
                self.should_exit = True
            elif waited > self.drain_timeout_s:
                logger.warning("drain timeout (%.0f s) with %d request(s) in flight; shutting down",
                               self.drain_timeout_s, self.engine_client.inflight)
                self.should_exit = True
        return await super().on_tick(counter)
