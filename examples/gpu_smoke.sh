#!/usr/bin/env bash
# GPU smoke check of the CUDA-only paths, run from the repository root on one GPU:
#   bash examples/gpu_smoke.sh            (OUT=folder for the log, default /tmp/gpu_smoke)
# It exercises what CPU CI cannot: bf16 autocast, torchrun on CUDA, fused CUDA AdamW, torch.compile on
# CUDA, fp16 with dynamic loss scaling, resume on GPU, LoRA SFT and generation from the trained model.
# NOTE: with one process --parallel.strategy fsdp resolves to plain training (nothing to shard); FSDP2's
# mixed-precision policy needs >= 2 GPUs (NCCL refuses two ranks on one device): run step 2 with
# --nproc-per-node 2 there. Each step prints its last metrics; the script stops
# at the first failure. Takes about 3-5 minutes on one H100/H200 (most of it the CPU tokenizer).
set -euo pipefail
OUT=${OUT:-/tmp/gpu_smoke}
mkdir -p "$OUT"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
L="$PY -m llamalab.cli"
W=$(mktemp -d)
last() { tail -n 1 "$1/metrics.jsonl" | cut -c1-300; }
step() { echo; echo "=== $* ($(date +%T))"; }

nvidia-smi -L || true
$PY -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), torch.cuda.get_device_name(0))"

step "1. llamalab run (built-in corpus, tiny preset, bf16 autocast on CUDA)"
$L run --name smoke --runs-dir "$W" --max-seconds 60
R="$W/smoke"
last "$R"
D="$R/data"
$L release verify "$W/smoke-release" --steps 2 --device cuda

step "2. torchrun on CUDA (fused AdamW, compile; FSDP with ${NPROC:-1} process(es))"
$PY -m torch.distributed.run --standalone --nproc-per-node "${NPROC:-1}" -m llamalab.train.pretrain "$D" \
  --run-dir "$W/fsdp" --parallel.strategy fsdp --parallel.compile true --steps 30 --eval-interval 10 --report false
last "$W/fsdp"

step "3. fp16 with dynamic loss scaling"
$L pretrain "$D" --run-dir "$W/fp16" --dtype fp16 --steps 20 --eval-interval 10 --report false
last "$W/fp16"

step "4. stop at step 10 and resume to 20 on GPU (bf16)"
$L pretrain "$D" --run-dir "$W/resume" --steps 20 --stop-after 10 --checkpoint-interval 10 --report false
$L pretrain "$D" --run-dir "$W/resume" --steps 20 --checkpoint-interval 10 --resume --report false
last "$W/resume"

step "5. LoRA SFT on CUDA (alpaca, tiny data)"
$PY - "$W/alpaca.json" <<'EOF'
import json, sys
rows = [{"instruction": f"Say the number {i} twice.", "input": "", "output": f"{i} {i}"} for i in range(64)]
json.dump(rows, open(sys.argv[1], "w"))
EOF
$L sft --base "$R" --data "$W/alpaca.json" --format alpaca --template alpaca --run-dir "$W/sft" \
  --seq-len 128 --batch-size 8 --micro-batch-size 4 --steps 20 --optim.lr 1e-3 --lora.rank 8
last "$W/sft"

step "6. generate from the SFT model"
$L generate "$W/sft/model" --prompt "def main(" --max-tokens 24 --temperature 0

echo; echo "gpu smoke: all steps passed"
