"""RoB-SwAV: train a small network by distillation from a frozen, pretrained SwAV model.

SwAV learns prototypes and, for each image, a code: its soft assignment to the prototypes, computed by
Sinkhorn-Knopp so that the batch spreads evenly over the prototypes; every crop of the image must predict the
code of another crop. RoB ("Replace one Branch") takes the codes from a released SwAV ResNet-50 instead
(backbone + projection head + prototypes, frozen): Sinkhorn-Knopp on the teacher's prototype scores of global
crop 0 (eps 0.03, 3 iterations, over the global batch), and every crop of the fresh student (ResNet-18/34/50,
MobileNetV3...) predicts that code through its own SwAV head and prototypes.

    torchrun --nproc_per_node=8 rob_swav.py --student resnet18 --data_path /data/imagenet/train --output_dir out/

`--teacher self` runs plain SwAV instead (codes from the student's own prototype scores of both global crops,
swapped prediction): the baseline of the paper, and a way to pretrain a teacher on your own data. Its
checkpoint is a valid --teacher for RoB.
"""
import argparse
import datetime
import itertools
import json
import math
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

import common

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
    group.add_argument("--freeze_prototypes_niters", type=int, default=313, help="Iterations with the student "
                       "prototypes frozen (313 = one ImageNet epoch at batch 4096, SwAV's default).")
    group = parser.add_argument_group("plain-SwAV baseline (--teacher self only)")
    group.add_argument("--feat_dim", type=int, default=128, help="Projection (prototype) dimension.")
    group.add_argument("--nmb_prototypes", type=int, default=3000, help="Number of prototypes K.")
    group = parser.add_argument_group("optimisation")
    group.add_argument("--optimizer", default="lars", choices=["lars", "adamw"], help="lars: SGD (momentum 0.9) + "
                       "LARS (trust 0.001), SwAV's and the reference's choice for convnets; adamw: as rob_dino.py.")
    group.add_argument("--epochs", type=int, default=100)
    group.add_argument("--batch_size_per_gpu", type=int, default=64, help="Global batch = this x processes "
                       "(the paper: 64 x 64 GPUs = 4096).")
    group.add_argument("--lr", type=float, default=None, help="Peak lr at a global batch of 256, scaled linearly "
                       "(lars: 0.3, i.e. 4.8 at 4096; adamw: 5e-4).")
    group.add_argument("--min_lr", type=float, default=None, help="lr at the end of the cosine, absolute (lars: "
                       "peak / 1000, 0.0048 at 4096 as SwAV; adamw: 1e-5).")
    group.add_argument("--warmup_epochs", type=int, default=10, help="Linear lr warm-up epochs (lars starts at "
                       "peak / 16, 0.3 at 4096 as the reference; adamw at 0).")
    group.add_argument("--weight_decay", type=float, default=None, help="Initial weight decay (lars: 1e-6 on "
                       "every tensor; adamw: 0.04, not on biases and norms).")
    group.add_argument("--weight_decay_end", type=float, default=None, help="Final weight decay, cosine "
                       "(lars: constant; adamw: 0.4).")
    group.add_argument("--clip_grad", type=float, default=0.0, help="Clip the global gradient norm (0: off, as "
                       "SwAV; 3.0 is DINO's value for adamw).")
    group.add_argument("--precision", default=None, choices=["bf16", "fp16", "fp32"], help="Autocast dtype "
                       "(default bf16 on GPU, fp32 on CPU). The teacher runs in that dtype, scores, Sinkhorn and "
                       "losses in fp32.")
    group.add_argument("--compile", action="store_true", help="torch.compile teacher, student and loss (ViTs per "
                       "block: quick to compile). Faster on GPU once compiled.")
    group.add_argument("--overlap_teacher", action=argparse.BooleanOptionalAction, default=True, help="On GPU, "
                       "run the teacher on a second CUDA stream, concurrently with the student's forward.")
    group = parser.add_argument_group("multi-crop")
    group.add_argument("--global_crops_scale", type=float, nargs=2, default=(0.14, 1.0))
    group.add_argument("--local_crops_number", type=int, default=4, help="Small crops (student only).")
    group.add_argument("--local_crops_scale", type=float, nargs=2, default=(0.05, 0.14))
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


# --------------------------------------------------------------------------------------------- teacher
def load_teacher(name_or_path):
    """The frozen RoB teacher (backbone + projection head + prototypes, eval, no grad) from an official name
    (downloaded once into the torch.hub cache) or a local file."""
    source = URL.format(TEACHERS[name_or_path]) if name_or_path in TEACHERS else name_or_path
    return teacher_from_checkpoint(common.load_file(source, "SwAV teacher checkpoint"), source)


def teacher_from_checkpoint(ckpt, source):
    """Recognise the checkpoint's format, build the matching backbone and head from its tensors and load
    them strictly. Accepts the SwAV releases and this script's own; refuses the rest with the fix."""
    if not isinstance(ckpt, dict):
        raise ValueError(f"{source} is not a checkpoint dictionary")
    method = ckpt.get("method")
    if method == "rob_swav":  # a checkpoint of this script (a RoB student or a --teacher self run): its student
        sd = ckpt["student"]
        backbone = common.create_backbone({**ckpt["arch"], "kwargs": {**ckpt["arch"]["kwargs"], "drop_path_rate": 0.0}})
        head_sd = common.sub_state_dict(sd, "head.")
        head = head_from_state_dict(head_sd)  # always scored as SwAV: cosine, bounded scores for Sinkhorn
        common.load_strict(backbone, common.sub_state_dict(sd, "backbone."), source, "rob_swav.py checkpoint")
    elif method is not None:
        raise ValueError(f"{source} was written by {method}.py, not rob_swav.py: a RoB-SwAV teacher needs SwAV "
                         f"prototypes. Use {method}.py with it, or give a SwAV checkpoint.")
    elif "teacher" in ckpt or "target_encoder" in ckpt:
        kind = ("an MSN" if "target_encoder" in ckpt else "an iBOT" if any("last_layer2" in k for k in ckpt["teacher"])
                else "a DINO")
        script = {"an MSN": "rob_msn.py", "an iBOT": "rob_ibot.py", "a DINO": "rob_dino.py"}[kind]
        raise ValueError(f"{source} is {kind} checkpoint: use {script} with it.")
    else:
        flat = common.strip_prefix(ckpt.get("state_dict", ckpt), "module.")
        flat = {k: v.float() if torch.is_tensor(v) and v.is_floating_point() else v for k, v in flat.items()}  # fp16
        if "prototypes.weight" not in flat:
            if "cls_token" in flat or "conv1.weight" in flat:
                raise ValueError(f"{source} holds a backbone only; RoB-SwAV needs the projection head and "
                                 "prototypes too, which the SwAV releases contain, e.g. " + URL.format(TEACHERS["swav_rn50"])
                                 + f" (or pass --teacher {'/'.join(TEACHERS)} to download it).")
            raise ValueError(f"{source} is not a SwAV checkpoint (expected a flat state dict with "
                             "'module.prototypes.weight').")
        backbone_sd = {k: v for k, v in flat.items() if not k.startswith(("projection_head.", "prototypes."))}
        try:
            backbone, _ = common.backbone_from_state_dict(backbone_sd)
        except ValueError as err:
            raise ValueError(f"{source}: {err}. Use a standard ResNet-50 SwAV release ({', '.join(TEACHERS)}).") from None
        head_sd = {k: v for k, v in flat.items() if k.startswith(("projection_head.", "prototypes."))}
        head = head_from_state_dict(head_sd)
        common.load_strict(backbone, backbone_sd, source, "SwAV release backbone")
    common.load_strict(head, head_sd, source, "SwAV projection head and prototypes")
    return freeze(MultiCropNetwork(backbone, head))


def freeze(model):
    model.eval().requires_grad_(False)  # eval: BN running statistics never change
    return model


def random_teacher(name):
    """An official teacher architecture with random weights (for --benchmark: no download)."""
    backbone, _ = common.build_teacher_backbone("resnet50")
    return freeze(MultiCropNetwork(backbone, SwAVHead(2048)))


# ------------------------------------------------------------------------------------------------ loss
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


def view_pairs(n_teacher, n_crops, swapped):
    """(teacher view, student crop) pairs. Same-view: teacher view t -> student crop t and every crop that is not
    another teacher view (one teacher view: every crop). Swapped (SwAV's): teacher view t -> every crop but t."""
    if swapped:
        return [(t, s) for t in range(n_teacher) for s in range(n_crops) if s != t]
    return [(t, s) for t in range(n_teacher) for s in range(n_crops) if s == t or s >= n_teacher]


def swav_loss(student_scores, codes, pairs, student_temp):
    """Mean over pairs of the batch-mean cross-entropy H(codes[t], softmax(student_scores[s] / T)).
    student_scores: [n_crops * B, K], codes: [n_teacher * B, K] (both crop-major)."""
    n_crops, n_teacher = max(s for _, s in pairs) + 1, max(t for t, _ in pairs) + 1
    student_log_probs = F.log_softmax(student_scores.float() / student_temp, dim=-1).chunk(n_crops)
    targets = codes.chunk(n_teacher)
    return sum(-(targets[t] * student_log_probs[s]).sum(-1).mean() for t, s in pairs) / len(pairs)


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


# ----------------------------------------------------------------------------------------- optimiser
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


# ---------------------------------------------------------------------------------------------- training
def main(args):
    rank, world_size, device = common.init_distributed()
    common.seed_everything(common.mix_seed(args.seed, rank))
    self_teacher = args.teacher == "self"
    if self_teacher and args.use_teacher_prototypes:
        raise ValueError("--use_teacher_prototypes needs a pretrained --teacher (plain SwAV learns its prototypes)")
    for key, value in OPTIMIZER_DEFAULTS[args.optimizer].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    epsilon = args.epsilon if args.epsilon is not None else 0.05 if self_teacher else 0.03
    precision = args.precision or ("bf16" if device.type == "cuda" else "fp32")
    amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[precision]
    n_global, n_teacher = 2, 2 if self_teacher else args.teacher_crops
    output_dir = Path(args.output_dir)
    if common.is_main_process() and not args.benchmark:
        output_dir.mkdir(parents=True, exist_ok=True)
    common.log("\n".join(f"{k}: {v}" for k, v in sorted(vars(args).items())))

    # ---- data: SwAV's multi-crop augmentation (strong colour jitter, blur p 0.5 everywhere, no solarise, bilinear)
    augmentation = common.MultiCropAugmentation(
        args.global_crops_size, args.local_crops_size, n_global, args.local_crops_number, args.global_crops_scale,
        args.local_crops_scale, color_jitter=(0.8, 0.8, 0.8, 0.2), blur_p=(0.5, 0.5, 0.5), solarize_p=(0.0, 0.0, 0.0),
        interpolation="bilinear", std=(0.228, 0.224, 0.225))
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

    # ---- networks: frozen pretrained teacher (RoB) or none (baseline: the student codes itself), fresh student
    backbone, dim, arch = common.build_student(args.student, args.global_crops_size, args.patch_size,
                                               args.drop_path_rate)
    convnet = not common.is_vit(backbone)
    if self_teacher:
        feat_dim, n_prototypes, teacher = args.feat_dim, args.nmb_prototypes, None
    else:  # the student's head predicts codes over the teacher's K prototypes
        teacher = random_teacher(args.teacher) if args.benchmark else load_teacher(args.teacher)
        n_prototypes, feat_dim = teacher.head.prototypes.weight.shape
        patch = getattr(getattr(teacher.backbone, "patch_embed", None), "patch_size", (1,))[0]
        if args.global_crops_size % patch:
            raise ValueError(f"--global_crops_size {args.global_crops_size} is not a multiple of the teacher's patch "
                             f"size {patch}: the teacher sees the global crops.")
    own_prototypes = not args.use_teacher_prototypes
    head = SwAVHead(dim, args.hidden_mlp, feat_dim, n_prototypes, use_bn=convnet, normalize=own_prototypes)
    if not own_prototypes:  # a frozen copy: saved with the student, never optimised nor renormalised
        head.prototypes.weight.data.copy_(teacher.head.prototypes.weight)
        head.prototypes.requires_grad_(False)
    student = MultiCropNetwork(backbone, head).to(device)
    teacher_dtype = torch.float32
    if teacher is not None:
        teacher.to(device)
        if device.type == "cuda" and precision != "fp32":  # stored in bf16, except the fp32 prototypes
            teacher_dtype = amp_dtype
            teacher.backbone.to(amp_dtype)
            teacher.head.projection_head.to(amp_dtype)
        if not common.is_vit(teacher.backbone):
            teacher = teacher.to(memory_format=torch.channels_last)
    if convnet:
        student = student.to(memory_format=torch.channels_last)
    if world_size > 1 and device.type == "cuda":  # SyncBatchNorm needs GPUs (a no-op without BN layers)
        student = nn.SyncBatchNorm.convert_sync_batchnorm(student)
    student_ddp = DistributedDataParallel(student, device_ids=[device.index] if device.type == "cuda" else None) \
        if world_size > 1 else student
    loss_fn = swav_loss
    if args.compile:  # in place, so checkpoints keep their keys; ViTs per block (fast to compile)
        for network in (student, teacher) if teacher is not None else (student,):
            common.compile_model(network.backbone)
            network.head.compile()
        loss_fn = torch.compile(swav_loss)
    overlap = args.overlap_teacher and device.type == "cuda" and teacher is not None
    teacher_stream = torch.cuda.Stream(device) if overlap else None
    queue = EmbeddingQueue(n_teacher, args.queue_length, feat_dim).to(device) if args.queue_length else None
    n_params = sum(p.numel() for p in student.parameters() if p.requires_grad)
    common.log(f"student {args.student}: {n_params / 1e6:.1f}M parameters, {n_prototypes} prototypes of dim "
               f"{feat_dim}; teacher: {args.teacher}, epsilon {epsilon}")

    # ---- loss pairing, optimiser and per-iteration schedules
    pairs = view_pairs(n_teacher, n_global + args.local_crops_number, swapped=args.swapped or self_teacher)
    global_batch = args.batch_size_per_gpu * world_size
    peak_lr = args.lr * global_batch / 256
    if args.optimizer == "lars":
        optimizer = LARS([p for p in student.parameters() if p.requires_grad])
        warmup_start, min_lr = peak_lr / 16, peak_lr / 1000 if args.min_lr is None else args.min_lr
    else:
        optimizer = torch.optim.AdamW(common.param_groups(student), fused=device.type == "cuda")
        warmup_start, min_lr = 0.0, 1e-5 if args.min_lr is None else args.min_lr
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
    lr_schedule = common.cosine_schedule(peak_lr, min_lr, args.epochs, iters_per_epoch, args.warmup_epochs, warmup_start)
    wd_schedule = common.cosine_schedule(args.weight_decay, args.weight_decay_end, args.epochs, iters_per_epoch)
    queue_start = args.epoch_queue_starts * iters_per_epoch  # filled from then on, used once full
    queue_full = queue_start + math.ceil(args.queue_length / global_batch)

    def teacher_outputs_of(crops):
        with torch.no_grad():
            return teacher([c.to(teacher_dtype) for c in crops[:n_teacher]])

    def train_step(crops, it):
        """One optimisation step on a batch (list of crops, globals first); returns the loss, a 1-element tensor."""
        for i, group in enumerate(optimizer.param_groups):
            group["lr"] = lr_schedule[it]
            if i == 0:
                group["weight_decay"] = wd_schedule[it]
        torch.manual_seed(common.mix_seed(args.seed, rank, it))  # drop-path etc.: reproducible on resume
        if overlap:  # the teacher runs on a second stream, concurrently with the student's forward
            teacher_stream.wait_stream(torch.cuda.current_stream(device))
            with torch.cuda.stream(teacher_stream):
                teacher_out = teacher_outputs_of(crops)
        elif not self_teacher:
            teacher_out = teacher_outputs_of(crops)
        with torch.autocast(device.type, amp_dtype, enabled=precision != "fp32"):
            student_embeddings, student_scores = student_ddp(crops)
        if overlap:
            torch.cuda.current_stream(device).wait_stream(teacher_stream)
        with torch.no_grad():
            if self_teacher:  # baseline: codes from the student's own scores of the global crops
                n_codes = n_teacher * len(crops[0])
                code_embeddings, code_scores = student_embeddings[:n_codes], student_scores[:n_codes]
                prototypes = student.head.prototypes.weight
            else:
                code_embeddings, code_scores = teacher_out
                prototypes = teacher.head.prototypes.weight
            use_queue = queue is not None and it >= queue_full
            codes = torch.cat([teacher_codes(scores, epsilon, args.sinkhorn_iterations,
                                             queue.share(v) @ prototypes.float().t() if use_queue else None)
                               for v, scores in enumerate(code_scores.float().chunk(n_teacher))])
            if queue is not None and it >= queue_start:
                queue.push(code_embeddings)
        loss = loss_fn(student_scores, codes, pairs, args.student_temp)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        if args.clip_grad:
            scaler.unscale_(optimizer)
            nn.utils.clip_grad_norm_(student.parameters(), args.clip_grad)
        if own_prototypes and it < args.freeze_prototypes_niters:  # prototypes frozen for the first iterations
            student.head.prototypes.weight.grad = None
        scaler.step(optimizer)
        scaler.update()
        if own_prototypes:
            normalize_prototypes(student.head)
        return loss.detach()[None]

    if args.benchmark:  # a fixed synthetic batch on the device; FLOPs counted on an eager step
        crops = benchmark_batch(args, n_global, device, convnet)
        with torch.compiler.set_stance("force_eager"):
            flops_per_image = common.count_flops(lambda: train_step(crops, 0)) / args.batch_size_per_gpu
        steps = iter(range(10 ** 9))
        return common.benchmark(lambda: train_step(crops, next(steps) % iters_per_epoch), args.benchmark, 3,
                                global_batch, flops_per_image, device, amp_dtype,
                                f"RoB-SwAV {args.student} <- {args.teacher}, batch {args.batch_size_per_gpu}/GPU, "
                                f"{n_global}x{args.global_crops_size} + {args.local_crops_number}x{args.local_crops_size}"
                                + (", compiled" if args.compile else "") + (", teacher on a side stream" if overlap else ""))

    # ---- resume (output_dir/checkpoint.pth), then the loop
    start_step = 0
    ckpt = common.load_resume_checkpoint(output_dir, "rob_swav")
    if ckpt is not None:
        student.load_state_dict(ckpt["student"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scaler.load_state_dict(ckpt["scaler"])
        if queue is not None and "queue" in ckpt:
            queue.load_state_dict(ckpt["queue"])
        start_step = ckpt["step"]
        common.log(f"resumed from {output_dir / 'checkpoint.pth'} at step {start_step} (epoch {ckpt['epoch']})")

    def save_checkpoint(step, epoch):
        if not common.is_main_process():
            return
        state = dict(method="rob_swav", arch=arch, args=vars(args), step=step, epoch=epoch,
                     student=student.state_dict(), optimizer=optimizer.state_dict(), scaler=scaler.state_dict())
        if queue is not None:
            state.update(queue=queue.state_dict())
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


def benchmark_batch(args, n_global, device, convnet):
    """--benchmark: a fixed synthetic batch on the device, so that no data loading is timed."""
    b, g, l = args.batch_size_per_gpu, args.global_crops_size, args.local_crops_size
    crops = ([torch.randn(b, 3, g, g, device=device) for _ in range(n_global)]
             + [torch.randn(b, 3, l, l, device=device) for _ in range(args.local_crops_number)])
    return [c.contiguous(memory_format=torch.channels_last) for c in crops] if convnet else crops


if __name__ == "__main__":
    main(argparse.ArgumentParser("RoB-SwAV", parents=[get_args_parser()]).parse_args())
