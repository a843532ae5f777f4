"""Slim a baseline run's checkpoint.pth into a shipped teacher (assets/): only what the method's --teacher
loader reads (the EMA teacher; SwAV: its student; MSN: also the learned prototypes), in fp16.
    python reproduce/export_teacher.py runs/fashion_mnist/dino_teacher/checkpoint.pth assets/fmnist_dino_vit_nano.pth"""
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import common  # noqa: E402


def half(sd):
    return {k: v.half() if v.is_floating_point() else v for k, v in sd.items()}


if __name__ == "__main__":
    source, target = sys.argv[1:3]
    ckpt = common.load_file(source)
    slim = dict(method=ckpt["method"], arch=ckpt["arch"], args=ckpt["args"], step=ckpt["step"], epoch=ckpt["epoch"])
    if ckpt.get("teacher") is not None:  # DINO / iBOT / MSN baselines: the EMA teacher teaches
        slim["teacher"] = half(ckpt["teacher"])
        if ckpt["method"] == "rob_msn":  # its prototypes are learned by the student
            slim["student"] = {"prototypes": ckpt["student"]["prototypes"].half()}
    else:  # SwAV's baseline trains a single network
        slim["student"] = half(ckpt["student"])
    Path(target).parent.mkdir(parents=True, exist_ok=True)
    common.save_atomic(slim, target)
    print(f"{target}: {Path(target).stat().st_size / 1e6:.1f} MB")
