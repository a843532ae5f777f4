"""RoB-SwAV: train a small network by distillation from a frozen, pretrained SwAV model. Runs with common.py beside it.

SwAV learns prototypes and, for each image, a code (its soft assignment to them by Sinkhorn-Knopp, spreading the batch
evenly); every crop predicts the code of another. RoB ("Replace one Branch") takes the codes from a released SwAV
ResNet-50, frozen: Sinkhorn on its scores of global crop 0 over the global batch, predicted by every student crop.

    torchrun --nproc_per_node=8 rob_swav.py --student resnet18 --data_path /data/imagenet/train --output_dir out/

The recipe (the defaults): teacher SwAV RN50 (800 epochs, 3000 prototypes); student head [d, 2048, 128] (BN, ReLU) +
L2-norm + own prototypes, never frozen; Sinkhorn epsilon 0.03, 3 iterations; CE at 0.1; 2 x 224 px crops (0.14, 1) +
4 x 96 px (0.05, 0.14); SGD + LARS, lr 0.3 x batch / 256 from a 16th over 10 epochs, cosine to a 1000th, weight decay
1e-6. `--teacher self` runs plain SwAV (own codes of both global crops, swapped, epsilon 0.05, prototypes frozen an
epoch), the paper's baseline and a way to pretrain a teacher (any checkpoint.pth of this script is a valid --teacher).
"""
import argparse, contextlib, datetime, fcntl, json, math, multiprocessing, os, signal, sys, time
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

import common

METHOD = "rob_swav"
TEACHERS = {  # official SwAV ResNet-50 releases (backbone + projection head + 3000 prototypes): name -> file
    "swav_rn50": "swav_800ep_pretrain", "swav_rn50_400ep": "swav_400ep_pretrain",
    "swav_rn50_200ep": "swav_200ep_pretrain", "swav_rn50_100ep": "swav_100ep_pretrain",
    "swav_rn50_400ep_bs256": "swav_400ep_bs256_pretrain", "swav_rn50_200ep_bs256": "swav_200ep_bs256_pretrain",
    "swav_rn50_400ep_2x224": "swav_400ep_2x224_pretrain"}
URL = "https://dl.fbaipublicfiles.com/deepcluster/{}.pth.tar"
OPTIMIZER_DEFAULTS = {"lars": dict(lr=0.3, weight_decay=1e-6, weight_decay_end=1e-6),  # SwAV's, for convnets
                      "adamw": dict(lr=5e-4, weight_decay=0.04, weight_decay_end=0.4)}  # rob_dino.py's, for ViTs


# ----------------------------------------------------------------------------------------- the RoB codes and loss
@torch.no_grad()
def sinkhorn_knopp(scores, epsilon, n_iters):
    """Codes [B, K] (each summing to 1) of prototype scores [B, K]: from exp(scores / epsilon) in fp32 (less the
    global maximum), each prototype (row of Q = [K, B]) to a mass of 1/K and each sample to 1/B in turn, globally."""
    scores = scores.float()
    q = torch.exp((scores - common.all_reduce(scores.max(), dist.ReduceOp.MAX)) / epsilon).t()  # [K, B_local]
    n_prototypes, n_samples = q.shape[0], common.all_reduce(torch.tensor(float(q.shape[1]), device=q.device))
    q /= common.all_reduce(q.sum())
    for _ in range(n_iters):
        q /= common.all_reduce(q.sum(dim=1, keepdim=True)) * n_prototypes  # each prototype: mass 1/K
        q /= q.sum(dim=0, keepdim=True) * n_samples  # each sample: mass 1/B
    return (q / q.sum(dim=0, keepdim=True)).t()


def teacher_codes(scores, epsilon, n_iters, past_scores=None):
    """The RoB seam: the teacher's scores of one view [B, K] become target codes (Sinkhorn, with the queue's if any)."""
    joined = scores if past_scores is None else torch.cat([scores, past_scores])
    return sinkhorn_knopp(joined, epsilon, n_iters)[:len(scores)]


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


class EmbeddingQueue(nn.Module):
    """Optional queue of past embeddings of the code crops (SwAV's fix for small batches), whose scores against the
    prototypes join Sinkhorn's batch; the same on every process (new entries all-gathered), newest first."""

    def __init__(self, n_views, length, dim):
        super().__init__()
        self.register_buffer("embeddings", torch.zeros(n_views, length, dim))

    def share(self, view):
        return self.embeddings[view, common.get_rank()::common.get_world_size()]

    @torch.no_grad()
    def push(self, embeddings):  # [n_views * B_local, dim], crop-major
        for view, local in enumerate(embeddings.float().chunk(len(self.embeddings))):
            if dist.is_initialized():
                gathered = [torch.empty_like(local) for _ in range(dist.get_world_size())]
                dist.all_gather(gathered, local.contiguous())
                local = torch.cat(gathered)
            self.embeddings[view] = torch.cat([local, self.embeddings[view]])[:self.embeddings.shape[1]]


# ---------------------------------------------------------------------------------------------------- networks
class SwAVHead(nn.Module):
    """SwAV's head (the official names): projection MLP [in, hidden, out] (BN, ReLU) -> L2-normalise (unless
    `normalize=False`) -> prototypes. Returns (embedding, prototype scores), in fp32 after the projection."""

    def __init__(self, in_dim, hidden_dim=2048, out_dim=128, n_prototypes=3000, use_bn=True, normalize=True):
        super().__init__()
        self.projection_head = nn.Sequential(nn.Linear(in_dim, hidden_dim), nn.BatchNorm1d(hidden_dim) if use_bn
                                             else nn.Identity(), nn.ReLU(inplace=True), nn.Linear(hidden_dim, out_dim))
        self.prototypes, self.normalize = nn.Linear(out_dim, n_prototypes, bias=False), normalize
        normalize_prototypes(self)

    def forward(self, x):
        embedding = self.projection_head(x).float()
        embedding = F.normalize(embedding, dim=-1) if self.normalize else embedding
        with torch.autocast(embedding.device.type, enabled=False):  # fp32 scores: they are divided by 0.1 / 0.03
            return embedding, self.prototypes(embedding)


@torch.no_grad()
def normalize_prototypes(head):
    """Trainable prototypes are kept on the unit sphere: renormalised at creation and after every step."""
    if head.prototypes.weight.requires_grad:
        head.prototypes.weight.copy_(F.normalize(head.prototypes.weight, dim=1))


def build_student(args, teacher=None):
    """A fresh backbone (torch RNG) + a SwAV head shaped as the teacher's prototypes (the flags' for plain SwAV)."""
    backbone, dim, arch = common.student_backbone(args.student, args.global_crops_size, args.patch_size,
                                                  args.drop_path_rate)
    n_prototypes, feat_dim = (args.nmb_prototypes, args.feat_dim) if teacher is None else \
        teacher.head.prototypes.weight.shape
    head = SwAVHead(dim, args.hidden_mlp, feat_dim, n_prototypes, use_bn=not common.is_vit(backbone),
                    normalize=not args.use_teacher_prototypes)
    if args.use_teacher_prototypes:  # a frozen copy: saved with the student, never optimised nor renormalised
        head.prototypes.weight.data.copy_(teacher.head.prototypes.weight)
        head.prototypes.requires_grad_(False)
    return common.MultiCropNetwork(backbone, head), arch


def load_teacher(name_or_path):
    """The frozen RoB teacher from an official name (downloaded once), a SwAV release or this script's checkpoint."""
    source = common.source_of(name_or_path, TEACHERS, lambda name: URL.format(TEACHERS[name]),
                              "SwAV release, or self (the plain SwAV baseline)")
    return teacher_from_checkpoint(common.load_file(source, "SwAV teacher checkpoint"), source)


def teacher_from_checkpoint(ckpt, source):
    backbone, sd, _ = common.teacher_parts(ckpt, source, METHOD, URL.format(TEACHERS["swav_rn50"]))
    first, last = sd["projection_head.0.weight"], sd["projection_head.3.weight"]  # the file's sizes; scored as SwAV
    head = SwAVHead(first.shape[1], first.shape[0], last.shape[0], sd["prototypes.weight"].shape[0],  # (cosines:
                    use_bn="projection_head.1.running_mean" in sd)  # bounded scores for Sinkhorn)
    common.load_strict(head, sd, source, "SwAV projection head and prototypes")
    return common.freeze(common.MultiCropNetwork(backbone, head))


# ------------------------------------------------------------------ the plain-SwAV baseline (--teacher self), LARS
def collapse_warning(loss, n_prototypes, epsilon):
    """Plain SwAV's failure at small scale: codes and predictions go uniform, the loss sits at ln K with no gradient
    left. SwAV's first remedy is sharper codes (a lower epsilon). The message for an epoch's last loss, or None."""
    return None if abs(loss - math.log(n_prototypes)) > 0.015 else (
        f"the loss {loss:.4f} at the end of the epoch sits at ln {n_prototypes} = {math.log(n_prototypes):.4f}: plain "
        f"SwAV has collapsed (uniform codes, no gradient). Restart with a lower --epsilon (now {epsilon:g}, e.g. "
        f"{max(epsilon * 0.6, 0.025):.2g}; below ~0.025 fp32 can underflow).")


class LARS(torch.optim.Optimizer):
    """SGD with momentum and layer-wise adaptive rate scaling, as SwAV (apex LARC, clip=False, every tensor): the step
    of w, gradient plus weight decay, is scaled by trust * ||w|| / (||g|| + wd * ||w||) before momentum; a tensor
    whose weight or gradient is zero takes the plain step."""

    def __init__(self, params, lr=0.0, momentum=0.9, weight_decay=0.0, trust_coefficient=0.001, eps=1e-8):
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay,
                                      trust_coefficient=trust_coefficient, eps=eps))

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            wd, trust = group["weight_decay"], group["trust_coefficient"]
            for p in group["params"]:
                if p.grad is None:  # frozen this step (prototypes during the first iterations)
                    continue
                w_norm, g_norm = torch.linalg.vector_norm(p), torch.linalg.vector_norm(p.grad)
                rate = trust * w_norm / (g_norm + wd * w_norm + group["eps"])
                update = torch.where((w_norm > 0) & (g_norm > 0), (p.grad + wd * p) * rate, p.grad)
                if (buffer := self.state[p].get("momentum_buffer")) is None:
                    buffer = self.state[p]["momentum_buffer"] = update.clone()
                else:
                    buffer.mul_(group["momentum"]).add_(update)
                p.add_(buffer, alpha=-group["lr"])


# --------------------------------------------------------------------------------------------- the training step
def build_run(args, device, data, student, arch, teacher=None):
    """Everything a step reads, built here once: new_run()'s fields (LARS or AdamW) and RoB-SwAV's own."""
    lars, peak = args.optimizer == "lars", args.lr * args.batch_size_per_gpu * common.get_world_size() / 256
    optimizer = LARS([p for p in student.parameters() if p.requires_grad]) if lars else None  # None: AdamW
    min_lr = args.min_lr if args.min_lr is not None else peak / 1000 if lars else 1e-5
    run = new_run(args, device, student, arch, len(data.loader), optimizer, peak / 16 if lars else 0.0, min_lr)
    if teacher is not None:
        teacher = common.place_teacher(teacher, device, run.teacher_dtype, [teacher.backbone,
                                                                            teacher.head.projection_head])
        common.check_patch(teacher.backbone, args.global_crops_size)
    for network in [run.student] + ([teacher] if teacher is not None else []) if args.compile else []:
        common.compile_network(network)
    run.data, run.teacher, run.n_teacher = data, teacher, 2 if teacher is None else args.teacher_crops
    run.loss_fn = torch.compile(multi_crop_cross_entropy) if args.compile else multi_crop_cross_entropy
    run.epsilon = args.epsilon if args.epsilon is not None else 0.05 if teacher is None else 0.03
    run.pairs = view_pairs(run.n_teacher, 2 + args.local_crops_number, swapped=args.swapped or teacher is None)
    run.freeze_prototypes = args.freeze_prototypes_niters if args.freeze_prototypes_niters is not None else \
        run.iters_per_epoch if teacher is None else 0  # plain SwAV: the first epoch; RoB: never (the reference)
    run.queue = EmbeddingQueue(run.n_teacher, args.queue_length, student.head.prototypes.weight.shape[1]).to(device) \
        if args.queue_length else None
    run.saved = {} if run.queue is None else dict(queue=run.queue)
    return run


@torch.no_grad()
def codes_of(run, embeddings, scores, prototypes, step):
    """Sinkhorn codes of each coded view over the global batch (and the queue: filled from --epoch_queue_starts)."""
    queue_start = run.args.epoch_queue_starts * run.iters_per_epoch
    use_queue = run.queue is not None and step >= queue_start + math.ceil(run.args.queue_length / run.global_batch)
    codes = torch.cat([teacher_codes(view_scores, run.epsilon, run.args.sinkhorn_iterations,
                                     run.queue.share(v) @ prototypes.float().t() if use_queue else None)
                       for v, view_scores in enumerate(scores.float().chunk(run.n_teacher))])
    if run.queue is not None and step >= queue_start:
        run.queue.push(embeddings)
    return codes


def train_step(run, batch, indices, step):
    crops = common.crops_on_device(run.data, batch, indices, run.device, step, not common.is_vit(run.student.backbone))
    if run.teacher is not None:
        with torch.no_grad():
            embeddings, scores = run.teacher([c.to(run.teacher_dtype) for c in crops[:run.n_teacher]])
    with torch.autocast(run.device.type, torch.bfloat16, enabled=run.amp):
        student_embeddings, student_scores = run.ddp(crops)
    if run.teacher is None:  # plain SwAV: the student's own scores of both global crops (and prototypes) give the codes
        n_codes, prototypes = 2 * len(crops[0]), run.student.head.prototypes.weight
        embeddings, scores = student_embeddings[:n_codes].detach(), student_scores[:n_codes].detach()
    else:
        prototypes = run.teacher.head.prototypes.weight
    loss = run.loss_fn(student_scores, codes_of(run, embeddings, scores, prototypes, step), run.pairs,
                       run.args.student_temp)
    run.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if run.args.clip_grad:
        nn.utils.clip_grad_norm_(run.student.parameters(), run.args.clip_grad)
    if step < run.freeze_prototypes:  # own prototypes frozen for the first steps (a teacher's copy always is)
        run.student.head.prototypes.weight.grad = None
    run.optimizer.step()
    normalize_prototypes(run.student.head)
    if run.teacher is None and (step + 1) % run.iters_per_epoch == 0 and step + 1 - run.iters_per_epoch >= \
            run.freeze_prototypes:  # the last step of an epoch after the frozen ones: has plain SwAV collapsed?
        if warning := collapse_warning(loss.item(), run.student.head.prototypes.weight.shape[0], run.epsilon):
            common.log(f"warning: {warning}")
    return {"train_loss": loss}


# ------------------------------------------------------------------------------------------ flags and main()
def get_args_parser():
    parser = argparse.ArgumentParser("RoB-SwAV", add_help=False)
    group = parser.add_argument_group("model")
    group.add_argument("--student", default="resnet18", help="resnet18, mobilenet_v3, vit_tiny... or any timm name.")
    group.add_argument("--teacher", default="swav_rn50", help=f"{', '.join(TEACHERS)} (800 epochs); a SwAV release "
                       "file (standard-width RN50); a checkpoint.pth of this script; or 'self' for plain SwAV.")
    group.add_argument("--use_teacher_prototypes", action="store_true", help="Score the student's MLP (no L2-norm) "
                       "against the teacher's frozen prototypes, as the reference's RN50 config.")
    group.add_argument("--hidden_mlp", type=int, default=2048, help="Hidden width of the student's projection head.")
    group.add_argument("--patch_size", type=int, default=None, help="ViT student patch size (7 at 28 px).")
    group.add_argument("--drop_path_rate", type=float, default=0.0, help="Student stochastic depth (0.1 for ViT-S).")
    group = parser.add_argument_group("codes, temperature and pairing")
    group.add_argument("--epsilon", type=float, default=None, help="Sinkhorn regularisation, lower: sharper codes "
                       "(default 0.03 for RoB, 0.05 for plain SwAV); below ~0.025 fp32 can underflow.")
    group.add_argument("--sinkhorn_iterations", type=int, default=3, help="Sinkhorn-Knopp iterations.")
    group.add_argument("--student_temp", type=float, default=0.1, help="Student softmax temperature.")
    group.add_argument("--teacher_crops", type=int, default=1, choices=[1, 2], help="Global crops the teacher codes.")
    group.add_argument("--swapped", action="store_true", help="Cross-view pairing (always on with --teacher self).")
    group.add_argument("--queue_length", type=int, default=0, help="Past code-crop embeddings added to Sinkhorn's "
                       "batch, for global batches small next to K (SwAV: 3840 at 256). 0: no queue.")
    group.add_argument("--epoch_queue_starts", type=int, default=15, help="Epoch at which the queue starts filling.")
    group.add_argument("--freeze_prototypes_niters", type=int, default=None, help="Steps with frozen prototypes "
                       "(default: 0 for RoB, an epoch for plain SwAV).")
    group.add_argument("--optimizer", default="lars", choices=["lars", "adamw"], help="lars: SGD + LARS (convnets, "
                       "lr 0.3, weight decay 1e-6); adamw: as rob_dino.py (ViTs, lr 5e-4, weight decay 0.04 -> 0.4).")
    group = parser.add_argument_group("plain-SwAV baseline (--teacher self only)")
    group.add_argument("--feat_dim", type=int, default=128, help="Projection (prototype) dimension.")
    group.add_argument("--nmb_prototypes", type=int, default=3000, help="Number of prototypes K.")
    add_run_args(parser)  # optimisation, multi-crop, data and runtime; RoB-SwAV's defaults (None: --optimizer's):
    parser.set_defaults(epochs=100, lr=None, min_lr=None, weight_decay=None, weight_decay_end=None,
                        local_crops_number=4, global_crops_scale=(0.14, 1.0), local_crops_scale=(0.05, 0.14))
    return parser


def check_args(args):
    vars(args).update({k: v for k, v in OPTIMIZER_DEFAULTS[args.optimizer].items() if getattr(args, k) is None})
    check_flags(args, positive=["student_temp", "epsilon", "hidden_mlp", "feat_dim", "nmb_prototypes"],
                non_negative=["sinkhorn_iterations", "queue_length", "epoch_queue_starts", "freeze_prototypes_niters"],
                fractions=["drop_path_rate"])
    if args.teacher == "self" and args.use_teacher_prototypes:
        raise common.UserError("--use_teacher_prototypes needs a pretrained --teacher (plain SwAV learns its own)")


def build_augmentation(args):
    """SwAV's augmentation: colour jitter (0.8, 0.8, 0.8, 0.2), blur p 0.5, no solarisation, bilinear, red std 0.228."""
    return common.MultiCropAugmentation(args.global_crops_size, args.local_crops_size, 2, args.local_crops_number,
                                        args.global_crops_scale, args.local_crops_scale,
                                        color_jitter=(0.8, 0.8, 0.8, 0.2), blur_p=(0.5, 0.5, 0.5),
                                        solarize_p=(0.0, 0.0, 0.0), interpolation="bilinear", std=(0.228, 0.224, 0.225))


def main(args):
    check_args(args)
    device = common.init_distributed()
    with (locked_output_dir(args.output_dir) as output_dir,  # locked before any expensive work
          torch.random.fork_rng(devices=[device] if device.type == "cuda" else [])):  # the caller's RNG is kept
        data = common.training_data(args.data_path, build_augmentation(args), args.batch_size_per_gpu,
                                    args.num_workers, args.seed, args.subset, args.gpu_augment)
        teacher = None if args.teacher == "self" else load_teacher(args.teacher)
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
