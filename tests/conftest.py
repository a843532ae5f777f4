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


@pytest.fixture(scope="session")
def fashion_mnist_folder(tmp_path_factory):
    """A small ImageFolder of real Fashion-MNIST PNGs (10 classes x 8 images) for end-to-end runs."""
    import common
    images, labels = common.load_fashion_mnist(train=True)
    root = tmp_path_factory.mktemp("fmnist_folder")
    counts = {}
    from PIL import Image
    for img, label in zip(images, labels.tolist()):
        if counts.get(label, 0) >= 8:
            continue
        counts[label] = counts.get(label, 0) + 1
        (root / f"class{label}").mkdir(exist_ok=True)
        Image.fromarray(img.numpy(), mode="L").save(root / f"class{label}" / f"{counts[label]}.png")
        if len(counts) == 10 and all(c >= 8 for c in counts.values()):
            break
    return root
