"""The supervised arm of the Fashion-MNIST comparison: a comparison baseline for the RoB students, not a fifth method.

    python reproduce/supervised.py teacher --epochs 14 --output_dir runs/fashion_mnist/supervised_teacher \
        --export assets/fmnist_supervised_vit_nano.pth                  (the shipped teacher: about 1 h, one thread)
    python reproduce/supervised.py student --teacher assets/fmnist_supervised_vit_nano.pth --seed 0 \
        --epochs 12 --output_dir runs/fashion_mnist/supervised_kd_s0     (what reproduce/transfer.sh runs)

`teacher`: vit_nano (the SSL teachers' architecture) trained with labels on the 60,000 training images: cross-entropy
with label smoothing 0.1 on both 28 px global crops. `student`: vit_pico distilled from that teacher with labels at
the RoB students' budget and with RoB-DINO's optimiser: the same 12,800-image subset, batch 128, 2x28 + 4x14 px crops
and batched augmentation, AdamW at 1e-3 after a one-epoch warm-up, cosine to 1e-5, weight decay 0.04 -> 0.4 on
weight matrices (biases and norms none), no gradient clipping. Its loss
is DeiT's hard-label distillation on the class token: on every crop, half the cross-entropy with the true label and
half the cross-entropy with the teacher's label (the argmax of its mean softmax over the two global crops). DeiT
found the hard variant better than soft (KL) distillation; a separate distillation token is left out because what
is evaluated is the backbone's class-token feature, as for every other student here. Checkpoints (one per epoch,
resumed at the last finished epoch) are in the layout eval_linear.py reads (`--checkpoint_key student`);
`--export FILE` on a finished teacher writes it as a slim fp16 file for assets/. Fashion-MNIST only (its labels), one
process on the CPU: the scale of the reproduction."""
import argparse
import datetime
import json
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import common  # noqa: E402
from rob_dino import cosine_schedule, param_groups  # noqa: E402  (RoB-DINO's schedules and weight-decay groups)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("role", choices=["teacher", "student"])
    p.add_argument("--output_dir", required=True)
    p.add_argument("--teacher", help="student: the supervised teacher (a checkpoint of this script or its export)")
    p.add_argument("--epochs", type=int, default=6, help="epochs of the data set (or of --subset)")
    p.add_argument("--subset", type=int, default=None, help="default: 12,800 for the student, 0 (all) for the teacher")
    p.add_argument("--batch_size", type=int, default=128)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--num_workers", type=int, default=1)
    p.add_argument("--export", help="teacher: write the finished teacher's backbone and classifier here (fp16)")
    args = p.parse_args(argv)
    if args.role == "student" and (not args.teacher or args.export):
        p.error("student needs --teacher (and --export is for the teacher)")
    if args.epochs < 2 or args.batch_size < 1 or (args.subset or 0) < 0 or args.num_workers < 0:
        p.error("--epochs must be 2 or more (one is the warm-up), --batch_size positive, --subset and --num_workers "
                "not negative")
    args.subset = (12800 if args.role == "student" else 0) if args.subset is None else args.subset
    return args


def labels_of(dataset):
    """The label of every image of Fashion-MNIST or of a Subset of it, in the data set's order."""
    if isinstance(dataset, torch.utils.data.Subset):
        return labels_of(dataset.dataset)[torch.tensor(dataset.indices)]
    return torch.as_tensor(dataset.targets)


def network(name, num_classes=10):
    backbone, dim, arch = common.student_backbone(name, img_size=28, patch_size=7)
    return common.MultiCropNetwork(backbone, nn.Linear(dim, num_classes)), arch


def load_teacher(path):
    """The frozen supervised teacher (backbone + classifier) from a checkpoint of this script or its export."""
    ckpt = common.load_file(path, "supervised teacher")
    if not isinstance(ckpt, dict) or ckpt.get("method") != "supervised" or ckpt.get("role") != "teacher":
        raise common.UserError(f"{path} is not a supervised teacher of reproduce/supervised.py")
    model = common.MultiCropNetwork(common.create_backbone(ckpt["arch"]), nn.Linear(
        ckpt["student"]["head.weight"].shape[1], ckpt["student"]["head.weight"].shape[0]))
    common.load_strict(model, {k: v.float() for k, v in ckpt["student"].items()}, path, "supervised teacher")
    return common.freeze(model.eval())


def loss_fn(logits, labels, teacher_logits=None):
    """Crop-major logits [n_crops * B, classes], labels [B]. Teacher: cross-entropy with label smoothing 0.1. Student
    (teacher_logits of the two global crops, [2 * B, classes]): half cross-entropy with the labels, half with the
    teacher's argmax of its mean softmax over the global crops, on every crop."""
    n_crops = len(logits) // len(labels)
    if teacher_logits is None:
        return F.cross_entropy(logits, labels.repeat(n_crops), label_smoothing=0.1)
    teacher_labels = teacher_logits.softmax(-1).unflatten(0, (2, -1)).mean(0).argmax(-1)
    return 0.5 * F.cross_entropy(logits, labels.repeat(n_crops)) + \
        0.5 * F.cross_entropy(logits, teacher_labels.repeat(n_crops))


def main(argv=None):
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    local = 4 if args.role == "student" else 0
    augmentation = common.MultiCropAugmentation(28, 14, local_crops_number=local, global_crops_scale=(0.4, 1.0),
                                                local_crops_scale=(0.1, 0.4))
    data = common.training_data("fashion-mnist", augmentation, args.batch_size, args.num_workers, args.seed,
                                args.subset, gpu_augment=True)
    labels = labels_of(data.dataset.base)
    model, arch = network("vit_pico" if args.role == "student" else "vit_nano")
    teacher = load_teacher(args.teacher) if args.role == "student" else None
    steps_per_epoch, device = len(data.loader), torch.device("cpu")
    lrs = cosine_schedule(2e-3 * args.batch_size / 256, 1e-5, args.epochs, steps_per_epoch, warmup_epochs=1)
    wds = cosine_schedule(0.04, 0.4, args.epochs, steps_per_epoch)
    optimizer = torch.optim.AdamW(param_groups(model))
    start = 0
    if (out / "checkpoint.pth").exists():  # resume at the last finished epoch: the data order is keyed by epoch
        ckpt = torch.load(out / "checkpoint.pth", map_location="cpu", weights_only=False)
        changed = [f"--{k}" for k, v in ckpt["args"].items() if k not in ("output_dir", "export", "num_workers")
                   and vars(args)[k] != v]
        if changed:
            raise SystemExit(f"{out} holds a run with other {', '.join(changed)}: give another --output_dir")
        model.load_state_dict(ckpt["student"])
        optimizer.load_state_dict(ckpt["optimizer"])
        start = ckpt["epoch"] + 1
    for epoch in range(start, args.epochs):
        data.sampler.set_epoch(epoch)
        model.train()
        total_loss, started = 0.0, time.time()
        for i, (batch, indices) in enumerate(data.loader):
            step = epoch * steps_per_epoch + i
            crops = common.crops_on_device(data, batch, indices, device, step)
            for group in optimizer.param_groups:
                group["lr"] = lrs[step]
            optimizer.param_groups[0]["weight_decay"] = wds[step]
            with torch.no_grad():
                teacher_logits = None if teacher is None else teacher(crops[:2])
            loss = loss_fn(model(crops), labels[indices], teacher_logits)
            if not torch.isfinite(loss):
                raise SystemExit(f"non-finite loss at step {step}: stopped, nothing saved")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total_loss += loss.item()
        record = dict(epoch=epoch, step=(epoch + 1) * steps_per_epoch, train_loss=total_loss / steps_per_epoch,
                      time=str(datetime.timedelta(seconds=round(time.time() - started))))
        ckpt = dict(method="supervised", role=args.role, arch=arch, student=model.state_dict(),
                    optimizer=optimizer.state_dict(), epoch=epoch, args=vars(args))
        common.save_atomic(ckpt, out / f"checkpoint{epoch + 1:04d}.pth")
        common.save_atomic(ckpt, out / "checkpoint.pth")
        with open(out / "log.txt", "a") as f:
            f.write(json.dumps(record) + "\n")
        print(record, flush=True)
    if args.export:
        slim = dict(method="supervised", role=args.role, arch=arch,
                    student={k: v.half() for k, v in model.state_dict().items()})
        common.save_atomic(slim, args.export)
        print(f"teacher written to {args.export} ({os.path.getsize(args.export) / 1e6:.1f} MB)")


if __name__ == "__main__":
    try:
        main()
    except common.UserError as err:
        raise SystemExit(f"error: {err}")
