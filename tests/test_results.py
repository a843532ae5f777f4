"""The README's results are the reproduction's: every number and verdict the README and reproduce/README.md state
about the Fashion-MNIST comparison is checked against reproduce/results/fashion_mnist/table.md (what
reproduce/table.py wrote in that run), and table.py's arithmetic against a hand computation."""
import importlib.util
import json
import re
import shutil
import statistics
import subprocess
import sys

from conftest import ROOT

RESULTS = ROOT / "reproduce" / "results" / "fashion_mnist"
NAMES = {"DINO": "dino", "iBOT": "ibot", "MSN": "msn", "SwAV": "swav"}
NUMBER = r"[+-]?\d+\.\d+"
VERDICT = re.compile(rf"^- (\w+) (\w+): RoB - plain = ({NUMBER}), twice the larger std ({NUMBER}): (holds|does not "
                     r"hold)(; every RoB seed above every plain seed)?$")


def table_rows(text):
    """{(method, run kind): [cells]} of the rows of the reproduction's table in a text."""
    rows = {}
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if line.startswith("| ") and len(cells) == 7 and cells[0] in NAMES.values():
            rows[cells[0], cells[1].split()[0]] = cells
    return rows


def table():
    """(rows {(method, run kind): [cells]}, verdicts {method: [(metric, gain, threshold, holds)]}) of table.md."""
    text, verdicts = (RESULTS / "table.md").read_text(), {}
    for line in text.splitlines():
        if match := VERDICT.match(line):
            m, metric, gain, threshold, verdict, _ = match.groups()
            verdicts.setdefault(m, []).append((metric, gain, threshold, verdict == "holds"))
    return table_rows(text), verdicts


def numbers(text):
    return re.findall(r"\d+\.\d+", text)


def section(text, title):
    return text.split(f"## {title}\n", 1)[1].split("\n## ", 1)[0]


def test_readme_results_table_and_verdicts_are_table_md():
    rows, verdicts = table()
    results = section((ROOT / "README.md").read_text(), "Results on Fashion-MNIST")
    seeds = {int(rows[m, kind][2]) for m in NAMES.values() for kind in ("RoB", "plain")}
    assert len(seeds) == 1 and f"seeds 0-{seeds.pop() - 1}" in results
    readme_rows = [line for line in results.splitlines() if line.startswith("| ") and line.split(",")[0][2:] in NAMES]
    assert len(readme_rows) == 4
    for line in readme_rows:
        m = NAMES[line.split(",")[0][2:]]
        expected = [x for kind in ("teacher", "RoB", "plain") for x in numbers(" ".join(rows[m, kind][3:5]))]
        assert numbers(line.split("|", 2)[2]) == expected, line
    bullets = {NAMES[b[0]]: b[1] for b in re.findall(r"^- \*\*(\w+)\*\*:(.*(?:\n  .*)*)", results, re.M)}
    assert set(bullets) == set(NAMES.values())
    for m, bullet in bullets.items():
        stated = re.findall(rf"({NUMBER})\s+([>≤])\s+({NUMBER})", bullet)
        assert [(g, t, rel == ">") for g, rel, t in stated] == [v[1:] for v in verdicts[m]], (m, bullet)
    if "for all four methods" in results.split("\n- ")[0]:  # the headline, if it claims all four
        assert all(holds for m in verdicts for metric, _, _, holds in verdicts[m] if metric in ("knn", "linear"))


def test_reproduce_readme_copies_table_md():
    rows, verdicts = table()
    text = (ROOT / "reproduce" / "README.md").read_text()
    table_lines = (RESULTS / "table.md").read_text().splitlines()
    assert [line for line in text.splitlines() if VERDICT.match(line)] == \
        [line for line in table_lines if VERDICT.match(line)] != []
    copied = table_rows(text)
    assert copied.keys() == rows.keys()
    for key, cells in rows.items():  # seeds and scores; the training times of the teachers are written in by hand
        assert copied[key][2:6] == cells[2:6], key


def test_table_md_is_what_table_py_makes_of_the_shipped_scores(tmp_path):
    """table.md against the per-run scores shipped beside it (reproduce/results/fashion_mnist/*_eval.json)."""
    for path in RESULTS.glob("*_eval.json"):
        if re.fullmatch(r"\w+_((rob|plain)_s\d+|teacher)_eval\.json", path.name):
            (tmp_path / path.name[:-len("_eval.json")]).mkdir()
            (tmp_path / path.name[:-len("_eval.json")] / "eval_log.txt").write_text(path.read_text())
    out = subprocess.run([sys.executable, ROOT / "reproduce" / "table.py", tmp_path], capture_output=True, text=True,
                         check=True).stdout
    without_times = [re.sub(r"\| [^|]* \|$", "|", line) for line in out.splitlines()]  # (no logs shipped)
    shipped = [re.sub(r"\| [^|]* \|$", "|", line) for line in (RESULTS / "table.md").read_text().splitlines()]
    assert without_times == shipped


def test_table_py_verdicts_equal_a_hand_computation(tmp_path):
    spec = importlib.util.spec_from_file_location("table", ROOT / "reproduce" / "table.py")
    table_py = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(table_py)
    knn = {"rob": [78.0, 79.0, 80.5], "plain": [77.0, 78.5, 76.0]}
    linear = {"rob": [80.0, 80.2, 80.1], "plain": [78.0, 78.1, 78.2]}
    low = {"rob": [40.0, 41.0, 45.0], "plain": [39.0, 30.0, 35.0]}
    for mode in knn:
        for seed, (k, li, lo) in enumerate(zip(knn[mode], linear[mode], low[mode])):
            (tmp_path / f"msn_{mode}_s{seed}").mkdir()
            result = {"knn": {"20": {"top1": k}}, "linear": {"top1": li},
                      "low_shot": {s: {"mean": lo} for s in table_py.LOW_SHOT}}
            (tmp_path / f"msn_{mode}_s{seed}" / "eval_log.txt").write_text(json.dumps(result) + "\n")
    (tmp_path / "msn_teacher").mkdir()
    (tmp_path / "msn_teacher" / "eval_log.txt").write_text(json.dumps({"knn": {"20": {"top1": 90.0}},
                                                                      "linear": {"top1": 91.0}}) + "\n")
    out = subprocess.run([sys.executable, ROOT / "reproduce" / "table.py", tmp_path, "msn"], capture_output=True,
                         text=True, check=True).stdout
    gain = statistics.mean(knn["rob"]) - statistics.mean(knn["plain"])  # 79.1667 - 77.1667 = +2.00
    threshold = 2 * max(statistics.stdev(knn["rob"]), statistics.stdev(knn["plain"]))  # 2 * 1.2583 = 2.52
    assert f"- msn knn: RoB - plain = {gain:+.2f}, twice the larger std {threshold:.2f}: does not hold\n" in out
    assert "- msn linear: RoB - plain = +2.00, twice the larger std 0.20: holds; every RoB seed above every plain " \
           "seed\n" in out  # (80.1 - 78.1, 2 * 0.1; 80.0 > 78.2)
    gain = statistics.mean(low["rob"]) - statistics.mean(low["plain"])  # 42 - 34.67 = +7.33
    threshold = 2 * max(statistics.stdev(low["rob"]), statistics.stdev(low["plain"]))  # 2 * 4.51 = 9.02
    assert f"- msn 1_per_class: RoB - plain = {gain:+.2f}, twice the larger std {threshold:.2f}: does not hold; " \
           "every RoB seed above every plain seed\n" in out  # (40 > 39: above, yet within the spread)
    assert "- msn rob knn: 78.00 79.00 80.50" in out and "- msn plain 1_per_class: 39.00 30.00 35.00" in out


TRANSFER = ROOT / "reproduce" / "results" / "transfer"


def write_scores(runs, name, fmnist, tasks, seconds=None):
    """A run folder as reproduce/transfer.sh leaves it: fmnist (k-NN, linear); tasks {task: (linear, k-NN)}."""
    (runs / name).mkdir(parents=True)
    (runs / name / "eval_log.txt").write_text(json.dumps({"knn": {"20": {"top1": fmnist[0]}},
                                                          "linear": {"top1": fmnist[1]}}) + "\n")
    if seconds is not None:
        (runs / name / "log.txt").write_text(json.dumps({"epoch": 0, "time": f"0:00:{seconds:02d}"}) + "\n")
    for task, (linear, knn) in tasks.items():
        (runs / "transfer" / name / task).mkdir(parents=True)
        (runs / "transfer" / name / task / "eval_log.txt").write_text(
            json.dumps({"knn": {"20": {"top1": knn}}, "linear": {"top1": linear}}) + "\n")


def test_transfer_table_rows_and_verdicts_equal_a_hand_computation(tmp_path):
    """The best RoB arm is the one with the highest Fashion-MNIST linear mean (here msn, though dino has the higher
    k-NN); each verdict is its mean minus supervised KD's against twice the larger std."""
    count = {"msn_rob": [60.0, 62.0, 61.0], "dino_rob": [70.0, 71.0, 72.0], "supervised_kd": [55.0, 56.0, 57.5]}
    photos = {"msn_rob": [50.0, 50.5, 51.0], "dino_rob": [40.0, 41.0, 42.0], "supervised_kd": [52.0, 50.0, 51.0]}
    fmnist_linear = {"msn_rob": 80.0, "dino_rob": 79.0, "supervised_kd": 85.0}
    for arm in count:
        for seed in range(3):
            write_scores(tmp_path, f"{arm}_s{seed + 2}", (90.0 if arm == "dino_rob" else 70.0,
                                                          fmnist_linear[arm] + seed / 10),
                         {"count": (count[arm][seed], 1.0), "distance": (30.0, 2.0), "photos": (photos[arm][seed], 3.0)},
                         seconds=10 + seed)
    write_scores(tmp_path, "msn_rob_s5", (0.0, 0.0), {"count": (0.0, 0.0)})  # a seed without every score
    write_scores(tmp_path, "msn_teacher", (85.0, 86.0), {t: (99.0, 98.0) for t in ("count", "distance", "photos")})
    out = subprocess.run([sys.executable, ROOT / "reproduce" / "transfer_table.py", tmp_path, "dino", "msn"],
                         capture_output=True, text=True, check=True).stdout
    assert "Best RoB student (highest Fashion-MNIST linear mean): msn_rob\n" in out
    gain = statistics.mean(count["msn_rob"]) - statistics.mean(count["supervised_kd"])  # 61 - 56.17 = +4.83
    threshold = 2 * max(statistics.stdev(count["msn_rob"]), statistics.stdev(count["supervised_kd"]))  # 2 * 1.26
    assert f"- count_linear: msn_rob - supervised_kd = {gain:+.2f}, twice the larger std {threshold:.2f}: beats " \
           "supervised KD\n" in out
    assert "- photos_linear: msn_rob - supervised_kd = -0.50, twice the larger std 2.00: on par with supervised KD\n" \
        in out  # (50.5 - 51, 2 * 1.0)
    assert "- fmnist_linear: msn_rob - supervised_kd = -5.00, twice the larger std 0.20: trails supervised KD\n" in out
    assert "| RoB msn student (vit_pico) | 2, 3, 4 | 70.0 ± 0.0 | 80.1 ± 0.1 | 61.0 ± 1.0 | 30.0 ± 0.0 | 50.5 ± 0.5 | " \
           "1.0 ± 0.0 | 2.0 ± 0.0 | 3.0 ± 0.0 | 0:00:11 |" in out  # seed 5 lacks scores: left out
    assert "| msn teacher (vit_nano) | 1 | 85.0 | 86.0 | 99.0 | 99.0 | 99.0 | 98.0 | 98.0 | 98.0 |  |" in out
    assert "- supervised_kd count_linear: 55.00 56.00 57.50" in out
    for path in list(tmp_path.glob("supervised_kd_s[34]")) + list(tmp_path.glob("transfer/supervised_kd_s[34]")):
        shutil.rmtree(path)  # one KD seed left: no std, no verdict
    out = subprocess.run([sys.executable, ROOT / "reproduce" / "transfer_table.py", tmp_path, "dino", "msn"],
                         capture_output=True, text=True, check=True).stdout
    assert "- not decided: a std needs 2 seeds per student or more\n" in out and "supervised KD\n" not in out


def test_transfer_table_md_is_what_transfer_table_py_makes_of_the_shipped_scores():
    out = subprocess.run([sys.executable, ROOT / "reproduce" / "transfer_table.py", TRANSFER / "scores"],
                         capture_output=True, text=True, check=True).stdout
    assert out == (TRANSFER / "table.md").read_text()


def test_readme_transfer_rows_and_gains_are_transfer_table_md():
    """README's supervised-distillation paragraph: its rows are table.md's linear cells (Fashion-MNIST, count,
    distance, photos), its RoB row is table.md's best RoB student, and each signed gain it quotes is a verdict's."""
    text = (TRANSFER / "table.md").read_text()
    cells = {line.split("|")[1].strip(): [c.strip() for c in line.strip("|").split("|")] for line in text.splitlines()
             if line.startswith("| ")}
    best = re.search(r"^Best RoB student \(highest Fashion-MNIST linear mean\): (\w+)_rob$", text, re.M).group(1)
    gains = {f"{float(g):+.1f}" for g in re.findall(rf"= ({NUMBER}), twice the larger std", text)}
    results = section((ROOT / "README.md").read_text(), "Results on Fashion-MNIST")
    paragraph = results.split("**Against supervised distillation", 1)[1].split("\n\n`make reproduce`", 1)[0]
    readme_rows = {line.split("|")[1].strip(): numbers(line.split("|", 2)[2]) for line in paragraph.splitlines()
                   if line.startswith("| ") and not line.startswith("| student")}
    names = {f"RoB-{k}": f"RoB {v} student (vit_pico)" for k, v in NAMES.items()} | {
        f"plain {k}": f"plain {v} student (vit_pico)" for k, v in NAMES.items()} | {
        "supervised KD": "supervised KD student (vit_pico)"}
    assert f"RoB-{dict(map(reversed, NAMES.items()))[best]}" in readme_rows and "supervised KD" in readme_rows
    for label, found in readme_rows.items():
        assert found == numbers(" ".join(cells[names[label]][3:7])), label
    quoted = re.findall(r"(?<![\d.])[+-]\d+\.\d\b", paragraph.split("|---", 1)[1])
    assert quoted and set(quoted) <= gains, (quoted, gains)


def test_reproduce_readme_copies_transfer_table_md():
    table_md = (TRANSFER / "table.md").read_text().split("\n\n")[0]
    text = section((ROOT / "reproduce" / "README.md").read_text(), "Against supervised distillation, on transfer tasks")
    assert table_md in text
    for line in (TRANSFER / "table.md").read_text().splitlines():
        if match := re.match(rf"^- (\w+): msn_rob - supervised_kd = ({NUMBER}), twice the larger std ({NUMBER})", line):
            assert re.search(rf"{re.escape(match.group(2))}\W[^.]*{match.group(3)}", text), match.group(1)
