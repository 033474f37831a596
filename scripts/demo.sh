#!/usr/bin/env bash
# The whole pipeline on a built-in demo, on the CPU, with no token and no dataset:
# synthetic data in the SAR-RARP50 release layout -> frame extraction -> a tiny random DINOv3
# -> run_training.py -> run_inference.py (official score table, visualisations).
#   bash scripts/demo.sh [DEMO_DIR (default: demo)]     DEMO_STEPS=N sets the training budget
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
export HF_HUB_OFFLINE=1 PYTHON=.venv/bin/python
demo=${1:-demo}
steps=${DEMO_STEPS:-300}

[ -d "$demo/sarrarp/train" ] || $PYTHON scripts/make_demo_data.py --output "$demo/sarrarp" --seconds 12
bash scripts/extract_frames.sh "$demo/sarrarp"
[ -f "$demo/tiny-dinov3/config.json" ] || $PYTHON scripts/make_tiny_backbone.py --output "$demo/tiny-dinov3"
rm -rf "$demo/trained-models"  # each demo run trains afresh
$PYTHON run_training.py --data-directory "$demo/sarrarp" --output-directory "$demo/trained-models" \
  --backbone "$demo/tiny-dinov3" --resolution full --max-steps "$steps" --val-every 100 --batch-size 8 \
  --lr 1e-3 --head-lr 3e-4 --warmup-steps 10 --num-workers 2
$PYTHON run_inference.py --data-directory "$demo/sarrarp" --model-directory "$demo/trained-models" \
  --min-component-size 50 --num-workers 2
echo "training curves: $demo/trained-models/training_curves.png"
