#!/usr/bin/env bash
# The Fashion-MNIST teachers of the reproduction (README "Reproduction on Fashion-MNIST"): each method's plain
# baseline trains vit_nano (128 wide, 6 blocks, patch 7) on the 60,000 training images with a checkpoint per
# epoch; reproduce/curve.py --key teacher then scores epochs by k-NN and export_teacher.py slims the shipped epoch
# into assets/fmnist_<method>_vit_nano.pth (fp16). The shipped teachers, as trained (each to the end of its
# schedule, where its k-NN had stopped rising; README "Teachers"):
#   EPOCHS="ibot=14 msn=18" JOBS=2 bash reproduce/train_teachers.sh ibot msn
#   bash reproduce/train_teachers.sh swav      # 5 epochs
#   bash reproduce/train_teachers.sh dino      # 8 epochs, teacher temperature 0.04 throughout (see below)
# The iBOT and MSN teachers shipped until 2026-12-01 stopped part-way, at epochs 6 and 10 of the same schedules:
#   EPOCHS="ibot=14 msn=18" UNTIL="ibot=6 msn=10" JOBS=2 bash reproduce/train_teachers.sh ibot msn
# An iBOT teacher at 0.04 throughout was tried and is not shipped: its students came out weaker (README):
#   EPOCHS="ibot=6" UNTIL="ibot=6" EXTRA="--teacher_temp 0.04 --teacher_patch_temp 0.04" bash reproduce/train_teachers.sh ibot
# EPOCHS: the schedule's length (one number for all, or method=epochs pairs). UNTIL: method=epoch pairs that stop
# a teacher early (a SIGTERM once that epoch's checkpoint exists) and ship that epoch: its schedules (lr, wd,
# EMA momentum) are still those of EPOCHS; by default every teacher trains to the end of its schedule. JOBS: runs
# side by side (on a CPU: one thread each). POINTS: epochs scored for the curve (0: all). Runs resume if
# interrupted (same command). RUNS (default runs/fashion_mnist) holds them; ASSETS (default assets) receives the
# teachers; EXTRA adds flags to every training run.
set -uo pipefail
cd "$(dirname "$0")/.."
RUNS=${RUNS:-runs/fashion_mnist}; ASSETS=${ASSETS:-assets}; PY=${PYTHON:-python3}; JOBS=${JOBS:-4}
METHODS=${*:-ibot msn dino swav}; EPOCHS=${EPOCHS:-"ibot=14 msn=18 dino=8 swav=5"}; UNTIL=${UNTIL:-}
POINTS=${POINTS:-0}
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
$PY -c "import torch, sys; sys.exit(not torch.cuda.is_available())" 2>/dev/null || export OMP_NUM_THREADS=1
# 28 px images, patch 7 (4x4 tokens; the 14 px local crops 2x2), batched augmentation
DATA="--data_path fashion-mnist --gpu_augment --num_workers 1 --global_crops_size 28 --local_crops_size 14
      --local_crops_number 4 --global_crops_scale 0.4 1 --local_crops_scale 0.1 0.4 --patch_size 7
      --batch_size_per_gpu 256 --drop_path_rate 0 --lr 1e-3 --saveckp_freq 1"
declare -A PLAIN=([dino]=ema [ibot]=ema [msn]=ema [swav]=self)
declare -A HEAD=(  # heads sized for a 128-wide backbone
  [dino]="--out_dim 4096 --hidden_dim 512 --bottleneck_dim 128"
  [ibot]="--out_dim 4096 --patch_out_dim 4096 --hidden_dim 512 --bottleneck_dim 128"
  [msn]="--out_dim 1024 --hidden_dim 512 --bottleneck_dim 128"
  [swav]="--hidden_mlp 512 --feat_dim 128 --nmb_prototypes 1000 --optimizer adamw")

value_of() {  # $1 "method=n ...", "n" or "" (none), $2 method, $3 default -> that method's n
  local v=$3 pair
  [[ -z $1 || $1 == *=* ]] || v=$1
  for pair in $1; do [ "${pair%%=*}" = "$2" ] && v=${pair#*=}; done
  echo "$v"
}

teacher() {  # $1 method: train, score the epochs, export
  local m=$1 e stop out=$RUNS/$1_teacher; e=$(value_of "$EPOCHS" $1 20); stop=$(value_of "$UNTIL" $1 $e)
  local tenth=$(( e >= 20 ? e / 10 : (e >= 2 ? 1 : 0) ))  # lr warm-up: a tenth of the run
  # teacher temperature: iBOT 0.04 -> 0.07 over 30 % of the run (iBOT's 30 of 100 epochs); DINO 0.04 throughout
  # (the official DINO default): warmed up to 0.07, its loss climbs towards log K and the head goes flat (README)
  local temp=""
  if [ $m = ibot ]; then temp="--warmup_teacher_temp_epochs $(( e * 3 / 10 ))"; fi
  if [ $m = dino ]; then temp="--teacher_temp 0.04"; fi
  local shipped=$out/checkpoint$(printf %04d $stop).pth
  echo "[teachers] $m: epoch $stop of a $e-epoch schedule, started $(date -u +%H:%M)"
  if [ ! -f $shipped ]; then
    $PY rob_$m.py --teacher ${PLAIN[$m]} --student vit_nano $DATA ${HEAD[$m]} --epochs $e --warmup_epochs $tenth \
      $temp --output_dir $out ${EXTRA:-} > $out.log 2>&1 &
    local pid=$!
    while kill -0 $pid 2>/dev/null; do  # stop at epoch $stop: SIGTERM is a clean stop (exit 143)
      [ $stop -lt $e ] && [ -f $shipped ] && kill -TERM $pid 2>/dev/null
      sleep 5
    done
    wait $pid; local rc=$?
    [ -f $shipped ] || { echo "[teachers] $m failed (exit $rc): see $out.log"; return 1; }
  fi
  echo "[teachers] $m trained $(date -u +%H:%M)"
  $PY reproduce/curve.py $out --key teacher --points $POINTS --train_images 60000 > $RUNS/${m}_curve.log 2>&1
  $PY reproduce/export_teacher.py $shipped $ASSETS/fmnist_${m}_vit_nano.pth
  echo "[teachers] $m curve (epoch, k-NN of the backbone, k-NN of the targets):"
  cat $out/teacher_curve.txt
}

mkdir -p $RUNS $ASSETS
for m in $METHODS; do
  while [ "$(jobs -rp | wc -l)" -ge "$JOBS" ]; do wait -n; done
  teacher $m &
done
wait
