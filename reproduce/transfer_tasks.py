"""Transfer tasks the Fashion-MNIST students never trained on, generated offline and deterministically from data
already on the machine, written as the ImageFolders eval_linear.py reads (train/<class>/*.png, val/<class>/*.png).
The design (reproduce/README.md "Transfer tasks") was fixed before any student was scored on them:

- count (as Clevr/Count): 1 to 6 Fashion-MNIST items, each shrunk to 7x7, on a black 28x28 canvas at random
  positions with at least one pixel between their boxes; the class is how many. 1,000 train and 500 val per class.
- distance (as Clevr/Dist): two shrunk items; the class is the distance between their centres in 4 bins,
  [8, 12), [12, 16), [16, 20), [20, 24.04] pixels. 1,500 train and 750 val per class.
- photos (natural images, a class structure unrelated to clothing, as Places or iNaturalist): grayscale patches of
  8 of scikit-image's photographs (brick, grass, gravel, coins, moon, camera, coffee, chelsea), side 32 to 64 px
  shrunk to 28; the class is the photograph. Train patches come from the top 60 % of each photograph's rows, val
  patches from the bottom 40 %: no pixel is in both. 500 train and 200 val per class.
Train images draw their items from Fashion-MNIST's training set, val images from its test set. Every image has its
own seed (task, split, class, index), so a task's images are the same on every call and machine (the photos: with
the same scikit-image, 0.26.0 here); objects keep 2 px from the border (eval_linear.py's resize + centre crop keeps
them whole). scikit-image is needed by the photos task only, not by the trainers.
    python reproduce/transfer_tasks.py runs/transfer [count distance photos]      (under a minute of CPU)
writes runs/transfer/<task>/{train,val}/<class>/*.png and runs/transfer/transfer_<task>.png (2 val images a class)."""
import math
import shutil
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import common  # noqa: E402

CANVAS, ITEM, MARGIN, GAP = 28, 7, 2, 1
COUNTS = range(1, 7)
DISTANCE_BINS = (8, 12, 16, 20, 24.1)  # the last bin ends past the longest distance, 17 * sqrt(2) = 24.04
PHOTOS = ("brick", "grass", "gravel", "coins", "moon", "camera", "coffee", "chelsea")
SIZES = {"count": (1000, 500), "distance": (1500, 750), "photos": (500, 200)}  # images per class: train, val
TASK_SEED = {"count": 1, "distance": 2, "photos": 3}


def overlaps(a, b):
    """Whether two ITEM x ITEM boxes at top-left corners a and b come closer than GAP pixels."""
    return abs(a[0] - b[0]) < ITEM + GAP and abs(a[1] - b[1]) < ITEM + GAP


def random_corner(generator):
    return tuple(torch.randint(MARGIN, CANVAS - MARGIN - ITEM + 1, (2,), generator=generator).tolist())


def place(n, generator):
    """n top-left corners (row, column) of boxes inside the margin, no two closer than GAP."""
    for _ in range(1000):
        corners = []
        for _ in range(100 * n):
            corner = random_corner(generator)
            if not any(overlaps(corner, c) for c in corners):
                corners.append(corner)
                if len(corners) == n:
                    return corners
    raise RuntimeError(f"{n} boxes do not fit on the canvas")


def centre_distance(a, b):
    return math.dist(a, b)  # the boxes have one size: corners are centres shifted alike


def distance_class(distance):
    """The bin of a centre distance: 0 for [8, 12), ..., 3 for [20, 24.1); None outside the bins."""
    for i, (low, high) in enumerate(zip(DISTANCE_BINS, DISTANCE_BINS[1:])):
        if low <= distance < high:
            return i
    return None


def render(items, corners):
    """A CANVAS x CANVAS uint8 image with each item (uint8 ITEM x ITEM) at its corner, the maximum where two meet."""
    canvas = torch.zeros(CANVAS, CANVAS, dtype=torch.uint8)
    for item, (r, c) in zip(items, corners):
        canvas[r:r + ITEM, c:c + ITEM] = torch.maximum(canvas[r:r + ITEM, c:c + ITEM], item)
    return canvas


def shrink(image, size):
    """A uint8 image resized to size x size by box averaging (each output pixel the mean of the pixels it covers)."""
    return torch.from_numpy(np.array(Image.fromarray(image.numpy()).resize((size, size), Image.BOX)))


def object_image(task, label, generator, items):
    """(image, corners) of one count or distance image of class `label`, items drawn from `items`."""
    if task == "count":
        corners = place(COUNTS[label], generator)
    else:
        for _ in range(10000):
            corners = place(2, generator)
            if distance_class(centre_distance(*corners)) == label:
                break
        else:
            raise RuntimeError(f"no two boxes at a distance of class {label}")
    picks = torch.randint(0, len(items), (len(corners),), generator=generator).tolist()
    return render([shrink(items[i], ITEM) for i in picks], corners), corners


def photo_patch(photo, train, generator):
    """A grayscale patch (side 32-64 px, shrunk to CANVAS) of a photograph: from its top 60 % of rows for train, its
    bottom 40 % for val."""
    split = int(0.6 * photo.shape[0])
    rows = photo[:split] if train else photo[split:]
    side = int(torch.randint(32, 65, (1,), generator=generator))
    side = min(side, rows.shape[0], rows.shape[1])
    r = int(torch.randint(0, rows.shape[0] - side + 1, (1,), generator=generator))
    c = int(torch.randint(0, rows.shape[1] - side + 1, (1,), generator=generator))
    return shrink(rows[r:r + side, c:c + side].contiguous(), CANVAS)


def load_photos():
    import skimage.color
    import skimage.data
    photos = []
    for name in PHOTOS:
        image = getattr(skimage.data, name)()
        gray = skimage.color.rgb2gray(image) if image.ndim == 3 else image / 255.0
        photos.append(torch.from_numpy((gray * 255).round().clip(0, 255).astype("uint8")))
    return photos


def classes(task):
    if task == "count":
        return [str(n) for n in COUNTS]
    if task == "distance":
        return [f"{low:02d}-{high:02.0f}" for low, high in zip(DISTANCE_BINS, DISTANCE_BINS[1:])]
    return list(PHOTOS)


def generate(task, out, scale=1.0):
    """Write one task's ImageFolder under out/: SIZES[task] images per class, times `scale`."""
    names = classes(task)
    sources = load_photos() if task == "photos" else None
    for split, train in (("train", True), ("val", False)):
        if task != "photos":
            sources = common.load_fashion_mnist(train)[0]
        per_class = max(1, round(SIZES[task][0 if train else 1] * scale))
        for label, name in enumerate(names):
            folder = Path(out) / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                generator = torch.Generator().manual_seed(common.mix_seed(TASK_SEED[task], train, label, i))
                if task == "photos":
                    image = photo_patch(sources[label], train, generator)
                else:
                    image = object_image(task, label, generator, sources)[0]
                Image.fromarray(image.numpy(), mode="L").save(folder / f"{i:05d}.png", optimize=False)


def examples(root, out, tasks=tuple(SIZES)):
    """One PNG per task: 2 images of each class side by side (val), scaled x3."""
    for task in tasks:
        folders = sorted((Path(root) / task / "val").iterdir(), key=lambda p: classes(task).index(p.name))
        tiles = [Image.open(f) for folder in folders for f in sorted(folder.iterdir())[:2]]
        sheet = Image.new("L", (len(tiles) * (CANVAS + 2), CANVAS), 255)
        for i, tile in enumerate(tiles):
            sheet.paste(tile, (i * (CANVAS + 2), 0))
        sheet.resize((sheet.width * 3, sheet.height * 3), Image.NEAREST).save(Path(out) / f"transfer_{task}.png")


def main():
    out, tasks = Path(sys.argv[1]), sys.argv[2:] or list(SIZES)
    for task in tasks:
        if task not in SIZES:
            sys.exit(f"unknown task {task!r}: choose among {', '.join(SIZES)}")
        if not (out / task).is_dir():  # written aside, then renamed: a folder that exists is complete
            partial = out / f"{task}.partial"
            shutil.rmtree(partial, ignore_errors=True)
            generate(task, partial)
            partial.rename(out / task)
        print(f"{out / task}: classes {', '.join(classes(task))}")
    examples(out, out, tasks)


if __name__ == "__main__":
    main()
