"""What rob_dino.py, rob_ibot.py, rob_msn.py, rob_swav.py and eval_linear.py share, and nothing of a run: data (the
datasets, multi-crop augmentation, the resumable loader), models (students, teachers, the timm export), the user's
error type, the process group and a stable seed mixer. Importing it changes nothing in the host program."""
import argparse, errno, gzip, hashlib, io, itertools, math, os, random, signal, warnings
from pathlib import Path
from types import SimpleNamespace

import timm
import torch
import torch.distributed as dist
import torch.distributed.nn
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image, ImageFilter, ImageOps
from torch.utils.data import DataLoader, Dataset, DistributedSampler
from torchvision import datasets
from torchvision.transforms import v2 as T

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


class UserError(ValueError):
    """Something the user controls is wrong (a flag, a path, a file): reported as one line that names the fix."""

    def __str__(self):  # raised in a loader worker, it arrives after the worker's traceback: its own line only
        text = super().__str__()
        return text.strip().splitlines()[-1].split(": ", 1)[-1] if "Original Traceback" in text else text


class MissingFileError(UserError, FileNotFoundError):
    pass


class UnreadableFileError(UserError, RuntimeError):
    pass


def init_distributed():
    cuda = torch.cuda.is_available()
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return torch.device("cuda" if cuda else "cpu")
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo")
    return device


def get_rank():
    return dist.get_rank() if dist.is_initialized() else 0


def get_world_size():
    return dist.get_world_size() if dist.is_initialized() else 1


def log(*args):
    if get_rank() == 0:
        print(*args, flush=True)


def all_reduce(tensor, op=dist.ReduceOp.SUM):
    if dist.is_initialized():
        dist.all_reduce(tensor, op)
    return tensor


def all_reduce_mean(tensor):
    return all_reduce(tensor.clone()) / dist.get_world_size() if dist.is_initialized() else tensor


def mix_seed(*keys):
    """A stable 63-bit seed from integers: the same keys give the same seed in every process and every run."""
    digest = hashlib.blake2b(repr(tuple(int(k) for k in keys)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


# ======================================================================================================== data
class RandomGaussianBlur:
    def __init__(self, p, radius=(0.1, 2.0)):
        self.p, self.radius = p, radius

    def __call__(self, img):
        if self.p <= 0 or torch.rand(()) >= self.p:
            return img
        return img.filter(ImageFilter.GaussianBlur(radius=float(torch.empty(()).uniform_(*self.radius))))


class MultiCropAugmentation:
    """Multi-crop augmentation: global and local crops of one image, each with random-resized crop, flip, colour
    jitter, grayscale, blur and solarisation (probabilities per crop kind: first global, other globals, locals).
    Called on a PIL image: the normalised crops, globals first; batch(): the same on a batch on its device."""

    def __init__(self, global_crops_size=224, local_crops_size=96, global_crops_number=2, local_crops_number=8,
                 global_crops_scale=(0.25, 1.0), local_crops_scale=(0.05, 0.25), color_jitter=(0.4, 0.4, 0.2, 0.1),
                 color_jitter_p=0.8, grayscale_p=0.2, blur_p=(1.0, 0.1, 0.5), solarize_p=(0.0, 0.2, 0.0),
                 interpolation="bicubic", mean=IMAGENET_MEAN, std=IMAGENET_STD):
        vars(self).update((k, v) for k, v in locals().items() if k != "self")  # every argument, as an attribute
        interp = T.InterpolationMode(interpolation)

        def crop_pipeline(size, scale, blur, solarize):
            return T.Compose([T.RandomResizedCrop(size, scale=scale, interpolation=interp), T.RandomHorizontalFlip(),
                              T.RandomApply([T.ColorJitter(*color_jitter)], p=color_jitter_p),
                              T.RandomGrayscale(grayscale_p), RandomGaussianBlur(blur)]
                             + ([T.RandomSolarize(threshold=128, p=solarize)] if solarize > 0 else [])
                             + [T.ToImage(), T.ToDtype(torch.float32, scale=True), T.Normalize(mean, std)])

        self.global_transforms = [crop_pipeline(global_crops_size, global_crops_scale, blur_p[min(i, 1)],
                                                solarize_p[min(i, 1)]) for i in range(global_crops_number)]
        self.local_transform = crop_pipeline(local_crops_size, local_crops_scale, blur_p[2], solarize_p[2])
        self.crop_shapes = ([(3, global_crops_size, global_crops_size)] * global_crops_number
                            + [(3, local_crops_size, local_crops_size)] * local_crops_number)

    def __call__(self, img):
        return ([t(img) for t in self.global_transforms]
                + [self.local_transform(img) for _ in range(self.local_crops_number)])

    def batch(self, images, generator=None):
        """--gpu_augment: the crops of uint8 images ([B, C, H, W] or a list of [C, H_i, W_i]) on their device, the
    parameters drawn from the per-image path's distributions, crops resized with roi_align (area-averaged)."""
        sizes = torch.tensor([(img.shape[-2], img.shape[-1]) for img in images], dtype=torch.float64)
        first_or_other = [min(i, 1) for i in range(self.global_crops_number)]  # crop kinds: see color_augment
        kinds = [(self.global_crops_size, self.global_crops_scale, first_or_other),
                 (self.local_crops_size, self.local_crops_scale, [2] * self.local_crops_number)]
        crops = []
        for size, scale, kind in [k for k in kinds if k[2]]:  # kinds without crops skipped
            n = len(kind)
            boxes = random_resized_crop_boxes(sizes.repeat_interleave(n, 0), scale, generator)  # image-major
            x = crop_and_resize(images, boxes, n, size)
            x = x.unflatten(0, (len(images), n)).transpose(0, 1).flatten(0, 1)  # crop-major: crop k of image b at k*B+b
            x = color_augment(x, self, torch.tensor(kind).repeat_interleave(len(images)), generator)
            crops += list(x.chunk(n))
        return crops


def _uniform(n, low, high, generator):
    return low + (high - low) * torch.rand(n, generator=generator, dtype=torch.float64)


def random_resized_crop_boxes(sizes, scale, generator=None, ratio=(3 / 4, 4 / 3), attempts=10):
    """torchvision's RandomResizedCrop parameters, vectorised over images of `sizes` [N, 2] (height, width): the first
    of 10 draws that fits, else a centre crop. Returns boxes [N, 4], (x1, y1, x2, y2) pixel edges."""
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
    """Cut n boxes per image ([B * n, 4], image-major) out of uint8 images, resized to size x size by roi_align."""
    from torchvision.ops import roi_align
    device = images[0].device
    if isinstance(images, torch.Tensor):  # same-sized images: one call
        rois = torch.cat([torch.arange(len(images)).repeat_interleave(n)[:, None].double(), boxes], 1)
        x = images.float().expand(-1, 3, -1, -1) if images.shape[1] == 1 else images.float()
        return roi_align(x, to_device(rois.float(), device), size, aligned=True) / 255
    rois = to_device(torch.cat([torch.zeros(len(boxes), 1, dtype=torch.float64), boxes], 1).float(), device)
    out = torch.empty(len(boxes), 3, size, size, device=device)
    for b, img in enumerate(images):  # images of varied sizes (decoded JPEGs): one call per image, n crops each
        out[b * n:(b + 1) * n] = roi_align(img.float().expand(3, -1, -1)[None], rois[b * n:(b + 1) * n], size,
                                           aligned=True)
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
    y = F.conv2d(F.pad(y, (6, 6, 0, 0), mode="reflect"), kernel[:, None, None, :], groups=n * c)  # along the width
    y = F.conv2d(F.pad(y, (0, 0, 6, 6), mode="reflect"), kernel[:, None, :, None], groups=n * c)  # along the height
    return y.reshape(n, c, h, w)


def color_augment(x, aug, kind, generator=None):
    """Flip, colour jitter (in a random order per image), grayscale, blur, solarise with `aug`'s parameters, then
    normalise; x [N, 3, S, S] in [0, 1], kind [N]: 0 first global crop, 1 other globals, 2 locals."""
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
    """Fashion-MNIST as (images uint8 [N, 28, 28], labels [N]): from $FASHION_MNIST_DIR, Debian's
    dataset-fashion-mnist or ~/.cache/rob, else downloaded by torchvision."""
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
    """Fashion-MNIST as 28 x 28 RGB PIL images and labels; `raw`: uint8 [1, 28, 28] tensors (--gpu_augment)."""

    def __init__(self, train=True, raw=False):
        (self.images, self.targets), self.raw = load_fashion_mnist(train), raw
        self.classes = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker",
                        "Bag", "Ankle boot"]

    def __len__(self):
        return len(self.targets)

    def __getitem__(self, index):
        if self.raw:
            return self.images[index][None], int(self.targets[index])
        return Image.fromarray(self.images[index].numpy(), mode="L").convert("RGB"), int(self.targets[index])


class SyntheticDataset(Dataset):
    """Random tensors of the given shapes (uint8 images if `raw`) and labels: a benchmark of everything but data."""

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


IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")


def find_images(root):
    """The image files under `root` at any depth, as paths relative to it, sorted as a depth-first walk in name order;
    hidden files and folders and other files are ignored and each real folder is read once (a link back up the tree
    is skipped). Returns (paths, folders read, folders skipped as reached a second time through a link)."""
    root, seen, found, skipped, todo = os.path.join(root, ""), set(), [], 0, [("", True)]
    while todo:
        path, is_dir = todo.pop()
        if not is_dir:
            found.append(path)
            continue
        try:
            info = os.stat(root + path)
            if (info.st_dev, info.st_ino) in seen:
                skipped += 1
                continue
            seen.add((info.st_dev, info.st_ino))
            with os.scandir(root + path) as entries:
                items = [(e.name, e.is_dir()) for e in entries if not e.name.startswith(".") and (
                    e.is_dir() or e.name.lower().endswith(IMAGE_EXTENSIONS) and e.is_file())]
        except OSError as err:
            warnings.warn(f"skipping folder {root + path}: {err}")
            continue
        items.sort(reverse=True)
        todo += [(path + name + "/", True) if is_dir else (path + name, False) for name, is_dir in items]
    return found, len(seen), skipped


class ImageFiles(Dataset):
    """Unlabelled images (label 0): every image under a folder at any depth, class sub-folders or not, or the paths
    a text file lists (one per line, relative to the file's folder or absolute). RGB PIL images or, `raw`
    (--gpu_augment), uint8 tensors and JPEG bytes. `files`: their number and a hash of their paths (resume checks)."""

    def __init__(self, data_path, raw=False):
        if os.path.isfile(data_path):
            folder = os.path.dirname(os.path.abspath(data_path))
            with open(data_path, errors="replace") as f:
                listed = [line.strip() for line in f if line.strip() and not line.startswith("#")]
            names = [name for name in listed if os.path.isfile(os.path.join(folder, name))]
            if not names:
                raise MissingFileError(f"--data_path {data_path} lists no existing image ({len(listed)} lines; e.g. "
                                       f"{listed[:1]}): give one path per line, relative to {folder} or absolute.")
            if len(names) < len(listed):
                log(f"{len(listed) - len(names)} of the {len(listed)} paths {data_path} lists do not exist: skipped")
            paths = [os.path.join(folder, name) for name in names]
        elif os.path.isdir(data_path):
            names, folders, links = find_images(data_path)
            if not names:
                raise MissingFileError(f"--data_path {data_path} holds no {'/'.join(IMAGE_EXTENSIONS)} images in its "
                                       f"{folders} folder(s) at any depth (hidden files and folders are ignored).")
            if links:
                log(f"{data_path}: {links} link(s) to a folder already read were skipped")
            paths = [os.path.join(data_path, "") + name for name in names]
        else:
            raise MissingFileError(f"--data_path {data_path} is neither a folder nor a file: give a folder of images "
                                   "(any depth), a text file listing image paths, 'fashion-mnist' or 'synthetic'.")
        self.samples, self.raw = [(path, 0) for path in paths], raw
        self.files = f"{len(names)} images, sha1 {hashlib.sha1(chr(10).join(names).encode()).hexdigest()[:12]}"

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, index):
        path = self.samples[index][0]
        return (read_encoded(path) if self.raw else load_rgb(path)), 0


def load_rgb(path):
    """An image file as an RGB PIL image: EXIF orientation applied, transparency dropped, 16-bit and float images
    scaled to 8 bits (16-bit by 1/257; float from [0, 1], or from their own minimum and maximum otherwise)."""
    with Image.open(path) as img:
        img = ImageOps.exif_transpose(img)
        if img.mode == "P" and "transparency" in img.info:
            img = img.convert("RGBA")
        if img.mode.startswith("I") or img.mode == "F":
            low, high = img.getextrema()
            if img.mode == "F" and (low < 0 or high > 1):  # float beyond [0, 1]: its own range
                scale = 255 / max(high - low, 1e-12)
            else:
                low, scale = 0, 255 if img.mode == "F" else 1 / 257 if img.mode != "I" or high > 255 else 1
            img = img.convert("F").point(lambda v: (v - low) * scale).convert("L")
        return img.convert("RGB")


def read_encoded(path):
    """--gpu_augment's image loader: a complete JPEG as its bytes (decoded on the device), other images (and JPEGs
    with an EXIF rotation) as uint8."""
    with open(path, "rb") as f:
        data = f.read()
    if data[:2] == b"\xff\xd8" and data.rstrip(b"\0")[-2:] == b"\xff\xd9" and (
            b"Exif" not in data[:65536] or Image.open(io.BytesIO(data)).getexif().get(0x0112, 1) == 1):
        return torch.frombuffer(bytearray(data), dtype=torch.uint8)
    return T.functional.pil_to_tensor(load_rgb(path))


def build_dataset(data_path, train=True, synthetic_shapes=((3, 224, 224),), raw=False, labels=False):
    """'fashion-mnist', 'synthetic', or the images of a folder or list file (ImageFiles); `labels` (evaluation): a
    folder of class sub-folders. (PIL image, label) or, `raw` (--gpu_augment), uint8 tensors and JPEG bytes."""
    if data_path == "fashion-mnist":
        return FashionMNIST(train, raw)
    if data_path == "synthetic":
        return SyntheticDataset([(3, 256, 256)] if raw else synthetic_shapes, raw=raw)
    if not labels:
        return ImageFiles(data_path, raw)
    if not os.path.isdir(data_path):
        raise MissingFileError(f"{data_path} is not a folder: evaluation needs labels, one sub-folder of images per "
                               "class.")
    loose = [name for name in sorted(os.listdir(data_path)) if name.lower().endswith(IMAGE_EXTENSIONS)
             and not name.startswith(".")]
    if loose:
        raise UserError(f"{data_path} holds {len(loose)} image(s) outside class sub-folders (e.g. {loose[0]}): "
                        "evaluation needs labels, every image in the sub-folder of its class.")
    try:
        return datasets.ImageFolder(data_path, loader=load_rgb)
    except FileNotFoundError as err:
        raise MissingFileError(f"{data_path} has no class sub-folders with images: evaluation needs labels, one "
                               f"sub-folder of images per class. ({err})") from None


def random_subset(dataset, size, seed=0):
    if not size:
        return dataset
    if size > len(dataset):
        raise UserError(f"--subset {size} exceeds the {len(dataset)} images of the data set.")
    indices = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed))[:size]
    return torch.utils.data.Subset(dataset, sorted(indices.tolist()))


class AugmentedDataset(Dataset):
    """`transform` applied to each (image, label) of `base`, indexed by (epoch, index) keys (ResumableSampler): each
    sample's crops draw from the torch RNG seeded by (seed, epoch, index), forked (the caller's RNG is untouched), so
    they do not depend on the workers or processes and a resumed run sees the same. An unreadable image is skipped
    with a warning and flagged in `unreadable`, shared with the workers. `return_index`: (crops, index of the image
    used); `extras(rng)`, rng seeded by (seed, epoch, index, 1): ((crops, extras), label), e.g. iBOT's masks."""

    max_skips = 50

    def __init__(self, base, transform, seed=0, return_index=False, extras=None):
        self.base, self.transform, self.seed, self.return_index = base, transform, seed, return_index
        self.extras = extras
        self.unreadable = torch.zeros(len(base), dtype=torch.bool).share_memory_()

    @property
    def num_skipped(self):
        return int(self.unreadable.sum())

    def __len__(self):
        return len(self.base)

    def __getitem__(self, key):
        epoch, index = key if isinstance(key, tuple) else (0, key)
        failures = []
        for attempt in range(self.max_skips):
            i = (index + attempt) % len(self.base)
            try:
                image, label = self.base[i]
                break
            except Exception as err:  # a corrupt, truncated or vanished file must not kill a long job
                path = self.base.samples[i][0] if hasattr(self.base, "samples") else f"#{i}"
                failures.append(f"{path} ({type(err).__name__})")
                self.unreadable[i] = True
        else:
            raise UserError(f"none of {self.max_skips} images in a row from image {index} could be read (e.g. "
                            f"{'; '.join(failures[:3])}): is the dataset intact?")
        for failure in failures:
            warnings.warn(f"skipping unreadable image {failure}")
        if self.transform is not None and isinstance(image, Image.Image):
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(mix_seed(self.seed, epoch, index))
                image = self.transform(image)
        if self.extras is not None:
            image = (image, self.extras(random.Random(mix_seed(self.seed, epoch, index, 1))))
        return image, i if self.return_index else label


class ResumableSampler(DistributedSampler):
    """DistributedSampler yielding (epoch, index) keys that can start an epoch at a given batch (exact resume)."""

    def __init__(self, dataset, batch_size, seed=0):
        super().__init__(dataset, num_replicas=get_world_size(), rank=get_rank(), shuffle=True, seed=seed,
                         drop_last=True)
        self.batch_size, self.start_batch = batch_size, 0

    def set_epoch(self, epoch, start_batch=0):
        super().set_epoch(epoch)
        self.start_batch = start_batch

    def __iter__(self):
        return iter([(self.epoch, i) for i in list(super().__iter__())[self.start_batch * self.batch_size:]])

    def __len__(self):
        return super().__len__() - self.start_batch * self.batch_size


def build_loader(dataset, batch_size, num_workers, seed=0, collate_fn=None):
    """Training loader over the processes, pinned memory on GPU, persistent workers that ignore SIGTERM / SIGINT (the
    main process finishes its step, saves and stops them). Returns (loader, sampler)."""
    sampler = ResumableSampler(dataset, batch_size, seed)
    if len(sampler) < batch_size:
        raise UserError(f"{len(dataset)} images cannot fill one batch of {batch_size} per process on "
                        f"{get_world_size()} process(es): lower --batch_size_per_gpu or use more data.")
    loader = DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=num_workers,
                        pin_memory=torch.cuda.is_available(), persistent_workers=num_workers > 0, drop_last=True,
                        collate_fn=collate_fn, worker_init_fn=_ignore_stop_signals)
    return loader, sampler


def _ignore_stop_signals(worker_id):
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def collate_raw(samples):
    images, labels = zip(*samples)
    images, extras = zip(*images) if isinstance(images[0], tuple) else (images, None)
    images = torch.stack(images) if all(i.ndim == 3 and i.shape == images[0].shape for i in images) else list(images)
    return (images if extras is None else (images, torch.stack(extras))), torch.tensor(labels)


def training_data(data_path, augmentation, batch_size, num_workers, seed=0, subset=0, gpu_augment=False, extras=None):
    """The training set of `data_path` (a seeded `subset`), augmented in the loader workers or (gpu_augment) on the
    device by crops_on_device(); the loader yields (batch, image indices); `files` names the data (resume checks)."""
    base = build_dataset(data_path, synthetic_shapes=augmentation.crop_shapes, raw=gpu_augment)
    dataset = AugmentedDataset(random_subset(base, subset, seed), None if gpu_augment else augmentation, seed,
                               return_index=True, extras=extras)
    loader, sampler = build_loader(dataset, batch_size, num_workers, seed, collate_raw if gpu_augment else None)
    return SimpleNamespace(dataset=dataset, loader=loader, sampler=sampler, augmentation=augmentation,
                           gpu_augment=gpu_augment, seed=seed, files=getattr(base, "files", f"{len(base)} images"))


def crops_on_device(data, batch, indices, device, step, channels_last=False):
    """A loader batch as its crops on the device: moved, or (--gpu_augment) decoded and augmented there with a
    generator seeded by (seed, rank, step); undecodable images are flagged in data.dataset.unreadable."""
    if data.gpu_augment:
        images, failed = decode_images(batch, device)
        data.dataset.unreadable[indices[failed]] = True
        generator = torch.Generator().manual_seed(mix_seed(data.seed, get_rank(), step, 1))
        crops = data.augmentation.batch(images, generator)
    else:
        crops = [c.to(device, non_blocking=True) for c in batch]
    return [c.contiguous(memory_format=torch.channels_last) for c in crops] if channels_last else crops


def decode_images(batch, device):
    """--gpu_augment: raw images to uint8 tensors on `device`, JPEGs decoded there in one call (nvJPEG on a GPU); an
    unreadable one is replaced by another image of the batch. Returns (images, positions of the unreadable)."""
    from torchvision.io import ImageReadMode, decode_jpeg
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True), []
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
        raise UserError("no image of a batch could be decoded: is the dataset intact?")
    failed = [k for k, img in enumerate(images) if img is None]
    return [img if img is not None else good[k % len(good)] for k, img in enumerate(images)], failed


# ====================================================================================================== models
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
    """Whether student_backbone(name) gives a ViT (for per-student defaults, before the model exists)."""
    return timm.models.is_model_in_modules(STUDENT_ALIASES.get(name, name), ["vision_transformer"])


def feature_dim(model):
    """Width of the pooled feature a num_classes=0 timm model returns."""
    return getattr(model, "head_hidden_size", None) or model.num_features


def create_backbone(arch):
    """A backbone from its arch record: timm `name` and `kwargs`, `pooled_features` (a MobileNetV3's pooled stage)."""
    model = timm.create_model(arch["name"], pretrained=False, **arch["kwargs"])
    if arch.get("pooled_features"):  # MobileNetV3: the 960-d pooled features, without the 1280-d conv head
        model.conv_head, model.act2, model.head_hidden_size = nn.Identity(), nn.Identity(), model.num_features
    return model


def student_backbone(name, img_size=224, patch_size=None, drop_path_rate=0.0):
    """A random timm backbone without classifier (from the torch RNG as it is): a STUDENT_ALIASES name or any timm
    name; ViTs take any input size. Returns (model, feature width, arch record)."""
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


def projection_mlp(in_dim, hidden_dim, out_dim, nlayers=3, use_bn=False):
    """DINO's and iBOT's head MLP (GELU, BN for convnets; module names 0, 1, 2... as the official `mlp`)."""
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
    """The timm backbone of a ViT or ResNet state dict, sizes read from its tensors; a ViT's head count from
    `num_heads`, else the release's `arch_name`, else the standard widths. Returns (model, arch)."""
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


def load_file(path, what="checkpoint"):
    """torch.load (weights only; argparse.Namespace allowed, as DINO/iBOT releases hold it) a path or URL."""
    path = str(path)
    with torch.serialization.safe_globals([argparse.Namespace]):
        if path.startswith(("http://", "https://")):
            try:
                return torch.hub.load_state_dict_from_url(path, map_location="cpu", weights_only=True)
            except Exception as err:
                raise UserError(f"could not download the {what} {path} ({err}). Without internet, download it "
                                "elsewhere and pass the local file path instead.") from err
        if not os.path.isfile(path):
            raise MissingFileError(f"{what} not found: {path}")
        try:
            return torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:
            reason = str(err).strip().splitlines()[0].split(". ")[0] if str(err).strip() else type(err).__name__
            raise UnreadableFileError(f"cannot read the {what} {path}: is it a complete PyTorch checkpoint (an "
                                      f"interrupted download or copy leaves a truncated file)? ({reason})") from None


def source_of(name_or_path, names, url, what):
    """--teacher: the address of a known release, else a local file; an unknown name lists the known ones."""
    if name_or_path in names:
        return url(name_or_path)
    if not os.path.exists(name_or_path) and not any(c in name_or_path for c in "/\\.") and \
            not name_or_path.startswith("http"):
        raise UserError(f"unknown --teacher '{name_or_path}': give one of {', '.join(names)} or the path of a {what}")
    return name_or_path


def strip_prefix(sd, *prefixes):
    for prefix in prefixes:
        sd = {k[len(prefix):] if k.startswith(prefix) else k: v for k, v in sd.items()}
    return sd


def sub_state_dict(sd, prefix):
    return {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}


def load_strict(module, sd, source, expected):
    own = module.state_dict()
    missing, unexpected = [k for k in own if k not in sd], [k for k in sd if k not in own]
    mis_shaped = [f"{k}: file {tuple(sd[k].shape)} vs model {tuple(own[k].shape)}"
                  for k in own if k in sd and sd[k].shape != own[k].shape]
    if missing or unexpected or mis_shaped:
        def show(keys):
            return ", ".join(keys[:8]) + (f" ... ({len(keys)} in all)" if len(keys) > 8 else "") or "none"
        raise UserError(f"{source} does not match the expected format ({expected}): missing keys: {show(missing)}; "
                        f"unexpected keys: {show(unexpected)}; wrong shapes: {show(mis_shaped)}")
    module.load_state_dict(sd)


def fold_weight_norm(sd, layers=("last_layer",)):
    """Weight-normalised layers (official weight_g / weight_v or torch's parametrization) folded to g * v / ||v||."""
    sd = dict(sd)
    for layer in layers:
        param = f"{layer}.parametrizations.weight.original"
        for g_key, v_key in [(f"{layer}.weight_g", f"{layer}.weight_v"), (param + "0", param + "1")]:
            if g_key in sd:
                g, v = sd.pop(g_key).float(), sd.pop(v_key).float()
                sd[f"{layer}.weight"] = g * v / v.norm(dim=1, keepdim=True)
    return sd


TEACHER_PARTS = {"rob_dino": ("a DINO", "its DINO head"), "rob_msn": ("an MSN", "its projection head and prototypes"),
                 "rob_ibot": ("an iBOT", "its iBOT head (CLS and patch outputs)"),
                 "rob_swav": ("a SwAV", "its projection head and prototypes ('module.prototypes.weight')")}


def teacher_parts(ckpt, source, method, release, num_heads=None):
    """Read a --teacher file of `method` (rob_dino...): a checkpoint.pth of that script (its EMA teacher if it saved
    one, else its student) or an official release (DINO / iBOT: `teacher`; MSN: `target_encoder`, `prototypes`; SwAV:
    flat). Returns (the backbone, loaded strictly; the head's state dict; MSN's prototypes or None). Any other file is
    refused naming the fix: the script it belongs to, or `release`, an official file with the head."""
    if not isinstance(ckpt, dict):
        raise UserError(f"{source} is not a checkpoint dictionary")
    (kind, needs), teacher = TEACHER_PARTS[method], ckpt.get("teacher")
    flat = strip_prefix(ckpt.get("state_dict", ckpt), "module.")
    owner = ckpt.get("method") or ("rob_msn" if "target_encoder" in ckpt else
                                   "rob_ibot" if isinstance(teacher, dict) and any("last_layer2" in k for k in teacher)
                                   else "rob_dino" if isinstance(teacher, dict) else
                                   "rob_swav" if "prototypes.weight" in flat else None)
    if ckpt.get("method") not in (None, method):
        raise UserError(f"{source} was written by {owner}.py, not {method}.py: {kind} teacher needs {needs}. Use "
                        f"{owner}.py with it, or give {kind} checkpoint.")
    if owner not in (None, method):
        raise UserError(f"{source} is {TEACHER_PARTS[owner][0]} checkpoint: use {owner}.py with it.")
    if owner is None and ("cls_token" in flat or "conv1.weight" in flat):
        raise UserError(f"{source} holds a backbone only; {kind} teacher needs {needs} too, which the full releases "
                        f"contain, e.g. {release}")
    if owner is None:
        raise UserError(f"{source} is not {kind} checkpoint (expected {needs}).")
    if ckpt.get("method") == method:  # this script's: its EMA teacher (a baseline run), else its student
        sd, arch = teacher or ckpt["student"], ckpt["arch"]
        prototypes = ckpt.get("student", {}).get("prototypes") if teacher else None  # plain MSN's are the student's
        backbone = create_backbone({**arch, "kwargs": {**arch["kwargs"], "drop_path_rate": 0.0}})
        load_strict(backbone, sub_state_dict(sd, "backbone."), source, f"{method}.py checkpoint")
        return backbone, sub_state_dict(sd, "head."), None if prototypes is None else prototypes.float()
    if method == "rob_msn":
        if "prototypes" not in ckpt:
            raise UserError(f"{source} has a target encoder but no prototypes: give the complete MSN release, e.g. "
                            f"{release}")
        sd = strip_prefix(ckpt["target_encoder"], "module.")
        backbone_sd = {k: v for k, v in sd.items() if not k.startswith("fc.")}
        head_sd, prototypes = sub_state_dict(sd, "fc."), ckpt["prototypes"].float()
        if "fc1.weight" not in head_sd:
            raise UserError(f"{source}: the target encoder has no projection head (fc.fc1 ... fc.fc3)")
    elif method == "rob_swav":  # stored in fp16
        flat = {k: v.float() if torch.is_tensor(v) and v.is_floating_point() else v for k, v in flat.items()}
        head_sd = {k: v for k, v in flat.items() if k.startswith(("projection_head.", "prototypes."))}
        backbone_sd, prototypes = {k: v for k, v in flat.items() if k not in head_sd}, None
    else:  # DINO and iBOT full checkpoints: the teacher network (args.arch names its ViT's heads)
        sd = strip_prefix(teacher, "module.")
        backbone_sd, head_sd, prototypes = sub_state_dict(sd, "backbone."), sub_state_dict(sd, "head."), None
    try:
        backbone, _ = backbone_from_state_dict(backbone_sd, num_heads, getattr(ckpt.get("args"), "arch", None))
    except UserError as err:
        raise UserError(f"{source}: {err}. Use a standard release, e.g. {release}") from None
    load_strict(backbone, backbone_sd, source, f"{kind} release's backbone")
    return backbone, head_sd, prototypes


def mlp_sizes(sd):
    """The arguments of projection_mlp (in_dim, hidden_dim, out_dim, nlayers, use_bn) that built `sd`."""
    linears = sorted(int(k.split(".")[0]) for k in sd if sd[k].ndim == 2)
    first, last = sd[f"{linears[0]}.weight"], sd[f"{linears[-1]}.weight"]
    return dict(in_dim=first.shape[1], hidden_dim=first.shape[0], out_dim=last.shape[0], nlayers=len(linears),
                use_bn=any(k.endswith("running_mean") for k in sd))


class MultiCropNetwork(nn.Module):
    """Backbone + head over crops: a backbone pass per run of same-sized crops, one head pass, outputs crop-major."""

    def __init__(self, backbone, head):
        super().__init__()
        self.backbone, self.head = backbone, head

    def forward(self, crops):
        same_size_runs = itertools.groupby(crops, key=lambda crop: crop.shape[-1])
        return self.head(torch.cat([self.backbone(torch.cat(list(run))) for _, run in same_size_runs]))


def save_atomic(obj, path):
    """torch.save through a temporary file of this process and a rename: a crash or a kill mid-write never leaves a
    broken `path`, and a failed write leaves no temporary file. A full disk is a UserError."""
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
    """Save the student backbone as a timm state dict (the classifier zeroed) that timm.create_model(name,
    pretrained=True, pretrained_cfg_overlay=dict(file=path, custom_load=False), **kwargs) loads strictly
    (num_classes=N: a fresh classifier; custom_load=False as timm's ViT weights are .npz). Returns that call."""
    kwargs = {k: v for k, v in arch["kwargs"].items() if k not in ("num_classes", "drop_path_rate")}
    full = timm.create_model(arch["name"], pretrained=False, **kwargs)
    result = full.load_state_dict(backbone.state_dict(), strict=False)
    assert not result.unexpected_keys, result.unexpected_keys
    for name in result.missing_keys:  # the classifier, zeroed; a pooled MobileNetV3's untrained conv head keeps
        if not name.startswith("conv_head."):  # timm's initialisation (the student learned the 960-d pooled features)
            full.get_parameter(name).data.zero_()
    save_atomic({k: v.detach().cpu() for k, v in full.state_dict().items()}, path)
    call = (f"timm.create_model({arch['name']!r}, pretrained=True, pretrained_cfg_overlay=dict(file={str(path)!r}, "
            f"custom_load=False){''.join(f', {k}={v!r}' for k, v in kwargs.items())})")
    return call + ("; then model.conv_head = model.act2 = torch.nn.Identity() for the trained 960-d pooled features"
                   if arch.get("pooled_features") else "")


def freeze(model):
    return model.eval().requires_grad_(False)


def place_student(student, device):
    """The student on the device: channels-last if a convnet, BatchNorm over the global batch, wrapped in DDP on
    several processes (rank 0's weights everywhere). Returns (student, the network a step calls)."""
    student = sync_batchnorm(student.to(device))
    if not is_vit(student.backbone):
        student = student.to(memory_format=torch.channels_last)
    return student, student if get_world_size() == 1 else nn.parallel.DistributedDataParallel(
        student, device_ids=[device.index] if device.type == "cuda" else None)


def place_teacher(teacher, device, dtype, low_precision=()):
    teacher.to(device)
    for module in low_precision:
        module.to(dtype)
    return teacher if is_vit(teacher.backbone) else teacher.to(memory_format=torch.channels_last)


def check_patch(backbone, crop_size):
    patch = getattr(getattr(backbone, "patch_embed", None), "patch_size", (1,))[0]
    if crop_size % patch:
        raise UserError(f"--global_crops_size {crop_size} is not a multiple of the teacher's patch size {patch}: "
                        "the teacher sees the global crops.")


def compile_network(network):
    """torch.compile a network in place (same checkpoint keys); a ViT without stochastic depth per block (fast)."""
    backbone = network.backbone
    if is_vit(backbone) and len({repr(block.drop_path1) for block in backbone.blocks}) == 1:
        for block in backbone.blocks:
            block.compile()
    else:
        backbone.compile()
    network.head.compile()


def sync_batchnorm(module):
    """BatchNorm over the global batch when several processes train (a no-op without BN layers): SyncBatchNorm on GPUs,
    ProcessGroupBatchNorm on CPUs (gloo): every process then takes the same step, with the same running statistics."""
    if get_world_size() > 1 and torch.cuda.is_available():
        return nn.SyncBatchNorm.convert_sync_batchnorm(module)
    if get_world_size() > 1:
        for name, child in module.named_children():
            if isinstance(child, nn.modules.batchnorm._BatchNorm):  # the same parameter and buffer tensors
                replacement = ProcessGroupBatchNorm(child.num_features, child.eps, child.momentum, child.affine)
                for key in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked"):
                    setattr(replacement, key, getattr(child, key))
                setattr(module, name, replacement.train(child.training))
            else:
                sync_batchnorm(child)
    return module


class ProcessGroupBatchNorm(nn.modules.batchnorm._BatchNorm):
    """What SyncBatchNorm does, without CUDA: in training, the mean and variance of each channel over the global
    batch (sums all-reduced, with their gradient), the running statistics updated with them."""

    def _check_input_dim(self, x):
        pass

    def forward(self, x):
        if not (self.training and dist.is_initialized()):
            return super().forward(x)
        dims, c, shape = [0] + list(range(2, x.dim())), x.shape[1], [1, x.shape[1]] + [1] * (x.dim() - 2)
        count = x.new_tensor([x.numel() / c])
        sums = torch.distributed.nn.functional.all_reduce(torch.cat([x.sum(dims), (x * x).sum(dims), count]))
        total = sums[-1]
        mean, var = sums[:c] / total, sums[c:2 * c] / total - (sums[:c] / total) ** 2
        with torch.no_grad():
            self.running_mean.lerp_(mean, self.momentum)
            self.running_var.lerp_(var * total / (total - 1), self.momentum)
            self.num_batches_tracked += 1
        y = (x - mean.view(shape)) * torch.rsqrt(var.view(shape) + self.eps)
        return y * self.weight.view(shape) + self.bias.view(shape) if self.affine else y
