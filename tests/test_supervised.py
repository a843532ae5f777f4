"""reproduce/supervised.py, the supervised arm of the comparison: a teacher and a distilled student train on a tiny
run, the student resumes exactly, and eval_linear.py reads both."""
import torch

import eval_linear
from conftest import ROOT, run_script

SCRIPT = ROOT / "reproduce" / "supervised.py"
TINY = ["--subset", "256", "--batch_size", "64", "--num_workers", "0"]


def test_teacher_and_kd_student_train_resume_exactly_and_evaluate(tmp_path):
    run_script([SCRIPT, "teacher", *TINY, "--epochs", "1", "--output_dir", tmp_path / "t", "--export",
                tmp_path / "teacher.pth"])
    student = [SCRIPT, "student", *TINY, "--teacher", tmp_path / "teacher.pth"]
    run_script([*student, "--epochs", "2", "--output_dir", tmp_path / "whole"])
    (tmp_path / "resumed").mkdir()  # as if stopped after the first epoch: its checkpoint only
    (tmp_path / "resumed" / "checkpoint.pth").write_bytes((tmp_path / "whole" / "checkpoint0001.pth").read_bytes())
    run_script([*student, "--epochs", "2", "--output_dir", tmp_path / "resumed"])
    changed = run_script([*student, "--epochs", "3", "--output_dir", tmp_path / "resumed"], check=False)
    assert changed.returncode != 0 and "--epochs" in changed.stderr.strip().splitlines()[-1]
    whole, resumed = (torch.load(tmp_path / d / "checkpoint.pth", weights_only=False) for d in ("whole", "resumed"))
    assert whole["epoch"] == resumed["epoch"] == 1
    assert all(torch.equal(whole["student"][k], resumed["student"][k]) for k in whole["student"])
    losses = [eval(line)["train_loss"] for line in (tmp_path / "whole" / "log.txt").read_text().splitlines()]
    assert len(losses) == 2 and all(0 < x < 2 * 2.31 for x in losses)  # ~ln 10 per term at the start
    for path, key in ((tmp_path / "whole" / "checkpoint.pth", "student"), (tmp_path / "t" / "checkpoint.pth", None)):
        model, description = eval_linear.load_backbone(path, checkpoint_key=key, img_size=28)
        assert description.startswith("supervised student") and model(torch.zeros(2, 3, 28, 28)).shape[-1] in (64, 128)
