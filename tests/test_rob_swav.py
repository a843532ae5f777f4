"""rob_swav.py: Sinkhorn-Knopp against float64 and across processes, loss and pairing, LARS, teacher loading
(official tiny fixture, full-size layout, refusals), frozen teacher, prototypes, baseline checkpoint as a
teacher, exact resume."""
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

import common
import rob_swav
from conftest import (ASSETS, KNN_MARGIN, OFFICIAL_SCHEMAS, OFFICIAL_TINY, ROOT, rob_knn_gain, run_in_process,
                      run_script)

SWAV_TINY = OFFICIAL_TINY / "swav_tiny_rn_1111.pth.tar"
TINY_RUN = ["--student", "test_resnet", "--global_crops_size", "32", "--local_crops_size", "16",
            "--local_crops_number", "2", "--teacher", SWAV_TINY, "--num_workers", "0", "--warmup_epochs", "0",
            "--saveckp_freq", "0", "--lr", "5"]


def parse(args):
    return argparse.ArgumentParser(parents=[rob_swav.get_args_parser()]).parse_args([str(a) for a in args])


# ------------------------------------------------------------------------------------------- Sinkhorn
def reference_sinkhorn(scores, epsilon, n_iters):
    """SwAV's algorithm written out in float64 with explicit loops and no max subtraction: Q = exp(S / eps)^T,
    total mass 1, then n_iters times: every prototype row to 1/K, every sample column to 1/B; codes = columns
    normalised to 1."""
    b, k = scores.shape
    q = torch.exp(scores.double() / epsilon).t().clone()
    q /= q.sum()
    for _ in range(n_iters):
        for row in range(k):
            q[row] = q[row] / q[row].sum() / k
        for col in range(b):
            q[:, col] = q[:, col] / q[:, col].sum() / b
    for col in range(b):
        q[:, col] = q[:, col] / q[:, col].sum()
    return q.t()


@pytest.mark.parametrize("b,k,epsilon", [(6, 5, 0.05), (4, 9, 0.03), (16, 3, 0.03)])
def test_sinkhorn_matches_a_float64_loop(b, k, epsilon):
    torch.manual_seed(b * k)
    scores = torch.rand(b, k) * 2 - 1  # cosine similarities
    codes = rob_swav.sinkhorn_knopp(scores, epsilon, 3)
    assert codes.dtype == torch.float32 and codes.shape == (b, k)
    torch.testing.assert_close(codes.double(), reference_sinkhorn(scores, epsilon, 3), atol=1e-6, rtol=1e-4)
    torch.testing.assert_close(codes.sum(1), torch.ones(b), atol=1e-5, rtol=0)  # one code per sample
    # converged, both marginals hold: every sample sums to 1, every prototype gets B / K of the batch
    converged = rob_swav.sinkhorn_knopp(scores, epsilon, 300)
    torch.testing.assert_close(converged.sum(1), torch.ones(b), atol=1e-4, rtol=0)
    torch.testing.assert_close(converged.sum(0), torch.full((k,), b / k), atol=1e-4, rtol=0)
    # equipartition changes the codes (not a softmax); 0 iterations is the softmax
    assert (codes - torch.softmax(scores / epsilon, 1)).abs().max() > 1e-2
    torch.testing.assert_close(rob_swav.sinkhorn_knopp(scores, epsilon, 0), torch.softmax(scores / epsilon, 1))


def test_sinkhorn_subtracts_the_maximum():
    scores = torch.rand(8, 30) * 2 - 1
    codes = rob_swav.sinkhorn_knopp(scores + 40, 0.03, 3)  # exp(41 / 0.03) overflows fp32 without it
    torch.testing.assert_close(codes, rob_swav.sinkhorn_knopp(scores, 0.03, 3))


def test_queue_joins_sinkhorn_and_only_the_batch_codes_are_kept():
    torch.manual_seed(0)
    scores, past = torch.rand(4, 6) * 2 - 1, torch.rand(10, 6) * 2 - 1
    codes = rob_swav.teacher_codes(scores, 0.05, 3, past)
    torch.testing.assert_close(codes, rob_swav.sinkhorn_knopp(torch.cat([scores, past]), 0.05, 3)[:4])
    assert (codes - rob_swav.teacher_codes(scores, 0.05, 3)).abs().max() > 1e-3
    queue = rob_swav.EmbeddingQueue(n_views=2, length=5, dim=3)
    first, second = torch.randn(4, 3), torch.randn(4, 3)  # 2 views x 2 samples each, crop-major
    queue.push(first)
    queue.push(second)
    torch.testing.assert_close(queue.embeddings[0], torch.cat([second[:2], first[:2], torch.zeros(1, 3)]))
    torch.testing.assert_close(queue.share(1), torch.cat([second[2:], first[2:], torch.zeros(1, 3)]))


DISTRIBUTED_SCRIPT = """
import sys
sys.path.insert(0, {root!r})
import torch, torch.distributed as dist
import rob_swav
dist.init_process_group("gloo")
rank = dist.get_rank()
torch.manual_seed(0)
scores = torch.rand(12, 7) * 2 - 1
local = scores[:7] if rank == 0 else scores[7:]  # unequal shares, as with a queue split across processes
codes = rob_swav.sinkhorn_knopp(local, 0.03, 3)
queue = rob_swav.EmbeddingQueue(n_views=1, length=5, dim=2)
queue.push(torch.full((2, 2), float(rank)))
queue.push(torch.full((2, 2), 10.0 + rank))
torch.save(dict(codes=codes, queue=queue.embeddings, share=queue.share(0)), {out!r} + f"/rank{{rank}}.pt")
dist.barrier()
dist.destroy_process_group()  # an open process group can abort the interpreter at exit (a flaky red test)
"""


def test_distributed_sinkhorn_equals_one_process_on_the_whole_batch(tmp_path):
    script = tmp_path / "sinkhorn_2proc.py"
    script.write_text(DISTRIBUTED_SCRIPT.format(root=str(ROOT), out=str(tmp_path)))
    run_script([script], nproc=2)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    torch.manual_seed(0)
    scores = torch.rand(12, 7) * 2 - 1
    whole = rob_swav.sinkhorn_knopp(scores, 0.03, 3)
    torch.testing.assert_close(torch.cat([ranks[0]["codes"], ranks[1]["codes"]]), whole, atol=1e-6, rtol=1e-5)
    assert (whole[:7] - rob_swav.sinkhorn_knopp(scores[:7], 0.03, 3)).abs().max() > 1e-3  # the batch is global
    # the queue is the same on both processes (newest first, rank-major) and each process uses its own half
    expected = torch.tensor([10.0, 10, 11, 11, 0])[:, None].expand(5, 2)
    for r in range(2):
        torch.testing.assert_close(ranks[r]["queue"][0], expected)
        torch.testing.assert_close(ranks[r]["share"], expected[r::2])


# ------------------------------------------------------------------------------------------------- loss
def reference_loss(student_scores, codes, n_teacher, swapped, student_temp):
    """Term by term in float64: mean over (teacher view, student crop) pairs of the batch mean of
    -sum_k q_t[k] log p_s[k]; same-view skips only student crops that are other teacher views."""
    b = codes.shape[0] // n_teacher
    n_crops = student_scores.shape[0] // b
    total, pairs = 0.0, 0
    for t in range(n_teacher):
        for s in range(n_crops):
            if (swapped and s == t) or (not swapped and s < n_teacher and s != t):
                continue
            for i in range(b):
                log_p = torch.log_softmax(student_scores[s * b + i].double() / student_temp, 0)
                total += -(codes[t * b + i].double() * log_p).sum().item() / b
            pairs += 1
    return total / pairs


@pytest.mark.parametrize("n_teacher,swapped", [(1, False), (1, True), (2, False), (2, True)])
def test_loss_matches_a_float64_loop(n_teacher, swapped):
    torch.manual_seed(n_teacher)
    n_crops, b, k = 5, 3, 11
    student_scores = torch.rand(n_crops * b, k) * 2 - 1
    codes = rob_swav.sinkhorn_knopp(torch.rand(n_teacher * b, k), 0.03, 3)
    pairs = rob_swav.view_pairs(n_teacher, n_crops, swapped)
    loss = rob_swav.multi_crop_cross_entropy(student_scores, codes, pairs, 0.1)
    assert loss.dtype == torch.float32
    assert abs(loss.item() - reference_loss(student_scores, codes, n_teacher, swapped, 0.1)) < 1e-4


def test_view_pairs():
    assert rob_swav.view_pairs(1, 4, swapped=False) == [(0, 0), (0, 1), (0, 2), (0, 3)]  # crop 0 included
    assert rob_swav.view_pairs(1, 4, swapped=True) == [(0, 1), (0, 2), (0, 3)]
    assert rob_swav.view_pairs(2, 4, swapped=False) == [(0, 0), (0, 2), (0, 3), (1, 1), (1, 2), (1, 3)]
    assert rob_swav.view_pairs(2, 4, swapped=True) == [(0, 1), (0, 2), (0, 3), (1, 0), (1, 2), (1, 3)]


# ------------------------------------------------------------------------------------------- optimiser
def test_lars_matches_a_float64_update_and_resumes_exactly():
    """apex LARC (clip=False) + SGD momentum, by hand in float64: g' = (g + wd w) * trust ||w|| / (||g|| +
    wd ||w|| + eps) unless ||w|| or ||g|| is 0 (then g' = g); buf = m buf + g'; w -= lr buf."""
    torch.manual_seed(0)
    lr, momentum, wd, trust, eps = 0.7, 0.9, 0.05, 0.001, 1e-8
    params = [torch.randn(4, 3), torch.zeros(4), torch.ones(5) + 0.1 * torch.randn(5), torch.randn(2)]
    params = [torch.nn.Parameter(p) for p in params]
    optimizer = rob_swav.LARS(params, lr=lr, momentum=momentum, weight_decay=wd)
    reference = [p.detach().double().clone() for p in params]
    initial = [w.clone() for w in reference]
    buffers = [None] * len(params)
    for step in range(4):
        grads = [torch.randn_like(p) for p in params]
        grads[3] = None if step < 2 else torch.zeros(2) if step == 2 else grads[3]  # frozen, then zero grad
        for p, g in zip(params, grads):
            p.grad = g
        if step == 2:  # exact resume: a fresh optimiser loaded from the state dict continues identically
            optimizer = rob_swav.LARS(params, lr=lr, momentum=momentum, weight_decay=wd)
            optimizer.load_state_dict(saved)
        optimizer.step()
        saved = optimizer.state_dict()
        for i, g in enumerate(grads):
            if g is None:
                continue
            w, g = reference[i], g.double()
            w_norm, g_norm = w.norm().item(), g.norm().item()
            update = (g + wd * w) * trust * w_norm / (g_norm + wd * w_norm + eps) if w_norm > 0 and g_norm > 0 else g
            buffers[i] = update.clone() if buffers[i] is None else momentum * buffers[i] + update
            reference[i] = w - lr * buffers[i]
        for p, w, w0 in zip(params, reference, initial):  # the displacement (~1e-3), to fp32 rounding of w
            torch.testing.assert_close(p.detach().double() - w0, w - w0, atol=5e-7, rtol=1e-4)
    assert params[1].detach().abs().min() > 0.1  # the zero bias took a plain, unscaled step first


def test_lars_step_size_is_relative_to_the_weight_norm():
    w = torch.nn.Parameter(torch.full((10,), 3.0))
    w.grad = torch.full((10,), 1000.0)
    rob_swav.LARS([w], lr=1.0, momentum=0.9).step()
    # one step moves w by lr * trust * ||w|| in norm whatever the gradient's scale
    assert abs((w.detach() - 3.0).norm().item() - 1e-3 * 3.0 * 10 ** 0.5) < 1e-6


# --------------------------------------------------------------------------------------------- teacher
def test_official_tiny_teacher_reproduces_prototype_scores():
    expected = common.load_file(OFFICIAL_TINY / "swav_tiny_expected.pth")
    teacher = rob_swav.load_teacher(str(SWAV_TINY))
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    assert all(t.dtype in (torch.float32, torch.int64) for t in teacher.state_dict().values())  # fp16 -> fp32
    with torch.no_grad():
        embedding, scores = teacher([expected["input"]])
    torch.testing.assert_close(embedding, expected["embedding"], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(scores, expected["prototype_scores"], atol=1e-5, rtol=1e-5)


def official_state_dict(name):
    schema = json.loads((OFFICIAL_SCHEMAS / f"{name}.pth.tar.json").read_text())
    return {k: torch.empty(v["shape"], device="meta", dtype=getattr(torch, v["dtype"]))
            for k, v in schema["state_dict"].items()}


def test_official_rn50_layout_loads_and_wide_resnets_are_refused():
    with torch.device("meta"):
        teacher = rob_swav.teacher_from_checkpoint(official_state_dict("swav_800ep_pretrain"), "swav_800ep")  # strict
    assert teacher.head.prototypes.weight.shape == (3000, 128)
    assert teacher.head.projection_head[0].weight.shape == (2048, 2048)
    with pytest.raises(ValueError, match="standard-width.*swav_800ep_pretrain"):
        rob_swav.teacher_from_checkpoint(official_state_dict("swav_RN50w2_400ep_pretrain"), "swav_RN50w2")


def test_wrong_checkpoints_are_refused_with_the_fix(tmp_path):
    cases = [("dino_tiny_full_checkpoint.pth", "rob_dino.py"), ("dino_tiny_backbone_only.pth", "backbone only"),
             ("ibot_tiny_checkpoint.pth", "rob_ibot.py"), ("msn_tiny.pth.tar", "rob_msn.py")]
    for name, message in cases:
        with pytest.raises(ValueError, match=message):
            rob_swav.load_teacher(str(OFFICIAL_TINY / name))
    torch.save(dict(method="rob_dino", student={}, arch={}), tmp_path / "dino_run.pth")
    with pytest.raises(ValueError, match="written by rob_dino.py.*Use rob_dino.py"):
        rob_swav.load_teacher(str(tmp_path / "dino_run.pth"))
    torch.save(dict(weights=torch.zeros(2)), tmp_path / "other.pth")
    with pytest.raises(ValueError, match="not a SwAV checkpoint"):
        rob_swav.load_teacher(str(tmp_path / "other.pth"))
    with pytest.raises(FileNotFoundError, match="not found"):
        rob_swav.load_teacher(str(tmp_path / "missing.pth"))


# ---------------------------------------------------------------------------------------------- training
def test_teacher_stays_frozen(tmp_path, small_folder, monkeypatch):
    """In-process run: the teacher's tensors (BN running statistics included) are bitwise unchanged after
    several steps and never get grads; --use_teacher_prototypes keeps a frozen, saved copy of its prototypes."""
    loaded = {}
    real_load = rob_swav.load_teacher
    monkeypatch.setattr(rob_swav, "load_teacher", lambda *a: loaded.setdefault("teacher", real_load(*a)))
    run_in_process(["rob_swav.py", *TINY_RUN, "--data_path", small_folder, "--batch_size_per_gpu", "8", "--epochs", "2",
                    "--use_teacher_prototypes", "--teacher_crops", "2", "--output_dir", tmp_path])
    teacher, fresh = loaded["teacher"], real_load(str(SWAV_TINY))
    assert all(p.grad is None and not p.requires_grad for p in teacher.parameters())
    assert len(teacher.state_dict()) == len(fresh.state_dict())
    for (name, a), b in zip(teacher.state_dict().items(), fresh.state_dict().values()):
        assert torch.equal(a, b), name  # includes every running_mean / running_var / num_batches_tracked
    ckpt = common.load_file(tmp_path / "checkpoint.pth")
    assert ckpt["step"] == 6 and ckpt["method"] == "rob_swav" and "teacher" not in ckpt
    assert torch.equal(ckpt["student"]["head.prototypes.weight"], fresh.head.prototypes.weight)
    assert len((tmp_path / "log.txt").read_text().splitlines()) == 2


def test_own_prototypes_are_frozen_first_then_trained_on_the_unit_sphere(tmp_path, small_folder):
    args = TINY_RUN + ["--data_path", small_folder, "--batch_size_per_gpu", "4", "--epochs", "1"]  # 6 steps
    prototypes = {}
    for name, extra in [("init", ["--lr", "0"]), ("frozen", ["--freeze_prototypes_niters", "6"]),
                        ("trained", ["--freeze_prototypes_niters", "3"])]:
        run_in_process(["rob_swav.py"] + args + extra + ["--output_dir", tmp_path / name])
        prototypes[name] = common.load_file(tmp_path / name / "checkpoint.pth")["student"]["head.prototypes.weight"]
        torch.testing.assert_close(prototypes[name].norm(dim=1), torch.ones(30), atol=1e-6, rtol=0)
    assert torch.equal(prototypes["frozen"], prototypes["init"])
    assert (prototypes["trained"] - prototypes["init"]).abs().max() > 1e-6  # LARS: steps of lr * 0.001 * ||w||


def test_collapse_warning_at_ln_k_names_the_fix():
    k = 1000  # the collapsed Fashion-MNIST runs logged 6.90776-6.91957, ln 1000 = 6.90776
    for loss in (6.90776, 6.90787, 6.91957, 6.895):
        assert "--epsilon (now 0.05, e.g. 0.03;" in rob_swav.collapse_warning(loss, k, 0.05)
    for loss in (6.37, 6.87377, 6.93598):  # a learning run's epochs (epsilon 0.03), and one above ln K
        assert rob_swav.collapse_warning(loss, k, 0.05) is None
    assert "(now 0.03, e.g. 0.025;" in rob_swav.collapse_warning(math.log(100), 100, 0.03)  # not into underflow


def test_plain_run_warns_when_its_loss_sits_at_ln_k(tmp_path, small_folder):
    """A student temperature so high that every prediction is uniform: the loss is ln K whatever the codes."""
    plain = ["--teacher", "self", "--nmb_prototypes", "30", "--feat_dim", "8", "--hidden_mlp", "32",
             "--student_temp", "1e4", "--freeze_prototypes_niters", "0"]
    result = run_in_process(["rob_swav.py", *TINY_RUN, *plain, "--data_path", small_folder, "--batch_size_per_gpu", "4",
                             "--epochs", "1", "--output_dir", tmp_path])
    assert f"sits at ln 30 = {math.log(30):.4f}: plain SwAV has collapsed" in result.stdout


def test_baseline_checkpoint_teaches_a_rob_student(tmp_path, small_folder):
    """--teacher self on 2 processes (queue all-gathered, global Sinkhorn); its checkpoint loads as a RoB
    teacher whose tensors are the student's, and a RoB run learns from it."""
    baseline = ["--teacher", "self", "--nmb_prototypes", "40", "--feat_dim", "8", "--hidden_mlp", "32",
                "--queue_length", "8", "--epoch_queue_starts", "0", "--freeze_prototypes_niters", "1"]
    common_args = TINY_RUN + ["--data_path", small_folder, "--batch_size_per_gpu", "4", "--epochs", "1"]
    run_script(["rob_swav.py", *common_args, *baseline, "--output_dir", tmp_path / "self"], nproc=2)
    ckpt = common.load_file(tmp_path / "self" / "checkpoint.pth")
    assert ckpt["step"] == 3 and ckpt["queue"]["embeddings"].shape == (2, 8, 8)
    assert ckpt["queue"]["embeddings"].norm(dim=-1).min() > 0.99  # filled with unit embeddings
    teacher = rob_swav.load_teacher(str(tmp_path / "self" / "checkpoint.pth"))
    assert not teacher.training and teacher.state_dict().keys() == ckpt["student"].keys()
    for name, tensor in teacher.state_dict().items():
        assert torch.equal(tensor, ckpt["student"][name]), name
    torch.testing.assert_close(teacher.head.prototypes.weight.norm(dim=1), torch.ones(40), atol=1e-6, rtol=0)
    run_in_process(["rob_swav.py", *common_args, "--teacher", tmp_path / "self" / "checkpoint.pth", "--output_dir",
                    tmp_path / "rob"])
    student = common.load_file(tmp_path / "rob" / "checkpoint.pth")["student"]
    assert student["head.prototypes.weight"].shape == (40, 8)
    assert json.loads((tmp_path / "rob" / "log.txt").read_text())["step"] == 6


def checkpoint(output_dir):
    return common.load_file(output_dir / "checkpoint.pth")


def wait_for_step(log_path, proc, min_step, timeout=120):
    """Poll the run's stderr (tqdm) until it reports at least `min_step` done steps of the current epoch."""
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        steps = [int(m) for m in re.findall(r"(\d+)/6 \[", log_path.read_text(errors="ignore"))]
        if steps and max(steps) >= min_step:
            return
        time.sleep(0.05)


def launch(args, log_path):
    return subprocess.Popen([sys.executable, "rob_swav.py", *map(str, args)], cwd=ROOT, stdout=open(log_path, "w"),
                            stderr=subprocess.STDOUT, env={**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"})


def assert_same_state(output_dir, reference):
    ckpt = checkpoint(output_dir)
    for name, tensor in ckpt["student"].items():  # BN running statistics included
        assert torch.equal(tensor, reference["student"][name]), name
    assert torch.equal(ckpt["queue"]["embeddings"], reference["queue"]["embeddings"])


def test_resume_after_sigterm_and_sigkill_is_exact(tmp_path, small_folder):
    """BN student, LARS momentum, queue (in use from step 8) and prototypes frozen for 10 steps all resume."""
    args = TINY_RUN + ["--data_path", small_folder, "--batch_size_per_gpu", "4", "--epochs", "8",  # 48 steps
                       "--queue_length", "8", "--epoch_queue_starts", "1", "--freeze_prototypes_niters", "10"]
    run_in_process(["rob_swav.py"] + args + ["--output_dir", tmp_path / "straight"])
    reference = checkpoint(tmp_path / "straight")
    rng = random.Random()

    # SIGTERM mid-epoch: a checkpoint is written at the end of the current step, the rerun resumes there
    out = tmp_path / "sigterm"
    proc = launch(args + ["--output_dir", out], tmp_path / "sigterm.log")
    wait_for_step(tmp_path / "sigterm.log", proc, min_step=rng.randint(1, 4))
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=120)
    stopped = re.search(r"stopped by signal at step (\d+)", (tmp_path / "sigterm.log").read_text())
    assert stopped and 0 < int(stopped.group(1)) < 48, (tmp_path / "sigterm.log").read_text()[-2000:]
    assert checkpoint(out)["step"] == int(stopped.group(1))
    resumed = run_in_process(["rob_swav.py", *args, "--output_dir", out])
    assert f"resumed from {out / 'checkpoint.pth'} at step {stopped.group(1)}" in resumed.stdout
    assert_same_state(out, reference)

    # SIGKILL at a random moment (rob_dino.py's test kills a resumed run too): the run resumes from the last
    # complete checkpoint, loses nothing else
    out = tmp_path / "sigkill"
    proc = launch(args + ["--output_dir", out], tmp_path / "sigkill.log")
    wait_for_step(tmp_path / "sigkill.log", proc, min_step=1)
    time.sleep(rng.uniform(0, 0.8))
    proc.kill()
    assert proc.wait() == -signal.SIGKILL  # killed mid-run, not finished
    if (out / "checkpoint.pth").exists():
        assert checkpoint(out)["step"] < 48
    run_in_process(["rob_swav.py", *args, "--output_dir", out])
    assert_same_state(out, reference)
    logged = {json.loads(line)["epoch"] for line in (out / "log.txt").read_text().splitlines()}
    assert logged == set(range(8))  # every epoch logged (one killed between log and checkpoint is logged twice)


@pytest.mark.slow
def test_fashion_mnist_run_raises_knn(tmp_path):
    """Real data, the shipped teacher: a short RoB-SwAV run lifts a small ViT's k-NN far above its random init."""
    before, after = rob_knn_gain("rob_swav.py", ASSETS / "fmnist_swav_vit_nano.pth", tmp_path / "run", ["--gpu_augment", "--optimizer", "adamw", "--hidden_mlp", "512"])
    assert after > before + KNN_MARGIN, (before, after)
