"""The transfer table (README "Against supervised distillation, and on transfer") from reproduce/transfer.sh's runs:
per teacher and per student (RoB and plain per method, supervised KD; mean ± std over the seeds that have every
score), Fashion-MNIST k-NN (k 20) and linear top-1 and, per transfer task, the linear probe's and the k-NN's top-1;
then the verdicts, by a rule fixed before any transfer score was seen: the best RoB student (the RoB arm with the
highest Fashion-MNIST linear mean) minus the supervised-KD student, per metric, against twice the larger std
("beats" above it, "trails" below minus it, "on par" between); then every seed's scores.
    python reproduce/transfer_table.py RUNS [dino ibot msn swav]"""
import datetime
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from table import mean_std, scores, seed_runs, training_seconds  # noqa: E402

TASKS = ("count", "distance", "photos")
COLUMNS = ["fmnist_knn", "fmnist_linear"] + [f"{t}_linear" for t in TASKS] + [f"{t}_knn" for t in TASKS]


def all_scores(runs, folder):
    """{column: top-1} of a run folder (Fashion-MNIST: its eval_log.txt; tasks: RUNS/transfer/<name>/<task>), or None
    while any score is missing."""
    name = folder.name
    paths = [folder / "eval_log.txt"] + [runs / "transfer" / name / t / "eval_log.txt" for t in TASKS]
    if not all(p.exists() and p.stat().st_size for p in paths):
        return None
    fmnist = scores(folder)
    out = {"fmnist_knn": fmnist["knn"], "fmnist_linear": fmnist["linear"]}
    for t in TASKS:
        r = json.loads((runs / "transfer" / name / t / "eval_log.txt").read_text().splitlines()[-1])
        out[f"{t}_linear"], out[f"{t}_knn"] = r["linear"]["top1"], r["knn"]["20"]["top1"]
    return out


def main():
    runs, methods = Path(sys.argv[1]), sys.argv[2:] or ["dino", "ibot", "msn", "swav"]
    head = ("| arm | seeds | F-MNIST k-NN | F-MNIST linear | " + " | ".join(f"{t} linear" for t in TASKS) + " | "
            + " | ".join(f"{t} k-NN" for t in TASKS) + " | training time |")
    rows = [head, "|" + "---|" * (head.count("|") - 1)]
    arms, seeds, per_seed_lines = {}, {}, []
    for name in [f"{m}_teacher" for m in methods] + ["supervised_teacher"]:
        s = all_scores(runs, runs / name)
        if s is not None:
            seconds = training_seconds(runs / name)
            rows.append(f"| {name.replace('_', ' ')} (vit_nano) | 1 | " + " | ".join(f"{s[c]:.1f}" for c in COLUMNS)
                        + f" | {'' if seconds is None else datetime.timedelta(seconds=seconds)} |")
    for name in [f"{m}_{mode}" for m in methods for mode in ("rob", "plain")] + ["supervised_kd"]:
        method, mode = name.split("_")
        found = [(f, s) for f in seed_runs(runs, method, mode) if (s := all_scores(runs, f)) is not None]
        if not found:
            continue
        seeds[name] = folders = [f for f, _ in found]
        per_seed = [s for _, s in found]
        arms[name] = summary = {c: mean_std([s[c] for s in per_seed]) for c in COLUMNS}
        times = sorted(t for t in map(training_seconds, folders) if t is not None)
        time = datetime.timedelta(seconds=times[len(times) // 2]) if times else ""  # median of the seeds' logs
        label = "supervised KD" if name == "supervised_kd" else f"{'RoB' if mode == 'rob' else 'plain'} {method}"
        rows.append(f"| {label} student (vit_pico) | {', '.join(f.name.rsplit('_s', 1)[1] for f in folders)} | "
                    + " | ".join(f"{summary[c][0]:.1f} ± {summary[c][1]:.1f}" for c in COLUMNS) + f" | {time} |")
        per_seed_lines += [f"- {name} {c}: " + " ".join(f"{s[c]:.2f}" for s in per_seed) for c in COLUMNS]
    verdicts, columns = [], COLUMNS
    rob = [a for a in arms if a.endswith("_rob")]
    if rob and "supervised_kd" in arms:
        best = max(rob, key=lambda a: arms[a]["fmnist_linear"][0])
        verdicts.append(f"Best RoB student (highest Fashion-MNIST linear mean): {best}")
        if min(len(seeds[best]), len(seeds["supervised_kd"])) < 2:
            verdicts.append("- not decided: a std needs 2 seeds per student or more")
            columns = []
        for c in columns:
            (a, sa), (b, sb) = arms[best][c], arms["supervised_kd"][c]
            threshold = 2 * max(sa, sb)
            word = "beats" if a - b > threshold else "trails" if a - b < -threshold else "on par with"
            verdicts.append(f"- {c}: {best} - supervised_kd = {a - b:+.2f}, twice the larger std {threshold:.2f}: "
                            f"{word} supervised KD")
    print("\n".join(rows + [""] + verdicts + ["", "Per seed (in seed order):", ""] + per_seed_lines))


if __name__ == "__main__":
    main()
