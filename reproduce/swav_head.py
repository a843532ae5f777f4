"""Where a SwAV student's embeddings sit relative to its prototypes (README "Students", SwAV): on the first 512
test images, the student's L2-normalised embeddings z, their prototype scores' spread, the entropy of the
predictions softmax(scores / 0.1), and |cos(z, v_min)| with v_min the direction the prototypes are least aligned
with (the last right-singular vector of the prototype matrix). A collapsed plain-SwAV run shows |cos| ~1 and
scores ~0: every prediction uniform (loss log K), no gradient left.
    python reproduce/swav_head.py runs/fashion_mnist/swav_plain_s0 runs/fashion_mnist/swav_rob_s0"""
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import common  # noqa: E402
import eval_linear  # noqa: E402
import rob_swav  # noqa: E402


def main():
    test = eval_linear.build_split("fashion-mnist", False, common.eval_transform(28, resize=28), 28)
    images = torch.stack([test[i][0] for i in range(512)])
    for run in sys.argv[1:]:
        path = str(Path(run) / "checkpoint.pth")
        network = rob_swav.load_teacher(path)  # the run's student, as a RoB teacher loads it
        head, backbone = network.head, network.backbone
        with torch.no_grad():
            z, scores = head.eval()(eval_linear.backbone_features(backbone, images, 1, False))
            prototypes = head.prototypes.weight.float()
            p = F.softmax(scores / 0.1, dim=-1)
            entropy = -(p * p.clamp_min(1e-12).log()).sum(-1).mean()
            singular, v = torch.linalg.svd(prototypes, full_matrices=False)[1:]
        print(f"{run}: score std over prototypes {scores.std(-1).mean():.4f}, prediction entropy {entropy:.3f} "
              f"(log K {torch.tensor(float(len(prototypes))).log():.3f}), smallest singular value of the prototypes "
              f"{singular[-1]:.3f} (largest {singular[0]:.2f}), |cos(z, v_min)| {(z @ v[-1]).abs().mean():.3f}")


if __name__ == "__main__":
    main()
