#!/usr/bin/env bash
# One short check on a GPU machine, about 8 minutes in all (GPU_CHECK_SECONDS, default 480):
#   1. the test suite (the tests that need CUDA run only here: tests/test_scale_out.py);
#   2. the three benchmarks on the embedded models, with the Makefile's `bench` arguments and fewer
#      repeats (they measure on the CPU: see benchmarks/README.md);
#   3. the demo config on the GPU: the teacher scored on it (`score --max-memory`, device_map), then
#      20 training steps of MLAS-LoRA, into a scratch run folder.
# Every part runs under `timeout`, capped by what is left of the budget; a part that cannot run
# (no GPU, embedded models or corpus not prepared) says why and the script goes on.
#   bash scripts/gpu_check.sh          # from anywhere; it runs in the repository root
set -u
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-8} TOKENIZERS_PARALLELISM=false
DEADLINE=$((SECONDS + ${GPU_CHECK_SECONDS:-480}))
RUN=${GPU_CHECK_RUN:-/tmp/mlas-lora-gpu-check}
STUDENT=qwen2.5-coder-0.5b-instruct
TEACHER=qwen2.5-coder-1.5b-instruct

part() {  # part NAME SECONDS COMMAND...: run it under timeout, then print its exit status and time
  local name=$1 limit=$2 left=$((DEADLINE - SECONDS)) start=$SECONDS rc
  shift 2
  ((left < limit)) && limit=$left
  if ((limit < 15)); then echo "== $name: skipped, the time budget is spent"; return 1; fi
  echo "== $name (at most ${limit}s): $*"
  timeout --kill-after=10 "$limit" "$@"
  rc=$?
  echo "== $name: exit $rc after $((SECONDS - start))s$( ((rc == 124)) && echo ', timed out')"
  return $rc
}

python - <<'PY'
import torch
gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, GPU: {gpu}")
PY

part tests 170 python -m pytest -q -p no:cacheprovider --durations=8

prepared=$(python -c "
from mlas_lora.models.registry import is_prepared
from mlas_lora.paths import corpus_dir
models = all(is_prepared(n) for n in ('$STUDENT', '$TEACHER'))
print('models' if models else '', 'corpus' if (corpus_dir() / 'manifest.json').is_file() else '')")
if [[ $prepared != *models* ]]; then
  echo "== benchmarks and demo training: skipped, run \`mlas-lora models prepare $STUDENT $TEACHER\` first"
  exit 0
fi

(cd benchmarks && part bench_scoring 70 python bench_scoring.py --model $TEACHER --sentences 8 --tokens 48 --repeats 2)
(cd benchmarks && part bench_training 80 python bench_training.py --repeats 3 --warmup 1)
(cd benchmarks && part bench_generation 60 python bench_generation.py --repeats 2 --warmup 1)

if [[ $prepared != *corpus* ]]; then
  echo "== demo training: skipped, the embedded corpus is not built (\`mlas-lora data build\`)"
  exit 0
fi
if ! python -c "import torch, sys; sys.exit(not torch.cuda.is_available())"; then
  echo "== demo training: skipped, no GPU"
  exit 0
fi
overrides=(output_dir=$RUN models.dtype=bfloat16 training.max_steps=20 training.checkpoint_every=20)
part score_on_gpu 60 mlas-lora score configs/demo.yaml "${overrides[@]}" --max-memory 0=60GiB &&
  part train_on_gpu 100 mlas-lora train configs/demo.yaml "${overrides[@]}" --system mlas-lora-residual &&
  python - "$RUN" <<'PY'
import json, sys
from pathlib import Path
run = Path(sys.argv[1])
print("stage seconds:", json.loads((run / "stages.json").read_text()))
log = json.loads((run / "train-mlas-lora-residual" / "train_log.json").read_text())
print(f"training: {log['steps']} steps in {log['seconds']:.1f}s, final loss {log['history'][-1]['loss']:.3f}")
PY
