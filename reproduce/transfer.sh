#!/usr/bin/env bash
# The paper's other comparisons at Fashion-MNIST scale (README "Results on Fashion-MNIST"): the students of
# fashion_mnist.sh (RoB and plain per method) and a supervised-KD student (reproduce/supervised.py: vit_pico distilled
# with labels from assets/fmnist_supervised_vit_nano.pth for 1200 steps, the RoB-MSN students' budget and the longest
# of the four, so that no RoB student has more; the same subset, batch, crops and augmentation as the RoB students),
# SEEDS each, and the five teachers, scored on Fashion-MNIST (k-NN k 20 and linear, as fashion_mnist.sh scores them)
# and on the three transfer tasks of reproduce/transfer_tasks.py (k-NN k 20 and the fast linear probe, eval_linear.py's
# defaults otherwise: the protocol fixed with the tasks), then tabulated with the verdicts by transfer_table.py.
#   bash reproduce/transfer.sh      RUNS, SEEDS (default 0 1 2; fashion_mnist.sh's default is 0-4), JOBS, TASKS
# Students already in RUNS are reused, not retrained (fashion_mnist.sh resumes and skips finished runs: the same runs
# as its table when RUNS is the same); a score is redone when its checkpoint is newer. The supervised teacher is
#   python reproduce/supervised.py teacher --epochs 14 --output_dir runs/fashion_mnist/supervised_teacher \
#       --export assets/fmnist_supervised_vit_nano.pth                       (about 1 h on one CPU thread)
set -euo pipefail
cd "$(dirname "$0")/.."
RUNS=${RUNS:-runs/fashion_mnist}; SEEDS=${SEEDS:-0 1 2}; JOBS=${JOBS:-2}; PY=${PYTHON:-python3}
TASKS=${TASKS:-runs/transfer}; METHODS="dino ibot msn swav"; started=$(date +%s); failed=0
export OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
[ -d $TASKS/photos/val ] || $PY reproduce/transfer_tasks.py $TASKS
RUNS=$RUNS SEEDS=$SEEDS JOBS=$JOBS MODES="rob plain" TABLE=0 bash reproduce/fashion_mnist.sh $METHODS  # the students

fmnist() {  # $1 checkpoint, $2 run name, then flags: the supervised arm's Fashion-MNIST scores, as fashion_mnist.sh
  local out=$RUNS/$2   # scores the teachers and students it trains (those are not redone here)
  mkdir -p $out
  [ $out/eval_log.txt -nt $1 ] || $PY eval_linear.py --checkpoint $1 "${@:3}" --data_path fashion-mnist --img_size 28 \
    --knn --nb_knn 20 --linear --epochs 20 --batch_size_per_gpu 500 --num_workers 1 --output_dir $out \
    > $out.eval.log 2>&1 || { echo "[transfer] $out failed: see $out.eval.log"; return 1; }
}

score() {  # $1 checkpoint, $2 run name, then eval_linear flags: each task into RUNS/transfer/<name>/<task>
  local task out
  for task in count distance photos; do
    out=$RUNS/transfer/$2/$task
    mkdir -p $out
    [ $out/eval_log.txt -nt $1 ] || $PY eval_linear.py --checkpoint $1 "${@:3}" --data_path $TASKS/$task \
      --img_size 28 --knn --nb_knn 20 --linear --batch_size_per_gpu 500 --num_workers 1 --output_dir $out \
      > $out.log 2>&1 || { echo "[transfer] $out failed: see $out.log"; return 1; }
  done
  echo "[transfer] $2 scored"
}

kd_student() {  # $1 seed: train (or finish) the supervised-KD student, then score it
  local out=$RUNS/supervised_kd_s$1
  $PY reproduce/supervised.py student --teacher assets/fmnist_supervised_vit_nano.pth --epochs 12 --seed $1 \
    --output_dir $out >> $out.log 2>&1 || { echo "[transfer] $out failed: see $out.log"; return 1; }
  fmnist $out/checkpoint.pth supervised_kd_s$1 --checkpoint_key student && \
    score $out/checkpoint.pth supervised_kd_s$1 --checkpoint_key student
}

wait_for_a_slot() { while [ "$(jobs -rp | wc -l)" -ge "$JOBS" ]; do wait -n || failed=1; done; }
for m in $METHODS; do wait_for_a_slot; score assets/fmnist_${m}_vit_nano.pth ${m}_teacher & done
for seed in $SEEDS; do
  for m in $METHODS; do
    for mode in rob plain; do
      wait_for_a_slot
      score $RUNS/${m}_${mode}_s$seed/checkpoint.pth ${m}_${mode}_s$seed --checkpoint_key student &
    done
  done
done
wait_for_a_slot
{ fmnist assets/fmnist_supervised_vit_nano.pth supervised_teacher && score assets/fmnist_supervised_vit_nano.pth \
  supervised_teacher; } &
for seed in $SEEDS; do wait_for_a_slot; kd_student $seed & done
for job in $(jobs -p); do wait $job || failed=1; done
[ $failed = 0 ] || { echo "[transfer] a run failed (see above): the shipped results are left as they were"; exit 1; }

OUT=reproduce/results/transfer; rm -rf $OUT/scores.new  # shipped: every score's line, the students' training logs
for name in $(for m in $METHODS supervised; do echo ${m}_teacher; done) $(for s in $SEEDS; do
    for m in $METHODS; do echo ${m}_rob_s$s ${m}_plain_s$s; done; echo supervised_kd_s$s; done); do
  for path in $name $(for task in count distance photos; do echo transfer/$name/$task; done); do
    mkdir -p $OUT/scores.new/$path && tail -1 $RUNS/$path/eval_log.txt > $OUT/scores.new/$path/eval_log.txt
  done
  if [ -f $RUNS/$name/log.txt ]; then cp $RUNS/$name/log.txt $OUT/scores.new/$name/; fi
done
$PY reproduce/transfer_table.py $OUT/scores.new $METHODS > $OUT/table.md.new
rm -rf $OUT/scores && mv $OUT/scores.new $OUT/scores && mv $OUT/table.md.new $OUT/table.md && cat $OUT/table.md
echo "[transfer] done in $(( ($(date +%s) - started) / 60 )) min"
