"""uvicorn with a draining SIGTERM, an exit when the engine dies, and deadlines for slow clients.

Plain uvicorn closes the listening socket on SIGTERM, so new clients would see "connection refused" rather than a
503 they can retry elsewhere; and it cancels streams after its graceful timeout. Here the first SIGTERM only flips
the engine client into draining; the server exits once nothing is in flight, or at --drain-timeout, when the
requests still running end in-band (an error event, then [DONE]) rather than being cut by the orchestrator's
SIGKILL. A second SIGTERM, or SIGINT (Ctrl+C), falls back to uvicorn's own quick shutdown.

A model that fails to load, an engine loop that raises, or a dead worker rank ends the process with exit code 1
(the error is in the log), so a restart policy acts instead of a server that can only answer 503.
"""

from __future__ import annotations

import logging
import signal
import time

import uvicorn

from service.connection_deadline import header_deadline_protocol
from service.engine_client import ENGINE_FAILED_MESSAGE, EngineClient
from service.errors import ApiError
from service.settings import ServiceSettings

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
        fatal = self.engine_client.fatal_error()
        if fatal is not None and not self.should_exit:
            logger.error("%s; exiting with status 1", fatal)
            self.engine_client.fail_inflight(ApiError(500, ENGINE_FAILED_MESSAGE, code="engine_error"))
            self.exit_code = 1
            self.should_exit = True
        if self.drain_started is not None and not self.should_exit:
            waited = time.monotonic() - self.drain_started
            if self.engine_client.is_drained():
                logger.info("drained in %.1f s; shutting down", waited)
                self.should_exit = True
            elif waited > self.drain_timeout_s:
                logger.warning("drain timeout (%.0f s) with %d sequence(s) in flight; ending them and shutting down",
                               self.drain_timeout_s, self.engine_client.inflight)
                self.engine_client.fail_inflight(ApiError(
                    503, "The server is shutting down and could not finish this request; retry", code="shutting_down"))
                self.should_exit = True
        return await super().on_tick(counter)


def run_server(app, engine_client: EngineClient, settings: ServiceSettings, host: str, port: int,
               log_level: str = "info") -> int:
    """Serve until shut down; the process exit code (0, or 1 when the engine could not serve)."""
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, access_log=False,
                            timeout_graceful_shutdown=5, http=header_deadline_protocol(settings.read_timeout_s),
                            limit_concurrency=settings.max_connections + 1)  # uvicorn counts the asking one too
    server = DrainingServer(config, engine_client, settings.drain_timeout_s)
    server.run()
    return server.exit_code
