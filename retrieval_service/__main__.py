"""``python -m retrieval_service``: read the config once, serve until SIGTERM/SIGINT, then drain.

Environment: see ``retrieval_service.config`` (``RECSYS_ARTIFACT_ROOT`` is the one required name).
A bad variable exits with status 2 and a message naming it.
"""

from __future__ import annotations

import logging
import sys

from recsys_serving import runtime
from retrieval_service.config import RetrievalConfig, from_env
from retrieval_service.server import SERVICE_NAME, create_server

log = logging.getLogger("retrieval_service")


async def serve(config: RetrievalConfig) -> None:
    runtime.tame_garbage_collector()
    runtime.set_gil_switch_interval(config.gil_switch_ms)
    try:
        server, port, app = await create_server(config)
    except runtime.StoppedBeforeReady:
        log.info("stopped before the first version loaded")
        return
    log.info("retrieval service listening on port %d", port)
    try:
        await runtime.serve_until_signalled(server, app.health, [SERVICE_NAME], config.grace_s)
    finally:
        await app.close(grace_s=0)
    log.info("retrieval service stopped")


def main() -> int:
    return runtime.run_main("retrieval_service", from_env, serve)


if __name__ == "__main__":
    sys.exit(main())
