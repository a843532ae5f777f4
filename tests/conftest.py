"""Shared test set-up: offline timm, the repository on sys.path, fixture locations, small helpers."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
FIXTURES = Path(__file__).resolve().parent / "fixtures"
OFFICIAL_TINY = FIXTURES / "official_tiny"
OFFICIAL_SCHEMAS = FIXTURES / "official_checkpoints"
sys.path.insert(0, str(ROOT))


def run_script(args, nproc=1, timeout=600, env=None, check=True):
    """Run a repository script as a subprocess: plain python for nproc=1, torchrun (gloo, CPU) otherwise."""
    launcher = [sys.executable] if nproc == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    full_env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", **(env or {})}
    result = subprocess.run(launcher + [str(a) for a in args], cwd=ROOT, capture_output=True, text=True,
                            timeout=timeout, env=full_env)
    if check and result.returncode != 0:
        raise AssertionError(f"{' '.join(map(str, args))} failed:\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}")
    return result


def run_in_process(args, check=True):
    """What run_script does for one process, in this one: the script's run_main() entry point with these arguments,
    one thread, its output captured. A process start costs 5-7 s (torchvision imports torch._dynamo), so tests that
    need no process of their own (no signal, no kill, no copy of the files) run here."""
    import contextlib
    import importlib
    import io
    module = importlib.import_module(Path(str(args[0])).stem)
    argv, threads, out, err = sys.argv, torch.get_num_threads(), io.StringIO(), io.StringIO()
    sys.argv = [str(a) for a in args]
    torch.set_num_threads(1)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            module.run_main()
    except SystemExit as exited:
        code = exited.code
    finally:
        sys.argv = argv
        torch.set_num_threads(threads)
    result = subprocess.CompletedProcess(args, code, out.getvalue(), err.getvalue())
    if check and code != 0:
        raise AssertionError(f"{' '.join(map(str, args))} failed:\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}")
    return result


def make_image_folder(root, classes, per_class, offset=0):
    """An ImageFolder of real Fashion-MNIST PNGs: `classes` class folders of `per_class` images each."""
    import common
    from PIL import Image
    images, labels = common.load_fashion_mnist(train=True)
    for label in range(classes):
        (root / f"class{label}").mkdir(parents=True, exist_ok=True)
        picks = (labels == label).nonzero().flatten()[offset:offset + per_class]
        for j, i in enumerate(picks.tolist()):
            Image.fromarray(images[i].numpy(), mode="L").save(root / f"class{label}" / f"{j}.png")
    return root


@pytest.fixture(scope="session")
def fashion_mnist_folder(tmp_path_factory):
    """10 classes x 8 real Fashion-MNIST images."""
    return make_image_folder(tmp_path_factory.mktemp("fmnist80"), classes=10, per_class=8)


@pytest.fixture(scope="session")
def small_folder(tmp_path_factory):
    """3 classes x 8 real Fashion-MNIST images: 3 steps of a global batch of 8."""
    return make_image_folder(tmp_path_factory.mktemp("fmnist24"), classes=3, per_class=8)


ASSETS = ROOT / "assets"
KNN_MARGIN = 3.0  # points of k-NN top-1 (on 2,000 test images) a short run from a shipped teacher adds to random init
# A short RoB run on real data: vit_pico (patch 7) on a 12,800-image subset of Fashion-MNIST, 3 epochs of 100 steps.
# Shorter runs sit in the dip that distillation from a small, near-uniform teacher starts with (k-NN first falls
# below the random initialisation's, then climbs: 54.5 after 200 steps of 64, 63.1 after 300 of 128 from 58.1).
FMNIST_RUN = ["--student", "vit_pico", "--data_path", "fashion-mnist", "--global_crops_size", "28",
              "--local_crops_size", "14", "--local_crops_number", "4", "--global_crops_scale", "0.4", "1",
              "--local_crops_scale", "0.1", "0.4", "--patch_size", "7", "--batch_size_per_gpu", "128",
              "--drop_path_rate", "0", "--lr", "2e-3", "--warmup_epochs", "1", "--num_workers", "1",
              "--saveckp_freq", "0", "--subset", "12800", "--epochs", "3"]


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: a Fashion-MNIST training run of minutes (make test-slow)")


def pytest_collection_modifyitems(items):
    """The minutes-long Fashion-MNIST runs first: under `pytest -n 2` (make test) the other worker takes the short
    tests meanwhile, instead of the long run starting last and alone."""
    items.sort(key=lambda item: "fashion_mnist_run" not in item.name and item.get_closest_marker("slow") is None)


def rob_knn_gain(script, teacher, out, extra=()):
    """k-NN top-1 of a random vit_pico, and of the same after a short RoB run of `script` from `teacher`."""
    before = fashion_mnist_knn(random_init_checkpoint(out.parent / "init.pth"))
    threads = "1" if os.environ.get("PYTEST_XDIST_WORKER") else "2"  # under `pytest -n 2` the other worker is busy
    run_script([script, "--teacher", teacher, *FMNIST_RUN, *extra, "--output_dir", out], timeout=1800,
               env={"OMP_NUM_THREADS": threads})
    after = fashion_mnist_knn(out / "checkpoint.pth")
    print(f"{script} from {Path(teacher).name}: k-NN top-1 {before:.2f} at random init, {after:.2f} after the run")
    return before, after


def fashion_mnist_knn(checkpoint, checkpoint_key=None, n_train=5000, n_test=2000):
    """k-NN (k 20, T 0.07) top-1 of a checkpoint's backbone on a fixed part of Fashion-MNIST (real data)."""
    import eval_linear
    import torch
    model, _ = eval_linear.load_backbone(str(checkpoint), checkpoint_key=checkpoint_key, img_size=28)
    images, labels = [], []
    for train, n in ((True, n_train), (False, n_test)):
        x, y = common_fashion_mnist(train)
        images.append(x[:n])
        labels.append(y[:n])
    mean, std = torch.tensor((0.485, 0.456, 0.406))[:, None, None], torch.tensor((0.229, 0.224, 0.225))[:, None, None]
    with torch.no_grad():
        features = [torch.cat([model(((x[i:i + 500, None].float() / 255).expand(-1, 3, -1, -1) - mean) / std)
                               for i in range(0, len(x), 500)]) for x in images]
    knn = eval_linear.knn_classifier(features[0], labels[0], features[1], labels[1], [20], 0.07, 10)
    return knn[20][0]


def common_fashion_mnist(train):
    import common
    return common.load_fashion_mnist(train)


def random_init_checkpoint(path, student="vit_pico", seed=0):
    """A rob_*.py-style checkpoint of a randomly initialised student: the 'before training' reference."""
    import common
    import torch
    torch.manual_seed(seed)
    model, _, arch = common.student_backbone(student, 28, 7)
    torch.save(dict(method="rob_dino", arch=arch, student={f"backbone.{k}": v for k, v in model.state_dict().items()}),
               path)
    return path


def without_key_bias(name, *tensors):
    """The attention key bias shifts every logit of a query by the same amount, which the softmax ignores: its
    gradient is zero in exact arithmetic and rounding noise in practice, which Adam (without clipping, the RoB
    default) turns into steps of any size up to the lr. Left out of weight comparisons between runs whose sums
    run in another order; every other tensor is compared."""
    if name.endswith("attn.qkv.bias"):
        dim = tensors[0].shape[0] // 3
        return [torch.cat([t[:dim], t[2 * dim:]]) for t in tensors]
    return tensors
