"""Multi-crop augmentation throughput on the CPU, one thread: the per-image PIL path (what a loader worker runs)
against the batched tensor path of --gpu_augment run on CPU tensors, on real Fashion-MNIST images.
    python benchmarks/augment_cpu.py [--images 2048] [--batch 256]"""
import argparse
import sys
import time
from pathlib import Path

import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import common  # noqa: E402

if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--images", type=int, default=2048)
    parser.add_argument("--batch", type=int, default=256)
    args = parser.parse_args()
    torch.set_num_threads(1)
    images, _ = common.load_fashion_mnist(train=True)
    images = images[:args.images]
    aug = common.MultiCropAugmentation(28, 14, local_crops_number=4, global_crops_scale=(0.4, 1),
                                       local_crops_scale=(0.1, 0.4))
    pil = [Image.fromarray(x.numpy(), mode="L").convert("RGB") for x in images]
    start = time.perf_counter()
    for img in pil:
        aug(img)
    per_image = time.perf_counter() - start
    tensors = images[:, None].expand(-1, 3, -1, -1).contiguous()
    generator = torch.Generator().manual_seed(0)
    start = time.perf_counter()
    for i in range(0, len(tensors), args.batch):
        aug.batch(tensors[i:i + args.batch], generator)
    batched = time.perf_counter() - start
    print(f"Fashion-MNIST, 2x28 + 4x14 crops, {len(images)} images, 1 CPU thread ({torch.__version__}):")
    print(f"  per-image PIL path : {len(images) / per_image:8.0f} images/s ({1e3 * per_image / len(images):.2f} ms/image)")
    print(f"  batched (batch {args.batch}): {len(images) / batched:8.0f} images/s ({1e3 * batched / len(images):.2f} ms/image)")
