"""Tests of the retrieval service: backends, validation, batching, state loading, the gRPC server end to end."""
