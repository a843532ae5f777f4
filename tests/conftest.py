"""Shared test set-up: offline timm, the repository on sys.path, fixture locations, small helpers."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

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
