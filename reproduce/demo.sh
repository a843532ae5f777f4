#!/usr/bin/env bash
# make demo: the paper's claim in a few minutes on a CPU. A small ViT (vit_pico, 0.3 M parameters) learns from
# the shipped Fashion-MNIST DINO teacher (vit_nano, trained by reproduce/fashion_mnist.sh) with RoB-DINO; the same
# ViT learns with plain DINO for the same budget; the teacher and both students are evaluated by k-NN.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/demo}; TEACHER=${TEACHER:-assets/fmnist_dino_vit_nano.pth}
# the same budget for both students: 3 epochs of a 12,800-image subset, batch 128 (300 steps)
DATA="--data_path fashion-mnist --subset ${SUBSET:-12800} --epochs ${EPOCHS:-3} --warmup_epochs 1 --gpu_augment
      --num_workers 1 --global_crops_size 28 --local_crops_size 14 --local_crops_number 4 --global_crops_scale 0.4 1
      --local_crops_scale 0.1 0.4 --patch_size 7 --batch_size_per_gpu 128 --drop_path_rate 0 --lr 2e-3"
python rob_dino.py --student vit_pico --teacher $TEACHER $DATA --output_dir $OUT/rob_dino_student
python rob_dino.py --student vit_pico --teacher ema --out_dim 4096 --hidden_dim 512 --bottleneck_dim 128 \
  --warmup_teacher_temp_epochs 1 $DATA --output_dir $OUT/plain_dino_student
mkdir -p $OUT/dino_teacher
for run in dino_teacher:$TEACHER:teacher rob_dino_student:$OUT/rob_dino_student/checkpoint.pth:student \
           plain_dino_student:$OUT/plain_dino_student/checkpoint.pth:student; do
  IFS=: read -r name checkpoint key <<< "$run"
  python eval_linear.py --checkpoint $checkpoint --checkpoint_key $key --data_path fashion-mnist --img_size 28 \
    --knn --nb_knn 20 --batch_size_per_gpu 500 --num_workers 1 --output_dir $OUT/$name | grep -v "^{"
done
echo
python reproduce/table.py $OUT/dino_teacher $OUT/rob_dino_student $OUT/plain_dino_student
echo
echo "Same claim, full scale (ImageNet, 8 GPUs): torchrun --nproc_per_node=8 rob_dino.py --student vit_tiny" \
     "--teacher dino_vitb16 --data_path /data/imagenet/train --output_dir out/dino"
