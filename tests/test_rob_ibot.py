"""rob_ibot.py: losses, block masks, masked student, teacher loading, frozen teacher, the plain-iBOT baseline as
a teacher, distributed equivalence, exact resume."""
import argparse
import json
import math
import random
import re
import signal
import subprocess
import sys
import time

import pytest
import torch

import common
import rob_ibot
from conftest import ASSETS, KNN_MARGIN, OFFICIAL_SCHEMAS, OFFICIAL_TINY, ROOT, rob_knn_gain

IBOT_TINY = OFFICIAL_TINY / "ibot_tiny_checkpoint.pth"
# test_vit student with the tiny teacher's patch size (16) at 64 px: a 4 x 4 patch grid
TINY_RUN = ["--student", "test_vit", "--global_crops_size", "64", "--local_crops_size", "32",
            "--local_crops_number", "2", "--teacher", IBOT_TINY, "--num_workers", "0", "--drop_path_rate", "0",
            "--warmup_epochs", "0", "--saveckp_freq", "0", "--lr", "0.05"]
EMA_HEAD = ["--out_dim", "64", "--patch_out_dim", "48", "--hidden_dim", "32", "--bottleneck_dim", "16", "--no-shared_head"]


def parse(args):
    return argparse.ArgumentParser(parents=[rob_ibot.get_args_parser()]).parse_args([str(a) for a in args])


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """One thread, as run_script's subprocesses: several on a loaded shared CPU can be 20x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def run_main(args):
    """rob_ibot.main in this process (cheaper than a subprocess), restoring the signal handlers it installs."""
    handlers = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)}
    try:
        rob_ibot.main(parse(args))
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)


# ------------------------------------------------------------------------------------------------- loss
def reference_cls_loss(student_logits, teacher_logits, n_global, swapped, teacher_temp, student_temp):
    """Mean over (teacher view, student crop) pairs of the batch mean of -sum_k p_t[k] log p_s[k], in float64."""
    b = teacher_logits.shape[0] // n_global
    n_crops = student_logits.shape[0] // b
    total, pairs = 0.0, 0
    for t in range(n_global):
        for s in range(n_crops):
            if (swapped and s == t) or (not swapped and s < n_global and s != t):
                continue
            for i in range(b):
                p_t = torch.softmax(teacher_logits[t * b + i].double() / teacher_temp, 0)
                log_p_s = torch.log_softmax(student_logits[s * b + i].double() / student_temp, 0)
                total += -(p_t * log_p_s).sum().item() / b
            pairs += 1
    return total / pairs


@pytest.mark.parametrize("swapped", [False, True])
def test_cls_loss_matches_a_float64_loop(swapped):
    torch.manual_seed(0)
    n_global, n_crops, b, k = 2, 5, 3, 11
    student_logits, teacher_logits = torch.randn(n_crops * b, k) * 3, torch.randn(n_global * b, k) * 0.3
    pairs = rob_ibot.view_pairs(n_global, n_crops, swapped)
    loss = rob_ibot.multi_crop_cross_entropy(student_logits, rob_ibot.teacher_probs(teacher_logits, 0.07), pairs, 0.1)
    assert abs(loss.item() - reference_cls_loss(student_logits, teacher_logits, n_global, swapped, 0.07, 0.1)) < 1e-4


def reference_patch_loss(student_logits, teacher_logits, masks, teacher_temp, student_temp):
    """Dense logits [n_global * B, N, K], masks [n_global * B, N]: for each view and image, the mean over its
    masked patches of the cross-entropy (0 without any), averaged over the images, then over the views."""
    n_global, b = 2, masks.shape[0] // 2
    views = []
    for v in range(n_global):
        per_image = []
        for i in range(b):
            row, total = v * b + i, 0.0
            positions = [p for p in range(masks.shape[1]) if masks[row, p]]
            for p in positions:
                p_t = torch.softmax(teacher_logits[row, p].double() / teacher_temp, 0)
                log_p_s = torch.log_softmax(student_logits[row, p].double() / student_temp, 0)
                total += -(p_t * log_p_s).sum().item()
            per_image.append(total / len(positions) if positions else 0.0)
        views.append(sum(per_image) / b)
    return sum(views) / n_global


def test_patch_loss_matches_a_float64_loop():
    torch.manual_seed(0)
    b, n, k = 4, 9, 13
    student_logits, teacher_logits = torch.randn(2 * b, n, k) * 3, torch.randn(2 * b, n, k) * 0.3
    masks = torch.rand(2 * b, n) < 0.4
    masks[1] = masks[6] = False  # two images without masked patch: they add 0 but count in the batch mean
    masks[2] = True
    flat = masks.flatten()
    loss = rob_ibot.patch_loss(student_logits.flatten(0, 1)[flat],
                               rob_ibot.teacher_probs(teacher_logits.flatten(0, 1)[flat], 0.07), masks, 0.1)
    expected = reference_patch_loss(student_logits, teacher_logits, masks, 0.07, 0.1)
    assert loss.dtype == torch.float32 and abs(loss.item() - expected) < 1e-4
    # not vacuous: leaving the empty images out of the mean would give a clearly different value
    assert abs(expected * 2 * b / (2 * b - 2) - expected) > 0.1
    # no masked patch in the whole batch: zero, not NaN
    none = torch.zeros(2 * b, n, dtype=torch.bool)
    assert rob_ibot.patch_loss(torch.zeros(0, k), torch.zeros(0, k), none, 0.1).item() == 0.0


def test_centering_only_in_the_baseline():
    logits, center = torch.randn(4, 6), torch.randn(1, 6)
    torch.testing.assert_close(rob_ibot.teacher_probs(logits, 0.07), torch.softmax(logits / 0.07, -1))
    torch.testing.assert_close(rob_ibot.teacher_probs(logits, 0.04, center), torch.softmax((logits - center) / 0.04, -1))


# ------------------------------------------------------------------------------------------------ masks
def test_block_masks_have_the_recipe_statistics():
    """14 x 14 grid (224 px, patch 16), 4000 draws: half the crops unmasked, the others U(0.1, 0.5) covered
    (mean 0.3, roughly uniform), in blocks: almost every masked patch lies in a fully masked 2 x 2 square
    (an i.i.d. mask of the same density: about 9%)."""
    generator = rob_ibot.BlockMaskGenerator((14, 14))
    rng = random.Random(0)
    masks = torch.stack([generator(rng) for _ in range(4000)]).float()
    ratios = masks.flatten(1).mean(1)
    masked = ratios > 0
    assert abs(masked.float().mean().item() - 0.5) < 0.03
    r = ratios[masked]
    assert abs(r.mean().item() - 0.3) < 0.01
    assert r.min().item() >= 0.1 - 1 / 196 and r.max().item() <= 0.5
    assert abs((r < 0.3).float().mean().item() - 0.5) < 0.05  # uniform: as many below the middle as above
    m = masks[masked]
    squares = m[:, :-1, :-1] * m[:, 1:, :-1] * m[:, :-1, 1:] * m[:, 1:, 1:]
    covered = torch.zeros_like(m)
    for dy in (0, 1):
        for dx in (0, 1):
            covered[:, dy:dy + 13, dx:dx + 13] += squares
    assert ((covered > 0) & (m > 0)).sum() / m.sum() > 0.9


def test_blocks_are_rectangles_with_the_recipe_aspect_ratios():
    generator = rob_ibot.BlockMaskGenerator((14, 14))
    rng = random.Random(1)
    log_aspects, areas = [], []
    for _ in range(2000):
        mask = torch.zeros(14, 14, dtype=torch.bool)
        added = generator.add_block(mask, 60, rng)
        rows, cols = mask.any(1).nonzero()[:, 0], mask.any(0).nonzero()[:, 0]
        h, w = rows.max().item() - rows.min().item() + 1, cols.max().item() - cols.min().item() + 1
        assert added == mask.sum().item() == h * w  # one solid rectangle
        log_aspects.append(math.log(h / w))
        areas.append(added)
    log_aspects = torch.tensor(log_aspects)
    # log-uniform in (0.3, 1/0.3), up to rounding the sides to whole patches
    assert log_aspects.abs().max().item() <= math.log(4) + 1e-6
    assert abs(log_aspects.mean().item()) < 0.05 and (log_aspects.abs() > math.log(2)).float().mean() > 0.2
    assert min(areas) >= 12 and max(areas) <= 60 and abs(sum(areas) / len(areas) - 38) < 2  # U(16, 60) areas


def test_masks_come_from_the_loader_workers_reproducibly(small_folder):
    """Masks are drawn per sample from (seed, epoch, index): the same with 0 or 2 loader workers, new each epoch."""
    augmentation = common.MultiCropAugmentation(32, 16, 2, 1)
    dataset = common.AugmentedDataset(common.build_dataset(str(small_folder)), augmentation,
                                      extras=rob_ibot.BlockMaskGenerator((4, 4), p=1.0).global_crops)
    (crops, masks), _ = dataset[(0, 5)]
    assert len(crops) == 3 and masks.shape == (2, 4, 4) and masks.dtype == torch.bool and masks.any()
    assert torch.equal(dataset[(0, 5)][0][1], masks) and not torch.equal(dataset[(1, 5)][0][1], masks)
    batches = []
    for workers in (0, 2):
        loader, sampler = common.build_loader(dataset, 4, workers)
        sampler.set_epoch(3)
        batches.append([m for (_, m), _ in loader])
    assert all(torch.equal(a, b) for a, b in zip(*batches)) and batches[0][0].shape == (4, 2, 4, 4)


# -------------------------------------------------------------------------------------- masked student
def test_mask_token_replaces_the_masked_patches():
    torch.manual_seed(0)
    backbone, dim, _ = common.student_backbone("test_vit", img_size=64)
    student = rob_ibot.iBOTNetwork(backbone, rob_ibot.iBOTHead(dim, 10, 12, 32, 8), mask_token=True).eval()
    with torch.no_grad():
        student.mask_token.normal_()
    globals_, local = [torch.randn(3, 3, 64, 64) for _ in range(2)], torch.randn(3, 3, 32, 32)
    masks = torch.zeros(6, 4, 4, dtype=torch.bool)
    masks[0, 1:3, 0:2] = masks[4, 3, :] = True
    patch_index = masks.flatten().nonzero()[:, 0]
    cls, patch = student(globals_ + [local], masks, patch_index)
    assert cls.shape == (9, 10) and patch.shape == (8, 12)
    # unmasked: the plain timm backbone's CLS; the masked student differs only where a crop has a masked patch
    cls_plain, patch_plain = student(globals_ + [local])
    assert patch_plain.shape == (6 * 16, 12)
    torch.testing.assert_close(cls_plain[:6], student.head(backbone(torch.cat(globals_)), torch.zeros(0, dim))[0])
    changed = (cls - cls_plain).abs().amax(1) > 1e-6
    assert changed.tolist() == [True, False, False, False, True, False, False, False, False]  # locals unmasked
    # the student cannot see the pixels under the mask: changing them changes nothing
    edited = [g.clone() for g in globals_]
    edited[0][0, :, 16:48, 0:32] = 5.0  # image 0 of view 0, patches (1..2, 0..1): all masked
    edited[1][1, :, 48:64, :] = -5.0  # image 1 of view 1 = row 4, patch row 3: masked
    cls_edited, patch_edited = student(edited + [local], masks, patch_index)
    torch.testing.assert_close(cls_edited, cls, atol=0, rtol=0)
    torch.testing.assert_close(patch_edited, patch, atol=0, rtol=0)
    edited[0][0, :, 0:16, 0:16] = 5.0  # an unmasked patch of the same image
    assert not torch.equal(student(edited + [local], masks, patch_index)[0][0], cls[0])
    # the mask token is learnt
    (cls.sum() + patch.sum()).backward()
    assert student.mask_token.grad.abs().sum() > 0


# --------------------------------------------------------------------------------------------- teacher
def test_official_tiny_teacher_reproduces_cls_and_patch_logits():
    expected = common.load_file(OFFICIAL_TINY / "ibot_tiny_expected.pth")
    teacher = rob_ibot.load_teacher(str(IBOT_TINY))
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    with torch.no_grad():
        cls_logits, patch_logits = teacher([expected["input"]])
        tokens = teacher.tokens(expected["input"])
    torch.testing.assert_close(tokens, expected["tokens"], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(cls_logits, expected["cls_logits"], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(patch_logits.view(4, 16, -1), expected["patch_logits"], atol=1e-5, rtol=1e-5)
    # only the patches asked for: the same logits
    index = torch.tensor([3, 17, 63])
    torch.testing.assert_close(teacher([expected["input"]], patch_index=index)[1], patch_logits[index])


@pytest.mark.parametrize("name", ["vits", "vitb", "vitl"])
def test_official_full_checkpoint_layouts_load(name):
    schema = json.loads((OFFICIAL_SCHEMAS / f"ibot_{name}_16_checkpoint.json").read_text())
    arch = {"vits": "vit_small", "vitb": "vit_base", "vitl": "vit_large"}[name]
    ckpt = dict(student={}, optimizer={}, epoch=100, args=argparse.Namespace(arch=arch),
                teacher={k: torch.empty(v["shape"], device="meta") for k, v in schema["teacher"].items()})
    with torch.device("meta"):
        teacher = rob_ibot.teacher_from_checkpoint(ckpt, name)  # strict: every key consumed, shapes checked
    assert teacher.head.last_layer.weight.shape == teacher.head.last_layer2.weight.shape == (8192, 256)
    assert teacher.backbone.blocks[0].attn.num_heads == {"vits": 6, "vitb": 12, "vitl": 16}[name]


def test_a_non_shared_head_loads_with_its_own_sizes():
    ckpt = common.load_file(IBOT_TINY)
    sd = dict(ckpt["teacher"])
    sd["head.last_layer2.weight_g"] = torch.rand(100, 1) + 0.5
    sd["head.last_layer2.weight_v"] = torch.randn(100, 32)
    teacher = rob_ibot.teacher_from_checkpoint({**ckpt, "teacher": sd}, "non-shared")
    g, v = sd["head.last_layer2.weight_g"], sd["head.last_layer2.weight_v"]
    torch.testing.assert_close(teacher.head.last_layer2.weight, g * v / v.norm(dim=1, keepdim=True))
    assert teacher.head.last_layer.weight.shape == (256, 32)


def test_wrong_checkpoints_are_refused_with_the_fix(tmp_path):
    with pytest.raises(ValueError, match=r"backbone only.*vitb_16/checkpoint\.pth"):
        rob_ibot.load_teacher(str(OFFICIAL_TINY / "ibot_tiny_checkpoint_teacher.pth"))
    with pytest.raises(ValueError, match="rob_dino.py"):
        rob_ibot.load_teacher(str(OFFICIAL_TINY / "dino_tiny_full_checkpoint.pth"))
    with pytest.raises(ValueError, match="backbone only"):
        rob_ibot.load_teacher(str(OFFICIAL_TINY / "dino_tiny_backbone_only.pth"))
    with pytest.raises(ValueError, match="rob_msn.py"):
        rob_ibot.load_teacher(str(OFFICIAL_TINY / "msn_tiny.pth.tar"))
    with pytest.raises(ValueError, match="rob_swav.py"):
        rob_ibot.load_teacher(str(OFFICIAL_TINY / "swav_tiny_rn_1111.pth.tar"))
    with pytest.raises(FileNotFoundError, match="not found"):
        rob_ibot.load_teacher(str(tmp_path / "missing.pth"))
    other = tmp_path / "dino_run.pth"
    torch.save(dict(method="rob_dino", student={}), other)
    with pytest.raises(ValueError, match="rob_dino.py"):
        rob_ibot.load_teacher(str(other))


def test_convnet_student_and_patch_size_mismatch_are_refused(tmp_path):
    with pytest.raises(ValueError, match="rob_dino.py, rob_msn.py or rob_swav.py"):
        rob_ibot.main(parse(TINY_RUN + ["--student", "resnet18", "--data_path", "synthetic", "--output_dir", tmp_path]))
    with pytest.raises(ValueError, match="--patch_size 16"):
        rob_ibot.main(parse(TINY_RUN + ["--patch_size", "8", "--data_path", "synthetic", "--output_dir", tmp_path]))


# ---------------------------------------------------------------------------------------------- training
def test_teacher_stays_frozen(tmp_path, small_folder, monkeypatch):
    """In-process run: the teacher's tensors are bitwise unchanged after several steps and never get grads;
    both loss terms are logged and sum to the loss."""
    loaded = {}
    real_load = rob_ibot.load_teacher
    monkeypatch.setattr(rob_ibot, "load_teacher", lambda *a: loaded.setdefault("teacher", real_load(*a)))
    run_main(TINY_RUN + ["--data_path", small_folder, "--batch_size_per_gpu", "8", "--epochs", "2", "--output_dir", tmp_path])
    teacher, fresh = loaded["teacher"], real_load(str(IBOT_TINY))
    assert all(p.grad is None and not p.requires_grad for p in teacher.parameters())
    for (name, a), b in zip(teacher.state_dict().items(), fresh.state_dict().values()):
        assert torch.equal(a, b), name
    ckpt = common.load_file(tmp_path / "checkpoint.pth")
    assert ckpt["step"] == 6 and ckpt["method"] == "rob_ibot" and "teacher" not in ckpt
    assert "mask_token" in ckpt["student"] and any(k.startswith("head.last_layer2.") for k in ckpt["student"])
    records = [json.loads(line) for line in (tmp_path / "log.txt").read_text().splitlines()]
    assert len(records) == 2
    for r in records:
        assert r["train_cls"] > 0 and r["train_patch"] > 0
        assert abs(r["train_loss"] - (r["train_cls"] + r["train_patch"])) < 1e-5
    # a RoB student is itself a valid teacher
    student_as_teacher = rob_ibot.load_teacher(str(tmp_path / "checkpoint.pth"))
    assert student_as_teacher.head.last_layer2.weight.shape == (256, 32)


def test_ema_baseline_updates_its_teacher_and_teaches_rob(tmp_path, small_folder):
    """--teacher ema: after one step the teacher is 0.996 * initial + 0.004 * student and both centres moved;
    the checkpoint is a valid --teacher for a RoB run."""
    base = TINY_RUN + EMA_HEAD + ["--teacher", "ema", "--data_path", small_folder, "--batch_size_per_gpu", "24",
                                  "--epochs", "1"]  # one step
    run_main(base + ["--output_dir", tmp_path / "init", "--lr", "0"])  # lr 0: the initial weights
    run_main(base + ["--output_dir", tmp_path / "ema"])
    init = common.load_file(tmp_path / "init" / "checkpoint.pth")["student"]
    ckpt = common.load_file(tmp_path / "ema" / "checkpoint.pth")
    assert set(ckpt["teacher"]) == set(init) - {"mask_token"}
    for name, tensor in ckpt["teacher"].items():
        torch.testing.assert_close(tensor, 0.996 * init[name] + 0.004 * ckpt["student"][name], atol=1e-6, rtol=0)
    assert max((ckpt["student"][k] - init[k]).abs().max().item() for k in ckpt["teacher"]) > 1e-3  # not vacuous
    assert ckpt["center"]["center"].abs().sum() > 0 and ckpt["patch_center"]["center"].abs().sum() > 0
    assert ckpt["patch_center"]["center"].shape == (1, 48)
    teacher = rob_ibot.load_teacher(str(tmp_path / "ema" / "checkpoint.pth"))
    assert teacher.head.last_layer.weight.shape == (64, 16) and teacher.head.last_layer2.weight.shape == (48, 16)
    assert torch.equal(teacher.backbone.cls_token, ckpt["teacher"]["backbone.cls_token"])
    run_main(TINY_RUN + ["--teacher", tmp_path / "ema" / "checkpoint.pth", "--data_path", small_folder,
                         "--batch_size_per_gpu", "8", "--epochs", "1", "--no-shared_head", "--output_dir", tmp_path / "rob"])
    rob = common.load_file(tmp_path / "rob" / "checkpoint.pth")
    # the student's head predicts the teacher's 48 patch outputs through its own bottleneck (the flag's 256)
    assert rob["step"] == 3 and rob["student"]["head.last_layer2.parametrizations.weight.original1"].shape == (48, 256)


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
    return subprocess.Popen([sys.executable, "rob_ibot.py", *map(str, args)], cwd=ROOT, stdout=open(log_path, "w"),
                            stderr=subprocess.STDOUT, env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})


def test_resume_after_sigterm_and_sigkill_is_exact(tmp_path, small_folder, capsys):
    """The plain-iBOT baseline (its state is a superset of RoB's: student, optimiser, EMA teacher, two centres,
    step; masks and crops come from (seed, epoch, index)), interrupted and resumed, ends bitwise equal to an
    uninterrupted run."""
    args = TINY_RUN + EMA_HEAD + ["--teacher", "ema", "--data_path", small_folder, "--batch_size_per_gpu", "4",
                                  "--epochs", "8", "--warmup_teacher_temp_epochs", "4"]  # 48 steps
    run_main(args + ["--output_dir", tmp_path / "straight"])
    reference = common.load_file(tmp_path / "straight" / "checkpoint.pth")
    rng = random.Random()

    def assert_same_as_reference(out):
        ckpt = common.load_file(out / "checkpoint.pth")
        for key in ("student", "teacher", "center", "patch_center"):
            for name, tensor in ckpt[key].items():
                assert torch.equal(tensor, reference[key][name]), (key, name)

    # SIGTERM mid-epoch: a checkpoint is written at the end of the current step, the rerun resumes there
    out = tmp_path / "sigterm"
    proc = launch(args + ["--output_dir", out], tmp_path / "sigterm.log")
    wait_for_step(tmp_path / "sigterm.log", proc, min_step=rng.randint(1, 4))
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=120)
    stopped = re.search(r"stopped by signal at step (\d+)", (tmp_path / "sigterm.log").read_text())
    assert stopped and 0 < int(stopped.group(1)) < 48, (tmp_path / "sigterm.log").read_text()[-2000:]
    assert common.load_file(out / "checkpoint.pth")["step"] == int(stopped.group(1))
    capsys.readouterr()
    run_main(args + ["--output_dir", out])
    assert f"resumed from {out / 'checkpoint.pth'} at step {stopped.group(1)}" in capsys.readouterr().out
    assert_same_as_reference(out)

    # SIGKILL at a random moment (rob_dino.py's test kills a resumed run too): the run resumes from the last
    # complete checkpoint, loses nothing else
    out = tmp_path / "sigkill"
    proc = launch(args + ["--output_dir", out], tmp_path / "sigkill.log")
    wait_for_step(tmp_path / "sigkill.log", proc, min_step=1)
    time.sleep(rng.uniform(0, 0.8))
    proc.kill()
    assert proc.wait() == -signal.SIGKILL  # killed mid-run, not finished
    if (out / "checkpoint.pth").exists():
        assert common.load_file(out / "checkpoint.pth")["step"] < 48
    run_main(args + ["--output_dir", out])
    assert_same_as_reference(out)
    logged = {json.loads(line)["epoch"] for line in (out / "log.txt").read_text().splitlines()}
    assert logged == set(range(8))  # every epoch logged (one killed between log and checkpoint is logged twice)


@pytest.mark.slow
def test_fashion_mnist_run_raises_knn(tmp_path):
    """Real data, the shipped teacher: a short RoB-iBOT run lifts a small ViT's k-NN far above its random init."""
    before, after = rob_knn_gain("rob_ibot.py", ASSETS / "fmnist_ibot_vit_nano.pth", tmp_path / "run", ["--gpu_augment"])
    assert after > before + KNN_MARGIN, (before, after)
