"""Running the app under uvicorn, with a drain on SIGTERM / SIGINT.

On the first signal the service stops accepting work (new requests get 503 with
Retry-After, ``/readyz`` turns 503) but keeps listening, every accepted generation
finishes and its response is sent, then uvicorn shuts down and the process exits 0.
A second SIGINT forces the exit.
"""

from __future__ import annotations

import logging
import signal
import sys
import threading

import uvicorn

from ..workspace import Workspace
from .app import Service, create_app
from .config import ServeConfig, is_loopback

logger = logging.getLogger("loramgr.serve")


class DrainingServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, service: Service, drain_timeout: float | None = None):
        super().__init__(config)
        self.service = service
        self.drain_timeout = drain_timeout
        self._drain_started = False

    def handle_exit(self, sig, frame) -> None:
        if self._drain_started:
            if sig == signal.SIGINT:
                self.force_exit = True
            return
        self._drain_started = True
        logger.info("signal %s: draining (new requests get 503, accepted ones finish)", signal.Signals(sig).name)
        self.service.begin_drain()
        threading.Thread(target=self._finish, name="loramgr-drain", daemon=True).start()

    def _finish(self) -> None:
        if self.service.scheduler is not None:
            self.service.scheduler.wait_idle(self.drain_timeout)
        self.should_exit = True  # uvicorn then waits for the responses being written


def serve(workspace: Workspace, config: ServeConfig, log_level: str = "info") -> int:
    """Run until a signal; returns the exit code (0 after a drain)."""
    if not is_loopback(config.host) and not config.api_key and not config.api_auth:
        print(f"warning: serving on {config.host} (not a loopback address) without an API key: anyone who can "
              "reach this port can generate and upload adapters; set --api-key or --api-auth (docs/serving.md)",
              file=sys.stderr, flush=True)
    logging.basicConfig(level=log_level.upper(), format="%(levelname)s: %(name)s: %(message)s")
    service = Service(workspace, config)
    app = create_app(workspace, config, service)
    uv_config = uvicorn.Config(app, host=config.host, port=config.port, log_level=log_level, lifespan="on",
                               timeout_graceful_shutdown=None, access_log=False)
    server = DrainingServer(uv_config, service)
    server.run()
    return 0 if server.started else 1
