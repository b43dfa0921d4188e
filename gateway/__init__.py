"""The HTTP/JSON gateway: FastAPI in front of the ranking service's gRPC, and the demo web page.

``config`` (typed, read once from ``GATEWAY_*``), ``ranking`` (the one gRPC channel of the process,
TLS when configured), ``schemas`` (the typed HTTP models the OpenAPI document is generated from),
``problems`` (gRPC status -> HTTP status and problem+json), ``edge`` (the ASGI layer in front of
every route: request ids, the body size limit, metrics, access logs), ``app`` (routes, deadlines,
the OpenAPI document and the page's routes), ``static/`` (the page: no external fetches). ``python -m gateway`` is the composition root.

May import ``recsys_contracts`` (stubs) and ``recsys_serving``; never the trainer, the services, the
tools or the test suite (``tests/test_import_rules.py`` checks).
"""
