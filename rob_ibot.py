"""RoB-iBOT: train a small ViT by distillation from a frozen, pretrained iBOT model.

iBOT trains a ViT student on two objectives at once: its CLS token matches the softmax output of a momentum
teacher on other views (DINO's objective), and its tokens at blockwise-masked positions match the teacher's
outputs for the same positions of the unmasked view (masked image modelling against an "online tokenizer").
RoB ("Replace one Branch") keeps the student branch as it is and replaces the teacher by a released iBOT model
(backbone + iBOT head), frozen: no EMA, no centering, no temperature warm-up. The student, a fresh ViT-Tiny /
ViT-S, learns to predict softmax(teacher_cls_logits / 0.07) from the same global crops and from the local crops,
and softmax(teacher_patch_logits / 0.07) at the masked patches of each global crop.

    torchrun --nproc_per_node=8 rob_ibot.py --student vit_tiny --data_path /data/imagenet/train --output_dir out/

The recipe (the defaults): teacher iBOT ViT-B/16 (8192 CLS and patch outputs, shared head); student head = iBOT
head with one shared last layer; masks: none for half the global crops, else blocks covering 10-50 % of the grid;
CLS term with same-view pairing + patch term, weights 1 and 1, teacher temperature 0.07, student 0.1; 2 x 224 px
crops (0.25, 1) + 10 x 96 px (0.05, 0.25), DINO's augmentation with saturation 0.4; AdamW, lr 5e-4 x batch / 256
after 10 warm-up epochs, cosine to 1e-5, weight decay 0.04 -> 0.48, no clipping, drop-path 0 for ViT-Tiny.

`--teacher ema` runs plain iBOT instead (EMA teacher, centering, temperature warm-up): the baseline of the paper,
and a way to pretrain a teacher on your own data. Its checkpoint is a valid --teacher for RoB.
"""
import argparse
import copy
import itertools
import math
import random
import time

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import Dataset
from tqdm import tqdm

import common
import training
import gpu_augment

TEACHERS = {  # official iBOT full checkpoints (backbone + iBOT head): name -> (release, backbone, patch)
    "ibot_vits16": ("vits_16", "vit_small", 16),
    "ibot_vitb16": ("vitb_16", "vit_base", 16),
    "ibot_vitl16": ("vitl_16", "vit_large", 16),
}
URL = "https://lf3-nlp-opensource.bytetos.com/obj/nlp-opensource/archive/2022/ibot/{0}/checkpoint.pth"


# -------------------------------------------------------------------------------------------- arguments
def get_args_parser():
    parser = argparse.ArgumentParser("RoB-iBOT", add_help=False)
    group = parser.add_argument_group("model")
    group.add_argument("--student", default="vit_tiny", help="A ViT (the patch objective needs patch tokens): "
                       "vit_tiny, vit_small, vit_base or any timm ViT name.")
    group.add_argument("--teacher", default="ibot_vitb16", help=f"{', '.join(TEACHERS)}; a local iBOT full "
                       "checkpoint.pth (backbone + head); a checkpoint.pth of this script (a RoB-iBOT student or a "
                       "--teacher ema run teaches the next student); or 'ema' for the plain-iBOT baseline.")
    group.add_argument("--patch_size", type=int, default=None, help="ViT student patch size (default: the "
                       "model's own, 16). RoB: must equal the teacher's, so that patch positions correspond.")
    group.add_argument("--drop_path_rate", type=float, default=None, help="Student stochastic depth (default, as "
                       "the reference: 0 for ViT-Tiny and narrower, 0.1 for wider ViTs such as ViT-S).")
    group.add_argument("--shared_head", action=argparse.BooleanOptionalAction, default=True, help="One last layer "
                       "for CLS and patch outputs, as the reference students and iBOT's recipes (--shared_head true).")
    group.add_argument("--hidden_dim", type=int, default=2048, help="Student head hidden width.")
    group.add_argument("--bottleneck_dim", type=int, default=256, help="Student head bottleneck width.")
    group = parser.add_argument_group("temperatures, pairing and masking")
    group.add_argument("--teacher_temp", type=float, default=0.07, help="Teacher softmax temperature, CLS.")
    group.add_argument("--teacher_patch_temp", type=float, default=0.07, help="Teacher softmax temperature, patches.")
    group.add_argument("--student_temp", type=float, default=0.1, help="Student softmax temperature (both terms).")
    group.add_argument("--swapped", action="store_true", help="iBOT's cross-view pairing for the CLS term "
                       "(teacher view i -> every student crop but i). Default: same-view pairing (teacher view i "
                       "-> student view i and every local crop). Always on with --teacher ema. The patch term "
                       "always pairs a view with itself.")
    group.add_argument("--lambda1", type=float, default=1.0, help="Weight of the CLS term.")
    group.add_argument("--lambda2", type=float, default=1.0, help="Weight of the masked-patch term.")
    group.add_argument("--mask_prob", type=float, default=0.5, help="Probability that a global crop is masked "
                       "at all (unmasked crops add 0 to the patch term but count in its mean).")
    group.add_argument("--mask_ratio", type=float, nargs=2, default=(0.1, 0.5), help="Masked fraction of a masked "
                       "crop's patch grid: uniform in this range, covered by random blocks.")
    group = parser.add_argument_group("plain-iBOT baseline (--teacher ema only)")
    group.add_argument("--out_dim", type=int, default=8192, help="Outputs of the CLS last layer (RoB: the "
                       "teacher's).")
    group.add_argument("--patch_out_dim", type=int, default=8192, help="Outputs of the patch last layer (RoB: the "
                       "teacher's; with --shared_head, equal to --out_dim).")
    group.add_argument("--momentum_teacher", type=float, default=0.996, help="EMA momentum, cosine to 1. Use a "
                       "higher value (0.9995) with small batches.")
    group.add_argument("--warmup_teacher_temp", type=float, default=0.04, help="CLS teacher temperature at the "
                       "start, raised linearly to --teacher_temp.")
    group.add_argument("--warmup_teacher_patch_temp", type=float, default=0.04, help="Same for the patches, "
                       "raised to --teacher_patch_temp.")
    group.add_argument("--warmup_teacher_temp_epochs", type=int, default=30, help="Length of those warm-ups.")
    group.add_argument("--center_momentum", type=float, default=0.9, help="EMA momentum of the teacher centres "
                       "(one for CLS, one for patch outputs).")
    group.add_argument("--freeze_last_layer", type=int, default=1, help="Epochs with the last head layers frozen.")
    training.add_optimisation_args(parser, epochs=100, lr=5e-4, weight_decay_end=0.48, clip_grad=None, helps=dict(
        lr="Peak lr at a global batch of 256, scaled linearly (1024 -> 2e-3, the paper's setting).",
        weight_decay_end="Final weight decay: 0.48 as the reference RoB-iBOT config (the other scripts: 0.4).",
        clip_grad="Gradient clipping (0: off). Default: off for RoB, as the reference; 3.0 per parameter tensor "
                  "with --teacher ema, as iBOT."))
    training.add_multicrop_args(parser, (0.25, 1.0), 10, (0.05, 0.25))
    training.add_run_args(parser)
    return parser


def check_args(args):
    training.check_args(args, positive=["epochs", "batch_size_per_gpu", "teacher_temp", "teacher_patch_temp",
                                      "student_temp", "warmup_teacher_temp", "warmup_teacher_patch_temp", "out_dim",
                                      "patch_out_dim", "hidden_dim", "bottleneck_dim", "global_crops_size",
                                      "local_crops_size"],
                      non_negative=["lr", "min_lr", "warmup_epochs", "weight_decay", "weight_decay_end", "clip_grad",
                                    "local_crops_number", "warmup_teacher_temp_epochs", "freeze_last_layer",
                                    "lambda1", "lambda2"],
                      fractions=["drop_path_rate", "momentum_teacher", "center_momentum", "mask_prob"],
                      scales=["global_crops_scale", "local_crops_scale"])
    if not 0 <= args.mask_ratio[0] <= args.mask_ratio[1] < 1:
        raise common.UserError(f"--mask_ratio {args.mask_ratio[0]} {args.mask_ratio[1]}: give 0 <= low <= high < 1")


def build_augmentation(args):
    """DINO's multi-crop augmentation, as the reference RoB configs set it (see rob_dino.py)."""
    return common.MultiCropAugmentation(args.global_crops_size, args.local_crops_size, 2, args.local_crops_number,
                                        args.global_crops_scale, args.local_crops_scale,
                                        color_jitter=(0.4, 0.4, 0.4, 0.1), blur_p=(1.0, 0.1, 0.5),
                                        solarize_p=(0.0, 0.2, 0.0))


# -------------------------------------------------------------------------------------- the frozen teacher
def load_teacher(name_or_path, num_heads=None):
    """The frozen RoB teacher (backbone + iBOT head, eval, no grad) from an official name (downloaded once
    into the torch.hub cache) or a local file."""
    source = common.source_of(name_or_path, TEACHERS, lambda name: URL.format(TEACHERS[name][0]),
                              "iBOT full checkpoint.pth")
    return teacher_from_checkpoint(common.load_file(source, "iBOT teacher checkpoint"), source, num_heads)


def teacher_from_checkpoint(ckpt, source, num_heads=None):
    """Recognise the checkpoint's format, build the matching backbone and head from its tensors and load
    them strictly. Accepts iBOT full checkpoints and this script's own; refuses the rest with the fix."""
    official = isinstance(ckpt, dict) and ckpt.get("method") is None and isinstance(ckpt.get("teacher"), dict) \
        and any("last_layer2" in k for k in ckpt["teacher"])  # (DINO's full checkpoints have no patch head)
    if isinstance(ckpt, dict) and ckpt.get("method") == "rob_ibot":  # its EMA teacher (baseline runs) or its student
        sd = ckpt.get("teacher") or ckpt["student"]
        backbone = common.recorded_backbone(ckpt, sd, source)
    elif official:  # an iBOT full checkpoint.pth: its teacher network
        sd = common.strip_prefix(ckpt["teacher"], "module.")
        arch_name = getattr(ckpt.get("args"), "arch", None)
        backbone, _ = common.backbone_from_state_dict(common.sub_state_dict(sd, "backbone."), num_heads, arch_name)
        common.load_strict(backbone, common.sub_state_dict(sd, "backbone."), source, "iBOT full checkpoint backbone")
    else:
        common.refuse_teacher(ckpt, source, "rob_ibot", "its iBOT head (CLS and patch outputs)",
                              URL.format(TEACHERS["ibot_vitb16"][0]))
    if not common.is_vit(backbone):
        raise common.UserError(f"{source} holds a convnet: a RoB-iBOT teacher must be a ViT (patch outputs).")
    head, head_sd = head_from_state_dict(common.sub_state_dict(sd, "head."))
    common.load_strict(head, head_sd, source, "iBOT head")
    return common.freeze(iBOTNetwork(backbone, head))


def random_teacher(name):
    """An official teacher architecture with random weights (benchmarks: nothing to download)."""
    _, backbone_name, patch = TEACHERS[name]
    backbone, _ = common.build_teacher_backbone(backbone_name, patch_size=patch)
    head = iBOTHead(common.feature_dim(backbone), 8192, 8192, weight_norm=False)
    return common.freeze(iBOTNetwork(backbone, head))


# ------------------------------------------------------------------------------------------- the student
class iBOTHead(nn.Module):
    """DINO's head applied to every token: MLP -> L2-normalise -> weight-normalised linear layer, `last_layer`
    (K outputs) for CLS tokens and `last_layer2` (K2 outputs) for patch tokens (the official module names, so
    that iBOT checkpoints load). `weight_norm=False` gives plain last layers, for a frozen teacher."""

    def __init__(self, in_dim, out_dim, patch_out_dim, hidden_dim=2048, bottleneck_dim=256, nlayers=3,
                 use_bn=False, norm_last_layer=False, weight_norm=True, shared=False):
        super().__init__()
        self.mlp = common.projection_mlp(in_dim, hidden_dim, bottleneck_dim, nlayers, use_bn)
        if shared and out_dim != patch_out_dim:
            raise common.UserError(f"a shared last layer needs as many CLS as patch outputs ({out_dim} vs "
                                   f"{patch_out_dim}): "
                             "use --no-shared_head")
        for name, k in (("last_layer", out_dim), ("last_layer2", patch_out_dim)):
            layer = nn.Linear(bottleneck_dim, k, bias=False)
            if weight_norm:
                layer = nn.utils.parametrizations.weight_norm(layer)
                layer.parametrizations.weight.original0.data.fill_(1.0)  # g = 1: rows of unit norm
                layer.parametrizations.weight.original0.requires_grad = not norm_last_layer
            # shared: one module under both names (saved under both, as iBOT's checkpoints; trained once)
            setattr(self, name, self.last_layer if shared and name == "last_layer2" else layer)

    def forward(self, cls_tokens, patch_tokens):
        """cls_tokens [N_cls, D], patch_tokens [N_patch, D] -> (CLS logits [N_cls, K], patch logits [N_patch, K2])."""
        x = F.normalize(self.mlp(torch.cat([cls_tokens, patch_tokens])).float(), dim=-1)
        # a frozen teacher keeps the last layers in fp32: logits / 0.07 need the precision
        return self.last_layer(x[:len(cls_tokens)]), self.last_layer2(x[len(cls_tokens):])


class iBOTNetwork(nn.Module):
    """ViT backbone (the plain timm model) + iBOT head over the crops of a batch, globals first, one backbone
    pass per run of same-sized crops. The student owns a learnable mask token that replaces the patch embedding
    at the masked positions of its global crops, before the positional embedding is added (iBOT's masked
    image modelling); local crops are never masked.
    Returns CLS logits [n_crops * B, K] (crop-major) and the patch logits of the global crops at `patch_index`,
    flat positions into their [n_global * B * N] patch tokens ([M, K2]; all of them when None)."""

    def __init__(self, backbone, head, mask_token=False):
        super().__init__()
        self.backbone, self.head = backbone, head
        self.mask_token = nn.Parameter(torch.zeros(1, 1, backbone.embed_dim)) if mask_token else None

    def tokens(self, x, masks=None):
        """All output tokens [B, prefix + N, D] after the final norm; masks: bool [B, h, w] (True = masked)."""
        vit = self.backbone
        if masks is None:
            return vit.forward_features(x)
        x = vit.patch_embed(x)  # [B, h, w, D] (timm ViTs with dynamic_img_size), else [B, N, D]
        x = torch.where(masks.view(*x.shape[:-1], 1), self.mask_token.to(x.dtype), x)
        x = vit.norm_pre(vit.patch_drop(vit._pos_embed(x)))
        return vit.norm(vit.blocks(x))

    def forward(self, crops, masks=None, patch_index=None):
        runs = [torch.cat(list(run)) for _, run in itertools.groupby(crops, key=lambda crop: crop.shape[-1])]
        tokens = self.tokens(runs[0], masks)  # global crops: [n_global * B, prefix + N, D]
        cls = torch.cat([self.backbone.forward_head(tokens)] + [self.backbone(run) for run in runs[1:]])
        patches = tokens[:, self.backbone.num_prefix_tokens:].flatten(0, 1)  # [n_global * B * N, D]
        return self.head(cls, patches if patch_index is None else patches[patch_index])


def head_from_state_dict(sd):
    """An iBOTHead whose sizes are read from its tensors (shared or separate CLS / patch last layers, any
    widths); weight norm folded for a teacher."""
    sd = common.fold_weight_norm(sd, ("last_layer", "last_layer2"))  # a shared head: each folded into its copy
    linears = sorted(int(k.split(".")[1]) for k in sd if k.startswith("mlp.") and sd[k].ndim == 2)
    first, last = sd[f"mlp.{linears[0]}.weight"], sd[f"mlp.{linears[-1]}.weight"]
    head = iBOTHead(first.shape[1], sd["last_layer.weight"].shape[0], sd["last_layer2.weight"].shape[0],
                    hidden_dim=first.shape[0], bottleneck_dim=last.shape[0], nlayers=len(linears),
                    use_bn=any(k.endswith("running_mean") for k in sd), weight_norm=False)
    return head, sd


def build_student(args, teacher=None):
    """A fresh ViT with a mask token + an iBOT head (shared last layer by default) with the teacher's K and K2
    outputs (the flags' for the baseline), widths from the flags. Returns (network, arch)."""
    common.seed_everything(common.mix_seed(args.seed, 0))  # the same init in every process, RoB or plain
    drop_path = args.drop_path_rate if args.drop_path_rate is not None else \
        0.0 if args.student in ("vit_tiny", "vit_nano", "vit_pico") or "tiny" in args.student else 0.1
    backbone, dim, arch = common.build_student(args.student, args.global_crops_size, args.patch_size, drop_path)
    if not common.is_vit(backbone):
        raise common.UserError(f"--student {args.student} is not a ViT: RoB-iBOT's patch term needs patch tokens and "
                               "a mask token. Train convnet students with rob_dino.py, rob_msn.py or rob_swav.py.")
    out_dim, patch_out_dim = args.out_dim, args.patch_out_dim
    if teacher is not None:
        out_dim, patch_out_dim = teacher.head.last_layer.out_features, teacher.head.last_layer2.out_features
        patch, teacher_patch = backbone.patch_embed.patch_size[0], teacher.backbone.patch_embed.patch_size[0]
        if patch != teacher_patch:
            raise common.UserError(f"the student's patch size ({patch}) differs from the teacher's ({teacher_patch}): "
                                   f"patch targets need the same grid. Pass --patch_size {teacher_patch}.")
    head = iBOTHead(dim, out_dim, patch_out_dim, args.hidden_dim, args.bottleneck_dim, norm_last_layer=teacher is None,
                    shared=args.shared_head)
    return iBOTNetwork(backbone, head, mask_token=True), arch


# ----------------------------------------------------------------------------------------------- masks
class BlockMaskGenerator:
    """BEiT-style blockwise masks on an h x w patch grid, as iBOT draws them: with probability 1 - p nothing is
    masked; otherwise random rectangles cover a target fraction ~ U(ratio) of the grid, each of area ~ U(min_area,
    remaining budget) (min_area = iBOT's (min(h, w) // 3)^2, 16 for 14 x 14) and log-uniform aspect ratio in
    `aspect`, until the target is reached or a block fails to fit `attempts` times. Returns bool [h, w]."""

    def __init__(self, grid, p=0.5, ratio=(0.1, 0.5), aspect=(0.3, 1 / 0.3), attempts=10):
        self.h, self.w = grid
        self.p, self.ratio, self.attempts = p, ratio, attempts
        self.min_area = max(1, (min(grid) // 3) ** 2)
        self.log_aspect = (math.log(aspect[0]), math.log(aspect[1]))

    def __call__(self, rng):
        mask = torch.zeros(self.h, self.w, dtype=torch.bool)
        if rng.random() >= self.p:
            return mask
        target, covered = round(rng.uniform(*self.ratio) * self.h * self.w), 0
        while covered < target:
            added = self.add_block(mask, target - covered, rng)
            if added == 0:
                break
            covered += added
        return mask

    def add_block(self, mask, budget, rng):
        """Mask one random rectangle that adds between 1 and `budget` patches; returns that number (0: none fitted)."""
        for _ in range(self.attempts):
            area = rng.uniform(min(self.min_area, budget), budget)
            aspect = math.exp(rng.uniform(*self.log_aspect))
            h, w = round(math.sqrt(area * aspect)), round(math.sqrt(area / aspect))
            if 1 <= h <= self.h and 1 <= w <= self.w:
                top, left = rng.randrange(self.h - h + 1), rng.randrange(self.w - w + 1)
                added = h * w - int(mask[top:top + h, left:left + w].sum())
                if 0 < added <= budget:
                    mask[top:top + h, left:left + w] = True
                    return added
        return 0


class MaskedCrops(Dataset):
    """Adds one block mask per global crop to each sample of a multi-crop dataset, drawn in the loader workers
    from a generator seeded by (seed, epoch, index) like the crops (reproducible on resume, any number of
    workers or processes). Samples become ((crops, masks bool [n_global, h, w]), label)."""

    def __init__(self, dataset, mask_generator, n_global, seed=0):
        self.dataset, self.mask_generator, self.n_global, self.seed = dataset, mask_generator, n_global, seed

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, key):
        crops, label = self.dataset[key]
        epoch, index = key if isinstance(key, tuple) else (0, key)
        rng = random.Random(common.mix_seed(self.seed, epoch, index, 1))
        return (crops, torch.stack([self.mask_generator(rng) for _ in range(self.n_global)])), label


def collate_masked_raw(samples):
    """--gpu_augment: ((raw image, masks), label) samples -> ((images, masks [B, n_global, h, w]), labels)."""
    images, labels = gpu_augment.collate_raw([(image, label) for (image, _), label in samples])
    return (images, torch.stack([masks for (_, masks), _ in samples])), labels


# ---------------------------------------------------------------------------------- the RoB target and loss
def teacher_probs(teacher_logits, temp, center=None):
    """The RoB seam: the frozen teacher's logits (CLS or patch) become the target distribution
    softmax(logits / 0.07). (The plain-iBOT baseline subtracts its running centre first.)"""
    logits = teacher_logits.float() if center is None else teacher_logits.float() - center
    return F.softmax(logits / temp, dim=-1)


def patch_loss(student_logits, teacher_probs, masks, student_temp):
    """Masked-patch term: per global crop, the mean over its masked patches of H(teacher_probs, softmax(
    student_logits / T)) (0 for a crop without masked patch), averaged over all n_global * B crops, i.e. over
    the images of the batch, then over the views. student_logits, teacher_probs: [M, K2] at the masked
    positions, in the row-major order of masks: bool [n_global * B, N] (both networks saw the same view)."""
    per_patch = -(teacher_probs * F.log_softmax(student_logits.float() / student_temp, dim=-1)).sum(-1)
    per_crop = torch.zeros(masks.shape, device=per_patch.device).masked_scatter(masks, per_patch).sum(1)
    return (per_crop / masks.sum(1).clamp(min=1)).mean()


def ibot_loss(student_out, targets, masks, pairs, student_temp):
    """(CLS term, patch term) of the student's (CLS logits, patch logits) against the teacher's targets."""
    return (common.multi_crop_cross_entropy(student_out[0], targets[0], pairs, student_temp),
            patch_loss(student_out[1], targets[1], masks, student_temp))


# -------------------------------------------------------------------- the plain-iBOT baseline (--teacher ema)
class PlainIBOT(nn.Module):
    """What plain iBOT adds to the student branch, none of which RoB needs: the teacher is an EMA of the student
    (without its mask token; momentum cosine from 0.996 to 1), its CLS and patch logits are centred (two running
    means over the global batch) and sharpened at temperatures warmed up from 0.04, the last layers are frozen for
    the first epoch and each gradient tensor is clipped."""

    def __init__(self, student, arch, args, iters_per_epoch):
        super().__init__()
        teacher_arch = {**arch, "kwargs": {**arch["kwargs"], "drop_path_rate": 0.0}}  # no drop-path, no mask token
        self.teacher = iBOTNetwork(common.create_backbone(teacher_arch), copy.deepcopy(student.head))
        self.teacher.load_state_dict({k: v for k, v in student.state_dict().items() if k != "mask_token"})
        self.teacher = training.sync_batchnorm(self.teacher.requires_grad_(False))  # (after DDP's broadcast)
        self.student_params = [p for name, p in student.named_parameters() if name != "mask_token"]
        self.register_buffer("center", torch.zeros(1, student.head.last_layer.out_features))
        self.register_buffer("patch_center", torch.zeros(1, student.head.last_layer2.out_features))
        self.args, self.iters_per_epoch = args, iters_per_epoch
        self.momentum = training.cosine_schedule(args.momentum_teacher, 1.0, args.epochs, iters_per_epoch)
        warmup = min(args.warmup_teacher_temp_epochs, args.epochs)

        def temps(start, end):  # per epoch: linear from start to end, then constant
            return [start + (end - start) * min(e / warmup, 1) if warmup else end for e in range(args.epochs)]
        self.cls_temps = temps(args.warmup_teacher_temp, args.teacher_temp)
        self.patch_temps = temps(args.warmup_teacher_patch_temp, args.teacher_patch_temp)

    def targets(self, teacher_cls, teacher_patch, patch_index, it):
        epoch = it // self.iters_per_epoch
        return (teacher_probs(teacher_cls, self.cls_temps[epoch], self.center),
                teacher_probs(teacher_patch[patch_index], self.patch_temps[epoch], self.patch_center))

    def before_optimizer_step(self, student, it):
        if self.args.clip_grad != 0:
            clip_gradients_per_tensor(student.parameters(), 3.0 if self.args.clip_grad is None else self.args.clip_grad)
        if it // self.iters_per_epoch < self.args.freeze_last_layer:
            for p in itertools.chain(student.head.last_layer.parameters(), student.head.last_layer2.parameters()):
                p.grad = None

    @torch.no_grad()
    def after_optimizer_step(self, teacher_cls, teacher_patch, it):
        """teacher <- m * teacher + (1 - m) * student; each centre <- c * centre + (1 - c) * mean logits."""
        torch._foreach_lerp_(list(self.teacher.parameters()), self.student_params, 1 - self.momentum[it])
        for center, logits in ((self.center, teacher_cls), (self.patch_center, teacher_patch)):
            batch_center = common.all_reduce_mean(logits.float().mean(0, keepdim=True))
            center.mul_(self.args.center_momentum).add_(batch_center, alpha=1 - self.args.center_momentum)

    def checkpoint_state(self):  # the layout of the teacher loader and of eval_linear --checkpoint_key teacher
        return dict(teacher=self.teacher.state_dict(), center={"center": self.center},
                    patch_center={"center": self.patch_center})

    def load_checkpoint_state(self, ckpt):
        self.teacher.load_state_dict(ckpt["teacher"])
        self.center.copy_(ckpt["center"]["center"])
        self.patch_center.copy_(ckpt["patch_center"]["center"])


@torch.no_grad()
def clip_gradients_per_tensor(params, max_norm):
    """Scale each parameter's gradient down to a norm of at most max_norm, tensor by tensor (iBOT's clipping)."""
    grads = [p.grad for p in params if p.grad is not None]
    norms = torch._foreach_norm(grads)
    torch._foreach_mul_(grads, [(max_norm / (n + 1e-6)).clamp(max=1.0) for n in norms])


# ------------------------------------------------------------------------------------------------ training
def build(args, device, iters_per_epoch, student, arch, teacher=None):
    """Everything a training step needs, as one namespace: the student (and its DDP wrapper), the frozen
    teacher (RoB) or the plain-iBOT pieces (--teacher ema), the pairing, the optimiser and the schedules."""
    run = training.setup_run(args, device, iters_per_epoch, student.to(device), arch, "rob_ibot")
    run.plain = PlainIBOT(student, arch, args, iters_per_epoch).to(device) if teacher is None else None
    run.teacher = run.plain.teacher if teacher is None else \
        training.place_teacher(teacher, device, run, [teacher.backbone, teacher.head.mlp])
    if args.compile:  # in place, so that checkpoints keep their keys; ViTs per block (fast to compile)
        for network in (student, run.teacher):
            training.compile_model(network.backbone)
            network.head.compile()
    run.loss_fn = torch.compile(ibot_loss) if args.compile else ibot_loss
    run.pairs = common.view_pairs(2, 2 + args.local_crops_number, swapped=args.swapped or teacher is None)
    run.clip_grad = 0.0 if teacher is None else args.clip_grad or 0.0  # the baseline clips per tensor (PlainIBOT)
    common.log(f"student {args.student}: {sum(p.numel() for p in student.parameters()) / 1e6:.1f}M parameters, "
               f"head -> {student.head.last_layer.out_features} (CLS) / {student.head.last_layer2.out_features} "
               f"(patches){', shared' if args.shared_head else ''}; teacher: {args.teacher}")
    return run


def teacher_forward(run, crops, patch_index):
    """Teacher CLS logits of the global crops and patch logits: at the masked positions (RoB), or everywhere
    (the baseline's centre needs them all)."""
    with torch.no_grad(), torch.autocast(run.device.type, run.amp_dtype, enabled=run.plain is not None and run.amp):
        return run.teacher([c.to(run.teacher_dtype) for c in crops[:2]],
                           patch_index=None if run.plain is not None else patch_index)


def train_step(run, batch, it):
    """One optimisation step on a batch (crops, globals first; masks: bool [2 * B, h, w] on the host, of the global
    crops, crop-major); returns the loss and its two terms (a tensor of 3)."""
    crops, masks = batch
    training.start_step(run, it)  # lr, weight decay, and a seed per step for drop-path (exact resume)
    # the masked patches, row-major, found on the host (a nonzero() on the GPU would wait for it)
    patch_index = common.to_device(masks.flatten().nonzero()[:, 0], run.device)
    masks = common.to_device(masks, run.device)
    teacher_out = run.side_stream.start(teacher_forward, run, crops, patch_index)  # concurrent on a GPU
    with torch.autocast(run.device.type, run.amp_dtype, enabled=run.amp):
        student_out = run.student_ddp(crops, masks=masks, patch_index=patch_index)
    teacher_cls, teacher_patch = run.side_stream.join(teacher_out)
    if run.plain is None:
        targets = (teacher_probs(teacher_cls, run.args.teacher_temp),
                   teacher_probs(teacher_patch, run.args.teacher_patch_temp))
    else:
        targets = run.plain.targets(teacher_cls, teacher_patch, patch_index, it)
    cls_term, patch_term = run.loss_fn(student_out, targets, masks.flatten(1), run.pairs, run.args.student_temp)
    loss = run.args.lambda1 * cls_term + run.args.lambda2 * patch_term
    run.optimizer.zero_grad(set_to_none=True)
    run.scaler.scale(loss).backward()
    run.scaler.unscale_(run.optimizer)
    if run.clip_grad:
        nn.utils.clip_grad_norm_(run.student.parameters(), run.clip_grad)
    if run.plain is not None:
        run.plain.before_optimizer_step(run.student, it)
    run.scaler.step(run.optimizer)
    run.scaler.update()
    if run.plain is not None:
        run.plain.after_optimizer_step(teacher_cls, teacher_patch, it)
    return torch.stack([loss, cls_term, patch_term]).detach()


def train_one_epoch(run, data, epoch, step, stop):
    """The steps of `epoch` from `step` (mid-epoch after a resume) to its end or to a stop request (Ctrl-C,
    SIGTERM), then a checkpoint. Loss values are read one step late (the host never waits for the GPU).
    Returns (step, whether to stop)."""
    first = step - epoch * run.iters_per_epoch
    data.sampler.set_epoch(epoch, start_batch=first)
    stats, start, stopping = training.StepStats(["train_loss", "train_cls", "train_patch"]), time.time(), False
    progress = tqdm(data.loader, desc=f"epoch {epoch}", initial=first, total=run.iters_per_epoch,
                    disable=not common.is_main_process(), dynamic_ncols=True)
    for (batch, masks), indices in progress:
        crops = training.crops_on_device(batch, indices, data.dataset, data.augmentation, run.args, run.device, step)
        masks = masks.transpose(0, 1).flatten(0, 1)  # [2 * B, h, w], crop-major like the crops
        done = stats.push(train_step(run, (crops, masks), step), stop.requested, step)
        step += 1
        if done:
            progress.set_postfix(loss=f"{done[0][0]:.4f}", cls=f"{done[0][1]:.4f}", patch=f"{done[0][2]:.4f}",
                                 lr=f"{run.lr_schedule[step - 1]:.2e}")
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
    teacher = None if args.teacher == "ema" else load_teacher(args.teacher)
    student, arch = build_student(args, teacher)
    masks = BlockMaskGenerator((args.global_crops_size // student.backbone.patch_embed.patch_size[0],) * 2,
                               args.mask_prob, args.mask_ratio)
    data = training.build_training_data(args, build_augmentation(args),
                                        wrap=lambda dataset: MaskedCrops(dataset, masks, 2, args.seed),
                                        collate_fn=collate_masked_raw if args.gpu_augment else None)
    run = build(args, device, len(data.loader), student, arch, teacher)
    with training.OutputDir(args.output_dir) as output_dir:
        ckpt = training.resume(run, data, output_dir, "rob_ibot")
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
    training.run_main(main, argparse.ArgumentParser("RoB-iBOT", parents=[get_args_parser()]))
