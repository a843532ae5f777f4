#!/usr/bin/env bash
# The paper's claim at Fashion-MNIST scale, on a CPU: for each method, a teacher (vit_nano, 1.2 M parameters)
# trained by the plain method (baseline mode) on all 60,000 images, then the same small student (vit_pico, 0.3 M)
# trained for the same short budget (300 steps of 128 images from a 12,800-image subset, as in `make demo`)
# (a) by RoB from that teacher and (b) by the plain method from scratch; all evaluated by k-NN and a linear
# probe (and low-shot for MSN). Every run resumes if interrupted; results land in $RUNS/*/eval_log.txt.
#   bash reproduce/fashion_mnist.sh [dino ibot msn swav]     (README: "Reproduction on Fashion-MNIST")
set -euo pipefail
cd "$(dirname "$0")/.."
RUNS=${RUNS:-runs/fashion_mnist}
# teacher epochs per method (what the shipped assets/fmnist_*_vit_nano.pth were trained with, about 30 to 60
# CPU minutes each)
declare -A TEACHER_EPOCHS=([dino]=8 [ibot]=3 [msn]=3 [swav]=2)
STUDENT="--subset 12800 --epochs 3 --batch_size_per_gpu 128 --lr 2e-3"
# the plain students' schedules fitted to that budget: one epoch of teacher-temperature warm-up (DINO, iBOT) or
# of frozen prototypes (SwAV)
declare -A PLAIN_STUDENT=([dino]="--warmup_teacher_temp_epochs 1" [ibot]="--warmup_teacher_temp_epochs 1" [msn]=""
                         [swav]="--freeze_prototypes_niters 100")
# 28 px images, patch 7: 4x4 tokens for the global crops, 2x2 for the 14 px local crops; batched augmentation
DATA="--data_path fashion-mnist --gpu_augment --num_workers 1 --global_crops_size 28 --local_crops_size 14
      --local_crops_number 4 --global_crops_scale 0.4 1 --local_crops_scale 0.1 0.4 --patch_size 7
      --batch_size_per_gpu 256 --drop_path_rate 0"
# plain-method-only flags: DINO/iBOT's own default teacher temperature (0.04) for these short runs; the RoB
# students keep the recipe's 0.07 for the frozen teacher
declare -A PLAIN_ONLY=([dino]="" [ibot]="--teacher_temp 0.04 --teacher_patch_temp 0.04" [msn]="" [swav]="")
declare -A HEAD=(
  [dino]="--out_dim 4096 --hidden_dim 512 --bottleneck_dim 128 --lr 1e-3 --warmup_teacher_temp_epochs 3"
  [ibot]="--out_dim 4096 --patch_out_dim 4096 --hidden_dim 512 --bottleneck_dim 128 --lr 1e-3 --warmup_teacher_temp_epochs 3"
  [msn]="--out_dim 1024 --hidden_dim 512 --bottleneck_dim 128 --lr 1e-3"
  [swav]="--hidden_mlp 512 --feat_dim 128 --nmb_prototypes 1000 --optimizer adamw --lr 1e-3 --freeze_prototypes_niters 234")
declare -A PLAIN=([dino]=ema [ibot]=ema [msn]=ema [swav]=self)
declare -A TEACHER_KEY=([dino]=teacher [ibot]=teacher [msn]=teacher [swav]=student)  # SwAV trains one network

evaluate() {  # $1 checkpoint, $2 key (student / teacher), $3 output folder, $4 method
  local extra=""; [ "$4" = msn ] && extra="--low_shot"
  python eval_linear.py --checkpoint "$1" --checkpoint_key "$2" --data_path fashion-mnist --img_size 28 \
    --knn --nb_knn 20 --linear --epochs 20 $extra --batch_size_per_gpu 500 --num_workers 1 --output_dir "$3"
}

# (0) the reference: the student at its random initialisation (seed 0), evaluated the same way
if [ ! -f $RUNS/random_init/eval_log.txt ]; then
  mkdir -p $RUNS/random_init
  python -c "import sys, torch, common; torch.manual_seed(0); model, _, arch = common.build_student('vit_pico', 28, 7)
torch.save(dict(method='rob_dino', arch=arch, student={'backbone.' + k: v for k, v in model.state_dict().items()}),
           sys.argv[1])" $RUNS/random_init/checkpoint.pth
  evaluate $RUNS/random_init/checkpoint.pth student $RUNS/random_init msn
fi

for method in "${@:-dino ibot msn swav}"; do
  for m in $method; do
    # (1) the teacher: the plain method, a larger model trained longer
    python rob_$m.py --teacher ${PLAIN[$m]} --student vit_nano $DATA ${HEAD[$m]} ${PLAIN_ONLY[$m]} \
      --epochs ${TEACHER_EPOCHS[$m]} --warmup_epochs 1 --saveckp_freq 1 --output_dir $RUNS/${m}_teacher
    # (2) the small student by RoB from that teacher, (3) the same student by the plain method, same budget
    python rob_$m.py --teacher $RUNS/${m}_teacher/checkpoint.pth --student vit_pico $DATA \
      ${HEAD[$m]} $STUDENT --warmup_epochs 1 --output_dir $RUNS/${m}_rob_student
    python rob_$m.py --teacher ${PLAIN[$m]} --student vit_pico $DATA ${HEAD[$m]} ${PLAIN_ONLY[$m]} $STUDENT \
      ${PLAIN_STUDENT[$m]} --warmup_epochs 1 --output_dir $RUNS/${m}_plain_student
    evaluate $RUNS/${m}_teacher/checkpoint.pth ${TEACHER_KEY[$m]} $RUNS/${m}_teacher $m
    evaluate $RUNS/${m}_rob_student/checkpoint.pth student $RUNS/${m}_rob_student $m
    evaluate $RUNS/${m}_plain_student/checkpoint.pth student $RUNS/${m}_plain_student $m
  done
done
