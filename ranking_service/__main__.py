"""Composition root: ``python -m ranking_service`` reads the environment, serves until SIGTERM/SIGINT.

Exit status 2 when the configuration is invalid (the message names the variable), 0 after a
graceful shutdown (NOT_SERVING, then up to ``RANKING_GRACE_S`` to drain in-flight RPCs).
"""

from __future__ import annotations

import logging
import sys

from ranking_service.config import RankingConfig, from_env
from recsys_serving import runtime

log = logging.getLogger("ranking_service")


async def serve(config: RankingConfig) -> None:
    # Imported here so a bad configuration fails before the model runtime is imported (sooner).
    from ranking_service.server import SERVICE_NAME, create_server
    
    runtime.tame_garbage_collector()
    runtime.set_gil_switch_interval(config.gil_switch_ms)
    try:
        server, port, app = await create_server(config)
    except runtime.StoppedBeforeReady:
        log.info("stopped before the first version loaded")
        return
    log.info("ranking service listening on port %d (retrieval at %s, version %s)", port,
             config.retrieval_target, app.holder.version)
    try:
        await runtime.serve_until_signalled(server, app.health, [SERVICE_NAME], config.grace_s)
    finally:
        await app.close()


def main() -> int:
    return runtime.run_main("ranking_service", from_env, serve)


if __name__ == "__main__":
    sys.exit(main())
