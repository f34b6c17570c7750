"""Running the service: one uvicorn process on a socket bound before anything loads, with a graceful drain.

One process owns the local devices: uvicorn runs with one worker and no reloader, so nothing forks
after JAX has started (threads only: the device thread and the decode pool).

SIGTERM (or Ctrl-C) starts a drain: new requests get 503, the requests already taken finish (at most
``--request-timeout-s`` later, when their deadline passes), then the process exits with status 0. A
second signal stops at once.
"""

from __future__ import annotations

import errno
import logging
import signal
import socket
import time
from collections.abc import Callable
from types import FrameType
from typing import Any

import uvicorn

from .app import create_app
from .engine import Engine, ServeSettings

logger = logging.getLogger(__name__)


class ServeFailure(RuntimeError):
    """The service stopped because the model could not be loaded or compiled."""


class ListenError(OSError):
    """The address cannot be bound (in use, not local, no permission)."""


def bind(host: str, port: int) -> socket.socket:
    """A listening TCP socket on ``host:port`` (port 0: a free one)."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as e:
        raise ListenError(f"cannot listen on {host}:{port}: {e.strerror}") from None
    family, kind, proto, _, address = infos[0]
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
        sock.listen(2048)
    except OSError as e:
        sock.close()
        reason = "the address is already in use" if e.errno == errno.EADDRINUSE else e.strerror or str(e)
        raise ListenError(f"cannot listen on {host}:{port}: {reason}") from None
    sock.set_inheritable(True)
    return sock


class _Server(uvicorn.Server):
    """uvicorn's server with a drain on the first SIGTERM/SIGINT instead of an immediate shutdown."""

    def __init__(self, config: uvicorn.Config, state: Any, drain_timeout_s: float):
        super().__init__(config)
        self.state, self.drain_timeout_s = state, drain_timeout_s
        self.drain_deadline: float | None = None
        self.failure: str | None = None

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self.state.draining:  # a second signal: stop now
            self.should_exit = self.force_exit = True
            return
        self.state.draining = True  # new requests get 503 from here on (read by the middleware)
        self.drain_deadline = time.monotonic() + self.drain_timeout_s
        logger.info("%s: draining (finishing the requests in flight, refusing new ones)", signal.Signals(sig).name)

    async def on_tick(self, counter: int) -> bool:
        if self.drain_deadline is not None and not self.should_exit:
            batcher = self.state.engine.batcher
            if batcher is not None and not batcher.draining:
                batcher.begin_drain()  # queued queries run at once, without waiting for fuller batches
            if self.state.idle:
                logger.info("drained: every request in flight is answered")
                self.should_exit = True
            elif time.monotonic() > self.drain_deadline:
                logger.warning("drain timed out with %d requests in flight", self.state.working)
                self.should_exit = True
        return await super().on_tick(counter)

    def fail(self, message: str) -> None:
        self.failure = message
        self.should_exit = True


def serve(settings: ServeSettings, load: Callable[[], Any], *, sock: socket.socket,
          log_level: str = "info", on_listening: Callable[[str], None] | None = None) -> int:
    """Serve until drained; returns the exit status (0 after a drain, 1 when the model failed to load).

    ``load`` builds the Segmenter; it runs on the device thread after the socket is listening, so
    ``/healthz`` answers while the weights load and the batch sizes compile.
    """
    engine = Engine(settings, load)
    server: _Server | None = None

    def failed(message: str) -> None:
        if server is not None:
            server.fail(message)

    app = create_app(engine, on_failure=failed)
    config = uvicorn.Config(app, log_level=log_level, workers=1, reload=False, lifespan="on",
                            timeout_graceful_shutdown=5, server_header=False)
    server = _Server(config, app.state.seggpt, drain_timeout_s=settings.request_timeout_s + 5)
    host, port = sock.getsockname()[:2]
    if on_listening is not None:
        on_listening(f"http://{host if ':' not in host else f'[{host}]'}:{port}")
    server.run(sockets=[sock])
    if server.failure is not None:
        raise ServeFailure(server.failure)
    return 0
