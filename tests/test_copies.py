"""The shape of the project: each rob_*.py runs with common.py alone beside it, the four files share their run
machinery word for word, and importing any file changes nothing in the host program."""
import ast
import json
import shutil
import subprocess
import sys
import textwrap

import pytest
import timm

from conftest import ASSETS, ROOT

SCRIPTS = ["rob_dino.py", "rob_ibot.py", "rob_msn.py", "rob_swav.py"]
MARKER = "# " + "=" * 118 + "\n# Run machinery"


def run_machinery(script):
    text = (ROOT / script).read_text()
    assert text.count(MARKER) == 1, f"{script}: no run-machinery section (or more than one)"
    return text[text.index(MARKER):]


def test_the_four_run_machinery_sections_are_the_same_text():
    sections = {script: run_machinery(script) for script in SCRIPTS}
    assert len(set(sections.values())) == 1, "the run machinery differs between " + ", ".join(
        s for s in SCRIPTS if sections[s] != sections["rob_dino.py"]) + " and rob_dino.py: make them the same text"
    text = sections["rob_dino.py"]
    assert len(text.splitlines()) > 150 and "def train(" in text and "def resume(" in text
    # it knows no method: nothing in it names one, it reaches the method through METHOD and the names main() passes
    assert not any(name in text.lower() for name in ("dino", "ibot", "msn", "swav"))


COPIED = {  # pieces of the method part that several scripts hold as the same text
    "view_pairs": ["rob_ibot", "rob_msn", "rob_swav"], "multi_crop_cross_entropy": ["rob_ibot", "rob_msn", "rob_swav"],
    "Center": ["rob_dino", "rob_ibot"], "clip_gradients_per_tensor": ["rob_dino", "rob_ibot"]}


@pytest.mark.parametrize("name", COPIED)
def test_the_methods_copied_helpers_are_the_same_text(name):
    import importlib
    import inspect
    sources = {script: inspect.getsource(getattr(importlib.import_module(script), name)) for script in COPIED[name]}
    assert len(set(sources.values())) == 1, f"{name} differs between {', '.join(sources)}: make the copies the same"


def test_the_top_level_is_the_cards_and_each_script_imports_only_common():
    modules = {path.name for path in ROOT.glob("*.py")}
    assert modules == {*SCRIPTS, "common.py", "eval_linear.py"}, modules
    for script in [*SCRIPTS, "eval_linear.py", "common.py"]:
        tree = ast.parse((ROOT / script).read_text())
        imported = {alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import)
                    for alias in node.names}
        imported |= {node.module.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
        own = {name for name in imported if (ROOT / f"{name}.py").exists()}
        assert own <= ({"common"} if script != "common.py" else set()), (script, own)
        assert imported <= {"argparse", "contextlib", "copy", "datetime", "errno", "fcntl", "gzip", "hashlib", "io",
                            "itertools", "json", "math", "multiprocessing", "os", "pathlib", "random", "signal",
                            "sys", "tempfile", "time", "types", "warnings", "torch", "torchvision", "timm", "tqdm",
                            "PIL", "common"}, (script, imported)  # the declared dependencies and the standard library


SMALL_RUN = ["--student", "vit_pico", "--data_path", "fashion-mnist", "--subset", "256", "--batch_size_per_gpu", "64",
             "--epochs", "1", "--warmup_epochs", "0", "--global_crops_size", "28", "--local_crops_size", "14",
             "--local_crops_number", "2", "--patch_size", "7", "--num_workers", "0", "--drop_path_rate", "0"]
BRANCHES = {  # RoB from the shipped teacher (by path), and the plain method
    "rob_dino.py": (["--hidden_dim", "64", "--bottleneck_dim", "16"], ["--teacher", "ema", "--out_dim", "128"]),
    "rob_ibot.py": (["--hidden_dim", "64", "--bottleneck_dim", "16"],
                    ["--teacher", "ema", "--out_dim", "128", "--patch_out_dim", "128"]),
    "rob_msn.py": (["--hidden_dim", "64"], ["--teacher", "ema", "--out_dim", "64", "--bottleneck_dim", "16"]),
    "rob_swav.py": (["--hidden_mlp", "64", "--optimizer", "adamw"],
                    ["--teacher", "self", "--hidden_mlp", "64", "--optimizer", "adamw", "--nmb_prototypes", "64",
                     "--feat_dim", "16"]),
}


COPY_DRIVER = textwrap.dedent("""
    import argparse, json, sys
    import rob  # the copy: its folder, on the path, holds it and common.py and nothing else of the project
    for flags in json.loads(sys.argv[1]):
        code = rob.main(argparse.ArgumentParser(parents=[rob.get_args_parser()]).parse_args(flags))
        assert code == 0, (flags, code)
    """)


@pytest.mark.parametrize("script", SCRIPTS)
def test_a_script_copied_with_common_alone_trains_and_exports(tmp_path, script):
    """Copy rob_X.py and common.py into an empty folder and train there, RoB from the shipped teacher (by path) and the
    plain method: each run ends with the exported student, which timm loads with the call the run prints."""
    folder = tmp_path / "copy"
    folder.mkdir()
    shutil.copy(ROOT / script, folder / "rob.py")  # under another name: nothing may depend on the file's name
    shutil.copy(ROOT / "common.py", folder)
    (tmp_path / "driver.py").write_text(COPY_DRIVER)
    rob, plain = BRANCHES[script]
    runs = {"rob": ["--teacher", str(ASSETS / f"fmnist_{script[4:-3]}_vit_nano.pth"), *rob], "plain": plain}
    flags = [SMALL_RUN + branch + ["--output_dir", str(tmp_path / mode)] for mode, branch in runs.items()]
    env = {"PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONDONTWRITEBYTECODE": "1",
           "PYTHONPATH": str(folder)}
    result = subprocess.run([sys.executable, tmp_path / "driver.py", json.dumps(flags)],
                            cwd=folder, capture_output=True, text=True, timeout=600, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert sorted(p.name for p in folder.iterdir()) == ["common.py", "rob.py"]  # nothing else was needed or written
    for mode in runs:
        call = [line for line in result.stdout.splitlines() if line.startswith("done;")][list(runs).index(mode)]
        model = eval(call.split("timm: ", 1)[1], {"timm": timm})
        assert model.embed_dim == 64 and model.head.out_features == 1000, mode  # its weights loaded strictly


HOST_PROGRAM = textwrap.dedent("""
    import multiprocessing, pathlib, signal, sys, time
    import torch

    def child(path, host_done):
        host_done.wait()  # the host's last line, then its exit: the child must outlive it
        time.sleep(0.5)
        pathlib.Path(path).write_text("alive")

    def host():
        handlers = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1, signal.SIGCHLD)}
        torch.manual_seed(7)
        import common, eval_linear, rob_dino, rob_ibot, rob_msn, rob_swav
        after_import = torch.rand(3)
        torch.manual_seed(7)
        assert torch.equal(after_import, torch.rand(3)), "an import seeded the RNG"
        assert {s: signal.getsignal(s) for s in handlers} == handlers, "an import set a signal handler"
        drawn = []  # builders draw from the caller's RNG and never reseed it: two seeds, two students, two states
        for seed in (1, 2):
            torch.manual_seed(seed)
            model, _, _ = common.student_backbone("vit_pico", 28, 7)
            drawn.append((model.cls_token.clone(), torch.rand(3)))
        assert not torch.equal(drawn[0][0], drawn[1][0]) and not torch.equal(drawn[0][1], drawn[1][1]), "reseeded"
        aug = rob_dino.build_augmentation(rob_dino.get_args_parser().parse_args(
            ["--data_path", "synthetic", "--global_crops_size", "28", "--local_crops_size", "14"]))
        dataset = common.AugmentedDataset(common.FashionMNIST(train=False), aug)
        torch.manual_seed(3)
        dataset[(0, 5)]  # a sample's crops draw from their own seed, the caller's RNG left as it was
        after_sample = torch.rand(3)
        torch.manual_seed(3)
        assert torch.equal(after_sample, torch.rand(3)), "a sample reseeded the caller's RNG"
        print("imported")

    if __name__ == "__main__":
        sys.path.insert(0, sys.argv[1])
        context = multiprocessing.get_context("fork")
        host_done = context.Event()
        context.Process(target=child, args=(sys.argv[2], host_done)).start()  # not a daemon: joined at exit
        try:
            host()
        finally:
            host_done.set()
    """)


def test_importing_the_files_leaves_the_host_program_as_it_was(tmp_path):
    """A host program with a child process of its own imports every file, builds a student and draws a sample:
    its signal handlers and RNG stay its own, and its child is left to finish (no exit hook kills it)."""
    host, marker = tmp_path / "host.py", tmp_path / "child_finished.txt"
    host.write_text(HOST_PROGRAM)
    result = subprocess.run([sys.executable, host, ROOT, marker], capture_output=True, text=True, timeout=300,
                            env={"PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0 and "imported" in result.stdout, result.stderr[-3000:]
    assert marker.read_text() == "alive"  # the host's non-daemon child ran to its end after the host's last line
