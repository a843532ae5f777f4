"""The multi-crop augmentation of common.MultiCropAugmentation on a whole batch at once, on the GPU
(--gpu_augment): loader workers only read files (read_encoded, collate_raw), JPEGs are decoded on the device in
one batched call (decode_images) and the crops are cut, resized and colour-augmented as tensors (multi_crop).
The parameters are drawn on the host from the same distributions as the per-image PIL path; on CPU tensors it
also runs, about ten times faster than PIL for small images. Its own module because it is 200 lines that only
this option needs."""
import math
import warnings

import numpy
import torch
from PIL import Image

import common


def multi_crop(aug, images, generator=None):
    """MultiCropAugmentation `aug` on a whole batch of uint8 images at once, on their device (--gpu_augment):
    `images` is a [B, C, H, W] tensor or a list of [C, H_i, W_i] tensors (C = 1 or 3). The parameters are
    drawn per image and crop from the same distributions as the per-image path; crops are cut and resized
    with roi_align (bilinear with area averaging) instead of PIL's bicubic filter. Returns the crop list."""
    sizes = torch.tensor([(img.shape[-2], img.shape[-1]) for img in images], dtype=torch.float64)
    n_crops = aug.global_crops_number + aug.local_crops_number
    kinds = [(aug.global_crops_size, aug.global_crops_scale, [min(i, 1) for i in range(aug.global_crops_number)]),
             (aug.local_crops_size, aug.local_crops_scale, [2] * aug.local_crops_number)]
    crops = []
    for size, scale, blur_index in kinds:
        n = len(blur_index)
        if n == 0:
            continue
        boxes = random_resized_crop_boxes(sizes.repeat_interleave(n, 0), scale, generator)  # image-major
        x = crop_and_resize(images, boxes, n, size)
        x = x.unflatten(0, (len(images), n)).transpose(0, 1).flatten(0, 1)  # crop-major: crop k of image b at k * B + b
        x = color_augment(x, aug, torch.tensor(blur_index).repeat_interleave(len(images)), generator)
        crops += list(x.chunk(n))
    assert len(crops) == n_crops
    return crops


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
        return roi_align(x, common.to_device(rois.float(), device), size, aligned=True) / 255
    rois = common.to_device(torch.cat([torch.zeros(len(boxes), 1, dtype=torch.float64), boxes], 1).float(), device)
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
    pad, conv = torch.nn.functional.pad, torch.nn.functional.conv2d
    y = conv(pad(y, (6, 6, 0, 0), mode="reflect"), kernel[:, None, None, :], groups=n * c)  # along the width
    y = conv(pad(y, (0, 0, 6, 6), mode="reflect"), kernel[:, None, :, None], groups=n * c)  # along the height
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
    factors = common.to_device(factors.to(x.dtype), dev)
    order = torch.argsort(u[:, 5:9], dim=1)  # a random permutation of the four colour adjustments per image
    jitter = u[:, 9] < aug.color_jitter_p
    blur_p, solarize_p = (torch.tensor(p, dtype=torch.float64)[kind] for p in (aug.blur_p, aug.solarize_p))

    def apply(mask, fn):  # x[mask] = fn(x[mask], that subset's factors)
        rows = common.to_device(mask.nonzero()[:, 0], dev)
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
    replaced by another image of the batch with a warning. Returns (a tensor [B, C, H, W] or a list, the
    positions in the batch of the unreadable images)."""
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
        raise common.UnreadableFileError("no image of a batch could be decoded: is the dataset intact?")
    failed = [k for k, img in enumerate(images) if img is None]
    return [img if img is not None else good[k % len(good)] for k, img in enumerate(images)], failed
