#!/usr/bin/env bash
# The GPU checks, in order of value, inside a time budget: what a lent GPU machine runs.
#
#   bash ../shared/gpu/device_kit.sh                  # here, once: .gpu-kit/ (inplace-abn source)
#   OUT=gpu_out BUDGET_S=540 bash tools/gpu_check.sh  # there, from the project's root
#   STEPS="tests demo" ... bash tools/gpu_check.sh     # only some of: build table tests demo
#                                                     # compare rest make
#
# Every figure goes to $OUT/figures.md as it comes (and every command's output to $OUT/log.txt),
# so a run stopped at its limit still returns what it measured. A step that would not fit in the
# time left is skipped and named. Uses the machine's python3 (PYTHON to choose another).
set -u
OUT=${OUT:-gpu_out}
PY=${PYTHON:-python3}
mkdir -p "$OUT"
FIG="$OUT/figures.md" LOG="$OUT/log.txt"
deadline=$(( $(date +%s) + ${BUDGET_S:-540} ))
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

STEPS=" ${STEPS:-build table tests demo compare rest make} "
AMPS=${AMPS:-bf16 none}
say() { echo "$*" | tee -a "$FIG"; }
want() { [[ "$STEPS" == *" $1 "* ]]; }

# step NAME SECONDS COMMAND...: run COMMAND for at most SECONDS (less if less time is left),
# its output into the log, its exit status and time into the figures.
step() {
  local name=$1 limit=$2 left=$(( deadline - $(date +%s) )); shift 2
  if (( left < 30 )); then say "- $name: skipped, ${left}s left"; return 0; fi
  (( limit > left )) && limit=$left
  echo "===== $name: $* (limit ${limit}s)" >> "$LOG"
  STEP_START=$(wc -l < "$LOG")
  local t0=$(date +%s) rc=0
  timeout -k 5 "$limit" "$@" >> "$LOG" 2>&1 || rc=$?
  say "- $name: exit $rc in $(( $(date +%s) - t0 ))s$( ((rc == 124)) && echo ' (time limit)')"
  return 0
}

# keep PATTERN [N]: the last step's output lines that match (the last N), into the figures.
keep() { tail -n +"$((STEP_START + 1))" "$LOG" | grep -E "$1" | tail -n "${2:-40}" >> "$FIG"; }

# table ROWS SECONDS: bench.py --compare rows, the table's lines into the figures.
table() {
  step "bench rows $1" "$2" "$PY" -m cmal.tools.bench --compare --image_size=368 \
      --batch_size=16 --num_classes=196 --device=cuda --iters=10 --warmup=3 --rows="$1"
  keep '^\| |^device:|^note:|Error|error'
}

say "# GPU checks, $(date -u '+%Y-%m-%d %H:%M UTC')"
if want build && [ -f .gpu-kit/setup.sh ]; then step "inplace-abn build" 150 bash .gpu-kit/setup.sh; fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader >> "$FIG" 2>&1
"$PY" -c "import torch, sys; print('python', sys.version.split()[0], 'torch', torch.__version__, \
'cuda', torch.version.cuda)" >> "$FIG" 2>&1

# 1. The table's reference row and fastest rows (reference set-up, fp32 graph, bf16 graph).
want table && table 0,2,4 240
# 2. The CUDA tests (compile's, minutes long, last).
if want tests; then
  step "pytest test_cuda (not compile)" 150 "$PY" -m pytest -q -p no:cacheprovider \
      tests/test_cuda.py tests/test_cuda_graph.py -k "not compiled" -rs
  keep '^(FAILED|ERROR|SKIPPED)|passed|failed'
fi
# 3. The demo on the GPU, with the defaults a user gets.
if want demo; then
  step "demo (defaults)" 120 "$PY" -m cmal.tools.demo
  keep '^epoch|Warning|warn|Error' 12
fi
# 4. Does bf16 learn as fp32 does? The demo over three seeds each.
want compare && for amp in $AMPS; do
  step "demo compare amp=$amp" 150 "$PY" -m cmal.tools.demo --compare --methods=cmal \
      --seeds=0,1,2 --amp="$amp" --compare_dir="Results_demo_compare_$amp"
  cat "Results_demo_compare_$amp/comparison.md" >> "$FIG" 2>/dev/null
done
# 5. The rest of the table.
want rest && table 1,3,5 200
# 6. The whole suite, with the same command as on the CPU, for what time is left: make's
# environment is the machine's own (nothing can be installed there).
if want make; then
  VENV=$("$PY" -c 'import sys; print(sys.prefix)')
  touch "$VENV/.setup-done"
  step "make test" 900 make test VENV="$VENV"
  keep '^(FAILED|ERROR)|passed|failed'
fi
say "done at $(date -u '+%H:%M:%S'), $(( deadline - $(date +%s) ))s of the budget left"
