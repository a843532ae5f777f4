"""The run machinery that every rob_*.py training loop shares and no method owns: the entry point (exit codes,
one-line user errors), the flags of data, output and runtime, the locked output directory, the set-up of the
student, optimiser and schedules, the per-step bookkeeping (statistics read one step late, stop requests) and
checkpointing (checked, atomic, resumable only with the same run-defining flags). The method itself (head,
loss, pairing, training step, loop) lives in its own file; data, models and file I/O in common.py."""
import argparse
import datetime
import fcntl
import json
import math
import os
import signal
import sys
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.distributed as dist
import torch.distributed.nn
import torch.nn as nn

import common


# ----------------------------------------------------------------------------------------- entry point and flags
def run_main(main, parser):
    """Every script's entry point. Exit codes: 0 done; 2 a user error (one line on stderr; ROB_DEBUG=1 shows the
    traceback); 3 training diverged (non-finite loss or weights; nothing was saved); 128 + N stopped by signal N
    after writing a checkpoint to resume from (SIGTERM 143, Ctrl-C 130, SIGUSR1 138)."""
    code = 0
    try:
        result = main(parser.parse_args())
        code = result if isinstance(result, int) else 0
    except (common.UserError, FloatingPointError) as err:
        if os.environ.get("ROB_DEBUG"):
            raise
        rank = f"[rank {common.get_rank()}] " if common.get_world_size() > 1 else ""
        print(f"{Path(sys.argv[0]).name}: {rank}error: {err}", file=sys.stderr, flush=True)
        code = 2 if isinstance(err, common.UserError) else 3
    finally:
        if dist.is_initialized():  # a clean shutdown: an open process group can abort the interpreter at exit
            dist.destroy_process_group()
    sys.exit(code)


def add_optimisation_args(parser, epochs, lr, min_lr=1e-5, warmup_epochs=10, weight_decay=0.04, weight_decay_end=0.4,
                          clip_grad=0.0, helps=None):
    """The optimisation flags, with a method's defaults and, in `helps`, its own help texts. Returns the group."""
    helps = {"lr": "Peak lr at a global batch of 256, scaled linearly with the global batch.",
             "min_lr": "lr at the end of the cosine.", "warmup_epochs": "Linear lr warm-up epochs.",
             "weight_decay": "Initial weight decay (cosine), none on biases and norms.",
             "weight_decay_end": "Final weight decay.", "clip_grad": "Clip the global gradient norm (0: off).",
             **(helps or {})}
    group = parser.add_argument_group("optimisation")
    group.add_argument("--epochs", type=int, default=epochs)
    group.add_argument("--batch_size_per_gpu", type=int, default=64, help="Global batch = this x processes.")
    for name, value, kind in (("lr", lr, float), ("min_lr", min_lr, float), ("warmup_epochs", warmup_epochs, int),
                              ("weight_decay", weight_decay, float), ("weight_decay_end", weight_decay_end, float),
                              ("clip_grad", clip_grad, float)):
        group.add_argument(f"--{name}", type=kind, default=value, help=helps[name])
    return group


def add_multicrop_args(parser, global_crops_scale, local_crops_number, local_crops_scale):
    """The multi-crop flags with a method's defaults: 2 global crops (224 px) and the small local ones (96 px)."""
    group = parser.add_argument_group("multi-crop")
    group.add_argument("--global_crops_scale", type=float, nargs=2, default=global_crops_scale)
    group.add_argument("--local_crops_number", type=int, default=local_crops_number, help="Small crops (student "
                       "only).")
    group.add_argument("--local_crops_scale", type=float, nargs=2, default=local_crops_scale)
    group.add_argument("--global_crops_size", type=int, default=224)
    group.add_argument("--local_crops_size", type=int, default=96)
    return group


def add_run_args(parser):
    """The flags of every training script that do not define the method: data, output, runtime."""
    group = parser.add_argument_group("data, output and runtime")
    group.add_argument("--data_path", default="fashion-mnist", help="ImageFolder directory, 'fashion-mnist' "
                       "or 'synthetic'.")
    group.add_argument("--subset", type=int, default=0, help="Train on a seeded random subset of this many "
                       "images (0: all of them), for quick experiments.")
    group.add_argument("--output_dir", default="output", help="Checkpoints, log.txt and the exported student; a "
                       "run resumes automatically from output_dir/checkpoint.pth.")
    group.add_argument("--saveckp_freq", type=int, default=20, help="Also keep checkpointNNNN.pth every N epochs.")
    group.add_argument("--seed", type=int, default=0)
    group.add_argument("--num_workers", type=int, default=10, help="Data loader processes per GPU.")
    group.add_argument("--gpu_augment", action="store_true", help="Decode JPEGs and run the multi-crop "
                       "augmentation in batches on the GPU (loader workers only read files): real training is "
                       "otherwise CPU-bound. Same parameter distributions; also runs on CPU tensors.")
    group.add_argument("--precision", default=None, choices=["bf16", "fp16", "fp32"], help="Autocast dtype "
                       "(default bf16 on GPU, fp32 on CPU). The teacher runs in that dtype, losses in fp32.")
    group.add_argument("--compile", action="store_true", help="torch.compile teacher, student and loss (ViTs per "
                       "block: quick to compile). Faster on GPU once compiled.")
    group.add_argument("--overlap_teacher", action=argparse.BooleanOptionalAction, default=True, help="On GPU, "
                       "run the teacher on a second CUDA stream, concurrently with the student's forward.")
    return parser


def check_args(args, positive=(), non_negative=(), fractions=(), scales=()):
    """Flag checks shared by the scripts: named flags must be > 0, >= 0, in [0, 1], or (low, high) with
    0 < low <= high <= 1. Raises common.UserError naming the flag."""
    def values(name):  # a flag's values (several for nargs flags); none if unset
        value = getattr(args, name, None)
        return [] if value is None else value if isinstance(value, (list, tuple)) else [value]
    for names, ok, rule in ((positive, lambda v: v > 0, "> 0"), (non_negative, lambda v: v >= 0, ">= 0"),
                            (fractions, lambda v: 0 <= v <= 1, "in [0, 1]")):
        for name in names:
            if not all(ok(v) for v in values(name)):
                raise common.UserError(f"--{name} {' '.join(map(str, values(name)))}: must be {rule}")
    for name in scales:
        low, high = getattr(args, name)
        if not 0 < low <= high <= 1:
            raise common.UserError(f"--{name} {low} {high}: give two fractions of the image area, 0 < low <= high <= 1")
    if getattr(args, "warmup_epochs", 0) >= getattr(args, "epochs", 1):
        raise common.UserError(f"--warmup_epochs {args.warmup_epochs} leaves nothing of a {args.epochs}-epoch run: "
                        "lower it or raise --epochs")


# -------------------------------------------------------------------------------------------------------- set-up
class OutputDir:
    """--output_dir for the life of a run (`with OutputDir(path) as path:`): created and checked writable at
    the start (rank 0), locked so that a second run on the same folder stops at once, cleared of the temporary
    files of killed runs; a folder this run created is removed again if the run fails before writing to it."""

    def __init__(self, path):
        self.path, self.lock, self.created = Path(path), None, False

    def __enter__(self):
        if not common.is_main_process():
            return self.path
        try:
            self.created = not self.path.exists()
            self.path.mkdir(parents=True, exist_ok=True)
            self.lock = open(self.path / ".lock", "a+")
        except OSError as err:
            raise common.UserError(f"cannot create or write --output_dir {self.path} ({err.strerror}): choose another "
                            "folder") from None
        try:
            fcntl.flock(self.lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            self.lock.seek(0)
            raise common.UserError(f"--output_dir {self.path} is in use by another run (process "
                            f"{self.lock.read().strip() or '?'}): wait for it to end or use another "
                            "--output_dir") from None
        self.lock.truncate(0)
        self.lock.write(str(os.getpid()))
        self.lock.flush()
        for stale in self.path.glob(".*.tmp"):
            stale.unlink(missing_ok=True)
        return self.path

    def __exit__(self, kind, error, traceback):
        if self.lock is not None:
            self.lock.close()  # releases the lock
            if kind is not None and self.created and [p.name for p in self.path.iterdir()] == [".lock"]:
                (self.path / ".lock").unlink()
                self.path.rmdir()


def build_training_data(args, augmentation, wrap=None, collate_fn=None):
    """The training set of --data_path (--subset of it), augmented per image in the loader workers or, with
    --gpu_augment, read raw and augmented later by the loop; `wrap` adds per-sample extras (iBOT's masks).
    Returns a namespace (dataset, loader, sampler, augmentation); the loader yields (batch, image indices)."""
    import gpu_augment
    base = common.build_dataset(args.data_path, synthetic_shapes=augmentation.crop_shapes, raw=args.gpu_augment)
    base = common.random_subset(base, args.subset, args.seed)
    dataset = common.AugmentedDataset(base, None if args.gpu_augment else augmentation, args.seed, return_index=True)
    collate_fn = collate_fn or (gpu_augment.collate_raw if args.gpu_augment else None)
    loader, sampler = common.build_loader(wrap(dataset) if wrap else dataset, args.batch_size_per_gpu, args.num_workers,
                                   args.seed, collate_fn)
    return SimpleNamespace(dataset=dataset, loader=loader, sampler=sampler, augmentation=augmentation)


def setup_run(args, device, iters_per_epoch, student, arch, method, optimizer=None, warmup_start=0.0, min_lr=None):
    """The namespace a method's training step reads: flags, device and precision, the student (channels-last
    for convnets, SyncBatchNorm on several GPUs) and its DDP wrapper (which gives every process rank 0's
    weights), the optimiser (default AdamW without weight decay on biases and norms), the loss scaler, the lr
    (peak args.lr x global batch / 256) and weight-decay schedules, and the teacher's side stream."""
    world_size, precision = common.get_world_size(), args.precision or ("bf16" if device.type == "cuda" else "fp32")
    common.log("\n".join(f"{k}: {v}" for k, v in sorted(vars(args).items())))
    if not common.is_vit(student.backbone):
        student = student.to(memory_format=torch.channels_last)
    student = sync_batchnorm(student)
    student_ddp = nn.parallel.DistributedDataParallel(student, device_ids=[device.index] if device.type == "cuda"
                                                      else None) if world_size > 1 else student
    optimizer = optimizer or torch.optim.AdamW(param_groups(student), fused=device.type == "cuda")
    global_batch = args.batch_size_per_gpu * world_size
    lr_schedule = cosine_schedule(args.lr * global_batch / 256, args.min_lr if min_lr is None else min_lr, args.epochs,
                                  iters_per_epoch, args.warmup_epochs, warmup_start)
    return SimpleNamespace(
        args=args, method=method, device=device, rank=common.get_rank(), arch=arch, iters_per_epoch=iters_per_epoch,
        global_batch=global_batch, amp=precision != "fp32", teacher_dtype=torch.float32,
        amp_dtype={"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[precision],
        student=student, student_ddp=student_ddp, optimizer=optimizer, lr_schedule=lr_schedule,
        scaler=torch.amp.GradScaler(device.type, enabled=precision == "fp16"), start_step=0,
        wd_schedule=cosine_schedule(args.weight_decay, args.weight_decay_end, args.epochs, iters_per_epoch),
        side_stream=SideStream(device, args.overlap_teacher))


def sync_batchnorm(module):
    """BatchNorm over the global batch when several processes train (a no-op without BN layers): SyncBatchNorm
    on GPUs, ProcessGroupBatchNorm on CPUs (gloo). The statistics, hence the step, are then those of one process
    on the global batch, and the running statistics are the same in every process."""
    if common.get_world_size() > 1 and torch.cuda.is_available():
        return nn.SyncBatchNorm.convert_sync_batchnorm(module)
    if common.get_world_size() > 1:
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


def place_teacher(teacher, device, run, low_precision=()):
    """The frozen teacher on the device, channels-last if a convnet; on a GPU the `low_precision` modules are
    stored in the autocast dtype (the last layers, whose logits are divided by small temperatures, stay fp32)."""
    teacher.to(device)
    if device.type == "cuda" and run.amp:
        run.teacher_dtype = run.amp_dtype
        for module in low_precision:
            module.to(run.amp_dtype)
    return teacher if common.is_vit(teacher.backbone) else teacher.to(memory_format=torch.channels_last)


def check_patch(backbone, crop_size):
    patch = getattr(getattr(backbone, "patch_embed", None), "patch_size", (1,))[0]
    if crop_size % patch:
        raise common.UserError(f"--global_crops_size {crop_size} is not a multiple of the teacher's patch size "
                               f"{patch}: "
                        "the teacher sees the global crops.")


def param_groups(model):
    """AdamW groups: weight decay on weight matrices and convolution kernels, none on biases and norm
    parameters (the first group's weight decay follows the schedule)."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            (no_decay if param.ndim <= 1 or name.endswith(".bias") else decay).append(param)
    return [{"params": decay}, {"params": no_decay, "weight_decay": 0.0}]


def cosine_schedule(base, final, epochs, iters_per_epoch, warmup_epochs=0, warmup_start=0.0):
    """Per-iteration values: linear warm-up from warmup_start to base, then cosine from base to final."""
    if warmup_epochs >= epochs:
        raise common.UserError(f"a warm-up of {warmup_epochs} epochs leaves nothing of a {epochs}-epoch run: lower "
                        "--warmup_epochs (or the temperature / momentum warm-up) or raise --epochs.")
    warmup = torch.linspace(warmup_start, base, int(warmup_epochs * iters_per_epoch) + 1, dtype=torch.float64)[:-1]
    steps = epochs * iters_per_epoch - len(warmup)
    cosine = final + 0.5 * (base - final) * (1 + torch.cos(math.pi * torch.arange(steps, dtype=torch.float64) / steps))
    return torch.cat([warmup, cosine]).tolist()


def compile_model(model):
    """torch.compile in place. A ViT without stochastic depth (a frozen teacher) is compiled per block: its
    identical blocks share one compiled graph, seconds of compilation instead of minutes with the same
    fusions. Other models are compiled whole."""
    if common.is_vit(model) and len({repr(block.drop_path1) for block in model.blocks}) == 1:
        for block in model.blocks:  # (blocks with different drop-path rates would each recompile: whole model)
            block.compile()
    else:
        model.compile()
    return model


# ------------------------------------------------------------------------------------------------------ the loop
def start_step(run, it):
    """Step `it`'s lr and weight decay (the first parameter group decays), and a seed per (process, step) for
    drop-path and token drops, so that a resumed run draws the same."""
    for i, group in enumerate(run.optimizer.param_groups):
        group["lr"] = run.lr_schedule[it]
        if i == 0:
            group["weight_decay"] = run.wd_schedule[it]
    torch.manual_seed(common.mix_seed(run.args.seed, run.rank, it))


class SideStream:
    """On a GPU (--overlap_teacher), runs the frozen teacher on a second CUDA stream, concurrently with the
    student's forward: start() queues it, join() makes the main stream wait for it. Elsewhere a plain call."""

    def __init__(self, device, enabled):
        self.stream = torch.cuda.Stream(device) if enabled and device.type == "cuda" else None

    def start(self, fn, *args):
        if self.stream is None:
            return fn(*args)
        self.stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(self.stream):
            return fn(*args)

    def join(self, result):
        if self.stream is not None:
            torch.cuda.current_stream().wait_stream(self.stream)
        return result


def crops_on_device(batch, indices, dataset, augmentation, args, device, step, channels_last=False):
    """A loader batch as the list of crops on the device: moved there, or (--gpu_augment) decoded and augmented
    there with a generator seeded by the step (reproducible on resume), undecodable images counted."""
    if args.gpu_augment:
        import gpu_augment
        images, failed = gpu_augment.decode_images(batch, device)
        dataset.unreadable[indices[failed]] = True
        generator = torch.Generator().manual_seed(common.mix_seed(args.seed, common.get_rank(), step, 1))
        crops = augmentation.batch(images, generator)
    else:
        crops = [c.to(device, non_blocking=True) for c in batch]
    return [c.contiguous(memory_format=torch.channels_last) for c in crops] if channels_last else crops


class StepStats:
    """Per-step scalars (loss terms, a stop vote) averaged over the processes and read on the host one step
    late, so that the host queues step i+1 while the GPU still runs step i instead of waiting at every step.
    `push` returns the previous step's values; a non-finite loss raises FloatingPointError (nothing saved)."""

    def __init__(self, names):
        self.names, self.pending, self.epoch_values = names, None, []

    def push(self, terms, stop_vote, step):
        """Queue step `step`'s terms (a 1-D tensor) and this process's stop vote; return (the previous step's
        terms as a list, whether any process asked to stop), or None."""
        values = common.all_reduce_mean(torch.cat([terms.detach().float(), terms.new_tensor([float(stop_vote)])]))
        event = None
        if values.is_cuda:
            host = torch.empty(values.shape, pin_memory=True)
            host.copy_(values, non_blocking=True)
            event = torch.cuda.Event()
            event.record()
            values = host
        previous, self.pending = self.pending, (values, event, step)
        return self._read(previous)

    def flush(self):
        """The last queued step's (terms, stop) (waits for it), or None."""
        previous, self.pending = self.pending, None
        return self._read(previous)

    def _read(self, entry):
        if entry is None:
            return None
        values, event, step = entry
        if event is not None:
            event.synchronize()
        *terms, stop_votes = values.tolist()
        if not math.isfinite(terms[0]):
            raise FloatingPointError(f"non-finite loss {terms[0]} at step {step}; stopping without saving. Lower "
                                     "--lr, raise --warmup_epochs or use --precision bf16/fp32.")
        self.epoch_values.append(terms)
        return terms, stop_votes > 0

    def means(self):
        """{name: mean over this epoch's read steps} for log.txt."""
        return {name: sum(column) / len(column) for name, column in zip(self.names, zip(*self.epoch_values))}


class StopRequest:
    """SIGTERM / SIGINT / SIGUSR1 (cluster pre-emption, Ctrl-C) ask training to stop: it finishes the current
    step, writes a checkpoint and exits with 128 + the signal number; the same command resumes from there.
    A second Ctrl-C stops at once."""

    def __init__(self):
        self.signal = None
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1):
            signal.signal(sig, self._handle)

    @property
    def requested(self):
        return self.signal is not None

    def _handle(self, signum, frame):
        if self.signal is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signal = signum

    def exit_code(self):
        return 128 + (self.signal or signal.SIGTERM)  # a process stopped by another's vote: as by SIGTERM


# --------------------------------------------------------------------------------------------------- checkpoints
RESUMABLE_FLAGS = {"output_dir", "data_path", "num_workers", "compile", "overlap_teacher", "saveckp_freq", "epochs",
                   "precision"}  # may change between a run and its resumption; every other flag defines the run


def same_flag(a, b):
    if isinstance(a, str) and isinstance(b, str) and os.path.exists(a) and os.path.exists(b):
        return os.path.samefile(a, b)
    return (list(a) if isinstance(a, (list, tuple)) else a) == (list(b) if isinstance(b, (list, tuple)) else b)


def resume_checkpoint(output_dir, method, args, iters_per_epoch, global_batch):
    """The checkpoint to resume from (output_dir/checkpoint.pth), or None to start afresh. Refused with the list
    of differences if it was written by another script or with other run-defining flags (all but
    RESUMABLE_FLAGS), or with another global batch or number of steps per epoch. A longer --epochs is allowed:
    the schedules are recomputed for the new length and the run continues from its step on them."""
    path = Path(output_dir) / "checkpoint.pth"
    if not path.is_file():
        return None
    ckpt = common.load_file(path, "resume checkpoint")
    if ckpt.get("method") != method:
        raise common.UserError(f"{path} was written by {ckpt.get('method', 'another program')}, not {method}.py: use "
                        "another --output_dir.")
    saved = ckpt.get("args", {})
    changed = [f"--{k} {saved[k]} -> {v}" for k, v in vars(args).items()
               if k in saved and k not in RESUMABLE_FLAGS and not same_flag(saved[k], v)]
    for key, now in (("global_batch", global_batch), ("iters_per_epoch", iters_per_epoch)):
        if key in ckpt and ckpt[key] != now:
            changed.append(f"{key.replace('_', ' ')} {ckpt[key]} -> {now}")
    if changed:
        raise common.UserError(f"{path} belongs to a run with other settings ({'; '.join(changed)}): rerun with the "
                        "original flags, or use another --output_dir")
    if args.epochs < ckpt["epoch"]:
        raise common.UserError(f"--epochs {args.epochs}: this run has already done {ckpt['epoch']} epochs")
    if args.epochs != saved.get("epochs", args.epochs):
        common.log(f"--epochs {saved['epochs']} -> {args.epochs}: the schedules are recomputed for {args.epochs} "
                   "epochs "
            f"and the run continues from step {ckpt['step']} on them")
    if common.is_main_process() and ckpt.get("log_record") is not None:  # killed between checkpoint.pth and log.txt
        append_log(output_dir, ckpt["log_record"])
    return ckpt


def resume(run, data, output_dir, method):
    """Load output_dir/checkpoint.pth into the run if there is one (see resume_checkpoint): student, optimiser,
    loss scaler, the images found unreadable, the step. Returns the checkpoint (for the method's own state)."""
    ckpt = resume_checkpoint(output_dir, method, run.args, run.iters_per_epoch, run.global_batch)
    if ckpt is not None:
        run.student.load_state_dict(ckpt["student"])
        run.optimizer.load_state_dict(ckpt["optimizer"])
        run.scaler.load_state_dict(ckpt["scaler"])
        data.dataset.unreadable[ckpt.get("unreadable", [])] = True
        run.start_step = ckpt["step"]
        common.log(f"resumed from {Path(output_dir) / 'checkpoint.pth'} at step {ckpt['step']} (epoch {ckpt['epoch']})")
    return ckpt


@torch.no_grad()
def check_state(networks, optimizer, probe):
    """Training state worth saving: every tensor of the networks and of the optimiser finite, and so the outputs
    of `probe()` (the student on the last batch: weights can be finite yet too large for another step). Checked
    on every process, decided together; raises FloatingPointError, and nothing is saved."""
    tensors = [t for m in networks for t in m.state_dict().values() if t.is_floating_point()]
    tensors += [t for s in optimizer.state_dict()["state"].values() for t in s.values()
                if torch.is_tensor(t) and t.is_floating_point()]
    modes = [m.training for m in networks]
    for m in networks:  # eval mode: the probe changes nothing (BN statistics), draws nothing (drop-path)
        m.eval()
    outputs = probe()
    for m, mode in zip(networks, modes):
        m.train(mode)
    tensors += [outputs] if torch.is_tensor(outputs) else list(outputs)
    finite = torch.stack([torch.isfinite(t).all() for t in tensors]).all().float()
    if common.all_reduce_mean(finite).item() < 1:
        raise FloatingPointError("non-finite weights, optimiser state or outputs after the last step; stopping "
                                 "without saving. Lower --lr, raise --warmup_epochs or use --precision bf16/fp32.")


def save_run(run, data, step, stats, seconds, extra):
    """Checkpoint the run at `step` (the end of an epoch, or a stop) with the method's `extra` state, and at the
    end of an epoch its record for log.txt: mean loss terms, lr, weight decay, images/s, unreadable images."""
    record = None
    if step % run.iters_per_epoch == 0:
        record = dict(epoch=step // run.iters_per_epoch - 1, step=step, **stats.means(),
                      lr=run.lr_schedule[step - 1], wd=run.wd_schedule[step - 1],
                      images_per_s=len(stats.epoch_values) * run.global_batch / max(seconds, 1e-9),
                      skipped_images=data.dataset.num_skipped, time=str(datetime.timedelta(seconds=int(seconds))))
    state = dict(method=run.method, arch=run.arch, args=vars(run.args), step=step, epoch=step // run.iters_per_epoch,
                 global_batch=run.global_batch, iters_per_epoch=run.iters_per_epoch, student=run.student.state_dict(),
                 optimizer=run.optimizer.state_dict(), scaler=run.scaler.state_dict(),
                 unreadable=data.dataset.unreadable.nonzero()[:, 0].tolist(), **extra)
    save_checkpoint(run.args.output_dir, state, record is not None, run.args.saveckp_freq, run.student.backbone,
                    run.arch, record)


def save_checkpoint(output_dir, state, epoch_done, saveckp_freq, backbone, arch, log_record):
    """Write a run's state (rank 0; check it first with check_state). Order: the timm export, the per-epoch
    copy, then checkpoint.pth, the resume point, last; then the epoch's line of log.txt (also kept in the
    checkpoint, so a kill between the two loses no line). A kill at any moment leaves a consistent run that the
    same command resumes, redoing at most the interrupted epoch and its writes."""
    if not common.is_main_process():
        return
    output_dir = Path(output_dir)
    common.export_timm(backbone, arch, output_dir / "student_timm.pth")
    state = {**state, "log_record": log_record}
    if log_record is not None and saveckp_freq and state["epoch"] % saveckp_freq == 0 and epoch_done:
        common.save_atomic(state, output_dir / f"checkpoint{state['epoch']:04}.pth")
    common.save_atomic(state, output_dir / "checkpoint.pth")
    if log_record is not None:
        append_log(output_dir, log_record)


def append_log(output_dir, record):
    """Add an epoch's record to log.txt unless its last line already is that epoch's."""
    path = Path(output_dir) / "log.txt"
    lines = path.read_text().splitlines() if path.exists() else []
    if not lines or json.loads(lines[-1]).get("epoch") != record["epoch"]:
        with open(path, "a") as f:
            f.write(json.dumps(record) + "\n")


def finish(output_dir, backbone, arch):
    """End of a run: export the student if the file is missing (a finished run rerun after a kill or a
    deletion), check that the run's files exist, then say where the student is."""
    path, output_dir = Path(output_dir) / "student_timm.pth", Path(output_dir)
    if not common.is_main_process():
        return
    if not path.is_file():
        common.export_timm(backbone, arch, path)
    missing = [p.name for p in (path, output_dir / "checkpoint.pth") if not p.is_file()]
    if missing:
        raise common.UserError(f"{', '.join(missing)} missing from {output_dir} after the run: is the folder being "
                               "cleaned?")
    common.log(f"done; student backbone for timm: {common.timm_call(arch, path)}")
