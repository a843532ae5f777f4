"""The reproduction's figure: per method, the k-NN top-1 (k 20) of the RoB student and of the plain student against
training steps (mean and min-max band over the seeds, from each run's curve.txt), the teacher as a horizontal line.
matplotlib is needed for this script only (pip install matplotlib), not by the trainers.
    python reproduce/plot.py runs/fashion_mnist reproduce/results/fashion_mnist/knn_curves.png dino ibot msn swav"""
import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

NAMES = {"dino": "DINO", "ibot": "iBOT", "msn": "MSN", "swav": "SwAV"}


def curves(runs, method, mode):
    """[steps], [[k-NN per step] per seed] of the runs that have a curve."""
    per_seed = []
    for path in sorted(runs.glob(f"{method}_{mode}_s*/curve.txt")):
        points = sorted((json.loads(line)["step"], json.loads(line)["knn"]) for line in path.read_text().splitlines())
        per_seed.append(points)
    if not per_seed:
        return [], []
    per_seed = [points for points in per_seed if len(points) == max(map(len, per_seed))]  # (unfinished curves)
    steps = sorted(set.intersection(*(set(s for s, _ in points) for points in per_seed)))
    return steps, [[dict(points)[s] for s in steps] for points in per_seed]


def main():
    runs, out, methods = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3:] or list(NAMES)
    fig, axes = plt.subplots(1, len(methods), figsize=(4 * len(methods), 3.4), squeeze=False)
    for ax, m in zip(axes[0], methods):
        for mode, color, label in (("rob", "tab:blue", "RoB student"), ("plain", "tab:orange", "plain student")):
            steps, values = curves(runs, m, mode)
            if not steps:
                continue
            columns = list(zip(*values))
            mean = [sum(c) / len(c) for c in columns]
            ax.plot(steps, mean, color=color, marker="o", markersize=3, label=f"{label} ({len(values)} seeds)")
            ax.fill_between(steps, [min(c) for c in columns], [max(c) for c in columns], color=color, alpha=0.2)
        teacher = runs / f"{m}_teacher" / "teacher_knn.txt"  # the same k-NN memory as the curves (curve.py)
        if teacher.exists():
            knn = json.loads(teacher.read_text())["knn"]
            ax.axhline(knn, color="black", linestyle="--", linewidth=1, label=f"teacher ({knn:.1f})")
        ax.set_title(f"RoB-{NAMES[m]} vs plain {NAMES[m]}")
        ax.set_xlabel("training steps (batch 128)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="best")
    axes[0][0].set_ylabel("k-NN top-1 (k 20, 10k memory)")
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    print(f"{out}")


if __name__ == "__main__":
    main()
