"""How long finding the images of a folder takes: common.ImageFiles (any depth, each real folder once) against
torchvision's ImageFolder on the same tree of N empty *.jpg files (neither opens a file while scanning).

    python benchmarks/scan.py --files 100000 --folders 100 --root /tmp/scan_tree

The tree is made once (its files are empty) and kept; each scanner runs --repeats times, alternating, from a warm
page cache. Prints the time of each and the files each found."""
import argparse
import os
import statistics
import sys
import time
from pathlib import Path

from torchvision import datasets

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import common  # noqa: E402


def make_tree(root, files, folders):
    """`folders` class folders, each with half its files at its top and half one level down (shards)."""
    per_folder = files // folders
    for f in range(folders):
        for shard in ("", "shard0"):
            os.makedirs(os.path.join(root, f"class{f:04}", shard), exist_ok=True)
        for i in range(per_folder):
            path = os.path.join(root, f"class{f:04}", "shard0" if i % 2 else "", f"{i:06}.jpg")
            if not os.path.exists(path):
                open(path, "wb").close()
    return per_folder * folders


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--files", type=int, default=100_000)
    parser.add_argument("--folders", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--root", default="/tmp/scan_tree")
    args = parser.parse_args()
    start = time.perf_counter()
    total = make_tree(args.root, args.files, args.folders)
    print(f"tree: {total} files in {args.folders} folders of 2 levels under {args.root} "
          f"(made or checked in {time.perf_counter() - start:.1f} s)")
    scanners = {"common.ImageFiles": lambda: len(common.ImageFiles(args.root)),
                "torchvision ImageFolder": lambda: len(datasets.ImageFolder(args.root))}
    times = {name: [] for name in scanners}
    for _ in range(args.repeats):
        for name, scan in scanners.items():
            start = time.perf_counter()
            found = scan()
            times[name].append(time.perf_counter() - start)
            assert found == total, (name, found, total)
    for name, t in times.items():
        print(f"{name:24s} median {statistics.median(t):.3f} s  min {min(t):.3f} s  over {args.repeats} scans of "
              f"{total} files ({total / statistics.median(t) / 1e3:.0f}k files/s)")


if __name__ == "__main__":
    main()
