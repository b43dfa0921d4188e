#!/usr/bin/env bash
# The GPU checks of one short session on a CUDA machine, all in one command (device time is scarce):
#   1. retrieval backends at 1M x 64: recall@100 and speed, exact torch on CUDA against FAISS CPU
#      (benchmarks/retrieval_gpu_check.py), then the service's loader on the device;
#   2. DCN scoring throughput, eager torch on CUDA (fp32, bf16) beside the served ONNX program on the CPU
#      (benchmarks/dcn_gpu_bench.py);
#   3. the trainer on a synthetic 1M-item / 10M-interaction log, one epoch of each model on CUDA: the
#      pooled tower + DCN and the sequential tower + DCN, as two concurrent processes
#      (benchmarks/trainer_bench.py; wall time, stage times, peak RSS, peak GPU memory).
# Steps 1-2 run while step 3 generates its data and features (CPU only), so they see an idle GPU.
#
#   bash benchmarks/gpu_session.sh OUT_DIR                 # on the GPU machine
#   GPU_SESSION_DEVICE=cpu GPU_SESSION_ITEMS=20000 GPU_SESSION_INTERACTIONS=200000 \
#       bash benchmarks/gpu_session.sh /tmp/dry            # dry run of the same code paths here
# Needs signing keys only for its own publishes: it makes a throwaway pair.
set -u
out=${1:?usage: gpu_session.sh OUT_DIR}
mkdir -p "$out"
device=${GPU_SESSION_DEVICE:-cuda}
items=${GPU_SESSION_ITEMS:-1000000}
interactions=${GPU_SESSION_INTERACTIONS:-10000000}
threads=${GPU_SESSION_THREADS:-6}
limit=${GPU_SESSION_TRAIN_LIMIT_S:-560}   # on an H200 machine both runs reached export at ~350 s
py=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
keys=$(mktemp -d)
"$py" -m recsys_contracts.signing keygen --private "$keys/signing.key" --public "$keys/signing.pub" >/dev/null
export RECSYS_SIGNING_KEY="$keys/signing.key" RECSYS_TRUSTED_KEYS="$keys/signing.pub"

common=(--synthetic "$items" "$interactions" --set "run.device=$device" --set "run.threads=$threads"
        --set retrieval.epochs=1 --set ranking.epochs=1 --set eval.max_users=2000
        --set features.history_length=50 --set ranking.candidates=200 --set publish.index=ivf)
OMP_NUM_THREADS=$threads timeout "$limit" "$py" benchmarks/trainer_bench.py "${common[@]}" \
    --out "$out/trainer_pooled.json" >"$out/trainer_pooled.log" 2>&1 &
pooled=$!
OMP_NUM_THREADS=$threads timeout "$limit" "$py" benchmarks/trainer_bench.py "${common[@]}" \
    --set retrieval.user_tower=sequential --out "$out/trainer_sequential.json" >"$out/trainer_sequential.log" 2>&1 &
sequential=$!

{
  nvidia-smi -L 2>&1 || true
  "$py" -c 'import torch, faiss, onnxruntime, numpy, pandas; print("torch", torch.__version__, "cuda", torch.cuda.is_available(), "faiss", faiss.__version__, "onnxruntime", onnxruntime.__version__, "numpy", numpy.__version__, "pandas", pandas.__version__, "cpus", __import__("os").cpu_count())'
  OMP_NUM_THREADS=4 timeout 150 "$py" benchmarks/retrieval_gpu_check.py --device "$device" \
      --items "$items" --repeats 100 --out "$out/retrieval_gpu_check.json"
  echo "retrieval_gpu_check exit $?"
  timeout 90 "$py" benchmarks/dcn_gpu_bench.py --device "$device" --out "$out/dcn_gpu_bench.json"
  echo "dcn_gpu_bench exit $?"
} >"$out/checks.log" 2>&1

wait "$pooled"; echo "trainer pooled exit $?" >>"$out/checks.log"
wait "$sequential"; echo "trainer sequential exit $?" >>"$out/checks.log"
grep -h "stage .* done\|wall_s\|peak_\|exit\|Error\|error" "$out"/*.log | tail -60
rm -rf "$keys"
