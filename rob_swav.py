"""RoB-SwAV: train a small network by distillation from a frozen, pretrained SwAV model.

SwAV learns prototypes and, for each image, a code: its soft assignment to the prototypes, computed by
Sinkhorn-Knopp so that the batch spreads evenly over the prototypes; every crop of the image must predict the
code of another crop. RoB ("Replace one Branch") takes the codes from a released SwAV ResNet-50 instead
(backbone + projection head + prototypes, frozen): Sinkhorn-Knopp on the teacher's prototype scores of global
crop 0 (eps 0.03, 3 iterations, over the global batch), and every crop of the fresh student (ResNet-18/34/50,
MobileNetV3...) predicts that code through its own SwAV head and prototypes.

    torchrun --nproc_per_node=8 rob_swav.py --student resnet18 --data_path /data/imagenet/train --output_dir out/

The recipe (the defaults): teacher SwAV RN50 (800 epochs, 3000 prototypes); student head [d, 2048, 128] (BN,
ReLU) + L2-norm + its own 3000 prototypes, never frozen; codes by Sinkhorn (eps 0.03, 3 iterations) of the
teacher's scores of global crop 0; CE at 0.1 for every student crop; 2 x 224 px crops (0.14, 1) + 4 x 96 px
(0.05, 0.14), SwAV's augmentation; SGD + LARS, lr 0.3 x batch / 256 warmed up from a 16th over 10 epochs,
cosine to a 1000th, weight decay 1e-6.

`--teacher self` runs plain SwAV instead (codes from the student's own prototype scores of both global crops,
swapped prediction): the baseline of the paper, and a way to pretrain a teacher on your own data. Its
checkpoint is a valid --teacher for RoB.
"""
import argparse
import itertools
import math
import time

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

import common
import training

TEACHERS = {  # official SwAV ResNet-50 releases (backbone + projection head + 3000 prototypes): name -> file
    "swav_rn50": "swav_800ep_pretrain",
    "swav_rn50_400ep": "swav_400ep_pretrain",
    "swav_rn50_200ep": "swav_200ep_pretrain",
    "swav_rn50_100ep": "swav_100ep_pretrain",
    "swav_rn50_400ep_bs256": "swav_400ep_bs256_pretrain",
    "swav_rn50_200ep_bs256": "swav_200ep_bs256_pretrain",
    "swav_rn50_400ep_2x224": "swav_400ep_2x224_pretrain",
}
URL = "https://dl.fbaipublicfiles.com/deepcluster/{}.pth.tar"
OPTIMIZER_DEFAULTS = {  # SwAV's SGD + LARS (convnets); AdamW with rob_dino.py's settings (ViT students)
    "lars": dict(lr=0.3, weight_decay=1e-6, weight_decay_end=1e-6),
    "adamw": dict(lr=5e-4, weight_decay=0.04, weight_decay_end=0.4),
}


# -------------------------------------------------------------------------------------------- arguments
def get_args_parser():
    parser = argparse.ArgumentParser("RoB-SwAV", add_help=False)
    group = parser.add_argument_group("model")
    group.add_argument("--student", default="resnet18", help="resnet18, resnet34, resnet50, mobilenet_v3, vit_tiny, "
                       "vit_small, vit_base or any timm model name.")
    group.add_argument("--teacher", default="swav_rn50", help=f"{', '.join(TEACHERS)} (swav_rn50: 800 epochs); a "
                       "local file in the same format (flat state dict, 'module.' prefix; standard-width ResNet-50 "
                       "only, the wide RN50w2/w4/w5 releases are not supported); a checkpoint.pth of this script "
                       "(a student, or a --teacher self run, teaches the next student); or 'self' for plain SwAV.")
    group.add_argument("--use_teacher_prototypes", action="store_true", help="Student head = MLP [d, 2048, 128] "
                       "scored (without L2-norm) against the frozen teacher prototypes, as the reference's RN50 "
                       "config. Default: own SwAV head [d, 2048, 128] + L2-norm + own prototypes (small students).")
    group.add_argument("--hidden_mlp", type=int, default=2048, help="Hidden width of the student's projection head.")
    group.add_argument("--patch_size", type=int, default=None, help="ViT student patch size (default: the "
                       "model's own, 16); small images want small patches (7 at 28 px).")
    group.add_argument("--drop_path_rate", type=float, default=0.0, help="Student stochastic depth (0.1 for ViT-S).")
    group = parser.add_argument_group("codes, temperature and pairing")
    group.add_argument("--epsilon", type=float, default=None, help="Sinkhorn regularisation: lower = sharper codes "
                       "(default 0.03 for RoB, SwAV's 0.05 with --teacher self). Scores are cosines: below ~0.025, "
                       "exp(-2 / eps) can underflow fp32 (NaN loss).")
    group.add_argument("--sinkhorn_iterations", type=int, default=3, help="Sinkhorn-Knopp iterations (0: plain "
                       "softmax(scores / epsilon), no equipartition).")
    group.add_argument("--student_temp", type=float, default=0.1, help="Student softmax temperature.")
    group.add_argument("--teacher_crops", type=int, default=1, choices=[1, 2], help="Global crops the teacher "
                       "codes: 1 (crop 0; every student crop predicts its code, crop 0 included) or 2.")
    group.add_argument("--swapped", action="store_true", help="Cross-view pairing (teacher view i -> every "
                       "student crop but i). Default: same-view (teacher view i -> student crop i and every crop "
                       "that is not another teacher view). Always on with --teacher self.")
    group.add_argument("--queue_length", type=int, default=0, help="Past code-crop embeddings (global count) "
                       "added to Sinkhorn's batch: keeps the equipartition meaningful when the global batch is "
                       "small next to 3000 prototypes (SwAV used 3840 at a batch of 256). 0: no queue.")
    group.add_argument("--epoch_queue_starts", type=int, default=15, help="Epoch at which the queue starts filling.")
    group.add_argument("--freeze_prototypes_niters", type=int, default=None, help="Iterations with the student "
                       "prototypes frozen. Default: none for RoB (the reference never freezes them); one epoch with "
                       "--teacher self, as SwAV (313 iterations of ImageNet at batch 4096).")
    group = parser.add_argument_group("plain-SwAV baseline (--teacher self only)")
    group.add_argument("--feat_dim", type=int, default=128, help="Projection (prototype) dimension.")
    group.add_argument("--nmb_prototypes", type=int, default=3000, help="Number of prototypes K.")
    group = training.add_optimisation_args(parser, epochs=100, lr=None, min_lr=None, weight_decay=None,
                                           weight_decay_end=None, clip_grad=0.0, helps=dict(
        lr="Peak lr at a global batch of 256, scaled linearly (lars: 0.3, i.e. 4.8 at 4096; adamw: 5e-4).",
        min_lr="lr at the end of the cosine, absolute (lars: peak / 1000, 0.0048 at 4096 as SwAV; adamw: 1e-5).",
        warmup_epochs="Linear lr warm-up epochs (lars starts at peak / 16, 0.3 at 4096 as the reference; adamw "
                      "at 0).",
        weight_decay="Initial weight decay (lars: 1e-6 on every tensor; adamw: 0.04, not on biases and norms).",
        weight_decay_end="Final weight decay, cosine (lars: constant; adamw: 0.4).",
        clip_grad="Clip the global gradient norm (0: off, as SwAV)."))
    group.add_argument("--optimizer", default="lars", choices=["lars", "adamw"], help="lars: SGD (momentum 0.9) + "
                       "LARS (trust 0.001), SwAV's and the reference's choice for convnets; adamw: as rob_dino.py.")
    training.add_multicrop_args(parser, (0.14, 1.0), 4, (0.05, 0.14))
    training.add_run_args(parser)
    return parser


def check_args(args):
    """Fills the optimiser's defaults (lr, weight decay), then checks the flags."""
    for key, value in OPTIMIZER_DEFAULTS[args.optimizer].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    training.check_args(args, positive=["epochs", "batch_size_per_gpu", "student_temp", "epsilon", "hidden_mlp",
                                      "feat_dim", "nmb_prototypes", "global_crops_size", "local_crops_size"],
                      non_negative=["lr", "min_lr", "warmup_epochs", "weight_decay", "weight_decay_end", "clip_grad",
                                    "local_crops_number", "sinkhorn_iterations", "queue_length",
                                    "epoch_queue_starts", "freeze_prototypes_niters"],
                      fractions=["drop_path_rate"], scales=["global_crops_scale", "local_crops_scale"])
    if args.teacher == "self" and args.use_teacher_prototypes:
        raise common.UserError("--use_teacher_prototypes needs a pretrained --teacher (plain SwAV learns its "
                               "prototypes)")


def build_augmentation(args):
    """SwAV's multi-crop augmentation: colour jitter (0.8, 0.8, 0.8, 0.2) with p 0.8, grayscale 0.2, blur p 0.5
    on every crop, no solarise, bilinear, std 0.228 for red."""
    return common.MultiCropAugmentation(args.global_crops_size, args.local_crops_size, 2, args.local_crops_number,
                                        args.global_crops_scale, args.local_crops_scale,
                                        color_jitter=(0.8, 0.8, 0.8, 0.2), blur_p=(0.5, 0.5, 0.5),
                                        solarize_p=(0.0, 0.0, 0.0), interpolation="bilinear", std=(0.228, 0.224, 0.225))


# -------------------------------------------------------------------------------------- the frozen teacher
def load_teacher(name_or_path):
    """The frozen RoB teacher (backbone + projection head + prototypes, eval, no grad) from an official name
    (downloaded once into the torch.hub cache) or a local file."""
    source = common.source_of(name_or_path, TEACHERS, lambda name: URL.format(TEACHERS[name]), "SwAV release")
    return teacher_from_checkpoint(common.load_file(source, "SwAV teacher checkpoint"), source)


def teacher_from_checkpoint(ckpt, source):
    """Recognise the checkpoint's format, build the matching backbone and head from its tensors and load
    them strictly. Accepts the SwAV releases and this script's own; refuses the rest with the fix."""
    flat = common.strip_prefix(ckpt.get("state_dict", ckpt), "module.") if isinstance(ckpt, dict) else {}
    if isinstance(ckpt, dict) and ckpt.get("method") == "rob_swav":  # a RoB student or a --teacher self run
        sd = ckpt["student"]
        head_sd = common.sub_state_dict(sd, "head.")
        head = head_from_state_dict(head_sd)  # always scored as SwAV: cosine, bounded scores for Sinkhorn
        backbone = common.recorded_backbone(ckpt, sd, source)
    elif isinstance(ckpt, dict) and ckpt.get("method") is None and "prototypes.weight" in flat:  # a SwAV release
        flat = {k: v.float() if torch.is_tensor(v) and v.is_floating_point() else v for k, v in flat.items()}  # fp16
        backbone_sd = {k: v for k, v in flat.items() if not k.startswith(("projection_head.", "prototypes."))}
        try:
            backbone, _ = common.backbone_from_state_dict(backbone_sd)
        except ValueError as err:
            raise common.UserError(f"{source}: {err}. Use a standard ResNet-50 SwAV release ({', '.join(TEACHERS)}).") \
                from None
        head_sd = {k: v for k, v in flat.items() if k.startswith(("projection_head.", "prototypes."))}
        head = head_from_state_dict(head_sd)
        common.load_strict(backbone, backbone_sd, source, "SwAV release backbone")
    else:
        common.refuse_teacher(ckpt, source, "rob_swav", "its projection head and prototypes "
                              "('module.prototypes.weight')",
                              URL.format(TEACHERS["swav_rn50"]))
    common.load_strict(head, head_sd, source, "SwAV projection head and prototypes")
    return common.freeze(MultiCropNetwork(backbone, head))


def random_teacher(name):
    """An official teacher architecture with random weights (benchmarks: nothing to download)."""
    backbone, _ = common.build_teacher_backbone("resnet50")
    return common.freeze(MultiCropNetwork(backbone, SwAVHead(2048)))


# ------------------------------------------------------------------------------------------- the student
class SwAVHead(nn.Module):
    """SwAV's head (the official module names, so that SwAV checkpoints load): projection MLP [in, hidden, out]
    (BN, ReLU) -> L2-normalise -> prototypes (linear, no bias). Returns (embedding, prototype scores), in fp32
    after the projection (a frozen teacher keeps its prototypes in fp32). `normalize=False` skips the L2-norm
    (--use_teacher_prototypes students)."""

    def __init__(self, in_dim, hidden_dim=2048, out_dim=128, n_prototypes=3000, use_bn=True, normalize=True):
        super().__init__()
        self.projection_head = nn.Sequential(nn.Linear(in_dim, hidden_dim),
                                             nn.BatchNorm1d(hidden_dim) if use_bn else nn.Identity(),
                                             nn.ReLU(inplace=True), nn.Linear(hidden_dim, out_dim))
        self.prototypes = nn.Linear(out_dim, n_prototypes, bias=False)
        self.normalize = normalize
        normalize_prototypes(self)

    def forward(self, x):
        embedding = self.projection_head(x).float()
        if self.normalize:
            embedding = F.normalize(embedding, dim=-1)
        with torch.autocast(embedding.device.type, enabled=False):  # fp32 scores: they are divided by 0.1 / 0.03
            return embedding, self.prototypes(embedding)


@torch.no_grad()
def normalize_prototypes(head):
    """Trainable prototypes are kept on the unit sphere: renormalised at creation and after every step."""
    if head.prototypes.weight.requires_grad:
        head.prototypes.weight.copy_(F.normalize(head.prototypes.weight, dim=1))


class MultiCropNetwork(nn.Module):
    """Backbone + head over a list of crops: one backbone pass per run of same-sized crops (the globals
    together, the locals together), one head pass over all features. Returns (embeddings, scores), each
    [n_crops * B, ...], crop-major."""

    def __init__(self, backbone, head):
        super().__init__()
        self.backbone, self.head = backbone, head

    def forward(self, crops):
        same_size_runs = itertools.groupby(crops, key=lambda crop: crop.shape[-1])
        features = [self.backbone(torch.cat(list(run))) for _, run in same_size_runs]
        return self.head(torch.cat(features))


def head_from_state_dict(sd):
    """A SwAVHead whose widths are read from its tensors."""
    first, last = sd["projection_head.0.weight"], sd["projection_head.3.weight"]
    return SwAVHead(first.shape[1], first.shape[0], last.shape[0], sd["prototypes.weight"].shape[0],
                    use_bn="projection_head.1.running_mean" in sd)


def build_student(args, teacher=None):
    """A fresh backbone + a SwAV head with the teacher's number and width of prototypes (the flags' for plain
    SwAV): its own prototypes, or (--use_teacher_prototypes) a frozen copy of the teacher's. Returns (network, arch)."""
    common.seed_everything(common.mix_seed(args.seed, 0))  # the same init in every process, RoB or plain
    backbone, dim, arch = common.build_student(args.student, args.global_crops_size, args.patch_size,
                                               args.drop_path_rate)
    n_prototypes, feat_dim = (args.nmb_prototypes, args.feat_dim) if teacher is None else \
        teacher.head.prototypes.weight.shape
    head = SwAVHead(dim, args.hidden_mlp, feat_dim, n_prototypes, use_bn=not common.is_vit(backbone),
                    normalize=not args.use_teacher_prototypes)
    if args.use_teacher_prototypes:  # a frozen copy: saved with the student, never optimised nor renormalised
        head.prototypes.weight.data.copy_(teacher.head.prototypes.weight)
        head.prototypes.requires_grad_(False)
    return MultiCropNetwork(backbone, head), arch


# -------------------------------------------------------------------------------- the RoB target and loss
def all_reduce(tensor, op=dist.ReduceOp.SUM):
    """In-place all-reduce over the processes (identity in a single process); returns the tensor."""
    if dist.is_initialized():
        dist.all_reduce(tensor, op)
    return tensor


@torch.no_grad()
def sinkhorn_knopp(scores, epsilon, n_iters):
    """Codes [B, K] for prototype scores [B, K]: starting from exp(scores / epsilon), alternately rescale the
    prototypes (rows of Q = [K, B]) to a mass of 1/K each and the samples (columns) to 1/B each, so that the
    batch is spread evenly over the prototypes (SwAV's equipartition). B is the global batch: the sums over
    samples are all-reduced. fp32, with one maximum subtracted everywhere for stability. Each code sums to 1."""
    scores = scores.float()
    q = torch.exp((scores - all_reduce(scores.max(), dist.ReduceOp.MAX)) / epsilon).t()  # [K, B_local]
    n_prototypes, n_samples = q.shape[0], all_reduce(torch.tensor(float(q.shape[1]), device=q.device))
    q /= all_reduce(q.sum())
    for _ in range(n_iters):
        q /= all_reduce(q.sum(dim=1, keepdim=True)) * n_prototypes  # each prototype: mass 1/K
        q /= q.sum(dim=0, keepdim=True) * n_samples  # each sample: mass 1/B
    return (q / q.sum(dim=0, keepdim=True)).t()


def teacher_codes(scores, epsilon, n_iters, past_scores=None):
    """The RoB seam: the teacher's prototype scores of one view [B, K] become the target codes, by Sinkhorn
    over the global batch, joined by the scores of the queued past embeddings if any (their codes are dropped)."""
    batch = len(scores)
    if past_scores is not None:
        scores = torch.cat([scores, past_scores])
    return sinkhorn_knopp(scores, epsilon, n_iters)[:batch]


class EmbeddingQueue(nn.Module):
    """Optional queue of past embeddings of the code crops (SwAV's fix for small batches). Their scores against
    the current prototypes (RoB: the teacher's frozen ones, so a queue of past teacher scores) join Sinkhorn's
    batch. Kept whole and identical on every process (new entries are all-gathered), newest first; each process
    adds its own share of it, so the checkpoint holds all of it and resumes exactly."""

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


# ------------------------------------------------------------------------------------------ optimiser
class LARS(torch.optim.Optimizer):
    """SGD with momentum and layer-wise adaptive rate scaling, as SwAV and the reference use it (apex LARC,
    clip=False, on every tensor, biases and BN parameters included): the weight decay is added to the gradient,
    then the step of each tensor w is scaled by trust * ||w|| / (||g|| + wd * ||w||) before momentum. A tensor
    whose weight or gradient is zero (e.g. a zero-initialised bias at the first step) takes the plain step."""

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
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = update.clone()
                else:
                    state["momentum_buffer"].mul_(group["momentum"]).add_(update)
                p.add_(state["momentum_buffer"], alpha=-group["lr"])


# ---------------------------------------------------------------------- the plain-SwAV baseline (--teacher self)
def own_codes(run, student_embeddings, student_scores, batch):
    """Plain SwAV: no second network; the codes come from the student's own scores of both global crops (and
    its own prototypes score the queue). RoB replaces this by the frozen teacher's scores of its crop."""
    n_codes = 2 * batch
    return student_embeddings[:n_codes].detach(), student_scores[:n_codes].detach(), run.student.head.prototypes.weight


def collapse_warning(mean_loss, n_prototypes, epsilon):
    """Plain SwAV's failure at small scale: the embeddings settle where every prototype scores them alike, codes
    and predictions go uniform and the loss sits at ln K with no gradient left. The official SwAV README's first
    remedy is sharper codes (a lower epsilon). Returns the message for an epoch's mean loss, or None."""
    if abs(mean_loss - math.log(n_prototypes)) > 0.015:
        return None
    return (f"the epoch's mean loss {mean_loss:.4f} sits at ln {n_prototypes} = {math.log(n_prototypes):.4f}: plain "
            f"SwAV has collapsed (uniform codes, no gradient). Restart with a lower --epsilon (now {epsilon:g}, e.g. "
            f"{max(epsilon * 0.6, 0.025):.2g}; below ~0.025 fp32 can underflow).")


# ------------------------------------------------------------------------------------------------ training
def build(args, device, iters_per_epoch, student, arch, teacher=None):
    """Everything a training step needs, as one namespace: the student (and its DDP wrapper), the frozen teacher
    (RoB; None for plain SwAV), the queue, the pairing, the optimiser (LARS or AdamW) and the schedules."""
    if args.optimizer == "lars":
        optimizer = LARS([p for p in student.parameters() if p.requires_grad])
        peak = args.lr * args.batch_size_per_gpu * common.get_world_size() / 256
        warmup_start, min_lr = peak / 16, peak / 1000 if args.min_lr is None else args.min_lr
    else:
        optimizer, warmup_start, min_lr = None, 0.0, 1e-5 if args.min_lr is None else args.min_lr
    run = training.setup_run(args, device, iters_per_epoch, student.to(device), arch, "rob_swav", optimizer=optimizer,
                             warmup_start=warmup_start, min_lr=min_lr)
    run.teacher, run.n_teacher = teacher, 2 if teacher is None else args.teacher_crops
    if teacher is not None:
        training.place_teacher(teacher, device, run, [teacher.backbone, teacher.head.projection_head])
        training.check_patch(teacher.backbone, args.global_crops_size)
    if args.compile:  # in place, so that checkpoints keep their keys; ViTs per block (fast to compile)
        for network in [student] + ([teacher] if teacher is not None else []):
            training.compile_model(network.backbone)
            network.head.compile()
    run.loss_fn = torch.compile(common.multi_crop_cross_entropy) if args.compile else common.multi_crop_cross_entropy
    run.epsilon = args.epsilon if args.epsilon is not None else 0.05 if teacher is None else 0.03
    run.pairs = common.view_pairs(run.n_teacher, 2 + args.local_crops_number, swapped=args.swapped or teacher is None)
    run.own_prototypes = not args.use_teacher_prototypes
    run.freeze_prototypes = args.freeze_prototypes_niters if args.freeze_prototypes_niters is not None else \
        iters_per_epoch if teacher is None else 0  # plain SwAV: the first epoch; RoB: never (the reference)
    feat_dim = student.head.prototypes.weight.shape[1]
    run.queue = EmbeddingQueue(run.n_teacher, args.queue_length, feat_dim).to(device) if args.queue_length else None
    run.queue_start = args.epoch_queue_starts * iters_per_epoch  # filled from then on, used once full
    run.queue_full = run.queue_start + math.ceil(args.queue_length / run.global_batch)
    common.log(f"student {args.student}: {sum(p.numel() for p in student.parameters() if p.requires_grad) / 1e6:.1f}M "
               f"parameters, {student.head.prototypes.weight.shape[0]} prototypes of dim {feat_dim}; teacher: "
               f"{args.teacher}, epsilon {run.epsilon}")
    return run


def teacher_forward(run, crops):
    """The frozen teacher's (embeddings, prototype scores) of its crops."""
    with torch.no_grad():
        return run.teacher([c.to(run.teacher_dtype) for c in crops[:run.n_teacher]])


@torch.no_grad()
def codes_of(run, embeddings, scores, prototypes, it):
    """Sinkhorn codes of each coded view over the global batch (and the queue, once full), then queue the
    embeddings."""
    use_queue = run.queue is not None and it >= run.queue_full
    codes = torch.cat([teacher_codes(view_scores, run.epsilon, run.args.sinkhorn_iterations,
                                     run.queue.share(v) @ prototypes.float().t() if use_queue else None)
                       for v, view_scores in enumerate(scores.float().chunk(run.n_teacher))])
    if run.queue is not None and it >= run.queue_start:
        run.queue.push(embeddings)
    return codes


def train_step(run, crops, it):
    """One optimisation step on a batch (list of crops, globals first); returns the loss, a 1-element tensor."""
    training.start_step(run, it)  # lr, weight decay, and a seed per step for drop-path (exact resume)
    teacher_out = run.side_stream.start(teacher_forward, run, crops) if run.teacher is not None else None
    with torch.autocast(run.device.type, run.amp_dtype, enabled=run.amp):
        student_embeddings, student_scores = run.student_ddp(crops)
    if run.teacher is None:
        embeddings, scores, prototypes = own_codes(run, student_embeddings, student_scores, len(crops[0]))
    else:
        (embeddings, scores), prototypes = run.side_stream.join(teacher_out), run.teacher.head.prototypes.weight
    codes = codes_of(run, embeddings, scores, prototypes, it)
    loss = run.loss_fn(student_scores, codes, run.pairs, run.args.student_temp)
    run.optimizer.zero_grad(set_to_none=True)
    run.scaler.scale(loss).backward()
    run.scaler.unscale_(run.optimizer)
    if run.args.clip_grad:
        nn.utils.clip_grad_norm_(run.student.parameters(), run.args.clip_grad)
    if run.own_prototypes and it < run.freeze_prototypes:  # prototypes frozen for the first iterations
        run.student.head.prototypes.weight.grad = None
    run.scaler.step(run.optimizer)
    run.scaler.update()
    if run.own_prototypes:
        normalize_prototypes(run.student.head)
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
    if run.teacher is None and epoch * run.iters_per_epoch >= run.freeze_prototypes and stats.epoch_values:
        warning = collapse_warning(stats.means()["train_loss"], run.student.head.prototypes.weight.shape[0],
                                   run.epsilon)
        if warning:
            common.log(f"warning: {warning}")
    training.check_state([run.student], run.optimizer, probe=lambda: run.student(crops)[1])
    training.save_run(run, data, step, stats, time.time() - start,
                      {"queue": run.queue.state_dict()} if run.queue is not None else {})
    return step, stopping


def main(args):
    check_args(args)
    rank, world_size, device = common.init_distributed()
    data = training.build_training_data(args, build_augmentation(args))
    teacher = None if args.teacher == "self" else load_teacher(args.teacher)
    student, arch = build_student(args, teacher)
    run = build(args, device, len(data.loader), student, arch, teacher)
    with training.OutputDir(args.output_dir) as output_dir:
        ckpt = training.resume(run, data, output_dir, "rob_swav")
        if ckpt is not None and run.queue is not None and "queue" in ckpt:
            run.queue.load_state_dict(ckpt["queue"])
        stop, step = training.StopRequest(), run.start_step
        for epoch in range(step // run.iters_per_epoch, args.epochs):
            step, stopping = train_one_epoch(run, data, epoch, step, stop)
            if stopping:
                common.log(f"stopped by signal at step {step}; checkpoint saved, rerun the same command to resume")
                return stop.exit_code()
        training.finish(output_dir, run.student.backbone, run.arch)
    return 0


if __name__ == "__main__":
    training.run_main(main, argparse.ArgumentParser("RoB-SwAV", parents=[get_args_parser()]))
