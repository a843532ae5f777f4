"""RoB-iBOT: train a small ViT by distillation from a frozen, pretrained iBOT model. Runs with common.py beside it.

iBOT trains a ViT on two objectives: its CLS token matches the softmax output of a momentum teacher on other views
(DINO's), and its tokens at blockwise-masked positions match the teacher's outputs at the same positions of the
unmasked view. RoB ("Replace one Branch") replaces that teacher by a released iBOT model (backbone + iBOT head), frozen:
no EMA, centering or temperature warm-up; the student predicts softmax(teacher_logits / 0.07) for both terms.

    torchrun --nproc_per_node=8 rob_ibot.py --student vit_tiny --data_path /data/imagenet/train --output_dir out/

The recipe (the defaults): teacher iBOT ViT-B/16 (8192 outputs, shared head); student iBOT head, one shared last layer;
half the global crops masked, blocks over 10-50 % of the grid; CLS term (same-view pairing) + patch term, student
temperature 0.1; 2 x 224 px crops (0.25, 1) + 10 x 96 px (0.05, 0.25), DINO's augmentation; AdamW, lr 5e-4 x batch /
256 after 10 warm-up epochs, cosine to 1e-5, weight decay 0.04 -> 0.48, no clipping, no drop-path for ViT-Tiny.
`--teacher ema` runs plain iBOT, the paper's baseline and a way to pretrain a teacher (any checkpoint.pth of this
script is a valid --teacher).
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

METHOD = "rob_ibot"
TEACHERS = {  # official iBOT full checkpoints (backbone + iBOT head): name -> (release, backbone, patch)
    "ibot_vits16": ("vits_16", "vit_small", 16), "ibot_vitb16": ("vitb_16", "vit_base", 16),
    "ibot_vitl16": ("vitl_16", "vit_large", 16)}
URL = "https://lf3-nlp-opensource.bytetos.com/obj/nlp-opensource/archive/2022/ibot/{0}/checkpoint.pth"


# --------------------------------------------------------------------------------------- the RoB targets and loss
def teacher_probs(teacher_logits, temp, center=None):
    """The RoB seam: the frozen teacher's logits (CLS or patch) become the targets softmax(logits / 0.07)."""
    logits = teacher_logits.float() if center is None else teacher_logits.float() - center
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


def patch_loss(student_logits, teacher_probs, masks, student_temp):
    """Masked-patch term: per global crop, the mean cross-entropy over its masked patches (0 without), averaged over
    the n_global * B crops. Logits and targets: [M, K2] at the masked positions of masks [n_global * B, N], in order."""
    per_patch = -(teacher_probs * F.log_softmax(student_logits.float() / student_temp, dim=-1)).sum(-1)
    per_crop = torch.zeros(masks.shape, device=per_patch.device).masked_scatter(masks, per_patch).sum(1)
    return (per_crop / masks.sum(1).clamp(min=1)).mean()


def ibot_loss(student_out, targets, masks, pairs, student_temp):
    return (multi_crop_cross_entropy(student_out[0], targets[0], pairs, student_temp),
            patch_loss(student_out[1], targets[1], masks, student_temp))


# ---------------------------------------------------------------------------------------------------- networks
class iBOTHead(nn.Module):
    """DINO's head on every token, `last_layer` (K outputs) for CLS tokens, `last_layer2` (K2) for patch tokens (the
    official names); `shared`: one module under both names. `weight_norm=False`: a frozen teacher's."""

    def __init__(self, in_dim, out_dim, patch_out_dim, hidden_dim=2048, bottleneck_dim=256, nlayers=3,
                 use_bn=False, norm_last_layer=False, weight_norm=True, shared=False):
        super().__init__()
        self.mlp = common.projection_mlp(in_dim, hidden_dim, bottleneck_dim, nlayers, use_bn)
        if shared and out_dim != patch_out_dim:
            raise common.UserError(f"a shared last layer needs as many CLS as patch outputs ({out_dim} vs "
                                   f"{patch_out_dim}): use --no-shared_head")
        for name, k in (("last_layer", out_dim), ("last_layer2", patch_out_dim)):
            layer = nn.Linear(bottleneck_dim, k, bias=False)
            if weight_norm:
                layer = nn.utils.parametrizations.weight_norm(layer)
                layer.parametrizations.weight.original0.data.fill_(1.0)  # g = 1: rows of unit norm
                layer.parametrizations.weight.original0.requires_grad = not norm_last_layer
            setattr(self, name, self.last_layer if shared and name == "last_layer2" else layer)

    def forward(self, cls_tokens, patch_tokens):
        """[N_cls, D], [N_patch, D] -> (CLS logits [N_cls, K], patch logits [N_patch, K2]), the last layers in fp32."""
        x = F.normalize(self.mlp(torch.cat([cls_tokens, patch_tokens])).float(), dim=-1)
        return self.last_layer(x[:len(cls_tokens)]), self.last_layer2(x[len(cls_tokens):])


class iBOTNetwork(nn.Module):
    """ViT (a plain timm model) + iBOT head over the crops, globals first; the student's mask token replaces the patch
    embedding at the masked positions of its global crops. Returns CLS logits [n_crops * B, K] (crop-major) and the
    global crops' patch logits at `patch_index`, flat positions into their [n_global * B * N] patches (None: all)."""

    def __init__(self, backbone, head, mask_token=False):
        super().__init__()
        self.backbone, self.head = backbone, head
        self.mask_token = nn.Parameter(torch.zeros(1, 1, backbone.embed_dim)) if mask_token else None

    def tokens(self, x, masks=None):
        """All output tokens [B, prefix + N, D] after the final norm; masks: bool [B, h, w] (True = masked)."""
        vit = self.backbone
        if masks is None:
            return vit.forward_features(x)
        x = vit.patch_embed(x)  # [B, h, w, D] (timm ViTs with dynamic_img_size)
        x = torch.where(masks.view(*x.shape[:-1], 1), self.mask_token.to(x.dtype), x)
        return vit.norm(vit.blocks(vit.norm_pre(vit.patch_drop(vit._pos_embed(x)))))

    def forward(self, crops, masks=None, patch_index=None):
        runs = [torch.cat(list(run)) for _, run in itertools.groupby(crops, key=lambda crop: crop.shape[-1])]
        tokens = self.tokens(runs[0], masks)  # global crops: [n_global * B, prefix + N, D]
        cls = torch.cat([self.backbone.forward_head(tokens)] + [self.backbone(run) for run in runs[1:]])
        patches = tokens[:, self.backbone.num_prefix_tokens:].flatten(0, 1)  # [n_global * B * N, D]
        return self.head(cls, patches if patch_index is None else patches[patch_index])


def build_student(args, teacher=None):
    """A fresh ViT (torch RNG) with a mask token + an iBOT head of the teacher's K and K2 (the baseline: the flags')."""
    drop_path = args.drop_path_rate if args.drop_path_rate is not None else \
        0.0 if args.student in ("vit_tiny", "vit_nano", "vit_pico") or "tiny" in args.student else 0.1
    backbone, dim, arch = common.student_backbone(args.student, args.global_crops_size, args.patch_size, drop_path)
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


def load_teacher(name_or_path, num_heads=None):
    """The frozen RoB teacher from an official name (downloaded once), an iBOT full checkpoint.pth or this script's."""
    source = common.source_of(name_or_path, TEACHERS, lambda name: URL.format(TEACHERS[name][0]),
                              "iBOT full checkpoint.pth, or ema (the plain iBOT baseline)")
    return teacher_from_checkpoint(common.load_file(source, "iBOT teacher checkpoint"), source, num_heads)


def teacher_from_checkpoint(ckpt, source, num_heads=None):
    backbone, sd, _ = common.teacher_parts(ckpt, source, METHOD, URL.format(TEACHERS["ibot_vitb16"][0]), num_heads)
    sd = common.fold_weight_norm(sd, ("last_layer", "last_layer2"))  # plain last layers; a shared one: two copies
    mlp = common.mlp_sizes(common.sub_state_dict(sd, "mlp."))
    head = iBOTHead(mlp["in_dim"], sd["last_layer.weight"].shape[0], sd["last_layer2.weight"].shape[0],
                    mlp["hidden_dim"], mlp["out_dim"], mlp["nlayers"], mlp["use_bn"], weight_norm=False)
    common.load_strict(head, sd, source, "iBOT head")
    return common.freeze(iBOTNetwork(backbone, head))


class BlockMaskGenerator:
    """iBOT's blockwise masks on an h x w grid: none with probability 1 - p, else rectangles of area ~ U((min(h, w) //
    3)^2, budget left) and log-uniform aspect until a fraction ~ U(ratio) is covered or a block fails to fit."""

    def __init__(self, grid, p=0.5, ratio=(0.1, 0.5), aspect=(0.3, 1 / 0.3), attempts=10):
        (self.h, self.w), self.p, self.ratio, self.attempts = grid, p, ratio, attempts
        self.min_area = max(1, (min(grid) // 3) ** 2)
        self.log_aspect = (math.log(aspect[0]), math.log(aspect[1]))

    def __call__(self, rng):
        mask = torch.zeros(self.h, self.w, dtype=torch.bool)
        if rng.random() >= self.p:
            return mask
        target, covered = round(rng.uniform(*self.ratio) * self.h * self.w), 0
        while covered < target and (added := self.add_block(mask, target - covered, rng)):  # 0: no block fitted
            covered += added
        return mask

    def global_crops(self, rng):
        """A sample's two masks, drawn in the loader workers (common.AugmentedDataset's extras)."""
        return torch.stack([self(rng), self(rng)])

    def add_block(self, mask, budget, rng):
        """Mask a random rectangle that adds 1 to `budget` patches; returns that number (0: none fitted)."""
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


# ------------------------------------------------------------------------ the plain-iBOT baseline (--teacher ema)
class PlainIBOT:
    """What plain iBOT adds, none of which RoB needs: an EMA teacher (momentum cosine from 0.996 to 1), centred CLS and
    patch logits, temperatures warmed up from 0.04, last layers frozen for an epoch, gradients clipped per tensor."""

    def __init__(self, student, arch, args, iters_per_epoch, device):
        teacher_arch = {**arch, "kwargs": {**arch["kwargs"], "drop_path_rate": 0.0}}  # no drop-path, no mask token
        self.teacher = iBOTNetwork(common.create_backbone(teacher_arch), copy.deepcopy(student.head))
        self.teacher.load_state_dict({k: v for k, v in student.state_dict().items() if k != "mask_token"})
        self.teacher = common.sync_batchnorm(self.teacher.requires_grad_(False)).to(device)
        self.student_params = [p for name, p in student.named_parameters() if name != "mask_token"]
        self.center = Center(student.head.last_layer.out_features, args.center_momentum).to(device)
        self.patch_center = Center(student.head.last_layer2.out_features, args.center_momentum).to(device)
        self.args, self.iters_per_epoch = args, iters_per_epoch
        self.momentum = cosine_schedule(args.momentum_teacher, 1.0, args.epochs, iters_per_epoch)
        warmup = min(args.warmup_teacher_temp_epochs, args.epochs)
        ends = (args.warmup_teacher_temp, args.teacher_temp), (args.warmup_teacher_patch_temp, args.teacher_patch_temp)
        self.cls_temps, self.patch_temps = ([a + (b - a) * min(e / warmup, 1) if warmup else b
                                             for e in range(args.epochs)] for a, b in ends)

    def targets(self, teacher_cls, teacher_patch, patch_index, step):
        epoch = step // self.iters_per_epoch
        return (teacher_probs(teacher_cls, self.cls_temps[epoch], self.center.center),
                teacher_probs(teacher_patch[patch_index], self.patch_temps[epoch], self.patch_center.center))

    def before_optimizer_step(self, student, step):
        clip_gradients_per_tensor(student.parameters(), 3.0 if self.args.clip_grad is None else self.args.clip_grad)
        if step // self.iters_per_epoch < self.args.freeze_last_layer:
            for p in itertools.chain(student.head.last_layer.parameters(), student.head.last_layer2.parameters()):
                p.grad = None

    @torch.no_grad()
    def after_optimizer_step(self, teacher_cls, teacher_patch, step):
        """teacher <- m * teacher + (1 - m) * student; each centre <- c * centre + (1 - c) * mean logits."""
        torch._foreach_lerp_(list(self.teacher.parameters()), self.student_params, 1 - self.momentum[step])
        self.center.update(teacher_cls)
        self.patch_center.update(teacher_patch)


class Center(nn.Module):
    """A running mean of the teacher's logits over the global batch, subtracted before the softmax."""

    def __init__(self, dim, momentum):
        super().__init__()
        self.momentum = momentum
        self.register_buffer("center", torch.zeros(1, dim))

    @torch.no_grad()
    def update(self, logits):
        batch_center = common.all_reduce_mean(logits.float().mean(0, keepdim=True))
        self.center.mul_(self.momentum).add_(batch_center, alpha=1 - self.momentum)


@torch.no_grad()
def clip_gradients_per_tensor(params, max_norm):
    """Scale each gradient tensor down to a norm of at most max_norm (DINO's per-tensor clipping; 0: off)."""
    grads = [p.grad for p in params if p.grad is not None]
    if max_norm:
        torch._foreach_mul_(grads, [(max_norm / (n + 1e-6)).clamp(max=1.0) for n in torch._foreach_norm(grads)])


# --------------------------------------------------------------------------------------------- the training step
def build_run(args, device, data, student, arch, teacher=None):
    """Everything a step reads, built here once: new_run()'s fields and RoB-iBOT's own (`plain`: None for RoB)."""
    run = new_run(args, device, student, arch, len(data.loader))
    plain = PlainIBOT(run.student, arch, args, run.iters_per_epoch, device) if teacher is None else None
    run.data, run.plain, run.teacher = data, plain, plain.teacher if teacher is None else common.place_teacher(
        teacher, device, run.teacher_dtype, [teacher.backbone, teacher.head.mlp])
    for network in (run.student, run.teacher) if args.compile else ():
        common.compile_network(network)
    run.loss_fn = torch.compile(ibot_loss) if args.compile else ibot_loss
    run.pairs = view_pairs(2, 2 + args.local_crops_number, swapped=args.swapped or plain is not None)
    run.saved = {} if plain is None else dict(teacher=plain.teacher, center=plain.center,
                                              patch_center=plain.patch_center)
    return run


def train_step(run, batch, indices, step):
    """One optimisation step on a loader batch ((crops or raw images, masks [B, 2, h, w]), indices): the loss terms."""
    crops = common.crops_on_device(run.data, batch[0], indices, run.device, step)
    masks = batch[1].transpose(0, 1).flatten(0, 1)  # [2 * B, h, w], crop-major like the crops
    patch_index = common.to_device(masks.flatten().nonzero()[:, 0], run.device)  # found on the host: no GPU wait
    masks = common.to_device(masks, run.device)
    with torch.no_grad(), torch.autocast(run.device.type, torch.bfloat16, enabled=run.plain is not None and run.amp):
        teacher_cls, teacher_patch = run.teacher([c.to(run.teacher_dtype) for c in crops[:2]],  # every patch for
                                                 patch_index=None if run.plain is not None else patch_index)  # a centre
    with torch.autocast(run.device.type, torch.bfloat16, enabled=run.amp):
        student_out = run.ddp(crops, masks=masks, patch_index=patch_index)
    targets = run.plain.targets(teacher_cls, teacher_patch, patch_index, step) if run.plain is not None else \
        (teacher_probs(teacher_cls, run.args.teacher_temp), teacher_probs(teacher_patch, run.args.teacher_patch_temp))
    cls_term, patch_term = run.loss_fn(student_out, targets, masks.flatten(1), run.pairs, run.args.student_temp)
    loss = run.args.lambda1 * cls_term + run.args.lambda2 * patch_term
    run.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if run.plain is not None:
        run.plain.before_optimizer_step(run.student, step)
    elif run.args.clip_grad:
        nn.utils.clip_grad_norm_(run.student.parameters(), run.args.clip_grad)
    run.optimizer.step()
    if run.plain is not None:
        run.plain.after_optimizer_step(teacher_cls, teacher_patch, step)
    return {"train_loss": loss, "train_cls": cls_term, "train_patch": patch_term}


# ---------------------------------------------------------------------------------------------- flags and main()
def get_args_parser():
    parser = argparse.ArgumentParser("RoB-iBOT", add_help=False)
    group = parser.add_argument_group("model")
    group.add_argument("--student", default="vit_tiny", help="A ViT: vit_tiny, vit_small, vit_base or a timm ViT.")
    group.add_argument("--teacher", default="ibot_vitb16", help=f"{', '.join(TEACHERS)}; an iBOT full checkpoint.pth; "
                       "a checkpoint.pth of this script; or 'ema' for the plain-iBOT baseline.")
    group.add_argument("--patch_size", type=int, default=None, help="ViT student patch size (RoB: the teacher's).")
    group.add_argument("--drop_path_rate", type=float, default=None, help="Default 0 for ViT-Tiny, else 0.1.")
    group.add_argument("--shared_head", action=argparse.BooleanOptionalAction, default=True, help="One last layer.")
    group.add_argument("--hidden_dim", type=int, default=2048, help="Student head hidden width.")
    group.add_argument("--bottleneck_dim", type=int, default=256, help="Student head bottleneck width.")
    group = parser.add_argument_group("temperatures, pairing and masking")
    group.add_argument("--teacher_temp", type=float, default=0.07, help="Teacher softmax temperature, CLS.")
    group.add_argument("--teacher_patch_temp", type=float, default=0.07, help="Teacher softmax temperature, patches.")
    group.add_argument("--student_temp", type=float, default=0.1, help="Student softmax temperature (both terms).")
    group.add_argument("--swapped", action="store_true", help="Cross-view pairing of the CLS term (RoB).")
    group.add_argument("--lambda1", type=float, default=1.0, help="Weight of the CLS term.")
    group.add_argument("--lambda2", type=float, default=1.0, help="Weight of the masked-patch term.")
    group.add_argument("--mask_prob", type=float, default=0.5, help="Probability that a global crop is masked.")
    group.add_argument("--mask_ratio", type=float, nargs=2, default=(0.1, 0.5), help="Masked fraction of the grid.")
    group = parser.add_argument_group("plain-iBOT baseline (--teacher ema only)")
    group.add_argument("--out_dim", type=int, default=8192, help="CLS outputs (RoB: the teacher's).")
    group.add_argument("--patch_out_dim", type=int, default=8192, help="Patch outputs (RoB: the teacher's).")
    group.add_argument("--momentum_teacher", type=float, default=0.996, help="EMA momentum, cosine to 1.")
    group.add_argument("--warmup_teacher_temp", type=float, default=0.04, help="CLS teacher temperature at the start.")
    group.add_argument("--warmup_teacher_patch_temp", type=float, default=0.04, help="The same for the patches.")
    group.add_argument("--warmup_teacher_temp_epochs", type=int, default=30, help="Length of those warm-ups.")
    group.add_argument("--center_momentum", type=float, default=0.9, help="EMA momentum of the two teacher centres.")
    group.add_argument("--freeze_last_layer", type=int, default=1, help="Epochs with the last head layers frozen.")
    add_run_args(parser)  # optimisation, multi-crop, data and runtime; RoB-iBOT's defaults (clip_grad: as rob_dino.py)
    parser.set_defaults(epochs=100, lr=5e-4, weight_decay_end=0.48, clip_grad=None, local_crops_number=10,
                        global_crops_scale=(0.25, 1.0), local_crops_scale=(0.05, 0.25))
    return parser


def check_args(args):
    check_flags(args, positive=["teacher_temp", "teacher_patch_temp", "student_temp", "warmup_teacher_temp", "out_dim",
                                "warmup_teacher_patch_temp", "patch_out_dim", "hidden_dim", "bottleneck_dim"],
                non_negative=["warmup_teacher_temp_epochs", "freeze_last_layer", "lambda1", "lambda2"],
                fractions=["drop_path_rate", "momentum_teacher", "center_momentum", "mask_prob"])
    if not 0 <= args.mask_ratio[0] <= args.mask_ratio[1] < 1:
        raise common.UserError(f"--mask_ratio {args.mask_ratio[0]} {args.mask_ratio[1]}: give 0 <= low <= high < 1")


def build_augmentation(args):
    """DINO's multi-crop augmentation, as the reference RoB configs set it (see rob_dino.py)."""
    return common.MultiCropAugmentation(
        args.global_crops_size, args.local_crops_size, 2, args.local_crops_number, args.global_crops_scale,
        args.local_crops_scale, color_jitter=(0.4, 0.4, 0.4, 0.1), blur_p=(1.0, 0.1, 0.5), solarize_p=(0.0, 0.2, 0.0))


def main(args):
    check_args(args)
    device = common.init_distributed()
    with (locked_output_dir(args.output_dir) as output_dir,  # locked before any expensive work
          torch.random.fork_rng(devices=[device] if device.type == "cuda" else [])):  # the caller's RNG is kept
        teacher = None if args.teacher == "ema" else load_teacher(args.teacher)
        torch.manual_seed(common.mix_seed(args.seed, 0))  # the same initial student in every process, RoB or plain
        student, arch = build_student(args, teacher)
        masks = BlockMaskGenerator((args.global_crops_size // student.backbone.patch_embed.patch_size[0],) * 2,
                                   args.mask_prob, args.mask_ratio)
        data = common.training_data(args.data_path, build_augmentation(args), args.batch_size_per_gpu,
                                    args.num_workers, args.seed, args.subset, args.gpu_augment, masks.global_crops)
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
