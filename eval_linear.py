"""How good is this backbone? DINO's weighted k-NN, a linear probe and MSN's low-shot logistic regression on
frozen features, for students written by any rob_*.py and for the official DINO / iBOT / MSN / SwAV teachers.

Features are extracted once (across GPUs under torchrun; --features_cache keeps them): a ViT's CLS tokens of the last
--n_last_blocks blocks (DINO's linear-probe feature), a convnet's pool; k-NN and low-shot use the backbone output, as
DINO's and MSN's do. A summary is printed and a JSON line appended to output_dir/eval_log.txt. Runs with common.py.

    python eval_linear.py --checkpoint output/checkpoint.pth --data_path fashion-mnist --knn --linear --low_shot
    python eval_linear.py --checkpoint output/student_timm.pth --arch vit_tiny --patch_size 4 --img_size 32 --knn
    torchrun --nproc_per_node=8 eval_linear.py --checkpoint dino_vitbase16_pretrain_full_checkpoint.pth \
        --data_path /data/imagenet --knn --linear --linear_protocol dino --n_last_blocks 1 --avgpool_patchtokens
"""
import argparse, json, math, os, pathlib, sys, tempfile

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, Subset
from torchvision.transforms import v2 as T
from tqdm import tqdm

import common

FAST_LRS = [1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 0.1, 0.3]  # at batch 256, for standardised features
FAST_BATCH_SIZE = 1024  # the fast probe reads its features from memory: large batches cost nothing
HOLDOUT_FRACTION = 0.1  # of train, held out to choose the fast probe's lr (the test set chooses nothing)
LOW_SHOT = {"1_per_class": 1, "2_per_class": 2, "5_per_class": 5, "1_percent": 0.01}
L2_GRID = [1e-1, 1e-2, 1e-3, 1e-4, 1e-5, 1e-6]  # strongest first: a tie on a small split picks the simpler model
L2_FALLBACK = 1e-3  # for 1 image per class, where nothing can be held out (1-shot accuracy barely depends on it)
SYNTHETIC_SPLITS = (1000, 250)  # random images of 10 classes: a smoke test of the pipeline, chance accuracy
EXPECTED = ("a checkpoint.pth of a rob_*.py script, an exported student_timm.pth (with --arch), or an official "
            "DINO / iBOT / MSN / SwAV checkpoint")


def get_args_parser():
    parser = argparse.ArgumentParser("eval_linear", add_help=False)
    group = parser.add_argument_group("backbone")
    group.add_argument("--checkpoint", required=True, help=f"The backbone to evaluate: {EXPECTED}.")
    group.add_argument("--checkpoint_key", default=None, choices=["student", "teacher"], help="Network of a "
                       "checkpoint that holds two. Default: student for rob_*.py checkpoints (teacher: a baseline "
                       "run's EMA teacher), teacher for DINO / iBOT full checkpoints (as DINO's evaluation).")
    group.add_argument("--arch", default=None, help="Architecture of an exported student_timm.pth (a flat timm state "
                       "dict), as given to --student: vit_tiny, resnet18, ... or a timm name. Others record theirs.")
    group.add_argument("--patch_size", type=int, default=None, help="With --arch: the ViT's training patch size.")
    group.add_argument("--num_heads", type=int, default=None, help="Attention heads of an official ViT whose width "
                       "and recorded args.arch do not tell (e.g. 3 for the width-48 test fixtures).")
    group.add_argument("--n_last_blocks", type=int, default=4, help="ViT linear-probe feature: CLS tokens of the "
                       "last n blocks, concatenated. DINO: 4 for ViT-S/Tiny, 1 for ViT-B.")
    group.add_argument("--avgpool_patchtokens", action="store_true", help="Also concatenate the last block's mean "
                       "patch token to the linear-probe feature (DINO: on for ViT-B).")
    group = parser.add_argument_group("data")
    group.add_argument("--data_path", default="fashion-mnist", help="A folder with train/ and val/, each one sub-"
                       "folder of images per class (the labels); 'fashion-mnist' (its train / test split) or "
                       "'synthetic' (random images).")
    group.add_argument("--img_size", type=int, default=224, help="Evaluation resolution: Resize(img_size / 0.875) + "
                       "CenterCrop (Fashion-MNIST: resized whole). With --arch: also the training image size.")
    group.add_argument("--batch_size_per_gpu", type=int, default=128, help="Images per GPU: extraction, dino training.")
    group.add_argument("--num_workers", type=int, default=10, help="Data loader processes per GPU.")
    group.add_argument("--features_cache", default=None, help="File to save the extracted features to, or to load "
                       "them from if it exists (written by a run with the same checkpoint and feature settings).")
    group = parser.add_argument_group("evaluations")
    group.add_argument("--knn", action="store_true", help="DINO's weighted k-NN classifier.")
    group.add_argument("--nb_knn", type=int, nargs="+", default=[10, 20, 100, 200], help="k values (DINO: 20).")
    group.add_argument("--temperature", type=float, default=0.07, help="k-NN votes weigh exp(cosine / temperature).")
    group.add_argument("--linear", action="store_true", help="Linear classifier on the frozen features.")
    group.add_argument("--linear_protocol", default="fast", choices=["fast", "dino"], help="fast: one classifier per "
                       "--lr on the extracted features (standardised, batch 1024), the lr chosen on 10%% of train held "
                       "out. dino: DINO's protocol for paper comparisons: RandomResizedCrop + flip on the fly, SGD "
                       "momentum 0.9, no weight decay, cosine; the test accuracy of each --lr.")
    group.add_argument("--lr", type=float, nargs="+", default=None, help="Linear-probe learning rates at batch 256, "
                       f"scaled by batch / 256. Default: {' '.join(map(str, FAST_LRS))} (fast), 0.001 (dino, DINO's).")
    group.add_argument("--epochs", type=int, default=100, help="Linear-probe epochs (DINO: 100).")
    group.add_argument("--low_shot", action="store_true", help="MSN's low-shot logistic regression (1, 2, 5 images "
                       "per class, 1%% of labels).")
    group.add_argument("--low_shot_seeds", type=int, default=3, help="Random labelled subsets per low-shot setting.")
    group = parser.add_argument_group("misc")
    group.add_argument("--output_dir", default=".", help="eval_log.txt there gets one JSON line of results per run.")
    group.add_argument("--seed", type=int, default=0, help="Held-out split, low-shot subsets, augmentation.")
    return parser


# ------------------------------------------------------------------------------------------------ backbone
def load_backbone(path, arch=None, checkpoint_key=None, num_heads=None, patch_size=None, img_size=224):
    """The backbone to evaluate (a timm model in eval mode, no classifier) from any checkpoint this project writes
    or uses as a teacher, every tensor loaded strictly. Returns (model, description)."""
    ckpt = common.load_file(path)
    if not isinstance(ckpt, dict):
        raise common.UserError(f"{path} holds a {type(ckpt).__name__}, not a checkpoint dictionary: expected "
                               f"{EXPECTED}.")
    if "method" in ckpt or isinstance(ckpt.get("teacher"), dict):  # rob_*.py, or DINO / iBOT full checkpoint
        has_backbone = {k: any(n.startswith("backbone.") for n in common.strip_prefix(ckpt.get(k) or {}, "module."))
                        for k in ("student", "teacher")}
        key = checkpoint_key or ("student" if "method" in ckpt and has_backbone["student"] else "teacher")
        if not has_backbone[key]:
            other = "student" if key == "teacher" else "teacher"
            raise common.UserError(f"{path} holds no {key} backbone (of rob_*.py runs, only the baselines, e.g. "
                                   "--teacher ema, save a teacher)"
                                   + (f": use --checkpoint_key {other}." if has_backbone[other] else "."))
        sd = common.sub_state_dict(common.strip_prefix(ckpt[key], "module.", "_orig_mod."), "backbone.")
        if "method" in ckpt:  # its architecture is recorded
            if not isinstance(ckpt.get("arch"), dict):
                raise common.UserError(f"{path} is a {ckpt['method']}.py checkpoint without its 'arch' record: "
                                       "was it written by this project?")
            model = common.create_backbone(ckpt["arch"])
            common.load_strict(model, sd, path, f"{ckpt['method']}.py checkpoint, {key} backbone")
            shape = [f"{k} {v}" for k, v in ckpt["arch"]["kwargs"].items() if k in ("embed_dim", "depth", "patch_size")]
            return model.eval(), f"{ckpt['method']} {key} ({', '.join([ckpt['arch']['name'], *shape])})"
        kind, arch_name = f"DINO / iBOT full checkpoint, {key}", getattr(ckpt.get("args"), "arch", None)
    elif isinstance(ckpt.get("target_encoder"), dict):  # MSN: the encoder without its projection MLP (fc.*)
        sd = common.strip_prefix(ckpt["target_encoder"], "module.")
        sd, kind, arch_name = {k: v for k, v in sd.items() if not k.startswith("fc.")}, "MSN target encoder", None
    else:  # flat: DINO backbone-only, iBOT {'state_dict': ...}, SwAV, an exported student_timm.pth
        sd = common.strip_prefix(ckpt.get("state_dict", ckpt), "module.", "_orig_mod.")
        if arch is not None:  # a timm state dict of a known architecture: drop its classifier
            model, _, _ = common.student_backbone(arch, img_size, patch_size)
            classifier = model.pretrained_cfg.get("classifier", "head")
            classifier = tuple(f"{name}." for name in ([classifier] if isinstance(classifier, str) else classifier))
            sd = {k: v for k, v in sd.items() if not k.startswith(classifier)}
            common.load_strict(model, sd, path, f"timm {arch}: --arch, --patch_size, --img_size must match the "
                               "training run")
            return model.eval(), f"timm {arch}"
        if any(k in sd for k in ("head.weight", "fc.weight", "classifier.weight")):
            raise common.UserError(f"{path} looks like an exported student_timm.pth (a timm state dict with a "
                                   "classifier), "
                             "which does not record its architecture: pass --arch as given to --student in training "
                             "(and --patch_size / --img_size for a ViT trained on small images).")
        sd = {k: v for k, v in sd.items() if not k.startswith(("projection_head.", "prototypes."))}  # SwAV's head
        kind, arch_name = "flat backbone state dict", None
    try:
        model, _ = common.backbone_from_state_dict(sd, num_heads, arch_name)
    except (ValueError, KeyError, AttributeError, TypeError) as err:
        raise common.UserError(f"cannot read a backbone from {path} (taken as: {kind}): {err}. Its top-level keys: "
                         f"{', '.join(map(str, list(ckpt)[:8]))}. Expected {EXPECTED}.") from None
    common.load_strict(model, sd, path, kind)
    return model.eval(), f"{kind} ({type(model).__name__}, width {common.feature_dim(model)})"


def probe_dim(model, n_last_blocks, avgpool):
    return common.feature_dim(model) * ((n_last_blocks + avgpool) if common.is_vit(model) else 1)


@torch.no_grad()
def backbone_features(model, images, n_last_blocks, avgpool):
    """ViT: the CLS tokens of the last n blocks after the final norm, concatenated in depth order, plus (avgpool)
    the last block's mean patch token: DINO's linear-probe feature. Convnet: its pooled output."""
    if not common.is_vit(model):
        return model(images)
    blocks = model.forward_intermediates(images, indices=n_last_blocks, norm=True, output_fmt="NLC",
                                         intermediates_only=True, return_prefix_tokens=True)
    features = [prefix[:, 0] for _, prefix in blocks]  # blocks: [(patch tokens [B, L, D], prefix [B, 1, D])]
    if avgpool:
        features.append(blocks[-1][0].mean(dim=1))
    return torch.cat(features, dim=-1)


# ---------------------------------------------------------------------------------------------- features
def build_split(data_path, train, transform, img_size, seed=0):
    """One split as a dataset of (image tensor, label); `.base.classes` names its classes."""
    if data_path == "fashion-mnist":
        base = common.FashionMNIST(train)
    elif data_path == "synthetic":  # train and test hold different random images
        n_train, n_test = SYNTHETIC_SPLITS
        full = common.SyntheticDataset([(3, img_size, img_size)], length=n_train + n_test, num_classes=10)
        base = Subset(full, range(n_train) if train else range(n_train, n_train + n_test))
        base.classes = [str(c) for c in range(10)]
    else:
        folder = os.path.join(data_path, "train" if train else "val")
        if not os.path.isdir(folder):
            raise common.MissingFileError(f"--data_path {data_path} has no {os.path.basename(folder)}/ folder: give "
                                          "a folder with train/ and val/, each one sub-folder of images per class, "
                                          "'fashion-mnist' or 'synthetic'.")
        base = common.build_dataset(folder, labels=True)
    return common.AugmentedDataset(base, transform, seed)


@torch.no_grad()
def extract_features(model, dataset, args, device, desc):
    """(features [N, dim], labels [N]) of every image, in dataset order, on rank 0 (None elsewhere). Batch b
    (images b*B to b*B+B-1) runs on rank b % world_size: each process computes exactly the batches a single
    process would (same images, same batch sizes, so the same numbers), and one all_gather per step keeps order."""
    rank, world_size, size, n = common.get_rank(), common.get_world_size(), args.batch_size_per_gpu, len(dataset)
    n_batches, dim = math.ceil(n / size), probe_dim(model, args.n_last_blocks, args.avgpool_patchtokens)
    my_batches = [range(b * size, min(n, (b + 1) * size)) for b in range(rank, n_batches, world_size)]
    loader = iter(DataLoader(dataset, batch_sampler=my_batches, num_workers=args.num_workers))
    gathered = torch.zeros(n, dim + 1) if rank == 0 else None
    for step in tqdm(range(math.ceil(n_batches / world_size)), desc=desc, disable=rank != 0, dynamic_ncols=True):
        batch = torch.zeros(size, dim + 1, device=device)  # padded: every rank sends the same shape
        if step * world_size + rank < n_batches:
            images, targets = next(loader)
            out = backbone_features(model, images.to(device), args.n_last_blocks, args.avgpool_patchtokens)
            # the labels ride along as a last column (float32 holds integers up to 2^24 exactly)
            batch[:len(out)] = torch.cat([out.float(), targets.to(device, torch.float32)[:, None]], dim=1)
        parts = [torch.empty_like(batch) for _ in range(world_size)] if world_size > 1 else [batch]
        if world_size > 1:
            dist.all_gather(parts, batch)
        for r, part in enumerate(parts):  # part r holds batch step * world_size + r
            start = (step * world_size + r) * size
            if rank == 0 and start < n:
                gathered[start:start + size] = part[:n - start].cpu()
    return (gathered[:, :-1].contiguous(), gathered[:, -1].long()) if rank == 0 else (None, None)


def load_or_extract_features(model, splits, args, device):
    """{"train": (features, labels), "test": (...)} on the device of rank 0 (None elsewhere): read from
    --features_cache if it exists, else extracted by all processes (and saved to --features_cache if given)."""
    settings = dict(checkpoint=os.path.abspath(args.checkpoint), checkpoint_key=args.checkpoint_key, arch=args.arch,
                    data_path=args.data_path, img_size=args.img_size, n_last_blocks=args.n_last_blocks,
                    avgpool_patchtokens=args.avgpool_patchtokens)
    cached = args.features_cache and os.path.isfile(args.features_cache)
    features = None if cached else {name: extract_features(model, split, args, device, f"{name} features")
                                    for name, split in zip(("train", "test"), splits)}
    if not common.get_rank() == 0:
        return None
    if cached:
        features = common.load_file(args.features_cache, "features cache")
        if not isinstance(features, dict) or features.pop("settings", None) != settings:
            raise common.UserError(f"{args.features_cache} was not extracted with these settings ({settings}): "
                                   "delete it or choose another --features_cache.")
    elif args.features_cache:
        pathlib.Path(args.features_cache).parent.mkdir(parents=True, exist_ok=True)
        common.save_atomic({**features, "settings": settings}, args.features_cache)
    return {name: (x.to(device), y.to(device)) for name, (x, y) in features.items()}


# --------------------------------------------------------------------------------------------------- k-NN
def topk_hits(scores, labels):
    """Top-1 and top-5 hits of class scores [N, C] against labels [N], as a tensor of two counts."""
    top = scores.topk(min(5, scores.shape[1]), dim=1).indices == labels[:, None]
    return torch.stack([top[:, 0].sum(), top.any(dim=1).sum()])


@torch.no_grad()
def knn_classifier(train_features, train_labels, test_features, test_labels, ks, temperature, num_classes, chunk=1024):
    """DINO's weighted k-NN: cosine similarity of L2-normalised features; each of the k most similar training
    images votes for its class with weight exp(similarity / temperature). Returns {k: (top-1 %, top-5 %)}."""
    train_features = F.normalize(train_features, dim=1)
    hits = {k: 0 for k in ks}
    for start in range(0, len(test_labels), chunk):  # chunks bound the [chunk, N_train] similarity matrix
        similarity = F.normalize(test_features[start:start + chunk], dim=1) @ train_features.T
        top_similarity, top_index = similarity.topk(max(ks), dim=1)  # sorted: the first k are the k nearest
        for k in ks:
            weights = (top_similarity[:, :k] / temperature).exp()
            scores = torch.zeros(len(weights), num_classes, device=weights.device)
            scores.scatter_add_(1, train_labels[top_index[:, :k]], weights)
            hits[k] = hits[k] + topk_hits(scores, test_labels[start:start + chunk])
    return {k: tuple(100 * h / len(test_labels) for h in hits[k].tolist()) for k in ks}


# ------------------------------------------------------------------------------------------------- linear
class LinearProbes(nn.Module):
    """One linear classifier per learning rate, all trained by one pass over the data (DINO's init: N(0, 0.01), 0)."""

    def __init__(self, dim, num_classes, n, generator):
        super().__init__()
        self.linears = nn.ModuleList(nn.Linear(dim, num_classes) for _ in range(n))
        for linear in self.linears:  # from --seed alone, not from whatever the global RNG holds
            nn.init.normal_(linear.weight, std=0.01, generator=generator)
            nn.init.zeros_(linear.bias)

    def forward(self, features):
        return torch.stack([linear(features) for linear in self.linears])  # [n_lrs, B, classes]

    def optimizer(self, lrs, batch_size):
        """SGD momentum 0.9, no weight decay, one group per classifier with base lr * batch / 256 (DINO's scaling);
        probe_step sets each group's lr from it."""
        return torch.optim.SGD([dict(params=linear.parameters(), base_lr=lr * batch_size / 256)
                                for linear, lr in zip(self.linears, lrs)], lr=0.0, momentum=0.9, weight_decay=0.0)


def probe_step(probes, optimizer, features, labels, lr_factor):
    for group in optimizer.param_groups:
        group["lr"] = group["base_lr"] * lr_factor
    loss = sum(F.cross_entropy(logits, labels) for logits in probes(features))  # each term reaches one classifier
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()


@torch.no_grad()
def cosine(steps):
    """The linear probes' lr factor at each step: cosine from 1 to 0, as DINO's."""
    return (0.5 * (1 + torch.cos(math.pi * torch.arange(steps, dtype=torch.float64) / steps))).tolist()


def probe_accuracies(probes, features, labels, chunk=8192):
    """[(top-1 %, top-5 %)] of each classifier."""
    hits = sum(torch.stack([topk_hits(logits, labels[i:i + chunk]) for logits in probes(features[i:i + chunk])])
               for i in range(0, len(labels), chunk))
    return [tuple(100 * h / len(labels) for h in row) for row in hits.tolist()]


def linear_probe(train_features, train_labels, test_features, test_labels, num_classes, lrs, epochs, seed=0):
    """The fast protocol: one classifier per lr, trained together on the extracted features with a cosine schedule;
    the lr with the best top-1 on 10% of train held out is chosen and its classifier's test accuracy reported."""
    device, generator = train_features.device, torch.Generator().manual_seed(seed)
    order = torch.randperm(len(train_labels), generator=generator).to(device)
    n_held = max(1, int(HOLDOUT_FRACTION * len(order)))
    held, fit = order[:n_held], order[n_held:]
    # standardised with the fitting images' statistics: one lr grid then suits any backbone's feature scale
    mean, std = train_features[fit].mean(0), train_features[fit].std(0).clamp_min(1e-6)
    fit_x, held_x, test_x = ((x - mean) / std for x in (train_features[fit], train_features[held], test_features))
    fit_y = train_labels[fit]
    probes = LinearProbes(train_features.shape[1], num_classes, len(lrs), generator).to(device)
    optimizer = probes.optimizer(lrs, FAST_BATCH_SIZE)
    steps_per_epoch = math.ceil(len(fit) / FAST_BATCH_SIZE)
    schedule = cosine(epochs * steps_per_epoch)
    for epoch in tqdm(range(epochs), desc="linear probe", dynamic_ncols=True):
        perm = torch.randperm(len(fit), generator=generator).to(device)
        for i in range(steps_per_epoch):
            batch = perm[i * FAST_BATCH_SIZE:(i + 1) * FAST_BATCH_SIZE]
            probe_step(probes, optimizer, fit_x[batch], fit_y[batch], schedule[epoch * steps_per_epoch + i])
    held_top1 = [top1 for top1, _ in probe_accuracies(probes, held_x, train_labels[held])]
    best = held_top1.index(max(held_top1))
    top1, top5 = probe_accuracies(probes, test_x, test_labels)[best]
    return dict(protocol="fast", lr=lrs[best], holdout_top1=held_top1[best], top1=top1, top5=top5,
                holdout_top1_per_lr={str(lr): acc for lr, acc in zip(lrs, held_top1)})


def dino_linear(model, args, num_classes, device, features):
    """DINO's protocol, on every process: RandomResizedCrop + flip on the fly through the frozen backbone, global batch
    batch_size_per_gpu x processes. Reports each lr's final test accuracy (no selection: give the lr you publish)."""
    augment = T.Compose([T.RandomResizedCrop(args.img_size), T.RandomHorizontalFlip(), T.ToImage(),
                         T.ToDtype(torch.float32, scale=True), T.Normalize(common.IMAGENET_MEAN, common.IMAGENET_STD)])
    dataset = build_split(args.data_path, True, augment, args.img_size, args.seed)
    loader, sampler = common.build_loader(dataset, args.batch_size_per_gpu, args.num_workers, args.seed)
    lrs, dim = args.lr or [0.001], probe_dim(model, args.n_last_blocks, args.avgpool_patchtokens)
    probes = LinearProbes(dim, num_classes, len(lrs), torch.Generator().manual_seed(args.seed)).to(device)
    optimizer = probes.optimizer(lrs, args.batch_size_per_gpu * common.get_world_size())
    trained = nn.parallel.DistributedDataParallel(
        probes, device_ids=[device.index] if device.type == "cuda" else None) if common.get_world_size() > 1 else probes
    schedule = cosine(args.epochs * len(loader))
    for epoch in range(args.epochs):
        sampler.set_epoch(epoch)
        for i, (images, labels) in enumerate(tqdm(loader, desc=f"linear epoch {epoch}", dynamic_ncols=True,
                                                  disable=not common.get_rank() == 0)):
            batch_features = backbone_features(model, images.to(device), args.n_last_blocks, args.avgpool_patchtokens)
            probe_step(trained, optimizer, batch_features, labels.to(device), schedule[epoch * len(loader) + i])
    if not common.get_rank() == 0:
        return None
    accuracies = probe_accuracies(probes, *features["test"])
    return dict(protocol="dino", epochs=args.epochs, top1_per_lr={str(lr): a[0] for lr, a in zip(lrs, accuracies)},
                top5_per_lr={str(lr): a[1] for lr, a in zip(lrs, accuracies)})


# ----------------------------------------------------------------------------------------------- low-shot
def logistic_top1(train_x, train_y, test_x, test_y, num_classes, l2, max_iter=200):
    """Test top-1 (%) of a multinomial logistic regression without intercept (as MSN's), fitted by full-batch
    L-BFGS on mean cross-entropy + l2 / 2 * ||W||^2: strictly convex, so no lr, schedule or seed to tune."""
    weights = torch.zeros(train_x.shape[1], num_classes, device=train_x.device, requires_grad=True)
    optimizer = torch.optim.LBFGS([weights], lr=1, max_iter=max_iter, history_size=10, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        loss = F.cross_entropy(train_x @ weights, train_y) + l2 / 2 * weights.square().sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    return 100 * topk_hits(test_x @ weights.detach(), test_y)[0].item() / len(test_y)


def low_shot(train_features, train_labels, test_features, test_labels, num_classes, seeds, seed=0):
    """MSN's low-shot protocol: logistic regression on 1, 2, 5 random images per class and 1% of each class, several
    random subsets each; features centred on the labelled images' mean and L2-normalised. The L2 strength is chosen
    on the labelled subset: a quarter of each class (at least one image) is held out, the rest fitted with every
    L2_GRID value, the best refitted on all (1 image per class: L2_FALLBACK). Returns {setting: {mean, std, ...}}."""
    results = {}
    for setting, amount in LOW_SHOT.items():
        runs, l2s = [], []
        for run in range(seeds):
            generator = torch.Generator().manual_seed(common.mix_seed(seed, run))
            per_class = []
            for c in range(num_classes):
                images = (train_labels == c).nonzero().flatten()
                take = amount if isinstance(amount, int) else max(1, round(amount * len(images)))
                per_class.append(images[torch.randperm(len(images), generator=generator)[:take].to(images.device)])
            labelled = torch.cat(per_class)
            mean = train_features[labelled].mean(0)
            x, test_x = F.normalize(train_features - mean, dim=1), F.normalize(test_features - mean, dim=1)
            l2 = L2_FALLBACK
            if min(len(images) for images in per_class) >= 2:
                held = torch.cat([images[:max(1, len(images) // 4)] for images in per_class])
                fit = torch.cat([images[max(1, len(images) // 4):] for images in per_class])
                held_top1 = [logistic_top1(x[fit], train_labels[fit], x[held], train_labels[held], num_classes, l2)
                             for l2 in L2_GRID]
                l2 = L2_GRID[held_top1.index(max(held_top1))]
            runs.append(logistic_top1(x[labelled], train_labels[labelled], test_x, test_labels, num_classes, l2))
            l2s.append(l2)
        std = torch.tensor(runs).std().item() if len(runs) > 1 else 0.0
        results[setting] = dict(mean=sum(runs) / len(runs), std=std, runs=runs, l2=l2s)
    return results


# ------------------------------------------------------------------------------------------------- main
def check_args(args):
    if not (args.knn or args.linear or args.low_shot or args.features_cache):
        raise common.UserError("nothing to do: pass --knn, --linear and/or --low_shot (or --features_cache to "
                               "extract only)")
    for name in ("img_size", "batch_size_per_gpu", "temperature", "epochs", "low_shot_seeds", "n_last_blocks",
                 "nb_knn", "lr", "num_workers", "patch_size", "num_heads"):  # every numeric flag but --seed
        values = getattr(args, name) if isinstance(getattr(args, name), list) else [getattr(args, name)]
        if not all(v is None or v > 0 or (v == 0 and name == "num_workers") for v in values):
            rule = ">= 0" if name == "num_workers" else "> 0"
            raise common.UserError(f"--{name} {' '.join(map(str, values))}: must be {rule}")
    if common.get_rank() == 0:  # the results are written there: a bad folder fails now, not after the evaluation
        try:
            pathlib.Path(args.output_dir).mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryFile(dir=args.output_dir) as probe:  # a full disk fails here too
                probe.write(bytes(4096))
                probe.flush()
                os.fsync(probe.fileno())
        except OSError as err:
            raise common.UserError(f"cannot write eval_log.txt in --output_dir {args.output_dir} ({err.strerror})") \
                from None


def main(args):
    device, rank = common.init_distributed(), common.get_rank()
    check_args(args)
    model, description = load_backbone(args.checkpoint, args.arch, args.checkpoint_key, args.num_heads,
                                       args.patch_size, args.img_size)
    model = model.to(device).requires_grad_(False)
    patch = model.patch_embed.patch_size[0] if common.is_vit(model) else 1
    if args.img_size % patch:
        raise common.UserError(f"--img_size {args.img_size} is not a multiple of the ViT's patch size {patch}")
    if common.is_vit(model) and args.n_last_blocks > len(model.blocks):
        raise common.UserError(f"--n_last_blocks {args.n_last_blocks} exceeds the backbone's {len(model.blocks)} "
                               "blocks.")
    resize = args.img_size if args.data_path == "fashion-mnist" else None  # 28 px images: resized whole, no crop
    transform = common.eval_transform(args.img_size, resize=resize)
    splits = [build_split(args.data_path, train, transform, args.img_size) for train in (True, False)]
    if splits[0].base.classes != splits[1].base.classes:
        raise common.UserError(f"{args.data_path}: train/ and val/ must have the same class sub-folders.")
    num_classes = len(splits[0].base.classes)
    features = load_or_extract_features(model, splits, args, device)

    # ---- evaluations: DINO's linear protocol trains on every process, the rest runs on rank 0
    dino = dino_linear(model, args, num_classes, device, features) if args.linear and args.linear_protocol == "dino" \
        else None
    if rank != 0:
        return None
    (train_x, train_y), (test_x, test_y) = features["train"], features["test"]
    width = common.feature_dim(model)  # k-NN and low-shot use the backbone output: a ViT's last-block CLS
    output = slice((args.n_last_blocks - 1) * width, args.n_last_blocks * width) if common.is_vit(model) \
        else slice(None)
    results = dict(checkpoint=args.checkpoint, backbone=description, data_path=args.data_path, img_size=args.img_size)
    if args.knn:
        if max(args.nb_knn) > len(train_y):
            raise common.UserError(f"--nb_knn {max(args.nb_knn)} exceeds the {len(train_y)} training images: lower it.")
        knn = knn_classifier(train_x[:, output], train_y, test_x[:, output], test_y, args.nb_knn, args.temperature,
                             num_classes)
        results["knn"] = {str(k): dict(top1=top1, top5=top5) for k, (top1, top5) in knn.items()}
    if args.linear:
        results["linear"] = dino or linear_probe(train_x, train_y, test_x, test_y, num_classes, args.lr or FAST_LRS,
                                                 args.epochs, args.seed)
    if args.low_shot:
        results["low_shot"] = low_shot(train_x[:, output], train_y, test_x[:, output], test_y, num_classes,
                                       args.low_shot_seeds, args.seed)

    # ---- report: a summary to read, one JSON line to keep
    common.log(f"{description} on {args.data_path}: {len(train_y)} train / {len(test_y)} test images")
    if "knn" in results:
        common.log(f"  k-NN (T={args.temperature}) top-1 / top-5: "
                   + ", ".join(f"k={k} {r['top1']:.2f} / {r['top5']:.2f}" for k, r in results["knn"].items()))
    linear = results.get("linear", {})
    if linear.get("protocol") == "fast":
        common.log(f"  linear (fast): lr {linear['lr']} chosen on held-out train: test top-1 {linear['top1']:.2f}")
    for lr, top1 in linear.get("top1_per_lr", {}).items():
        common.log(f"  linear (dino, {args.epochs} epochs) lr {lr}: test top-1 {top1:.2f}")
    if "low_shot" in results:
        common.log("  low-shot top-1: " + ", ".join(f"{setting} {r['mean']:.2f} ± {r['std']:.2f}"
                                                    for setting, r in results["low_shot"].items()))
    print(json.dumps(results), flush=True)  # before anything can fail to be written
    try:
        with open(pathlib.Path(args.output_dir) / "eval_log.txt", "a") as f:
            f.write(json.dumps(results) + "\n")
    except OSError as err:
        raise common.UserError(f"cannot write eval_log.txt in --output_dir {args.output_dir} ({err.strerror}); the "
                               "results are the JSON line above") from None
    return results


if __name__ == "__main__":
    code = 0  # exit codes: 0 done, 2 a user error (one line; ROB_DEBUG=1 shows the traceback)
    args = argparse.ArgumentParser("eval_linear", parents=[get_args_parser()]).parse_args()
    created = not os.path.exists(args.output_dir)
    try:
        main(args)
    except common.UserError as err:
        if os.environ.get("ROB_DEBUG"):
            raise
        print(f"eval_linear.py: error: {err}", file=sys.stderr, flush=True)
        code = 2
        if created and common.get_rank() == 0 and os.path.isdir(args.output_dir) and not os.listdir(args.output_dir):
            os.rmdir(args.output_dir)  # made by check_args, nothing written
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    sys.exit(code)
