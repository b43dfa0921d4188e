"""Tests of the ranking service: units, gRPC status codes, end to end with retrieval, degradation, parity."""
