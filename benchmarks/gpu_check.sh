#!/usr/bin/env bash
# Every GPU measurement of the performance issues in one run (README "Performance"): the training-step
# benchmark of the four methods and the data pipeline (CPU path vs --gpu_augment) on generated JPEGs.
# Usage: bash benchmarks/gpu_check.sh OUT_DIR   (SMALL=1: tiny sizes, a dry run on CPU)
set -u
OUT=${1:-bench_out}; mkdir -p "$OUT"; LOG="$OUT/gpu_check.log"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
B=128; N=20; IMG=3000; W=16; G=224; L=96; EPOCHS=5
if [ "${SMALL:-0}" = 1 ]; then B=4; N=2; IMG=48; W=2; G=32; L=16; EPOCHS=2; fi
run() { local limit=$1; shift; echo "### $*" | tee -a "$LOG"; timeout "$limit" "$@" 2>&1 | grep -v "it/s\]" | tee -a "$LOG"; }
python3 -c "import torch, torchvision, timm; print('torch', torch.__version__, 'torchvision', torchvision.__version__, 'timm', timm.__version__, torch.cuda.get_device_name() if torch.cuda.is_available() else 'cpu')" | tee -a "$LOG"
VIT="--batch_size_per_gpu $B --benchmark $N --global_crops_size $G --local_crops_size $L"
# RoB-DINO training step: eager (teacher on the main stream / a side stream), compiled
run 100 python3 rob_dino.py --student vit_tiny --teacher dino_vitb16 $VIT --no-overlap_teacher
run 100 python3 rob_dino.py --student vit_tiny --teacher dino_vitb16 $VIT
run 150 python3 rob_dino.py --student vit_tiny --teacher dino_vitb16 $VIT --compile
# data pipeline: generated JPEG folder; CPU path vs --gpu_augment, end to end
DATA=/tmp/jpegs; TEACHER=/tmp/dino_vitb16_random_full_checkpoint.pth
run 100 python3 benchmarks/make_data.py --folder $DATA --images $IMG --teacher $TEACHER --batch $B
E2E="--student vit_tiny --teacher $TEACHER --data_path $DATA --batch_size_per_gpu $B --num_workers $W --global_crops_size $G --local_crops_size $L --warmup_epochs 0 --saveckp_freq 0"
run 100 python3 rob_dino.py $E2E --epochs 1 --output_dir /tmp/e2e_cpu
run 150 python3 rob_dino.py $E2E --epochs $EPOCHS --gpu_augment --compile --output_dir /tmp/e2e_gpu
for d in e2e_cpu e2e_gpu; do echo "### $d log.txt"; cat /tmp/$d/log.txt; done 2>&1 | tee -a "$LOG"
# the other methods' training step, eager
run 80 python3 rob_swav.py --student resnet18 --teacher swav_rn50 $VIT
run 80 python3 rob_ibot.py --student vit_tiny --teacher ibot_vitb16 $VIT --local_crops_number 10
run 80 python3 rob_msn.py --student vit_tiny --teacher msn_vitl16 $VIT --local_crops_number 10
grep -h "\[benchmark\]\|\[data\]\|images_per_s" "$LOG" > "$OUT/summary.txt"; cat "$OUT/summary.txt"
