#!/usr/bin/env bash
# Every GPU measurement of the README's Performance section in one run: the training step of the four methods,
# eager and compiled (benchmarks/step.py), RoB-DINO at batch 256, and the data pipeline on generated JPEGs (CPU
# augmentation with 16 workers vs --gpu_augment, end to end, vs the synthetic step of the same configuration).
# Usage: bash benchmarks/gpu_check.sh OUT_DIR   (SMALL=1: tiny sizes, a dry run on CPU)
set -u
cd "$(dirname "$0")/.."
OUT=${1:-bench_out}; mkdir -p "$OUT"; LOG="$OUT/gpu_check.log"; JSON="$OUT/results.jsonl"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
B=128; N=20; IMG=3000; W=16; G=224; L=96; EPOCHS=5; SLOW=1
# on CPU, torch.compile of a ViT-Tiny step alone takes minutes: the limits stretch 5x
if [ "${SMALL:-0}" = 1 ]; then B=4; N=2; IMG=48; W=2; G=32; L=16; EPOCHS=2; SLOW=5; fi
run() { local limit=$(($1 * SLOW)); shift; echo "### $*" | tee -a "$LOG"; timeout "$limit" "$@" 2>&1 | grep -v "it/s\]" | tee -a "$LOG"; }
python3 -c "import torch, torchvision, timm; print('torch', torch.__version__, 'torchvision', torchvision.__version__, 'timm', timm.__version__, torch.cuda.get_device_name() if torch.cuda.is_available() else 'cpu')" | tee -a "$LOG"
CROPS="--global_crops_size $G --local_crops_size $L --steps $N --json $JSON"
# the training step of each method: eager, then compiled
for config in "rob_dino --student vit_tiny --teacher dino_vitb16 --local_crops_number 8" \
              "rob_ibot --student vit_tiny --teacher ibot_vitb16 --local_crops_number 10" \
              "rob_msn --student vit_tiny --teacher msn_vitl16 --local_crops_number 10" \
              "rob_swav --student resnet18 --teacher swav_rn50 --local_crops_number 4"; do
  run 120 python3 benchmarks/step.py $config --batch_size_per_gpu $B $CROPS
  run 200 python3 benchmarks/step.py $config --batch_size_per_gpu $B $CROPS --compile
done
run 200 python3 benchmarks/step.py rob_dino --student vit_tiny --teacher dino_vitb16 --batch_size_per_gpu $((2 * B)) $CROPS --compile
# data pipeline: a generated JPEG folder; the CPU path and --gpu_augment, end to end (log.txt's images/s)
DATA=/tmp/jpegs; TEACHER=/tmp/dino_vitb16_random_full_checkpoint.pth
run 120 python3 benchmarks/make_data.py --folder $DATA --images $IMG --teacher $TEACHER --batch $B
rm -rf /tmp/e2e_cpu /tmp/e2e_gpu  # a leftover output folder would resume, not measure
E2E="--student vit_tiny --teacher $TEACHER --data_path $DATA --batch_size_per_gpu $B --num_workers $W --global_crops_size $G --local_crops_size $L --warmup_epochs 0 --saveckp_freq 0"
run 150 python3 rob_dino.py $E2E --epochs 1 --output_dir /tmp/e2e_cpu
run 200 python3 rob_dino.py $E2E --epochs $EPOCHS --gpu_augment --compile --output_dir /tmp/e2e_gpu
for d in e2e_cpu e2e_gpu; do echo "### $d log.txt"; cat /tmp/$d/log.txt; done 2>&1 | tee -a "$LOG"
grep -h "\[benchmark\]\|\[data\]\|images_per_s" "$LOG" > "$OUT/summary.txt"; cat "$OUT/summary.txt"
