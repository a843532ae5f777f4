"""RoB-iBOT: train a small ViT by distillation from a frozen, pretrained iBOT model.

iBOT trains a ViT student on two objectives at once: its CLS token matches the softmax output of a momentum
teacher on other views (DINO's objective), and its tokens at blockwise-masked positions match the teacher's
outputs for the same positions of the unmasked view (masked image modelling against an "online tokenizer").
RoB ("Replace one Branch") keeps the student branch as it is and replaces the teacher by a released iBOT model
(backbone + iBOT head), frozen: no EMA, no centering, no temperature warm-up. The student, a fresh ViT-Tiny /
ViT-S, learns to predict softmax(teacher_cls_logits / 0.07) from the same global crops and from the local crops,
and softmax(teacher_patch_logits / 0.07) at the masked patches of each global crop.

    torchrun --nproc_per_node=8 rob_ibot.py --student vit_tiny --drop_path_rate 0 --data_path /data/imagenet/train \
        --output_dir out/

`--teacher ema` runs plain iBOT instead (EMA teacher, centering, temperature warm-up): the baseline of the paper,
and a way to pretrain a teacher on your own data. Its checkpoint is a valid --teacher for RoB.
"""
import argparse
import copy
import datetime
import itertools
import json
import math
import random
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import Dataset
from tqdm import tqdm

import common

TEACHERS = {  # official iBOT full checkpoints (backbone + iBOT head): name -> (release, backbone, patch)
    "ibot_vits16": ("vits_16", "vit_small", 16),
    "ibot_vitb16": ("vitb_16", "vit_base", 16),
    "ibot_vitl16": ("vitl_16", "vit_large", 16),
}
URL = "https://lf3-nlp-opensource.bytetos.com/obj/nlp-opensource/archive/2022/ibot/{0}/checkpoint.pth"


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
    group.add_argument("--drop_path_rate", type=float, default=0.1, help="Student stochastic depth: 0.1 for "
                       "ViT-S, 0 for ViT-Tiny (the reference recipe).")
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
    group.add_argument("--out_dim", type=int, default=8192, help="Outputs of the CLS last layer.")
    group.add_argument("--patch_out_dim", type=int, default=8192, help="Outputs of the patch last layer.")
    group.add_argument("--hidden_dim", type=int, default=2048, help="iBOT head hidden width.")
    group.add_argument("--bottleneck_dim", type=int, default=256, help="iBOT head bottleneck width.")
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
    group = parser.add_argument_group("optimisation")
    group.add_argument("--epochs", type=int, default=100)
    group.add_argument("--batch_size_per_gpu", type=int, default=64, help="Global batch = this x processes.")
    group.add_argument("--lr", type=float, default=5e-4, help="Peak lr at a global batch of 256, scaled "
                       "linearly (1024 -> 2e-3, the paper's setting).")
    group.add_argument("--min_lr", type=float, default=1e-5, help="lr at the end of the cosine.")
    group.add_argument("--warmup_epochs", type=int, default=10, help="Linear lr warm-up epochs.")
    group.add_argument("--weight_decay", type=float, default=0.04, help="Initial weight decay (cosine).")
    group.add_argument("--weight_decay_end", type=float, default=0.48, help="Final weight decay: 0.48 as the "
                       "reference RoB-iBOT config (the other RoB scripts use 0.4).")
    group.add_argument("--clip_grad", type=float, default=3.0, help="Clip the global gradient norm (0: off).")
    group.add_argument("--precision", default=None, choices=["bf16", "fp16", "fp32"], help="Autocast dtype "
                       "(default bf16 on GPU, fp32 on CPU). The teacher runs in that dtype, losses in fp32.")
    group.add_argument("--compile", action="store_true", help="torch.compile teacher, student and loss (ViTs per "
                       "block: quick to compile). Faster on GPU once compiled.")
    group.add_argument("--overlap_teacher", action=argparse.BooleanOptionalAction, default=True, help="On GPU, "
                       "run the teacher on a second CUDA stream, concurrently with the student's forward.")
    group = parser.add_argument_group("multi-crop")
    group.add_argument("--global_crops_scale", type=float, nargs=2, default=(0.25, 1.0))
    group.add_argument("--local_crops_number", type=int, default=10, help="Small crops (student only, never masked).")
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
class iBOTHead(nn.Module):
    """DINO's head applied to every token: MLP -> L2-normalise -> weight-normalised linear layer, `last_layer`
    (K outputs) for CLS tokens and `last_layer2` (K2 outputs) for patch tokens (the official module names, so
    that iBOT checkpoints load). `weight_norm=False` gives plain last layers, for a frozen teacher."""

    def __init__(self, in_dim, out_dim, patch_out_dim, hidden_dim=2048, bottleneck_dim=256, nlayers=3,
                 use_bn=False, norm_last_layer=False, weight_norm=True):
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
        for name, k in (("last_layer", out_dim), ("last_layer2", patch_out_dim)):
            layer = nn.Linear(bottleneck_dim, k, bias=False)
            if weight_norm:
                layer = nn.utils.parametrizations.weight_norm(layer)
                layer.parametrizations.weight.original0.data.fill_(1.0)  # g = 1: rows of unit norm
                layer.parametrizations.weight.original0.requires_grad = not norm_last_layer
            setattr(self, name, layer)

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


def head_from_state_dict(sd, teacher=True):
    """An iBOTHead whose sizes are read from its tensors (shared or separate CLS / patch last layers, any
    widths); weight norm folded for a teacher."""
    sd = fold_weight_norm(sd)
    linears = sorted(int(k.split(".")[1]) for k in sd if k.startswith("mlp.") and sd[k].ndim == 2)
    first, last = sd[f"mlp.{linears[0]}.weight"], sd[f"mlp.{linears[-1]}.weight"]
    head = iBOTHead(first.shape[1], sd["last_layer.weight"].shape[0], sd["last_layer2.weight"].shape[0],
                    hidden_dim=first.shape[0], bottleneck_dim=last.shape[0], nlayers=len(linears),
                    use_bn=any(k.endswith("running_mean") for k in sd), weight_norm=not teacher)
    return head, sd


def fold_weight_norm(sd):
    """Weight-normalised last layers (official weight_g / weight_v, or torch parametrization names) to the
    plain weight g * v / ||v|| (row-wise) that a frozen teacher uses. A shared official head stores the same
    tensor under last_layer and last_layer2: each is folded into its own copy."""
    sd = dict(sd)
    for layer in ("last_layer", "last_layer2"):
        for g_key, v_key in [(f"{layer}.weight_g", f"{layer}.weight_v"),
                             (f"{layer}.parametrizations.weight.original0", f"{layer}.parametrizations.weight.original1")]:
            if g_key in sd:
                g, v = sd.pop(g_key).float(), sd.pop(v_key).float()
                sd[f"{layer}.weight"] = g * v / v.norm(dim=1, keepdim=True)
    return sd


# --------------------------------------------------------------------------------------------- teacher
def load_teacher(name_or_path, num_heads=None):
    """The frozen RoB teacher (backbone + iBOT head, eval, no grad) from an official name (downloaded once
    into the torch.hub cache) or a local file."""
    source = URL.format(TEACHERS[name_or_path][0]) if name_or_path in TEACHERS else name_or_path
    return teacher_from_checkpoint(common.load_file(source, "iBOT teacher checkpoint"), source, num_heads)


def teacher_from_checkpoint(ckpt, source, num_heads=None):
    """Recognise the checkpoint's format, build the matching backbone and head from its tensors and load
    them strictly. Accepts iBOT full checkpoints and this script's own; refuses the rest with the fix."""
    if not isinstance(ckpt, dict):
        raise ValueError(f"{source} is not a checkpoint dictionary")
    method = ckpt.get("method")
    if method == "rob_ibot":  # a checkpoint of this script: its EMA teacher (baseline runs) or its student
        sd = ckpt.get("teacher") or ckpt["student"]
        backbone = common.create_backbone({**ckpt["arch"], "kwargs": {**ckpt["arch"]["kwargs"], "drop_path_rate": 0.0}})
        what = "rob_ibot.py checkpoint"
    elif method is not None:
        raise ValueError(f"{source} was written by {method}.py, not rob_ibot.py: a RoB-iBOT teacher needs an iBOT "
                         f"head (CLS and patch outputs). Use {method}.py with it, or give an iBOT checkpoint.")
    elif isinstance(ckpt.get("teacher"), dict):  # official iBOT full checkpoint.pth
        sd = common.strip_prefix(ckpt["teacher"], "module.")
        if not any(k.startswith("head.last_layer2.") for k in sd):
            raise ValueError(f"{source} has no iBOT patch head (head.last_layer2): a DINO full checkpoint? Use "
                             "rob_dino.py with it.")
        arch_name = getattr(ckpt.get("args"), "arch", None)
        backbone, _ = common.backbone_from_state_dict(common.sub_state_dict(sd, "backbone."), num_heads, arch_name)
        what = "iBOT full checkpoint"
    else:
        flat = common.strip_prefix(ckpt.get("state_dict", ckpt), "module.")
        if "target_encoder" in ckpt:
            raise ValueError(f"{source} is an MSN checkpoint: use rob_msn.py with it.")
        if "prototypes.weight" in flat:
            raise ValueError(f"{source} is a SwAV checkpoint: use rob_swav.py with it.")
        if "cls_token" in flat or "conv1.weight" in flat:
            raise ValueError(f"{source} holds a backbone only (e.g. iBOT's checkpoint_teacher.pth); RoB-iBOT needs "
                             "the iBOT head too, which the full checkpoint.pth releases contain, e.g. "
                             + URL.format(TEACHERS["ibot_vitb16"][0]) + f" (or pass --teacher {'/'.join(TEACHERS)} "
                             "to download it).")
        raise ValueError(f"{source} is not an iBOT checkpoint (expected a dict with a 'teacher' state dict).")
    if not common.is_vit(backbone):
        raise ValueError(f"{source} holds a convnet: a RoB-iBOT teacher must be a ViT (patch outputs).")
    head, head_sd = head_from_state_dict(common.sub_state_dict(sd, "head."))
    common.load_strict(backbone, common.sub_state_dict(sd, "backbone."), source, f"{what} backbone")
    common.load_strict(head, head_sd, source, "iBOT head")
    return freeze(iBOTNetwork(backbone, head))


def freeze(model):
    model.eval().requires_grad_(False)
    return model


def random_teacher(name):
    """An official teacher architecture with random weights (for --benchmark: no download)."""
    _, backbone_name, patch = TEACHERS[name]
    backbone, _ = common.build_teacher_backbone(backbone_name, patch_size=patch)
    head = iBOTHead(common.feature_dim(backbone), 8192, 8192, weight_norm=False)
    return freeze(iBOTNetwork(backbone, head))


# ------------------------------------------------------------------------------------------------ masks
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
    images, labels = common.collate_raw([(image, label) for (image, _), label in samples])
    return (images, torch.stack([masks for (_, masks), _ in samples])), labels


# ------------------------------------------------------------------------------------------------ loss
def teacher_probs(teacher_logits, temp, center=None):
    """The RoB seam: the frozen teacher's logits (CLS or patch) become the target distribution
    softmax(logits / 0.07). (The plain-iBOT baseline subtracts its running centre first.)"""
    logits = teacher_logits.float() if center is None else teacher_logits.float() - center
    return F.softmax(logits / temp, dim=-1)


def view_pairs(n_global, n_crops, swapped):
    """(teacher view, student crop) pairs of the CLS term. Same-view: teacher view i -> student crop i and
    every local crop. Swapped (iBOT's): teacher view i -> every student crop except i."""
    if swapped:
        return [(t, s) for t in range(n_global) for s in range(n_crops) if s != t]
    return [(t, s) for t in range(n_global) for s in range(n_crops) if s == t or s >= n_global]


def cls_loss(student_logits, teacher_probs, pairs, student_temp):
    """Mean over pairs of the batch-mean cross-entropy H(teacher_probs[t], softmax(student_logits[s] / T)).
    student_logits: [n_crops * B, K], teacher_probs: [n_global * B, K] (both crop-major)."""
    n_crops, n_global = max(s for _, s in pairs) + 1, max(t for t, _ in pairs) + 1
    student_log_probs = F.log_softmax(student_logits.float() / student_temp, dim=-1).chunk(n_crops)
    targets = teacher_probs.chunk(n_global)
    return sum(-(targets[t] * student_log_probs[s]).sum(-1).mean() for t, s in pairs) / len(pairs)


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
    return (cls_loss(student_out[0], targets[0], pairs, student_temp),
            patch_loss(student_out[1], targets[1], masks, student_temp))


class Center(nn.Module):
    """Plain-iBOT baseline only: the running mean of the teacher's logits over the global batch (of CLS tokens,
    or of all patch tokens), subtracted before the softmax to avoid collapse (RoB's frozen teacher needs none)."""

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

    # ---- networks (first: the patch grid of the masks comes from the student): frozen pretrained teacher (RoB)
    # or EMA copy of the student (baseline), fresh ViT student with a mask token
    backbone, dim, arch = common.build_student(args.student, args.global_crops_size, args.patch_size,
                                               args.drop_path_rate)
    if not common.is_vit(backbone):
        raise ValueError(f"--student {args.student} is not a ViT: RoB-iBOT's patch term needs patch tokens and a "
                         "mask token. Train convnet students with rob_dino.py, rob_msn.py or rob_swav.py.")
    patch = backbone.patch_embed.patch_size[0]
    out_dim, patch_out_dim, hidden_dim, bottleneck_dim = args.out_dim, args.patch_out_dim, args.hidden_dim, args.bottleneck_dim
    if not ema:  # the student's head predicts the teacher's K and K2 outputs and copies the teacher head's widths
        teacher = random_teacher(args.teacher) if args.benchmark else load_teacher(args.teacher)
        out_dim, patch_out_dim = teacher.head.last_layer.out_features, teacher.head.last_layer2.out_features
        bottleneck_dim = teacher.head.last_layer.in_features
        hidden_dim = teacher.head.mlp[0].out_features if len(teacher.head.mlp) > 1 else hidden_dim
        if teacher.backbone.patch_embed.patch_size[0] != patch:
            raise ValueError(f"the student's patch size ({patch}) differs from the teacher's "
                             f"({teacher.backbone.patch_embed.patch_size[0]}): patch targets need the same grid. "
                             f"Pass --patch_size {teacher.backbone.patch_embed.patch_size[0]}.")
    head = iBOTHead(dim, out_dim, patch_out_dim, hidden_dim, bottleneck_dim, norm_last_layer=ema)
    student = iBOTNetwork(backbone, head, mask_token=True).to(device)
    if ema:  # baseline: the teacher is an EMA of the student (same architecture without drop-path or mask token)
        teacher_arch = {**arch, "kwargs": {**arch["kwargs"], "drop_path_rate": 0.0}}
        teacher = iBOTNetwork(common.create_backbone(teacher_arch), copy.deepcopy(head))
        teacher.load_state_dict({k: v for k, v in student.state_dict().items() if k != "mask_token"})
        teacher.requires_grad_(False)
        ema_student_params = [p for name, p in student.named_parameters() if name != "mask_token"]
        center, patch_center = (Center(k, args.center_momentum).to(device) for k in (out_dim, patch_out_dim))
    teacher.to(device)
    teacher_dtype = torch.float32
    if not ema and device.type == "cuda" and precision != "fp32":  # frozen teacher stored in bf16 (fp32 last layers)
        teacher_dtype = amp_dtype
        teacher.backbone.to(amp_dtype)
        teacher.head.mlp.to(amp_dtype)
    student_ddp = DistributedDataParallel(student, device_ids=[device.index] if device.type == "cuda" else None) \
        if world_size > 1 else student
    loss_fn = ibot_loss
    if args.compile:  # in place, so checkpoints keep their keys; ViTs per block (fast to compile)
        for network in (student, teacher):
            common.compile_model(network.backbone)
            network.head.compile()
        loss_fn = torch.compile(ibot_loss)
    overlap = args.overlap_teacher and device.type == "cuda"
    teacher_stream = torch.cuda.Stream(device) if overlap else None
    n_params = sum(p.numel() for p in student.parameters())
    common.log(f"student {args.student}: {n_params / 1e6:.1f}M parameters, head -> {out_dim} (CLS) / "
               f"{patch_out_dim} (patches); teacher: {args.teacher}")

    # ---- data: DINO's multi-crop augmentation (2 global crops for teacher and student, locals for the student)
    # + one block mask per global crop, drawn in the loader workers
    augmentation = common.MultiCropAugmentation(
        args.global_crops_size, args.local_crops_size, n_global, args.local_crops_number, args.global_crops_scale,
        args.local_crops_scale, color_jitter=(0.4, 0.4, 0.2, 0.1), blur_p=(1.0, 0.1, 0.5), solarize_p=(0.0, 0.2, 0.0))
    mask_generator = BlockMaskGenerator((args.global_crops_size // patch,) * 2, args.mask_prob, args.mask_ratio)
    if not args.benchmark:
        base = common.build_dataset(args.data_path, synthetic_shapes=augmentation.crop_shapes, raw=args.gpu_augment)
        base = common.random_subset(base, args.subset, args.seed)
        dataset = common.AugmentedDataset(base, None if args.gpu_augment else augmentation, args.seed)
        loader, sampler = common.build_loader(MaskedCrops(dataset, mask_generator, n_global, args.seed),
                                              args.batch_size_per_gpu, args.num_workers, args.seed,
                                              collate_masked_raw if args.gpu_augment else None)
        iters_per_epoch = len(loader)
        common.log(f"data: {len(dataset)} images from {args.data_path}, {iters_per_epoch} steps per epoch")
    else:
        iters_per_epoch = max(args.benchmark, 1)

    # ---- loss pairing, optimiser and per-iteration schedules
    pairs = view_pairs(n_global, n_global + args.local_crops_number, swapped=args.swapped or ema)
    global_batch = args.batch_size_per_gpu * world_size
    optimizer = torch.optim.AdamW(common.param_groups(student), fused=device.type == "cuda")
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
    lr_schedule = common.cosine_schedule(args.lr * global_batch / 256, args.min_lr, args.epochs, iters_per_epoch,
                                         args.warmup_epochs)
    wd_schedule = common.cosine_schedule(args.weight_decay, args.weight_decay_end, args.epochs, iters_per_epoch)
    if ema:
        momentum_schedule = common.cosine_schedule(args.momentum_teacher, 1.0, args.epochs, iters_per_epoch)
        warmup_temp = min(args.warmup_teacher_temp_epochs, args.epochs)

        def temp_schedule(start, end):  # per epoch: linear from start to end, then constant
            return [start + (end - start) * min(e / warmup_temp, 1) if warmup_temp else end for e in range(args.epochs)]
        cls_temps = temp_schedule(args.warmup_teacher_temp, args.teacher_temp)
        patch_temps = temp_schedule(args.warmup_teacher_patch_temp, args.teacher_patch_temp)

    def teacher_outputs_of(crops, patch_index):
        with torch.no_grad(), torch.autocast(device.type, amp_dtype, enabled=ema and precision != "fp32"):
            # the RoB teacher computes patch outputs at the masked positions only; the baseline's centre needs all
            return teacher([c.to(teacher_dtype) for c in crops[:n_global]], patch_index=None if ema else patch_index)

    def train_step(crops, masks, it):
        """One optimisation step on a batch (list of crops, globals first; masks: bool [n_global * B, h, w] on
        the host, of the global crops, crop-major); returns the loss and its two terms (a tensor of 3)."""
        epoch = it // iters_per_epoch
        for i, group in enumerate(optimizer.param_groups):
            group["lr"] = lr_schedule[it]
            if i == 0:
                group["weight_decay"] = wd_schedule[it]
        torch.manual_seed(common.mix_seed(args.seed, rank, it))  # drop-path etc.: reproducible on resume
        # the masked patches, row-major, found on the host (a nonzero() on the GPU would wait for it)
        patch_index = common.to_device(masks.flatten().nonzero()[:, 0], device)
        masks = common.to_device(masks, device)
        flat_masks = masks.flatten(1)  # [n_global * B, N]
        if overlap:  # the teacher runs on a second stream, concurrently with the student's forward
            teacher_stream.wait_stream(torch.cuda.current_stream(device))
            with torch.cuda.stream(teacher_stream):
                teacher_cls, teacher_patch = teacher_outputs_of(crops, patch_index)
        else:
            teacher_cls, teacher_patch = teacher_outputs_of(crops, patch_index)
        with torch.autocast(device.type, amp_dtype, enabled=precision != "fp32"):
            student_out = student_ddp(crops, masks=masks, patch_index=patch_index)
        if overlap:
            torch.cuda.current_stream(device).wait_stream(teacher_stream)
        if ema:
            targets = (teacher_probs(teacher_cls, cls_temps[epoch], center.center),
                       teacher_probs(teacher_patch[patch_index], patch_temps[epoch], patch_center.center))
        else:
            targets = (teacher_probs(teacher_cls, args.teacher_temp), teacher_probs(teacher_patch, args.teacher_patch_temp))
        cls_term, patch_term = loss_fn(student_out, targets, flat_masks, pairs, args.student_temp)
        loss = args.lambda1 * cls_term + args.lambda2 * patch_term
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        if args.clip_grad:
            scaler.unscale_(optimizer)
            nn.utils.clip_grad_norm_(student.parameters(), args.clip_grad)
        if ema and epoch < args.freeze_last_layer:  # baseline: last layers frozen during the first epoch(s)
            for p in itertools.chain(student.head.last_layer.parameters(), student.head.last_layer2.parameters()):
                p.grad = None
        scaler.step(optimizer)
        scaler.update()
        if ema:  # baseline: teacher <- momentum * teacher + (1 - momentum) * student; update both centres
            with torch.no_grad():
                torch._foreach_lerp_(list(teacher.parameters()), ema_student_params, 1 - momentum_schedule[it])
                center.update(teacher_cls)
                patch_center.update(teacher_patch)
        return torch.stack([loss, cls_term, patch_term]).detach()

    if args.benchmark:  # a fixed synthetic batch on the device; FLOPs counted on an eager step
        crops, masks = benchmark_batch(args, n_global, mask_generator, device)
        with torch.compiler.set_stance("force_eager"):
            flops_per_image = common.count_flops(lambda: train_step(crops, masks, 0)) / args.batch_size_per_gpu
        steps = iter(range(10 ** 9))
        return common.benchmark(lambda: train_step(crops, masks, next(steps) % iters_per_epoch), args.benchmark, 3,
                                global_batch, flops_per_image, device, amp_dtype,
                                f"RoB-iBOT {args.student} <- {args.teacher}, batch {args.batch_size_per_gpu}/GPU, "
                                f"{n_global}x{args.global_crops_size} + {args.local_crops_number}x{args.local_crops_size}"
                                + (", compiled" if args.compile else "") + (", teacher on a side stream" if overlap else ""))

    # ---- resume (output_dir/checkpoint.pth), then the loop
    start_step = 0
    ckpt = common.load_resume_checkpoint(output_dir, "rob_ibot")
    if ckpt is not None:
        student.load_state_dict(ckpt["student"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scaler.load_state_dict(ckpt["scaler"])
        if ema:
            teacher.load_state_dict(ckpt["teacher"])
            center.load_state_dict(ckpt["center"])
            patch_center.load_state_dict(ckpt["patch_center"])
        start_step = ckpt["step"]
        common.log(f"resumed from {output_dir / 'checkpoint.pth'} at step {start_step} (epoch {ckpt['epoch']})")

    def save_checkpoint(step, epoch):
        if not common.is_main_process():
            return
        state = dict(method="rob_ibot", arch=arch, args=vars(args), step=step, epoch=epoch,
                     student=student.state_dict(), optimizer=optimizer.state_dict(), scaler=scaler.state_dict())
        if ema:
            state.update(teacher=teacher.state_dict(), center=center.state_dict(), patch_center=patch_center.state_dict())
        common.save_atomic(state, output_dir / "checkpoint.pth")
        if args.saveckp_freq and step % iters_per_epoch == 0 and epoch % args.saveckp_freq == 0:
            common.save_atomic(state, output_dir / f"checkpoint{epoch:04}.pth")
        common.export_timm(student.backbone, arch, output_dir / "student_timm.pth")

    stop, stats = common.StopRequest(), common.StepStats()
    step = start_step

    term_names = ["train_loss", "train_cls", "train_patch"]

    def check(values, at_step):
        """Host side of a finished step: NaN stop and progress; True if a process asked to stop."""
        *terms, stop_votes = values
        if not math.isfinite(terms[0]):
            raise FloatingPointError(f"non-finite loss {terms[0]} at step {at_step}; stopping without saving, "
                                     f"{output_dir / 'checkpoint.pth'} is intact. Lower --lr, raise --warmup_epochs, "
                                     "keep --clip_grad or use --precision bf16/fp32.")
        epoch_terms.append(terms)
        progress.set_postfix(loss=f"{terms[0]:.4f}", cls=f"{terms[1]:.4f}", patch=f"{terms[2]:.4f}", lr=f"{lr_schedule[at_step]:.2e}",
                             img_s=f"{len(epoch_terms) * global_batch / (time.time() - start_time):.0f}")
        return stop_votes > 0

    for epoch in range(start_step // iters_per_epoch, args.epochs):
        sampler.set_epoch(epoch, start_batch=step - epoch * iters_per_epoch)
        progress = tqdm(loader, desc=f"epoch {epoch}", disable=not common.is_main_process(), dynamic_ncols=True,
                        initial=step - epoch * iters_per_epoch, total=iters_per_epoch)
        epoch_terms, start_time, stopping = [], time.time(), False
        for (batch, masks), _ in progress:
            if args.gpu_augment:  # decode + augment here, with a per-step seed (reproducible on resume)
                generator = torch.Generator().manual_seed(common.mix_seed(args.seed, rank, step, 1))
                crops = augmentation.batch(common.decode_images(batch, device), generator)
            else:
                crops = [c.to(device, non_blocking=True) for c in batch]
            masks = masks.transpose(0, 1).flatten(0, 1)  # [n_global * B, h, w], crop-major like the crops
            terms = train_step(crops, masks, step)
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


def benchmark_batch(args, n_global, mask_generator, device):
    """--benchmark: a fixed synthetic batch (crops and masks) on the device, so that no data loading is timed."""
    b, g, l = args.batch_size_per_gpu, args.global_crops_size, args.local_crops_size
    crops = ([torch.randn(b, 3, g, g, device=device) for _ in range(n_global)]
             + [torch.randn(b, 3, l, l, device=device) for _ in range(args.local_crops_number)])
    rng = random.Random(args.seed)
    return crops, torch.stack([mask_generator(rng) for _ in range(n_global * b)])


if __name__ == "__main__":
    main(argparse.ArgumentParser("RoB-iBOT", parents=[get_args_parser()]).parse_args())
