"""Runtime plumbing the two services share, so neither carries its own copy.

Lives here: hot reload of artifact versions (``reload``), the gRPC server kit (``runtime``:
JSON logging, Prometheus endpoint, health + reflection, TLS credentials, graceful shutdown), the
circuit breaker the services put in front of Redis and retrieval (``breaker``), and deadline-aware
admission with the matching client retry policy (``admission``).
Admission rule: only service-side mechanics that are identical for both services; no model logic,
no request handling. Imports ``recsys_contracts`` and third-party libraries only; the trainer never
imports it.
"""
