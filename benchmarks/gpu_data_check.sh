#!/usr/bin/env bash
# The data-pipeline part of benchmarks/gpu_check.sh alone: JPEG folder, CPU path and --gpu_augment end to
# end, and the synthetic --benchmark at the same settings, in one run.  Usage: bash benchmarks/gpu_data_check.sh OUT_DIR
set -u
OUT=${1:-bench_out}; mkdir -p "$OUT"; LOG="$OUT/gpu_data_check.log"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
B=128; IMG=2000; W=16; G=224; L=96; EPOCHS=4; N=15
if [ "${SMALL:-0}" = 1 ]; then B=4; IMG=48; W=2; G=32; L=16; EPOCHS=2; N=2; fi
run() { local limit=$1; shift; echo "### $*" | tee -a "$LOG"; timeout "$limit" "$@" 2>&1 | grep -v "it/s\]" | grep -v "^[a-z_]*: " | tee -a "$LOG"; }
DATA=/tmp/jpegs; TEACHER=/tmp/dino_vitb16_random_full_checkpoint.pth
run 60 python3 benchmarks/make_data.py --folder $DATA --images $IMG --teacher $TEACHER --batch $B
E2E="--student vit_tiny --teacher $TEACHER --data_path $DATA --batch_size_per_gpu $B --num_workers $W --global_crops_size $G --local_crops_size $L --warmup_epochs 0 --saveckp_freq 0"
run 60 python3 rob_dino.py $E2E --epochs 1 --output_dir /tmp/e2e_cpu
run 110 python3 rob_dino.py $E2E --epochs $EPOCHS --gpu_augment --compile --output_dir /tmp/e2e_gpu
for d in e2e_cpu e2e_gpu; do echo "### $d log.txt"; cat /tmp/$d/log.txt; done 2>&1 | tee -a "$LOG"
run 80 python3 rob_dino.py --student vit_tiny --teacher dino_vitb16 --batch_size_per_gpu $B --benchmark $N --global_crops_size $G --local_crops_size $L --compile
