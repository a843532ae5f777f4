"""Training-step throughput of a method file: its own train_step() on a fixed synthetic batch already on the
device, with a randomly initialised teacher of the named official architecture (nothing to download). Prints
images/s, the FLOPs of one step (PyTorch's FLOP counter), MFU against a bf16 matmul peak measured in the same
process, peak memory and the device; the frozen teacher's forward alone is timed the same way.
    python benchmarks/step.py rob_dino --student vit_tiny --teacher dino_vitb16 --batch_size_per_gpu 128 --steps 20
    python benchmarks/step.py rob_ibot --student vit_tiny --teacher ibot_vitb16 --batch_size_per_gpu 128 --compile
Every flag of the method's script is accepted (crops, --compile, --precision...)."""
import argparse
import importlib
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import common  # noqa: E402


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


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
    with FlopCounterMode(display=False) as counter, torch.compiler.set_stance("force_eager"):
        fn()
    return counter.get_total_flops()


def measure(step, steps, images_per_step, flops_per_image, device, dtype, title, warmup_steps=3):
    """Time `steps` calls of step() after `warmup_steps` untimed ones; print and return the figures."""
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
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    result = dict(config=title, device=name, images_per_s=images_per_step * steps / seconds,
                  gflop_per_image=flops_per_image / 1e9, matmul_peak_tflops=peak / 1e12,
                  peak_memory_gib=torch.cuda.max_memory_allocated(device) / 2 ** 30 if device.type == "cuda" else None)
    result["mfu"] = result["images_per_s"] * flops_per_image / peak
    memory = f"{result['peak_memory_gib']:.1f} GiB" if result["peak_memory_gib"] is not None else "n/a (CPU)"
    print(f"[benchmark] {title} on {name}: {result['images_per_s']:,.0f} images/s, {result['gflop_per_image']:.1f} "
          f"GFLOP/image, MFU {100 * result['mfu']:.1f}% of a measured {result['matmul_peak_tflops']:.3g} TFLOP/s "
          f"{str(dtype).replace('torch.', '')} matmul peak, peak memory {memory}", flush=True)
    return result


def teacher_backbone(name, patch_size=16):
    """An official teacher backbone by family name (vit_small / vit_base / vit_large, any patch; resnet50), random."""
    if name == "resnet50":
        return common.create_backbone(dict(name="resnet50", kwargs=dict(num_classes=0)))
    return common.create_backbone(dict(name=f"{name}_patch16_224", kwargs=dict(num_classes=0, patch_size=patch_size,
                                                                              dynamic_img_size=True)))


def random_teacher(module, name):
    """The official teacher architecture `name` of a method with random weights (nothing to download)."""
    release = module.TEACHERS[name]
    backbone = teacher_backbone(*release[1:]) if isinstance(release, tuple) else teacher_backbone("resnet50")
    dim = common.feature_dim(backbone)
    if module.__name__ == "rob_dino":
        return common.freeze(common.MultiCropNetwork(backbone, module.DINOHead(dim, 65536, weight_norm=False)))
    if module.__name__ == "rob_ibot":
        return common.freeze(module.iBOTNetwork(backbone, module.iBOTHead(dim, 8192, 8192, weight_norm=False)))
    if module.__name__ == "rob_msn":
        prototypes = torch.nn.functional.normalize(torch.randn(1024, 256), dim=-1)
        return common.freeze(module.MSNNetwork(backbone, module.MSNProjection(dim), prototypes=prototypes))
    return common.freeze(common.MultiCropNetwork(backbone, module.SwAVHead(dim)))


def synthetic_batch(module, args, run):
    """The loader batch the method's train_step takes, random, already on the device (iBOT: crops and block masks)."""
    b, g, l, device = args.batch_size_per_gpu, args.global_crops_size, args.local_crops_size, run.device
    crops = ([torch.randn(b, 3, g, g, device=device) for _ in range(2)]
             + [torch.randn(b, 3, l, l, device=device) for _ in range(args.local_crops_number)])
    if module.__name__ == "rob_ibot":
        import random
        patch = run.student.backbone.patch_embed.patch_size[0]
        masks = module.BlockMaskGenerator((g // patch,) * 2, args.mask_prob, args.mask_ratio)
        rng = random.Random(args.seed)
        return crops, torch.stack([torch.stack([masks(rng) for _ in range(2)]) for _ in range(b)])
    return crops


def teacher_alone(module, run, batch):
    """The frozen teacher's forward on the global crops, as the step runs it."""
    crops = batch[0] if module.__name__ == "rob_ibot" else batch
    with torch.no_grad():
        if module.__name__ == "rob_ibot":
            patch_index = batch[1].transpose(0, 1).flatten().nonzero()[:, 0].to(run.device)
            return run.teacher([c.to(run.teacher_dtype) for c in crops[:2]], patch_index=patch_index)
        return run.teacher([c.to(run.teacher_dtype) for c in crops[:getattr(run, "n_teacher", 2)]])


def main():
    method = sys.argv[1] if len(sys.argv) > 1 else ""
    if method not in ("rob_dino", "rob_ibot", "rob_msn", "rob_swav"):
        raise SystemExit("usage: python benchmarks/step.py rob_dino|rob_ibot|rob_msn|rob_swav [flags of that script] "
                         "[--steps N]")
    module = importlib.import_module(method)
    parser = argparse.ArgumentParser(f"benchmarks/step.py {method}", parents=[module.get_args_parser()])
    parser.add_argument("--steps", type=int, default=20, help="Timed steps (after 3 untimed ones).")
    parser.add_argument("--json", default=None, help="Also append the figures as JSON lines to this file.")
    args = parser.parse_args(["--data_path", "synthetic", *sys.argv[2:]])
    module.check_args(args)
    device = common.init_distributed()
    torch.manual_seed(0)
    teacher = random_teacher(module, args.teacher)
    student, arch = module.build_student(args, teacher)
    b = args.batch_size_per_gpu
    data = common.training_data("synthetic", module.build_augmentation(args), b, 0, subset=b * (args.steps + 3))
    run = module.build_run(args, device, data, student, arch, teacher)
    batch = synthetic_batch(module, args, run)
    step_flops = count_flops(lambda: module.train_step(run, batch, None, 0))
    teacher_flops = count_flops(lambda: teacher_alone(module, run, batch))
    dtype = torch.bfloat16 if run.amp else torch.float32
    title = (f"{method} {args.student} <- {args.teacher}, batch {b}/GPU, 2x{args.global_crops_size} + "
             f"{args.local_crops_number}x{args.local_crops_size}" + (", compiled" if args.compile else ""))
    results = [measure(lambda: teacher_alone(module, run, batch), args.steps, b, teacher_flops / b, device, dtype,
                       f"{title}: frozen teacher forward alone")]
    steps = iter(range(10 ** 9))
    results.append(measure(lambda: module.train_step(run, batch, None, next(steps) % run.iters_per_epoch), args.steps,
                           b, step_flops / b, device, dtype, title))
    if args.json:
        with open(args.json, "a") as f:
            f.writelines(json.dumps(r) + "\n" for r in results)


if __name__ == "__main__":
    main()
