"""The serving kit: what the two services share, so neither carries its own copy.

Lives here: the request path's mechanics -- ``wire`` (validation of the shared messages: user id,
user features, context; one set of limits), ``features`` (the user view: stored record + artifact +
request -> model inputs, exclusions, degraded flags; the feature store's Redis client), ``rpc`` (the
wrapper around every RPC: deadline, admission, status mapping, metrics, request id), ``batching``
(the micro-batcher), ``admission`` (deadline-aware admission and the matching client retry policy),
``breaker`` (the circuit breaker in front of Redis and retrieval); and the process's --
``reload`` (hot reload of artifact versions), ``runtime`` (gRPC server kit: JSON logging,
Prometheus endpoint, health + reflection, TLS, graceful shutdown), ``workers`` (N worker processes
behind one port, their supervisor and metrics), ``env`` (environment parsers),
``ctl`` (the operators' version-lifecycle command).

Admission rule: code both services need and only the services need; it takes contract types and
callbacks, never a service's own types. No model math, no service domain (candidate generation,
ranking, selection): those stay in ``retrieval_service`` / ``ranking_service``. Imports
``recsys_contracts`` and third-party libraries only; never a service, the trainer or the gateway.
"""
