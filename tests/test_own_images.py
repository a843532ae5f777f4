"""Training on a user's own unlabelled images (common.ImageFiles): any folder at any depth or a list file, the image
formats users have, a fixed order that resumes exactly, clear errors; evaluation still asks for class folders."""
import os
import shutil

import pytest
import torch
from PIL import Image
from torchvision.transforms.v2.functional import pil_to_tensor

import common
from test_reliability import flags, in_process, weights


def save(path, array, **kwargs):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array.numpy()).save(path, **kwargs)
    return path


def pixels(image):
    return pil_to_tensor(image).permute(1, 2, 0).double()


def random_rgb(h, w, seed):
    return torch.randint(0, 256, (h, w, 3), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)


def test_a_folder_is_read_at_any_depth_each_real_folder_once(tmp_path):
    root = tmp_path / "data"
    for name in ("top1.png", "TOP2.JPG", "a/img.bmp", "a/b/c/deep.webp", "cls/one.tif", ".hidden.png", ".cache/x.png"):
        save(root / name, random_rgb(8, 8, 0))
    (root / "notes.txt").write_text("not an image")
    (root / "a" / "b" / "c" / "broken.png.part").write_text("")
    os.symlink(".", root / "loop")  # a loop onto itself, one back to the top, a second way into a/b
    os.symlink("..", root / "a" / "up")
    os.symlink("a/b", root / "alias")
    found, folders, links = common.find_images(str(root))
    assert found == ["TOP2.JPG", "a/b/c/deep.webp", "a/img.bmp", "cls/one.tif", "top1.png"]
    assert folders == 5 and links == 3  # root, a, a/b, a/b/c, cls; loop, up and alias skipped
    dataset = common.build_dataset(str(root))
    assert [p for p, _ in dataset.samples] == [os.path.join(str(root), f) for f in found] and len(dataset) == 5
    assert all(dataset[i][0].mode == "RGB" and dataset[i][1] == 0 for i in range(5))
    # images at the top and in one class folder: all are used for training (an ImageFolder would take 1 of 5);
    # evaluation needs labels, so it refuses them instead of dropping the top-level ones
    with pytest.raises(common.UserError, match="2 image.* outside class sub-folders .*every image in the sub-folder"):
        common.build_dataset(str(root), labels=True)
    flat = tmp_path / "flat"
    save(flat / "x.png", random_rgb(8, 8, 0))
    with pytest.raises(common.UserError, match="outside class sub-folders"):
        common.build_dataset(str(flat), labels=True)
    (tmp_path / "classless" / "empty").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="no class sub-folders with images: evaluation needs labels"):
        common.build_dataset(str(tmp_path / "classless"), labels=True)


def test_a_list_file_names_the_images(tmp_path, capsys):
    save(tmp_path / "imgs" / "a.png", random_rgb(8, 8, 1))
    other = save(tmp_path / "elsewhere" / "b.jpg", random_rgb(8, 8, 2))
    listing = tmp_path / "imgs" / "train.txt"
    listing.write_text(f"a.png\n\n# a comment\n{other}\nmissing.png\n")
    dataset = common.build_dataset(str(listing))
    assert [p for p, _ in dataset.samples] == [str(tmp_path / "imgs" / "a.png"), str(other)]
    assert "1 of the 3 paths" in capsys.readouterr().out
    assert torch.equal(pixels(dataset[0][0]), random_rgb(8, 8, 1).double())
    listing.write_text("a.jpg\n")
    with pytest.raises(FileNotFoundError, match=r"lists no existing image .*relative to .*imgs or absolute"):
        common.build_dataset(str(listing))


def test_empty_and_missing_data_paths_are_one_clear_error(tmp_path):
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    (tmp_path / "empty" / "notes.txt").write_text("")
    save(tmp_path / "empty" / ".thumbs" / "x.png", random_rgb(4, 4, 0))
    with pytest.raises(FileNotFoundError, match=r"holds no \.jpg/.*images in its 2 folder\(s\) at any depth"):
        common.build_dataset(str(tmp_path / "empty"))
    with pytest.raises(FileNotFoundError, match="is neither a folder nor a file"):
        common.build_dataset(str(tmp_path / "missing"))


def test_formats_are_read_as_8_bit_rgb_upright(tmp_path):
    rgb = random_rgb(30, 40, 3)
    for ext in ("png", "bmp", "tif", "webp"):
        kwargs = {"lossless": True} if ext == "webp" else {}
        assert torch.equal(pixels(common.load_rgb(save(tmp_path / f"x.{ext}", rgb, **kwargs))), rgb.double()), ext
    gray = rgb[..., 0]
    assert torch.equal(pixels(common.load_rgb(save(tmp_path / "gray.png", gray))), gray[..., None].expand(30, 40, 3))
    rgba = torch.cat([rgb, torch.full((30, 40, 1), 7, dtype=torch.uint8)], dim=2)
    assert torch.equal(pixels(common.load_rgb(save(tmp_path / "rgba.png", rgba))), rgb.double())
    palette = Image.fromarray(rgb.numpy()).quantize(16)
    palette.save(tmp_path / "p.png", transparency=0)
    assert torch.equal(pixels(common.load_rgb(tmp_path / "p.png")), pixels(palette.convert("RGB")))
    # 16 bits: v / 257; float in [0, 1]: v * 255; other floats from their own range (float64 references, rounded)
    wide = torch.randint(0, 65536, (30, 40), generator=torch.Generator().manual_seed(4), dtype=torch.int32)
    Image.fromarray(wide.numpy().astype("uint16")).save(tmp_path / "16bit.png")
    assert Image.open(tmp_path / "16bit.png").mode.startswith("I")
    unit = torch.rand(30, 40, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    wild = unit * 3000 - 1000
    for name, values, expected in [("16bit.png", None, wide.double() / 257), ("unit.tif", unit, unit * 255),
                                   ("wild.tif", wild, (wild - wild.min()) / (wild.max() - wild.min()) * 255)]:
        if values is not None:
            Image.fromarray(values.float().numpy()).save(tmp_path / name)
        got = pixels(common.load_rgb(tmp_path / name))
        assert (got - expected[..., None]).abs().max() <= 1, name  # rounded or truncated to 8 bits
        assert got.std() > 50, name  # not clipped to white or black
    # EXIF orientation 6: shown rotated 90 degrees clockwise, on the PIL path and --gpu_augment's reader
    exif = Image.Exif()
    exif[0x0112] = 6
    blocks = rgb[::10, ::10].repeat_interleave(10, 0).repeat_interleave(10, 1)  # 3 x 4 flat blocks: JPEG-safe
    rotated = save(tmp_path / "rotated.jpg", blocks, exif=exif, quality=100, subsampling=0)
    upright = torch.rot90(blocks.double(), k=-1, dims=(0, 1))
    assert (pixels(common.load_rgb(rotated)) - upright).abs().mean() < 3
    assert torch.equal(common.read_encoded(rotated), pil_to_tensor(common.load_rgb(rotated)))
    plain = save(tmp_path / "plain.jpg", rgb, quality=100)
    assert common.read_encoded(plain).ndim == 1  # bytes: decoded on the device


def mixed_folder(root, small_folder):
    """20 real Fashion-MNIST images in six formats and modes, flat and one level down, sizes differing."""
    sources = sorted(small_folder.rglob("*.png"))[:20]
    for i, src in enumerate(sources):
        image = Image.open(src).convert("L").resize((28 + i % 3 * 4, 28 + i % 2 * 6))
        kind = i % 6
        folder = root if i % 2 else root / "shard1"
        folder.mkdir(parents=True, exist_ok=True)
        if kind == 0:
            image.save(folder / f"{i}.png")
        elif kind == 1:
            image.convert("RGB").save(folder / f"{i}.jpg", quality=90)
        elif kind == 2:
            image.convert("RGBA").save(folder / f"{i}.webp")
        elif kind == 3:
            image.convert("P").save(folder / f"{i}.bmp")
        elif kind == 4:
            Image.fromarray(pil_to_tensor(image)[0].int().mul(257).numpy().astype("uint16")).save(folder / f"{i}.png")
        else:
            exif = Image.Exif()
            exif[0x0112] = 8
            image.convert("RGB").transpose(Image.Transpose.ROTATE_270).save(folder / f"{i}.JPEG", exif=exif)
    return root


@pytest.mark.parametrize("gpu_augment", [False, True])
def test_a_folder_of_mixed_formats_trains_and_resumes_exactly(tmp_path, small_folder, gpu_augment):
    data = mixed_folder(tmp_path / "data", small_folder)
    extra = ["--batch_size_per_gpu", "5"] + (["--gpu_augment"] if gpu_augment else [])
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    assert in_process("rob_dino", flags("rob_dino", "rob", data, straight, extra + ["--epochs", "2"])) == 0  # 4 steps
    saved = common.load_file(straight / "checkpoint0001.pth")
    assert saved["step"] == 4 and saved["data"].startswith("20 images, sha1 ")
    resumed.mkdir()
    shutil.copy(straight / "checkpoint0001.pth", resumed / "checkpoint.pth")
    (resumed / "log.txt").write_text((straight / "log.txt").read_text().splitlines()[0] + "\n")
    assert in_process("rob_dino", flags("rob_dino", "rob", data, resumed, extra + ["--epochs", "2"])) == 0
    for name, tensor in weights(straight).items():
        assert torch.equal(tensor, weights(resumed)[name]), name
    # other files under --data_path: not the run that was saved
    save(data / "shard2" / "new.png", random_rgb(28, 28, 9))
    with pytest.raises(common.UserError, match=r"trained on other data \(20 images, .*holds 21 images"):
        in_process("rob_dino", flags("rob_dino", "rob", data, resumed, extra + ["--epochs", "3"]))
