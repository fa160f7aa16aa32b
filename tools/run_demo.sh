#!/usr/bin/env bash
# The whole pipeline on synthetic data, on any machine (a CPU is enough):
#   1. set up .venv (tools/setup_env.sh; seconds when it is already there),
#   2. write the toy shapes dataset in COCO and ADE20K layouts to data/toy,
#   3. train ResTv2-T Mask R-CNN and ResTv2-T UperNet on it from scratch,
#   4. evaluate both with the toolboxes' metrics and save pictures of the predictions,
#   5. print bbox AP, segm AP and mIoU.
#
#   bash tools/run_demo.sh
#
# 15 to 20 minutes on 2 CPU cores after set-up (longer on a busy machine). DEMO_DIR (default
# work_dirs/demo) receives the logs, checkpoints, metrics and pictures.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
DEMO_DIR=${DEMO_DIR:-work_dirs/demo}
PY="$ROOT/.venv/bin/python"
export PYTHONWARNINGS=${PYTHONWARNINGS:-ignore}

stage() { printf '\n[demo] %s\n' "$*"; }
elapsed() { echo $(( $(date +%s) - START )); }

bash tools/setup_env.sh
START=$(date +%s)

stage "1/5 toy dataset -> data/toy"
"$PY" tools/make_toy_data.py data/toy --kind both --num-train 200 --num-val 50 --size 128 \
    --seed 0

rm -rf "$DEMO_DIR"
DET_CFG=configs/toy/maskrcnn_restv2_t_toy.py
SEG_CFG=configs/toy/upernet_restv2_t_toy.py
DET_DIR="$DEMO_DIR/maskrcnn"
SEG_DIR="$DEMO_DIR/upernet"

stage "2/5 training Mask R-CNN (ResTv2-T, from scratch) -> $DET_DIR  [$(elapsed) s]"
"$PY" tools/train.py "$DET_CFG" --work-dir "$DET_DIR" \
    --cfg-options val_dataloader=None val_cfg=None val_evaluator=None
stage "3/5 testing Mask R-CNN  [$(elapsed) s]"
"$PY" tools/test.py "$DET_CFG" "$(cat "$DET_DIR/last_checkpoint")" --work-dir "$DET_DIR" \
    --show-dir "$DET_DIR/pictures"

stage "4/5 training UperNet (ResTv2-T, from scratch) -> $SEG_DIR  [$(elapsed) s]"
"$PY" tools/train.py "$SEG_CFG" --work-dir "$SEG_DIR" \
    --cfg-options val_dataloader=None val_cfg=None val_evaluator=None
stage "5/5 testing UperNet  [$(elapsed) s]"
"$PY" tools/test.py "$SEG_CFG" "$(cat "$SEG_DIR/last_checkpoint")" --work-dir "$SEG_DIR" \
    --show-dir "$SEG_DIR/pictures"

"$PY" - "$DET_DIR" "$SEG_DIR" "$(elapsed)" <<'EOF'
import glob
import json
import os.path as osp
import sys

import cv2
import numpy as np

det_dir, seg_dir, seconds = sys.argv[1], sys.argv[2], int(sys.argv[3])


def background_only_miou(num_classes=6):
    """mIoU of a model that predicts 'background' for every pixel of the toy val set."""
    pattern = 'data/toy/ade/ADEChallengeData2016/annotations/validation/*.png'
    labels = np.concatenate([cv2.imread(p, cv2.IMREAD_UNCHANGED).ravel()
                             for p in sorted(glob.glob(pattern))])
    labels = labels[labels > 0]  # 0 is ignored (reduce_zero_label)
    return 100 * np.mean(labels == 1) / num_classes
det = json.load(open(osp.join(det_dir, 'test_metrics.json')))['metrics']
seg = json.load(open(osp.join(seg_dir, 'test_metrics.json')))['metrics']
det_pics = sorted(glob.glob(osp.join(det_dir, 'pictures', '*.jpg')))
seg_pics = sorted(glob.glob(osp.join(seg_dir, 'pictures', 'vis_data', 'vis_image', '*.png')))
print('\n' + '=' * 72)
print('ResTv2-T on the toy shapes (trained from scratch, 50 validation images)')
print(f'  Mask R-CNN  bbox AP {100 * det["coco/bbox_mAP"]:5.1f}   '
      f'(AP50 {100 * det["coco/bbox_mAP_50"]:.1f})')
print(f'              segm AP {100 * det["coco/segm_mAP"]:5.1f}   '
      f'(AP50 {100 * det["coco/segm_mAP_50"]:.1f})')
print(f'  UperNet     mIoU    {seg["mIoU"]:5.1f}   (aAcc {seg["aAcc"]:.1f}, '
      f'mAcc {seg["mAcc"]:.1f}; all-background prediction: mIoU '
      f'{background_only_miou():.1f})')
print(f'  pictures of the predictions: {det_pics[0] if det_pics else "-"}')
print(f'                               {seg_pics[0] if seg_pics else "-"}')
print(f'  (all {len(det_pics)} + {len(seg_pics)} in {osp.dirname(det_pics[0]) if det_pics else "-"}'
      f' and {osp.dirname(seg_pics[0]) if seg_pics else "-"})')
print(f'  metrics: {osp.join(det_dir, "test_metrics.json")}, '
      f'{osp.join(seg_dir, "test_metrics.json")}')
print(f'  wall time after set-up: {seconds // 60} min {seconds % 60} s')
print('=' * 72)
EOF
