"""Composition root: ``python -m gateway`` reads the environment and serves HTTP until SIGTERM/SIGINT.

Exit status 2 when the configuration is invalid (the message names the variable). uvicorn stops
accepting on SIGTERM and lets in-flight requests finish (``GATEWAY_GRACE_S``); then the ranking channel closes.
"""

from __future__ import annotations

import sys

import uvicorn

from gateway.app import create_app
from gateway.config import from_env
from recsys_serving import runtime


def main() -> int:
    try:
        config = from_env()
    except ValueError as error:
        print(f"gateway: invalid configuration: {error}", file=sys.stderr)
        return 2
    runtime.configure_logging(config.log_level)
    uvicorn.run(create_app(config), host=config.host, port=config.port, log_config=None, access_log=False,
                timeout_graceful_shutdown=config.grace_s)
    return 0


if __name__ == "__main__":
    sys.exit(main())
