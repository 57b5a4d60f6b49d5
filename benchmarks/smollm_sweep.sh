#!/usr/bin/env bash
# The SmolLM2 device table (RESULTS.md §9): the users' recipe (PEFT LoRA r 8, α 16 on all seven projections,
# batch 16, 300 steps, linear warm-up over 10 % then cosine to 0, wd 0, bf16 autocast), 3 paired seeds, a 3-point
# lr grid per configuration around the best lrs seen so far, grids whose best lr is an edge extended (--extend).
#
#   bash benchmarks/smollm_sweep.sh TASK MODEL_DIR [BUDGET_S]      # TASK: math or code
#   MODES="lora sds sds_muon" GRIDS="sds_muon=1e-3,3e-3,6e-3" bash benchmarks/smollm_sweep.sh math MODEL_DIR
#
# MODES (space-separated) replaces the mode list; GRIDS (space-separated MODE=LR,LR,...) sets those modes' grids, the
# others keep theirs below (a mode without any grid gets llm_sweep.py's default).  WORKERS: jobs at once (default
# auto: from the GPU's free memory, llm_sweep.py's auto_workers); PEAK_GB: one run's GPU footprint for auto (default
# measured in runs/llm's logs, else the per-task estimate); RUNS: the runs' folder (runs/llm; not OUT, which the
# device machines set to the folder whose files come back, and a sweep's ~100 files there do not).  CUDA's allocator runs
# with expandable segments (PYTORCH_CUDA_ALLOC_CONF, unless set): padded batches of varying lengths then leave little
# reserved-but-unused memory per process.
#
# MODEL_DIR: a save_pretrained folder of SmolLM2-135M-Instruct (benchmarks/smollm_folder.py writes one from the
# GGUF; or the GGUF's folder with GGUF_FILE=its file name, and gguf importable).  Re-running the same command resumes (finished jobs are skipped).  Results in runs/llm.
set -euo pipefail
task=$1 model=$2 budget=${3:-530}
modes=(lora loraplus4 loraplus16 sds sds_gs loraplus16_gs sdsplus2 sdsplus4 sdsplus8)
if [ -n "${MODES:-}" ]; then read -r -a modes <<< "$MODES"; fi
if [ "$task" = math ]; then
  grids=(lora=1e-3,3e-3,6e-3 loraplus4=5e-4,1e-3,2e-3 loraplus16=5e-4,1e-3,2e-3 sds=1e-3,3e-3,6e-3
         sds_gs=1e-3,3e-3,6e-3 loraplus16_gs=2.5e-4,5e-4,1e-3 sdsplus2=1e-3,2e-3,4e-3 sdsplus4=5e-4,1e-3,2e-3
         sdsplus8=2.5e-4,5e-4,1e-3)
else  # the code task over-fits its 374 functions (13 epochs in 300 steps of 16): lower lrs, 3x apart
  grids=(lora=3e-5,1e-4,3e-4 loraplus4=1e-5,3e-5,1e-4 loraplus16=3e-6,1e-5,3e-5 sds=3e-5,1e-4,3e-4
         sds_gs=3e-5,1e-4,3e-4 loraplus16_gs=3e-6,1e-5,3e-5 sdsplus2=3e-5,1e-4,3e-4 sdsplus4=1e-5,3e-5,1e-4
         sdsplus8=1e-5,3e-5,1e-4)
fi
if [ -n "${GRIDS:-}" ]; then read -r -a extra <<< "$GRIDS"; grids+=("${extra[@]}"); fi  # (a later --grid wins)
args=()
for g in "${grids[@]}"; do args+=(--grid "$g"); done
export PYTORCH_CUDA_ALLOC_CONF=${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}
python3 benchmarks/llm_sweep.py run --workers "${WORKERS:-auto}" ${PEAK_GB:+--peak-gb "$PEAK_GB"} --budget "$budget" \
  --deadline "$budget" --extend 3 --seeds 3 --tasks "$task" --scales peft_r8 --steps 300 --modes "${modes[@]}" \
  "${args[@]}" --out "${RUNS:-runs/llm}" \
  -- --device cuda --autocast bf16 --batch 16 --schedule cosine --warmup-ratio 0.1 --model-dir "$model" \
  --no-accuracy --opt fused=True ${GGUF_FILE:+--gguf-file "$GGUF_FILE"}
