"""Inputs for benchmarks/gpu_check.sh, made on the machine itself (it has no internet): an ImageFolder of
ImageNet-sized JPEGs, a randomly initialised DINO ViT-B/16 full checkpoint in the official container, and
the throughput of the --gpu_augment stages alone (batched decoding, batched multi-crop)."""
import argparse
import multiprocessing
import os
import sys
import time
from pathlib import Path

import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import common  # noqa: E402


def make_jpeg(args):
    """A 400-640 x 300-480 photo-like JPEG (smooth colour field + texture; ~100 KB at quality 90)."""
    path, seed = args
    torch.set_num_threads(1)  # one thread per pool process
    gen = torch.Generator().manual_seed(seed)
    w, h = int(torch.randint(400, 641, (1,), generator=gen)), int(torch.randint(300, 481, (1,), generator=gen))
    field = torch.nn.functional.interpolate(torch.rand(1, 3, 6, 8, generator=gen), size=(h, w), mode="bicubic")[0]
    pixels = (field * 255 + 14 * torch.randn(3, h, w, generator=gen)).clamp(0, 255).byte().permute(1, 2, 0)
    Image.fromarray(pixels.numpy()).save(path, quality=90)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--folder", required=True)
    parser.add_argument("--images", type=int, default=4000)
    parser.add_argument("--teacher", required=True, help="where to write the random DINO ViT-B/16 checkpoint")
    parser.add_argument("--batch", type=int, default=128)
    args = parser.parse_args()
    jobs = []
    for i in range(args.images):
        folder = Path(args.folder) / f"class{i % 10}"
        folder.mkdir(parents=True, exist_ok=True)
        jobs.append((folder / f"{i}.jpg", i))
    start = time.time()
    with multiprocessing.Pool(os.cpu_count()) as pool:
        pool.map(make_jpeg, jobs, chunksize=16)
    sizes = [p.stat().st_size for p, _ in jobs]
    print(f"[data] {len(jobs)} JPEGs, mean {sum(sizes) / len(sizes) / 1e3:.0f} KB, made in {time.time() - start:.1f} s")

    import rob_dino  # a DINO full checkpoint of the official layout, random weights (nothing to download here)
    from step import random_teacher
    teacher = random_teacher(rob_dino, "dino_vitb16")
    sd = {f"backbone.{k}": v for k, v in teacher.backbone.state_dict().items()}
    head = teacher.head.state_dict()
    weight = head.pop("last_layer.weight")
    sd.update({f"head.{k}": v for k, v in head.items()})
    sd["head.last_layer.weight_g"], sd["head.last_layer.weight_v"] = weight.norm(dim=1, keepdim=True), weight
    torch.save(dict(teacher=sd, student={}, args=argparse.Namespace(arch="vit_base", patch_size=16)), args.teacher)

    if torch.cuda.is_available():  # the --gpu_augment stages alone, on the GPU
        device = torch.device("cuda")
        raw = common.build_dataset(args.folder, raw=True)
        batches = [common.collate_raw([raw[i] for i in range(k, k + args.batch)])[0]
                   for k in range(0, 8 * args.batch, args.batch)]
        aug = common.MultiCropAugmentation()
        for name, fn in [("decode", lambda b: common.decode_images(b, device)),
                         ("decode + multi-crop", lambda b: aug.batch(common.decode_images(b, device)[0]))]:
            fn(batches[0])
            torch.cuda.synchronize()
            start = time.time()
            for batch in batches:
                fn(batch)
            torch.cuda.synchronize()
            print(f"[data] {name} on {torch.cuda.get_device_name()}: {len(batches) * args.batch / (time.time() - start):,.0f} images/s")


if __name__ == "__main__":
    main()
