#!/usr/bin/env bash
# make demo: the paper's claim in a few minutes on a CPU. A small ViT (vit_pico, 0.3 M parameters) learns from the
# shipped Fashion-MNIST DINO teacher (vit_nano, trained by reproduce/train_teachers.sh) with RoB-DINO; the same ViT
# learns with plain DINO for the same budget (the reproduction's, seed 0); the teacher and both students are
# evaluated by k-NN on the 10,000 test images.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/demo}; TEACHER=${TEACHER:-assets/fmnist_dino_vit_nano.pth}; EPOCHS=${EPOCHS:-3}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
# the same budget for both students: EPOCHS epochs of 100 steps of 128 images from a 12,800-image subset
DATA="--student vit_pico --data_path fashion-mnist --gpu_augment --num_workers 1 --global_crops_size 28
      --local_crops_size 14 --local_crops_number 4 --global_crops_scale 0.4 1 --local_crops_scale 0.1 0.4
      --patch_size 7 --drop_path_rate 0 --subset 12800 --batch_size_per_gpu 128 --lr 2e-3 --epochs $EPOCHS
      --warmup_epochs 1 --hidden_dim 512 --bottleneck_dim 128"
python rob_dino.py $DATA --teacher $TEACHER --output_dir $OUT/rob_dino_student
python rob_dino.py $DATA --teacher ema --out_dim 4096 --warmup_teacher_temp_epochs 1 --output_dir $OUT/plain_dino_student
for run in dino_teacher:$TEACHER rob_dino_student:$OUT/rob_dino_student/checkpoint.pth \
           plain_dino_student:$OUT/plain_dino_student/checkpoint.pth; do
  IFS=: read -r name checkpoint <<< "$run"
  [ -s $OUT/$name/eval_log.txt ] || python eval_linear.py --checkpoint $checkpoint --data_path fashion-mnist \
    --img_size 28 --knn --nb_knn 20 --batch_size_per_gpu 500 --num_workers 1 --output_dir $OUT/$name > /dev/null
  echo "$name: k-NN top-1 (k 20) $(python -c "import json,sys; print(json.loads(open(sys.argv[1]).readlines()[-1])['knn']['20']['top1'])" $OUT/$name/eval_log.txt)"
done
echo
echo "Same claim, full scale (ImageNet, 8 GPUs): torchrun --nproc_per_node=8 rob_dino.py --student vit_tiny" \
     "--teacher dino_vitb16 --data_path /data/imagenet/train --output_dir out/dino"
