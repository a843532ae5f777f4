"""The reproduction's table (README "Reproduction on Fashion-MNIST") from the runs' eval_log.txt files: per
method, the teacher, then the RoB and the plain student as mean ± std over their seeds, and RoB minus plain.
    python reproduce/table.py runs/fashion_mnist dino ibot msn swav"""
import datetime
import json
import statistics
import sys
from pathlib import Path

LOW_SHOT = ("1_per_class", "2_per_class", "5_per_class", "1_percent")


def scores(folder):
    """{metric: value} of a run folder's last evaluation (k-NN k 20, linear, low-shot means)."""
    results = json.loads((folder / "eval_log.txt").read_text().splitlines()[-1])
    out = {"knn": results["knn"]["20"]["top1"], "linear": results["linear"]["top1"]}
    out.update({k: results["low_shot"][k]["mean"] for k in LOW_SHOT} if "low_shot" in results else {})
    return out


def training_time(folder):
    """The summed epoch times of a run's log.txt (one process), or None."""
    log = folder / "log.txt"
    if not log.exists():
        return None
    seconds = sum(sum(int(x) * 60 ** i for i, x in enumerate(reversed(json.loads(line)["time"].split(":"))))
                  for line in log.read_text().splitlines())
    return str(datetime.timedelta(seconds=seconds))


def mean_std(values):
    return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def main():
    runs, methods = Path(sys.argv[1]), sys.argv[2:] or ["dino", "ibot", "msn", "swav"]
    rows = ["| method | run | seeds | k-NN top-1 (k 20) | linear top-1 | low-shot top-1: 1 / 2 / 5 per class / 1 % "
            "| training time |", "|---|---|---|---|---|---|---|"]
    verdicts = []
    for m in methods:
        teacher = scores(runs / f"{m}_teacher")
        low = " / ".join(f"{teacher[k]:.1f}" for k in LOW_SHOT) if "1_percent" in teacher else ""
        rows.append(f"| {m} | teacher (vit_nano) | 1 | {teacher['knn']:.1f} | {teacher['linear']:.1f} | {low} "
                    f"| {training_time(runs / f'{m}_teacher') or ''} |")
        summary, seeds = {}, {}
        for mode in ("rob", "plain"):
            folders = sorted(runs.glob(f"{m}_{mode}_s*/eval_log.txt"))
            if not folders:
                continue
            per_seed, seeds[mode] = [scores(f.parent) for f in folders], len(folders)
            summary[mode] = {k: mean_std([s[k] for s in per_seed]) for k in per_seed[0]}
            cells = [f"{summary[mode][k][0]:.1f} ± {summary[mode][k][1]:.1f}" for k in ("knn", "linear")]
            low = " / ".join(f"{summary[mode][k][0]:.1f} ± {summary[mode][k][1]:.1f}" for k in LOW_SHOT) \
                if "1_percent" in summary[mode] else ""
            times = [training_time(f.parent) for f in folders]
            rows.append(f"| {m} | {'RoB' if mode == 'rob' else 'plain'} student (vit_pico) | {seeds[mode]} | "
                        f"{cells[0]} | {cells[1]} | {low} | {times[0] or ''} |")
        if len(summary) == 2 and min(seeds.values()) < 2:
            verdicts.append(f"- {m}: not decided, a std needs 2 seeds per student or more (RoB {seeds['rob']}, "
                            f"plain {seeds['plain']})")
        elif len(summary) == 2:
            for k in ("knn", "linear"):
                (a, sa), (b, sb) = summary["rob"][k], summary["plain"][k]
                verdicts.append(f"- {m} {k}: RoB - plain = {a - b:+.2f}, twice the larger std {2 * max(sa, sb):.2f}: "
                                + ("holds" if a - b > 2 * max(sa, sb) else "does not hold"))
    print("\n".join(rows + [""] + verdicts))


if __name__ == "__main__":
    main()
