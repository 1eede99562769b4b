#!/usr/bin/env bash
# The one prepared GPU check (H100/H200): kernel tests on the device (no Triton interpreter), then the
# GPU benchmarks; a short table last. Runs from the tree (PYTHONPATH=.); deepspeed is not needed.
# Usage on the GPU machine:  bash bench/gpu_check.sh   (writes logs to $OUT or /tmp/gpu_check)
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH=. TRITON_INTERPRET=0 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
out="${OUT:-/tmp/gpu_check}"; mkdir -p "$out"
py=python3
t0=$(date +%s)
{
  echo "date: $(date -u +%F)"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  $py -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, 'cuda', torch.version.cuda)"
} | tee "$out/env.txt"

step() {  # name, time limit (s), command...
  local name=$1 limit=$2; shift 2
  echo "=== $name"
  local s=$(date +%s)
  timeout "$limit" "$@" > "$out/$name.log" 2>&1; local rc=$?
  tail -n 40 "$out/$name.log"
  echo "$name rc=$rc $(( $(date +%s) - s ))s" >> "$out/status.txt"
}

step kernel_tests 150 $py -m pytest -q -p no:cacheprovider tests/test_kernels_linear_logprobs.py \
  tests/test_kernels_sequence_objective.py \
  tests/test_paged_attention_kernel.py
# The sampler's CUDA path (Triton decode kernel + CUDA graphs) against a no-cache greedy reference.
step sampler_cuda_test 90 $py -m pytest -q -p no:cacheprovider tests/test_sampler.py -k cuda
step bench_dpo_logprobs 150 $py bench/dpo_logprobs.py --device cuda
step bench_sampler 150 $py bench/sampler.py --device cuda
step bench_train_step 150 $py bench/train_step.py --device cuda

echo
echo "================ GPU check summary ($(( $(date +%s) - t0 ))s) ================"
cat "$out/env.txt"
cat "$out/status.txt"
grep -h -E "passed|failed|error" "$out/kernel_tests.log" | tail -n 2
grep -h -E "passed|failed|error" "$out/sampler_cuda_test.log" | tail -n 2
for f in bench_dpo_logprobs bench_sampler bench_train_step; do
  echo "--- $f"; grep -E "^\|" "$out/$f.log" || tail -n 5 "$out/$f.log"
done
