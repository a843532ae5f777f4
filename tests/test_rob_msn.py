"""rob_msn.py: target and losses, token dropping, teacher loading, frozen teacher, the plain-MSN baseline as a
teacher, distributed equivalence, exact resume."""
import argparse
import json
import math
import os
import random
import re
import signal
import subprocess
import sys
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

import common
import rob_msn
from conftest import ASSETS, KNN_MARGIN, OFFICIAL_SCHEMAS, OFFICIAL_TINY, ROOT, rob_knn_gain, run_in_process

MSN_TINY = OFFICIAL_TINY / "msn_tiny.pth.tar"
TINY = ["--student", "test_vit", "--patch_size", "8", "--global_crops_size", "32", "--local_crops_size", "16",
        "--local_crops_number", "2", "--num_workers", "0", "--warmup_epochs", "0", "--saveckp_freq", "0", "--lr", "0.05"]


def parse(args):
    return argparse.ArgumentParser(parents=[rob_msn.get_args_parser()]).parse_args([str(a) for a in args])


def in_process(args):
    """rob_msn.main in this process (one thread, as the subprocess runs), restoring the signal handlers that
    StopRequest installs."""
    handlers = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        rob_msn.main(parse(args))
    finally:
        torch.set_num_threads(threads)
        for sig, handler in handlers.items():
            signal.signal(sig, handler)


@pytest.fixture(scope="session")
def baseline_run(tmp_path_factory, small_folder):
    """A plain-MSN (--teacher ema) run of 2 epochs: its checkpoint is the RoB teacher of the training tests."""
    out = tmp_path_factory.mktemp("msn_baseline")
    run_in_process(["rob_msn.py", *TINY, "--teacher", "ema", "--data_path", small_folder, "--batch_size_per_gpu", "8",
                    "--epochs", "2", "--output_dir", out])
    return out


# ------------------------------------------------------------------------------------------- target, losses
def cosine64(a, b):
    return sum(x * y for x, y in zip(a.tolist(), b.tolist())) / (a.double().norm().item() * b.double().norm().item())


def softmax64(values, temp):
    top = max(values)
    weights = [math.exp((v - top) / temp) for v in values]
    return [w / sum(weights) for w in weights]


def test_target_matches_the_official_msn_fixture():
    expected = common.load_file(OFFICIAL_TINY / "msn_tiny_expected.pth")
    teacher = rob_msn.load_teacher(str(MSN_TINY), num_heads=3)
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    with torch.no_grad():
        projection = teacher([expected["input"]])
    torch.testing.assert_close(projection, expected["projection"], atol=1e-5, rtol=1e-5)
    targets = rob_msn.teacher_probs(projection, teacher.prototypes, 0.025)
    torch.testing.assert_close(targets, expected["teacher_probs_t0.025"], atol=1e-5, rtol=1e-5)
    # the same numbers from the definition, in float64: softmax over k of cos(h, prototype_k) / 0.025
    for i in range(len(projection)):
        reference = softmax64([cosine64(projection[i], p) for p in teacher.prototypes], 0.025)
        assert max(abs(a - b) for a, b in zip(targets[i].tolist(), reference)) < 1e-5


@pytest.mark.parametrize("swapped", [False, True])
def test_distillation_loss_matches_a_float64_loop(swapped):
    torch.manual_seed(0)
    n_global, n_crops, b, k, d = 2, 5, 3, 7, 4
    projection, prototypes = torch.randn(n_global * b, d), torch.randn(k, d)
    student_logits = torch.randn(n_crops * b, k) * 3
    pairs = rob_msn.view_pairs(n_global, n_crops, swapped)
    loss = rob_msn.multi_crop_cross_entropy(student_logits, rob_msn.teacher_probs(projection, prototypes, 0.025), pairs, 0.1)
    assert loss.dtype == torch.float32
    total, n_pairs = 0.0, 0
    for t in range(n_global):
        for s in range(n_crops):
            if (swapped and s == t) or (not swapped and s < n_global and s != t):
                continue
            for i in range(b):
                p_t = softmax64([cosine64(projection[t * b + i], p) for p in prototypes], 0.025)
                p_s = softmax64(student_logits[s * b + i].tolist(), 0.1)
                total += -sum(a * math.log(c) for a, c in zip(p_t, p_s)) / b
            n_pairs += 1
    assert n_pairs == len(pairs) == (n_global * (n_crops - 1) if swapped else n_global * (n_crops - n_global + 1))
    assert abs(loss.item() - total / n_pairs) < 1e-4


def test_same_view_pairing_skips_the_cross_pair():
    assert rob_msn.view_pairs(2, 4, swapped=False) == [(0, 0), (0, 2), (0, 3), (1, 1), (1, 2), (1, 3)]
    assert rob_msn.view_pairs(2, 4, swapped=True) == [(0, 1), (0, 2), (0, 3), (1, 0), (1, 2), (1, 3)]


def msn_reference_loss(anchors, targets, prototypes, n_views, tau=0.1, sharpen=0.25, sinkhorn_iterations=3):
    """MSN's loss as its paper and code define it, in float64: soft-nearest-neighbour predictions over the
    prototypes, targets sharpened (p^(1/T) renormalised) then Sinkhorn-balanced (column sums, 1/K, row sums,
    1/B), repeated for every anchor view; cross-entropy + me-max (negative entropy of the mean prediction + log K)."""
    z, h, p = F.normalize(anchors.double(), dim=1), F.normalize(targets.double(), dim=1), F.normalize(prototypes.double(), dim=1)
    probs = torch.softmax(z @ p.T / tau, 1)
    q = torch.softmax(h @ p.T / tau, 1) ** (1 / sharpen)
    q = (q / q.sum(1, keepdim=True)).T  # [K, B]
    n_protos, batch = q.shape
    q = q / q.sum()
    for _ in range(sinkhorn_iterations):
        q = q / q.sum(1, keepdim=True) / n_protos
        q = q / q.sum(0, keepdim=True) / batch
    q = (q * batch).T.repeat(n_views, 1)
    ce = sum(-(q[i] * probs[i].log()).sum().item() for i in range(len(q))) / len(q)
    average = probs.mean(0)
    return ce + (average * average.log()).sum().item() + math.log(n_protos)


def test_baseline_loss_matches_msn_in_float64():
    torch.manual_seed(1)
    n_views, b, k, d = 3, 5, 9, 6
    anchors, targets, prototypes = torch.randn(n_views * b, d), torch.randn(b, d), torch.randn(k, d)
    scores = rob_msn.prototype_scores(anchors, prototypes)
    target_probs = rob_msn.sinkhorn(rob_msn.teacher_probs(targets, prototypes, 0.025), 3)
    torch.testing.assert_close(target_probs.sum(1), torch.ones(b))
    pairs = [(0, s) for s in range(n_views)]
    loss = rob_msn.multi_crop_cross_entropy(scores, target_probs, pairs, 0.1) + rob_msn.me_max(scores, 0.1)
    assert abs(loss.item() - msn_reference_loss(anchors, targets, prototypes, n_views)) < 1e-5
    # the parts matter: no Sinkhorn, or no me-max, gives another value
    assert abs(loss.item() - msn_reference_loss(anchors, targets, prototypes, n_views, sinkhorn_iterations=0)) > 1e-3
    assert rob_msn.me_max(scores, 0.1).item() > 1e-3
    assert abs(rob_msn.me_max(torch.zeros(4, k), 0.1).item()) < 1e-6  # uniform use of the prototypes: 0


def distributed_worker(rank, world_size, port, path):
    """One of two gloo processes holding half the batch: Sinkhorn targets and the gradient of me-max with respect
    to a shared weight, averaged over processes as DDP does."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    x, probs, weight = distributed_inputs()
    rows = slice(rank * len(x) // world_size, (rank + 1) * len(x) // world_size)
    targets = rob_msn.sinkhorn(probs[rows], 3)
    rob_msn.me_max(x[rows] @ weight, 0.1).backward()
    grad = common.all_reduce_mean(weight.grad)
    gathered = [torch.zeros_like(targets) for _ in range(world_size)]
    dist.all_gather(gathered, targets)
    if rank == 0:
        torch.save(dict(targets=torch.cat(gathered), grad=grad), path)
    dist.destroy_process_group()


def distributed_inputs():
    gen = torch.Generator().manual_seed(0)
    x, weight = torch.randn(8, 5, generator=gen), torch.randn(5, 7, generator=gen).requires_grad_()
    return x, torch.softmax(torch.randn(8, 7, generator=gen) * 3, 1), weight


def test_baseline_sinkhorn_and_me_max_span_the_global_batch(tmp_path):
    port = random.Random().randint(20000, 40000)
    mp.spawn(distributed_worker, args=(2, port, tmp_path / "two.pth"), nprocs=2)
    two = torch.load(tmp_path / "two.pth")
    x, probs, weight = distributed_inputs()
    rob_msn.me_max(x @ weight, 0.1).backward()
    torch.testing.assert_close(two["targets"], rob_msn.sinkhorn(probs, 3), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(two["grad"], weight.grad, atol=1e-6, rtol=1e-5)
    # not vacuous: balancing each half on its own gives other targets
    halves = torch.cat([rob_msn.sinkhorn(probs[:4], 3), rob_msn.sinkhorn(probs[4:], 3)])
    assert (halves - two["targets"]).abs().max() > 1e-3


# ---------------------------------------------------------------------------------------------- token drop
def test_token_dropping_keeps_cls_and_exactly_the_right_count():
    torch.manual_seed(0)
    b, n, d = 64, 20, 3
    tokens = torch.arange(b * (1 + n), dtype=torch.float32).reshape(b, 1 + n, 1).expand(-1, -1, d)  # value = id
    kept = rob_msn.drop_patch_tokens(tokens, 0.15)
    assert kept.shape == (b, 1 + round(0.85 * n), d) == (b, 18, d)
    torch.testing.assert_close(kept[:, 0], tokens[:, 0])  # CLS first, untouched
    ids = kept[:, 1:, 0].long() - torch.arange(b)[:, None] * (1 + n)  # patch position within its own image
    assert ids.min() >= 1 and ids.max() <= n  # only this image's patch tokens, never CLS again
    assert all(len(set(row.tolist())) == 17 for row in ids)  # no token twice
    subsets = {tuple(sorted(row.tolist())) for row in ids}
    assert len(subsets) > 50  # an independent draw per image (not one mask for the batch, as MSN's code)
    dropped = torch.zeros(n + 1)
    for row in ids:
        dropped += 1
        dropped[row] -= 1
    assert dropped[1:].min() > 0  # every position gets dropped somewhere: uniform, not a fixed subset
    assert rob_msn.drop_patch_tokens(tokens, 0.10).shape[1] == 1 + 18


def test_student_drops_tokens_of_the_global_crops_only():
    torch.manual_seed(0)
    backbone, _, _ = common.student_backbone("test_vit", 32, patch_size=8)
    seen = []
    backbone.blocks[0].register_forward_hook(lambda module, inputs, output: seen.append(inputs[0].shape[:2]))
    network = rob_msn.MSNNetwork(backbone, rob_msn.LinearHead(64, 10), patch_drop=0.25)
    crops = [torch.randn(2, 3, 32, 32), torch.randn(2, 3, 32, 32), torch.randn(2, 3, 16, 16)]
    assert network(crops).shape == (6, 10)
    assert seen == [(4, 1 + 12), (2, 1 + 4)]  # globals: 16 patches -> 12 kept; locals: all 4
    with torch.no_grad():  # with nothing dropped, the pass is exactly timm's forward
        torch.testing.assert_close(rob_msn.vit_forward_dropping_tokens(backbone, crops[0], 0.0), backbone(crops[0]))


# ------------------------------------------------------------------------------------------------- teacher
@pytest.mark.parametrize("release", ["vits16_800ep", "vitb16_600ep", "vitl16_600ep", "vitb4_300ep", "vitl7_200ep"])
def test_official_release_layouts_load(release):
    schema = json.loads((OFFICIAL_SCHEMAS / f"msn_{release}.pth.tar.json").read_text())
    ckpt = dict(target_encoder={k: torch.empty(v["shape"], device="meta") for k, v in schema["target_encoder"].items()},
                prototypes=torch.empty(schema["prototypes"]["shape"], device="meta"))
    with torch.device("meta"):
        teacher = rob_msn.teacher_from_checkpoint(ckpt, release)  # strict: every key consumed, shapes checked
    assert teacher.prototypes.shape == (1024, 256) and teacher.head.fc3.out_features == 256
    patch = int(re.search(r"vit\w(\d+)_", release).group(1))
    assert teacher.backbone.patch_embed.proj.kernel_size == (patch, patch)


def test_a_low_precision_teacher_keeps_fc3_in_fp32(monkeypatch):
    """On a GPU the teacher runs in bf16 but its last projection layer, whose outputs become cosines / 0.025: that
    layer keeps its fp32 weights exactly (bf16 forced here on the CPU)."""
    real_new_run = rob_msn.new_run

    def bf16_run(*args, **kwargs):
        run = real_new_run(*args, **kwargs)
        run.teacher_dtype = torch.bfloat16
        return run
    monkeypatch.setattr(rob_msn, "new_run", bf16_run)
    teacher = rob_msn.load_teacher(str(ASSETS / "fmnist_msn_vit_nano.pth"))
    fc3 = teacher.head.fc3.weight.clone()
    args = parse(["--data_path", "synthetic", "--student", "vit_pico", "--patch_size", "7", "--global_crops_size",
                  "28", "--local_crops_size", "14", "--batch_size_per_gpu", "4", "--hidden_dim", "64"])
    data = common.training_data("synthetic", rob_msn.build_augmentation(args), 4, 0, subset=8)
    student, arch = rob_msn.build_student(args, teacher)
    run = rob_msn.build_run(args, torch.device("cpu"), data, student, arch, teacher)
    head = run.teacher.head
    assert head.fc1.weight.dtype == head.fc2.weight.dtype == torch.bfloat16
    assert next(run.teacher.backbone.parameters()).dtype == torch.bfloat16
    assert head.fc3.weight.dtype == torch.float32 and torch.equal(head.fc3.weight, fc3)


def test_wrong_checkpoints_are_refused_with_the_fix(tmp_path):
    with pytest.raises(ValueError, match="rob_dino.py"):
        rob_msn.load_teacher(str(OFFICIAL_TINY / "dino_tiny_full_checkpoint.pth"))
    with pytest.raises(ValueError, match="rob_ibot.py"):
        rob_msn.load_teacher(str(OFFICIAL_TINY / "ibot_tiny_checkpoint.pth"))
    with pytest.raises(ValueError, match="rob_swav.py"):
        rob_msn.load_teacher(str(OFFICIAL_TINY / "swav_tiny_rn_1111.pth.tar"))
    with pytest.raises(ValueError, match="projection head and prototypes"):
        rob_msn.load_teacher(str(OFFICIAL_TINY / "dino_tiny_backbone_only.pth"))
    with pytest.raises(FileNotFoundError, match="not found"):
        rob_msn.load_teacher(str(tmp_path / "missing.pth"))
    ckpt = torch.load(MSN_TINY, weights_only=True)
    with pytest.raises(ValueError, match="no prototypes"):
        rob_msn.teacher_from_checkpoint(dict(target_encoder=ckpt["target_encoder"]), "encoder.pth", num_heads=3)
    with pytest.raises(ValueError, match=r"missing keys: bn2\.running_mean"):
        ckpt["target_encoder"].pop("module.fc.bn2.running_mean")
        rob_msn.teacher_from_checkpoint(ckpt, "damaged.pth", num_heads=3)
    other = tmp_path / "dino_run.pth"
    torch.save(dict(method="rob_dino", student={}), other)
    with pytest.raises(ValueError, match="rob_dino.py"):
        rob_msn.load_teacher(str(other))


def test_baseline_and_student_checkpoints_are_rob_teachers(baseline_run, tmp_path, small_folder):
    ckpt = common.load_file(baseline_run / "checkpoint.pth")
    assert ckpt["method"] == "rob_msn" and ckpt["step"] == 6
    teacher = rob_msn.load_teacher(str(baseline_run / "checkpoint.pth"))  # strict: the EMA target encoder
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    torch.testing.assert_close(teacher.prototypes, ckpt["student"]["prototypes"], atol=0, rtol=0)
    for name, tensor in teacher.state_dict().items():
        if name != "prototypes":
            assert torch.equal(tensor, ckpt["teacher"][name]), name
    assert not torch.equal(ckpt["teacher"]["backbone.cls_token"], ckpt["student"]["backbone.cls_token"])  # an EMA
    # a RoB-MSN student trained by it teaches in turn, through its logits at the student temperature
    run_in_process(["rob_msn.py", *TINY, "--teacher", baseline_run / "checkpoint.pth", "--data_path", small_folder,
                    "--batch_size_per_gpu", "8", "--epochs", "1", "--output_dir", tmp_path])
    student_teacher = rob_msn.load_teacher(str(tmp_path / "checkpoint.pth"))
    assert student_teacher.prototypes is None and student_teacher.head[-1].out_features == 1024
    student_sd = common.load_file(tmp_path / "checkpoint.pth")["student"]
    assert all(torch.equal(t, student_sd[n]) for n, t in student_teacher.state_dict().items())


# ------------------------------------------------------------------------------------------------ training
def test_teacher_stays_frozen(tmp_path, small_folder, monkeypatch):
    """In-process run with the official tiny MSN teacher: its tensors are bitwise unchanged after several steps
    and never get gradients; the checkpoint holds no teacher (RoB) and a log line per epoch."""
    loaded = {}
    monkeypatch.setattr(rob_msn, "load_teacher", lambda name: loaded.setdefault(
        "teacher", rob_msn.teacher_from_checkpoint(common.load_file(name), name, num_heads=3)))
    in_process(TINY + ["--teacher", MSN_TINY, "--data_path", small_folder, "--batch_size_per_gpu", "8",
                       "--epochs", "2", "--output_dir", tmp_path])
    teacher = loaded["teacher"]
    fresh = rob_msn.teacher_from_checkpoint(common.load_file(MSN_TINY), "fresh", num_heads=3)
    assert not teacher.training and all(p.grad is None and not p.requires_grad for p in teacher.parameters())
    for (name, a), b in zip(teacher.state_dict().items(), fresh.state_dict().values()):
        assert torch.equal(a, b), name  # BN running statistics included: eval mode throughout
    ckpt = common.load_file(tmp_path / "checkpoint.pth")
    assert ckpt["step"] == 6 and ckpt["method"] == "rob_msn" and "teacher" not in ckpt
    assert ckpt["student"]["head.2.weight"].shape == (128, 2048)  # logits over the teacher's 128 prototypes
    assert [k for k in ckpt["student"] if k.startswith("head.")] == ["head.0.weight", "head.0.bias", "head.2.weight",
                                                                     "head.2.bias"]  # Linear -> Linear, no activation
    assert len((tmp_path / "log.txt").read_text().splitlines()) == 2


def student_weights(output_dir):
    return common.load_file(output_dir / "checkpoint.pth")["student"]


def wait_for_step(log_path, proc, min_step, timeout=120):
    """Poll the run's stderr (tqdm) until it reports at least `min_step` done steps of the current epoch."""
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        steps = [int(m) for m in re.findall(r"(\d+)/6 \[", log_path.read_text(errors="ignore"))]
        if steps and max(steps) >= min_step:
            return
        time.sleep(0.05)


def launch(args, log_path):
    return subprocess.Popen([sys.executable, "rob_msn.py", *map(str, args)], cwd=ROOT, stdout=open(log_path, "w"),
                            stderr=subprocess.STDOUT, env={**os.environ, "OMP_NUM_THREADS": "1"})


def test_baseline_resume_after_sigterm_and_sigkill_is_exact(tmp_path, small_folder):
    """The plain-MSN baseline, which has the most state (EMA target encoder with BN statistics, prototypes,
    token drop on): SIGTERM or SIGKILL mid-run, rerun, and the result is bitwise the uninterrupted run's."""
    args = TINY + ["--teacher", "ema", "--data_path", small_folder, "--batch_size_per_gpu", "4", "--epochs", "4"]
    run_in_process(["rob_msn.py", *args, "--output_dir", tmp_path / "straight"])
    reference = common.load_file(tmp_path / "straight" / "checkpoint.pth")
    rng = random.Random()

    def assert_same_as_reference(out):
        ckpt = common.load_file(out / "checkpoint.pth")
        for key in ("student", "teacher"):
            for name, tensor in ckpt[key].items():
                assert torch.equal(tensor, reference[key][name]), f"{key}.{name}"

    # SIGTERM mid-epoch: a checkpoint is written at the end of the current step, the rerun resumes there
    out = tmp_path / "sigterm"
    proc = launch(args + ["--output_dir", out], tmp_path / "sigterm.log")
    wait_for_step(tmp_path / "sigterm.log", proc, min_step=rng.randint(1, 4))
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=120)
    stopped = re.search(r"stopped by signal at step (\d+)", (tmp_path / "sigterm.log").read_text())
    assert stopped and 0 < int(stopped.group(1)) < 24, (tmp_path / "sigterm.log").read_text()[-2000:]
    assert common.load_file(out / "checkpoint.pth")["step"] == int(stopped.group(1))
    resumed = run_in_process(["rob_msn.py", *args, "--output_dir", out])
    assert f"resumed from {out / 'checkpoint.pth'} at step {stopped.group(1)}" in resumed.stdout
    assert_same_as_reference(out)

    # SIGKILL at a random moment: the run resumes from the last complete checkpoint, loses nothing else
    out = tmp_path / "sigkill"
    proc = launch(args + ["--output_dir", out], tmp_path / "sigkill.log")
    wait_for_step(tmp_path / "sigkill.log", proc, min_step=1)
    time.sleep(rng.uniform(0, 0.8))
    proc.kill()
    assert proc.wait() == -signal.SIGKILL  # killed mid-run, not finished
    if (out / "checkpoint.pth").exists():
        assert common.load_file(out / "checkpoint.pth")["step"] < 24
    run_in_process(["rob_msn.py", *args, "--output_dir", out])
    assert_same_as_reference(out)
    logged = {json.loads(line)["epoch"] for line in (out / "log.txt").read_text().splitlines()}
    assert logged == set(range(4))


@pytest.mark.slow
def test_fashion_mnist_run_raises_knn(tmp_path):
    """Real data, the shipped teacher: a short RoB-MSN run lifts a small ViT's k-NN far above its random init."""
    before, after = rob_knn_gain("rob_msn.py", ASSETS / "fmnist_msn_vit_nano.pth", tmp_path / "run", ["--gpu_augment"])
    assert after > before + KNN_MARGIN, (before, after)
