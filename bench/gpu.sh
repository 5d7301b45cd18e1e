#!/usr/bin/env bash
# One command for a GPU (make bench-gpu), a few minutes on one device:
#   1. a 300-step training run per precision in TRAIN_PRECISIONS (default bf16) through the real
#      launcher (deepspeed launch/train.py with train.precision=...) on a generated 128 px corpus,
#      which must end with finite losses; first, as the pass/fail check of the GPU path;
#   2. bench/step.py --gpu-matrix: one UNIT iteration (official preset, batch 8 per domain) in
#      fp32 / bf16 / fp16 x torch.compile off / on (COMPILES="off on graphs" adds CUDA graphs,
#      mode reduce-overhead), at 128 and 256 px: one table of images/s, ms/iteration, MFU (against
#      the device's dense bf16 peak) and peak memory. The eager cases run first, then where an
#      eager bf16 iteration goes (kernel launches, CPU against GPU time: torch.profiler), eager
#      channels-last / cudnn.benchmark / plain-upsampling variants and eager bf16 by batch
#      (BATCH_SWEEP). Then the compiled cases compile side by side, one process each (a compilation
#      is minutes of mostly one core's work), and are timed one at a time once compiled. With
#      BUDGET_S, no case starts, and no compiled case is waited for, after that many seconds of
#      the table, and the cases left out are rows that say so; END_S sets BUDGET_S to what is left
#      of that many seconds after the training runs, less 80 s for the timing of the compiled ones.
#
#   bench/gpu.sh                      # PY=/path/to/python to use another interpreter
#   SIZES="128" STEPS=100 bench/gpu.sh
#   TRAIN_PRECISIONS="bf16 fp16" PRECISIONS="bf16 fp32 fp16" BUDGET_S=240 LOG_DIR=logs bench/gpu.sh
#   TRAIN_COMPILE=true TRAIN_PRECISIONS=bf16 SIZES=128 PRECISIONS=bf16 BUDGET_S=1 bench/gpu.sh
#   COMPILES="off on graphs" PRECISIONS="bf16 fp32 fp16" END_S=555 LOG_DIR=logs bench/gpu.sh  # one lease
#
# Exit status: 0 all good; 1 a benchmark case failed or the training run did not reach a finite
# loss; 2 no CUDA GPU (or no torch, or a package MODULES names) here, said at once (DEVICE=cpu
# needs no GPU).
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PY:-.venv/bin/python}"
SIZES="${SIZES:-128 256}"
STEPS="${STEPS:-300}"
TRAIN_PRECISIONS="${TRAIN_PRECISIONS:-bf16}"
PRECISIONS="${PRECISIONS:-fp32 bf16 fp16}"
BUDGET_S="${BUDGET_S:-0}"
END_S="${END_S:-}"
COMPILES="${COMPILES:-off on}"
BATCH_SWEEP="${BATCH_SWEEP:-16 32 64}"
TRAIN_COMPILE="${TRAIN_COMPILE:-false}"   # true: the training runs use train.compile (minutes of compile first)
LOG_DIR="${LOG_DIR:-}"   # where to keep each training run's log (default: removed with the work folder)
# DEVICE=cpu: a dry run of this script's whole flow on the CPU (the launcher's CPU ranks, step.py
# --device cpu), to check it before a lease; with e.g. SIZES=16 TRAIN_SIZE=32 STEPS=4 DIM=8
# COMPILE_BACKEND=eager (torch.compile's backend in the table; inductor takes minutes on a CPU)
# DIS_DIM=8 TRAIN_DIM=8 (a CPU without bf16 instructions emulates them: the full-width preset's
# bf16 steps take tens of seconds each there, the 64-wide discriminators most of it)
DEVICE="${DEVICE:-cuda}"
COMPILE_BACKEND="${COMPILE_BACKEND:-inductor}"
TRAIN_SIZE="${TRAIN_SIZE:-128}"
TRAIN_IMAGES="${TRAIN_IMAGES:-512}"
DIM="${DIM:-}"   # the table's generator width (default: the preset's)
DIS_DIM="${DIS_DIM:-}"   # the table's discriminator width (default: the preset's)
TRAIN_DIM="${TRAIN_DIM:-}"   # the training runs' generator and discriminator width (default: the preset's)
REPEATS="${REPEATS:-20}"   # timed iterations per case (median), after WARMUP untimed ones
WARMUP="${WARMUP:-3}"

# WHEELS: a folder of wheels (make gpu-wheels, on a machine with an index) for an offline GPU
# machine whose Python has a CUDA torch and not the rest. When an import of MODULES fails, the
# folder's wheels whose projects PY lacks go into the work folder, on PYTHONPATH; what PY has
# already (torch, numpy, ...) is left alone.
WHEELS="${WHEELS:-.whl}"
MODULES="${MODULES:-deepspeed pydantic albumentations webdataset yaml safetensors pyarrow cv2}"

if ! command -v "$PY" >/dev/null 2>&1; then
    echo "bench/gpu.sh: no Python at $PY (run make setup, or set PY=...)" >&2
    exit 2
fi
work=$(mktemp -d "${TMPDIR:-/tmp}/bench-gpu.XXXXXX")
trap 'rm -rf "$work"' EXIT
imports="import ${MODULES// /, }"
importable=yes
missing=$("$PY" -c "$imports" 2>&1) || importable=no
if [ "$importable" = no ] && [ -d "$WHEELS" ]; then
    "$PY" bench/gpu_wheels.py install "$WHEELS" "$work/site" >/dev/null || exit 2
    export PYTHONPATH="$work/site${PYTHONPATH:+:$PYTHONPATH}"
    importable=yes
    missing=$("$PY" -c "$imports" 2>&1) || importable=no
fi
if [ "$importable" = no ]; then
    echo "bench/gpu.sh: $PY cannot import what the benchmark needs: $(echo "$missing" | tail -n 1)" >&2
    echo "  (pip install -e . there; or, offline, make gpu-wheels where an index answers and bring $WHEELS/ along)" >&2
    exit 2
fi
if ! gpu=$("$PY" - "$DEVICE" 2>&1 <<'EOF'
import sys
try:
    import torch
except Exception as e:
    sys.exit(f"torch is not importable ({type(e).__name__}: {e})")
if sys.argv[1] == "cpu":
    print(f"cpu (DEVICE=cpu: a dry run), torch {torch.__version__}")
    sys.exit(0)
if not torch.cuda.is_available():
    sys.exit(f"no CUDA GPU is visible to torch {torch.__version__} "
             f"({'a CPU-only build' if torch.version.cuda is None else 'CUDA ' + torch.version.cuda})")
print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}")
EOF
); then
    echo "bench/gpu.sh: this benchmark needs one CUDA GPU, and $PY says: $gpu" >&2
    echo "  (on a GPU machine with a CUDA build of torch, e.g. make setup TORCH_INDEX=\"--index-url https://download.pytorch.org/whl/cu128\")" >&2
    exit 2
fi
echo "bench/gpu.sh on $gpu"
if [ -n "$LOG_DIR" ]; then mkdir -p "$LOG_DIR"; fi
status=0
start=$SECONDS

# ---------------------------------------------------------------- 1. training through the real launcher (first: the pass/fail check)
echo
echo "training: $STEPS steps per precision ($TRAIN_PRECISIONS, train.compile: $TRAIN_COMPILE), official preset${TRAIN_DIM:+ at width $TRAIN_DIM}, $TRAIN_SIZE px, batch 8 per domain, deepspeed --num_gpus 1 launch/train.py"
"$PY" -m pipeline.demo --out "$work/demo" --n-train "$TRAIN_IMAGES" --n-test 8 --size "$TRAIN_SIZE" --seed 0 >/dev/null
"$PY" -m pipeline.shards --src-a "$work/demo/trainA" --src-b "$work/demo/trainB" --out "$work/shards" \
    --workers 4 --no-progress >/dev/null || [ $? -eq 3 ]
echo "| run | step reached | G loss | D loss | images/s (median of intervals) | non-finite steps | loss-scale skips G/D | data wait (median) | wall s (launch to exit) | finite loss |"
echo "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"
for precision in $TRAIN_PRECISIONS; do
    cat >"$work/$precision.yaml" <<EOF
run_dir: $work/run-$precision
seed: 0
data: {shards: $work/shards, image_size: $TRAIN_SIZE, batch_size: 8, num_workers: 4}
model: {preset: official${TRAIN_DIM:+, dim: $TRAIN_DIM, dis_dim: $TRAIN_DIM}}
train: {max_steps: $STEPS, precision: $precision, compile: $TRAIN_COMPILE, log_every: 25, sample_every: 1000000, ckpt_every: 1000000, keep_ckpts: 1}
tracking: {enable: false}
registry: {enable: false}
EOF
    train_start=$SECONDS
    # the first launch on a machine also JIT-builds DeepSpeed's fused Adam (counted in its wall time)
    if ! "$PY" -m deepspeed.launcher.runner --num_gpus 1 launch/train.py --config "$work/$precision.yaml" \
            >"$work/train-$precision.log" 2>&1; then
        echo "the $precision training run failed; the end of its log:" >&2
        tail -n 30 "$work/train-$precision.log" >&2
        status=1
    fi
    if [ -n "$LOG_DIR" ]; then cp "$work/train-$precision.log" "$LOG_DIR/"; fi
    "$PY" - "$work/run-$precision/metrics.jsonl" "$STEPS" "$((SECONDS - train_start))" "$precision" "$TRAIN_COMPILE" "$TRAIN_SIZE" "$TRAIN_DIM" \
        <<'EOF' || status=1
import json, math, sys
from statistics import median_high
path, steps, seconds, precision = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
run = precision + (", train.compile" if sys.argv[5] == "true" else "")
size = sys.argv[6]
width = f", width {sys.argv[7]}" if sys.argv[7] else ""
try:
    rows = [json.loads(line) for line in open(path)]
except OSError as e:
    sys.exit(f"no metrics from the {precision} training run ({e})")
last = rows[-1]
losses = {k: last[k] for k in ("g/total", "d/total")}
ok = last["step"] >= steps and all(math.isfinite(v) for v in losses.values())
timed = rows[1:] or rows  # the first interval holds the start-up (and the first fused-Adam build)
speed = median_high(r["images_per_s"] for r in timed)
wait = median_high(r["data_wait_frac"] for r in timed)
print(f"| {run}, official, {size} px, batch 8{width} | {last['step']} of {steps} | {losses['g/total']:.3f} "
      f"| {losses['d/total']:.3f} | {speed:.0f} | {last.get('nonfinite_total', 0)} "
      f"| {last.get('skipped_steps_g', 0)}/{last.get('skipped_steps_d', 0)} | {100 * wait:.1f}% | {seconds} | {'yes' if ok else 'NO'} |")
sys.exit(0 if ok else 1)
EOF
done

echo
# ---------------------------------------------------------------- 2. precision x compile table
TIMING_S=0
if [ -n "$END_S" ]; then
    TIMING_S=70   # of the 80 s kept back: a compiled case that hangs while timed costs no more
    BUDGET_S=$(( END_S - (SECONDS - start) - 80 ))
    if [ "$BUDGET_S" -lt 1 ]; then BUDGET_S=1; fi
    echo "END_S=$END_S: the table's budget is $BUDGET_S s"
fi
# shellcheck disable=SC2086  # SIZES, PRECISIONS, COMPILES and BATCH_SWEEP are lists
"$PY" bench/step.py --gpu-matrix --device "$DEVICE" ${DIM:+--dim "$DIM"} ${DIS_DIM:+--dis-dim "$DIS_DIM"} --sizes $SIZES --precisions $PRECISIONS \
    --repeats "$REPEATS" --warmup "$WARMUP" --compile $COMPILES --compile-backend "$COMPILE_BACKEND" \
    --budget-s "$BUDGET_S" --timing-s "$TIMING_S" --parallel-compile --profile --layouts --batch-sweep $BATCH_SWEEP \
    || status=1

echo
echo "bench/gpu.sh: $((SECONDS - start)) s on $gpu; exit status $status (0: every case ran and the training loss is finite)"
exit "$status"
