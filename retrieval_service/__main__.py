"""``python -m retrieval_service``: read the config once, serve until SIGTERM/SIGINT, then drain.

Environment: see ``retrieval_service.config`` (``RECSYS_ARTIFACT_ROOT`` is the one required name).
A bad variable exits with status 2 and a message naming it.
"""

from __future__ import annotations

import asyncio
import logging
import sys

from recsys_contracts import programs
from recsys_serving import runtime
from retrieval_service.config import RetrievalConfig, from_env
from retrieval_service.server import SERVICE_NAME, create_server

log = logging.getLogger("retrieval_service")


async def serve(config: RetrievalConfig) -> None:
    runtime.tame_garbage_collector(warm_up=programs.warm_up_loader)
    server, port, app = await create_server(config)
    log.info("retrieval service listening on port %d", port)
    try:
        await runtime.serve_until_signalled(server, app.health, [SERVICE_NAME], config.grace_s)
    finally:
        await app.close(grace_s=0)
    log.info("retrieval service stopped")


def main() -> int:
    try:
        config = from_env()
    except ValueError as error:
        print(f"retrieval_service: bad configuration: {error}", file=sys.stderr)
        return 2
    runtime.configure_logging(config.log_level)
    runtime.start_metrics(config.metrics_port)
    asyncio.run(serve(config))
    return 0


if __name__ == "__main__":
    sys.exit(main())
