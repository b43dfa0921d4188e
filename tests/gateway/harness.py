"""The gateway in front of real services: retrieval and ranking (in process, real gRPC on loopback
port 0, the session's loaded tiny version) and the gateway (uvicorn on a loopback port 0), all in one
background event loop thread, so tests drive it over real HTTP from the main thread (httpx, a browser)."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import socket
import threading
from pathlib import Path

import uvicorn

from gateway.app import create_app
from gateway.config import GatewayConfig
from ranking_service.server import create_server
from tests.ranking.harness import cached_holder, config as ranking_config, serve_retrieval
from tests.processes import free_port


@dataclasses.dataclass
class Stack:
    base_url: str
    ranking_port: int | None
    gateway: GatewayConfig


async def _serve(root: Path, ranking_state, retrieval_state, sock: socket.socket, ranking: dict, gateway: dict,
                 started: threading.Event, stop: asyncio.Event, out: dict) -> None:
    async with contextlib.AsyncExitStack() as stack:
        target = f"127.0.0.1:{free_port()}"     # nothing listens there: ranking down
        out["ranking_port"] = None
        if ranking_state is not None:
            retrieval_target, _ = await stack.enter_async_context(serve_retrieval(root, retrieval_state))
            cfg = ranking_config(root, retrieval_target=retrieval_target, **ranking)
            server, port, app = await create_server(cfg, holder=cached_holder(root, ranking_state, poll_interval_s=0.1))
            stack.push_async_callback(app.close)
            stack.push_async_callback(server.stop, 0)
            target, out["ranking_port"] = f"127.0.0.1:{port}", port
        config = dataclasses.replace(GatewayConfig(host="127.0.0.1", port=0, ranking_target=target), **gateway)
        out["config"] = config
        http = uvicorn.Server(uvicorn.Config(create_app(config), log_config=None, access_log=False, lifespan="on"))
        task = asyncio.ensure_future(http.serve(sockets=[sock]))
        while not http.started and not task.done():
            await asyncio.sleep(0.01)
        started.set()
        await stop.wait()
        http.should_exit = True
        await task


@contextlib.contextmanager
def running(root: Path, ranking_state=None, retrieval_state=None, *, ranking: dict | None = None,
            gateway: dict | None = None):
    """Yields a started ``Stack``; ``ranking_state=None`` leaves the gateway's ranking target unanswered."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    loop = asyncio.new_event_loop()
    started, out = threading.Event(), {}
    stop = asyncio.Event()
    errors: list[BaseException] = []

    def main() -> None:
        try:
            loop.run_until_complete(_serve(root, ranking_state, retrieval_state, sock, ranking or {}, gateway or {},
                                           started, stop, out))
        except BaseException as error:  # surfaced to the test below
            errors.append(error)
            started.set()
        finally:
            loop.close()

    thread = threading.Thread(target=main, name="gateway-stack", daemon=True)
    thread.start()
    started.wait(60)
    if errors:
        raise errors[0]
    try:
        yield Stack(base_url=f"http://127.0.0.1:{sock.getsockname()[1]}", ranking_port=out["ranking_port"],
                    gateway=out["config"])
    finally:
        loop.call_soon_threadsafe(stop.set)
        thread.join(30)
        sock.close()
