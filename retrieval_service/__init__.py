"""The retrieval service: user tower + ANN index behind ``recsys.v1.RetrievalService``.

Lives here, its domain only: ``generator`` (candidates for one query), ``backends`` (search backends
and devices), ``state`` (one loaded version), ``batching`` (the tower + search run the kit's
micro-batcher batches), ``features`` (the Redis read within a budget, and the kit's user view as
tower inputs), ``validation`` (the Retrieve-only fields), and, in the same file shape as the ranking
service, ``config`` (env), ``metrics``, ``servicer`` (gRPC translation), ``server`` (composition,
``create_server``) and the entry point ``__main__``. The shared mechanics (wire validation, user
view, RPC wrapper, micro-batcher, reload, admission) are ``recsys_serving``'s.
May import ``recsys_contracts`` and ``recsys_serving``; never the trainer (it runs exported models)
nor the ranking service.
"""
