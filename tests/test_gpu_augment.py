"""--gpu_augment's batched augmentation (run here on CPU tensors): same parameter distributions as the
per-image PIL path, same colour operations as torchvision, decoding equal to PIL's."""
import io

import pytest
import torch
from PIL import Image
from torchvision import transforms as T1
from torchvision.transforms.v2 import functional as TF

import common


def no_colour(**overrides):
    """An augmentation with every colour operation off unless overridden (to observe one at a time)."""
    params = dict(global_crops_size=16, local_crops_size=8, global_crops_number=2, local_crops_number=1,
                  color_jitter=(0.0, 0.0, 0.0, 0.0), color_jitter_p=0.0, grayscale_p=0.0, blur_p=(0.0, 0.0, 0.0),
                  solarize_p=(0.0, 0.0, 0.0), mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))
    return common.MultiCropAugmentation(**{**params, **overrides})


def test_crop_boxes_follow_torchvision_random_resized_crop():
    height, width, n = 60, 100, 20000
    generator = torch.Generator().manual_seed(0)
    boxes = common.random_resized_crop_boxes(torch.tensor([[height, width]] * n, dtype=torch.float64), (0.05, 0.4),
                                             generator)
    w, h = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    assert (boxes[:, 0] >= 0).all() and (boxes[:, 1] >= 0).all() and (boxes[:, 2] <= width).all() and (boxes[:, 3] <= height).all()
    assert torch.equal(boxes, boxes.round())  # integer pixel boxes, as torchvision's
    torch.manual_seed(0)
    reference = torch.tensor([T1.RandomResizedCrop.get_params(torch.zeros(3, height, width), (0.05, 0.4), (3 / 4, 4 / 3))
                              for _ in range(n)], dtype=torch.float64)  # (top, left, h, w)
    for ours, theirs in [(w * h / (height * width), reference[:, 2] * reference[:, 3] / (height * width)),
                         (torch.log(w / h), torch.log(reference[:, 3] / reference[:, 2])),
                         (boxes[:, 0] + w / 2, reference[:, 1] + reference[:, 3] / 2)]:
        quantiles = torch.tensor([0.05, 0.25, 0.5, 0.75, 0.95], dtype=torch.float64)
        spread = theirs.std().item()
        assert torch.allclose(ours.quantile(quantiles), theirs.quantile(quantiles), atol=0.05 * spread)


def test_crop_fallback_is_a_centre_crop_of_clipped_aspect_ratio():
    sizes = torch.tensor([[10.0, 200.0]] * 50, dtype=torch.float64)  # 1:20, no random box of ratio <= 4/3 fits
    boxes = common.random_resized_crop_boxes(sizes, (0.9, 1.0), torch.Generator().manual_seed(1))
    w, h = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    assert torch.all(h == 10) and torch.all(w == round(10 * 4 / 3)) and torch.all(boxes[:, 0] == (200 - 13) // 2)


def test_crop_and_resize_cuts_the_right_region():
    ramp = torch.arange(100, dtype=torch.float64).repeat(3, 60, 1)  # pixel value = its x coordinate
    image = ramp.round().to(torch.uint8)
    boxes = torch.tensor([[20.0, 10, 60, 50], [0, 0, 10, 60]], dtype=torch.float64)
    out = common.crop_and_resize(image[None], boxes, 2, 8) * 255
    assert abs(out[0].mean().item() - 39.5) < 0.5 and abs(out[1].mean().item() - 4.5) < 0.5  # column centres
    same = common.crop_and_resize([image], boxes, 2, 8) * 255
    torch.testing.assert_close(out, same)


def rates(aug, images, detect, draws=12):
    generator = torch.Generator().manual_seed(2)
    hits = torch.cat([torch.cat([detect(c) for c in aug.batch(images, generator)]) for _ in range(draws)])
    return hits.float().mean().item()


def test_flip_grayscale_and_solarize_rates():
    image = torch.zeros(3, 16, 16, dtype=torch.uint8)
    image[0, :, :8], image[1, :, 8:], image[2] = 230, 90, 200  # red-left / green-right, asymmetric
    images = image[None].repeat(128, 1, 1, 1)
    full = dict(global_crops_scale=(1.0, 1.0), local_crops_scale=(1.0, 1.0))
    flipped = rates(no_colour(**full), images, lambda c: c[:, 0, :, 0].mean(1) < c[:, 0, :, -1].mean(1))
    assert abs(flipped - 0.5) < 0.03
    gray = rates(no_colour(grayscale_p=0.2, **full), images, lambda c: (c[:, 0] - c[:, 1]).abs().amax((1, 2)) < 1e-6)
    assert abs(gray - 0.2) < 0.03
    solarized = rates(no_colour(solarize_p=(0.0, 0.6, 0.0), **full), images,
                      lambda c: c[:, 2].mean((1, 2)) < 0.5)  # blue 200/255 -> 55/255 when solarised
    assert abs(solarized - 0.6 / 3) < 0.03  # only the second of three crops is solarised, with p 0.6


def test_blur_rates_and_sigmas_per_crop_kind(monkeypatch):
    calls = []

    def spy_blur(x, sigma):  # observe which crops the dispatch sends to the blur, and with which sigma
        calls.append(sigma.clone())
        return torch.full_like(x, -1.0)

    monkeypatch.setattr(common, "_blur", spy_blur)
    aug = no_colour(blur_p=(1.0, 0.1, 0.5), global_crops_scale=(1.0, 1.0), local_crops_scale=(1.0, 1.0), local_crops_size=16)
    generator = torch.Generator().manual_seed(3)
    per_kind = torch.stack([torch.stack([(c[:, 0, 0, 0] == -1).float().mean() for c in
                                         aug.batch(torch.zeros(256, 3, 16, 16, dtype=torch.uint8), generator)])
                            for _ in range(12)]).mean(0)  # crops: first global, second global, local
    torch.testing.assert_close(per_kind, torch.tensor([1.0, 0.1, 0.5]), atol=0.03, rtol=0)
    sigmas = torch.cat(calls)
    assert sigmas.min() >= 0.1 and sigmas.max() <= 2.0 and abs(sigmas.mean().item() - 1.05) < 0.03


def test_jitter_factor_ranges_and_probability():
    images = torch.full((256, 3, 8, 8), 100, dtype=torch.uint8)
    aug = no_colour(color_jitter=(0.4, 0.0, 0.0, 0.0), color_jitter_p=0.8, global_crops_scale=(1.0, 1.0),
                    global_crops_size=8, global_crops_number=1, local_crops_number=0)
    generator = torch.Generator().manual_seed(4)
    factors = torch.cat([aug.batch(images, generator)[0][:, 0, 0, 0] * 255 / 100 for _ in range(20)])
    changed = (factors - 1).abs() > 1e-4
    assert abs(changed.float().mean().item() - 0.8) < 0.03
    assert factors.min() >= 0.6 - 1e-4 and factors.max() <= 1.4 + 1e-4
    assert abs(factors[changed].mean().item() - 1.0) < 0.02 and factors[changed].std() > 0.2  # ~U(0.6, 1.4)


@pytest.mark.parametrize("op", ["brightness", "contrast", "saturation", "hue"])
def test_colour_operations_equal_torchvision_per_image(op):
    torch.manual_seed(5)
    x = torch.rand(6, 3, 12, 12)
    factor = torch.rand(6) * 0.8 + 0.6 if op != "hue" else torch.rand(6) * 0.4 - 0.2
    reference = torch.stack([getattr(TF, f"adjust_{op}")(x[i], factor[i].item()) for i in range(6)])
    index = ["brightness", "contrast", "saturation", "hue"].index(op)
    jitter = [0.0] * 4
    jitter[index] = 0.4 if op != "hue" else 0.2
    aug = no_colour(color_jitter=tuple(jitter), color_jitter_p=1.0)
    ours = {"brightness": lambda: (x * factor[:, None, None, None]).clamp(0, 1),
            "hue": lambda: common._shift_hue(x, factor)}
    if op in ours:
        torch.testing.assert_close(ours[op](), reference, atol=1e-5, rtol=0)
    # and through color_augment: a single active adjustment applied with the drawn factor matches torchvision
    generator = torch.Generator().manual_seed(6)
    out = common.color_augment(x.clone(), aug, torch.zeros(6, dtype=torch.long), generator)
    u = torch.rand(6, 13, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    drawn = (1 - jitter[index] + 2 * jitter[index] * u[:, index]) if op != "hue" else jitter[3] * (2 * u[:, 3] - 1)
    expected = torch.stack([getattr(TF, f"adjust_{op}")(x[i], drawn[i].item()) for i in range(6)])
    unflipped = torch.stack([o if torch.allclose(o, e, atol=1e-4) else o.flip(-1) for o, e in zip(out, expected)])
    torch.testing.assert_close(unflipped, expected, atol=1e-4, rtol=0)


def test_blur_equals_torchvision_gaussian_blur():
    torch.manual_seed(7)
    x = torch.rand(4, 3, 20, 20)
    sigma = torch.tensor([0.1, 0.7, 1.3, 2.0])
    reference = torch.stack([TF.gaussian_blur(x[i], kernel_size=13, sigma=sigma[i].item()) for i in range(4)])
    torch.testing.assert_close(common._blur(x, sigma), reference, atol=1e-5, rtol=0)


def test_batch_output_shapes_dtypes_and_ranges():
    aug = common.MultiCropAugmentation(global_crops_size=32, local_crops_size=16, local_crops_number=3)
    images = [torch.randint(0, 256, (3, 40 + 7 * i, 50), dtype=torch.uint8) for i in range(5)]
    crops = aug.batch(images, torch.Generator().manual_seed(8))
    assert [tuple(c.shape) for c in crops] == [(5, 3, 32, 32)] * 2 + [(5, 3, 16, 16)] * 3
    mean, std = torch.tensor(common.IMAGENET_MEAN)[:, None, None], torch.tensor(common.IMAGENET_STD)[:, None, None]
    for crop in crops:
        assert crop.dtype == torch.float32
        pixels = crop * std + mean
        assert pixels.min() >= -1e-4 and pixels.max() <= 1 + 1e-4
    gray = aug.batch(torch.randint(0, 256, (4, 1, 28, 28), dtype=torch.uint8), torch.Generator().manual_seed(9))
    assert gray[0].shape == (4, 3, 32, 32)


def jpeg_bytes(array, quality=95):
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def test_decode_equals_pil_within_jpeg_tolerance(tmp_path):
    torch.manual_seed(10)
    smooth = torch.nn.functional.interpolate(torch.rand(1, 3, 12, 16), size=(48, 64), mode="bilinear")[0]
    array = (smooth * 255).byte().permute(1, 2, 0).numpy()
    (tmp_path / "a.jpg").write_bytes(jpeg_bytes(array))
    Image.fromarray(array).save(tmp_path / "b.png")
    encoded, png = common.read_encoded(tmp_path / "a.jpg"), common.read_encoded(tmp_path / "b.png")
    assert encoded.ndim == 1 and png.shape == (3, 48, 64)  # JPEG stays bytes for the device, PNG is decoded
    decoded, failed = common.decode_images([encoded, png], torch.device("cpu"))
    assert failed == []
    pil = torch.from_numpy(__import__("numpy").asarray(Image.open(tmp_path / "a.jpg").convert("RGB"))).permute(2, 0, 1)
    assert (decoded[0].float() - pil.float()).abs().mean() < 1.0 and (decoded[0].float() - pil.float()).abs().max() <= 8
    assert torch.equal(decoded[1], torch.from_numpy(array).permute(2, 0, 1))


def test_broken_jpegs_are_handled(tmp_path):
    array = (torch.rand(32, 32, 3) * 255).byte().numpy()
    good = jpeg_bytes(array)
    (tmp_path / "cut.jpg").write_bytes(good[: len(good) // 2])
    with pytest.raises(Exception):
        common.read_encoded(tmp_path / "cut.jpg")  # truncated: decoded by PIL in the worker, which fails -> skipped
    garbage = torch.frombuffer(bytearray(b"\xff\xd8" + b"\x00" * 200 + b"\xff\xd9"), dtype=torch.uint8)
    with pytest.warns(UserWarning, match="undecodable"):
        images, failed = common.decode_images([torch.frombuffer(bytearray(good), dtype=torch.uint8), garbage],
                                                   torch.device("cpu"))
    assert torch.equal(images[1], images[0]) and failed == [1]  # replaced by another image of the batch, reported
