"""The contracts both sides of a boundary must agree on, and nothing else.

Admission rule: formats and the code that reads or writes them, where the trainer (the producer)
and the services (the consumers) must never disagree; plus ``rerank``, the one algorithm both apply
(the ranking service serves it, the trainer evaluates it). Code that only the two services share
belongs in ``recsys_serving``; the exceptions kept here sit beside the formats they read: ``ids``
(lookups over a version's item table) and ``arms`` (a file on the artifact volume, which
``artifacts``' retention reads too). ``codegen`` is the build step of ``v1``.

- ``v1``: the generated gRPC stubs of ``protos/recsys/v1`` (build output; see ``codegen``).
- ``artifacts``: the artifact volume's layout, manifest, publish, resolve, verify, retention.
- ``signing``: version signatures (Ed25519 over the manifest): the publisher's signer, the
  readers' trust, key generation.
- ``programs``: the ONNX model programs' contract (inputs, outputs) and their only loader.
- ``feature_spec``: feature columns, vocabularies and scalers, and their encoding.
- ``feature_store``: the Redis key format, the row/vector codec and the batch read/write helpers.
- ``bundle``: what one version holds (file names, ``serving.json``, the score rule, the tables), the
  self-check both services run before serving it (``verify_bundle``) and the go-live order (``go_live``).
- ``arms``: the traffic-arms file on the artifact volume (a canary candidate) and the sticky user split.
- ``ann``: the item index format (FAISS) and its exact twin.
- ``ids``: item-id lookups both services apply per request; the quoting rule for bad values.
- ``rerank``: the MMR re-rank the ranking service applies and the trainer evaluates.
- ``item_metadata``: a version's display files (item titles and genres, users' recent interactions).

Business logic, models, feature engineering and service code do not belong here. This package
imports nothing from ``trainer``, ``retrieval_service``, ``ranking_service``, ``recsys_serving`` or
``gateway`` (a test enforces it).
"""
