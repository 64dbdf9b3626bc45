#!/usr/bin/env bash
# The GPU check: what the TensorRT runtime does on a real NVIDIA GPU (a T4, a Jetson, any CUDA box).
#
#   scripts/gpu_check.sh                       # --mode check: engines, agreement, bench (< 8 min)
#   scripts/gpu_check.sh --mode train          # magnetic-tile recipe at 640 px on the GPU
#   scripts/gpu_check.sh --dry-run             # print every command, run nothing (no GPU needed)
#   scripts/gpu_check.sh --out DIR --timeout-min 8
#
# check: installs TensorRT from PyPI into the project venv (the wheel for the driver's CUDA major;
# pycuda, onnx, onnxconverter-common from the `gpu` extra), builds FP16 and calibrated INT8 engines
# for the demo package and for yolov8n-seg / yolov8s-seg at 640 (random weights from the
# architecture yaml: speed and agreement only), compares each engine's OK/DEFECT decisions with
# ONNX Runtime on the same images, then runs `edge bench` at 60 fps with 1, 4, 8 and 16 synthetic
# cameras on the demo FP16 engine and prints the table.
# train: trains the magnetic-tile recipe (yolov8n-seg, 640 px, the design's lr0 0.00232 / batch 64
# / 50 epochs) on the GPU through scripts/make_magnetic_tile_report.sh and prints the REPORT table.
#
# Output: DIR (default var/gpu-check/<mode>-<UTC time>) holds logs/, one JSON per compare and per
# bench run, bench-table.md and summary.json. It is written as DIR.partial and renamed when the run
# ends; a run that is killed leaves DIR.partial. Reusable inputs (synthetic images, random-weight
# packages, engines, the line YAML) live in $WORK (default var/gpu-check/work).
# Exit: 0 all steps passed, 1 a step failed or was skipped, 2 cannot run here (no nvidia-smi, ...).
#
# Knobs (environment): TRT_SPEC (pip requirement of TensorRT; default by CUDA major, < 11),
# ENGINE_TIMEOUT_S (300 per engine build), SETUP_TIMEOUT_MIN (25, installs; outside the check
# budget), BENCH_CAMERAS ("1 4 8 16"), BENCH_RATE (60), BENCH_DURATION (10 s), BENCH_WORKERS (auto),
# CHECK_MODELS ("demo yolov8n-seg yolov8s-seg"), COMPARE_IMAGES (80), MIN_AGREEMENT_FP16 (0.98) / MIN_AGREEMENT_INT8 (0.95) for the demo model,
# SRC (../shared/data/magnetic-tile), TRAIN_EPOCHS (50), TRAIN_BATCH (64), TRAIN_DEVICE (0).
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
cd "$ROOT"

MODE=check
OUT=""
TIMEOUT_MIN=""
DRY_RUN=0

usage() {
  sed -n '2,8p' "$0" | sed 's/^# \{0,1\}//'
}

while [ $# -gt 0 ]; do
  case "$1" in
    --mode) MODE="${2:?--mode needs check or train}"; shift 2 ;;
    --mode=*) MODE="${1#*=}"; shift ;;
    --out) OUT="${2:?--out needs a directory}"; shift 2 ;;
    --out=*) OUT="${1#*=}"; shift ;;
    --timeout-min) TIMEOUT_MIN="${2:?--timeout-min needs minutes}"; shift 2 ;;
    --timeout-min=*) TIMEOUT_MIN="${1#*=}"; shift ;;
    --dry-run) DRY_RUN=1; shift ;;
    -h|--help) usage; exit 0 ;;
    *) echo "error: unknown argument '$1' (see --help)" >&2; exit 2 ;;
  esac
done
case "$MODE" in
  check) TIMEOUT_MIN="${TIMEOUT_MIN:-8}" ;;
  train) TIMEOUT_MIN="${TIMEOUT_MIN:-180}" ;;
  *) echo "error: --mode '$MODE': choose check or train" >&2; exit 2 ;;
esac
if ! [[ "$TIMEOUT_MIN" =~ ^[0-9]+$ ]] || [ "$TIMEOUT_MIN" -lt 1 ]; then
  echo "error: --timeout-min '$TIMEOUT_MIN': give whole minutes >= 1" >&2
  exit 2
fi

OUT="$(realpath -m "${OUT:-var/gpu-check/$MODE-$(date -u +%Y%m%dT%H%M%SZ)}")"
PART="$OUT.partial"
WORK="$(realpath -m "${WORK:-var/gpu-check/work}")"
PY=.venv/bin/python
EDGE=.venv/bin/edge
HELPER=scripts/gpu/gpucheck.py

ENGINE_TIMEOUT_S="${ENGINE_TIMEOUT_S:-300}"
SETUP_TIMEOUT_MIN="${SETUP_TIMEOUT_MIN:-25}"
BENCH_CAMERAS="${BENCH_CAMERAS-1 4 8 16}"  # empty: no bench
BENCH_RATE="${BENCH_RATE:-60}"
BENCH_DURATION="${BENCH_DURATION:-10}"
BENCH_WORKERS="${BENCH_WORKERS:-auto}"
COMPARE_IMAGES="${COMPARE_IMAGES:-80}"
MIN_AGREEMENT_FP16="${MIN_AGREEMENT_FP16:-0.98}"
MIN_AGREEMENT_INT8="${MIN_AGREEMENT_INT8:-0.95}"
SRC="${SRC:-../shared/data/magnetic-tile}"
TRAIN_EPOCHS="${TRAIN_EPOCHS:-50}"
TRAIN_BATCH="${TRAIN_BATCH:-64}"
TRAIN_DEVICE="${TRAIN_DEVICE:-0}"
MIN_STEP_S=15          # a step that would get less time than this is skipped, not started

DEMO_PKG=models/demo/package
DEMO_SAMPLES=models/demo/samples
read -r -a MODELS <<< "${CHECK_MODELS:-demo yolov8n-seg yolov8s-seg}"
for m in "${MODELS[@]}"; do
  case "$m" in
    demo|yolov8n-seg|yolov8s-seg) ;;
    *) echo "error: CHECK_MODELS: '$m' is not demo, yolov8n-seg or yolov8s-seg" >&2; exit 2 ;;
  esac
done
PRECISIONS=(fp16 int8)

DEADLINE=0             # epoch seconds when the check budget ends (0: not started)
RESERVE=0              # seconds kept back for later steps (the bench) while earlier ones run
STEP_PID=""
FINISHED=0
CUDA_MAJOR="<cuda-major>"

# ---- logging and steps ----

log() {
  local line
  line="[gpu_check $(date -u +%H:%M:%S)] $*"
  echo "$line" >&2
  if [ "$DRY_RUN" = 0 ] && [ -d "$PART" ]; then echo "$line" >> "$PART/gpu_check.log"; fi
}

quote_cmd() {
  local out="" a
  for a in "$@"; do out+="$(printf '%q' "$a") "; done
  printf '%s' "${out% }"
}

record() {  # name status rc seconds log
  printf '%s\t%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "$4" "$5" >> "$PART/steps.tsv"
}

# run_step NAME TIMEOUT_S CMD...: CMD with its own timeout (cut to what is left of the check
# budget minus RESERVE), output in $PART/logs/NAME.log, one line in steps.tsv. In --dry-run it only
# prints the command. Returns CMD's status; a skipped step returns 1.
run_step() {
  local name=$1 limit=$2 left logf t0 t1 secs rc status
  shift 2
  if [ "$DRY_RUN" = 1 ]; then
    printf '[plan] %s (timeout %ss): %s\n' "$name" "$limit" "$(quote_cmd "$@")"
    return 0
  fi
  if [ "$DEADLINE" -gt 0 ]; then
    left=$(( DEADLINE - $(date +%s) - RESERVE ))
    if [ "$left" -lt "$MIN_STEP_S" ]; then
      log "skip $name: the ${TIMEOUT_MIN}-minute budget is spent"
      record "$name" skipped 0 0 -
      return 1
    fi
    if [ "$left" -lt "$limit" ]; then limit=$left; fi
  fi
  logf="$PART/logs/$name.log"
  log "step $name (timeout ${limit}s): $(quote_cmd "$@")"
  t0=$EPOCHREALTIME
  # timeout runs CMD in its own process group and signals the whole group: a timed-out bench
  # takes its inference workers and PLC simulator with it.
  timeout --kill-after=15 "$limit" "$@" > "$logf" 2>&1 < /dev/null &
  STEP_PID=$!
  if wait "$STEP_PID"; then rc=0; else rc=$?; fi
  STEP_PID=""
  t1=$EPOCHREALTIME
  secs=$(awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.1f", b - a }')
  case "$rc" in
    0) status=ok ;;
    124|137) status=timeout ;;
    *) status=failed ;;
  esac
  record "$name" "$status" "$rc" "$secs" "$logf"
  log "step $name: $status after ${secs}s (log $logf)"
  if [ "$rc" != 0 ]; then tail -n 15 "$logf" | sed 's/^/    /' >&2; fi
  return "$rc"
}

cached() {  # name why: a step whose result is already in $WORK
  if [ "$DRY_RUN" = 1 ]; then return 0; fi
  log "step $1: cached ($2)"
  record "$1" cached 0 0 -
}

skip() {  # name why
  if [ "$DRY_RUN" = 1 ]; then return 0; fi
  log "skip $1: $2"
  record "$1" skipped 0 0 -
}

finish() {  # state: write summary.json, move DIR.partial to DIR, exit with the run's status
  local state=$1 rc=0
  FINISHED=1
  if [ -x "$PY" ]; then
    "$PY" "$HELPER" summary --out "$PART" --mode "$MODE" --state "$state" || rc=$?
  else
    printf '{"mode": "%s", "state": "%s", "ok": false}\n' "$MODE" "$state" > "$PART/summary.json"
    rc=1
  fi
  if [ "$state" != finished ]; then rc=1; fi
  mv "$PART" "$OUT"
  log "wrote $OUT (summary.json, logs/)"
  exit "$rc"
}

die() {
  log "error: $*"
  finish failed
}

on_signal() {
  if [ -n "$STEP_PID" ]; then kill -TERM -- "-$STEP_PID" 2>/dev/null || true; fi
  log "interrupted: $PART is left as it was"
  exit 130
}

on_exit() {
  local rc=$?
  if [ "$DRY_RUN" = 0 ] && [ "$FINISHED" = 0 ] && [ -d "$PART" ]; then
    if [ -n "$STEP_PID" ]; then kill -TERM -- "-$STEP_PID" 2>/dev/null || true; fi
    if [ -x "$PY" ]; then
      "$PY" "$HELPER" summary --out "$PART" --mode "$MODE" --state interrupted > /dev/null || true
    fi
  fi
  return "$rc"
}
trap on_signal INT TERM
trap on_exit EXIT

# ---- preflight (nothing is written before it passes) ----

preflight_gpu() {
  if [ "$DRY_RUN" = 1 ]; then
    printf '[plan] preflight: nvidia-smi (GPU name, driver, CUDA version) -> gpu.json\n'
    return 0
  fi
  if ! command -v nvidia-smi > /dev/null 2>&1; then
    echo "error: nvidia-smi not found: this check needs an NVIDIA GPU with its driver installed" \
      "(a T4, a Jetson with JetPack 6, any CUDA machine); nothing was run or written." \
      "On a CPU box use --dry-run to see the plan." >&2
    exit 2
  fi
  if ! nvidia-smi > /dev/null 2>&1; then
    echo "error: nvidia-smi is installed but fails (driver not loaded, or no GPU visible to" \
      "this container): $(nvidia-smi 2>&1 | head -n 2 | tr '\n' ' ')" >&2
    exit 2
  fi
  if [ -e "$OUT" ] || [ -e "$PART" ]; then
    echo "error: $OUT (or $PART) already exists: give a new --out" >&2
    exit 2
  fi
  if [ "$MODE" = train ] && [ ! -f "$SRC/ABOUT.md" ]; then
    echo "error: the magnetic-tile data is not at $SRC (set SRC=...; see its ABOUT.md)" >&2
    exit 2
  fi
  mkdir -p "$PART/logs" "$WORK"
  : > "$PART/steps.tsv"
  nvidia-smi > "$PART/nvidia-smi.txt" 2>&1
  nvidia-smi --query-gpu=name,driver_version,compute_cap,memory.total --format=csv,noheader \
      > "$PART/nvidia-smi-query.csv" 2> /dev/null \
    || nvidia-smi --query-gpu=name,driver_version --format=csv,noheader \
      > "$PART/nvidia-smi-query.csv"
  log "GPU: $(head -n 1 "$PART/nvidia-smi-query.csv"); $(grep -o 'CUDA Version: *[0-9.]*' \
    "$PART/nvidia-smi.txt" || echo 'CUDA version unknown')"
}

gpu_facts() {  # after the venv exists: gpu.json and CUDA_MAJOR
  local k v
  if [ "$DRY_RUN" = 1 ]; then
    run_step gpu-info 30 "$PY" "$HELPER" gpu-info --smi "$PART/nvidia-smi.txt" \
      --query "$PART/nvidia-smi-query.csv" --out "$PART/gpu.json"
    return 0
  fi
  while IFS='=' read -r k v; do
    case "$k" in
      cuda_major) CUDA_MAJOR=$v ;;
      name) GPU_NAME=$v ;;
      jetson) JETSON=$v ;;
    esac
  done < <("$PY" "$HELPER" gpu-info --smi "$PART/nvidia-smi.txt" \
             --query "$PART/nvidia-smi-query.csv" --out "$PART/gpu.json")
  [[ "$CUDA_MAJOR" =~ ^[0-9]+$ ]] || die "cannot read the CUDA version from nvidia-smi"
  log "GPU ${GPU_NAME:-?}, driver CUDA $CUDA_MAJOR.x, jetson=${JETSON:-False}"
}

# ---- setup: venv, TensorRT, pycuda ----

setup_venv() {
  local limit=$(( SETUP_TIMEOUT_MIN * 60 ))
  if [ "$DRY_RUN" = 0 ] && [ -x "$PY" ] \
      && "$PY" -c "import edge, models, torch, ultralytics" > /dev/null 2>&1; then
    cached setup-venv "using the existing .venv (edge, torch, ultralytics import)"
    return 0
  fi
  run_step setup-venv "$limit" scripts/setup.sh test || die "scripts/setup.sh test failed"
}

find_nvcc() {
  if command -v nvcc > /dev/null 2>&1; then command -v nvcc; return 0; fi
  local c
  for c in /usr/local/cuda/bin/nvcc /usr/local/cuda-*/bin/nvcc; do
    if [ -x "$c" ]; then echo "$c"; return 0; fi
  done
  return 1
}

setup_tensorrt() {
  local limit=$(( SETUP_TIMEOUT_MIN * 60 )) spec runtime_spec nvcc
  if [ "$DRY_RUN" = 0 ] && "$PY" -c "import tensorrt, pycuda.driver, onnx, onnxconverter_common" \
      > /dev/null 2>&1; then
    cached pip-tensorrt "tensorrt and pycuda already import in .venv"
  else
    if [ "$DRY_RUN" = 1 ]; then
      spec="${TRT_SPEC:-tensorrt-cu<cuda-major> (scripts/gpu/gpucheck.py trt-spec)}"
      runtime_spec="nvidia-cuda-runtime-cu<cuda-major>"
    else
      spec="${TRT_SPEC:-$("$PY" "$HELPER" trt-spec --cuda-major "$CUDA_MAJOR")}" \
        || die "no TensorRT wheel for CUDA $CUDA_MAJOR (set TRT_SPEC)"
      runtime_spec="$("$PY" "$HELPER" cuda-runtime-spec --cuda-major "$CUDA_MAJOR")"
    fi
    run_step pip-tensorrt "$limit" "$PY" -m pip install --quiet "$spec" "$runtime_spec" \
      || die "pip could not install $spec${JETSON:+ (on a Jetson, TensorRT comes with JetPack)}"
    # pycuda builds from source: a C++ compiler and Python's headers.
    if [ "$DRY_RUN" = 1 ] || ! command -v g++ > /dev/null 2>&1 \
        || ! "$PY" -c "import sysconfig, os, sys; sys.exit(not os.path.exists(
             os.path.join(sysconfig.get_paths()['include'], 'Python.h')))"; then
      if [ "$DRY_RUN" = 1 ] || { [ "$(id -u)" = 0 ] && command -v apt-get > /dev/null; }; then
        run_step apt-build-tools "$limit" env DEBIAN_FRONTEND=noninteractive \
          apt-get install -y -qq --no-install-recommends g++ python3-dev \
          || die "cannot install g++/python3-dev (needed to build pycuda)"
      else
        die "pycuda needs g++ and python3-dev: install them (apt-get install g++ python3-dev)"
      fi
    fi
    if [ "$DRY_RUN" = 0 ] && nvcc="$(find_nvcc)"; then
      log "CUDA toolkit found ($nvcc): pycuda builds against it"
      run_step pip-gpu-extra "$limit" env PATH="$(dirname "$nvcc"):$PATH" \
        "$PY" -m pip install --quiet -e ".[gpu]" || die "pip could not install the gpu extra"
    else
      # No toolkit (driver-only images): build pycuda from pip's cuda.h and the driver's libcuda.
      run_step pycuda-home 60 "$PY" "$HELPER" pycuda-home --home "$WORK/pycuda-home" \
        || die "cannot prepare a pycuda build without the CUDA toolkit"
      run_step pip-gpu-extra "$limit" env HOME="$WORK/pycuda-home" \
        "$PY" -m pip install --quiet -e ".[gpu]" || die "pip could not install the gpu extra"
    fi
  fi
  run_step versions 120 "$PY" "$HELPER" versions --out "$PART/versions.json" \
    || die "TensorRT or CUDA does not start (see logs/versions.log)"
  if [ "$DRY_RUN" = 0 ] && ! "$PY" -c "import json, sys; sys.exit(not json.load(open(
      '$PART/versions.json'))['tensorrt_weak_typing'])"; then
    # TensorRT 11+: INT8 goes through NVIDIA ModelOpt's Q/DQ conversion (tensorrt_runtime.py).
    run_step pip-modelopt "$limit" "$PY" -m pip install --quiet "nvidia-modelopt[onnx]" || true
  fi
}

# ---- check mode ----

wants() {  # is this model in CHECK_MODELS?
  local m
  for m in "${MODELS[@]}"; do [ "$m" = "$1" ] && return 0; done
  return 1
}

prepare_inputs() {
  local size n scale model pkg pt onnx sizes=()
  if wants demo; then sizes+=(256); fi
  if wants yolov8n-seg || wants yolov8s-seg; then sizes+=(640); fi
  for size in "${sizes[@]}"; do
    n=160; [ "$size" = 640 ] && n=120
    if [ "$DRY_RUN" = 0 ] && [ -f "$WORK/synth$size/data.yaml" ]; then
      cached "synth-$size" "$WORK/synth$size"
    else
      run_step "synth-$size" 300 "$EDGE" model synth --out "$WORK/synth$size" --n "$n" \
        --seed 11 --size "$size" --fractions 0.5,0,0.5 || die "edge model synth failed"
    fi
  done
  for scale in n s; do
    model="yolov8$scale-seg"
    wants "$model" || continue
    pkg="$WORK/packages/$model"
    pt="$WORK/random/$model.pt"
    onnx="$WORK/random/$model-640.onnx"
    if [ "$DRY_RUN" = 0 ] && "$EDGE" model verify "$pkg" > /dev/null 2>&1; then
      cached "package-$model" "$pkg verifies"
      continue
    fi
    if ! { run_step "random-$model" 300 "$PY" "$HELPER" random-model --scale "$scale" --nc 4 \
             --out "$pt" \
           && run_step "export-$model" 600 "$EDGE" model export --weights "$pt" --out "$onnx" \
             --imgsz 640 \
           && run_step "package-$model" 300 "$EDGE" model package --model "$onnx" \
             --data "$WORK/synth640/data.yaml" --out "$pkg" --name "$model-random" \
             --version 0.0.0 --plc-model-id 900 --no-gate --stats-max 0 --overwrite; }; then
      log "no $model package: its builds and compares are skipped"
    fi
  done
}

package_of() {
  if [ "$1" = demo ]; then echo "$DEMO_PKG"; else echo "$WORK/packages/$1"; fi
}

synth_of() {
  if [ "$1" = demo ]; then echo "$WORK/synth256"; else echo "$WORK/synth640"; fi
}

check_mode() {
  local model prec pkg engine cal min n per_bench yaml logf bench_reserve
  if [ "$DRY_RUN" = 0 ]; then
    if ! { mkdir -p "$WORK/engines" && touch "$WORK/engines/.write-probe"; }; then
      die "the engine cache $WORK/engines is not writable"
    fi
    rm -f "$WORK/engines/.write-probe"
  fi
  DEADLINE=$(( $(date +%s) + TIMEOUT_MIN * 60 ))
  # Keep back the bench's time while building and comparing: the bench is the headline. One
  # `edge bench` run is the daemon phase, two bare session.run phases of max(5, D/2) s and ~25 s
  # of start-up (workers deserialising the engine, the PLC simulator, the CDF plot).
  n=0; for _ in $BENCH_CAMERAS; do n=$(( n + 1 )); done
  per_bench=$(( BENCH_DURATION + 2 * (BENCH_DURATION / 2 > 5 ? BENCH_DURATION / 2 : 5) + 25 ))
  bench_reserve=$(( n * per_bench ))
  RESERVE=$bench_reserve
  if [ "$DRY_RUN" = 1 ]; then
    printf '[plan] check budget: %s min from here, %ss of it kept for the bench' \
      "$TIMEOUT_MIN" "$bench_reserve"
    printf ' (ENGINE_TIMEOUT_S=%s)\n' "$ENGINE_TIMEOUT_S"
  fi

  prepare_inputs

  for model in "${MODELS[@]}"; do
    pkg="$(package_of "$model")"
    for prec in "${PRECISIONS[@]}"; do
      engine="$WORK/engines/$model-$prec.engine"
      if [ "$DRY_RUN" = 0 ] && [ ! -f "$pkg/manifest.json" ]; then
        skip "build-$model-$prec" "no package $pkg"
        continue
      fi
      rm -f "$engine" "$engine.json"
      # The bench's own engine may use the bench's reserve; the others may not.
      if [ "$model-$prec" = demo-fp16 ]; then RESERVE=0; else RESERVE=$bench_reserve; fi
      if [ "$prec" = int8 ]; then
        cal="$WORK/engines/$model-int8.calib"
        rm -f "$cal"  # calibrate in every run: the cache is what is being checked
        run_step "build-$model-$prec" "$ENGINE_TIMEOUT_S" "$EDGE" model build-engine \
          --package "$pkg" --precision int8 --out "$engine" \
          --calibration-images "$(synth_of "$model")/images/train" --calibration-cache "$cal" \
          || true
      else
        run_step "build-$model-$prec" "$ENGINE_TIMEOUT_S" "$EDGE" model build-engine \
          --package "$pkg" --precision "$prec" --out "$engine" || true
      fi
    done
  done

  for model in "${MODELS[@]}"; do
    pkg="$(package_of "$model")"
    for prec in "${PRECISIONS[@]}"; do
      engine="$WORK/engines/$model-$prec.engine"
      if [ "$DRY_RUN" = 0 ] && [ ! -f "$engine.json" ]; then
        skip "compare-$model-$prec" "no engine $engine"
        continue
      fi
      if [ "$model-$prec" = demo-fp16 ]; then RESERVE=0; else RESERVE=$bench_reserve; fi
      min=0  # random weights: agreement is reported, not gated
      if [ "$model" = demo ]; then
        if [ "$prec" = int8 ]; then min=$MIN_AGREEMENT_INT8; else min=$MIN_AGREEMENT_FP16; fi
      fi
      run_step "compare-$model-$prec" 300 "$PY" "$HELPER" compare --package "$pkg" \
        --data "$(synth_of "$model")/data.yaml" --split test --limit "$COMPARE_IMAGES" \
        --engine "$engine" --precision "$prec" --min-agreement "$min" --name "$model" \
        --out "$PART/compare/$model-$prec.json" || true
      if [ "$DRY_RUN" = 0 ]; then
        grep -h 'decides like' "$PART/logs/compare-$model-$prec.log" | sed 's/^/    /' >&2 || true
      fi
    done
  done

  RESERVE=0
  yaml="$WORK/line-tensorrt.yaml"
  engine="$WORK/engines/demo-fp16.engine"
  # The compare loaded that engine with build_if_missing off, as the bench will: when it could
  # not, the daemon's workers would only retry until the step's timeout.
  if [ "$DRY_RUN" = 0 ] && [ ! -f "$PART/compare/demo-fp16.json" ]; then
    for n in $BENCH_CAMERAS; do
      skip "bench-${n}cam" "the demo FP16 engine was not built or did not load (compare-demo-fp16)"
    done
  elif run_step line-yaml 120 "$PY" "$HELPER" line-yaml --package "$DEMO_PKG" \
      --engine "$engine" --precision fp16 --samples "$DEMO_SAMPLES" --spool "$WORK/spool" \
      --workers "$BENCH_WORKERS" --cache-dir "$WORK/engines" --out "$yaml"; then
    for n in $BENCH_CAMERAS; do
      run_step "bench-${n}cam" "$(( 2 * per_bench ))" "$EDGE" bench --config "$yaml" \
        --rate "$BENCH_RATE" --cameras "$n" --duration "$BENCH_DURATION" \
        --workers "$BENCH_WORKERS" --out "$PART/bench/${n}cam" || true
      if [ "$DRY_RUN" = 0 ]; then
        logf="$PART/logs/bench-${n}cam.log"
        grep -E '^(daemon|paced|end-to-end)' "$logf" | sed 's/^/    /' >&2 || true
      fi
    done
  fi

  if [ "$DRY_RUN" = 1 ]; then
    printf '[plan] bench-table: %s %s bench-table %s/bench/*/bench.json\n' "$PY" "$HELPER" "$PART"
    printf '[plan] summary: %s/summary.json, then %s is renamed to %s\n' "$PART" "$PART" "$OUT"
    return 0
  fi
  if compgen -G "$PART/bench/*/bench.json" > /dev/null; then
    echo
    echo "TensorRT bench, demo package FP16 on $(head -n 1 "$PART/nvidia-smi-query.csv"):"
    "$PY" "$HELPER" bench-table "$PART"/bench/*/bench.json --json "$PART/bench-table.json" \
      | tee "$PART/bench-table.md"
    echo
  fi
  finish finished
}

# ---- train mode ----

train_mode() {
  local mt="$WORK/magnetic-tile-640"
  DEADLINE=$(( $(date +%s) + TIMEOUT_MIN * 60 ))
  if [ "$DRY_RUN" = 1 ]; then
    printf '[plan] training budget: %s min\n' "$TIMEOUT_MIN"
  fi
  run_step torch-cuda 120 "$PY" -c "import torch, sys; ok = torch.cuda.is_available(); \
print('torch', torch.__version__, 'CUDA', torch.version.cuda, 'available', ok, \
torch.cuda.get_device_name(0) if ok else ''); sys.exit(0 if ok else 1)" \
    || die "torch cannot use the GPU: see logs/torch-cuda.log (torch 2.14.1 from PyPI is a CUDA 13
build that needs driver >= 580; on an older driver install the torch build for its CUDA)"
  # The existing recipe script, with the design's hyperparameters (models/training/recipe.py
  # defaults: lr0 0.00232, batch 64, 50 epochs, warm-up 3, mosaic off for the last 10) at the
  # native 640 px, yolov8n-seg, split by tile group (convert-magnetic-tile), no time cap.
  run_step train-report "$(( TIMEOUT_MIN * 60 ))" env PATH="$ROOT/.venv/bin:$PATH" \
    SRC="$SRC" WORK="$mt" DEVICE="$TRAIN_DEVICE" SCALE=n SIZE=640 HOURS= \
    EPOCHS="$TRAIN_EPOCHS" BATCH="$TRAIN_BATCH" LR0=0.00232 WARMUP=3 CLOSE_MOSAIC=10 \
    scripts/make_magnetic_tile_report.sh || true
  if [ "$DRY_RUN" = 1 ]; then
    printf '[plan] report: %s -m models.training.report %s/eval.json > %s/report.md\n' \
      "$PY" "$mt" "$PART"
    printf '[plan] summary: %s/summary.json, then %s is renamed to %s\n' "$PART" "$PART" "$OUT"
    return 0
  fi
  if [ -f "$mt/eval.json" ]; then
    cp "$mt/eval.json" "$PART/eval.json"
    cp "$mt/runs/mt/recipe.json" "$PART/recipe.json" 2> /dev/null || true
    "$PY" -m models.training.report "$mt/eval.json" | tee "$PART/report.md"
  fi
  finish finished
}

# ---- main ----

if [ "$DRY_RUN" = 1 ]; then
  echo "gpu_check --mode $MODE --out $OUT --timeout-min $TIMEOUT_MIN (dry run: nothing is run)"
fi
preflight_gpu
setup_venv
gpu_facts
if [ "$MODE" = check ]; then
  setup_tensorrt
  check_mode
else
  train_mode
fi
if [ "$DRY_RUN" = 1 ]; then exit 0; fi
