"""Print the results of runs evaluated by eval_linear.py as a markdown table: one row per run folder (the last
line of its eval_log.txt), with the training wall time read from its log.txt."""
import datetime
import json
import sys
from pathlib import Path


def row(folder):
    results = json.loads((folder / "eval_log.txt").read_text().splitlines()[-1])
    epochs = [json.loads(line) for line in (folder / "log.txt").read_text().splitlines()] \
        if (folder / "log.txt").exists() else []
    seconds = sum(sum(int(x) * 60 ** i for i, x in enumerate(reversed(e["time"].split(":")))) for e in epochs)
    knn = results.get("knn", {}).get("20", {}).get("top1")
    linear = results.get("linear", {}).get("top1")
    low_shot = results.get("low_shot", {})
    cells = [folder.name, f"{knn:.1f}" if knn is not None else "", f"{linear:.1f}" if linear is not None else "",
             " / ".join(f"{low_shot[k]['mean']:.1f}" for k in ("1_per_class", "2_per_class", "5_per_class",
                                                                 "1_percent") if k in low_shot),
             str(datetime.timedelta(seconds=seconds)) if epochs else ""]
    return "| " + " | ".join(cells) + " |"


if __name__ == "__main__":
    print("| run | k-NN top-1 (k 20) | linear top-1 | low-shot 1 / 2 / 5 per class / 1 % | training time |")
    print("|---|---|---|---|---|")
    for name in sys.argv[1:]:
        print(row(Path(name)))
