"""Benchmarks: scripts that measure and print figures and write JSON/PNG to ``bench_results/``.

Each is run as a script (``python benchmarks/<name>.py --help``), never imported by a package:
``retrieval_bench`` (per-stage latency, ANN vs exact, micro-batching), ``ranking_bench``
(Recommend over both services and Redis), ``gateway_bench`` (HTTP through the gateway vs gRPC;
reuses ``ranking_bench``'s stack), ``trainer_bench`` (the trainer's job per stage, peak RSS),
``program_bench`` (model program call time: torch.export, TorchScript, ONNX) and
``retrieval_gpu_check`` (the GPU backends' recall and speed on a GPU machine).

A tool folder: may import every project package (versions come from ``trainer.tiny`` or a trained
artifact root); never the test suite (``tests/test_import_rules.py`` checks). Speed is measured
here, never asserted in tests.
"""
