#!/usr/bin/env bash
# Issue 46 on one H100: the fused Triton step for LoRA ranks r in (64, 256], each device call one command.
#
#   bash benchmarks/device_highrank.sh profile     # device call 1: kernels' tests, launch sweep, step's split
#   bash benchmarks/device_highrank.sh measure     # device call 2: whole-step overhead table, split-K Grams A/B
#   SMOKE=1 bash benchmarks/device_highrank.sh measure    # the same commands at toy sizes on the CPU (plumbing)
#
# Run from the repo root (a git checkout or a plain copy of one).  Everything goes to a folder $WORK
# (default /tmp/highrank_<subcommand>): one log per sub-step, the JSON results, steps.log (each sub-step's command,
# exit status and wall time); at the end it is packed into "$OUT/highrank_<subcommand>.tgz" and steps.log copied to
# "$OUT/highrank_<subcommand>_steps.txt" (two files: the device returns at most 8).  $OUT defaults to /tmp/highrank_out.
#
# Time: every sub-step runs under `timeout`, its limit the smaller of its own cap and what is left of BUDGET
# (default 520 s: with `timeout -k 10` and the tar, the command ends by ~535 s, inside the device's 600 s), keeping
# back what the later sub-steps need (a sub-step left with < 20 s is skipped, named SKIPPED).  A failing or
# timed-out sub-step prints FAILED and the rest go on.  The e2e runs write their JSON after every batch size, and
# the sweep prints a line per candidate, so a cut run keeps what it did.
#
# profile (estimated ~450-520 s on an H100):
#   a. pytest -m "not slow" tests/test_fused.py on CUDA (graph capture at r = 128/256, tiles, frames)  ~60-100 s
#   b. kernel_blocks.py: the tiled candidates at r = 128, 256, fp32, e2e shapes (28 pairs); the fastest Adam and Gram
#      changes combined to best.json (also /tmp/highrank_best.json for measure)  ~150 s, capped at 170 s
#   c. e2e_step.py, r = 128 and 256, batch 8 and 1, adamw sds sds_torch with best.json, 15 steps x 2 rounds  ~110 s each
# measure (BUDGET=300, right after profile on the warm machine):
#   0. e2e_profile.py: the step's device/host split, r = 128, 256, batch 1, 8                   ~110-140 s
#   b. the split-K Grams (benchmarks/gram_split.patch) applied to a copy of sdsopt/ and tests/ in $WORK/patched (the
#      tree itself is never modified): pytest tests/test_geometry.py there; e2e_step.py on the patched copy at
#      8x1024, variants adamw sds_torch sds_torch_unsplit (the split switched off in the same process: the control)
#   c. pytest tests/test_fused.py (the hypothesis run too), with what is left
#
# Environment: PYTHON (default python3: the device's interpreter with torch), OUT, WORK, BUDGET, VARIANTS (measure
# a's variants), SMOKE=1 (CPU, toy sizes: e2e_step at hidden 64, pytest --collect-only for test_fused, --help for
# kernel_blocks and e2e_profile, which need CUDA).
set -u
cmd=${1:-}
case $cmd in profile|measure) ;; *) echo "usage: bash benchmarks/device_highrank.sh profile|measure" >&2; exit 2 ;; esac
PY=${PYTHON:-python3}
SMOKE=${SMOKE:-0}
OUT=${OUT:-/tmp/highrank_out}
WORK=${WORK:-/tmp/highrank_$cmd}
BUDGET=${BUDGET:-520}
ROOT=$PWD
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
export NCCL_NVLS_ENABLE=${NCCL_NVLS_ENABLE:-0}
export SDSOPT_KERNELS_MAX_RANK=${SDSOPT_KERNELS_MAX_RANK:-256}  # the kernels up to r = 256 (the default since issue 46)
rm -rf "$WORK" && mkdir -p "$WORK" "$OUT"
START=$SECONDS
LOG=$WORK/steps.log

say() { echo "$*" | tee -a "$LOG"; }

pack() {  # the folder into one archive under $OUT (after every step and at the end)
  cp "$LOG" "$OUT/highrank_${cmd}_steps.txt"
  local base
  base=$(basename "$WORK")
  tar czf "$OUT/highrank_$cmd.tgz" --exclude "$base/patched" -C "$(dirname "$WORK")" "$base" || echo "FAILED tar"
}

finish() {
  say "=== $cmd done in $((SECONDS - START)) s"
  pack
}
trap finish EXIT
trap 'exit 130' INT TERM

# step NAME CAP RESERVE CMD...: run CMD (in the current directory) under timeout min(CAP, left - RESERVE),
# output to $WORK/NAME.log; its status and wall time to steps.log; the log's end (warnings left out) to stdout.
step() {
  local name=$1 cap=$2 reserve=$3
  shift 3
  local left=$((BUDGET - (SECONDS - START)))
  local lim=$((left - reserve < cap ? left - reserve : cap))
  if ((lim < 20)); then
    say "SKIPPED $name: ${left} s left of the ${BUDGET} s budget, ${reserve} s kept for later steps"
    return 0
  fi
  say "=== $name (limit ${lim} s, $((SECONDS - START)) s in): $*"
  local t0=$SECONDS rc
  timeout -k 10 "$lim" "$@" > "$WORK/$name.log" 2>&1
  rc=$?
  grep -vE "Warning|warnings\.warn|^W[0-9]{4} |torchao|^ *$" "$WORK/$name.log" | tail -n 30
  if ((rc == 0)); then
    say "=== $name ok, wall $((SECONDS - t0)) s"
  else
    local why=""
    ((rc == 124 || rc == 137)) && why=" (timed out at ${lim} s)"
    say "FAILED $name: exit $rc$why, wall $((SECONDS - t0)) s"
  fi
  pack  # what is done so far, in case the call is cut
  return 0
}

env_info() {
  {
    date -u
    nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,driver_version --format=csv 2>&1
    "$PY" - <<'EOF' 2>&1
import sys
import torch
print("python", sys.version.split()[0], "torch", torch.__version__)
for name in ("triton", "transformers", "peft"):
    try:
        print(name, __import__(name).__version__)
    except Exception as err:  # noqa: BLE001
        print(name, "missing:", err)
from sdsopt import fused
print("sdsopt.fused MAX_RANK", fused.MAX_RANK, "HELD_RANK", getattr(fused, "HELD_RANK", None))
EOF
    sha256sum sdsopt/*.py sdsopt/modes/*.py 2>&1
  } > "$WORK/env.txt"
  head -n 6 "$WORK/env.txt"
}

if ((SMOKE)); then
  MODEL=(--device cpu --layers 1 --hidden 64 --heads 2 --vocab 128 --seq 16)
  STEPS=(--steps 2 --warmup 1 --rewarm 1 --rounds 2)
  RANKS=(4 8)
else
  MODEL=(--layers 4 --hidden 4096 --heads 32)
  STEPS=(--steps 20 --rounds 3)
  RANKS=(128 256)
fi

profile() {
  env_info
  if ((SMOKE)); then
    step test_fused 200 0 "$PY" -m pytest -x -q tests/test_fused.py -p no:cacheprovider --collect-only
    step kernel_blocks 220 0 "$PY" benchmarks/kernel_blocks.py --help
    step e2e_profile 300 0 "$PY" benchmarks/e2e_profile.py --help
    return
  fi
  # a. ~60-100 s: the quick tests (graph capture at r = 128/256, tiles, frames); the hypothesis run is in measure
  step test_fused 70 ${PROFILE_RESERVE:-230} "$PY" -m pytest -q tests/test_fused.py -p no:cacheprovider -m "not slow"
  # b. ~150 s: fp32 (the e2e model's adapters) at r = 128, 256, e2e shapes, the tiled candidates; the best to JSON
  step kernel_blocks 120 200 "$PY" benchmarks/kernel_blocks.py --shape e2e --ranks 128 256 --dtypes fp32 \
    --modes sds --steps 5 --sweep ${SWEEP:-adam gram} --best "$WORK/best.json"
  cp "$WORK/best.json" /tmp/highrank_best.json 2>/dev/null  # for measure on the same (warm) machine
  # c. ~110 s per rank: the whole step with the sweep's best settings: AdamW, the kernels, the torch path
  local launch=() r reserve=100
  [[ -s $WORK/best.json ]] && launch=(--launch "$WORK/best.json")
  for r in "${RANKS[@]}"; do
    step "e2e_r$r" 100 "$reserve" "$PY" benchmarks/e2e_step.py "${MODEL[@]}" --rank "$r" --batch 8 1 --steps "${E2E_STEPS:-10}" \
      --rounds 2 --variants adamw sds sds_torch "${launch[@]}" --json "$WORK/e2e_r$r.json"
    reserve=0
  done
  summary
}

summary() {  # every e2e JSON of this call, a line per (batch, variant)
  "$PY" - "$WORK" <<'EOF' | tee "$WORK/summary.txt" | tee -a "$LOG"
import json, sys
from pathlib import Path
for path in sorted(Path(sys.argv[1]).glob("e2e_*.json")):
    d = json.loads(path.read_text())
    for batch, rows in d["batches"].items():
        for key, row in rows.items():
            if "failed" in row:
                print(f"{path.stem:<14} b{batch} {key:<18} failed: {row['failed'][:100]}")
                continue
            ov = "" if row["overhead_pct"] is None else f"{row['overhead_pct']:+6.1f}%"
            print(f"{path.stem:<14} b{batch} {key:<18} {row['median_ms']:8.2f} ms {ov}  rounds "
                  + " ".join(f"{m:.2f}" for m in row["round_medians_ms"]))
EOF
}

measure() {
  env_info
  local r reserve
  # 0. ~110-140 s: where the step's time goes (device / host split of the optimizer step, fwd+bwd)
  step e2e_profile 140 130 "$PY" benchmarks/e2e_profile.py --layers 4 --hidden 4096 --heads 32 --ranks 128 256 \
    --batch 1 8 --steps 5 --out "$WORK/e2e_profile"
  # b. the split-K Grams on a patched copy of the library and its tests
  local P=$WORK/patched
  mkdir -p "$P" && cp -r sdsopt tests "$P"/ && cp pyproject.toml "$P"/ 2>/dev/null
  find "$P" -name __pycache__ -prune -exec rm -rf {} +
  if (cd "$P" && { patch -p1 --forward --batch < "$ROOT/benchmarks/gram_split.patch" \
                   || git apply "$ROOT/benchmarks/gram_split.patch"; }) > "$WORK/patch.log" 2>&1; then
    say "=== gram_split.patch applied to $P"
    # ~20 s
    (cd "$P" && step test_geometry_split 40 110 "$PY" -m pytest -q -p no:cacheprovider tests/test_geometry.py)
    # ~50 s per rank (3 variants x (15 + 10 + 10) steps at 8x1024, 3 builds)
    reserve=50
    for r in "${RANKS[@]}"; do
      PYTHONPATH="$P:$PYTHONPATH" step "e2e_split_r$r" 60 "$reserve" "$PY" benchmarks/e2e_step.py "${MODEL[@]}" \
        --rank "$r" --batch 8 --rounds 2 --steps "$( ((SMOKE)) && echo 2 || echo 10)" \
        --variants adamw sds_torch sds_torch_unsplit --json "$WORK/e2e_split_r$r.json"
      reserve=0
    done
  else
    say "FAILED gram_split.patch does not apply: $(tail -n 3 "$WORK/patch.log" | tr '\n' ' ')"
  fi
  # c. the kernels' tests again, with what is left (~60-200 s)
  if ((SMOKE)); then
    step test_fused 200 0 "$PY" -m pytest -q tests/test_fused.py -p no:cacheprovider --collect-only
  else
    step test_fused 200 0 "$PY" -m pytest -q tests/test_fused.py -p no:cacheprovider
  fi
  summary
}


"$cmd"
