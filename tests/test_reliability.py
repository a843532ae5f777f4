"""What a run guarantees under faults, misuse and several processes, for the four scripts: the same networks in
every process, checkpoints and exports consistent whatever moment a kill hits, nothing non-finite written, resume
only with the same run-defining flags, exit codes a scheduler can read, one-line user errors, a locked output
directory, checked arguments, unreadable images counted once."""
import argparse
import errno
import importlib
import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest
import torch
import torch.distributed as dist

import common
import rob_dino
from conftest import ASSETS, OFFICIAL_TINY, ROOT, run_in_process, run_script, without_key_bias

SMALL = ["--global_crops_size", "32", "--local_crops_size", "16", "--local_crops_number", "2", "--num_workers", "0",
         "--drop_path_rate", "0", "--warmup_epochs", "0", "--saveckp_freq", "1", "--lr", "0.05", "--batch_size_per_gpu", "8"]
VIT = ["--student", "test_vit", "--patch_size", "8"]
CONFIGS = {  # script, mode -> flags of a tiny run (teachers: the official tiny fixtures, or a plain run's checkpoint)
    ("rob_dino", "rob"): VIT + ["--teacher", OFFICIAL_TINY / "dino_tiny_full_checkpoint.pth", "--hidden_dim", "64",
                                "--bottleneck_dim", "16"],
    ("rob_dino", "plain"): VIT + ["--teacher", "ema", "--out_dim", "64", "--hidden_dim", "64", "--bottleneck_dim", "16"],
    ("rob_ibot", "rob"): ["--student", "test_vit", "--teacher", OFFICIAL_TINY / "ibot_tiny_checkpoint.pth",
                          "--hidden_dim", "64", "--bottleneck_dim", "16", "--global_crops_size", "64"],
    ("rob_ibot", "plain"): VIT + ["--teacher", "ema", "--out_dim", "64", "--patch_out_dim", "64", "--hidden_dim", "64",
                                  "--bottleneck_dim", "16"],
    ("rob_msn", "rob"): VIT + ["--teacher", "MSN_TEACHER", "--hidden_dim", "64", "--patch_drop", "0"],
    ("rob_msn", "plain"): VIT + ["--teacher", "ema", "--out_dim", "32", "--hidden_dim", "64", "--bottleneck_dim", "16",
                                 "--patch_drop", "0"],
    ("rob_swav", "rob"): VIT + ["--teacher", OFFICIAL_TINY / "swav_tiny_rn_1111.pth.tar", "--hidden_mlp", "64",
                                "--optimizer", "adamw", "--lr", "1e-3"],
    ("rob_swav", "plain"): VIT + ["--teacher", "self", "--nmb_prototypes", "30", "--feat_dim", "16", "--hidden_mlp",
                                  "64", "--optimizer", "adamw", "--lr", "1e-3"],
}


def flags(script, mode, data, out, extra=(), msn_teacher=None):
    args = SMALL + CONFIGS[script, mode] + ["--data_path", data, "--output_dir", out, *extra]
    return [msn_teacher if a == "MSN_TEACHER" else a for a in args]


def in_process(script, args):
    """main() of a script in this process (one thread), its signal handlers restored; returns its exit code."""
    module = importlib.import_module(script)
    handlers = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        parser = argparse.ArgumentParser(parents=[module.get_args_parser()])
        return module.main(parser.parse_args([str(a) for a in args]))
    finally:
        torch.set_num_threads(threads)
        for sig, handler in handlers.items():
            signal.signal(sig, handler)


def weights(out, key="student"):
    return common.load_file(out / "checkpoint.pth")[key]


@pytest.fixture(scope="module")
def msn_teacher(tmp_path_factory, small_folder):
    """A RoB-MSN teacher of this script's own format (the official tiny fixture's width needs --num_heads)."""
    out = tmp_path_factory.mktemp("msn_teacher")
    assert in_process("rob_msn", flags("rob_msn", "plain", small_folder, out, ["--epochs", "1"])) == 0
    return out / "checkpoint.pth"


# ------------------------------------------------------------------------------------- several processes
TWO_PROCESS_SCRIPT = """
import argparse, importlib, json, os, sys, torch
sys.path.insert(0, {root!r})
import common
configs = json.loads(os.environ["CONFIGS"])
device = common.init_distributed()
rank = torch.distributed.get_rank()
for name, (script, args) in configs.items():
    module = importlib.import_module(script)
    parsed = argparse.ArgumentParser(parents=[module.get_args_parser()]).parse_args(args)
    module.check_args(parsed)
    # set-up as main() does it, then two steps on data of this process only: every network must stay equal
    torch.manual_seed(1000 + rank)  # whatever each process draws, rank 0's weights must be in every process
    teacher = None if parsed.teacher in ("ema", "self") else module.load_teacher(parsed.teacher)
    student, arch = module.build_student(parsed, teacher)
    data = common.training_data("synthetic", module.build_augmentation(parsed), 4, 0, subset=16)  # 2 steps per epoch
    run = module.build_run(parsed, device, data, student, arch, teacher)
    states = [dict(run.student.state_dict())]
    if getattr(run, "plain", None) is not None:
        states.append(dict(run.plain.teacher.state_dict()))
    torch.manual_seed(rank)
    crops = [torch.randn(4, 3, parsed.global_crops_size, parsed.global_crops_size) for _ in range(2)]
    crops += [torch.randn(4, 3, parsed.local_crops_size, parsed.local_crops_size) for _ in range(2)]
    grid = parsed.global_crops_size // run.student.backbone.patch_embed.patch_size[0]
    batch = (crops, torch.rand(4, 2, grid, grid) < 0.3) if script == "rob_ibot" else crops
    for it in range(2):
        module.train_step(run, batch, None, it)
    states.append(dict(run.student.state_dict()))
    if getattr(run, "plain", None) is not None:
        states.append(dict(run.plain.teacher.state_dict()))
    torch.save(states, os.path.join({out!r}, f"{{name}}_rank{{rank}}.pt"))
    module.main(parsed)  # and a whole run, compared with one process on the global batch by the test
torch.distributed.destroy_process_group()
"""


# MSN's projection: biases that shift every sample alike right before a BatchNorm, which removes the shift, have a
# zero gradient whose rounding noise Adam turns into steps (as the attention key bias, see without_key_bias); the
# running means of those BatchNorms carry that noise
BEFORE_BATCHNORM = {"backbone.norm.bias", "head.fc1.bias", "head.fc2.bias", "head.bn1.running_mean",
                    "head.bn2.running_mean"}


def test_every_process_holds_the_same_networks_and_two_processes_equal_one(tmp_path, small_folder, msn_teacher):
    """For every script, RoB and plain: after the set-up and after steps on different data, both processes hold
    bitwise the same student and (plain DINO / iBOT / MSN) EMA teacher; and a run on 2 processes x 4 images equals
    a run on 1 process x 8 images: same loss, same student and EMA teacher (1e-5)."""
    # lr 5e-3: Adam turns the rounding noise of a gradient near zero into a step of up to lr * noise / eps (a small
    # lr keeps it below the tolerance); the 3 steps still move the weights by 10x the tolerance at least
    two = ["--epochs", "1", "--batch_size_per_gpu", "4", "--lr", "5e-3"]
    configs = {f"{script}_{mode}": (script, [str(a) for a in flags(script, mode, small_folder,
                                                                     tmp_path / f"{script}_{mode}_two", two, msn_teacher)])
               for script, mode in CONFIGS}
    script = tmp_path / "two.py"
    script.write_text(TWO_PROCESS_SCRIPT.format(root=str(ROOT), out=str(tmp_path)))
    run_script([script], nproc=2, timeout=900, env={"CONFIGS": json.dumps(configs)})
    for (name, (module, args)), (script_name, mode) in zip(configs.items(), CONFIGS):
        ranks = [torch.load(tmp_path / f"{name}_rank{r}.pt") for r in range(2)]
        assert len(ranks[0]) == (4 if mode == "plain" and module != "rob_swav" else 2)
        for state0, state1 in zip(*ranks):
            for key in state0:
                assert torch.equal(state0[key], state1[key]), (name, key)
        one = tmp_path / f"{name}_one"
        in_process(module, flags(script_name, mode, small_folder, one, ["--epochs", "1", "--batch_size_per_gpu", "8",
                                                                         "--lr", "5e-3"], msn_teacher))
        two = tmp_path / f"{name}_two"
        logs = [json.loads((d / "log.txt").read_text()) for d in (one, two)]
        assert logs[0]["step"] == logs[1]["step"] == 3, name
        assert abs(logs[0]["train_loss"] - logs[1]["train_loss"]) < 1e-5, name
        keys = ["student"] + (["teacher"] if mode == "plain" and module != "rob_swav" else [])
        initial = {k: v for k, v in ranks[0][0].items()}
        assert max((weights(one)[k] - initial[k]).abs().max().item() for k in initial) > 1e-4, name  # not vacuous
        for key in keys:
            a, b = weights(one, key), weights(two, key)
            for k in a:
                if name == "rob_msn_plain" and k in BEFORE_BATCHNORM:
                    continue
                torch.testing.assert_close(*without_key_bias(k, a[k], b[k]), atol=1e-5, rtol=0,
                                           msg=lambda m: f"{name} {key} {k}: {m}")


def test_run_main_shuts_the_process_group_down(tmp_path, monkeypatch):
    """A process group left open at exit can abort the interpreter ("terminate called without an active
    exception"): the entry point destroys it, on success and on error."""
    monkeypatch.setattr(sys, "argv", ["script.py"])
    for raises in (False, True):
        dist.init_process_group("gloo", init_method=f"file://{tmp_path}/store{int(raises)}", rank=0, world_size=1)

        def main(args):
            if raises:
                raise common.UserError("bad flag")
            return 0
        with pytest.raises(SystemExit) as exit_:
            monkeypatch.setattr(rob_dino, "main", main)
            rob_dino.run_main()
        assert exit_.value.code == (2 if raises else 0) and not dist.is_initialized()


def test_every_multi_process_script_of_the_tests_shuts_its_group_down():
    """The scripts the tests launch under torchrun destroy their process group before exiting (the scripts
    themselves do it in run_main): a group left open made `make test` fail at random under load."""
    import re
    from pathlib import Path
    scripts = [(path.name, text) for path in Path(__file__).parent.glob("test_*.py")
               for text in re.findall(r'"""(.*?)"""', path.read_text(), re.S)
               if "init_process_group(" in text or "init_distributed()" in text]
    assert len(scripts) >= 3 and all("destroy_process_group()" in text for _, text in scripts), \
        [name for name, text in scripts if "destroy_process_group()" not in text]


# -------------------------------------------------------------------------------------- kills and exports
@pytest.mark.parametrize("killed_at", ["student_timm.pth", "checkpoint0002.pth", "checkpoint.pth", "log"])
def test_a_kill_between_the_final_writes_leaves_a_run_that_completes(tmp_path, small_folder, monkeypatch, killed_at):
    """The last epoch writes the export, its line of log.txt, its checkpointNNNN, then checkpoint.pth. A kill before
    any of them (simulated: the write raises) leaves a run that the same command completes: every file present and
    consistent with checkpoint.pth, every epoch logged once, no temporary file left."""
    args = flags("rob_dino", "rob", small_folder, tmp_path, ["--epochs", "2", "--batch_size_per_gpu", "8"])
    real_save = common.save_atomic

    class Killed(BaseException):
        pass

    def save(obj, path):  # the last epoch's write of each file: export and checkpoint.pth are written twice
        writes[path.name] = writes.get(path.name, 0) + 1
        if path.name == killed_at and writes[path.name] == {"checkpoint0002.pth": 1}.get(path.name, 2):
            raise Killed
        real_save(obj, path)

    def log_open(path, mode="r", *args, **kwargs):  # the last epoch's line of log.txt (the first one's is there)
        if killed_at == "log" and str(path).endswith("log.txt") and "a" in mode and (tmp_path / "log.txt").exists():
            raise Killed
        return open(path, mode, *args, **kwargs)
    writes = {}
    monkeypatch.setattr(common, "save_atomic", save)
    monkeypatch.setattr(rob_dino, "open", log_open, raising=False)  # the script's open(), before the builtin
    with pytest.raises(Killed):
        in_process("rob_dino", args)
    monkeypatch.undo()
    assert in_process("rob_dino", args) == 0
    ckpt = common.load_file(tmp_path / "checkpoint.pth")
    assert ckpt["step"] == 6 and common.load_file(tmp_path / "checkpoint0002.pth")["step"] == 6
    exported = common.load_file(tmp_path / "student_timm.pth")
    assert all(torch.equal(exported[k[len("backbone."):]], v) for k, v in ckpt["student"].items()
               if k.startswith("backbone."))
    assert [json.loads(line)["epoch"] for line in (tmp_path / "log.txt").read_text().splitlines()] == [0, 1]
    assert not list(tmp_path.glob("*.tmp")) and not list(tmp_path.glob(".*.tmp"))


def test_a_finished_run_restores_a_missing_export(tmp_path, small_folder):
    args = flags("rob_dino", "rob", small_folder, tmp_path, ["--epochs", "1", "--batch_size_per_gpu", "8"])
    assert in_process("rob_dino", args) == 0
    (tmp_path / "student_timm.pth").unlink()
    (tmp_path / ".checkpoint.pth.12345.tmp").write_bytes(b"")  # a killed writer's leftover
    result = run_in_process(["rob_dino.py", *args])
    assert "done; student backbone for timm" in result.stdout and (tmp_path / "student_timm.pth").is_file()
    assert not list(tmp_path.glob(".*.tmp"))


def test_a_diverging_step_is_never_saved(tmp_path, small_folder):
    """--lr 1e30, one step per epoch: the first step's loss is finite, its weights are not usable; nothing is
    written, the run stops with exit code 3 and one line."""
    args = flags("rob_dino", "rob", small_folder, tmp_path / "run", ["--epochs", "2", "--batch_size_per_gpu", "24",
                                                                      "--lr", "1e30"])
    result = run_in_process(["rob_dino.py", *args], check=False)
    assert result.returncode == 3 and "non-finite" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "run" / "checkpoint.pth").exists()


# ------------------------------------------------------------------------------------------------ resume
def test_resume_refuses_other_run_defining_flags_and_allows_more_epochs(tmp_path, small_folder, monkeypatch, capsys):
    base = flags("rob_dino", "rob", small_folder, tmp_path, ["--batch_size_per_gpu", "8"])
    assert in_process("rob_dino", base + ["--epochs", "1"]) == 0
    other_teacher = tmp_path.parent / "same_shape_teacher.pth"
    other_teacher.write_bytes((OFFICIAL_TINY / "dino_tiny_full_checkpoint.pth").read_bytes())
    for change, expected in [(["--batch_size_per_gpu", "4"], "--batch_size_per_gpu 8 -> 4"),
                             (["--teacher", other_teacher], "--teacher"),
                             (["--hidden_dim", "32"], "--hidden_dim 64 -> 32")]:
        monkeypatch.setattr(sys, "argv", [str(a) for a in ["rob_dino.py", *base, "--epochs", "2", *change]])
        with pytest.raises(SystemExit) as exited:  # the entry point, in this process
            rob_dino.run_main()
        stderr = capsys.readouterr().err
        assert exited.value.code == 2 and expected in stderr and "Traceback" not in stderr, stderr
    assert common.load_file(tmp_path / "checkpoint.pth")["step"] == 3  # untouched
    result = run_in_process(["rob_dino.py", *base, "--epochs", "2"])  # a longer run: allowed, the schedule recomputed
    assert "--epochs 1 -> 2" in result.stdout and common.load_file(tmp_path / "checkpoint.pth")["step"] == 6


# --------------------------------------------------------------------------------------- exit codes, errors
def test_a_stopped_run_exits_with_128_plus_the_signal(tmp_path, small_folder):
    args = flags("rob_dino", "rob", small_folder, tmp_path, ["--epochs", "50", "--batch_size_per_gpu", "8"])
    proc = subprocess.Popen([sys.executable, "rob_dino.py", *map(str, args)], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    deadline = time.time() + 120
    while not (tmp_path / "log.txt").exists() and time.time() < deadline:  # at least one epoch done
        time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)
    output = proc.communicate(timeout=120)[0]
    assert proc.returncode == 128 + signal.SIGTERM and "stopped by signal" in output


USER_ERRORS = [
    ("rob_dino.py", ["--lr", "-1"], "--lr -1.0: must be >= 0"),
    ("rob_dino.py", ["--epochs", "0"], "--epochs 0: must be > 0"),
    ("rob_ibot.py", ["--local_crops_number", "-2"], "--local_crops_number -2: must be >= 0"),
    ("rob_msn.py", ["--global_crops_scale", "1", "0.3"], "--global_crops_scale 1.0 0.3"),
    ("rob_dino.py", ["--teacher_temp", "0"], "--teacher_temp 0.0: must be > 0"),
    ("rob_dino.py", ["--data_path", "synthetic", "--teacher", "dino_vitx99"],
     "unknown --teacher 'dino_vitx99': give one of dino_vits16"),
    ("rob_swav.py", ["--data_path", "synthetic", "--student", "resnet_9000", "--teacher",
                     OFFICIAL_TINY / "swav_tiny_rn_1111.pth.tar"], "unknown student 'resnet_9000'"),
    ("rob_msn.py", ["--data_path", "synthetic", "--teacher", "missing/teacher.pth"], "not found: missing/teacher.pth"),
    ("rob_dino.py", ["--data_path", "missing_folder"], "--data_path missing_folder is neither a folder nor a file"),
    ("rob_ibot.py", [], "--data_path is required"),
    ("rob_swav.py", ["--data_path", "synthetic", "--teacher", "ema"], "or self (the plain SwAV baseline)"),
    ("eval_linear.py", ["--checkpoint", ASSETS / "fmnist_dino_vit_nano.pth", "--knn", "--nb_knn", "0"],
     "--nb_knn 0: must be > 0"),
]


@pytest.mark.parametrize("script,extra,message", USER_ERRORS)
def test_user_errors_are_one_line_exit_2_and_leave_no_folder(tmp_path, script, extra, message, monkeypatch, capsys):
    """The first rob_dino.py case and eval_linear.py's run as processes of their own (a start costs 5-7 s); the others
    call the same entry point, run_main() (the same text in the four scripts), in this process."""
    out, first = tmp_path / "out", extra == next(e for s, e, _ in USER_ERRORS if s == script)
    argv = [str(a) for a in [script, "--output_dir", out, *extra]]
    if first and script in ("rob_dino.py", "eval_linear.py"):
        result = run_script(argv, check=False)
        code, stderr = result.returncode, result.stderr
    else:
        monkeypatch.setattr(sys, "argv", argv)
        with pytest.raises(SystemExit) as exited:
            importlib.import_module(script[:-3]).run_main()
        code, stderr = exited.value.code, capsys.readouterr().err
    assert code == 2 and message in stderr, stderr
    errors = [line for line in stderr.splitlines() if "error:" in line]  # (warnings may precede it)
    assert len(errors) == 1 and errors[0] == stderr.strip().splitlines()[-1] and "Traceback" not in stderr
    assert not out.exists()
    if first and script == "eval_linear.py":  # the opt-in shows where it came from
        assert "Traceback" in run_script(argv, check=False, env={"ROB_DEBUG": "1"}).stderr
    elif first:
        monkeypatch.setattr(sys, "argv", argv)
        monkeypatch.setenv("ROB_DEBUG", "1")
        with pytest.raises(common.UserError, match=re.escape(message)):
            importlib.import_module(script[:-3]).run_main()


def test_unwritable_output_dirs_fail_before_any_work(tmp_path, small_folder):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    start = time.time()
    args = flags("rob_dino", "rob", small_folder, blocker / "run", ["--epochs", "1"])
    result = run_in_process(["rob_dino.py", *args], check=False)
    assert result.returncode == 2 and "cannot create or write --output_dir" in result.stderr
    result = run_script(["eval_linear.py", "--checkpoint", ASSETS / "fmnist_dino_vit_nano.pth", "--knn",
                         "--output_dir", blocker / "eval"], check=False)
    assert result.returncode == 2 and "cannot write eval_log.txt" in result.stderr
    assert time.time() - start < 60  # no evaluation ran first


def test_a_full_disk_is_named_and_leaves_no_temporary_file(tmp_path, monkeypatch):
    real_open = open

    class FullDisk:  # a file whose writes fail as on a full disk
        def __init__(self, handle):
            self.handle = handle

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.handle.close()

        def write(self, data):
            raise OSError(errno.ENOSPC, "No space left on device")

    def full_open(path, mode="r", *args, **kwargs):
        handle = real_open(path, mode, *args, **kwargs)
        return FullDisk(handle) if "w" in mode and str(path).endswith(".tmp") else handle
    monkeypatch.setattr("builtins.open", full_open)
    with pytest.raises(common.UserError, match="no space left on the device while writing .*checkpoint.pth"):
        common.save_atomic({"w": torch.ones(3)}, tmp_path / "checkpoint.pth")
    monkeypatch.undo()
    assert list(tmp_path.iterdir()) == []


def test_a_second_run_on_the_same_output_dir_is_refused(tmp_path, small_folder):
    args = flags("rob_dino", "rob", small_folder, tmp_path, ["--epochs", "30", "--batch_size_per_gpu", "8"])
    first = subprocess.Popen([sys.executable, "rob_dino.py", *map(str, args)], cwd=ROOT, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL, env={**os.environ, "OMP_NUM_THREADS": "1"})
    deadline = time.time() + 120
    while not (tmp_path / ".lock").exists() and time.time() < deadline:
        time.sleep(0.05)
    second = run_script(["rob_dino.py", *args], check=False)
    first.send_signal(signal.SIGTERM)
    first.wait(timeout=120)
    assert second.returncode == 2 and "is in use by another run" in second.stderr, second.stderr
    steps = [json.loads(line)["step"] for line in (tmp_path / "log.txt").read_text().splitlines()] \
        if (tmp_path / "log.txt").exists() else []
    assert steps == sorted(set(steps))  # one run's lines only


# -------------------------------------------------------------------------------------- counts and keys
def test_unreadable_images_are_counted_once_across_epochs_resume_and_gpu_decoding(tmp_path, small_folder):
    from PIL import Image
    data = tmp_path / "data"
    for cls in ("a", "b"):
        (data / cls).mkdir(parents=True)
        for i, src in enumerate(sorted((small_folder / "class0").iterdir())[:6]):
            Image.open(src).convert("RGB").save(data / cls / f"{i}.jpg", quality=90)
    (data / "a" / "bad.png").write_text("not an image")  # fails in the loader worker
    good = (data / "b" / "0.jpg").read_bytes()
    (data / "b" / "bad.jpg").write_bytes(good[:2] + b"\x00" * 300 + good[-2:])  # passes the markers, fails to decode
    args = flags("rob_dino", "rob", data, tmp_path / "run", ["--batch_size_per_gpu", "7", "--gpu_augment"])
    assert in_process("rob_dino", args + ["--epochs", "2"]) == 0
    assert in_process("rob_dino", args + ["--epochs", "3"]) == 0  # resumed
    counts = [json.loads(line)["skipped_images"] for line in (tmp_path / "run" / "log.txt").read_text().splitlines()]
    assert counts == [2, 2, 2]


def test_eval_defaults_to_the_network_a_checkpoint_holds(tmp_path):
    for name in ("dino", "ibot", "msn"):  # shipped teachers hold a teacher network only
        model, description = __import__("eval_linear").load_backbone(str(ASSETS / f"fmnist_{name}_vit_nano.pth"))
        assert "teacher" in description
    ckpt = common.load_file(ASSETS / "fmnist_dino_vit_nano.pth")
    del ckpt["arch"]
    torch.save(ckpt, tmp_path / "no_arch.pth")
    result = run_script(["eval_linear.py", "--checkpoint", tmp_path / "no_arch.pth", "--knn", "--output_dir",
                         tmp_path], check=False)
    assert result.returncode == 2 and "without its 'arch' record" in result.stderr


# ------------------------------------------------------------------------------------ second reliability pass
def test_a_lost_checkpoint_resumes_from_the_newest_numbered_one_and_keeps_the_history(tmp_path, small_folder, capsys):
    args = flags("rob_dino", "rob", small_folder, tmp_path, ["--epochs", "3", "--saveckp_freq", "2"])  # 3 steps/epoch
    assert in_process("rob_dino", args) == 0
    final, history = weights(tmp_path), (tmp_path / "log.txt").read_text()
    numbered = (tmp_path / "checkpoint0002.pth").read_bytes()
    (tmp_path / "checkpoint.pth").unlink()
    capsys.readouterr()
    assert in_process("rob_dino", args) == 0  # epoch 2 again, from checkpoint0002.pth: the same weights
    assert "checkpoint.pth is missing: resuming from checkpoint0002.pth" in capsys.readouterr().out
    assert all(torch.equal(tensor, final[name]) for name, tensor in weights(tmp_path).items())
    lines = (tmp_path / "log.txt").read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in lines] == [0, 1, 2] and lines[:2] == history.splitlines()[:2]
    assert (tmp_path / "checkpoint0002.pth").read_bytes() == numbered
    for checkpoint in tmp_path.glob("checkpoint*.pth"):  # a run's history without any checkpoint: refused
        checkpoint.unlink()
    with pytest.raises(common.UserError, match="holds a run's log.txt but no checkpoint.pth to resume it from"):
        in_process("rob_dino", args)
    assert (tmp_path / "log.txt").read_text().splitlines() == lines and not (tmp_path / "checkpoint.pth").exists()


def test_a_run_killed_between_its_first_log_line_and_first_checkpoint_starts_again(tmp_path, small_folder):
    """The first epoch's log line is written just before its checkpoint: a kill between them leaves log.txt alone."""
    args = flags("rob_dino", "rob", small_folder, tmp_path, ["--epochs", "1", "--saveckp_freq", "0"])
    assert in_process("rob_dino", args) == 0
    final, line = weights(tmp_path), (tmp_path / "log.txt").read_text()
    (tmp_path / "checkpoint.pth").unlink()  # as if killed right after writing the first epoch's log line
    assert in_process("rob_dino", args) == 0
    assert all(torch.equal(tensor, final[name]) for name, tensor in weights(tmp_path).items())
    assert [json.loads(x)["epoch"] for x in (tmp_path / "log.txt").read_text().splitlines()] == [0]
    assert len(line.splitlines()) == 1


def test_a_full_disk_at_start_up_is_one_line_and_leaves_nothing(tmp_path, monkeypatch, capsys):
    import eval_linear

    def no_space(fd):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(os, "fsync", no_space)
    (tmp_path / "existing").mkdir()
    for out in (tmp_path / "new", tmp_path / "existing"):
        with pytest.raises(common.UserError, match=r"cannot create or write --output_dir .*\(No space left on device"):
            with rob_dino.locked_output_dir(out):
                pass
    assert not (tmp_path / "new").exists() and list((tmp_path / "existing").iterdir()) == []
    parser = argparse.ArgumentParser(parents=[eval_linear.get_args_parser()])
    eval_args = ["--checkpoint", ASSETS / "fmnist_dino_vit_nano.pth", "--data_path", "synthetic", "--img_size", "28",
                 "--knn", "--nb_knn", "5", "--num_workers", "0", "--output_dir", tmp_path / "eval"]
    with pytest.raises(common.UserError, match=r"cannot write eval_log.txt .*\(No space left on device\)"):
        eval_linear.check_args(parser.parse_args(map(str, eval_args)))
    monkeypatch.undo()
    real_open = open  # the disk fills during the evaluation: its results are printed before the log is written

    def full(path, mode="r", *args, **kwargs):
        if str(path).endswith("eval_log.txt"):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_open(path, mode, *args, **kwargs)
    monkeypatch.setattr(eval_linear, "open", full, raising=False)
    capsys.readouterr()
    with pytest.raises(common.UserError, match="No space left on device.*the results are the JSON line above"):
        eval_linear.main(parser.parse_args(map(str, eval_args)))
    assert "knn" in json.loads(capsys.readouterr().out.strip().splitlines()[-1])


@pytest.mark.parametrize("script", ["rob_dino", "rob_ibot", "rob_msn", "rob_swav", "eval_linear"])
def test_every_numeric_flag_is_checked(script):
    """Each int/float flag (but --seed) given -1, or a fraction 2: one UserError naming it, from check_args."""
    module = importlib.import_module(script)
    parser = argparse.ArgumentParser(parents=[module.get_args_parser()])
    base = ["--knn", "--output_dir", ROOT / "tests", "--checkpoint", "x"] if script == "eval_linear" else \
        ["--data_path", "synthetic"]
    numeric = [a for a in parser._actions if a.type in (int, float) and a.option_strings and not a.choices]
    assert len(numeric) >= 12
    for action in numeric:
        if action.dest == "seed":
            continue
        count = action.nargs if isinstance(action.nargs, int) else 1
        with pytest.raises(common.UserError, match=f"^--{action.dest}|--{action.dest} "):
            module.check_args(parser.parse_args([*map(str, base), action.option_strings[0], *["-1"] * count]))


def test_an_unreadable_data_set_is_one_line(tmp_path):
    for i in range(60):
        (tmp_path / "data" / "x").mkdir(parents=True, exist_ok=True)
        (tmp_path / "data" / "x" / f"{i}.jpg").write_text("not an image")
    args = flags("rob_dino", "plain", tmp_path / "data", tmp_path / "run", ["--epochs", "1", "--num_workers", "1"])
    result = run_script(["rob_dino.py", *args], check=False)
    assert result.returncode == 2 and "Traceback" not in result.stderr and "skipping" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1 and "none of 50 images in a row" in errors[0] and ".jpg (UnidentifiedImageError)" in errors[0]
    assert not (tmp_path / "run").exists()


def test_ctrl_c_during_start_up_exits_130_quietly(tmp_path, small_folder, monkeypatch, capsys):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt
    monkeypatch.setattr(common, "training_data", interrupted)
    monkeypatch.setattr(sys, "argv", ["rob_dino.py", *map(str, flags("rob_dino", "rob", small_folder, tmp_path / "r"))])
    with pytest.raises(SystemExit) as stopped:
        rob_dino.run_main()
    assert stopped.value.code == 130 and "Traceback" not in capsys.readouterr().err and not (tmp_path / "r").exists()


@pytest.mark.parametrize("script", ["rob_dino", "rob_swav"])
def test_main_as_a_library_leaves_signal_handlers_and_rng_as_they_were(tmp_path, small_folder, script):
    module = importlib.import_module(script)
    mine = {sig: (lambda signum, frame: None) for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)}
    before = {sig: signal.signal(sig, handler) for sig, handler in mine.items()}
    try:
        torch.manual_seed(1234)
        rng = torch.get_rng_state()
        args = argparse.ArgumentParser(parents=[module.get_args_parser()]).parse_args(
            map(str, flags(script, "rob", small_folder, tmp_path, ["--epochs", "1"])))
        assert module.main(args) == 0
        assert {sig: signal.getsignal(sig) for sig in mine} == mine
        assert torch.equal(torch.get_rng_state(), rng)
    finally:
        for sig, handler in before.items():
            signal.signal(sig, handler)


def test_eval_user_errors_leave_no_output_dir_and_no_torch_text(tmp_path):
    (tmp_path / "log.txt").write_text('{"epoch": 0, "step": 3}\n{"epo')
    result = run_script(["eval_linear.py", "--checkpoint", tmp_path / "log.txt", "--knn", "--output_dir",
                         tmp_path / "new" / "eval"], check=False)
    assert result.returncode == 2 and "is it a complete PyTorch checkpoint" in result.stderr, result.stderr
    assert "file an issue" not in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "new" / "eval").exists()
