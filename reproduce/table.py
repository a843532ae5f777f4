"""The reproduction's table (README "Results on Fashion-MNIST") from the runs' eval_log.txt files: per method, the
teacher, then the RoB and the plain student as mean ± std over their seeds; then a verdict per metric (RoB minus
plain against twice the larger std, k-NN, linear and each low-shot setting) and every seed's score.
tests/test_results.py checks the README's numbers against the table.md this writes.
    python reproduce/table.py runs/fashion_mnist dino ibot msn swav"""
import datetime
import json
import re
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


def training_seconds(folder):
    """The summed epoch times ("H:MM:SS") of a run's log.txt (one process), or None."""
    log = folder / "log.txt"
    if not log.exists():
        return None
    return sum(sum(int(x) * 60 ** i for i, x in enumerate(reversed(json.loads(line)["time"].split(":"))))
               for line in log.read_text().splitlines())


def seed_runs(runs, method, mode):
    """The run folders <method>_<mode>_s<seed> that hold an evaluation, in seed order."""
    found = [(int(m.group(1)), f) for f in runs.glob(f"{method}_{mode}_s*")
             if (m := re.fullmatch(rf"{method}_{mode}_s(\d+)", f.name)) and (f / "eval_log.txt").exists()]
    return [f for _, f in sorted(found)]


def mean_std(values):
    return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def main():
    runs, methods = Path(sys.argv[1]), sys.argv[2:] or ["dino", "ibot", "msn", "swav"]
    rows = ["| method | run | seeds | k-NN top-1 (k 20) | linear top-1 | low-shot top-1: 1 / 2 / 5 per class / 1 % "
            "| training time |", "|---|---|---|---|---|---|---|"]
    verdicts, per_seed_lines = [], []
    for m in methods:
        teacher = scores(runs / f"{m}_teacher")
        low = " / ".join(f"{teacher[k]:.1f}" for k in LOW_SHOT) if "1_percent" in teacher else ""
        seconds = training_seconds(runs / f"{m}_teacher")
        rows.append(f"| {m} | teacher (vit_nano) | 1 | {teacher['knn']:.1f} | {teacher['linear']:.1f} | {low} "
                    f"| {'' if seconds is None else datetime.timedelta(seconds=seconds)} |")
        summary, seeds, per = {}, {}, {}
        for mode in ("rob", "plain"):
            folders = seed_runs(runs, m, mode)
            if not folders:
                continue
            per[mode] = per_seed = [scores(f) for f in folders]
            seeds[mode] = len(folders)
            summary[mode] = {k: mean_std([s[k] for s in per_seed]) for k in per_seed[0]}
            cells = [f"{summary[mode][k][0]:.1f} ± {summary[mode][k][1]:.1f}" for k in ("knn", "linear")]
            low = " / ".join(f"{summary[mode][k][0]:.1f} ± {summary[mode][k][1]:.1f}" for k in LOW_SHOT) \
                if "1_percent" in summary[mode] else ""
            times = sorted(t for t in map(training_seconds, folders) if t is not None)
            time = datetime.timedelta(seconds=times[len(times) // 2]) if times else ""  # median of the seeds' logs
            rows.append(f"| {m} | {'RoB' if mode == 'rob' else 'plain'} student (vit_pico) | {seeds[mode]} | "
                        f"{cells[0]} | {cells[1]} | {low} | {time} |")
            per_seed_lines += [f"- {m} {mode} {k}: " + " ".join(f"{s[k]:.2f}" for s in per_seed) for k in per_seed[0]]
        if len(summary) == 2 and min(seeds.values()) < 2:
            verdicts.append(f"- {m}: not decided, a std needs 2 seeds per student or more (RoB {seeds['rob']}, "
                            f"plain {seeds['plain']})")
        elif len(summary) == 2:
            for k in [k for k in ("knn", "linear") + LOW_SHOT if k in summary["rob"] and k in summary["plain"]]:
                (a, sa), (b, sb) = summary["rob"][k], summary["plain"][k]
                every = min(s[k] for s in per["rob"]) > max(s[k] for s in per["plain"])
                verdicts.append(f"- {m} {k}: RoB - plain = {a - b:+.2f}, twice the larger std {2 * max(sa, sb):.2f}: "
                                + ("holds" if a - b > 2 * max(sa, sb) else "does not hold")
                                + ("; every RoB seed above every plain seed" if every else ""))
    print("\n".join(rows + [""] + verdicts + ["", "Per seed (in seed order):", ""] + per_seed_lines))


if __name__ == "__main__":
    main()
