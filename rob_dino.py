"""RoB-DINO: train a small network by distillation from a frozen, pretrained DINO model.

DINO trains a student to match the softmax output of a momentum teacher on other views of the same image.
RoB ("Replace one Branch") keeps the student branch as it is and replaces the teacher branch by a released
DINO model (backbone + DINO head), frozen: no EMA, no centering, no temperature warm-up. The student, a fresh
ViT-Tiny / ResNet-18 / ..., learns to predict softmax(teacher_logits / 0.07) from the same global crops and
from the local crops of each image.

    torchrun --nproc_per_node=8 rob_dino.py --student vit_tiny --data_path /data/imagenet/train --output_dir out/

`--teacher ema` runs plain DINO instead (EMA teacher, centering, temperature warm-up): the baseline of the
paper, and a way to pretrain a teacher on your own data. Its checkpoint is a valid --teacher for RoB.
"""
import argparse
import copy
import datetime
import itertools
import json
import math
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

import common

TEACHERS = {  # official DINO full checkpoints (backbone + DINO head): name -> (release, backbone, patch)
    "dino_vits16": ("dino_deitsmall16_pretrain", "vit_small", 16),
    "dino_vits8": ("dino_deitsmall8_pretrain", "vit_small", 8),
    "dino_vitb16": ("dino_vitbase16_pretrain", "vit_base", 16),
    "dino_vitb8": ("dino_vitbase8_pretrain", "vit_base", 8),
    "dino_resnet50": ("dino_resnet50_pretrain", "resnet50", None),
}
URL = "https://dl.fbaipublicfiles.com/dino/{0}/{0}_full_checkpoint.pth"


def get_args_parser():
    parser = argparse.ArgumentParser("RoB-DINO", add_help=False)
    group = parser.add_argument_group("model")
    group.add_argument("--student", default="vit_tiny", help="vit_tiny, vit_small, vit_base, resnet18, resnet34, "
                       "resnet50, mobilenet_v3, vit_nano, vit_pico (small images) or any timm name.")
    group.add_argument("--teacher", default="dino_vitb16", help=f"{', '.join(TEACHERS)}; a local DINO full "
                       "checkpoint (backbone + head); a checkpoint.pth of this script (a RoB-DINO student or a "
                       "--teacher ema run teaches the next student); or 'ema' for the plain-DINO baseline.")
    group.add_argument("--student_head", default="dino", choices=["dino", "mlp"], help="dino: DINO head "
                       "(MLP, L2-norm, weight-normalised last layer), sized like the teacher's; mlp: [d, 2048, K].")
    group.add_argument("--patch_size", type=int, default=None, help="ViT student patch size (default: the "
                       "model's own, 16); small images want small patches (7 at 28 px).")
    group.add_argument("--drop_path_rate", type=float, default=0.1, help="Student stochastic depth.")
    group = parser.add_argument_group("temperatures and pairing")
    group.add_argument("--teacher_temp", type=float, default=0.07, help="Teacher softmax temperature.")
    group.add_argument("--student_temp", type=float, default=0.1, help="Student softmax temperature.")
    group.add_argument("--swapped", action="store_true", help="DINO's cross-view pairing (teacher view i -> "
                       "every student crop but i). Default: same-view pairing (teacher view i -> student view i "
                       "and every local crop). Always on with --teacher ema.")
    group = parser.add_argument_group("plain-DINO baseline (--teacher ema only)")
    group.add_argument("--out_dim", type=int, default=65536, help="Prototypes K of the DINO head.")
    group.add_argument("--hidden_dim", type=int, default=2048, help="DINO head hidden width.")
    group.add_argument("--bottleneck_dim", type=int, default=256, help="DINO head bottleneck width.")
    group.add_argument("--momentum_teacher", type=float, default=0.996, help="EMA momentum, cosine to 1.")
    group.add_argument("--warmup_teacher_temp", type=float, default=0.04, help="Teacher temperature at the "
                       "start, raised linearly to --teacher_temp.")
    group.add_argument("--warmup_teacher_temp_epochs", type=int, default=30, help="Length of that warm-up.")
    group.add_argument("--center_momentum", type=float, default=0.9, help="EMA momentum of the teacher centre.")
    group.add_argument("--freeze_last_layer", type=int, default=1, help="Epochs with the last head layer frozen.")
    group = parser.add_argument_group("optimisation")
    group.add_argument("--epochs", type=int, default=300)
    group.add_argument("--batch_size_per_gpu", type=int, default=64, help="Global batch = this x processes.")
    group.add_argument("--lr", type=float, default=5e-4, help="Peak lr at a global batch of 256, scaled "
                       "linearly (1024 -> 2e-3, the paper's setting).")
    group.add_argument("--min_lr", type=float, default=1e-5, help="lr at the end of the cosine.")
    group.add_argument("--warmup_epochs", type=int, default=10, help="Linear lr warm-up epochs.")
    group.add_argument("--weight_decay", type=float, default=0.04, help="Initial weight decay (cosine).")
    group.add_argument("--weight_decay_end", type=float, default=0.4, help="Final weight decay.")
    group.add_argument("--clip_grad", type=float, default=3.0, help="Clip the global gradient norm (0: off).")
    group.add_argument("--precision", default=None, choices=["bf16", "fp16", "fp32"], help="Autocast dtype "
                       "(default bf16 on GPU, fp32 on CPU). The teacher runs in that dtype, losses in fp32.")
    group.add_argument("--compile", action="store_true", help="torch.compile teacher, student and loss (ViTs per "
                       "block: quick to compile). Faster on GPU once compiled.")
    group.add_argument("--overlap_teacher", action=argparse.BooleanOptionalAction, default=True, help="On GPU, "
                       "run the teacher on a second CUDA stream, concurrently with the student's forward.")
    group = parser.add_argument_group("multi-crop")
    group.add_argument("--global_crops_scale", type=float, nargs=2, default=(0.25, 1.0))
    group.add_argument("--local_crops_number", type=int, default=8, help="Small crops (student only).")
    group.add_argument("--local_crops_scale", type=float, nargs=2, default=(0.05, 0.25))
    group.add_argument("--global_crops_size", type=int, default=224)
    group.add_argument("--local_crops_size", type=int, default=96)
    group = parser.add_argument_group("misc")
    group.add_argument("--data_path", default="fashion-mnist", help="ImageFolder directory, 'fashion-mnist' "
                       "or 'synthetic'.")
    group.add_argument("--subset", type=int, default=0, help="Train on a seeded random subset of this many "
                       "images (0: all of them), for quick experiments.")
    group.add_argument("--output_dir", default="output", help="Checkpoints and log.txt; a run resumes "
                       "automatically from output_dir/checkpoint.pth.")
    group.add_argument("--saveckp_freq", type=int, default=20, help="Also keep checkpointNNNN.pth every N epochs.")
    group.add_argument("--seed", type=int, default=0)
    group.add_argument("--num_workers", type=int, default=10, help="Data loader processes per GPU.")
    group.add_argument("--gpu_augment", action="store_true", help="Decode JPEGs and run the multi-crop "
                       "augmentation in batches on the GPU (loader workers only read files): real training is "
                       "otherwise CPU-bound. Same parameter distributions; also runs on CPU tensors.")
    group.add_argument("--benchmark", type=int, default=0, metavar="N", help="Time N training steps on "
                       "synthetic data with a randomly initialised teacher of the chosen architecture, then exit.")
    return parser


# ------------------------------------------------------------------------------------------------ heads
class DINOHead(nn.Module):
    """MLP -> L2-normalise -> weight-normalised linear layer to K outputs (the official module names, so that
    DINO checkpoints load). `weight_norm=False` gives a plain last layer, for a frozen teacher."""

    def __init__(self, in_dim, out_dim, hidden_dim=2048, bottleneck_dim=256, nlayers=3, use_bn=False,
                 norm_last_layer=False, weight_norm=True):
        super().__init__()
        dims = [in_dim] + [hidden_dim] * (nlayers - 1) + [bottleneck_dim]
        layers = []
        for i in range(nlayers):
            layers.append(nn.Linear(dims[i], dims[i + 1]))
            if i < nlayers - 1:
                layers += [nn.BatchNorm1d(dims[i + 1])] if use_bn else []
                layers.append(nn.GELU())
        self.mlp = nn.Sequential(*layers)
        for m in self.mlp.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
        self.last_layer = nn.Linear(bottleneck_dim, out_dim, bias=False)
        if weight_norm:
            self.last_layer = nn.utils.parametrizations.weight_norm(self.last_layer)
            self.last_layer.parametrizations.weight.original0.data.fill_(1.0)  # g = 1: rows of unit norm
            self.last_layer.parametrizations.weight.original0.requires_grad = not norm_last_layer

    def forward(self, x):
        x = F.normalize(self.mlp(x).float(), dim=-1)
        return self.last_layer(x)  # a frozen teacher keeps this layer in fp32: logits / 0.07 need the precision


class MLPHead(nn.Sequential):
    """--student_head mlp: Linear, BN (convnets), GELU, Linear -> K logits."""

    def __init__(self, in_dim, out_dim, hidden_dim=2048, use_bn=False):
        super().__init__(nn.Linear(in_dim, hidden_dim), nn.BatchNorm1d(hidden_dim) if use_bn else nn.Identity(),
                         nn.GELU(), nn.Linear(hidden_dim, out_dim))


class MultiCropNetwork(nn.Module):
    """Backbone + head over a list of crops: one backbone pass per run of same-sized crops (the globals
    together, the locals together), one head pass over all features. Returns [n_crops * B, K], crop-major."""

    def __init__(self, backbone, head):
        super().__init__()
        self.backbone, self.head = backbone, head

    def forward(self, crops):
        same_size_runs = itertools.groupby(crops, key=lambda crop: crop.shape[-1])
        features = [self.backbone(torch.cat(list(run))) for _, run in same_size_runs]
        return self.head(torch.cat(features))


def head_from_state_dict(sd, teacher=True):
    """A DINOHead (or MLPHead) whose sizes are read from its tensors; weight norm folded for a teacher."""
    sd = fold_weight_norm(sd)
    if "last_layer.weight" not in sd:  # an MLPHead: 0.weight, [1.*], 3.weight
        head = MLPHead(sd["0.weight"].shape[1], sd["3.weight"].shape[0], sd["0.weight"].shape[0], "1.weight" in sd)
        return head, sd
    linears = sorted(int(k.split(".")[1]) for k in sd if k.startswith("mlp.") and sd[k].ndim == 2)
    first, last = sd[f"mlp.{linears[0]}.weight"], sd[f"mlp.{linears[-1]}.weight"]
    head = DINOHead(first.shape[1], sd["last_layer.weight"].shape[0], hidden_dim=first.shape[0],
                    bottleneck_dim=last.shape[0], nlayers=len(linears),
                    use_bn=any(k.endswith("running_mean") for k in sd), weight_norm=not teacher)
    return head, sd


def fold_weight_norm(sd):
    """Weight-normalised last layer (official weight_g / weight_v, or torch parametrization names) to the
    plain weight g * v / ||v|| (row-wise) that a frozen teacher uses."""
    sd = dict(sd)
    for g_key, v_key in [("last_layer.weight_g", "last_layer.weight_v"),
                         ("last_layer.parametrizations.weight.original0", "last_layer.parametrizations.weight.original1")]:
        if g_key in sd:
            g, v = sd.pop(g_key).float(), sd.pop(v_key).float()
            sd["last_layer.weight"] = g * v / v.norm(dim=1, keepdim=True)
    return sd


# --------------------------------------------------------------------------------------------- teacher
def load_teacher(name_or_path, num_heads=None):
    """The frozen RoB teacher (backbone + DINO head, eval, no grad) from an official name (downloaded once
    into the torch.hub cache) or a local file."""
    source = URL.format(TEACHERS[name_or_path][0]) if name_or_path in TEACHERS else name_or_path
    return teacher_from_checkpoint(common.load_file(source, "DINO teacher checkpoint"), source, num_heads)


def teacher_from_checkpoint(ckpt, source, num_heads=None):
    """Recognise the checkpoint's format, build the matching backbone and head from its tensors and load
    them strictly. Accepts DINO full checkpoints and this script's own; refuses the rest with the fix."""
    if not isinstance(ckpt, dict):
        raise ValueError(f"{source} is not a checkpoint dictionary")
    method = ckpt.get("method")
    if method == "rob_dino":  # a checkpoint of this script: its EMA teacher (baseline runs) or its student
        sd = ckpt.get("teacher") or ckpt["student"]
        backbone = common.create_backbone({**ckpt["arch"], "kwargs": {**ckpt["arch"]["kwargs"], "drop_path_rate": 0.0}})
        head, head_sd = head_from_state_dict(common.sub_state_dict(sd, "head."))
        common.load_strict(backbone, common.sub_state_dict(sd, "backbone."), source, "rob_dino.py checkpoint")
    elif method is not None:
        raise ValueError(f"{source} was written by {method}.py, not rob_dino.py: a RoB-DINO teacher needs a DINO "
                         f"head. Use {method}.py with it, or give a DINO checkpoint.")
    elif "teacher" in ckpt and isinstance(ckpt["teacher"], dict):  # official DINO full checkpoint
        sd = common.strip_prefix(ckpt["teacher"], "module.")
        if any(k.startswith("head.last_layer2") for k in sd):
            raise ValueError(f"{source} is an iBOT checkpoint (it has a patch head): use rob_ibot.py with it.")
        arch_name = getattr(ckpt.get("args"), "arch", None)
        backbone, _ = common.backbone_from_state_dict(common.sub_state_dict(sd, "backbone."), num_heads, arch_name)
        head, head_sd = head_from_state_dict(common.sub_state_dict(sd, "head."))
        common.load_strict(backbone, common.sub_state_dict(sd, "backbone."), source, "DINO full checkpoint backbone")
    else:
        flat = common.strip_prefix(ckpt.get("state_dict", ckpt), "module.")
        if "target_encoder" in ckpt:
            raise ValueError(f"{source} is an MSN checkpoint: use rob_msn.py with it.")
        if "prototypes.weight" in flat:
            raise ValueError(f"{source} is a SwAV checkpoint: use rob_swav.py with it.")
        if "cls_token" in flat or "conv1.weight" in flat:
            raise ValueError(f"{source} holds a backbone only; RoB-DINO needs the DINO head too, which the "
                             "*_full_checkpoint.pth releases contain, e.g. " + URL.format(TEACHERS["dino_vitb16"][0])
                             + f" (or pass --teacher {'/'.join(TEACHERS)} to download it).")
        raise ValueError(f"{source} is not a DINO checkpoint (expected a dict with a 'teacher' state dict).")
    common.load_strict(head, head_sd, source, "DINO head")
    return freeze(MultiCropNetwork(backbone, head))


def freeze(model):
    model.eval().requires_grad_(False)
    return model


def random_teacher(name):
    """An official teacher architecture with random weights (for --benchmark: no download)."""
    _, backbone_name, patch = TEACHERS[name]
    backbone, _ = common.build_teacher_backbone(backbone_name, patch_size=patch)
    head = DINOHead(common.feature_dim(backbone), 65536, weight_norm=False)
    return freeze(MultiCropNetwork(backbone, head))


# ------------------------------------------------------------------------------------------------ loss
def teacher_probs(teacher_logits, temp, center=None):
    """The RoB seam: the frozen teacher's logits become the target distribution softmax(logits / 0.07).
    (The plain-DINO baseline subtracts its running centre first.)"""
    logits = teacher_logits.float() if center is None else teacher_logits.float() - center
    return F.softmax(logits / temp, dim=-1)


def view_pairs(n_global, n_crops, swapped):
    """partners[t, s] = 1 where teacher view t supervises student crop s. Same-view: view i -> student crop i
    and every local crop. Swapped (DINO's): view i -> every student crop except i."""
    t, s = torch.arange(n_global)[:, None], torch.arange(n_crops)[None, :]
    return ((s != t) if swapped else (s == t) | (s >= n_global)).float()


def dino_loss(student_logits, teacher_probs, partners, student_temp):
    """Mean over (teacher view t, student crop s) pairs of the batch-mean cross-entropy
    H(teacher_probs[t], softmax(student_logits[s] / T)); inputs crop-major, [n_crops * B, K], [n_global * B, K].
    With z = logits / T, log softmax(z_s) = z_s - logsumexp(z_s) and sum_k p_t = 1, the sum over pairs is
    sum_t <p_t, sum_{s paired with t} z_s> - sum_s (pairs of s) * logsumexp(z_s): the student log-probabilities
    and the per-pair products are never materialised."""
    n_global, n_crops = partners.shape
    batch = teacher_probs.shape[0] // n_global
    z = (student_logits.float() / student_temp).unflatten(0, (n_crops, batch))  # [n_crops, B, K]
    cross = (teacher_probs.unflatten(0, (n_global, batch)) * torch.einsum("ts,sbk->tbk", partners, z)).sum()
    normaliser = (partners.sum(0)[:, None] * torch.logsumexp(z, dim=-1)).sum()
    return (normaliser - cross) / (batch * partners.sum())


class DINOCenter(nn.Module):
    """Plain-DINO baseline only: the running mean of the teacher logits over the global batch, subtracted
    before the softmax to avoid collapse (RoB's frozen teacher needs none)."""

    def __init__(self, out_dim, momentum):
        super().__init__()
        self.momentum = momentum
        self.register_buffer("center", torch.zeros(1, out_dim))

    @torch.no_grad()
    def update(self, teacher_logits):
        batch_center = common.all_reduce_mean(teacher_logits.float().mean(0, keepdim=True))
        self.center.mul_(self.momentum).add_(batch_center, alpha=1 - self.momentum)


# ---------------------------------------------------------------------------------------------- training
def main(args):
    rank, world_size, device = common.init_distributed()
    common.seed_everything(common.mix_seed(args.seed, rank))
    ema = args.teacher == "ema"
    precision = args.precision or ("bf16" if device.type == "cuda" else "fp32")
    amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[precision]
    n_global = 2
    output_dir = Path(args.output_dir)
    if common.is_main_process() and not args.benchmark:
        output_dir.mkdir(parents=True, exist_ok=True)
    common.log("\n".join(f"{k}: {v}" for k, v in sorted(vars(args).items())))

    # ---- data: DINO's multi-crop augmentation (2 global crops for teacher and student, locals for the student)
    augmentation = common.MultiCropAugmentation(
        args.global_crops_size, args.local_crops_size, n_global, args.local_crops_number, args.global_crops_scale,
        args.local_crops_scale, color_jitter=(0.4, 0.4, 0.2, 0.1), blur_p=(1.0, 0.1, 0.5), solarize_p=(0.0, 0.2, 0.0))
    if not args.benchmark:
        base = common.build_dataset(args.data_path, synthetic_shapes=augmentation.crop_shapes, raw=args.gpu_augment)
        base = common.random_subset(base, args.subset, args.seed)
        dataset = common.AugmentedDataset(base, None if args.gpu_augment else augmentation, args.seed)
        loader, sampler = common.build_loader(dataset, args.batch_size_per_gpu, args.num_workers, args.seed,
                                              common.collate_raw if args.gpu_augment else None)
        iters_per_epoch = len(loader)
        common.log(f"data: {len(dataset)} images from {args.data_path}, {iters_per_epoch} steps per epoch")
    else:
        iters_per_epoch = max(args.benchmark, 1)

    # ---- networks: frozen pretrained teacher (RoB) or EMA copy of the student (baseline), fresh student
    backbone, dim, arch = common.build_student(args.student, args.global_crops_size, args.patch_size,
                                               args.drop_path_rate)
    convnet = not common.is_vit(backbone)
    if ema:
        out_dim, hidden_dim, bottleneck_dim = args.out_dim, args.hidden_dim, args.bottleneck_dim
    else:  # the student's head predicts the teacher's K outputs; a DINO head copies the teacher head's widths
        teacher = random_teacher(args.teacher) if args.benchmark else load_teacher(args.teacher)
        out_dim, hidden_dim, bottleneck_dim = args.out_dim, args.hidden_dim, args.bottleneck_dim
        if isinstance(teacher.head, DINOHead):
            out_dim, bottleneck_dim = teacher.head.last_layer.out_features, teacher.head.last_layer.in_features
            hidden_dim = teacher.head.mlp[0].out_features if len(teacher.head.mlp) > 1 else hidden_dim
        else:
            out_dim = teacher.head[-1].out_features
    if args.student_head == "dino":
        head = DINOHead(dim, out_dim, hidden_dim, bottleneck_dim, norm_last_layer=ema)
    else:
        head = MLPHead(dim, out_dim, use_bn=convnet)
    student = MultiCropNetwork(backbone, head).to(device)
    if ema:  # baseline: the teacher is an EMA of the student (same architecture without drop-path)
        teacher_arch = {**arch, "kwargs": {**arch["kwargs"], "drop_path_rate": 0.0}}
        teacher = MultiCropNetwork(common.create_backbone(teacher_arch), copy.deepcopy(head))
        teacher.load_state_dict(student.state_dict())
        teacher.requires_grad_(False)
        center = DINOCenter(out_dim, args.center_momentum).to(device)
    patch = getattr(getattr(teacher.backbone, "patch_embed", None), "patch_size", (1,))[0]
    if args.global_crops_size % patch:
        raise ValueError(f"--global_crops_size {args.global_crops_size} is not a multiple of the teacher's patch "
                         f"size {patch}: the teacher sees the global crops.")
    teacher.to(device)
    teacher_dtype = torch.float32
    if not ema and device.type == "cuda" and precision != "fp32":  # frozen teacher stored in bf16 (fp32 last layer)
        teacher_dtype = amp_dtype
        teacher.backbone.to(amp_dtype)
        (teacher.head.mlp if isinstance(teacher.head, DINOHead) else teacher.head).to(amp_dtype)
    if convnet:
        student = student.to(memory_format=torch.channels_last)
    if not common.is_vit(teacher.backbone):
        teacher = teacher.to(memory_format=torch.channels_last)
    if world_size > 1 and device.type == "cuda":  # SyncBatchNorm needs GPUs (a no-op without BN layers)
        student = nn.SyncBatchNorm.convert_sync_batchnorm(student)
        if ema:
            teacher = nn.SyncBatchNorm.convert_sync_batchnorm(teacher)
    student_ddp = DistributedDataParallel(student, device_ids=[device.index] if device.type == "cuda" else None) \
        if world_size > 1 else student
    loss_fn = dino_loss
    if args.compile:  # in place, so checkpoints keep their keys; ViTs per block (fast to compile)
        for network in (student, teacher):
            common.compile_model(network.backbone)
            network.head.compile()
        loss_fn = torch.compile(dino_loss)
    overlap = args.overlap_teacher and device.type == "cuda"
    teacher_stream = torch.cuda.Stream(device) if overlap else None
    n_params = sum(p.numel() for p in student.parameters())
    common.log(f"student {args.student}: {n_params / 1e6:.1f}M parameters, head -> {out_dim}; teacher: {args.teacher}")

    # ---- loss pairing, optimiser and per-iteration schedules
    partners = view_pairs(n_global, n_global + args.local_crops_number, swapped=args.swapped or ema).to(device)
    global_batch = args.batch_size_per_gpu * world_size
    optimizer = torch.optim.AdamW(common.param_groups(student), fused=device.type == "cuda")
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
    lr_schedule = common.cosine_schedule(args.lr * global_batch / 256, args.min_lr, args.epochs, iters_per_epoch,
                                         args.warmup_epochs)
    wd_schedule = common.cosine_schedule(args.weight_decay, args.weight_decay_end, args.epochs, iters_per_epoch)
    if ema:
        momentum_schedule = common.cosine_schedule(args.momentum_teacher, 1.0, args.epochs, iters_per_epoch)
        warmup_temp = min(args.warmup_teacher_temp_epochs, args.epochs)
        temp_schedule = [args.warmup_teacher_temp + (args.teacher_temp - args.warmup_teacher_temp) * min(e / warmup_temp, 1)
                         if warmup_temp else args.teacher_temp for e in range(args.epochs)]

    def teacher_logits_of(crops):
        with torch.no_grad(), torch.autocast(device.type, amp_dtype, enabled=ema and precision != "fp32"):
            return teacher([c.to(teacher_dtype) for c in crops[:n_global]])

    def train_step(crops, it):
        """One optimisation step on a batch (list of crops, globals first); returns the loss, a 1-element tensor."""
        epoch = it // iters_per_epoch
        for i, group in enumerate(optimizer.param_groups):
            group["lr"] = lr_schedule[it]
            if i == 0:
                group["weight_decay"] = wd_schedule[it]
        torch.manual_seed(common.mix_seed(args.seed, rank, it))  # drop-path etc.: reproducible on resume
        if overlap:  # the teacher runs on a second stream, concurrently with the student's forward
            teacher_stream.wait_stream(torch.cuda.current_stream(device))
            with torch.cuda.stream(teacher_stream):
                teacher_logits = teacher_logits_of(crops)
        else:
            teacher_logits = teacher_logits_of(crops)
        with torch.autocast(device.type, amp_dtype, enabled=precision != "fp32"):
            student_logits = student_ddp(crops)
        if overlap:
            torch.cuda.current_stream(device).wait_stream(teacher_stream)
        targets = teacher_probs(teacher_logits, temp_schedule[epoch] if ema else args.teacher_temp,
                                center.center if ema else None)
        loss = loss_fn(student_logits, targets, partners, args.student_temp)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        if args.clip_grad:
            scaler.unscale_(optimizer)
            nn.utils.clip_grad_norm_(student.parameters(), args.clip_grad, foreach=True)
        if ema and epoch < args.freeze_last_layer:  # baseline: last layer frozen during the first epoch(s)
            for p in student.head.last_layer.parameters():
                p.grad = None
        scaler.step(optimizer)
        scaler.update()
        if ema:  # baseline: teacher <- momentum * teacher + (1 - momentum) * student; update the centre
            with torch.no_grad():
                torch._foreach_lerp_(list(teacher.parameters()), list(student.parameters()), 1 - momentum_schedule[it])
                center.update(teacher_logits)
        return loss.detach()[None]

    if args.benchmark:  # a fixed synthetic batch on the device; FLOPs counted on eager calls
        crops = benchmark_batch(args, n_global, device)
        title = (f"RoB-DINO {args.student} <- {args.teacher}, batch {args.batch_size_per_gpu}/GPU, {n_global}x"
                 f"{args.global_crops_size} + {args.local_crops_number}x{args.local_crops_size}"
                 + (", compiled" if args.compile else "") + (", teacher on a side stream" if overlap else ""))
        with torch.compiler.set_stance("force_eager"):
            step_flops = common.count_flops(lambda: train_step(crops, 0))
            teacher_flops = common.count_flops(lambda: teacher_logits_of(crops))
        common.benchmark(lambda: teacher_logits_of(crops), args.benchmark, 3, global_batch,
                         teacher_flops / args.batch_size_per_gpu, device, amp_dtype, "frozen teacher forward alone")
        steps = iter(range(10 ** 9))
        return common.benchmark(lambda: train_step(crops, next(steps) % iters_per_epoch), args.benchmark, 3,
                                global_batch, step_flops / args.batch_size_per_gpu, device, amp_dtype, title)

    # ---- resume (output_dir/checkpoint.pth), then the loop
    start_step = 0
    ckpt = common.load_resume_checkpoint(output_dir, "rob_dino")
    if ckpt is not None:
        student.load_state_dict(ckpt["student"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scaler.load_state_dict(ckpt["scaler"])
        if ema:
            teacher.load_state_dict(ckpt["teacher"])
            center.load_state_dict(ckpt["center"])
        start_step = ckpt["step"]
        common.log(f"resumed from {output_dir / 'checkpoint.pth'} at step {start_step} (epoch {ckpt['epoch']})")

    def save_checkpoint(step, epoch):
        if not common.is_main_process():
            return
        state = dict(method="rob_dino", arch=arch, args=vars(args), step=step, epoch=epoch,
                     student=student.state_dict(), optimizer=optimizer.state_dict(), scaler=scaler.state_dict())
        if ema:
            state.update(teacher=teacher.state_dict(), center=center.state_dict())
        common.save_atomic(state, output_dir / "checkpoint.pth")
        if args.saveckp_freq and step % iters_per_epoch == 0 and epoch % args.saveckp_freq == 0:
            common.save_atomic(state, output_dir / f"checkpoint{epoch:04}.pth")
        common.export_timm(student.backbone, arch, output_dir / "student_timm.pth")

    stop, stats = common.StopRequest(), common.StepStats()
    step = start_step

    term_names = ["train_loss"]

    def check(values, at_step):
        """Host side of a finished step: NaN stop and progress; True if a process asked to stop."""
        *terms, stop_votes = values
        if not math.isfinite(terms[0]):
            raise FloatingPointError(f"non-finite loss {terms[0]} at step {at_step}; stopping without saving, "
                                     f"{output_dir / 'checkpoint.pth'} is intact. Lower --lr, raise --warmup_epochs, "
                                     "keep --clip_grad or use --precision bf16/fp32.")
        epoch_terms.append(terms)
        progress.set_postfix(loss=f"{terms[0]:.4f}", lr=f"{lr_schedule[at_step]:.2e}",
                             img_s=f"{len(epoch_terms) * global_batch / (time.time() - start_time):.0f}")
        return stop_votes > 0

    for epoch in range(start_step // iters_per_epoch, args.epochs):
        sampler.set_epoch(epoch, start_batch=step - epoch * iters_per_epoch)
        progress = tqdm(loader, desc=f"epoch {epoch}", disable=not common.is_main_process(), dynamic_ncols=True,
                        initial=step - epoch * iters_per_epoch, total=iters_per_epoch)
        epoch_terms, start_time, stopping = [], time.time(), False
        for batch, _ in progress:
            if args.gpu_augment:  # decode + augment here, with a per-step seed (reproducible on resume)
                generator = torch.Generator().manual_seed(common.mix_seed(args.seed, rank, step, 1))
                crops = augmentation.batch(common.decode_images(batch, device), generator)
            else:
                crops = [c.to(device, non_blocking=True) for c in batch]
            if convnet:
                crops = [c.contiguous(memory_format=torch.channels_last) for c in crops]
            loss = train_step(crops, step)
            # averaged over processes with a stop vote; read one step late, so the host never waits for the GPU
            previous = stats.push(torch.cat([loss, torch.tensor([float(stop.requested)], device=device)]))
            step += 1
            if previous is not None and check(previous, step - 2):
                stopping = True  # every process sees the same votes: all stop after this same step
                break
        last = stats.flush()
        stopping = (last is not None and check(last, step - 1)) or stopping
        if step % iters_per_epoch == 0:  # a complete epoch: log it
            means = [sum(column) / len(column) for column in zip(*epoch_terms)]
            record = dict(epoch=epoch, step=step, **dict(zip(term_names, means)),
                          lr=lr_schedule[step - 1], wd=wd_schedule[step - 1],
                          images_per_s=len(epoch_terms) * global_batch / (time.time() - start_time),
                          skipped_images=int(dataset.num_skipped),
                          time=str(datetime.timedelta(seconds=int(time.time() - start_time))))
            if common.is_main_process():
                with open(output_dir / "log.txt", "a") as f:
                    f.write(json.dumps(record) + "\n")
        save_checkpoint(step, step // iters_per_epoch)
        if stopping:
            common.log(f"stopped by signal at step {step}; checkpoint saved, rerun the same command to resume")
            return
    common.log(f"done; student backbone for timm: {output_dir / 'student_timm.pth'}")


def benchmark_batch(args, n_global, device):
    """--benchmark: a fixed synthetic batch on the device, so that no data loading is timed."""
    b, g, l = args.batch_size_per_gpu, args.global_crops_size, args.local_crops_size
    return ([torch.randn(b, 3, g, g, device=device) for _ in range(n_global)]
            + [torch.randn(b, 3, l, l, device=device) for _ in range(args.local_crops_number)])


if __name__ == "__main__":
    main(argparse.ArgumentParser("RoB-DINO", parents=[get_args_parser()]).parse_args())
