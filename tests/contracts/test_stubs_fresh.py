"""The committed gRPC stubs are exactly what `python -m recsys_contracts.codegen` produces."""

from recsys_contracts import codegen


def test_committed_stubs_match_the_protos():
    generated = codegen.generate()
    on_disk = {p.name: p.read_text() for p in codegen.OUTPUT_DIR.glob("*.py*")}
    stale = sorted(name for name in generated.keys() | on_disk.keys()
                   if generated.get(name) != on_disk.get(name))
    assert not stale, f"stubs out of date, run `python -m recsys_contracts.codegen`: {stale}"


def test_stubs_import_inside_the_package():
    from recsys_contracts.v1 import ranking_pb2, ranking_pb2_grpc, retrieval_pb2_grpc

    assert ranking_pb2.DESCRIPTOR.package == "recsys.v1"
    assert hasattr(ranking_pb2_grpc, "RankingServiceStub")
    assert hasattr(retrieval_pb2_grpc, "add_RetrievalServiceServicer_to_server")
