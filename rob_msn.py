"""RoB-MSN: train a small network by distillation from a frozen, pretrained MSN model.

MSN (Masked Siamese Networks) trains an anchor branch that sees masked views (a random part of the patch tokens
dropped) to predict, over learned prototypes, the soft assignment that an EMA target encoder gives to an unmasked
view of the same image. RoB ("Replace one Branch") replaces the target branch by a released MSN target encoder
(ViT + projection MLP + 1024 prototypes), frozen: the target is softmax(cos(projection, prototypes) / 0.025), with
no Sinkhorn, no me-max and no EMA. The student, a fresh ViT-Tiny / ResNet-18 / ..., is a backbone + MLP [d, 2048,
K] whose K logits predict that target (cross-entropy at temperature 0.1) from the same global crops, with 10-15 %
of their patch tokens dropped (ViTs), and from the local crops. RoB-MSN students are the strong ones with few
labels: evaluate them with eval_linear.py --low_shot.

    torchrun --nproc_per_node=8 rob_msn.py --student vit_small --teacher msn_vitl16 --data_path /data/imagenet/train \
        --output_dir out/
    python eval_linear.py --checkpoint out/checkpoint.pth --data_path /data/imagenet --knn --low_shot

The recipe (the defaults): teacher MSN ViT-L/16 (1024 prototypes); student head Linear [d, 2048] -> Linear
[2048, 1024], no activation; target softmax(cos / 0.025), CE at 0.1, same-view pairing; 10 % (ViT-Tiny) or 15 %
of the student's global-crop tokens dropped; 2 x 224 px crops (0.3, 1) + 10 x 96 px (0.05, 0.3), MSN's
augmentation at colour strength 1.0; AdamW, lr 2e-4 -> 1e-3 at batch 1024 over 15 epochs, cosine to 1e-5,
weight decay 0.04 -> 0.4, gradient norm clipped at 1.0, no drop-path.

`--teacher ema` runs plain MSN instead (EMA target encoder, learned prototypes, Sinkhorn, me-max): the baseline of
the paper, and a way to pretrain a teacher on your own data. Its checkpoint is a valid --teacher for RoB.
"""
import argparse
import copy
import itertools
import math
import time

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

import common
import training

TEACHERS = {  # official MSN releases {target_encoder, prototypes}: name -> (release, backbone, patch)
    "msn_vits16": ("vits16_800ep", "vit_small", 16),
    "msn_vitb16": ("vitb16_600ep", "vit_base", 16),
    "msn_vitl16": ("vitl16_600ep", "vit_large", 16),
    "msn_vitb4": ("vitb4_300ep", "vit_base", 4),
    "msn_vitl7": ("vitl7_200ep", "vit_large", 7),
}
URL = "https://dl.fbaipublicfiles.com/msn/{0}.pth.tar"


# -------------------------------------------------------------------------------------------- arguments
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
    group.add_argument("--hidden_dim", type=int, default=2048, help="Hidden width of the student head (RoB: "
                       "Linear [d, hidden_dim] -> Linear [hidden_dim, K], no activation; baseline: the projection "
                       "MLP's).")
    group.add_argument("--patch_drop", type=float, default=None, help="Fraction of the patch tokens of the "
                       "student's global crops dropped at random (per image, after the positional embeddings; CLS "
                       "kept). Default 0.10 for vit_tiny, 0.15 for other ViTs; 0 turns it off. Convnet students "
                       "drop nothing.")
    group = parser.add_argument_group("temperatures and pairing")
    group.add_argument("--teacher_temp", type=float, default=0.025, help="Temperature of the teacher's cosine "
                       "similarities to its prototypes (MSN's 0.1 x sharpening 0.25). A RoB-MSN student used as "
                       "teacher "
                       "gives logits instead, read at --student_temp.")
    group.add_argument("--student_temp", type=float, default=0.1, help="Student softmax temperature.")
    group.add_argument("--swapped", action="store_true", help="Cross-view pairing (teacher view i -> every "
                       "student crop but i). Default: same-view pairing (teacher view i -> student view i and every "
                       "local crop). The baseline uses MSN's own pairing (see --teacher ema).")
    group = parser.add_argument_group("plain-MSN baseline (--teacher ema only): global crop 0 -> EMA target "
                                      "encoder; global crop 1 (tokens dropped) and the locals -> student")
    group.add_argument("--out_dim", type=int, default=1024, help="Number of learned prototypes K.")
    group.add_argument("--bottleneck_dim", type=int, default=256, help="Projection output (prototype) width.")
    group.add_argument("--momentum_teacher", type=float, default=0.996, help="EMA momentum, raised linearly "
                       "towards 1 (MSN's schedule, stretched over 1.25x the run).")
    group.add_argument("--memax_weight", type=float, default=1.0, help="Weight of the me-max regulariser.")
    group.add_argument("--sinkhorn_iterations", type=int, default=3, help="Sinkhorn steps on the targets (0: off).")
    group = training.add_optimisation_args(parser, epochs=150, lr=2.5e-4, warmup_epochs=15, clip_grad=1.0, helps=dict(
        lr="Peak lr at a global batch of 256, scaled linearly (1024 -> 1e-3, the paper's setting)."))
    group.add_argument("--start_lr", type=float, default=5e-5, help="lr at the start of the warm-up, per 256 "
                       "images (1024 -> 2e-4, the paper's setting).")
    training.add_multicrop_args(parser, (0.3, 1.0), 10, (0.05, 0.3))
    training.add_run_args(parser)
    return parser


def check_args(args):
    training.check_args(args, positive=["epochs", "batch_size_per_gpu", "teacher_temp", "student_temp",
                                      "out_dim", "hidden_dim", "bottleneck_dim", "global_crops_size",
                                      "local_crops_size"],
                      non_negative=["lr", "start_lr", "min_lr", "warmup_epochs", "weight_decay", "weight_decay_end",
                                    "clip_grad", "local_crops_number", "memax_weight", "sinkhorn_iterations"],
                      fractions=["drop_path_rate", "momentum_teacher"],
                      scales=["global_crops_scale", "local_crops_scale"])
    if args.patch_drop is not None and not 0 <= args.patch_drop < 1:
        raise common.UserError(f"--patch_drop {args.patch_drop}: give a fraction in [0, 1)")


def build_augmentation(args):
    """MSN's multi-crop augmentation with colour strength 1.0, as the reference RoB-MSN config: colour jitter
    (0.8, 0.8, 0.8, 0.2) with p 0.8, grayscale 0.2, blur p 0.5 on every crop, no solarise, flip, bilinear."""
    return common.MultiCropAugmentation(args.global_crops_size, args.local_crops_size, 2, args.local_crops_number,
                                        args.global_crops_scale, args.local_crops_scale,
                                        color_jitter=(0.8, 0.8, 0.8, 0.2), blur_p=(0.5, 0.5, 0.5),
                                        solarize_p=(0.0, 0.0, 0.0), interpolation="bilinear")


# -------------------------------------------------------------------------------------- the frozen teacher
def load_teacher(name_or_path, num_heads=None):
    """The frozen RoB teacher (backbone + projection + prototypes, eval, no grad) from an official name
    (downloaded once into the torch.hub cache) or a local file. `num_heads`: for ViTs of non-standard width."""
    source = common.source_of(name_or_path, TEACHERS, lambda name: URL.format(TEACHERS[name][0]), "MSN release")
    return teacher_from_checkpoint(common.load_file(source, "MSN teacher checkpoint"), source, num_heads)


def teacher_from_checkpoint(ckpt, source, num_heads=None):
    """Recognise the checkpoint's format, build the matching backbone and head from its tensors and load
    them strictly. Accepts MSN releases (and MSN training checkpoints) and this script's own; refuses the rest
    with the fix. A RoB-MSN student teaches through its logits (teacher.prototypes is None)."""
    if isinstance(ckpt, dict) and ckpt.get("method") == "rob_msn":  # its EMA target encoder, or its student
        if ckpt.get("teacher") is not None:
            sd, prototypes = ckpt["teacher"], ckpt["student"]["prototypes"]
            head = MSNProjection(*projection_sizes(common.sub_state_dict(sd, "head.")))
        else:
            sd, prototypes = ckpt["student"], None
            first, last = sd["head.0.weight"], sd["head.2.weight"]
            head = MLPHead(first.shape[1], last.shape[0], first.shape[0], use_bn="head.1.weight" in sd)
        backbone = common.recorded_backbone(ckpt, sd, source)
        head_sd = common.sub_state_dict(sd, "head.")
    elif isinstance(ckpt, dict) and ckpt.get("method") is None and "target_encoder" in ckpt:  # an MSN release
        if "prototypes" not in ckpt:
            raise common.UserError(f"{source} has a target encoder but no prototypes: give the complete MSN release, "
                                   "e.g. " + URL.format(TEACHERS["msn_vitl16"][0]))
        sd = common.strip_prefix(ckpt["target_encoder"], "module.")
        backbone_sd = {k: v for k, v in sd.items() if not k.startswith("fc.")}
        head_sd, prototypes = common.sub_state_dict(sd, "fc."), ckpt["prototypes"]
        if "fc1.weight" not in head_sd:
            raise common.UserError(f"{source}: the target encoder has no projection head (fc.fc1 ... fc.fc3)")
        backbone, _ = common.backbone_from_state_dict(backbone_sd, num_heads)
        head = MSNProjection(*projection_sizes(head_sd))
        common.load_strict(backbone, backbone_sd, source, "MSN target encoder backbone")
    else:
        common.refuse_teacher(ckpt, source, "rob_msn", "its projection head and prototypes",
                              URL.format(TEACHERS["msn_vitl16"][0]))
    common.load_strict(head, head_sd, source, "MSN projection head" if prototypes is not None else "RoB-MSN head")
    prototypes = None if prototypes is None else prototypes.float()
    return common.freeze(MultiCropNetwork(backbone, head, prototypes=prototypes))


def projection_sizes(sd):
    """(in, hidden, out) widths of an MSN projection state dict."""
    return sd["fc1.weight"].shape[1], sd["fc1.weight"].shape[0], sd["fc3.weight"].shape[0]


def random_teacher(name):
    """An official teacher architecture with random weights (benchmarks: nothing to download)."""
    _, backbone_name, patch = TEACHERS[name]
    backbone, _ = common.build_teacher_backbone(backbone_name, patch_size=patch)
    head = MSNProjection(common.feature_dim(backbone))
    return common.freeze(MultiCropNetwork(backbone, head, prototypes=F.normalize(torch.randn(1024, 256), dim=-1)))


# ------------------------------------------------------------------------------------------- the student
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
    """The RoB student head, as the reference's: Linear, BN (convnets), Linear -> logits over the teacher's K
    prototypes. No activation between the two layers."""

    def __init__(self, in_dim, out_dim, hidden_dim=2048, use_bn=False):
        super().__init__(nn.Linear(in_dim, hidden_dim), nn.BatchNorm1d(hidden_dim) if use_bn else nn.Identity(),
                         nn.Linear(hidden_dim, out_dim))


def drop_patch_tokens(tokens, patch_drop, n_prefix=1):
    """MSN's masking: keep the prefix (CLS) tokens and a random subset of exactly round((1 - patch_drop) * N) of
    the N patch tokens, drawn independently for every image (MSN's code floors the count and draws one subset
    for the whole batch). Dropped tokens are removed, not replaced.
    tokens: [B, n_prefix + N, D] -> [B, n_prefix + n_keep, D]."""
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


def build_student(args, teacher=None):
    """A fresh backbone (ViTs drop 10 % (ViT-Tiny) / 15 % of their global-crop tokens) + the RoB head over the
    teacher's prototypes, or (baseline) MSN's projection and learned prototypes. Returns (network, arch)."""
    common.seed_everything(common.mix_seed(args.seed, 0))  # the same init in every process, RoB or plain
    backbone, dim, arch = common.build_student(args.student, args.global_crops_size, args.patch_size,
                                               args.drop_path_rate)
    convnet = not common.is_vit(backbone)
    patch_drop = 0.0 if convnet else args.patch_drop if args.patch_drop is not None else \
        0.10 if arch["name"].startswith("vit_tiny") else 0.15
    if teacher is None:  # baseline: MSN's projection and learned prototypes (uniform init as MSN's), trained together
        bound = args.bottleneck_dim ** -0.5
        prototypes = nn.Parameter(torch.empty(args.out_dim, args.bottleneck_dim).uniform_(-bound, bound))
        return MultiCropNetwork(backbone, MSNProjection(dim, args.hidden_dim, args.bottleneck_dim), patch_drop,
                                prototypes), arch
    out_dim = len(teacher.prototypes) if teacher.prototypes is not None else teacher.head[-1].out_features
    return MultiCropNetwork(backbone, MLPHead(dim, out_dim, args.hidden_dim, use_bn=convnet), patch_drop), arch


# ---------------------------------------------------------------------------------- the RoB target and loss
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


# -------------------------------------------------------------------- the plain-MSN baseline (--teacher ema)
class PlainMSN(nn.Module):
    """What plain MSN adds, none of which RoB needs: the target encoder (backbone + projection, left in train mode
    as MSN's, so its BN normalises with the batch) is an EMA of the student (momentum linear from 0.996 towards 1
    over 1.25x the run), the prototypes are learned (the student's), the targets are balanced by Sinkhorn and the
    predictions regularised by me-max. MSN's pairing: the target encoder sees global crop 0, the student (its
    tokens dropped) global crop 1 and the locals."""

    def __init__(self, student, arch, args, iters_per_epoch):
        super().__init__()
        teacher_arch = {**arch, "kwargs": {**arch["kwargs"], "drop_path_rate": 0.0}}
        self.teacher = MultiCropNetwork(common.create_backbone(teacher_arch), copy.deepcopy(student.head))
        self.teacher.load_state_dict({k: v for k, v in student.state_dict().items() if k != "prototypes"})
        self.teacher = training.sync_batchnorm(self.teacher.requires_grad_(False))  # (after DDP's broadcast)
        self.student_params = network_params(student)
        self.args = args
        total = args.epochs * iters_per_epoch
        momentum = torch.linspace(args.momentum_teacher, 1.0, int(1.25 * total) + 1, dtype=torch.float64)
        self.momentum = momentum[:total].tolist()

    def loss(self, student_out, teacher_out, prototypes, pairs):
        """CE of the student's cosine scores against the Sinkhorn-balanced targets, + me-max: (loss, me-max)."""
        scores = prototype_scores(student_out, prototypes)
        regulariser = me_max(scores, self.args.student_temp)
        targets = teacher_probs(teacher_out, prototypes, self.args.teacher_temp)
        targets = sinkhorn(targets, self.args.sinkhorn_iterations)
        loss = common.multi_crop_cross_entropy(scores, targets, pairs, self.args.student_temp)
        return loss + self.args.memax_weight * regulariser, regulariser

    @torch.no_grad()
    def after_optimizer_step(self, it):
        torch._foreach_lerp_(list(self.teacher.parameters()), self.student_params, 1 - self.momentum[it])

    def checkpoint_state(self):  # the EMA target encoder; its prototypes are the student's
        return dict(teacher=self.teacher.state_dict())

    def load_checkpoint_state(self, ckpt):
        self.teacher.load_state_dict(ckpt["teacher"])


def network_params(student):
    return [p for name, p in student.named_parameters() if name != "prototypes"]


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


# ------------------------------------------------------------------------------------------------ training
def build(args, device, iters_per_epoch, student, arch, teacher=None):
    """Everything a training step needs, as one namespace: the student (and its DDP wrapper), the frozen teacher
    (RoB) or the plain-MSN pieces (--teacher ema), the pairing, the optimiser (AdamW; the baseline's learned
    prototypes without weight decay) and the schedules (lr warm-up from --start_lr)."""
    groups = training.param_groups(nn.ModuleList([student.backbone, student.head]))
    if teacher is None:
        groups[1]["params"].append(student.prototypes)
    run = training.setup_run(args, device, iters_per_epoch, student.to(device), arch, "rob_msn",
                             optimizer=torch.optim.AdamW(groups, fused=device.type == "cuda"),
                             warmup_start=args.start_lr * args.batch_size_per_gpu * common.get_world_size() / 256)
    run.plain = PlainMSN(student, arch, args, iters_per_epoch).to(device) if teacher is None else None
    if teacher is not None:
        run.teacher = training.place_teacher(teacher, device, run, [teacher.backbone, teacher.head])
        if isinstance(teacher.head, MSNProjection):
            teacher.head.fc3.float()
        training.check_patch(teacher.backbone, args.global_crops_size)
    else:
        run.teacher = run.plain.teacher
    if args.compile:  # in place, so that checkpoints keep their keys; ViTs per block (fast to compile)
        for network in (student, run.teacher):
            training.compile_model(network.backbone)
            network.head.compile()
    run.loss_fn = torch.compile(common.multi_crop_cross_entropy) if args.compile else common.multi_crop_cross_entropy
    n_crops = 2 + args.local_crops_number
    run.pairs = [(0, s) for s in range(n_crops - 1)] if teacher is None else common.view_pairs(2, n_crops, args.swapped)
    run.n_teacher = 1 if teacher is None else 2  # the target encoder sees global crop 0 only; RoB's teacher both
    run.target_temp = args.teacher_temp if teacher is None or teacher.prototypes is not None else args.student_temp
    outputs = len(student.prototypes) if teacher is None else student.head[-1].out_features
    common.log(f"student {args.student}: {sum(p.numel() for p in student.parameters()) / 1e6:.1f}M parameters, patch "
               f"drop {student.patch_drop}, head -> {outputs}; teacher: {args.teacher}")
    return run


def teacher_forward(run, crops):
    """Target distributions [n_teacher * B, K] of the teacher's global crops."""
    with torch.no_grad(), torch.autocast(run.device.type, run.amp_dtype, enabled=run.plain is not None and run.amp):
        out = run.teacher([c.to(run.teacher_dtype) for c in crops[:run.n_teacher]])
        return out if run.plain is not None else teacher_probs(out, run.teacher.prototypes, run.target_temp)


def train_step(run, crops, it):
    """One optimisation step on a batch (list of crops, globals first); returns the loss terms (a tensor)."""
    training.start_step(run, it)  # lr, weight decay, and a seed per step for token drops (exact resume)
    teacher_out = run.side_stream.start(teacher_forward, run, crops)  # concurrent with the student on a GPU
    with torch.autocast(run.device.type, run.amp_dtype, enabled=run.amp):
        student_out = run.student_ddp(crops[run.n_teacher:] if run.plain is not None else crops)
    teacher_out = run.side_stream.join(teacher_out)
    if run.plain is None:
        loss = run.loss_fn(student_out, teacher_out, run.pairs, run.args.student_temp)
    else:
        loss, regulariser = run.plain.loss(student_out, teacher_out, run.student.prototypes, run.pairs)
    run.optimizer.zero_grad(set_to_none=True)
    run.scaler.scale(loss).backward()
    run.scaler.unscale_(run.optimizer)
    if run.args.clip_grad:
        nn.utils.clip_grad_norm_(network_params(run.student), run.args.clip_grad)  # MSN leaves the prototypes out
    run.scaler.step(run.optimizer)
    run.scaler.update()
    if run.plain is None:
        return loss.detach()[None]
    run.plain.after_optimizer_step(it)
    return torch.stack([loss.detach(), regulariser.detach()])


def train_one_epoch(run, data, epoch, step, stop):
    """The steps of `epoch` from `step` (mid-epoch after a resume) to its end or to a stop request (Ctrl-C,
    SIGTERM), then a checkpoint. Loss values are read one step late (the host never waits for the GPU).
    Returns (step, whether to stop)."""
    first = step - epoch * run.iters_per_epoch
    data.sampler.set_epoch(epoch, start_batch=first)
    names = ["train_loss", "me_max"] if run.plain is not None else ["train_loss"]
    stats, start, stopping = training.StepStats(names), time.time(), False
    progress = tqdm(data.loader, desc=f"epoch {epoch}", initial=first, total=run.iters_per_epoch,
                    disable=not common.is_main_process(), dynamic_ncols=True)
    for batch, indices in progress:
        crops = training.crops_on_device(batch, indices, data.dataset, data.augmentation, run.args, run.device, step,
                                         channels_last=not common.is_vit(run.student.backbone))
        done = stats.push(train_step(run, crops, step), stop.requested, step)
        step += 1
        if done:
            progress.set_postfix(loss=f"{done[0][0]:.4f}", lr=f"{run.lr_schedule[step - 1]:.2e}")
            if done[1]:  # every process sees the same votes: all stop after this same step
                stopping = True
                break
    done = stats.flush()
    stopping = stopping or (done is not None and done[1])
    networks = [run.student] + ([run.plain] if run.plain is not None else [])
    training.check_state(networks, run.optimizer, probe=lambda: run.student(crops))
    training.save_run(run, data, step, stats, time.time() - start,
                      run.plain.checkpoint_state() if run.plain is not None else {})
    return step, stopping


def main(args):
    check_args(args)
    rank, world_size, device = common.init_distributed()
    data = training.build_training_data(args, build_augmentation(args))
    teacher = None if args.teacher == "ema" else load_teacher(args.teacher)
    student, arch = build_student(args, teacher)
    run = build(args, device, len(data.loader), student, arch, teacher)
    with training.OutputDir(args.output_dir) as output_dir:
        ckpt = training.resume(run, data, output_dir, "rob_msn")
        if ckpt is not None and run.plain is not None:
            run.plain.load_checkpoint_state(ckpt)
        stop, step = training.StopRequest(), run.start_step
        for epoch in range(step // run.iters_per_epoch, args.epochs):
            step, stopping = train_one_epoch(run, data, epoch, step, stop)
            if stopping:
                common.log(f"stopped by signal at step {step}; checkpoint saved, rerun the same command to resume")
                return stop.exit_code()
        training.finish(output_dir, run.student.backbone, run.arch)
    return 0


if __name__ == "__main__":
    training.run_main(main, argparse.ArgumentParser("RoB-MSN", parents=[get_args_parser()]))
