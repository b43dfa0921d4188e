"""DCN ranker scoring throughput: the served ONNX program on the CPU (onnxruntime, one intra-op thread:
the ranking service's setting) beside the same weights in eager torch on a CUDA device (fp32, and bf16
under autocast), at several batch sizes. For a GPU machine; ``--device cpu`` is a dry run of the same
code. Prints a table of rows/s and milliseconds per call (medians after a warm-up, all in one run) and
writes bench_results/dcn_gpu_bench.json.

    python benchmarks/dcn_gpu_bench.py [--device cuda] [--batches 500,4096,65536]

The model has the trainer's default config over a catalog of MovieLens 100K's size (see
``benchmarks/program_bench.py``): call time does not depend on what the weights learned. Every row
here has its own user, so the CPU side runs the aligned-rows program (``RANKER_ROWS``: the grouped
one, with as many user rows as candidate rows, does the same work).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.program_bench import inputs, median_ms, models  # noqa: E402
from recsys_contracts.programs import RANKER_ROWS, load_program  # noqa: E402
from trainer.export import export_ranker_rows  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", help="torch device of the eager side (cuda, cpu)")
    parser.add_argument("--batches", default="500,4096,65536", help="comma-separated rows per call")
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--out", default=str(ROOT / "bench_results" / "dcn_gpu_bench.json"))
    args = parser.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("torch sees no CUDA device", file=sys.stderr)
        return 2
    torch.set_num_threads(1)
    spec, tables, _, ranker = models()
    history = min(ranker.recent_items, spec.history_length)
    device = torch.device(args.device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    rows_out = []
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "ranker.onnx"
        export_ranker_rows(ranker, inputs(tables, 64, history), path)
        program = load_program(path, RANKER_ROWS)
        on_device = ranker.to(device)
        for rows in (int(b) for b in args.batches.split(",")):
            x = inputs(tables, rows, history)
            xn = {k: v.numpy() for k, v in x.items()}
            xd = {k: v.to(device) for k, v in x.items()}
            with torch.inference_mode():
                ort_ms = median_ms(lambda: program(**xn), max(5, args.repeats // 5))
                fp32_ms = median_ms(lambda: on_device(**xd), args.repeats, sync)
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
                    bf16_ms = median_ms(lambda: on_device(**xd), args.repeats, sync)
            rows_out.append({"rows": rows, "onnxruntime_cpu_1thread_ms": round(ort_ms, 3),
                             f"torch_{device.type}_fp32_ms": round(fp32_ms, 3),
                             f"torch_{device.type}_bf16_ms": round(bf16_ms, 3),
                             "rows_per_s_onnxruntime_cpu": round(rows / ort_ms * 1000),
                             f"rows_per_s_{device.type}_fp32": round(rows / fp32_ms * 1000),
                             f"rows_per_s_{device.type}_bf16": round(rows / bf16_ms * 1000)})
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"DCN ranker scoring, eager torch on {name} vs onnxruntime CPU (1 thread)")
    for r in rows_out:
        print("  " + ", ".join(f"{k} {v}" for k, v in r.items()))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"device": name, "torch": torch.__version__, "rows": rows_out}, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
