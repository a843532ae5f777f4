"""reproduce/transfer_tasks.py: the transfer tasks are the same bytes from every call and their labels are right."""
import hashlib
import importlib.util
import math

import numpy as np
import torch

from conftest import ROOT

spec = importlib.util.spec_from_file_location("transfer_tasks", ROOT / "reproduce" / "transfer_tasks.py")
tasks = importlib.util.module_from_spec(spec)
spec.loader.exec_module(tasks)


def digests(root):
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_every_task_is_the_same_bytes_from_two_calls(tmp_path):
    for task in tasks.SIZES:
        tasks.generate(task, tmp_path / "a" / task, scale=0.004)
        tasks.generate(task, tmp_path / "b" / task, scale=0.004)
        first, second = digests(tmp_path / "a" / task), digests(tmp_path / "b" / task)
        per_class = sum(max(1, round(n * 0.004)) for n in tasks.SIZES[task])
        assert first == second and len(first) == per_class * len(tasks.classes(task)), task
        assert {p.split("/")[1] for p in first} == set(tasks.classes(task))


def test_distance_bins_and_box_spacing_on_hand_built_cases():
    assert [tasks.distance_class(d) for d in (7.99, 8, 11.99, 12, 16, 19.99, 20, 17 * math.sqrt(2))] == \
        [None, 0, 0, 1, 2, 2, 3, 3]
    assert tasks.centre_distance((2, 2), (2, 10)) == 8 and tasks.centre_distance((2, 2), (14, 18)) == 20
    assert not tasks.overlaps((2, 2), (2, 10)) and tasks.overlaps((2, 2), (2, 9))  # 7 px boxes, 1 px apart or 0
    assert tasks.overlaps((2, 2), (8, 8)) and not tasks.overlaps((2, 2), (10, 3))


def components(image):
    """Connected groups of non-zero pixels (4-neighbours), by an explicit flood fill."""
    seen, count = set(), 0
    for start in zip(*image.nonzero(as_tuple=True)):
        start = tuple(map(int, start))
        if start in seen:
            continue
        count, stack = count + 1, [start]
        while stack:
            r, c = stack.pop()
            if (r, c) in seen or not (0 <= r < image.shape[0] and 0 <= c < image.shape[1]) or image[r, c] == 0:
                continue
            seen.add((r, c))
            stack += [(r + 1, c), (r - 1, c), (r, c + 1), (r, c - 1)]
    return count


def test_count_and_distance_labels_are_what_the_image_shows():
    solid = torch.full((1, 28, 28), 255, dtype=torch.uint8)  # items that shrink to solid 7 x 7 squares
    for label, n in enumerate(tasks.COUNTS):
        for i in range(5):
            image, corners = tasks.object_image("count", label, torch.Generator().manual_seed(i), solid)
            assert len(corners) == n and components(image) == n  # n separate squares: the class is the count
            assert all(tasks.MARGIN <= x <= tasks.CANVAS - tasks.MARGIN - tasks.ITEM for c in corners for x in c)
    for label in range(len(tasks.DISTANCE_BINS) - 1):
        for i in range(5):
            image, corners = tasks.object_image("distance", label, torch.Generator().manual_seed(i), solid)
            rows, cols = image.nonzero(as_tuple=True)
            assert components(image) == 2
            # the centres from the pixels themselves (each square's mean position), in float64
            centres = []
            for r0, c0 in corners:
                inside = (rows >= r0) & (rows < r0 + 7) & (cols >= c0) & (cols < c0 + 7)
                centres.append((rows[inside].double().mean().item(), cols[inside].double().mean().item()))
            distance = math.hypot(centres[0][0] - centres[1][0], centres[0][1] - centres[1][1])
            assert tasks.DISTANCE_BINS[label] <= distance < tasks.DISTANCE_BINS[label + 1]


def test_each_generated_folder_holds_its_class(tmp_path, monkeypatch):
    from PIL import Image
    solid = torch.full((50, 28, 28), 255, dtype=torch.uint8)  # every item a solid square once shrunk
    monkeypatch.setattr(tasks.common, "load_fashion_mnist", lambda train: (solid, torch.zeros(50, dtype=torch.long)))
    for task in ("count", "distance"):
        tasks.generate(task, tmp_path / task, scale=0.004)
        for folder in (tmp_path / task / "val").iterdir():
            for path in folder.iterdir():
                image = torch.from_numpy(np.array(Image.open(path)))
                if task == "count":
                    assert components(image) == int(folder.name), path
                else:
                    rows, cols = image.nonzero(as_tuple=True)
                    low, high = map(int, folder.name.split("-"))  # the two squares: the extreme pixels' centres
                    span = (rows.max() - rows.min() - 6, cols.max() - cols.min() - 6)
                    assert components(image) == 2 and low <= math.hypot(*span) < high + 0.1, path


def test_photo_patches_of_train_and_val_never_share_a_pixel():
    ramp = torch.arange(200, dtype=torch.uint8)[:, None].expand(200, 300).contiguous()  # pixel value = its row
    for i in range(20):
        train = tasks.photo_patch(ramp, True, torch.Generator().manual_seed(i))
        val = tasks.photo_patch(ramp, False, torch.Generator().manual_seed(i))
        assert train.shape == val.shape == (28, 28)
        assert train.max() < 120 <= val.min()  # rows 0-119 for train, 120-199 for val
