"""Method-agnostic pieces shared by rob_dino.py, rob_ibot.py, rob_msn.py, rob_swav.py and eval_linear.py:
distributed set-up, data (ImageFolder / Fashion-MNIST / synthetic, multi-crop augmentation, loader), model
builders and checkpoint I/O. Everything that defines a method (its head, loss, pairing, schedule and training
step) lives in that method's own file."""
import argparse
import atexit
import gzip
import hashlib
import math
import multiprocessing
import os
import random
import signal
import time
import warnings
from pathlib import Path

import numpy
import timm
import torch
import torch.distributed as dist
import torch.nn as nn
from PIL import Image, ImageFilter
from torch.utils.data import DataLoader, Dataset, DistributedSampler
from torchvision import datasets
from torchvision.transforms import v2 as T

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


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
    (first global, other globals, locals). Returns a list of normalised float tensors, globals first."""

    def __init__(self, global_crops_size=224, local_crops_size=96, global_crops_number=2, local_crops_number=8,
                 global_crops_scale=(0.25, 1.0), local_crops_scale=(0.05, 0.25), color_jitter=(0.4, 0.4, 0.2, 0.1),
                 color_jitter_p=0.8, grayscale_p=0.2, blur_p=(1.0, 0.1, 0.5), solarize_p=(0.0, 0.2, 0.0),
                 interpolation="bicubic", mean=IMAGENET_MEAN, std=IMAGENET_STD):
        self.global_crops_size, self.local_crops_size = global_crops_size, local_crops_size
        self.global_crops_number, self.local_crops_number = global_crops_number, local_crops_number
        self.global_crops_scale, self.local_crops_scale = global_crops_scale, local_crops_scale
        self.color_jitter, self.color_jitter_p, self.grayscale_p = color_jitter, color_jitter_p, grayscale_p
        self.blur_p, self.solarize_p, self.mean, self.std = blur_p, solarize_p, mean, std
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
        """The same augmentation on a whole batch of uint8 images at once, on their device (--gpu_augment):
        `images` is a [B, C, H, W] tensor or a list of [C, H_i, W_i] tensors (C = 1 or 3). The parameters are
        drawn per image and crop from the same distributions as the per-image path; crops are cut and resized
        with roi_align (bilinear with area averaging) instead of PIL's bicubic filter. Returns the crop list."""
        sizes = torch.tensor([(img.shape[-2], img.shape[-1]) for img in images], dtype=torch.float64)
        n_crops = self.global_crops_number + self.local_crops_number
        kinds = [(self.global_crops_size, self.global_crops_scale, [min(i, 1) for i in range(self.global_crops_number)]),
                 (self.local_crops_size, self.local_crops_scale, [2] * self.local_crops_number)]
        crops = []
        for size, scale, blur_index in kinds:
            n = len(blur_index)
            if n == 0:
                continue
            boxes = random_resized_crop_boxes(sizes.repeat_interleave(n, 0), scale, generator)  # image-major
            x = crop_and_resize(images, boxes, n, size)
            x = x.unflatten(0, (len(images), n)).transpose(0, 1).flatten(0, 1)  # crop-major: crop k of image b at k * B + b
            x = color_augment(x, self, torch.tensor(blur_index).repeat_interleave(len(images)), generator)
            crops += list(x.chunk(n))
        assert len(crops) == n_crops
        return crops


def eval_transform(size=224, resize=None, mean=IMAGENET_MEAN, std=IMAGENET_STD):
    """Resize (default size / 0.875, i.e. 256 for 224) + centre crop + normalise: the evaluation protocol."""
    resize = resize or int(round(size / 0.875))
    return T.Compose([T.Resize(resize, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(size),
                      T.ToImage(), T.ToDtype(torch.float32, scale=True), T.Normalize(mean, std)])


def _uniform(n, low, high, generator):
    return low + (high - low) * torch.rand(n, generator=generator, dtype=torch.float64)


def random_resized_crop_boxes(sizes, scale, generator=None, ratio=(3 / 4, 4 / 3), attempts=10):
    """Vectorised torchvision RandomResizedCrop parameters for images of `sizes` [N, 2] (height, width):
    up to 10 draws of area fraction ~ U(scale) and log aspect ratio ~ U(log ratio), the first that fits,
    else a centre crop. Returns boxes [N, 4] as (x1, y1, x2, y2) pixel edges."""
    n, (height, width) = len(sizes), sizes.unbind(1)
    area = (height * width)[:, None] * _uniform((n, attempts), *scale, generator)
    aspect = torch.exp(_uniform((n, attempts), math.log(ratio[0]), math.log(ratio[1]), generator))
    w, h = torch.round(torch.sqrt(area * aspect)), torch.round(torch.sqrt(area / aspect))
    fits = (w > 0) & (w <= width[:, None]) & (h > 0) & (h <= height[:, None])
    first = fits.double().argmax(1, keepdim=True)
    w, h, found = w.gather(1, first)[:, 0], h.gather(1, first)[:, 0], fits.any(1)
    in_ratio = width / height  # fallback: the whole image, clipped to the extreme aspect ratio
    fb_w = torch.where(in_ratio > ratio[1], torch.round(height * ratio[1]), width)
    fb_h = torch.where(in_ratio < ratio[0], torch.round(width / ratio[0]), height)
    w, h = torch.where(found, w, fb_w), torch.where(found, h, fb_h)
    top = torch.where(found, torch.floor(torch.rand(n, generator=generator, dtype=torch.float64) * (height - h + 1)),
                      torch.div(height - h, 2, rounding_mode="floor"))
    left = torch.where(found, torch.floor(torch.rand(n, generator=generator, dtype=torch.float64) * (width - w + 1)),
                       torch.div(width - w, 2, rounding_mode="floor"))
    return torch.stack([left, top, left + w, top + h], 1)


def crop_and_resize(images, boxes, n, size):
    """Cut n boxes per image ([B * n, 4] pixel (x1, y1, x2, y2), image-major) out of uint8 images and resize
    them to size x size: roi_align averages ceil(box / size)^2 bilinear samples per output pixel, an
    antialiased resize. Indexing stays on the host, so nothing waits for the GPU."""
    from torchvision.ops import roi_align
    device = images[0].device
    if isinstance(images, torch.Tensor):  # same-sized images: one call
        rois = torch.cat([torch.arange(len(images)).repeat_interleave(n)[:, None].double(), boxes], 1)
        x = images.float().expand(-1, 3, -1, -1) if images.shape[1] == 1 else images.float()
        return roi_align(x, to_device(rois.float(), device), size, aligned=True) / 255
    rois = to_device(torch.cat([torch.zeros(len(boxes), 1, dtype=torch.float64), boxes], 1).float(), device)
    out = torch.empty(len(boxes), 3, size, size, device=device)
    for b, img in enumerate(images):  # images of varied sizes (decoded JPEGs): one call per image, n crops each
        out[b * n:(b + 1) * n] = roi_align(img.float().expand(3, -1, -1)[None], rois[b * n:(b + 1) * n], size, aligned=True)
    return out / 255


def _gray(x):
    return (0.299 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2])[:, None]


def _shift_hue(x, shift):
    """Rotate the hue of RGB images x [N, 3, H, W] in [0, 1] by shift [N] (fractions of a turn), via HSV."""
    maxc, minc = x.max(1).values, x.min(1).values
    delta = maxc - minc
    safe = torch.where(delta > 0, delta, torch.ones_like(delta))
    r, g, b = ((maxc[:, None] - x) / safe[:, None]).unbind(1)
    hue = torch.where(maxc == x[:, 0], b - g, torch.where(maxc == x[:, 1], 2 + r - b, 4 + g - r))
    hue = torch.where(delta > 0, hue / 6, torch.zeros_like(hue))
    hue = (hue + shift[:, None, None]) % 1.0
    sat = delta / torch.where(maxc > 0, maxc, torch.ones_like(maxc))
    h6 = hue * 6
    sector, frac = torch.floor(h6), h6 - torch.floor(h6)
    p, q, t = maxc * (1 - sat), maxc * (1 - sat * frac), maxc * (1 - sat * (1 - frac))
    sector = sector.long() % 6
    table = torch.stack([torch.stack(c, 1) for c in [(maxc, t, p), (q, maxc, p), (p, maxc, t), (p, q, maxc),
                                                      (t, p, maxc), (maxc, p, q)]], 1)  # [N, 6, 3, H, W]
    return table.gather(1, sector[:, None, None].expand(-1, 1, 3, -1, -1)).squeeze(1)


def _blur(x, sigma):
    """Separable Gaussian blur with a per-image standard deviation sigma [N] (pixels), 13 taps, reflect pad."""
    n, c, h, w = x.shape
    taps = torch.arange(-6, 7, device=x.device, dtype=x.dtype)
    kernel = torch.exp(-0.5 * (taps[None] / sigma[:, None]) ** 2)
    kernel = (kernel / kernel.sum(1, keepdim=True)).repeat_interleave(c, 0)  # [N * C, 13]
    y = x.reshape(1, n * c, h, w)
    y = torch.nn.functional.conv2d(torch.nn.functional.pad(y, (6, 6, 0, 0), mode="reflect"), kernel[:, None, None, :], groups=n * c)
    y = torch.nn.functional.conv2d(torch.nn.functional.pad(y, (0, 0, 6, 6), mode="reflect"), kernel[:, None, :, None], groups=n * c)
    return y.reshape(n, c, h, w)


def color_augment(x, aug, kind, generator=None):
    """Flip, colour jitter (brightness, contrast, saturation, hue in a random order per image), grayscale,
    blur and solarise with MultiCropAugmentation `aug`'s parameters, then normalise. x: [N, 3, S, S] in
    [0, 1]; kind [N]: 0 first global crop, 1 other globals, 2 locals (for the blur / solarise probabilities).
    Parameters are drawn on the CPU; each transform runs only on the images it applies to."""
    n, dev = len(x), x.device
    b, c, s, h = aug.color_jitter
    u = torch.rand(n, 13, generator=generator, dtype=torch.float64)
    factors = torch.stack([1 - b + 2 * b * u[:, 0], 1 - c + 2 * c * u[:, 1], 1 - s + 2 * s * u[:, 2],
                           h * (2 * u[:, 3] - 1), 0.1 + 1.9 * u[:, 4]], 1)  # brightness contrast saturation hue sigma
    factors = to_device(factors.to(x.dtype), dev)
    order = torch.argsort(u[:, 5:9], dim=1)  # a random permutation of the four colour adjustments per image
    jitter = u[:, 9] < aug.color_jitter_p
    blur_p, solarize_p = (torch.tensor(p, dtype=torch.float64)[kind] for p in (aug.blur_p, aug.solarize_p))

    def apply(mask, fn):  # x[mask] = fn(x[mask], that subset's factors)
        rows = to_device(mask.nonzero()[:, 0], dev)
        if len(rows):
            x[rows] = fn(x[rows], factors[rows][:, :, None, None, None])

    apply(torch.rand(n, generator=generator) < 0.5, lambda y, f: y.flip(-1))
    adjustments = [lambda y, f: (y * f[:, 0]).clamp(0, 1),
                   lambda y, f: (f[:, 1] * y + (1 - f[:, 1]) * _gray(y).mean((2, 3), keepdim=True)).clamp(0, 1),
                   lambda y, f: (f[:, 2] * y + (1 - f[:, 2]) * _gray(y)).clamp(0, 1),
                   lambda y, f: _shift_hue(y, f[:, 3, 0, 0, 0])]
    for position in range(4):
        for op, adjust in enumerate(adjustments):
            apply(jitter & (order[:, position] == op), adjust)
    apply(u[:, 10] < aug.grayscale_p, lambda y, f: _gray(y).expand(-1, 3, -1, -1))
    apply(u[:, 11] < blur_p, lambda y, f: _blur(y, f[:, 4, 0, 0, 0]))
    apply(u[:, 12] < solarize_p, lambda y, f: torch.where(y >= 128 / 255, 1 - y, y))
    mean, std = (torch.tensor(v, device=dev, dtype=x.dtype)[None, :, None, None] for v in (aug.mean, aug.std))
    return (x - mean) / std


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
        raise RuntimeError("Fashion-MNIST not found and the download failed. Install it with `apt-get install "
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
    uint8 image tensors instead, JPEG files as undecoded bytes (see read_encoded, decode_images)."""
    if data_path == "fashion-mnist":
        return FashionMNIST(train, raw)
    if data_path == "synthetic":
        return SyntheticDataset([(3, 256, 256)] if raw else synthetic_shapes, raw=raw)
    if not os.path.isdir(data_path):
        raise FileNotFoundError(f"--data_path {data_path} is not a folder. Give an ImageFolder directory "
                                "(one sub-folder of images per class), 'fashion-mnist' or 'synthetic'.")
    try:
        return datasets.ImageFolder(data_path, loader=read_encoded) if raw else datasets.ImageFolder(data_path)
    except FileNotFoundError as err:
        raise FileNotFoundError(f"--data_path {data_path} holds no images: an ImageFolder needs one sub-folder "
                                f"per class with .jpg/.png/... files inside. ({err})") from None


def random_subset(dataset, size, seed=0):
    """A seeded random subset of `size` images (--subset, for quick experiments); the data set itself for 0."""
    if not size:
        return dataset
    if size > len(dataset):
        raise ValueError(f"--subset {size} exceeds the {len(dataset)} images of the data set.")
    indices = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed))[:size]
    return torch.utils.data.Subset(dataset, sorted(indices.tolist()))


def read_encoded(path):
    """--gpu_augment loader: a complete JPEG file as its bytes (a 1-D uint8 tensor, decoded later on the
    device); any other image (PNG, truncated JPEG...) decoded here, as a uint8 [3, H, W] tensor."""
    with open(path, "rb") as f:
        data = f.read()
    if data[:2] == b"\xff\xd8" and data.rstrip(b"\0")[-2:] == b"\xff\xd9":
        return torch.frombuffer(bytearray(data), dtype=torch.uint8)
    with Image.open(path) as img:
        return torch.from_numpy(numpy.asarray(img.convert("RGB")).copy()).permute(2, 0, 1)


def collate_raw(samples):
    """Batch of (raw image, label): images stacked if they share a shape, else kept as a list."""
    images, labels = zip(*samples)
    same = all(img.ndim == 3 and img.shape == images[0].shape for img in images)
    return (torch.stack(images) if same else list(images)), torch.tensor(labels)


def decode_images(batch, device):
    """--gpu_augment: raw images of a batch to uint8 tensors on `device`. JPEG bytes are decoded there in
    one batched call (nvJPEG on a GPU); an image that fails is decoded alone on the CPU or, if unreadable,
    replaced by another image of the batch with a warning. Returns a tensor [B, C, H, W] or a list."""
    from torchvision.io import ImageReadMode, decode_jpeg
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    images = [img.to(device, non_blocking=True) if img.ndim == 3 else None for img in batch]
    encoded = [i for i, img in enumerate(batch) if img.ndim == 1]
    try:
        decoded = decode_jpeg([batch[i] for i in encoded], mode=ImageReadMode.RGB, device=device) if encoded else []
    except RuntimeError:  # one bad file fails the whole call: decode one by one
        decoded = []
        for i in encoded:
            try:
                decoded.append(decode_jpeg(batch[i], mode=ImageReadMode.RGB).to(device, non_blocking=True))
            except RuntimeError as err:
                warnings.warn(f"skipping an undecodable JPEG in the batch: {err}")
                decoded.append(None)
    for i, img in zip(encoded, decoded):
        images[i] = img
    good = [img for img in images if img is not None]
    if not good:
        raise RuntimeError("no image of the batch could be decoded")
    return [img if img is not None else good[k % len(good)] for k, img in enumerate(images)]


class AugmentedDataset(Dataset):
    """Applies `transform` to each (image, label) of `base`. Indexed by (epoch, index) keys (see
    ResumableSampler): the random state of each sample's augmentation is seeded from (seed, epoch, index), so
    the crops do not depend on the number of workers or processes and a resumed run sees the same crops. An
    unreadable image is skipped with a warning (the next one is used instead) and counted in `num_skipped`."""

    max_skips = 50

    def __init__(self, base, transform, seed=0):
        self.base, self.transform, self.seed = base, transform, seed
        self.num_skipped = torch.zeros((), dtype=torch.int64).share_memory_()  # shared with loader workers

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
                self.num_skipped += 1
        else:
            raise RuntimeError(f"{self.max_skips} unreadable images in a row from {index}: is the dataset intact?")
        if self.transform is None or not isinstance(image, Image.Image):
            return image, label
        seed = mix_seed(self.seed, epoch, index)
        torch.manual_seed(seed)
        random.seed(seed)
        return self.transform(image), label


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
        raise ValueError(f"{len(dataset)} images cannot fill one batch of {batch_size} per process on "
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


def feature_dim(model):
    """Width of the pooled feature a num_classes=0 timm model returns."""
    return getattr(model, "head_hidden_size", None) or model.num_features


def create_backbone(arch):
    """Rebuild a backbone from its arch record dict(name=timm model name, kwargs=create_model kwargs)."""
    return timm.create_model(arch["name"], pretrained=False, **arch["kwargs"])


def build_student(name, img_size=224, patch_size=None, drop_path_rate=0.0):
    """A randomly initialised timm backbone without classifier: an alias (vit_tiny, vit_small, vit_base,
    resnet18, resnet34, resnet50, mobilenet_v3; vit_nano and vit_pico, narrow 6-block ViTs for small images)
    or any timm model name. ViTs accept any input size (96 px local crops) and take `patch_size`/`img_size`
    overrides for small images. Returns (model, feature width, arch record for create_backbone)."""
    timm_name = STUDENT_ALIASES.get(name, name)
    if not timm.is_model(timm_name):
        raise ValueError(f"unknown student '{name}': use one of {', '.join(STUDENT_ALIASES)} or any "
                         "timm model name (see timm.list_models()).")
    kwargs = dict(num_classes=0, drop_path_rate=drop_path_rate, **SMALL_VITS.get(name, {}))
    if timm.models.is_model_in_modules(timm_name, ["vision_transformer"]):
        kwargs.update(img_size=img_size, dynamic_img_size=True)
        if patch_size:
            kwargs["patch_size"] = patch_size
    arch = dict(name=timm_name, kwargs=kwargs)
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
            raise ValueError(f"cannot tell the number of attention heads of a ViT of width {dim}: pass num_heads")
        kwargs = dict(num_classes=0, img_size=grid * patch, patch_size=patch, embed_dim=dim, depth=depth,
                      num_heads=num_heads, mlp_ratio=sd["blocks.0.mlp.fc1.weight"].shape[0] / dim,
                      qkv_bias="blocks.0.attn.qkv.bias" in sd, dynamic_img_size=True)
        arch = dict(name="vit_base_patch16_224", kwargs=kwargs)
    elif "layer1.0.conv1.weight" in sd:
        layers = tuple(1 + max(int(k.split(".")[1]) for k in sd if k.startswith(f"layer{i}.")) for i in range(1, 5))
        bottleneck = "layer1.0.conv3.weight" in sd
        if sd["conv1.weight"].shape[0] != 64 or sd["layer1.0.conv1.weight"].shape[0] != 64:
            raise ValueError("only standard-width ResNets are supported as teachers (the stem has "
                             f"{sd['conv1.weight'].shape[0]} channels, e.g. a wide RN50w2)")
        arch = dict(name="resnet50" if bottleneck else "resnet18", kwargs=dict(num_classes=0, layers=layers))
    else:
        raise ValueError("not a ViT or ResNet state dict (no cls_token / layer1.0.conv1.weight keys)")
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
                raise RuntimeError(f"could not download the {what} {path} ({err}). Without internet, download "
                                   "it elsewhere and pass the local file path instead.") from err
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{what} not found: {path}")
        try:
            return torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:
            raise RuntimeError(f"cannot read the {what} {path}: is it a complete PyTorch checkpoint (an "
                               f"interrupted download or copy leaves a truncated file)? ({err})") from None


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
        raise ValueError(f"{source} does not match the expected format ({expected}).\n  missing keys: "
                         f"{show(missing)}\n  unexpected keys: {show(unexpected)}\n  wrong shapes: {show(mis_shaped)}")
    module.load_state_dict(sd)


def save_atomic(obj, path):
    """torch.save through a temporary file and a rename: a crash mid-write never leaves a broken `path`."""
    tmp = f"{path}.tmp"
    torch.save(obj, tmp)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


def load_resume_checkpoint(output_dir, method):
    """The checkpoint to resume from (output_dir/checkpoint.pth), or None to start afresh."""
    path = Path(output_dir) / "checkpoint.pth"
    if not path.is_file():
        return None
    ckpt = load_file(path, "resume checkpoint")
    if ckpt.get("method") != method:
        raise ValueError(f"{path} was written by {ckpt.get('method', 'another program')}, not {method}: "
                         "use another --output_dir.")
    return ckpt


def export_timm(backbone, arch, path):
    """Save the student backbone as a plain timm state dict, with a zero classifier of the model's default
    shape, so that timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=path,
    custom_load=False), **kwargs) loads it strictly (num_classes=N gives a fresh N-way classifier instead;
    custom_load=False because timm's default ViT weights are JAX .npz files). Returns that call."""
    kwargs = {k: v for k, v in arch["kwargs"].items() if k not in ("num_classes", "drop_path_rate")}
    full = timm.create_model(arch["name"], pretrained=False, **kwargs)
    result = full.load_state_dict(backbone.state_dict(), strict=False)
    assert not result.unexpected_keys, result.unexpected_keys
    for name in result.missing_keys:  # only the classifier (and, for MobileNetV3, nothing else) is absent
        full.get_parameter(name).data.zero_()
    save_atomic({k: v.detach().cpu() for k, v in full.state_dict().items()}, path)
    args = "".join(f", {k}={v!r}" for k, v in kwargs.items())
    return (f"timm.create_model({arch['name']!r}, pretrained=True, "
            f"pretrained_cfg_overlay=dict(file={str(path)!r}, custom_load=False){args})")


# ---------------------------------------------------------------------------------- training utilities
def cosine_schedule(base, final, epochs, iters_per_epoch, warmup_epochs=0, warmup_start=0.0):
    """Per-iteration values: linear warm-up from warmup_start to base, then cosine from base to final."""
    if warmup_epochs >= epochs:
        raise ValueError(f"a warm-up of {warmup_epochs} epochs leaves nothing of a {epochs}-epoch run: lower "
                         "--warmup_epochs (or the temperature / momentum warm-up) or raise --epochs.")
    warmup = torch.linspace(warmup_start, base, int(warmup_epochs * iters_per_epoch) + 1, dtype=torch.float64)[:-1]
    steps = epochs * iters_per_epoch - len(warmup)
    cosine = final + 0.5 * (base - final) * (1 + torch.cos(math.pi * torch.arange(steps, dtype=torch.float64) / steps))
    return torch.cat([warmup, cosine]).tolist()


def param_groups(model):
    """AdamW groups: weight decay on weight matrices and convolution kernels, none on biases and norm
    parameters (the first group's weight decay follows the schedule)."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            (no_decay if param.ndim <= 1 or name.endswith(".bias") else decay).append(param)
    return [{"params": decay}, {"params": no_decay, "weight_decay": 0.0}]


class StepStats:
    """Per-step scalars (loss terms, a stop vote) averaged over the processes and read on the host one step
    late, so that the host queues step i+1 while the GPU still runs step i instead of waiting at every step."""

    def __init__(self):
        self.pending = None

    def push(self, values):
        """Queue this step's values (a 1-D tensor); return the previous step's averages as a list, or None."""
        values = all_reduce_mean(values.detach().float())
        event = None
        if values.is_cuda:
            host = torch.empty(values.shape, pin_memory=True)
            host.copy_(values, non_blocking=True)
            event = torch.cuda.Event()
            event.record()
            values = host
        previous, self.pending = self.pending, (values, event)
        return self._read(previous)

    def flush(self):
        """The last queued step's values (waits for it), or None."""
        previous, self.pending = self.pending, None
        return self._read(previous)

    @staticmethod
    def _read(entry):
        if entry is None:
            return None
        if entry[1] is not None:
            entry[1].synchronize()
        return entry[0].tolist()


def compile_model(model):
    """torch.compile in place. A ViT without stochastic depth (a frozen teacher) is compiled per block: its
    identical blocks share one compiled graph, seconds of compilation instead of minutes with the same
    fusions. Other models are compiled whole."""
    if is_vit(model) and len({repr(block.drop_path1) for block in model.blocks}) == 1:
        for block in model.blocks:  # (blocks with different drop-path rates would each recompile: whole model)
            block.compile()
    else:
        model.compile()
    return model


class StopRequest:
    """SIGTERM / SIGINT / SIGUSR1 (cluster pre-emption, Ctrl-C) ask training to stop: it finishes the current
    step, writes a checkpoint and exits, and the next run resumes from there. A second Ctrl-C stops at once."""

    def __init__(self):
        self.requested = False
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1):
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = True


def matmul_peak_flops(device, dtype, n=8192, iters=20):
    """Measured FLOP/s of a large square matmul on `device` in `dtype` (random data): the MFU denominator."""
    if device.type != "cuda":
        n, iters = 1024, 5
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    for _ in range(3):
        a @ b
    synchronize(device)
    start = time.perf_counter()
    for _ in range(iters):
        a @ b
    synchronize(device)
    return 2 * n ** 3 * iters / (time.perf_counter() - start)


def count_flops(fn):
    """FLOPs (matmuls, convolutions, attention; forward and backward) that one call of fn() performs."""
    from torch.utils.flop_counter import FlopCounterMode
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def device_name(device):
    return torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({torch.get_num_threads()} threads)"


def benchmark(step, steps, warmup_steps, images_per_step, flops_per_image, device, dtype, title):
    """Time `steps` calls of step() after `warmup_steps` untimed ones and print images/s, GFLOP/image, MFU
    against the matmul peak measured here, peak memory and the device. Returns the figures as a dict."""
    for _ in range(warmup_steps):
        step()
    synchronize(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    for _ in range(steps):
        step()
    synchronize(device)
    seconds = time.perf_counter() - start
    peak = matmul_peak_flops(device, dtype)
    result = dict(config=title, device=device_name(device), images_per_s=images_per_step * steps / seconds,
                  gflop_per_image=flops_per_image / 1e9, matmul_peak_tflops=peak / 1e12,
                  peak_memory_gib=torch.cuda.max_memory_allocated(device) / 2 ** 30 if device.type == "cuda" else None)
    result["mfu"] = result["images_per_s"] * flops_per_image / peak
    memory = f"{result['peak_memory_gib']:.1f} GiB" if result["peak_memory_gib"] is not None else "n/a (CPU)"
    log(f"[benchmark] {title} on {result['device']}: {result['images_per_s']:,.0f} images/s, "
        f"{result['gflop_per_image']:.1f} GFLOP/image, MFU {100 * result['mfu']:.1f}% of a measured "
        f"{result['matmul_peak_tflops']:.3g} TFLOP/s {str(dtype).replace('torch.', '')} matmul peak, "
        f"peak memory {memory}")
    return result
