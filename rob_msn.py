"""RoB-MSN: train a small network by distillation from a frozen, pretrained MSN model.

MSN (Masked Siamese Networks) trains an anchor branch that sees masked views (a random part of the patch tokens
dropped) to predict, over learned prototypes, the soft assignment that an EMA target encoder gives to an unmasked
view of the same image. RoB ("Replace one Branch") replaces the target branch by a released MSN target encoder
(ViT + projection MLP + 1024 prototypes), frozen: the target is softmax(cos(projection, prototypes) / 0.025), with
no Sinkhorn, no me-max and no EMA. The student, a fresh ViT-Tiny / ResNet-18 / ..., is a backbone + MLP [d, 2048,
K] whose K logits predict that target (cross-entropy at temperature 0.1) from the same global crops, with 10-15 %
of their patch tokens dropped (ViTs), and from the local crops. RoB-MSN students are the strong ones with few
labels: evaluate them with eval_linear.py --low_shot.

    torchrun --nproc_per_node=8 rob_msn.py --student vit_small --teacher msn_vitl16 --data_path /data/imagenet/train --output_dir out/
    python eval_linear.py --checkpoint out/checkpoint.pth --data_path /data/imagenet --knn --low_shot

`--teacher ema` runs plain MSN instead (EMA target encoder, learned prototypes, Sinkhorn, me-max): the baseline of
the paper, and a way to pretrain a teacher on your own data. Its checkpoint is a valid --teacher for RoB.
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

TEACHERS = {  # official MSN releases {target_encoder, prototypes}: name -> (release, backbone, patch)
    "msn_vits16": ("vits16_800ep", "vit_small", 16),
    "msn_vitb16": ("vitb16_600ep", "vit_base", 16),
    "msn_vitl16": ("vitl16_600ep", "vit_large", 16),
    "msn_vitb4": ("vitb4_300ep", "vit_base", 4),
    "msn_vitl7": ("vitl7_200ep", "vit_large", 7),
}
URL = "https://dl.fbaipublicfiles.com/msn/{0}.pth.tar"


def get_args_parser():
    parser = argparse.ArgumentParser("RoB-MSN", add_help=False)
    group = parser.add_argument_group("model")
    group.add_argument("--student", default="vit_tiny", help="vit_tiny, vit_small, vit_base, resnet18, resnet34, "
                       "resnet50, mobilenet_v3, vit_nano, vit_pico (small images) or any timm name.")
    group.add_argument("--teacher", default="msn_vitl16", help=f"{', '.join(TEACHERS)}; a local MSN release "
                       "({target_encoder, prototypes}); a checkpoint.pth of this script (a --teacher ema run, or a "
                       "RoB-MSN student, teaches the next student); or 'ema' for the plain-MSN baseline.")
    group.add_argument("--patch_size", type=int, default=None, help="ViT student patch size (default: the "
                       "model's own, 16); small images want small patches (7 at 28 px).")
    group.add_argument("--drop_path_rate", type=float, default=0.0, help="Student stochastic depth (MSN: 0).")
    group.add_argument("--patch_drop", type=float, default=None, help="Fraction of the patch tokens of the "
                       "student's global crops dropped at random (per image, after the positional embeddings; CLS "
                       "kept). Default 0.10 for vit_tiny, 0.15 for other ViTs; 0 turns it off. Convnet students "
                       "drop nothing.")
    group = parser.add_argument_group("temperatures and pairing")
    group.add_argument("--teacher_temp", type=float, default=0.025, help="Temperature of the teacher's cosine "
                       "similarities to its prototypes (MSN's 0.1 x sharpening 0.25). A RoB-MSN student used as teacher "
                       "gives logits instead, read at --student_temp.")
    group.add_argument("--student_temp", type=float, default=0.1, help="Student softmax temperature.")
    group.add_argument("--swapped", action="store_true", help="Cross-view pairing (teacher view i -> every "
                       "student crop but i). Default: same-view pairing (teacher view i -> student view i and every "
                       "local crop). The baseline uses MSN's own pairing (see --teacher ema).")
    group = parser.add_argument_group("plain-MSN baseline (--teacher ema only): global crop 0 -> EMA target "
                                      "encoder; global crop 1 (tokens dropped) and the locals -> student")
    group.add_argument("--out_dim", type=int, default=1024, help="Number of learned prototypes K.")
    group.add_argument("--hidden_dim", type=int, default=2048, help="Projection MLP hidden width.")
    group.add_argument("--bottleneck_dim", type=int, default=256, help="Projection output (prototype) width.")
    group.add_argument("--momentum_teacher", type=float, default=0.996, help="EMA momentum, raised linearly "
                       "towards 1 (MSN's schedule, stretched over 1.25x the run).")
    group.add_argument("--memax_weight", type=float, default=1.0, help="Weight of the me-max regulariser.")
    group.add_argument("--sinkhorn_iterations", type=int, default=3, help="Sinkhorn steps on the targets (0: off).")
    group = parser.add_argument_group("optimisation")
    group.add_argument("--epochs", type=int, default=150)
    group.add_argument("--batch_size_per_gpu", type=int, default=64, help="Global batch = this x processes.")
    group.add_argument("--lr", type=float, default=2.5e-4, help="Peak lr at a global batch of 256, scaled "
                       "linearly (1024 -> 1e-3, the paper's setting).")
    group.add_argument("--start_lr", type=float, default=5e-5, help="lr at the start of the warm-up, per 256 "
                       "images (1024 -> 2e-4, the paper's setting).")
    group.add_argument("--min_lr", type=float, default=1e-5, help="lr at the end of the cosine.")
    group.add_argument("--warmup_epochs", type=int, default=15, help="Linear lr warm-up epochs.")
    group.add_argument("--weight_decay", type=float, default=0.04, help="Initial weight decay (cosine).")
    group.add_argument("--weight_decay_end", type=float, default=0.4, help="Final weight decay.")
    group.add_argument("--clip_grad", type=float, default=1.0, help="Clip the global gradient norm (0: off).")
    group.add_argument("--precision", default=None, choices=["bf16", "fp16", "fp32"], help="Autocast dtype "
                       "(default bf16 on GPU, fp32 on CPU). The teacher runs in that dtype, similarities in fp32.")
    group.add_argument("--compile", action="store_true", help="torch.compile teacher, student and loss (ViTs per "
                       "block: quick to compile). Faster on GPU once compiled.")
    group.add_argument("--overlap_teacher", action=argparse.BooleanOptionalAction, default=True, help="On GPU, "
                       "run the teacher on a second CUDA stream, concurrently with the student's forward.")
    group = parser.add_argument_group("multi-crop")
    group.add_argument("--global_crops_scale", type=float, nargs=2, default=(0.3, 1.0))
    group.add_argument("--local_crops_number", type=int, default=10, help="Small crops (student only).")
    group.add_argument("--local_crops_scale", type=float, nargs=2, default=(0.05, 0.3))
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
class MSNProjection(nn.Module):
    """MSN's projection `fc`: Linear, BN, GELU, Linear, BN, GELU, Linear (the official names fc1, bn1, fc2, bn2,
    fc3, so that MSN releases load). The teacher's output; also the baseline student's head."""

    def __init__(self, in_dim, hidden_dim=2048, out_dim=256):
        super().__init__()
        self.fc1, self.bn1 = nn.Linear(in_dim, hidden_dim), nn.BatchNorm1d(hidden_dim)
        self.fc2, self.bn2 = nn.Linear(hidden_dim, hidden_dim), nn.BatchNorm1d(hidden_dim)
        self.fc3 = nn.Linear(hidden_dim, out_dim)
        for m in (self.fc1, self.fc2, self.fc3):
            nn.init.trunc_normal_(m.weight, std=0.02)
            nn.init.zeros_(m.bias)

    def forward(self, x):
        x = F.gelu(self.bn2(self.fc2(F.gelu(self.bn1(self.fc1(x))))))
        return self.fc3(x.to(self.fc3.weight.dtype))  # a bf16 teacher keeps fc3 in fp32: cosines / 0.025 need it


class MLPHead(nn.Sequential):
    """The RoB student head: Linear, BN (convnets), GELU, Linear -> logits over the teacher's K prototypes."""

    def __init__(self, in_dim, out_dim, hidden_dim=2048, use_bn=False):
        super().__init__(nn.Linear(in_dim, hidden_dim), nn.BatchNorm1d(hidden_dim) if use_bn else nn.Identity(),
                         nn.GELU(), nn.Linear(hidden_dim, out_dim))


def drop_patch_tokens(tokens, patch_drop, n_prefix=1):
    """MSN's masking: keep the prefix (CLS) tokens and a random subset of exactly round((1 - patch_drop) * N) of
    the N patch tokens, drawn independently for every image (MSN's code floors the count and draws one subset
    for the whole batch). Dropped tokens are removed, not replaced. tokens: [B, n_prefix + N, D] -> [B, n_prefix + n_keep, D]."""
    b, n, d = tokens.shape[0], tokens.shape[1] - n_prefix, tokens.shape[2]
    n_keep = round((1 - patch_drop) * n)
    keep = torch.rand(b, n, device=tokens.device).argsort(dim=1)[:, :n_keep] + n_prefix  # [B, n_keep]
    return torch.cat([tokens[:, :n_prefix], tokens.gather(1, keep[..., None].expand(-1, -1, d))], dim=1)


def vit_forward_dropping_tokens(vit, images, patch_drop):
    """A timm ViT's forward (CLS after the final norm) with patch tokens dropped once the positional embeddings
    are added: the backbone stays a plain timm model (export, evaluation), only this pass differs."""
    tokens = drop_patch_tokens(vit._pos_embed(vit.patch_embed(images)), patch_drop, vit.num_prefix_tokens)
    return vit.forward_head(vit.norm(vit.blocks(vit.norm_pre(tokens))))


class MultiCropNetwork(nn.Module):
    """Backbone + head over a list of crops: one backbone pass per run of same-sized crops (the globals
    together, the locals together), one head pass over all features. Returns [n_crops * B, out], crop-major.
    `patch_drop` > 0 (ViT students) drops tokens in the first run, the global crops, as MSN does. `prototypes`:
    the frozen teacher's (a buffer) or the baseline student's (a parameter, trained with it)."""

    def __init__(self, backbone, head, patch_drop=0.0, prototypes=None):
        super().__init__()
        self.backbone, self.head, self.patch_drop = backbone, head, patch_drop
        if isinstance(prototypes, nn.Parameter):
            self.prototypes = prototypes
        else:
            self.register_buffer("prototypes", prototypes)

    def forward(self, crops):
        runs = [torch.cat(list(run)) for _, run in itertools.groupby(crops, key=lambda crop: crop.shape[-1])]
        features = [vit_forward_dropping_tokens(self.backbone, run, self.patch_drop) if i == 0 and self.patch_drop
                    else self.backbone(run) for i, run in enumerate(runs)]
        return self.head(torch.cat(features))


# --------------------------------------------------------------------------------------------- teacher
def load_teacher(name_or_path, num_heads=None):
    """The frozen RoB teacher (backbone + projection + prototypes, eval, no grad) from an official name
    (downloaded once into the torch.hub cache) or a local file. `num_heads`: for ViTs of non-standard width."""
    source = URL.format(TEACHERS[name_or_path][0]) if name_or_path in TEACHERS else name_or_path
    return teacher_from_checkpoint(common.load_file(source, "MSN teacher checkpoint"), source, num_heads)


def teacher_from_checkpoint(ckpt, source, num_heads=None):
    """Recognise the checkpoint's format, build the matching backbone and head from its tensors and load
    them strictly. Accepts MSN releases (and MSN training checkpoints) and this script's own; refuses the rest
    with the fix. A RoB-MSN student teaches through its logits (teacher.prototypes is None)."""
    if not isinstance(ckpt, dict):
        raise ValueError(f"{source} is not a checkpoint dictionary")
    method = ckpt.get("method")
    if method == "rob_msn":  # a checkpoint of this script: its EMA target encoder (baseline runs) or its student
        backbone = common.create_backbone({**ckpt["arch"], "kwargs": {**ckpt["arch"]["kwargs"], "drop_path_rate": 0.0}})
        if ckpt.get("teacher") is not None:
            sd, prototypes = ckpt["teacher"], ckpt["student"]["prototypes"]
            head = MSNProjection(*projection_sizes(common.sub_state_dict(sd, "head.")))
        else:
            sd, prototypes = ckpt["student"], None
            first, last = sd["head.0.weight"], sd["head.3.weight"]
            head = MLPHead(first.shape[1], last.shape[0], first.shape[0], use_bn="head.1.weight" in sd)
        common.load_strict(backbone, common.sub_state_dict(sd, "backbone."), source, "rob_msn.py checkpoint")
        head_sd = common.sub_state_dict(sd, "head.")
    elif method is not None:
        raise ValueError(f"{source} was written by {method}.py, not rob_msn.py: a RoB-MSN teacher needs an MSN "
                         f"projection and prototypes. Use {method}.py with it, or give an MSN checkpoint.")
    elif "target_encoder" in ckpt:  # an MSN release {target_encoder, prototypes} (or an MSN training checkpoint)
        if "prototypes" not in ckpt:
            raise ValueError(f"{source} has a target encoder but no prototypes: give the complete MSN release, "
                             "e.g. " + URL.format(TEACHERS["msn_vitl16"][0]))
        sd = common.strip_prefix(ckpt["target_encoder"], "module.")
        backbone_sd = {k: v for k, v in sd.items() if not k.startswith("fc.")}
        head_sd, prototypes = common.sub_state_dict(sd, "fc."), ckpt["prototypes"]
        if "fc1.weight" not in head_sd:
            raise ValueError(f"{source}: the target encoder has no projection head (fc.fc1 ... fc.fc3)")
        backbone, _ = common.backbone_from_state_dict(backbone_sd, num_heads)
        head = MSNProjection(*projection_sizes(head_sd))
        common.load_strict(backbone, backbone_sd, source, "MSN target encoder backbone")
    else:
        flat = common.strip_prefix(ckpt.get("state_dict", ckpt), "module.")
        if isinstance(ckpt.get("teacher"), dict):
            kind = "an iBOT" if any("last_layer2" in k for k in ckpt["teacher"]) else "a DINO"
            raise ValueError(f"{source} is {kind} checkpoint: use rob_{kind.split()[1].lower()}.py with it.")
        if "prototypes.weight" in flat:
            raise ValueError(f"{source} is a SwAV checkpoint: use rob_swav.py with it.")
        if "cls_token" in flat or "conv1.weight" in flat:
            raise ValueError(f"{source} holds an encoder only; RoB-MSN needs the projection head and prototypes "
                             "too, which the MSN releases contain ({target_encoder, prototypes}), e.g. "
                             + URL.format(TEACHERS["msn_vitl16"][0]) + f" (or pass --teacher {'/'.join(TEACHERS)}).")
        raise ValueError(f"{source} is not an MSN checkpoint (expected a dict with 'target_encoder' and 'prototypes').")
    common.load_strict(head, head_sd, source, "MSN projection head" if prototypes is not None else "RoB-MSN head")
    return freeze(MultiCropNetwork(backbone, head, prototypes=None if prototypes is None else prototypes.float()))


def projection_sizes(sd):
    """(in, hidden, out) widths of an MSN projection state dict."""
    return sd["fc1.weight"].shape[1], sd["fc1.weight"].shape[0], sd["fc3.weight"].shape[0]


def freeze(model):
    model.eval().requires_grad_(False)
    return model


def random_teacher(name):
    """An official teacher architecture with random weights (for --benchmark: no download)."""
    _, backbone_name, patch = TEACHERS[name]
    backbone, _ = common.build_teacher_backbone(backbone_name, patch_size=patch)
    head = MSNProjection(common.feature_dim(backbone))
    return freeze(MultiCropNetwork(backbone, head, prototypes=F.normalize(torch.randn(1024, 256), dim=-1)))


# ------------------------------------------------------------------------------------------------- loss
def prototype_scores(projection, prototypes):
    """Cosine similarities [N, K] of the L2-normalised projections [N, d] to the L2-normalised prototypes
    [K, d], in fp32."""
    return F.normalize(projection.float(), dim=-1) @ F.normalize(prototypes.float(), dim=-1).T


def teacher_probs(teacher_out, prototypes, temp):
    """The RoB seam: the frozen teacher's projection becomes the target distribution
    softmax(cos(projection, prototypes) / 0.025). A RoB-MSN student used as teacher has no prototypes: its
    outputs are already logits over them, and temp is then the student temperature it was trained at."""
    logits = teacher_out.float() if prototypes is None else prototype_scores(teacher_out, prototypes)
    return F.softmax(logits / temp, dim=-1)


def view_pairs(n_global, n_crops, swapped):
    """(teacher view, student crop) pairs. Same-view: teacher view i -> student crop i and every local crop.
    Swapped: teacher view i -> every student crop except i."""
    if swapped:
        return [(t, s) for t in range(n_global) for s in range(n_crops) if s != t]
    return [(t, s) for t in range(n_global) for s in range(n_crops) if s == t or s >= n_global]


def distillation_loss(student_logits, teacher_probs, pairs, student_temp):
    """Mean over pairs of the batch-mean cross-entropy H(teacher_probs[t], softmax(student_logits[s] / T)).
    student_logits: [n_crops * B, K], teacher_probs: [n_teacher_views * B, K] (both crop-major)."""
    n_crops, n_teacher = max(s for _, s in pairs) + 1, max(t for t, _ in pairs) + 1
    student_log_probs = F.log_softmax(student_logits.float() / student_temp, dim=-1).chunk(n_crops)
    targets = teacher_probs.chunk(n_teacher)
    return sum(-(targets[t] * student_log_probs[s]).sum(-1).mean() for t, s in pairs) / len(pairs)


# --- plain-MSN baseline only: RoB's frozen teacher needs neither of these
@torch.no_grad()
def sinkhorn(probs, n_iterations=3):
    """MSN's Sinkhorn-Knopp balancing of the targets [B, K] over the global batch: alternately give every
    prototype the same total mass (column sums all-reduced across processes) and renormalise every image's
    row to 1. Constant factors of MSN's version (1/K, 1/B) cancel in the final row normalisation."""
    q = probs.float()
    for _ in range(n_iterations):
        q = q / common.all_reduce_mean(q.sum(0, keepdim=True))
        q = q / q.sum(1, keepdim=True)
    return q


def me_max(student_logits, student_temp):
    """MSN's mean-entropy maximisation: sum_k p_k log p_k + log K for the average prediction p over every anchor
    view of the global batch (0 when all prototypes are used equally). The value is all-reduced; the gradient
    stays local, and DDP's gradient averaging then makes it that of the global average."""
    local = F.softmax(student_logits.float() / student_temp, dim=-1).mean(0)
    average = local + (common.all_reduce_mean(local.detach()) - local.detach())
    return (average * average.log()).sum() + math.log(len(average))


# ---------------------------------------------------------------------------------------------- training
def main(args):
    rank, world_size, device = common.init_distributed()
    common.seed_everything(common.mix_seed(args.seed, rank))
    ema = args.teacher == "ema"
    precision = args.precision or ("bf16" if device.type == "cuda" else "fp32")
    amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[precision]
    n_global = 2
    n_teacher = 1 if ema else n_global  # MSN's target encoder sees global crop 0 only; RoB's teacher both
    output_dir = Path(args.output_dir)
    if common.is_main_process() and not args.benchmark:
        output_dir.mkdir(parents=True, exist_ok=True)
    common.log("\n".join(f"{k}: {v}" for k, v in sorted(vars(args).items())))

    # ---- data: MSN's multi-crop augmentation (its make_transforms with colour strength 0.5): colour jitter
    # (0.4, 0.4, 0.4, 0.1) with p 0.8, grayscale 0.2, blur p 0.5 on every crop, no solarise, flip, bilinear
    augmentation = common.MultiCropAugmentation(
        args.global_crops_size, args.local_crops_size, n_global, args.local_crops_number, args.global_crops_scale,
        args.local_crops_scale, color_jitter=(0.4, 0.4, 0.4, 0.1), blur_p=(0.5, 0.5, 0.5), solarize_p=(0.0, 0.0, 0.0),
        interpolation="bilinear")
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
    patch_drop = 0.0 if convnet else args.patch_drop if args.patch_drop is not None else \
        0.10 if arch["name"].startswith("vit_tiny") else 0.15
    if not 0 <= patch_drop < 1:
        raise ValueError(f"--patch_drop {patch_drop}: give a fraction in [0, 1)")
    if ema:  # baseline: MSN's projection and learned prototypes (uniform init as MSN's), trained together
        head = MSNProjection(dim, args.hidden_dim, args.bottleneck_dim)
        bound = args.bottleneck_dim ** -0.5
        prototypes = nn.Parameter(torch.empty(args.out_dim, args.bottleneck_dim).uniform_(-bound, bound))
        student = MultiCropNetwork(backbone, head, patch_drop, prototypes).to(device)
        teacher_arch = {**arch, "kwargs": {**arch["kwargs"], "drop_path_rate": 0.0}}
        teacher = MultiCropNetwork(common.create_backbone(teacher_arch), copy.deepcopy(head))
        teacher.backbone.load_state_dict(backbone.state_dict())
        teacher.requires_grad_(False)  # left in train mode, as MSN's: its BN normalises with the batch statistics
    else:  # the student's head predicts logits over the teacher's K prototypes
        teacher = random_teacher(args.teacher) if args.benchmark else load_teacher(args.teacher)
        out_dim = len(teacher.prototypes) if teacher.prototypes is not None else teacher.head[-1].out_features
        patch = getattr(getattr(teacher.backbone, "patch_embed", None), "patch_size", (1,))[0]
        if args.global_crops_size % patch:
            raise ValueError(f"--global_crops_size {args.global_crops_size} is not a multiple of the teacher's "
                             f"patch size {patch}: the teacher sees the global crops.")
        student = MultiCropNetwork(backbone, MLPHead(dim, out_dim, use_bn=convnet), patch_drop).to(device)
    teacher.to(device)
    teacher_dtype = torch.float32
    if not ema and device.type == "cuda" and precision != "fp32":  # frozen teacher stored in bf16 (fp32 fc3)
        teacher_dtype = amp_dtype
        teacher.backbone.to(amp_dtype)
        teacher.head.to(amp_dtype)
        if isinstance(teacher.head, MSNProjection):
            teacher.head.fc3.float()
    if convnet:
        student = student.to(memory_format=torch.channels_last)
    if not common.is_vit(teacher.backbone):
        teacher = teacher.to(memory_format=torch.channels_last)
    if world_size > 1 and device.type == "cuda":  # SyncBatchNorm needs GPUs; on CPU each process keeps its own
        student = nn.SyncBatchNorm.convert_sync_batchnorm(student)
        if ema:
            teacher = nn.SyncBatchNorm.convert_sync_batchnorm(teacher)
    student_ddp = DistributedDataParallel(student, device_ids=[device.index] if device.type == "cuda" else None) \
        if world_size > 1 else student
    loss_fn = distillation_loss
    if args.compile:  # in place, so checkpoints keep their keys; ViTs per block (fast to compile)
        for network in (student, teacher):
            common.compile_model(network.backbone)
            network.head.compile()
        loss_fn = torch.compile(distillation_loss)
    overlap = args.overlap_teacher and device.type == "cuda"
    teacher_stream = torch.cuda.Stream(device) if overlap else None
    n_params = sum(p.numel() for p in student.parameters())
    common.log(f"student {args.student}: {n_params / 1e6:.1f}M parameters, patch drop {patch_drop}, head -> "
               f"{len(student.prototypes) if ema else out_dim}; teacher: {args.teacher}")

    # ---- loss pairing, optimiser and per-iteration schedules
    if ema:  # MSN: every anchor view (global crop 1, tokens dropped, and the locals) predicts crop 0's target
        pairs = [(0, s) for s in range(n_global - 1 + args.local_crops_number)]
    else:
        pairs = view_pairs(n_global, n_global + args.local_crops_number, swapped=args.swapped)
    network_params = list(student.backbone.parameters()) + list(student.head.parameters())  # all but prototypes
    global_batch = args.batch_size_per_gpu * world_size
    groups = common.param_groups(nn.ModuleList([student.backbone, student.head]))
    if ema:
        groups[1]["params"].append(student.prototypes)  # MSN: prototypes without weight decay
    optimizer = torch.optim.AdamW(groups, fused=device.type == "cuda")
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
    lr_schedule = common.cosine_schedule(args.lr * global_batch / 256, args.min_lr, args.epochs, iters_per_epoch,
                                         args.warmup_epochs, warmup_start=args.start_lr * global_batch / 256)
    wd_schedule = common.cosine_schedule(args.weight_decay, args.weight_decay_end, args.epochs, iters_per_epoch)
    if ema:  # MSN's momentum: linear from 0.996 to 1 over 1.25x the run (it ends near 0.9992)
        total = args.epochs * iters_per_epoch
        momentum_schedule = torch.linspace(args.momentum_teacher, 1.0, int(1.25 * total) + 1, dtype=torch.float64)
        momentum_schedule = momentum_schedule[:total].tolist()
        teacher_params = list(teacher.parameters())
    target_temp = args.teacher_temp if ema or teacher.prototypes is not None else args.student_temp

    def teacher_targets_of(crops):
        with torch.no_grad(), torch.autocast(device.type, amp_dtype, enabled=ema and precision != "fp32"):
            teacher_out = teacher([c.to(teacher_dtype) for c in crops[:n_teacher]])
            return teacher_probs(teacher_out, (student if ema else teacher).prototypes, target_temp)

    def train_step(crops, it):
        """One optimisation step on a batch (list of crops, globals first); returns the loss terms (a tensor)."""
        for i, group in enumerate(optimizer.param_groups):
            group["lr"] = lr_schedule[it]
            if i == 0:
                group["weight_decay"] = wd_schedule[it]
        torch.manual_seed(common.mix_seed(args.seed, rank, it))  # token drop, drop-path: reproducible on resume
        if overlap:  # the teacher runs on a second stream, concurrently with the student's forward
            teacher_stream.wait_stream(torch.cuda.current_stream(device))
            with torch.cuda.stream(teacher_stream):
                targets = teacher_targets_of(crops)
        else:
            targets = teacher_targets_of(crops)
        with torch.autocast(device.type, amp_dtype, enabled=precision != "fp32"):
            student_out = student_ddp(crops[n_teacher:] if ema else crops)
        if overlap:
            torch.cuda.current_stream(device).wait_stream(teacher_stream)
        if ema:  # baseline: Sinkhorn-balanced targets, cosine scores against the learned prototypes, + me-max
            scores = prototype_scores(student_out, student.prototypes)
            regulariser = me_max(scores, args.student_temp)
            loss = loss_fn(scores, sinkhorn(targets, args.sinkhorn_iterations), pairs, args.student_temp)
            loss = loss + args.memax_weight * regulariser
        else:
            loss = loss_fn(student_out, targets, pairs, args.student_temp)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        if args.clip_grad:
            scaler.unscale_(optimizer)
            nn.utils.clip_grad_norm_(network_params, args.clip_grad)  # MSN leaves the prototypes out
        scaler.step(optimizer)
        scaler.update()
        if ema:  # baseline: target encoder <- momentum * target encoder + (1 - momentum) * student
            with torch.no_grad():
                torch._foreach_lerp_(teacher_params, network_params, 1 - momentum_schedule[it])
            return torch.stack([loss.detach(), regulariser.detach()])
        return loss.detach()[None]

    if args.benchmark:  # a fixed synthetic batch on the device; FLOPs counted on an eager step
        crops = benchmark_batch(args, n_global, device)
        with torch.compiler.set_stance("force_eager"):
            flops_per_image = common.count_flops(lambda: train_step(crops, 0)) / args.batch_size_per_gpu
        steps = iter(range(10 ** 9))
        return common.benchmark(lambda: train_step(crops, next(steps) % iters_per_epoch), args.benchmark, 3,
                                global_batch, flops_per_image, device, amp_dtype,
                                f"RoB-MSN {args.student} <- {args.teacher}, batch {args.batch_size_per_gpu}/GPU, "
                                f"{n_global}x{args.global_crops_size} + {args.local_crops_number}x{args.local_crops_size}, "
                                f"patch drop {patch_drop}" + (", compiled" if args.compile else "")
                                + (", teacher on a side stream" if overlap else ""))

    # ---- resume (output_dir/checkpoint.pth), then the loop
    start_step = 0
    ckpt = common.load_resume_checkpoint(output_dir, "rob_msn")
    if ckpt is not None:
        student.load_state_dict(ckpt["student"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scaler.load_state_dict(ckpt["scaler"])
        if ema:
            teacher.load_state_dict(ckpt["teacher"])
        start_step = ckpt["step"]
        common.log(f"resumed from {output_dir / 'checkpoint.pth'} at step {start_step} (epoch {ckpt['epoch']})")

    def save_checkpoint(step, epoch):
        if not common.is_main_process():
            return
        state = dict(method="rob_msn", arch=arch, args=vars(args), step=step, epoch=epoch,
                     student=student.state_dict(), optimizer=optimizer.state_dict(), scaler=scaler.state_dict())
        if ema:  # the EMA target encoder (backbone.*, head.*); its prototypes are the student's
            state.update(teacher=teacher.state_dict())
        common.save_atomic(state, output_dir / "checkpoint.pth")
        if args.saveckp_freq and step % iters_per_epoch == 0 and epoch % args.saveckp_freq == 0:
            common.save_atomic(state, output_dir / f"checkpoint{epoch:04}.pth")
        common.export_timm(student.backbone, arch, output_dir / "student_timm.pth")

    stop, stats = common.StopRequest(), common.StepStats()
    step = start_step

    term_names = ["train_loss", "me_max"] if ema else ["train_loss"]

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
            terms = train_step(crops, step)
            # averaged over processes with a stop vote; read one step late, so the host never waits for the GPU
            previous = stats.push(torch.cat([terms, torch.tensor([float(stop.requested)], device=device)]))
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
    main(argparse.ArgumentParser("RoB-MSN", parents=[get_args_parser()]).parse_args())
