#!/usr/bin/env bash
# Reproduce the bundled demo model (models/demo/package) end to end, offline, on CPU.
#
#   scripts/make_demo_model.sh            # ~55-60 min on a 2-core machine
#   HOURS=0.1 HOURS2=0.05 N=300 PACKAGE_FLAGS=--no-gate scripts/make_demo_model.sh  # quick, weak
#
# Two training stages: from scratch at the design's lr0 for $HOURS, then a fine-tune from that
# checkpoint at a lower lr0 for $HOURS2 (a fresh warm-up + decay). One 50-minute stage would do
# as well; the published model was made this way because stage 1 alone missed the recall gate
# (test recall 0.942 < 0.95) and was continued.
#
# Needs the `train` extra (pip install -e '.[train]'). Every step is seeded; training on CPU is
# deterministic per machine but not bit-identical across CPUs/torch builds, so the metrics
# reproduce approximately, not to the last digit. Intermediate files go to $WORK (git-ignored).
set -euo pipefail
cd "$(dirname "$0")/.."

WORK=${WORK:-var/demo-model}
SEED=${SEED:-2026}          # data set seed
N=${N:-1500}                # images (70/15/15 train/val/test)
SIZE=${SIZE:-256}           # image and network input size
HOURS=${HOURS:-0.5}         # stage-1 wall-clock budget; the epoch count is fixed once from it
HOURS2=${HOURS2:-0.33}      # stage-2 (fine-tune) budget
LR2=${LR2:-0.001}
EPOCHS=${EPOCHS:-300}       # upper bound on epochs (the time budget usually ends first)
BATCH=${BATCH:-16}
LR0=${LR0:-0.00232}
RECALL=${RECALL:-0.97}      # recall target for the operating point, on the validation split:
                            # 2 points above the gate's 0.95 so the test recall has a margin for
                            # sampling noise (~120-240 defects per split). With 0.95 the val
                            # threshold sat on the edge and the original test split got 0.933.
HOLDOUT_SEED=${HOLDOUT_SEED:-2027}
HOLDOUT_N=${HOLDOUT_N:-500}
VERSION=${VERSION:-$(date -u +%Y.%m.%d)}
OUT=${OUT:-models/demo/package}
EDGE_MODEL=${EDGE_MODEL:-"python -m edge model"}
NICE=${NICE:-"nice -n 10"}

mkdir -p "$WORK"
$EDGE_MODEL synth --out "$WORK/data" --n "$N" --seed "$SEED" --size "$SIZE"
$NICE $EDGE_MODEL train --data "$WORK/data/data.yaml" --scale p --imgsz "$SIZE" \
    --epochs "$EPOCHS" --hours "$HOURS" --batch "$BATCH" --lr0 "$LR0" --warmup-epochs 1 \
    --close-mosaic 5 --no-val --project "$WORK/runs" --name demo
$NICE $EDGE_MODEL train --data "$WORK/data/data.yaml" --scale p --imgsz "$SIZE" \
    --epochs "$EPOCHS" --hours "$HOURS2" --batch "$BATCH" --lr0 "$LR2" --warmup-epochs 1 \
    --close-mosaic 5 --no-val --project "$WORK/runs" --name demo2 \
    --weights "$WORK/runs/demo/weights/last.pt"
$EDGE_MODEL export --weights "$WORK/runs/demo2/weights/best.pt" --out "$WORK/model.onnx" --imgsz "$SIZE"
# The gate judges a FRESH hold-out set (another seed, never seen by training or by any choice made
# while building this recipe); the threshold is chosen on the training set's val split.
$EDGE_MODEL synth --out "$WORK/holdout" --n "$HOLDOUT_N" --seed "$HOLDOUT_SEED" --size "$SIZE" \
    --fractions 0,0,1
python - "$WORK" <<'PY'
import sys
from pathlib import Path
from models.datasets.yolo import write_data_yaml
from models.synth import CLASSES
work = Path(sys.argv[1]).resolve()
write_data_yaml(work / "data", CLASSES, {"test": str(work / "holdout" / "images" / "test")},
                filename="../eval-data.yaml")
PY
$NICE $EDGE_MODEL evaluate --model "$WORK/model.onnx" --data "$WORK/eval-data.yaml" \
    --out "$WORK/eval.json" --recall-target "$RECALL"
python - "$WORK" "$SEED" "$N" "$SIZE" <<'PY'
import json, sys
work, seed, n, size = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
s1 = json.load(open(f"{work}/runs/demo/recipe.json"))
s2 = json.load(open(f"{work}/runs/demo2/recipe.json"))
json.dump({
    "data": f"synthetic: models.synth seed={seed} n={n} size={size}x{size} split 70/15/15; "
            f"metrics on a fresh hold-out (seed 2027, 500 images)",
    "recipe": "scripts/make_demo_model.sh",
    "epochs": s1["epochs_done"] + s2["epochs_done"],
    "wall_s": round(s1["wall_s"] + s2["wall_s"], 1),
    "stages": [
        {"epochs": s1["epochs_done"], "wall_s": s1["wall_s"], "hyperparameters": s1["recipe"]},
        {"epochs": s2["epochs_done"], "wall_s": s2["wall_s"], "hyperparameters": s2["recipe"]},
    ],
}, open(f"{work}/training.json", "w"), indent=2)
PY
# The package command refuses a model that failed the gate (exit 1): nothing is replaced then.
# It seals the package (package.digest: sha256 over manifest + files, see models/package.py) and
# records the drift baseline from the data set's val split (validation_stats.json); the
# committed 1.0.0 predates both and was sealed in place with `edge model repackage`.
# Add --sign KEY to sign it (edge model keygen).
$EDGE_MODEL package --model "$WORK/model.onnx" --eval "$WORK/eval.json" --out "$OUT" \
    --name synth-demo --version "$VERSION" --plc-model-id 1 \
    --training-json "$WORK/training.json" --overwrite ${PACKAGE_FLAGS:-}
python -m models.synth.samples models/demo/samples
echo "demo model written to $OUT"
