"""Print runs evaluated by eval_linear.py as a markdown table: one row per run folder (the last line of its
eval_log.txt) with the training time read from its log.txt; columns without any value are left out.
    python reproduce/table.py runs/demo/dino_teacher runs/demo/rob_dino_student runs/demo/plain_dino_student"""
import datetime
import json
import sys
from pathlib import Path

LOW_SHOT = ("1_per_class", "2_per_class", "5_per_class", "1_percent")


def cells(folder):
    results = json.loads((folder / "eval_log.txt").read_text().splitlines()[-1])
    epochs = [json.loads(line) for line in (folder / "log.txt").read_text().splitlines()] \
        if (folder / "log.txt").exists() else []
    seconds = sum(sum(int(x) * 60 ** i for i, x in enumerate(reversed(e["time"].split(":")))) for e in epochs)
    knn, linear, low_shot = results.get("knn", {}).get("20"), results.get("linear"), results.get("low_shot")
    return {"run": folder.name,
            "k-NN top-1 (k 20)": f"{knn['top1']:.1f}" if knn else "",
            "linear top-1": f"{linear['top1']:.1f}" if linear and "top1" in linear else "",
            "low-shot top-1: 1 / 2 / 5 per class / 1 %": " / ".join(f"{low_shot[k]['mean']:.1f}" for k in LOW_SHOT)
            if low_shot else "",
            "training time": str(datetime.timedelta(seconds=seconds)) if epochs else ""}


if __name__ == "__main__":
    rows = [cells(Path(name)) for name in sys.argv[1:]]
    columns = [c for c in rows[0] if any(row[c] for row in rows)]
    print("| " + " | ".join(columns) + " |\n|" + "---|" * len(columns))
    for row in rows:
        print("| " + " | ".join(row[c] for c in columns) + " |")
