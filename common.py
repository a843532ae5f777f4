"""What no method owns, shared by rob_dino.py, rob_ibot.py, rob_msn.py, rob_swav.py and eval_linear.py:
distributed set-up, data (datasets, the multi-crop augmentation, the resumable loader), model builders and
checkpoint I/O, with the errors a user can fix. A method's head, loss, pairing, schedules and training step live
in that method's file; the run machinery of the training loops in training.py; --gpu_augment's batched
augmentation in gpu_augment.py."""
import argparse
import atexit
import errno
import gzip
import hashlib
import io
import math
import multiprocessing
import os
import random
import signal
import warnings
from pathlib import Path

import timm
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image, ImageFilter
from torch.utils.data import DataLoader, Dataset, DistributedSampler
from torchvision import datasets
from torchvision.transforms import v2 as T

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


# ------------------------------------------------------------------------------------------------- errors
class UserError(ValueError):
    """Something the user controls is wrong (a flag, a path, a file): reported as one line that names the fix."""


class MissingFileError(UserError, FileNotFoundError):
    pass


class UnreadableFileError(UserError, RuntimeError):
    pass


# ------------------------------------------------------------------------------------------- distributed
def init_distributed():
    """Join the process group when launched by torchrun (RANK/WORLD_SIZE/LOCAL_RANK/MASTER_ADDR set, one or
    many nodes), else run as a single process. NCCL on GPU, gloo on CPU. Returns (rank, world_size, device)."""
    cuda = torch.cuda.is_available()
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return 0, 1, torch.device("cuda" if cuda else "cpu")
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo", rank=rank, world_size=world_size)
    return rank, world_size, device


def get_rank():
    return dist.get_rank() if dist.is_initialized() else 0


def get_world_size():
    return dist.get_world_size() if dist.is_initialized() else 1


def is_main_process():
    return get_rank() == 0


def log(*args):
    """print() on rank 0 only (the other ranks stay quiet without touching builtins.print)."""
    if is_main_process():
        print(*args, flush=True)


def all_reduce_mean(tensor):
    """Mean of a tensor over all processes (identity in a single process)."""
    if dist.is_initialized():
        tensor = tensor.clone()
        dist.all_reduce(tensor)
        tensor /= dist.get_world_size()
    return tensor


def mix_seed(*keys):
    """A stable 63-bit seed from integers: the same keys give the same seed in every process and every run."""
    digest = hashlib.blake2b(repr(tuple(int(k) for k in keys)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def seed_everything(seed):
    """Seed torch (CPU and CUDA) and Python's random module."""
    torch.manual_seed(seed)
    random.seed(seed)


# ------------------------------------------------------------------------------------------------- data
class RandomGaussianBlur:
    """PIL Gaussian blur with a radius drawn uniformly in `radius`, applied with probability p (torch RNG)."""

    def __init__(self, p, radius=(0.1, 2.0)):
        self.p, self.radius = p, radius

    def __call__(self, img):
        if self.p <= 0 or torch.rand(()) >= self.p:
            return img
        return img.filter(ImageFilter.GaussianBlur(radius=float(torch.empty(()).uniform_(*self.radius))))


class MultiCropAugmentation:
    """Multi-crop augmentation (DINO, iBOT, MSN and SwAV recipes): `global_crops_number` large crops and
    `local_crops_number` small ones of one image, each with random-resized crop, flip, colour jitter,
    grayscale, Gaussian blur and solarisation. Blur and solarise probabilities are given per crop kind as
    (first global, other globals, locals). Returns a list of normalised float tensors, globals first.
    `batch()` is the same on a batch of images at once (gpu_augment.py)."""

    def __init__(self, global_crops_size=224, local_crops_size=96, global_crops_number=2, local_crops_number=8,
                 global_crops_scale=(0.25, 1.0), local_crops_scale=(0.05, 0.25), color_jitter=(0.4, 0.4, 0.2, 0.1),
                 color_jitter_p=0.8, grayscale_p=0.2, blur_p=(1.0, 0.1, 0.5), solarize_p=(0.0, 0.2, 0.0),
                 interpolation="bicubic", mean=IMAGENET_MEAN, std=IMAGENET_STD):
        self.global_crops_size, self.local_crops_size = global_crops_size, local_crops_size
        self.global_crops_number, self.local_crops_number = global_crops_number, local_crops_number
        self.global_crops_scale, self.local_crops_scale = global_crops_scale, local_crops_scale
        self.color_jitter, self.color_jitter_p, self.grayscale_p = color_jitter, color_jitter_p, grayscale_p
        self.blur_p, self.solarize_p, self.mean, self.std = blur_p, solarize_p, mean, std
        self.interpolation = interpolation
        interp = T.InterpolationMode(interpolation)

        def crop_pipeline(size, scale, blur, solarize):
            steps = [T.RandomResizedCrop(size, scale=scale, interpolation=interp), T.RandomHorizontalFlip(),
                     T.RandomApply([T.ColorJitter(*color_jitter)], p=color_jitter_p), T.RandomGrayscale(grayscale_p),
                     RandomGaussianBlur(blur)]
            if solarize > 0:
                steps.append(T.RandomSolarize(threshold=128, p=solarize))
            steps += [T.ToImage(), T.ToDtype(torch.float32, scale=True), T.Normalize(mean, std)]
            return T.Compose(steps)

        self.global_transforms = [crop_pipeline(global_crops_size, global_crops_scale, blur_p[min(i, 1)],
                                                solarize_p[min(i, 1)]) for i in range(global_crops_number)]
        self.local_transform = crop_pipeline(local_crops_size, local_crops_scale, blur_p[2], solarize_p[2])

    @property
    def crop_shapes(self):
        return ([(3, self.global_crops_size, self.global_crops_size)] * self.global_crops_number
                + [(3, self.local_crops_size, self.local_crops_size)] * self.local_crops_number)

    def __call__(self, img):
        return ([t(img) for t in self.global_transforms]
                + [self.local_transform(img) for _ in range(self.local_crops_number)])

    def batch(self, images, generator=None):
        import gpu_augment
        return gpu_augment.multi_crop(self, images, generator)


def eval_transform(size=224, resize=None, mean=IMAGENET_MEAN, std=IMAGENET_STD):
    """Resize (default size / 0.875, i.e. 256 for 224) + centre crop + normalise: the evaluation protocol."""
    resize = resize or int(round(size / 0.875))
    return T.Compose([T.Resize(resize, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(size),
                      T.ToImage(), T.ToDtype(torch.float32, scale=True), T.Normalize(mean, std)])


def to_device(tensor, device):
    """Host-to-device copy that does not wait for the GPU (pinned, asynchronous)."""
    return tensor.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else tensor


FASHION_MNIST_DIRS = [os.environ.get("FASHION_MNIST_DIR", ""), "/usr/share/datasets/fashion-mnist",
                      os.path.expanduser("~/.cache/rob/FashionMNIST/raw")]


def _read_idx(path):
    """An IDX file (the MNIST format, optionally gzipped) as a uint8 tensor."""
    with (gzip.open(path) if path.suffix == ".gz" else open(path, "rb")) as f:
        data = f.read()
    ndim = data[3]
    shape = [int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    return torch.frombuffer(bytearray(data[4 + 4 * ndim:]), dtype=torch.uint8).reshape(shape)


def load_fashion_mnist(train=True):
    """Fashion-MNIST as (images uint8 [N, 28, 28], labels int64 [N]). Looks in $FASHION_MNIST_DIR, Debian's
    dataset-fashion-mnist package and ~/.cache/rob, then downloads with torchvision."""
    split = "train" if train else "t10k"
    for folder in filter(None, FASHION_MNIST_DIRS):
        for suffix in (".gz", ""):
            images = Path(folder) / f"{split}-images-idx3-ubyte{suffix}"
            labels = Path(folder) / f"{split}-labels-idx1-ubyte{suffix}"
            if images.is_file() and labels.is_file():
                return _read_idx(images), _read_idx(labels).long()
    try:
        datasets.FashionMNIST(os.path.expanduser("~/.cache/rob"), train=train, download=True)
    except Exception as err:
        raise MissingFileError("Fashion-MNIST not found and the download failed. Install it with `apt-get install "
                               "dataset-fashion-mnist`, or set FASHION_MNIST_DIR to a folder with the four "
                               f"*-ubyte(.gz) files. ({err})") from err
    return load_fashion_mnist(train)


class FashionMNIST(Dataset):
    """Fashion-MNIST as 28x28 RGB PIL images (grayscale copied to 3 channels) with labels; `raw`: as uint8
    [1, 28, 28] tensors, for --gpu_augment."""

    def __init__(self, train=True, raw=False):
        self.images, self.targets = load_fashion_mnist(train)
        self.raw = raw
        self.classes = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker",
                        "Bag", "Ankle boot"]

    def __len__(self):
        return len(self.targets)

    def __getitem__(self, index):
        if self.raw:
            return self.images[index][None], int(self.targets[index])
        return Image.fromarray(self.images[index].numpy(), mode="L").convert("RGB"), int(self.targets[index])


class SyntheticDataset(Dataset):
    """Random tensors of the given shapes, no I/O and no augmentation: a benchmark of everything but data.
    Returns (list of crops, label) for several shapes, (tensor, label) for one; `raw`: uint8 images."""

    def __init__(self, shapes, length=100_000, num_classes=1000, raw=False):
        self.shapes, self.length, self.num_classes, self.raw = [tuple(s) for s in shapes], length, num_classes, raw

    def __len__(self):
        return self.length

    def __getitem__(self, key):
        index = key[1] if isinstance(key, tuple) else key
        gen = torch.Generator().manual_seed(index)
        crops = [torch.randint(0, 256, shape, generator=gen, dtype=torch.uint8) if self.raw
                 else torch.randn(shape, generator=gen) for shape in self.shapes]
        return (crops if len(crops) > 1 else crops[0]), index % self.num_classes


def build_dataset(data_path, train=True, synthetic_shapes=((3, 224, 224),), raw=False):
    """`data_path` is an ImageFolder directory (class sub-folders of images), 'fashion-mnist' or 'synthetic'.
    Returns a dataset of (PIL image, label), or of random tensors for 'synthetic'. `raw` (--gpu_augment):
    uint8 image tensors instead, JPEG files as undecoded bytes (gpu_augment.read_encoded)."""
    if data_path == "fashion-mnist":
        return FashionMNIST(train, raw)
    if data_path == "synthetic":
        return SyntheticDataset([(3, 256, 256)] if raw else synthetic_shapes, raw=raw)
    if not os.path.isdir(data_path):
        raise MissingFileError(f"--data_path {data_path} is not a folder. Give an ImageFolder directory "
                               "(one sub-folder of images per class), 'fashion-mnist' or 'synthetic'.")
    try:
        if raw:
            import gpu_augment
            return datasets.ImageFolder(data_path, loader=gpu_augment.read_encoded)
        return datasets.ImageFolder(data_path)
    except FileNotFoundError as err:
        raise MissingFileError(f"--data_path {data_path} holds no images: an ImageFolder needs one sub-folder "
                               f"per class with .jpg/.png/... files inside. ({err})") from None


def random_subset(dataset, size, seed=0):
    """A seeded random subset of `size` images (--subset, for quick experiments); the data set itself for 0."""
    if not size:
        return dataset
    if size > len(dataset):
        raise UserError(f"--subset {size} exceeds the {len(dataset)} images of the data set.")
    indices = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed))[:size]
    return torch.utils.data.Subset(dataset, sorted(indices.tolist()))


class AugmentedDataset(Dataset):
    """Applies `transform` to each (image, label) of `base`. Indexed by (epoch, index) keys (see
    ResumableSampler): the random state of each sample's augmentation is seeded from (seed, epoch, index), so
    the crops do not depend on the number of workers or processes and a resumed run sees the same crops. An
    unreadable image is skipped with a warning (the next one is used instead) and marked in `unreadable`, a
    flag per image shared with the loader workers: `num_skipped` counts images, not attempts. With
    `return_index`, samples are (crops, index of the image used) instead of (crops, label)."""

    max_skips = 50

    def __init__(self, base, transform, seed=0, return_index=False):
        self.base, self.transform, self.seed, self.return_index = base, transform, seed, return_index
        self.unreadable = torch.zeros(len(base), dtype=torch.bool).share_memory_()

    @property
    def num_skipped(self):
        return int(self.unreadable.sum())

    def __len__(self):
        return len(self.base)

    def __getitem__(self, key):
        epoch, index = key if isinstance(key, tuple) else (0, key)
        for attempt in range(self.max_skips):
            i = (index + attempt) % len(self.base)
            try:
                image, label = self.base[i]
                break
            except Exception as err:  # a corrupt, truncated or vanished file must not kill a long job
                path = self.base.samples[i][0] if hasattr(self.base, "samples") else f"#{i}"
                warnings.warn(f"skipping unreadable image {path}: {err}")
                self.unreadable[i] = True
        else:
            raise UnreadableFileError(f"{self.max_skips} unreadable images in a row from image {index}: is the "
                                      "dataset intact?")
        tag = i if self.return_index else label
        if self.transform is None or not isinstance(image, Image.Image):
            return image, tag
        seed = mix_seed(self.seed, epoch, index)
        torch.manual_seed(seed)
        random.seed(seed)
        return self.transform(image), tag


class ResumableSampler(DistributedSampler):
    """DistributedSampler (shuffled, equal shards, drop_last) that yields (epoch, index) keys and can start an
    epoch at a given batch, to resume a run exactly where it stopped."""

    def __init__(self, dataset, batch_size, seed=0):
        super().__init__(dataset, num_replicas=get_world_size(), rank=get_rank(), shuffle=True, seed=seed,
                         drop_last=True)
        self.batch_size, self.start_batch = batch_size, 0

    def set_epoch(self, epoch, start_batch=0):
        super().set_epoch(epoch)
        self.start_batch = start_batch

    def __iter__(self):
        indices = list(super().__iter__())[self.start_batch * self.batch_size:]
        return iter([(self.epoch, i) for i in indices])

    def __len__(self):
        return super().__len__() - self.start_batch * self.batch_size


def build_loader(dataset, batch_size, num_workers, seed=0, collate_fn=None):
    """Training loader: ResumableSampler over the processes, pinned memory on GPU, persistent workers,
    incomplete last batch dropped. Returns (loader, sampler)."""
    sampler = ResumableSampler(dataset, batch_size, seed)
    if len(sampler) < batch_size:
        raise UserError(f"{len(dataset)} images cannot fill one batch of {batch_size} per process on "
                        f"{get_world_size()} process(es): lower --batch_size_per_gpu or use more data.")
    loader = DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=num_workers,
                        pin_memory=torch.cuda.is_available(), persistent_workers=num_workers > 0, drop_last=True,
                        collate_fn=collate_fn, worker_init_fn=_ignore_stop_signals)
    return loader, sampler


def _ignore_stop_signals(worker_id):
    """Loader workers leave SIGTERM / SIGINT to the main process, which finishes its step and saves a
    checkpoint (a scheduler or Ctrl-C signals every process); it stops them itself (_kill_workers_at_exit)."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


@atexit.register
def _kill_workers_at_exit():
    """Workers ignore SIGTERM, so the terminate() of Python's exit handler would wait for them forever after
    an exception: kill what is left first (registered after multiprocessing's handler, so it runs before)."""
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)  # torch's handler would report these kills as failures
    for child in multiprocessing.active_children():
        child.kill()


# ------------------------------------------------------------------------- the loss rules of the four methods
def view_pairs(n_teacher, n_crops, swapped=False):
    """(teacher view, student crop) pairs. Same-view (RoB's default): teacher view t -> student crop t and every
    crop that is not another teacher view (one teacher view: every crop). Swapped (the original methods' cross-view
    pairing): teacher view t -> every student crop but t."""
    if swapped:
        return [(t, s) for t in range(n_teacher) for s in range(n_crops) if s != t]
    return [(t, s) for t in range(n_teacher) for s in range(n_crops) if s == t or s >= n_teacher]


def multi_crop_cross_entropy(student_logits, target_probs, pairs, student_temp):
    """Mean over pairs of the batch-mean cross-entropy H(target_probs[t], softmax(student_logits[s] / T)).
    student_logits: [n_crops * B, K], target_probs: [n_teacher * B, K], both crop-major; in fp32."""
    n_crops, n_teacher = max(s for _, s in pairs) + 1, max(t for t, _ in pairs) + 1
    student_log_probs = F.log_softmax(student_logits.float() / student_temp, dim=-1).chunk(n_crops)
    targets = target_probs.chunk(n_teacher)
    return sum(-(targets[t] * student_log_probs[s]).sum(-1).mean() for t, s in pairs) / len(pairs)


# ----------------------------------------------------------------------------------------------- models
STUDENT_ALIASES = {"vit_tiny": "vit_tiny_patch16_224", "vit_small": "vit_small_patch16_224",
                   "vit_base": "vit_base_patch16_224", "resnet18": "resnet18", "resnet34": "resnet34",
                   "resnet50": "resnet50", "mobilenet_v3": "mobilenetv3_large_100",
                   "vit_nano": "vit_tiny_patch16_224", "vit_pico": "vit_tiny_patch16_224"}
SMALL_VITS = {"vit_nano": dict(embed_dim=128, depth=6, num_heads=4),  # 1.2 M parameters: small-image teachers
              "vit_pico": dict(embed_dim=64, depth=6, num_heads=2)}  # 0.3 M: small-image students (CPU demo)
VIT_NUM_HEADS = {192: 3, 384: 6, 768: 12, 1024: 16, 1280: 16}  # widths of the ViT-Ti/S/B/L/H releases
VIT_ARCH_HEADS = {"vit_tiny": 3, "vit_small": 6, "deit_small": 6, "vit_base": 12, "deit_base": 12,
                  "vit_large": 16, "deit_large": 16}


def is_vit(model):
    return isinstance(model, timm.models.vision_transformer.VisionTransformer)


def is_vit_name(name):
    """Whether build_student(name) gives a ViT (for per-student defaults, before the model exists)."""
    return timm.models.is_model_in_modules(STUDENT_ALIASES.get(name, name), ["vision_transformer"])


def feature_dim(model):
    """Width of the pooled feature a num_classes=0 timm model returns."""
    return getattr(model, "head_hidden_size", None) or model.num_features


def create_backbone(arch):
    """Rebuild a backbone from its arch record dict(name=timm model name, kwargs=create_model kwargs,
    pooled_features=True for a MobileNetV3 read at its pooled last stage)."""
    model = timm.create_model(arch["name"], pretrained=False, **arch["kwargs"])
    if arch.get("pooled_features"):  # MobileNetV3: the 960-d pooled features, without the 1280-d conv head
        model.conv_head, model.act2, model.head_hidden_size = nn.Identity(), nn.Identity(), model.num_features
    return model


def build_student(name, img_size=224, patch_size=None, drop_path_rate=0.0):
    """A randomly initialised timm backbone without classifier: an alias (vit_tiny, vit_small, vit_base,
    resnet18, resnet34, resnet50, mobilenet_v3; vit_nano and vit_pico, narrow 6-block ViTs for small images)
    or any timm model name. ViTs accept any input size (96 px local crops) and take `patch_size`/`img_size`
    overrides for small images. Returns (model, feature width, arch record for create_backbone)."""
    timm_name = STUDENT_ALIASES.get(name, name)
    if not timm.is_model(timm_name):
        raise UserError(f"unknown student '{name}': use one of {', '.join(STUDENT_ALIASES)} or any "
                        "timm model name (see timm.list_models()).")
    kwargs = dict(num_classes=0, drop_path_rate=drop_path_rate, **SMALL_VITS.get(name, {}))
    arch = dict(name=timm_name, kwargs=kwargs)
    if timm.models.is_model_in_modules(timm_name, ["vision_transformer"]):
        kwargs.update(img_size=img_size, dynamic_img_size=True)
        if patch_size:
            kwargs["patch_size"] = patch_size
    elif timm.models.is_model_in_modules(timm_name, ["resnet"]):
        kwargs["zero_init_last"] = False  # torchvision's initialisation, as the reference (no zero-init residual)
    elif timm.models.is_model_in_modules(timm_name, ["mobilenetv3"]):
        arch["pooled_features"] = True  # the reference reads the 960-d pooled features (torchvision's layout)
    model = create_backbone(arch)
    return model, feature_dim(model), arch


def build_teacher_backbone(name, patch_size=16, img_size=224):
    """Backbones of the official releases by family name: vit_small / vit_base / vit_large with patch 16, 8,
    4 or 7, or resnet50 (random weights; load_strict fills them). Returns (model, arch)."""
    if name == "resnet50":
        arch = dict(name="resnet50", kwargs=dict(num_classes=0))
    elif name in ("vit_small", "vit_base", "vit_large"):
        arch = dict(name=f"{name}_patch16_224", kwargs=dict(num_classes=0, patch_size=patch_size,
                                                             img_size=img_size, dynamic_img_size=True))
    else:
        raise ValueError(f"unknown teacher backbone '{name}': vit_small, vit_base, vit_large or resnet50")
    return create_backbone(arch), arch


def projection_mlp(in_dim, hidden_dim, out_dim, nlayers=3, use_bn=False):
    """DINO's and iBOT's head MLP: nlayers linear layers (GELU between, BN too for convnets), truncated-normal
    weights and zero biases. Module names 0, 1, 2... as the official `mlp`, so that their checkpoints load."""
    dims = [in_dim] + [hidden_dim] * (nlayers - 1) + [out_dim]
    layers = []
    for i in range(nlayers):
        layers.append(nn.Linear(dims[i], dims[i + 1]))
        nn.init.trunc_normal_(layers[-1].weight, std=0.02)
        nn.init.zeros_(layers[-1].bias)
        if i < nlayers - 1:
            layers += ([nn.BatchNorm1d(dims[i + 1])] if use_bn else []) + [nn.GELU()]
    return nn.Sequential(*layers)


def backbone_from_state_dict(sd, num_heads=None, arch_name=None):
    """Build the timm backbone whose layout matches a ViT or ResNet state dict (timm/torchvision key names,
    no prefix), reading sizes from the tensors. A ViT's head count is not in its tensors: it comes from
    `num_heads`, else the DINO/iBOT/MSN `arch_name` (vit_small...), else the standard widths. Returns (model, arch)."""
    if "cls_token" in sd:
        dim, patch = sd["cls_token"].shape[-1], sd["patch_embed.proj.weight"].shape[-1]
        grid = math.isqrt(sd["pos_embed"].shape[1] - 1)
        depth = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("blocks."))
        if num_heads is None and arch_name:
            num_heads = next((h for a, h in VIT_ARCH_HEADS.items() if str(arch_name).startswith(a)), None)
        num_heads = num_heads or VIT_NUM_HEADS.get(dim)
        if num_heads is None:
            raise UserError(f"cannot tell the number of attention heads of a ViT of width {dim}: pass num_heads")
        kwargs = dict(num_classes=0, img_size=grid * patch, patch_size=patch, embed_dim=dim, depth=depth,
                      num_heads=num_heads, mlp_ratio=sd["blocks.0.mlp.fc1.weight"].shape[0] / dim,
                      qkv_bias="blocks.0.attn.qkv.bias" in sd, dynamic_img_size=True)
        arch = dict(name="vit_base_patch16_224", kwargs=kwargs)
    elif "layer1.0.conv1.weight" in sd:
        layers = tuple(1 + max(int(k.split(".")[1]) for k in sd if k.startswith(f"layer{i}.")) for i in range(1, 5))
        bottleneck = "layer1.0.conv3.weight" in sd
        if sd["conv1.weight"].shape[0] != 64 or sd["layer1.0.conv1.weight"].shape[0] != 64:
            raise UserError("only standard-width ResNets are supported as teachers (the stem has "
                            f"{sd['conv1.weight'].shape[0]} channels, e.g. a wide RN50w2)")
        arch = dict(name="resnet50" if bottleneck else "resnet18", kwargs=dict(num_classes=0, layers=layers))
    else:
        raise UserError("not a ViT or ResNet state dict (no cls_token / layer1.0.conv1.weight keys)")
    return create_backbone(arch), arch


# ------------------------------------------------------------------------------------------- checkpoints
def load_file(path, what="checkpoint"):
    """torch.load a local path or an https:// URL (downloaded once into the torch.hub cache) with
    weights_only=True; argparse.Namespace, which the official DINO/iBOT checkpoints store, is allow-listed."""
    path = str(path)
    with torch.serialization.safe_globals([argparse.Namespace]):
        if path.startswith(("http://", "https://")):
            try:
                return torch.hub.load_state_dict_from_url(path, map_location="cpu", weights_only=True)
            except Exception as err:
                raise UnreadableFileError(f"could not download the {what} {path} ({err}). Without internet, "
                                          "download it elsewhere and pass the local file path instead.") from err
        if not os.path.isfile(path):
            raise MissingFileError(f"{what} not found: {path}")
        try:
            return torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:
            raise UnreadableFileError(f"cannot read the {what} {path}: is it a complete PyTorch checkpoint (an "
                                      f"interrupted download or copy leaves a truncated file)? ({err})") from None


def source_of(name_or_path, names, url, what):
    """--teacher: the download address of a known release name, else a local file that must exist. An unknown
    name that does not look like a path lists the valid names."""
    if name_or_path in names:
        return url(name_or_path)
    if not os.path.exists(name_or_path) and not any(c in name_or_path for c in "/\\.") and \
            not name_or_path.startswith("http"):
        raise UserError(f"unknown --teacher '{name_or_path}': give one of {', '.join(names)} or the path of a "
                        f"{what}")
    return name_or_path


def strip_prefix(sd, *prefixes):
    """Remove the given key prefixes ('module.', 'backbone.'...) wherever keys start with them."""
    for prefix in prefixes:
        sd = {k[len(prefix):] if k.startswith(prefix) else k: v for k, v in sd.items()}
    return sd


def sub_state_dict(sd, prefix):
    """The entries under `prefix`, with the prefix removed."""
    return {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}


def load_strict(module, sd, source, expected):
    """Load every tensor of `sd` into `module` and fill every tensor of `module`; otherwise raise an error that
    names the file (`source`), the expected format and the missing / unexpected / mis-shaped keys."""
    own = module.state_dict()
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    mis_shaped = [f"{k}: file {tuple(sd[k].shape)} vs model {tuple(own[k].shape)}"
                  for k in own if k in sd and sd[k].shape != own[k].shape]
    if missing or unexpected or mis_shaped:
        def show(keys):
            return ", ".join(keys[:8]) + (f" ... ({len(keys)} in all)" if len(keys) > 8 else "") or "none"
        raise UserError(f"{source} does not match the expected format ({expected}): missing keys: {show(missing)}; "
                        f"unexpected keys: {show(unexpected)}; wrong shapes: {show(mis_shaped)}")
    module.load_state_dict(sd)


def recorded_backbone(ckpt, sd, source):
    """The backbone of one of this project's checkpoints, rebuilt from its `arch` record without drop-path and
    loaded strictly from the backbone.* entries of `sd`."""
    arch = ckpt["arch"]
    backbone = create_backbone({**arch, "kwargs": {**arch["kwargs"], "drop_path_rate": 0.0}})
    load_strict(backbone, sub_state_dict(sd, "backbone."), source, f"{ckpt['method']}.py checkpoint")
    return backbone


def freeze(model):
    """A frozen teacher: eval mode (BN statistics never change), no gradients."""
    return model.eval().requires_grad_(False)


def fold_weight_norm(sd, layers=("last_layer",)):
    """Weight-normalised last layers (official weight_g / weight_v, or torch parametrization names) to the plain
    weight g * v / ||v|| (row-wise) that a frozen teacher uses; each layer folded into its own copy."""
    sd = dict(sd)
    for layer in layers:
        for g_key, v_key in [(f"{layer}.weight_g", f"{layer}.weight_v"),
                             (f"{layer}.parametrizations.weight.original0",
                              f"{layer}.parametrizations.weight.original1")]:
            if g_key in sd:
                g, v = sd.pop(g_key).float(), sd.pop(v_key).float()
                sd[f"{layer}.weight"] = g * v / v.norm(dim=1, keepdim=True)
    return sd


METHODS = {"rob_dino": "a DINO", "rob_ibot": "an iBOT", "rob_msn": "an MSN", "rob_swav": "a SwAV"}


def refuse_teacher(ckpt, source, script, needs, release):
    """Raise the UserError for a --teacher file that `script` cannot use: another script's checkpoint or another
    method's release names the script to use; a backbone without its head names a release that has one."""
    if not isinstance(ckpt, dict):
        raise UserError(f"{source} is not a checkpoint dictionary")
    kind = METHODS[script]
    if ckpt.get("method") is not None:
        raise UserError(f"{source} was written by {ckpt['method']}.py, not {script}.py: {kind} teacher needs {needs}. "
                        f"Use {ckpt['method']}.py with it, or give {kind} checkpoint.")
    teacher, flat = ckpt.get("teacher"), strip_prefix(ckpt.get("state_dict", ckpt), "module.")
    other = ("rob_msn" if "target_encoder" in ckpt else
             "rob_ibot" if isinstance(teacher, dict) and any("last_layer2" in k for k in teacher) else
             "rob_dino" if isinstance(teacher, dict) else "rob_swav" if "prototypes.weight" in flat else None)
    if other is not None and other != script:
        raise UserError(f"{source} is {METHODS[other]} checkpoint: use {other}.py with it.")
    if "cls_token" in flat or "conv1.weight" in flat:
        raise UserError(f"{source} holds a backbone only; {kind} teacher needs {needs} too, which the full releases "
                        f"contain, e.g. {release}")
    raise UserError(f"{source} is not {kind} checkpoint (expected {needs}).")


def save_atomic(obj, path):
    """torch.save through a temporary file of this process and a rename: a crash or a kill mid-write never
    leaves a broken `path`, and a failed write leaves no temporary file. A full disk is a UserError."""
    path = Path(path)
    tmp = path.parent / f".{path.name}.{os.getpid()}.tmp"
    buffer = io.BytesIO()
    torch.save(obj, buffer)  # serialised first: a write error then surfaces as an OSError with its errno
    try:
        with open(tmp, "wb") as f:
            f.write(buffer.getbuffer())
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as err:
        tmp.unlink(missing_ok=True)
        if err.errno in (errno.ENOSPC, errno.EDQUOT):
            raise UserError(f"no space left on the device while writing {path}: free some space or use another "
                            "--output_dir, then rerun the same command to resume") from None
        raise UserError(f"cannot write {path} ({err.strerror}): check the permissions of --output_dir") from None


def export_timm(backbone, arch, path):
    """Save the student backbone as a plain timm state dict, with a zero classifier of the model's default
    shape, so that timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=path,
    custom_load=False), **kwargs) loads it strictly (num_classes=N gives a fresh N-way classifier instead;
    custom_load=False because timm's default ViT weights are JAX .npz files). Returns that call."""
    kwargs = {k: v for k, v in arch["kwargs"].items() if k not in ("num_classes", "drop_path_rate")}
    full = timm.create_model(arch["name"], pretrained=False, **kwargs)
    result = full.load_state_dict(backbone.state_dict(), strict=False)
    assert not result.unexpected_keys, result.unexpected_keys
    for name in result.missing_keys:  # the classifier, zeroed; a pooled MobileNetV3's untrained conv head keeps
        if not name.startswith("conv_head."):  # timm's initialisation (the student learned the 960-d pooled features)
            full.get_parameter(name).data.zero_()
    save_atomic({k: v.detach().cpu() for k, v in full.state_dict().items()}, path)
    return timm_call(arch, path)


def timm_call(arch, path):
    """The timm.create_model call that loads an exported student."""
    args = "".join(f", {k}={v!r}" for k, v in arch["kwargs"].items() if k not in ("num_classes", "drop_path_rate"))
    call = (f"timm.create_model({arch['name']!r}, pretrained=True, "
            f"pretrained_cfg_overlay=dict(file={str(path)!r}, custom_load=False){args})")
    if arch.get("pooled_features"):
        call += "; then model.conv_head = model.act2 = torch.nn.Identity() for the trained 960-d pooled features"
    return call
