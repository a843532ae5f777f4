"""reproduce/supervised.py, the supervised arm of the comparison: a teacher and a distilled student train on a tiny
run, the student resumes exactly, and eval_linear.py reads both."""
import importlib.util
import math

import pytest
import torch

import common
import eval_linear
from conftest import ROOT

SCRIPT = ROOT / "reproduce" / "supervised.py"
spec = importlib.util.spec_from_file_location("supervised", SCRIPT)
supervised = importlib.util.module_from_spec(spec)
spec.loader.exec_module(supervised)


def test_kd_loss_equals_a_hand_computation():
    gen = torch.Generator().manual_seed(0)
    n_crops, batch, classes = 6, 5, 10
    logits = torch.randn(n_crops * batch, classes, generator=gen, dtype=torch.float64)
    teacher = torch.randn(2 * batch, classes, generator=gen, dtype=torch.float64)
    labels = torch.randint(0, classes, (batch,), generator=gen)
    total = 0.0
    for c in range(n_crops):  # crop-major: crop c of image b is row c * batch + b
        for b in range(batch):
            row = logits[c * batch + b].tolist()
            log_z = math.log(sum(math.exp(v) for v in row))
            probs = [[math.exp(v) / sum(math.exp(w) for w in teacher[g * batch + b].tolist())
                      for v in teacher[g * batch + b].tolist()] for g in range(2)]
            mean = [(p + q) / 2 for p, q in zip(*probs)]
            teacher_label = mean.index(max(mean))
            total += 0.5 * (log_z - row[int(labels[b])]) + 0.5 * (log_z - row[teacher_label])
    assert math.isclose(float(supervised.loss_fn(logits, labels, teacher)), total / (n_crops * batch), rel_tol=1e-12)
    smooth = sum(0.9 * (math.log(sum(math.exp(v) for v in logits[i].tolist())) - logits[i, int(labels[i % batch])])
                 + 0.1 * sum(math.log(sum(math.exp(v) for v in logits[i].tolist())) - v
                             for v in logits[i].tolist()) / classes for i in range(n_crops * batch))
    assert math.isclose(float(supervised.loss_fn(logits, labels)), smooth / (n_crops * batch), rel_tol=1e-12)


def test_labels_follow_the_subset_the_loader_draws_from():
    dataset = torch.utils.data.Subset(common.FashionMNIST(True, raw=True), [5, 0, 59999, 17])
    targets = common.FashionMNIST(True).targets
    assert supervised.labels_of(dataset).tolist() == [int(targets[i]) for i in (5, 0, 59999, 17)]
TINY = ["--subset", "256", "--batch_size", "64", "--num_workers", "0"]


def run_supervised(args):
    """supervised.py's main() in this process (a process start costs 5-7 s), one thread, the global RNG kept."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.random.fork_rng(devices=[]):
            supervised.main([str(a) for a in args])
    finally:
        torch.set_num_threads(threads)


def test_teacher_and_kd_student_train_resume_exactly_and_evaluate(tmp_path):
    run_supervised(["teacher", *TINY, "--epochs", "2", "--output_dir", tmp_path / "t", "--export", tmp_path / "teacher.pth"])
    student = ["student", *TINY, "--teacher", tmp_path / "teacher.pth"]
    run_supervised([*student, "--epochs", "2", "--output_dir", tmp_path / "whole"])
    (tmp_path / "resumed").mkdir()  # as if stopped after the first epoch: its checkpoint only
    (tmp_path / "resumed" / "checkpoint.pth").write_bytes((tmp_path / "whole" / "checkpoint0001.pth").read_bytes())
    run_supervised([*student, "--epochs", "2", "--output_dir", tmp_path / "resumed"])
    with pytest.raises(SystemExit, match="holds a run with other --epochs"):
        run_supervised([*student, "--epochs", "3", "--output_dir", tmp_path / "resumed"])
    whole, resumed = (torch.load(tmp_path / d / "checkpoint.pth", weights_only=False) for d in ("whole", "resumed"))
    assert whole["epoch"] == resumed["epoch"] == 1
    assert all(torch.equal(whole["student"][k], resumed["student"][k]) for k in whole["student"])
    losses = [eval(line)["train_loss"] for line in (tmp_path / "whole" / "log.txt").read_text().splitlines()]
    assert len(losses) == 2 and all(0 < x < 2 * 2.31 for x in losses)  # ~ln 10 per term at the start
    for path, key in ((tmp_path / "whole" / "checkpoint.pth", "student"), (tmp_path / "t" / "checkpoint.pth", None)):
        model, description = eval_linear.load_backbone(path, checkpoint_key=key, img_size=28)
        assert description.startswith("supervised student") and model(torch.zeros(2, 3, 28, 28)).shape[-1] in (64, 128)
