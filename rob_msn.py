"""RoB-MSN: train a small network by distillation from a frozen, pretrained MSN model. Runs with common.py beside it.

MSN (Masked Siamese Networks) trains an anchor branch that sees masked views (part of the patch tokens dropped) to
predict, over learned prototypes, the soft assignment an EMA target encoder gives an unmasked view. RoB ("Replace one
Branch") replaces the target branch by a released MSN target encoder (ViT + projection + 1024 prototypes), frozen:
the target is softmax(cos(projection, prototypes) / 0.025), without Sinkhorn, me-max or EMA. The student, a fresh
ViT-Tiny / ResNet-18 / ..., predicts it through two linear layers from the same global crops (10-15 % of a ViT's
patch tokens dropped) and the local crops. RoB-MSN students are strong with few labels (eval_linear.py --low_shot).

    torchrun --nproc_per_node=8 rob_msn.py --student vit_small --teacher msn_vitl16 --data_path /data/imagenet/train

The recipe (the defaults): teacher MSN ViT-L/16; student head Linear [d, 2048] -> Linear [2048, 1024], no activation;
CE at 0.1, same-view pairing; 10 % (ViT-Tiny) or 15 % of the global crops' tokens dropped; 2 x 224 px crops (0.3, 1)
+ 10 x 96 px (0.05, 0.3), MSN's augmentation; AdamW, lr 2e-4 -> 1e-3 at batch 1024 over 15 epochs, cosine to 1e-5,
weight decay 0.04 -> 0.4, gradient norm clipped at 1, no drop-path. `--teacher ema` runs plain MSN (EMA, learned
prototypes, Sinkhorn, me-max), the paper's baseline and a way to pretrain a teacher (any checkpoint.pth of this script
is a valid --teacher).
"""
import argparse, contextlib, copy, datetime, fcntl, itertools, json, math, multiprocessing, os, signal, sys, time
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

import common

METHOD = "rob_msn"
TEACHERS = {  # official MSN releases {target_encoder, prototypes}: name -> (release, backbone, patch)
    "msn_vits16": ("vits16_800ep", "vit_small", 16), "msn_vitb16": ("vitb16_600ep", "vit_base", 16),
    "msn_vitl16": ("vitl16_600ep", "vit_large", 16), "msn_vitb4": ("vitb4_300ep", "vit_base", 4),
    "msn_vitl7": ("vitl7_200ep", "vit_large", 7)}
URL = "https://dl.fbaipublicfiles.com/msn/{0}.pth.tar"


# ---------------------------------------------------------------------------------------- the RoB target and loss
def prototype_scores(projection, prototypes):
    """Cosine similarities [N, K] of the L2-normalised projections [N, d] to the L2-normalised prototypes [K, d]."""
    return F.normalize(projection.float(), dim=-1) @ F.normalize(prototypes.float(), dim=-1).T


def teacher_probs(teacher_out, prototypes, temp):
    """The RoB seam: the frozen teacher's projection becomes the targets softmax(cos(projection, prototypes) / 0.025)
    (a RoB-MSN student as teacher gives logits over them: no prototypes, and temp its student temperature)."""
    logits = teacher_out.float() if prototypes is None else prototype_scores(teacher_out, prototypes)
    return F.softmax(logits / temp, dim=-1)


def view_pairs(n_teacher, n_crops, swapped=False):
    """(teacher view t, student crop s) pairs: same-view (RoB's) s = t or s a crop no teacher sees; swapped s != t."""
    return [(t, s) for t in range(n_teacher) for s in range(n_crops)
            if (s != t if swapped else s == t or s >= n_teacher)]


def multi_crop_cross_entropy(student_logits, target_probs, pairs, student_temp):
    """Mean over pairs of the batch-mean cross-entropy H(target_probs[t], softmax(student_logits[s] / T)).
    student_logits: [n_crops * B, K], target_probs: [n_teacher * B, K], both crop-major; in fp32."""
    n_crops, n_teacher = max(s for _, s in pairs) + 1, max(t for t, _ in pairs) + 1
    student_log_probs = F.log_softmax(student_logits.float() / student_temp, dim=-1).chunk(n_crops)
    targets = target_probs.chunk(n_teacher)
    return sum(-(targets[t] * student_log_probs[s]).sum(-1).mean() for t, s in pairs) / len(pairs)


# ---------------------------------------------------------------------------------------------------- networks
class MSNProjection(nn.Module):
    """MSN's projection `fc` (fc1 bn1 GELU fc2 bn2 GELU fc3, the official names): the teacher's, and the baseline's."""

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


class LinearHead(nn.Sequential):
    """The RoB student head, as the reference's: Linear, BN (convnets), Linear, no activation -> K logits."""

    def __init__(self, in_dim, out_dim, hidden_dim=2048, use_bn=False):
        super().__init__(nn.Linear(in_dim, hidden_dim), nn.BatchNorm1d(hidden_dim) if use_bn else nn.Identity(),
                         nn.Linear(hidden_dim, out_dim))


def drop_patch_tokens(tokens, patch_drop, n_prefix=1):
    """MSN's masking: keep the prefix (CLS) tokens and a random subset of exactly round((1 - patch_drop) * N) of the N
    patch tokens, drawn independently for every image (MSN's code floors the count and draws one subset for the whole
    batch). Dropped tokens are removed, not replaced. tokens: [B, n_prefix + N, D] -> [B, n_prefix + n_keep, D]."""
    b, n, d = tokens.shape[0], tokens.shape[1] - n_prefix, tokens.shape[2]
    keep = torch.rand(b, n, device=tokens.device).argsort(dim=1)[:, :round((1 - patch_drop) * n)] + n_prefix
    return torch.cat([tokens[:, :n_prefix], tokens.gather(1, keep[..., None].expand(-1, -1, d))], dim=1)


def vit_forward_dropping_tokens(vit, images, patch_drop):
    """A timm ViT's forward, patch tokens dropped after the positional embeddings (the model stays a timm ViT)."""
    tokens = drop_patch_tokens(vit._pos_embed(vit.patch_embed(images)), patch_drop, vit.num_prefix_tokens)
    return vit.forward_head(vit.norm(vit.blocks(vit.norm_pre(tokens))))


class MSNNetwork(nn.Module):
    """common.MultiCropNetwork with MSN's token drop in the first run (the global crops) and prototypes: the frozen
    teacher's (a buffer) or the baseline student's (a parameter, trained with it)."""

    def __init__(self, backbone, head, patch_drop=0.0, prototypes=None):
        super().__init__()
        self.backbone, self.head, self.patch_drop = backbone, head, patch_drop
        register = self.register_parameter if isinstance(prototypes, nn.Parameter) else self.register_buffer
        register("prototypes", prototypes)  # the baseline's learned prototypes, or the teacher's (None: RoB's)

    def forward(self, crops):
        runs = [torch.cat(list(run)) for _, run in itertools.groupby(crops, key=lambda crop: crop.shape[-1])]
        features = [vit_forward_dropping_tokens(self.backbone, run, self.patch_drop) if i == 0 and self.patch_drop
                    else self.backbone(run) for i, run in enumerate(runs)]
        return self.head(torch.cat(features))


def build_student(args, teacher=None):
    """A fresh backbone (torch RNG) + a RoB head of the teacher's K, or (baseline) MSN's projection and prototypes."""
    backbone, dim, arch = common.student_backbone(args.student, args.global_crops_size, args.patch_size,
                                                  args.drop_path_rate)
    convnet = not common.is_vit(backbone)
    patch_drop = 0.0 if convnet else args.patch_drop if args.patch_drop is not None else \
        0.10 if arch["name"].startswith("vit_tiny") else 0.15
    if teacher is None:  # baseline: MSN's projection and learned prototypes (uniform init as MSN's), trained together
        bound = args.bottleneck_dim ** -0.5
        prototypes = nn.Parameter(torch.empty(args.out_dim, args.bottleneck_dim).uniform_(-bound, bound))
        return MSNNetwork(backbone, MSNProjection(dim, args.hidden_dim, args.bottleneck_dim), patch_drop,
                          prototypes), arch
    out_dim = len(teacher.prototypes) if teacher.prototypes is not None else teacher.head[-1].out_features
    return MSNNetwork(backbone, LinearHead(dim, out_dim, args.hidden_dim, use_bn=convnet), patch_drop), arch


def load_teacher(name_or_path, num_heads=None):
    """The frozen RoB teacher from an official name (downloaded once), an MSN release or this script's checkpoint."""
    source = common.source_of(name_or_path, TEACHERS, lambda name: URL.format(TEACHERS[name][0]),
                              "MSN release, or ema (the plain MSN baseline)")
    return teacher_from_checkpoint(common.load_file(source, "MSN teacher checkpoint"), source, num_heads)


def teacher_from_checkpoint(ckpt, source, num_heads=None):
    """A RoB-MSN student as teacher keeps its two-layer head (no prototypes); any other, MSN's projection."""
    backbone, sd, prototypes = common.teacher_parts(ckpt, source, METHOD, URL.format(TEACHERS["msn_vitl16"][0]),
                                                    num_heads)
    if prototypes is None:
        head = LinearHead(sd["0.weight"].shape[1], sd["2.weight"].shape[0], sd["0.weight"].shape[0], "1.weight" in sd)
    else:
        head = MSNProjection(sd["fc1.weight"].shape[1], sd["fc1.weight"].shape[0], sd["fc3.weight"].shape[0])
    common.load_strict(head, sd, source, "MSN projection head" if prototypes is not None else "RoB-MSN head")
    return common.freeze(MSNNetwork(backbone, head, prototypes=prototypes))


# ------------------------------------------------------------------------- the plain-MSN baseline (--teacher ema)
class PlainMSN:
    """What plain MSN adds, none of which RoB needs: the target encoder (left in train mode, as MSN's) is an EMA of
    the student (momentum linear from 0.996 to 1 over 1.25x the run), the prototypes are learned, the targets balanced
    by Sinkhorn, the predictions regularised by me-max; the target encoder sees global crop 0, the student the rest."""

    def __init__(self, student, arch, args, iters_per_epoch, device):
        teacher_arch = {**arch, "kwargs": {**arch["kwargs"], "drop_path_rate": 0.0}}
        self.teacher = MSNNetwork(common.create_backbone(teacher_arch), copy.deepcopy(student.head))
        self.teacher.load_state_dict({k: v for k, v in student.state_dict().items() if k != "prototypes"})
        self.teacher = common.sync_batchnorm(self.teacher.requires_grad_(False)).to(device)
        self.student_params, self.args = network_params(student), args
        total = args.epochs * iters_per_epoch
        momentum = torch.linspace(args.momentum_teacher, 1.0, int(1.25 * total) + 1, dtype=torch.float64)
        self.momentum = momentum[:total].tolist()

    def loss(self, student_out, teacher_out, prototypes, pairs):
        """CE of the student's cosine scores against the Sinkhorn-balanced targets, + me-max: (loss, me-max)."""
        scores, args = prototype_scores(student_out, prototypes), self.args
        regulariser = me_max(scores, args.student_temp)
        targets = sinkhorn(teacher_probs(teacher_out, prototypes, args.teacher_temp), args.sinkhorn_iterations)
        return multi_crop_cross_entropy(scores, targets, pairs, args.student_temp) + args.memax_weight * regulariser, \
            regulariser

    @torch.no_grad()
    def after_optimizer_step(self, step):
        torch._foreach_lerp_(list(self.teacher.parameters()), self.student_params, 1 - self.momentum[step])


def network_params(student):
    return [p for name, p in student.named_parameters() if name != "prototypes"]


@torch.no_grad()
def sinkhorn(probs, n_iterations=3):
    """MSN's Sinkhorn-Knopp balancing of the targets [B, K] over the global batch: every prototype the same total
    mass (column sums all-reduced), then every row back to 1 (MSN's constant factors 1/K, 1/B cancel)."""
    q = probs.float()
    for _ in range(n_iterations):
        q = q / common.all_reduce_mean(q.sum(0, keepdim=True))
        q = q / q.sum(1, keepdim=True)
    return q


def me_max(student_logits, student_temp):
    """MSN's mean-entropy maximisation: sum_k p_k log p_k + log K for the average prediction p over the global batch;
    the value all-reduced, the gradient local (DDP's averaging makes it that of the global average)."""
    local = F.softmax(student_logits.float() / student_temp, dim=-1).mean(0)
    average = local + (common.all_reduce_mean(local.detach()) - local.detach())
    return (average * average.log()).sum() + math.log(len(average))


# --------------------------------------------------------------------------------------------- the training step
def build_run(args, device, data, student, arch, teacher=None):
    """Everything a step reads, built here once: new_run()'s fields (lr warmed up from --start_lr) and RoB-MSN's own."""
    groups = param_groups(nn.ModuleList([student.backbone, student.head]))
    if teacher is None:
        groups[1]["params"].append(student.prototypes)  # the baseline's prototypes: no weight decay
    run = new_run(args, device, student, arch, len(data.loader), torch.optim.AdamW(groups, fused=device.type == "cuda"),
                  args.start_lr * args.batch_size_per_gpu * common.get_world_size() / 256)  # optimizer, warmup_start
    plain = PlainMSN(run.student, arch, args, run.iters_per_epoch, device) if teacher is None else None
    if teacher is not None:
        head = teacher.head  # in the teacher's dtype but fc3, fp32 (the cosines / 0.025 need it)
        low = [head.fc1, head.bn1, head.fc2, head.bn2] if isinstance(head, MSNProjection) else [head]
        teacher = common.place_teacher(teacher, device, run.teacher_dtype, [teacher.backbone, *low])
        common.check_patch(teacher.backbone, args.global_crops_size)
    run.data, run.plain, run.teacher = data, plain, teacher if teacher is not None else plain.teacher
    for network in (run.student, run.teacher) if args.compile else ():
        common.compile_network(network)
    run.loss_fn = torch.compile(multi_crop_cross_entropy) if args.compile else multi_crop_cross_entropy
    n_crops = 2 + args.local_crops_number
    run.pairs = view_pairs(2, n_crops, args.swapped) if plain is None else [(0, s) for s in range(n_crops - 1)]
    run.n_teacher = 2 if plain is None else 1  # the target encoder sees global crop 0 only; RoB's teacher both
    run.target_temp = args.teacher_temp if plain is not None or teacher.prototypes is not None else args.student_temp
    run.saved = {} if plain is None else dict(teacher=plain.teacher)
    return run


def train_step(run, batch, indices, step):
    crops = common.crops_on_device(run.data, batch, indices, run.device, step, not common.is_vit(run.student.backbone))
    with torch.no_grad(), torch.autocast(run.device.type, torch.bfloat16, enabled=run.plain is not None and run.amp):
        teacher_out = run.teacher([c.to(run.teacher_dtype) for c in crops[:run.n_teacher]])
    with torch.autocast(run.device.type, torch.bfloat16, enabled=run.amp):
        student_out = run.ddp(crops if run.plain is None else crops[run.n_teacher:])
    if run.plain is None:
        targets = teacher_probs(teacher_out, run.teacher.prototypes, run.target_temp)  # [2 * B, K]
        loss = run.loss_fn(student_out, targets, run.pairs, run.args.student_temp)
    else:
        loss, regulariser = run.plain.loss(student_out, teacher_out, run.student.prototypes, run.pairs)
    run.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if run.args.clip_grad:
        nn.utils.clip_grad_norm_(network_params(run.student), run.args.clip_grad)  # MSN leaves the prototypes out
    run.optimizer.step()
    if run.plain is not None:
        run.plain.after_optimizer_step(step)
    return {"train_loss": loss} if run.plain is None else {"train_loss": loss, "me_max": regulariser}


# ------------------------------------------------------------------------------------------ flags and main()
def get_args_parser():
    parser = argparse.ArgumentParser("RoB-MSN", add_help=False)
    group = parser.add_argument_group("model")
    group.add_argument("--student", default="vit_tiny", help="vit_tiny, vit_small, resnet18... or any timm name.")
    group.add_argument("--teacher", default="msn_vitl16", help=f"{', '.join(TEACHERS)}; an MSN release file; a "
                       "checkpoint.pth of this script; or 'ema' for the plain-MSN baseline.")
    group.add_argument("--patch_size", type=int, default=None, help="ViT student patch size (7 at 28 px).")
    group.add_argument("--drop_path_rate", type=float, default=0.0, help="Student stochastic depth (MSN: 0).")
    group.add_argument("--hidden_dim", type=int, default=2048, help="Hidden width of the student head.")
    group.add_argument("--patch_drop", type=float, default=None, help="Fraction of the global crops' patch tokens "
                       "dropped (default 0.10 for vit_tiny, 0.15 for other ViTs; convnets drop nothing).")
    group = parser.add_argument_group("temperatures and pairing")
    group.add_argument("--teacher_temp", type=float, default=0.025, help="Temperature of the teacher's cosines "
                       "(MSN's 0.1 x sharpening 0.25); a RoB-MSN student as teacher: --student_temp.")
    group.add_argument("--student_temp", type=float, default=0.1, help="Student softmax temperature.")
    group.add_argument("--swapped", action="store_true", help="Cross-view pairing (RoB).")
    group = parser.add_argument_group("plain-MSN baseline (--teacher ema): global crop 0 -> EMA target encoder, "
                                      "global crop 1 (tokens dropped) and the locals -> student")
    group.add_argument("--out_dim", type=int, default=1024, help="Number of learned prototypes K.")
    group.add_argument("--bottleneck_dim", type=int, default=256, help="Projection output (prototype) width.")
    group.add_argument("--momentum_teacher", type=float, default=0.996, help="EMA momentum, linear towards 1.")
    group.add_argument("--memax_weight", type=float, default=1.0, help="Weight of the me-max regulariser.")
    group.add_argument("--sinkhorn_iterations", type=int, default=3, help="Sinkhorn steps on the targets (0: off).")
    group.add_argument("--start_lr", type=float, default=5e-5, help="lr at the start of the warm-up, per 256 images.")
    add_run_args(parser)  # optimisation, multi-crop, data and runtime; RoB-MSN's defaults:
    parser.set_defaults(epochs=150, lr=2.5e-4, warmup_epochs=15, clip_grad=1.0, local_crops_number=10,
                        global_crops_scale=(0.3, 1.0), local_crops_scale=(0.05, 0.3))
    return parser


def check_args(args):
    check_flags(args, positive=["teacher_temp", "student_temp", "out_dim", "hidden_dim", "bottleneck_dim"],
                non_negative=["start_lr", "memax_weight", "sinkhorn_iterations"],
                fractions=["drop_path_rate", "momentum_teacher"])
    if args.patch_drop is not None and not 0 <= args.patch_drop < 1:
        raise common.UserError(f"--patch_drop {args.patch_drop}: give a fraction in [0, 1)")


def build_augmentation(args):
    """MSN's augmentation: colour strength 1 (jitter 0.8, 0.8, 0.8, 0.2), blur p 0.5, no solarisation, bilinear."""
    return common.MultiCropAugmentation(args.global_crops_size, args.local_crops_size, 2, args.local_crops_number,
                                        args.global_crops_scale, args.local_crops_scale,
                                        color_jitter=(0.8, 0.8, 0.8, 0.2), blur_p=(0.5, 0.5, 0.5),
                                        solarize_p=(0.0, 0.0, 0.0), interpolation="bilinear")


def main(args):
    check_args(args)
    device = common.init_distributed()
    with (locked_output_dir(args.output_dir) as output_dir,  # locked before any expensive work
          torch.random.fork_rng(devices=[device] if device.type == "cuda" else [])):  # the caller's RNG is kept
        data = common.training_data(args.data_path, build_augmentation(args), args.batch_size_per_gpu,
                                    args.num_workers, args.seed, args.subset, args.gpu_augment)
        teacher = None if args.teacher == "ema" else load_teacher(args.teacher)
        torch.manual_seed(common.mix_seed(args.seed, 0))  # the same initial student in every process, RoB or plain
        student, arch = build_student(args, teacher)
        return train(build_run(args, device, data, student, arch, teacher), data, output_dir, train_step)


# ======================================================================================================================
# Run machinery, the same text in the four rob_*.py files (tests/test_copies.py keeps it so): nothing of the method.
def add_run_args(parser):
    """The flags of every script, with generic defaults (a method sets its own with parser.set_defaults)."""
    group = parser.add_argument_group("optimisation and multi-crop")
    group.add_argument("--epochs", type=int, default=100)
    group.add_argument("--batch_size_per_gpu", type=int, default=64, help="Global batch = this x processes.")
    group.add_argument("--lr", type=float, default=5e-4, help="Peak lr at a global batch of 256, scaled linearly.")
    group.add_argument("--min_lr", type=float, default=1e-5, help="lr at the end of the cosine.")
    group.add_argument("--warmup_epochs", type=int, default=10, help="Linear lr warm-up.")
    group.add_argument("--weight_decay", type=float, default=0.04, help="Initial weight decay (none on biases, norms).")
    group.add_argument("--weight_decay_end", type=float, default=0.4, help="Final weight decay (cosine).")
    group.add_argument("--clip_grad", type=float, default=0.0, help="Clip the global gradient norm (0: off).")
    group.add_argument("--global_crops_scale", type=float, nargs=2, default=(0.25, 1.0), help="Area fractions.")
    group.add_argument("--local_crops_number", type=int, default=8, help="Small crops (student only).")
    group.add_argument("--local_crops_scale", type=float, nargs=2, default=(0.05, 0.25), help="Area fractions.")
    group.add_argument("--global_crops_size", type=int, default=224)
    group.add_argument("--local_crops_size", type=int, default=96)
    group = parser.add_argument_group("data, output and runtime")
    group.add_argument("--data_path", help="Required: a folder of images at any depth (labels unused), a text file "
                       "listing image paths, 'fashion-mnist' or 'synthetic'.")
    group.add_argument("--subset", type=int, default=0, help="Train on a seeded random subset of this many images.")
    group.add_argument("--output_dir", default="output", help="Checkpoints, log.txt, the exported student.")
    group.add_argument("--saveckp_freq", type=int, default=20, help="Also keep checkpointNNNN.pth every N epochs.")
    group.add_argument("--seed", type=int, default=0)
    group.add_argument("--num_workers", type=int, default=10, help="Data loader processes per GPU.")
    group.add_argument("--gpu_augment", action="store_true", help="Decode JPEGs and augment in batches on the device.")
    group.add_argument("--precision", choices=["bf16", "fp32"], help="Autocast dtype (default bf16 on GPU).")
    group.add_argument("--compile", action="store_true", help="torch.compile student and teacher (ViTs per block).")


def check_flags(args, positive=(), non_negative=(), fractions=()):
    """One line naming the flag for a value out of range: the shared flags and a method's own lists."""
    positive = ("epochs", "batch_size_per_gpu", "global_crops_size", "local_crops_size", "patch_size", *positive)
    non_negative = ("lr", "min_lr", "warmup_epochs", "weight_decay", "weight_decay_end", "clip_grad", "subset",
                    "local_crops_number", "num_workers", "saveckp_freq", *non_negative)
    for names, ok, rule in ((positive, lambda v: v > 0, "> 0"), (non_negative, lambda v: v >= 0, ">= 0"),
                            (fractions, lambda v: 0 <= v <= 1, "in [0, 1]")):
        for name in names:
            values = getattr(args, name)
            values = [] if values is None else values if isinstance(values, (list, tuple)) else [values]
            if not all(ok(v) for v in values):
                raise common.UserError(f"--{name} {' '.join(map(str, values))}: must be {rule}")
    for low, high, name in [(*args.global_crops_scale, "global"), (*args.local_crops_scale, "local")]:
        if not 0 < low <= high <= 1:
            raise common.UserError(f"--{name}_crops_scale {low} {high}: give 0 < low <= high <= 1 (area fractions)")
    if args.warmup_epochs >= args.epochs:
        raise common.UserError(f"--warmup_epochs {args.warmup_epochs} leaves nothing of a {args.epochs}-epoch run")
    if args.data_path is None:
        raise common.UserError("--data_path is required: an image folder, a list file, 'fashion-mnist' or 'synthetic'")


def new_run(args, device, student, arch, iters_per_epoch, optimizer=None, warmup_start=0.0, min_lr=None):
    """What every step reads, whatever the method; `ddp`: the network a step calls, `step`: where training starts."""
    amp, (student, ddp) = device.type == "cuda" and args.precision != "fp32", common.place_student(student, device)
    global_batch = args.batch_size_per_gpu * common.get_world_size()
    return SimpleNamespace(
        args=args, device=device, amp=amp, teacher_dtype=torch.bfloat16 if amp else torch.float32, student=student,
        ddp=ddp, arch=arch, iters_per_epoch=iters_per_epoch, global_batch=global_batch, step=0,
        optimizer=optimizer or torch.optim.AdamW(param_groups(student), fused=device.type == "cuda"),
        lr_schedule=cosine_schedule(args.lr * global_batch / 256, args.min_lr if min_lr is None else min_lr,
                                    args.epochs, iters_per_epoch, args.warmup_epochs, warmup_start),
        wd_schedule=cosine_schedule(args.weight_decay, args.weight_decay_end, args.epochs, iters_per_epoch))


def param_groups(model):
    """AdamW groups: weight decay on weight matrices and kernels only (the first group's follows the schedule)."""
    params = [(p.ndim <= 1 or name.endswith(".bias"), p) for name, p in model.named_parameters() if p.requires_grad]
    return [{"params": [p for no_decay, p in params if not no_decay]},
            {"params": [p for no_decay, p in params if no_decay], "weight_decay": 0.0}]


def cosine_schedule(base, final, epochs, iters_per_epoch, warmup_epochs=0, warmup_start=0.0):
    """Per-iteration values: linear warm-up from warmup_start to base, then cosine from base to final."""
    warmup = torch.linspace(warmup_start, base, int(warmup_epochs * iters_per_epoch) + 1, dtype=torch.float64)[:-1]
    steps = epochs * iters_per_epoch - len(warmup)
    cosine = final + 0.5 * (base - final) * (1 + torch.cos(math.pi * torch.arange(steps, dtype=torch.float64) / steps))
    return torch.cat([warmup, cosine]).tolist()


def train(run, data, output_dir, train_step):
    """Resume the run if output_dir holds one, train to the end of --epochs, saving after every epoch and when SIGTERM,
    SIGINT or SIGUSR1 ask to stop (a second Ctrl-C stops at once). Returns the exit code: 0, or 128 + the signal."""
    args, stop = run.args, []
    common.log(f"{METHOD}: student {args.student} ({sum(p.numel() for p in run.student.parameters()) / 1e6:.1f}M "
               f"parameters) <- teacher {args.teacher}; {len(data.dataset)} images from {args.data_path}, "
               f"{run.iters_per_epoch} steps x {args.epochs} epochs; output in {output_dir}")
    resume(run, data, output_dir)

    def request_stop(signum, frame):
        if stop and signum == signal.SIGINT:
            raise KeyboardInterrupt
        stop.append(signum)
    handlers = {sig: signal.signal(sig, request_stop) for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)}
    try:
        return train_epochs(run, data, output_dir, train_step, stop)
    finally:  # the host program's handlers back (main() used as a library)
        for sig, handler in handlers.items():
            signal.signal(sig, handler)


def train_epochs(run, data, output_dir, train_step, stop):
    """train()'s loop from run.step; `stop` lists the stop signals received."""
    args, step = run.args, run.step
    for epoch in range(step // run.iters_per_epoch, args.epochs):
        data.sampler.set_epoch(epoch, start_batch=step - epoch * run.iters_per_epoch)  # mid-epoch after a resume
        logged, stopping, start = [], False, time.time()
        progress = tqdm(data.loader, desc=f"epoch {epoch}", initial=step - epoch * run.iters_per_epoch,
                        total=run.iters_per_epoch, disable=common.get_rank() != 0, dynamic_ncols=True)
        for batch, indices in progress:
            for i, group in enumerate(run.optimizer.param_groups):  # the step's lr and weight decay (first group)
                group.update(lr=run.lr_schedule[step], **({"weight_decay": run.wd_schedule[step]} if i == 0 else {}))
            torch.manual_seed(common.mix_seed(args.seed, common.get_rank(), step))  # drop-path, token drops: resumable
            terms = train_step(run, batch, indices, step)  # name -> 0-d tensor, read with every process's stop vote
            values = torch.stack([*terms.values(), terms["train_loss"].new_tensor(float(bool(stop)))]).detach().float()
            *values, votes = common.all_reduce_mean(values).tolist()
            if not math.isfinite(values[0]):
                raise FloatingPointError(f"non-finite loss {values[0]} at step {step}; stopping without saving. Lower "
                                         "--lr, raise --warmup_epochs or use --precision fp32.")
            logged, step, stopping = logged + [dict(zip(terms, values))], step + 1, votes > 0
            progress.set_postfix({**{k: f"{v:.4f}" for k, v in logged[-1].items()}, "lr": run.lr_schedule[step - 1]})
            if stopping:  # every process read the same votes: all stop after the same step
                break
        save(run, data, output_dir, step, logged, time.time() - start)
        if stopping:
            common.log(f"stopped by signal at step {step}; checkpoint saved, rerun the same command to resume")
            return 128 + (stop[0] if stop else signal.SIGTERM)  # a process stopped by another's vote: as by SIGTERM
    if common.get_rank() == 0:  # exported again: a finished run rerun after its export was lost has it back
        call = common.export_timm(run.student.backbone, run.arch, output_dir / "student_timm.pth")
        common.log(f"done; student backbone for timm: {call}")
    return 0


@contextlib.contextmanager
def locked_output_dir(path):
    """--output_dir for the life of a run (rank 0): created, locked so that a second run on it stops at once, cleared
    of killed runs' temporary files; removed again if this run created it and failed before writing to it."""
    path, created, lock = Path(path), not Path(path).exists(), None
    if common.get_rank() != 0:
        yield path
        return
    try:
        path.mkdir(parents=True, exist_ok=True)
        lock = open(path / ".lock", "w")
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)  # held until the file is closed
        os.write(lock.fileno(), b" " * 4096)  # a full disk fails here (or at the fsync), not at the first checkpoint
        os.fsync(lock.fileno())
        lock.truncate(0)
    except OSError as err:
        if lock is not None and not isinstance(err, BlockingIOError):  # ours: leave nothing behind
            lock.close()
            (path / ".lock").unlink(missing_ok=True)
            if created:
                path.rmdir()
        raise common.UserError(f"--output_dir {path} is in use by another run: wait for it to end or use another one"
                               if isinstance(err, BlockingIOError) else f"cannot create or write --output_dir {path} "
                               f"({err.strerror}): choose another folder") from None
    with lock:
        for stale in path.glob(".*.tmp"):
            stale.unlink(missing_ok=True)
        try:
            yield path
        except BaseException:
            if created and [p.name for p in path.iterdir()] == [".lock"]:
                (path / ".lock").unlink()
                path.rmdir()
            raise


RESUMABLE_FLAGS = {"output_dir", "data_path", "num_workers", "compile", "saveckp_freq", "epochs", "precision"}


def resume(run, data, output_dir):
    """Continue from output_dir/checkpoint.pth, else (lost) from the newest checkpointNNNN.pth. Refused, naming the fix:
    a folder with neither whose log.txt goes past epoch 0, another script's run, or other run-defining flags (all but
    RESUMABLE_FLAGS), data, global batch or steps per epoch. A longer --epochs is allowed. log.txt is cut to match."""
    args, numbered = run.args, sorted(output_dir.glob("checkpoint[0-9][0-9][0-9][0-9].pth"), reverse=True)
    path = next((p for p in [output_dir / "checkpoint.pth", *numbered] if p.is_file()), None)
    log_file = output_dir / "log.txt"
    if path is None:
        lines = log_file.read_text().splitlines() if log_file.exists() else []
        if any(json.loads(line)["epoch"] > 0 for line in lines if line.endswith("}")):
            raise common.UserError(f"{output_dir} holds a run's log.txt but no checkpoint.pth to resume it from: "
                                   "restore it, or use another --output_dir")
        if lines and common.get_rank() == 0:  # killed between the first epoch's log line and its checkpoint
            log_file.unlink()
        return
    if path.name != "checkpoint.pth":
        common.log(f"{output_dir / 'checkpoint.pth'} is missing: resuming from {path.name}, the newest numbered one")
    ckpt = common.load_file(path, "resume checkpoint")
    if ckpt.get("method") != METHOD:
        raise common.UserError(f"{path} was written by {ckpt.get('method', 'another program')}, not {METHOD}.py: use "
                               "another --output_dir.")
    now = {**vars(args), "global_batch": run.global_batch, "iters_per_epoch": run.iters_per_epoch}
    saved = {**ckpt["args"], "global_batch": ckpt["global_batch"], "iters_per_epoch": ckpt["iters_per_epoch"]}
    changed = [f"--{k} {saved[k]} -> {v}" for k, v in now.items() if k in saved and k not in RESUMABLE_FLAGS
               and ([*v] if isinstance(v, tuple) else v) != ([*saved[k]] if isinstance(saved[k], tuple) else saved[k])]
    if changed:
        raise common.UserError(f"{path} belongs to a run with other settings ({'; '.join(changed)}): rerun with the "
                               "original flags, or use another --output_dir")
    if ckpt.get("data", data.files) != data.files:
        raise common.UserError(f"{path} was trained on other data ({ckpt['data']}; --data_path {args.data_path} holds "
                               f"{data.files}): resume with the same files, or use another --output_dir")
    if args.epochs < ckpt["epoch"]:
        raise common.UserError(f"--epochs {args.epochs}: this run has already done {ckpt['epoch']} epochs")
    if args.epochs != saved["epochs"]:
        common.log(f"--epochs {saved['epochs']} -> {args.epochs}: the schedules are recomputed for {args.epochs} "
                   f"epochs and the run continues from step {ckpt['step']} on them")
    for name, module in {"student": run.student, "optimizer": run.optimizer, **run.saved}.items():
        module.load_state_dict(ckpt[name])
    data.dataset.unreadable[ckpt["unreadable"]] = True
    run.step = ckpt["step"]
    if common.get_rank() == 0 and log_file.exists():  # epochs at or after the resume point are done (and logged) again
        lines = log_file.read_text().splitlines()
        kept = [line for line in lines if line.endswith("}") and json.loads(line)["epoch"] < ckpt["epoch"]]
        if kept != lines:  # (a line cut short by a kill goes too)
            (output_dir / ".log.txt.tmp").write_text("".join(line + "\n" for line in kept))
            os.replace(output_dir / ".log.txt.tmp", log_file)
    common.log(f"resumed from {path} at step {run.step} (epoch {ckpt['epoch']})")


@torch.no_grad()
def save(run, data, output_dir, step, values, seconds):
    """Save the run at `step` once every process has found every tensor of the student, the method's state and the
    optimiser finite, and the student's outputs on a fixed input (weights can be finite yet too large to use); else
    FloatingPointError, nothing saved. Rank 0 writes checkpoint.pth last: a kill at any time leaves a run to resume."""
    tensors = [t for m in (run.student, *run.saved.values()) for t in m.state_dict().values() if t.is_floating_point()]
    tensors += [t for s in run.optimizer.state_dict()["state"].values() for t in s.values()
                if torch.is_tensor(t) and t.is_floating_point()]
    probe = torch.randn(2, 3, *[run.args.global_crops_size] * 2, generator=torch.Generator().manual_seed(0))
    outputs = run.student.eval()([probe.to(run.device)])
    run.student.train()
    tensors += [outputs] if torch.is_tensor(outputs) else list(outputs)
    if common.all_reduce_mean(torch.stack([torch.isfinite(t).all() for t in tensors]).all().float()).item() < 1:
        raise FloatingPointError("non-finite weights, optimiser state or outputs after the last step; stopping "
                                 "without saving. Lower --lr, raise --warmup_epochs or use --precision fp32.")
    if common.get_rank() != 0:
        return
    epoch = step // run.iters_per_epoch
    state = dict(method=METHOD, arch=run.arch, args=vars(run.args), step=step, epoch=epoch,
                 global_batch=run.global_batch, iters_per_epoch=run.iters_per_epoch, student=run.student.state_dict(),
                 optimizer=run.optimizer.state_dict(), unreadable=data.dataset.unreadable.nonzero()[:, 0].tolist(),
                 data=data.files, **{name: module.state_dict() for name, module in run.saved.items()})
    common.export_timm(run.student.backbone, run.arch, output_dir / "student_timm.pth")
    if step % run.iters_per_epoch == 0:
        record = dict(epoch=epoch - 1, step=step, **{k: sum(v[k] for v in values) / len(values) for k in values[0]},
                      lr=run.lr_schedule[step - 1], wd=run.wd_schedule[step - 1], images_per_s=len(values) *
                      run.global_batch / seconds, skipped_images=data.dataset.num_skipped,
                      time=str(datetime.timedelta(seconds=int(seconds))))
        with open(output_dir / "log.txt", "a") as f:
            f.write(json.dumps(record) + "\n")
        if run.args.saveckp_freq and epoch % run.args.saveckp_freq == 0:
            common.save_atomic(state, output_dir / f"checkpoint{epoch:04}.pth")
    common.save_atomic(state, output_dir / "checkpoint.pth")


def run_main():
    """The entry point. Exit codes: 0 done; 2 a user error (one line on stderr; ROB_DEBUG=1 shows the traceback); 3
    training diverged (non-finite loss or weights; nothing was saved); 128 + N stopped by signal N after saving a
    checkpoint to resume from (SIGTERM 143, Ctrl-C 130, SIGUSR1 138)."""
    try:
        code = main(argparse.ArgumentParser(parents=[get_args_parser()],
                                            formatter_class=argparse.ArgumentDefaultsHelpFormatter).parse_args())
    except (common.UserError, FloatingPointError) as err:
        if os.environ.get("ROB_DEBUG"):
            raise
        rank = f"[rank {common.get_rank()}] " if common.get_world_size() > 1 else ""
        print(f"{Path(sys.argv[0]).name}: {rank}error: {err}", file=sys.stderr, flush=True)
        code = 2 if isinstance(err, common.UserError) else 3
    except KeyboardInterrupt:  # Ctrl-C before training started, or twice
        code = 128 + signal.SIGINT
    finally:
        if dist.is_initialized():  # an open process group can abort the interpreter at exit
            dist.destroy_process_group()
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)  # loader workers ignore SIGTERM: stop them here, quietly
        for child in multiprocessing.active_children():
            child.kill()
    sys.exit(code)


if __name__ == "__main__":
    run_main()
