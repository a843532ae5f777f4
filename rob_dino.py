"""RoB-DINO: train a small network by distillation from a frozen, pretrained DINO model.

DINO trains a student to match the softmax output of a momentum teacher on other views of the same image.
RoB ("Replace one Branch") keeps the student branch as it is and replaces the teacher branch by a released
DINO model (backbone + DINO head), frozen: no EMA, no centering, no temperature warm-up. The student, a fresh
ViT-Tiny / ResNet-18 / ..., learns to predict softmax(teacher_logits / 0.07) from the same global crops and
from the local crops of each image.

    torchrun --nproc_per_node=8 rob_dino.py --student vit_tiny --data_path /data/imagenet/train --output_dir out/

The recipe (the defaults): teacher DINO ViT-B/16 with its 65536-way head; student head = DINO head of the same K;
same-view pairing (teacher view i -> student view i and every local crop); CE at student temperature 0.1; 2 x 224
px crops of scale (0.25, 1) + 8 x 96 px of scale (0.05, 0.25), colour jitter (0.4, 0.4, 0.4, 0.1), blur and
solarisation as DINO; AdamW, lr 5e-4 x batch / 256 after 10 warm-up epochs, cosine to 1e-5, weight decay 0.04 ->
0.4, no gradient clipping, drop-path 0.1 for ViT students.

`--teacher ema` runs plain DINO instead (EMA teacher, centering, temperature warm-up, cross-view pairing): the
baseline of the paper, and a way to pretrain a teacher on your own data. Its checkpoint is a valid --teacher.
"""
import argparse
import copy
import itertools
import time

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

import common
import training

TEACHERS = {  # official DINO full checkpoints (backbone + DINO head): name -> (release, backbone, patch)
    "dino_vits16": ("dino_deitsmall16_pretrain", "vit_small", 16),
    "dino_vits8": ("dino_deitsmall8_pretrain", "vit_small", 8),
    "dino_vitb16": ("dino_vitbase16_pretrain", "vit_base", 16),
    "dino_vitb8": ("dino_vitbase8_pretrain", "vit_base", 8),
    "dino_resnet50": ("dino_resnet50_pretrain", "resnet50", None),
}
URL = "https://dl.fbaipublicfiles.com/dino/{0}/{0}_full_checkpoint.pth"


# -------------------------------------------------------------------------------------------- arguments
def get_args_parser():
    parser = argparse.ArgumentParser("RoB-DINO", add_help=False)
    group = parser.add_argument_group("model")
    group.add_argument("--student", default="vit_tiny", help="vit_tiny, vit_small, vit_base, resnet18, resnet34, "
                       "resnet50, mobilenet_v3, vit_nano, vit_pico (small images) or any timm name.")
    group.add_argument("--teacher", default="dino_vitb16", help=f"{', '.join(TEACHERS)}; a local DINO full "
                       "checkpoint (backbone + head); a checkpoint.pth of this script (a RoB-DINO student or a "
                       "--teacher ema run teaches the next student); or 'ema' for the plain-DINO baseline.")
    group.add_argument("--student_head", default="dino", choices=["dino", "mlp"], help="dino: DINO head "
                       "(MLP, L2-norm, weight-normalised last layer to the teacher's K); mlp: [d, hidden_dim, K].")
    group.add_argument("--hidden_dim", type=int, default=2048, help="Student head hidden width.")
    group.add_argument("--bottleneck_dim", type=int, default=256, help="Student DINO head bottleneck width.")
    group.add_argument("--patch_size", type=int, default=None, help="ViT student patch size (default: the "
                       "model's own, 16); small images want small patches (7 at 28 px).")
    group.add_argument("--drop_path_rate", type=float, default=None, help="Student stochastic depth (default "
                       "0.1 for ViTs, as the reference's ViT-S, 0 for convnets).")
    group = parser.add_argument_group("temperatures and pairing")
    group.add_argument("--teacher_temp", type=float, default=0.07, help="Teacher softmax temperature.")
    group.add_argument("--student_temp", type=float, default=0.1, help="Student softmax temperature.")
    group.add_argument("--swapped", action="store_true", help="DINO's cross-view pairing (teacher view i -> "
                       "every student crop but i). Default: same-view pairing (teacher view i -> student view i "
                       "and every local crop). Always on with --teacher ema.")
    group = parser.add_argument_group("plain-DINO baseline (--teacher ema only)")
    group.add_argument("--out_dim", type=int, default=65536, help="Prototypes K of the DINO head (RoB: the "
                       "teacher's K).")
    group.add_argument("--momentum_teacher", type=float, default=0.996, help="EMA momentum, cosine to 1.")
    group.add_argument("--warmup_teacher_temp", type=float, default=0.04, help="Teacher temperature at the "
                       "start, raised linearly to --teacher_temp.")
    group.add_argument("--warmup_teacher_temp_epochs", type=int, default=30, help="Length of that warm-up.")
    group.add_argument("--center_momentum", type=float, default=0.9, help="EMA momentum of the teacher centre.")
    group.add_argument("--freeze_last_layer", type=int, default=1, help="Epochs with the last head layer frozen.")
    training.add_optimisation_args(parser, epochs=300, lr=5e-4, clip_grad=None, helps=dict(
        lr="Peak lr at a global batch of 256, scaled linearly (1024 -> 2e-3, the paper's setting).",
        clip_grad="Gradient clipping (0: off). Default: off for RoB, as the reference; 3.0 per parameter tensor "
                  "with --teacher ema, as DINO."))
    training.add_multicrop_args(parser, (0.25, 1.0), 8, (0.05, 0.25))
    training.add_run_args(parser)
    return parser


def check_args(args):
    training.check_args(args, positive=["epochs", "batch_size_per_gpu", "teacher_temp", "student_temp",
                                      "warmup_teacher_temp", "out_dim", "hidden_dim", "bottleneck_dim",
                                      "global_crops_size", "local_crops_size"],
                      non_negative=["lr", "min_lr", "warmup_epochs", "weight_decay", "weight_decay_end", "clip_grad",
                                    "local_crops_number", "warmup_teacher_temp_epochs", "freeze_last_layer"],
                      fractions=["drop_path_rate", "momentum_teacher", "center_momentum"],
                      scales=["global_crops_scale", "local_crops_scale"])


def build_augmentation(args):
    """DINO's multi-crop augmentation, as the reference RoB configs set it: 2 global crops (teacher and
    student), the local crops (student only), colour jitter (0.4, 0.4, 0.4, 0.1), blur p 1 / 0.1 / 0.5 and
    solarisation p 0 / 0.2 / 0 for global crop 1 / global crop 2 / locals, bicubic."""
    return common.MultiCropAugmentation(args.global_crops_size, args.local_crops_size, 2, args.local_crops_number,
                                        args.global_crops_scale, args.local_crops_scale,
                                        color_jitter=(0.4, 0.4, 0.4, 0.1), blur_p=(1.0, 0.1, 0.5),
                                        solarize_p=(0.0, 0.2, 0.0))


# -------------------------------------------------------------------------------------- the frozen teacher
def load_teacher(name_or_path, num_heads=None):
    """The frozen RoB teacher (backbone + DINO head, eval, no grad) from an official name (downloaded once
    into the torch.hub cache) or a local file."""
    source = common.source_of(name_or_path, TEACHERS, lambda name: URL.format(TEACHERS[name][0]),
                              "DINO full checkpoint")
    return teacher_from_checkpoint(common.load_file(source, "DINO teacher checkpoint"), source, num_heads)


def teacher_from_checkpoint(ckpt, source, num_heads=None):
    """Recognise the checkpoint's format, build the matching backbone and head from its tensors and load
    them strictly. Accepts DINO full checkpoints and this script's own; refuses the rest with the fix."""
    official = isinstance(ckpt, dict) and ckpt.get("method") is None and isinstance(ckpt.get("teacher"), dict) \
        and not any("last_layer2" in k for k in ckpt["teacher"])  # (iBOT's full checkpoints have a patch head)
    if isinstance(ckpt, dict) and ckpt.get("method") == "rob_dino":  # its EMA teacher (baseline runs) or its student
        sd = ckpt.get("teacher") or ckpt["student"]
        backbone = common.recorded_backbone(ckpt, sd, source)
    elif official:  # a DINO full checkpoint: its teacher network
        sd = common.strip_prefix(ckpt["teacher"], "module.")
        arch_name = getattr(ckpt.get("args"), "arch", None)
        backbone, _ = common.backbone_from_state_dict(common.sub_state_dict(sd, "backbone."), num_heads, arch_name)
        common.load_strict(backbone, common.sub_state_dict(sd, "backbone."), source, "DINO full checkpoint backbone")
    else:
        common.refuse_teacher(ckpt, source, "rob_dino", "its DINO head", URL.format(TEACHERS["dino_vitb16"][0]))
    head, head_sd = head_from_state_dict(common.sub_state_dict(sd, "head."))
    common.load_strict(head, head_sd, source, "DINO head")
    return common.freeze(MultiCropNetwork(backbone, head))


def head_from_state_dict(sd):
    """A DINOHead (or MLPHead) whose sizes are read from its tensors, weight norm folded (a frozen teacher)."""
    sd = common.fold_weight_norm(sd)
    if "last_layer.weight" not in sd:  # an MLPHead: 0.weight, [1.*], 3.weight
        head = MLPHead(sd["0.weight"].shape[1], sd["3.weight"].shape[0], sd["0.weight"].shape[0], "1.weight" in sd)
        return head, sd
    linears = sorted(int(k.split(".")[1]) for k in sd if k.startswith("mlp.") and sd[k].ndim == 2)
    first, last = sd[f"mlp.{linears[0]}.weight"], sd[f"mlp.{linears[-1]}.weight"]
    head = DINOHead(first.shape[1], sd["last_layer.weight"].shape[0], hidden_dim=first.shape[0],
                    bottleneck_dim=last.shape[0], nlayers=len(linears),
                    use_bn=any(k.endswith("running_mean") for k in sd), weight_norm=False)
    return head, sd


def random_teacher(name):
    """An official teacher architecture with random weights (benchmarks: nothing to download)."""
    _, backbone_name, patch = TEACHERS[name]
    backbone, _ = common.build_teacher_backbone(backbone_name, patch_size=patch)
    return common.freeze(MultiCropNetwork(backbone, DINOHead(common.feature_dim(backbone), 65536, weight_norm=False)))


# ------------------------------------------------------------------------------------------- the student
class DINOHead(nn.Module):
    """MLP -> L2-normalise -> weight-normalised linear layer to K outputs (the official module names, so that
    DINO checkpoints load). `weight_norm=False` gives a plain last layer, for a frozen teacher."""

    def __init__(self, in_dim, out_dim, hidden_dim=2048, bottleneck_dim=256, nlayers=3, use_bn=False,
                 norm_last_layer=False, weight_norm=True):
        super().__init__()
        self.mlp = common.projection_mlp(in_dim, hidden_dim, bottleneck_dim, nlayers, use_bn)
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


def out_features(head):
    return head.last_layer.out_features if isinstance(head, DINOHead) else head[-1].out_features


def build_student(args, teacher=None):
    """A fresh backbone + a head with the teacher's K outputs (--out_dim for the baseline), widths from the
    flags. Returns (network, arch)."""
    common.seed_everything(common.mix_seed(args.seed, 0))  # the same init in every process, RoB or plain
    drop_path = args.drop_path_rate if args.drop_path_rate is not None else \
        0.1 if common.is_vit_name(args.student) else 0.0  # ViTs 0.1 (the reference's ViT-S), convnets 0
    backbone, dim, arch = common.build_student(args.student, args.global_crops_size, args.patch_size, drop_path)
    out_dim = args.out_dim if teacher is None else out_features(teacher.head)
    if args.student_head == "dino":
        head = DINOHead(dim, out_dim, args.hidden_dim, args.bottleneck_dim, norm_last_layer=teacher is None)
    else:
        head = MLPHead(dim, out_dim, args.hidden_dim, use_bn=not common.is_vit(backbone))
    return MultiCropNetwork(backbone, head), arch


# ---------------------------------------------------------------------------------- the RoB target and loss
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


# -------------------------------------------------------------------- the plain-DINO baseline (--teacher ema)
class PlainDINO(nn.Module):
    """What plain DINO adds to the student branch, none of which RoB needs: the teacher is an EMA of the
    student (momentum cosine from 0.996 to 1), its logits are centred (running mean over the global batch) and
    sharpened at a temperature warmed up from 0.04, the last layer is frozen for the first epoch and each
    gradient tensor is clipped. A module, so that its state (teacher, centre) is checkpointed as one."""

    def __init__(self, student, arch, args, iters_per_epoch):
        super().__init__()
        teacher_arch = {**arch, "kwargs": {**arch["kwargs"], "drop_path_rate": 0.0}}  # no drop-path
        self.teacher = MultiCropNetwork(common.create_backbone(teacher_arch), copy.deepcopy(student.head))
        self.teacher.load_state_dict(student.state_dict())  # after DDP's broadcast: rank 0's weights everywhere
        self.teacher = training.sync_batchnorm(self.teacher.requires_grad_(False))
        self.register_buffer("center", torch.zeros(1, out_features(student.head)))
        self.args, self.iters_per_epoch = args, iters_per_epoch
        self.momentum = training.cosine_schedule(args.momentum_teacher, 1.0, args.epochs, iters_per_epoch)
        warmup = min(args.warmup_teacher_temp_epochs, args.epochs)
        self.temps = [args.warmup_teacher_temp + (args.teacher_temp - args.warmup_teacher_temp) * min(e / warmup, 1)
                      if warmup else args.teacher_temp for e in range(args.epochs)]

    def targets(self, teacher_logits, it):
        return teacher_probs(teacher_logits, self.temps[it // self.iters_per_epoch], self.center)

    def before_optimizer_step(self, student, it):
        if self.args.clip_grad != 0:
            clip_gradients_per_tensor(student.parameters(), 3.0 if self.args.clip_grad is None else self.args.clip_grad)
        if it // self.iters_per_epoch < self.args.freeze_last_layer:
            for p in student.head.last_layer.parameters():
                p.grad = None

    @torch.no_grad()
    def after_optimizer_step(self, student, teacher_logits, it):
        """teacher <- m * teacher + (1 - m) * student; centre <- c * centre + (1 - c) * mean teacher logits."""
        torch._foreach_lerp_(list(self.teacher.parameters()), list(student.parameters()), 1 - self.momentum[it])
        batch_center = common.all_reduce_mean(teacher_logits.float().mean(0, keepdim=True))
        self.center.mul_(self.args.center_momentum).add_(batch_center, alpha=1 - self.args.center_momentum)

    def checkpoint_state(self):  # the layout of the teacher loader and of eval_linear --checkpoint_key teacher
        return dict(teacher=self.teacher.state_dict(), center={"center": self.center})

    def load_checkpoint_state(self, ckpt):
        self.teacher.load_state_dict(ckpt["teacher"])
        self.center.copy_(ckpt["center"]["center"])


@torch.no_grad()
def clip_gradients_per_tensor(params, max_norm):
    """Scale each parameter's gradient down to a norm of at most max_norm, tensor by tensor (DINO's clipping)."""
    grads = [p.grad for p in params if p.grad is not None]
    norms = torch._foreach_norm(grads)
    torch._foreach_mul_(grads, [(max_norm / (n + 1e-6)).clamp(max=1.0) for n in norms])


# ------------------------------------------------------------------------------------------------ training
def build(args, device, iters_per_epoch, student, arch, teacher=None):
    """Everything a training step needs, as one namespace: the student (and its DDP wrapper), the frozen
    teacher (RoB) or the plain-DINO pieces (no teacher: --teacher ema), the pairing, the optimiser and the
    schedules."""
    plain = teacher is None
    run = training.setup_run(args, device, iters_per_epoch, student.to(device), arch, "rob_dino")
    run.plain = PlainDINO(student, arch, args, iters_per_epoch).to(device) if plain else None
    run.teacher = run.plain.teacher if plain else \
        training.place_teacher(teacher, device, run, [teacher.backbone, getattr(teacher.head, "mlp", teacher.head)])
    training.check_patch(run.teacher.backbone, args.global_crops_size)
    if args.compile:  # in place, so that checkpoints keep their keys; ViTs per block (fast to compile)
        for network in (student, run.teacher):
            training.compile_model(network.backbone)
            network.head.compile()
    run.loss_fn = torch.compile(dino_loss) if args.compile else dino_loss
    run.partners = view_pairs(2, 2 + args.local_crops_number, swapped=args.swapped or plain).to(device)
    run.clip_grad = 0.0 if plain else args.clip_grad or 0.0  # the baseline clips per tensor (PlainDINO)
    common.log(f"student {args.student}: {sum(p.numel() for p in student.parameters()) / 1e6:.1f}M parameters, "
               f"head -> {out_features(student.head)}; teacher: {args.teacher}")
    return run


def teacher_forward(run, crops):
    """Teacher logits [2 * B, K] of the global crops (frozen teacher in its storage dtype; EMA teacher autocast)."""
    with torch.no_grad(), torch.autocast(run.device.type, run.amp_dtype, enabled=run.plain is not None and run.amp):
        return run.teacher([c.to(run.teacher_dtype) for c in crops[:2]])


def train_step(run, crops, it):
    """One optimisation step on a batch (list of crops, globals first); returns the loss, a 1-element tensor."""
    training.start_step(run, it)  # lr, weight decay, and a seed per step for drop-path (exact resume)
    teacher_logits = run.side_stream.start(teacher_forward, run, crops)  # concurrent with the student on a GPU
    with torch.autocast(run.device.type, run.amp_dtype, enabled=run.amp):
        student_logits = run.student_ddp(crops)
    teacher_logits = run.side_stream.join(teacher_logits)
    if run.plain is None:
        targets = teacher_probs(teacher_logits, run.args.teacher_temp)
    else:
        targets = run.plain.targets(teacher_logits, it)
    loss = run.loss_fn(student_logits, targets, run.partners, run.args.student_temp)
    run.optimizer.zero_grad(set_to_none=True)
    run.scaler.scale(loss).backward()
    run.scaler.unscale_(run.optimizer)
    if run.clip_grad:
        nn.utils.clip_grad_norm_(run.student.parameters(), run.clip_grad, foreach=True)
    if run.plain is not None:
        run.plain.before_optimizer_step(run.student, it)
    run.scaler.step(run.optimizer)
    run.scaler.update()
    if run.plain is not None:
        run.plain.after_optimizer_step(run.student, teacher_logits, it)
    return loss.detach()[None]


def train_one_epoch(run, data, epoch, step, stop):
    """The steps of `epoch` from `step` (mid-epoch after a resume) to its end or to a stop request (Ctrl-C,
    SIGTERM), then a checkpoint. Loss values are read one step late (the host never waits for the GPU).
    Returns (step, whether to stop)."""
    first = step - epoch * run.iters_per_epoch
    data.sampler.set_epoch(epoch, start_batch=first)
    stats, start, stopping = training.StepStats(["train_loss"]), time.time(), False
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
        ckpt = training.resume(run, data, output_dir, "rob_dino")
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
    training.run_main(main, argparse.ArgumentParser("RoB-DINO", parents=[get_args_parser()]))
