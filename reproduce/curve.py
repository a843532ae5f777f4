"""k-NN accuracy along a run: every checkpointNNNN.pth of a run folder (and the random initialisation, epoch 0),
scored on Fashion-MNIST (the first --train_images training images as memory, the 10,000 test images, 28 px) by
DINO's weighted k-NN (k 20, T 0.07) on the backbone features, as eval_linear.py --knn does.
One JSON line per epoch goes to RUN/curve.txt (existing epochs are skipped).
  --key student: the student of a RoB or plain run (the comparison's curves);
  --key teacher: the network that teaches, loaded as the method's RoB student will load it (the EMA teacher of a
  DINO / iBOT / MSN baseline, a SwAV run's network), also scored on its target distributions (softmax of the head
  at the RoB temperature): is the teacher done learning, and is its head worth distilling?
    python reproduce/curve.py runs/fashion_mnist/dino_teacher --key teacher
    python reproduce/curve.py runs/fashion_mnist/dino_rob_s0 --steps_per_epoch 100"""
import argparse
import importlib
import json
import re
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import common  # noqa: E402
import eval_linear  # noqa: E402


def images_and_labels(train, limit=None, batch=2000):
    """A Fashion-MNIST split as eval_linear.py sees it (28 px, normalised), in memory: its first `limit` images."""
    dataset = eval_linear.build_split("fashion-mnist", train, common.eval_transform(28, resize=28), 28)
    dataset = torch.utils.data.Subset(dataset, range(min(limit or len(dataset), len(dataset))))
    images, labels = zip(*DataLoader(dataset, batch_size=batch, num_workers=1))
    return torch.cat(images), torch.cat(labels)


@torch.no_grad()
def teacher_outputs(method, teacher, images, batch=1000):
    """Backbone features [N, d] and RoB target distributions [N, K] of a teacher."""
    module = importlib.import_module(f"rob_{method}")
    features, targets = [], []
    for x in images.split(batch):
        feature = teacher.backbone(x)
        if method == "dino":
            probs = F.softmax(teacher.head(feature).float() / 0.07, dim=-1)
        elif method == "ibot":  # the CLS output of the iBOT head
            probs = F.softmax(teacher.head(feature, feature[:0])[0].float() / 0.07, dim=-1)
        elif method == "msn":
            probs = module.teacher_probs(teacher.head(feature), teacher.prototypes, 0.025)
        else:  # swav: prototype scores at the RoB epsilon (the codes themselves need a batch: Sinkhorn)
            probs = F.softmax(teacher.head(feature)[1].float() / 0.03, dim=-1)
        features.append(feature.float())
        targets.append(probs)
    return torch.cat(features), torch.cat(targets)


@torch.no_grad()
def features(model, images, batch=1000):
    return torch.cat([model(x).float() for x in images.split(batch)])


def initial_student(ckpt):
    """The run's student backbone at step 0: the scripts seed mix_seed(seed, 0) right before building it."""
    args = argparse.Namespace(**ckpt["args"])
    torch.manual_seed(common.mix_seed(args.seed, 0))
    model, _, _ = common.student_backbone(args.student, args.global_crops_size, args.patch_size,
                                       ckpt["arch"]["kwargs"].get("drop_path_rate", 0.0))
    return model.eval()


def knn(train, test):
    (f_train, y_train), (f_test, y_test) = train, test
    return round(eval_linear.knn_classifier(f_train, y_train, f_test, y_test, [20], 0.07, 10)[20][0], 2)


def score_teacher_file(path, out, train_images):
    """k-NN of a teacher file's backbone as its RoB student loads it, on the curves' memory (done once)."""
    if out.exists():
        return
    method = common.load_file(path)["method"].removeprefix("rob_")
    teacher = importlib.import_module(f"rob_{method}").load_teacher(str(path))
    (x_train, y_train), (x_test, y_test) = images_and_labels(True, train_images), images_and_labels(False)
    with torch.no_grad():
        score = knn((features(teacher.backbone, x_train), y_train), (features(teacher.backbone, x_test), y_test))
    out.write_text(json.dumps(dict(teacher=str(path), train_images=train_images, knn=score)) + "\n")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", help="A run folder of a rob_<method>.py run with checkpointNNNN.pth files.")
    parser.add_argument("--key", default="student", choices=["student", "teacher"])
    parser.add_argument("--points", type=int, default=0, help="Evaluate only this many epochs, evenly spaced, the "
                        "last included (0: all).")
    parser.add_argument("--train_images", type=int, default=10000, help="k-NN memory: the first N training images "
                        "(default 10,000: a point costs a fifth of the full 60,000's; the table's k-NN uses all).")
    parser.add_argument("--steps_per_epoch", type=int, default=None, help="Recorded with each point (default: "
                        "read from the checkpoint).")
    parser.add_argument("--teacher", default=None, help="Only score this teacher file (e.g. the shipped asset) with "
                        "the same memory, into RUN/teacher_knn.txt: the curves' reference line.")
    args = parser.parse_args()
    run = Path(args.run)
    if args.teacher:
        return score_teacher_file(args.teacher, run / "teacher_knn.txt", args.train_images)
    paths = sorted(run.glob("checkpoint[0-9][0-9][0-9][0-9].pth"))
    if not paths:
        raise SystemExit(f"{run} holds no checkpointNNNN.pth (train with --saveckp_freq 1)")
    if args.points and len(paths) > args.points:
        last = len(paths) - 1
        paths = [paths[last - round(i * last / max(args.points - 1, 1))] for i in reversed(range(args.points))]
    torch.set_grad_enabled(False)
    first = common.load_file(paths[-1])
    method = first["method"].removeprefix("rob_")
    steps = args.steps_per_epoch or first.get("iters_per_epoch") or first["step"] // max(first["epoch"], 1)
    train, test = images_and_labels(True, args.train_images), images_and_labels(False)
    out = run / ("curve.txt" if args.key == "student" else "teacher_curve.txt")
    done = {json.loads(line)["epoch"] for line in out.read_text().splitlines()} if out.exists() else set()
    jobs = ([(0, None)] if args.key == "student" else []) + [(int(re.search(r"(\d{4})\.pth$", p.name).group(1)), p)
                                                             for p in paths]
    for epoch, path in jobs:
        if epoch in done:
            continue
        start, record = time.time(), dict(epoch=epoch, step=epoch * steps)
        if args.key == "teacher":
            teacher = importlib.import_module(f"rob_{method}").load_teacher(str(path))
            (f_train, p_train), (f_test, p_test) = (teacher_outputs(method, teacher, x) for x in (train[0], test[0]))
            record.update(knn=knn((f_train, train[1]), (f_test, test[1])),
                          target_knn=knn((p_train, train[1]), (p_test, test[1])))
        else:
            model = initial_student(first) if path is None else eval_linear.load_backbone(str(path), img_size=28)[0]
            record.update(knn=knn((features(model, train[0]), train[1]), (features(model, test[0]), test[1])))
        record["seconds"] = round(time.time() - start, 1)
        print(json.dumps(record), flush=True)
        with open(out, "a") as f:
            f.write(json.dumps(record) + "\n")


if __name__ == "__main__":
    main()
