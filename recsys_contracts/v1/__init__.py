"""Generated gRPC stubs for the recsys.v1 protos. Do not edit: run `python -m recsys_contracts.codegen`."""
