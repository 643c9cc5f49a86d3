"""The user's run: what a new user does with real data, measured as whole processes.

Workloads (real images from ../shared/data; nothing noise-perturbed):

- ``magnetic_tile``: the 761 normal training images sorted by name, every 10th held out for
  calibration (76, interleaved over the acquisition sessions, not the last ones by name), the
  other 685 indexed; all 583 test images scored.
- ``large``: an MVTec-layout category of 900x900 images made from magnetic_tile (each image
  upscaled with INTER_CUBIC, masks with INTER_NEAREST; there is no other 900x900 data here):
  200 normals indexed, 20 held out, 60 test images interleaved over the defect classes.

Each step is one ``spade-faiss`` process with default settings (maps for every image,
overlays, the HTML report; ``--weights none``: no ImageNet weights can be downloaded here, and
the random-init model has the same shapes and costs): ``index``, ``calibrate``, ``score``
(the whole test set), then ``score`` with the default engine and with ``--stage2 faiss`` on the
first 24 test images (a quick ratio: a fresh process's start and first gallery reads weigh on 24
images), ``--search fast`` on the whole test set with its fidelity to the exact maps (pixel
AUROC, AU-PRO, per-image map Spearman), and last ``--stage2 faiss`` on the whole test set: the
ratio the README quotes, the user's workload in both engines, in the same run (the longest step:
~13 minutes of the magnetic_tile workload on a 2-core machine). Per
step: wall seconds, seconds per image, images/s, peak RSS of that process (``wait4``), and for
``score`` the library's own per-stage seconds, bytes read and pruning (run.json). The
machine's kernel rates are measured in the same run. JSON lines on stdout (and ``--out``/user_run.jsonl), a PNG plot.

    python benchmarks/bench_user_run.py --out /tmp/user_run                 # both workloads
    python benchmarks/bench_user_run.py --out /tmp/user_run --workloads magnetic_tile
    python benchmarks/bench_user_run.py --out /tmp/ur --quick                # 60/12/24 images, minutes
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import DATA, emit_to, machine, process  # noqa: E402

JSONL = "user_run.jsonl"

SUBSET = 24
HELD_OUT_EVERY = 10


def spade(*args) -> list[str]:
    return [sys.executable, "-m", "spade_faiss", *map(str, args)]


def split_normals(train: list[str]) -> tuple[list[str], list[str]]:
    """(indexed, held out): every 10th of the normals sorted by name is held out."""
    train = sorted(train)
    held = train[HELD_OUT_EVERY - 1::HELD_OUT_EVERY]
    chosen = set(held)
    return [p for p in train if p not in chosen], held


def interleaved_test(root: Path) -> list[str]:
    from spade_faiss.datasets import discover

    by_class: dict[str, list] = {}
    for s in discover(root, split="test"):
        by_class.setdefault(s.defect, []).append(s.path)
    return [c[i] for i in range(max(map(len, by_class.values()))) for c in by_class.values() if i < len(c)]


def make_large(src: Path, out: Path, size: int, n_train: int, n_test: int) -> Path:
    """An MVTec-layout category of ``size`` x ``size`` images upscaled from ``src`` (see above)."""
    import cv2

    root = out / f"magnetic_tile_{size}"
    if (root / "train" / "good").is_dir():
        return root
    from spade_faiss.datasets import discover

    train = sorted(s.path for s in discover(src, split="train"))
    step = max(1, len(train) // n_train)
    picks = {"train/good": train[::step][:n_train]}
    test = [s for s in discover(src, split="test")]
    by_class: dict[str, list] = {}
    for s in test:
        by_class.setdefault(s.defect, []).append(s)
    order = [c[i] for i in range(max(map(len, by_class.values()))) for c in by_class.values() if i < len(c)]
    for s in order[:n_test]:
        picks.setdefault(f"test/{s.defect}", []).append(s.path)
        if s.mask:
            picks.setdefault(f"ground_truth/{s.defect}", []).append(s.mask)
    for folder, paths in picks.items():
        (root / folder).mkdir(parents=True, exist_ok=True)
        nearest = folder.startswith("ground_truth")
        for p in paths:
            img = cv2.imread(p, cv2.IMREAD_UNCHANGED)
            big = cv2.resize(img, (size, size), interpolation=cv2.INTER_NEAREST if nearest else cv2.INTER_CUBIC)
            cv2.imwrite(str(root / folder / (Path(p).stem + ".png")), big)
    return root


def write_list(path: Path, paths: list[str]) -> Path:
    path.write_text("\n".join(paths) + "\n")
    return path


def score_details(run: Path) -> dict:
    last = json.loads((run / "run.json").read_text())["runs"][-1]
    return {k: last[k] for k in ("stage_seconds", "bytes_read", "pruning") if k in last}


STEPS = ("index", "calibrate", "score", "score_subset_default", "score_subset_faiss", "score_fast", "score_faiss")


def fidelity(root: Path, exact_run: Path, fast_run: Path) -> dict:
    """``--search fast`` against the exact default, both runs over the whole test set: pixel
    AUROC and AU-PRO of each (ground-truth masks at the maps' crop), and the Spearman rank
    correlation of each image's fast map with its exact map (median, 5th percentile)."""
    import h5py
    import numpy as np
    from scipy.stats import spearmanr

    from spade_faiss import images, metrics, tiles
    from spade_faiss.datasets import discover

    def maps(run):
        with h5py.File(run / "maps.h5", "r") as f:
            return {p.decode() if isinstance(p, bytes) else str(p): i for i, p in enumerate(f["path"][:])}, f["maps"][:]

    (rows_e, maps_e), (rows_f, maps_f) = maps(exact_run), maps(fast_run)
    samples = [s for s in discover(root, split="test") if s.path in rows_e and s.path in rows_f]
    crop = maps_e.shape[-1]
    masks, exact, fast = [], [], []
    for s in samples:
        masks.append(images.load_mask(s.mask, tiles.image_size(s.path), crop=crop))  # the header's size
        exact.append(maps_e[rows_e[s.path]])
        fast.append(maps_f[rows_f[s.path]])
    masks, exact, fast = np.stack(masks), np.stack(exact), np.stack(fast)
    rho = np.array([spearmanr(e.ravel(), f.ravel())[0] for e, f in zip(exact, fast)])
    return {"images": len(samples), "pixel_auroc_exact": round(metrics.pixel_auroc(masks, exact), 4),
            "pixel_auroc_fast": round(metrics.pixel_auroc(masks, fast), 4),
            "au_pro_exact": round(metrics.au_pro(masks, exact), 4),
            "au_pro_fast": round(metrics.au_pro(masks, fast), 4),
            "map_spearman_median": round(float(np.median(rho)), 4),
            "map_spearman_p05": round(float(np.percentile(rho, 5)), 4)}


def workload(name: str, root: Path, out: Path, n_index: int | None, n_held: int | None, n_test: int | None,
             extra: list[str], only: tuple = STEPS, keep: bool = False) -> dict:
    from spade_faiss.datasets import discover

    work = out / name
    work.mkdir(parents=True, exist_ok=True)
    indexed, held = split_normals([s.path for s in discover(root, split="train")])
    indexed, held = indexed[:n_index], held[:n_held]
    test = interleaved_test(root)[:n_test]
    lists = {k: write_list(work / f"{k}.txt", v) for k, v in
             (("indexed", indexed), ("held_out", held), ("test", test), ("subset", test[:SUBSET]))}
    store = work / "corpus.h5"
    for f in (store, Path(f"{store}.appends")) if "index" in only else ():
        if f.is_file():
            f.unlink()
    common = ["--weights", "none", *extra]
    steps = [("index", spade("index", lists["indexed"], "--out", store, *common), len(indexed)),
             ("calibrate", spade("calibrate", store, lists["held_out"], *common), len(held)),
             ("score", spade("score", store, lists["test"], "--out", work / "run", "--restart", *common), len(test)),
             ("score_subset_default", spade("score", store, lists["subset"], "--out", work / "run_subset",
                                            "--restart", *common), min(SUBSET, len(test))),
             ("score_subset_faiss", spade("score", store, lists["subset"], "--out", work / "run_faiss", "--restart",
                                          "--stage2", "faiss", *common), min(SUBSET, len(test))),
             ("score_fast", spade("score", store, lists["test"], "--out", work / "run_fast", "--restart",
                                  "--search", "fast", *common), len(test)),
             ("score_faiss", spade("score", store, lists["test"], "--out", work / "run_faiss_all", "--restart",
                                   "--stage2", "faiss", *common), len(test))]
    seconds = {}
    for step, cmd, n in steps:
        if step not in only:
            continue
        rec = process(cmd, work / f"{step}.log")
        seconds[step] = rec["seconds"]
        details = {}
        if step.startswith("score"):
            run = Path(cmd[cmd.index("--out") + 1])
            details = score_details(run)
            if "stage_seconds" in details:
                details["stage_s_per_image"] = {k: round(v / n, 4) for k, v in details.pop("stage_seconds").items()}
        emit_to(out / JSONL, bench="user_run", workload=name, step=step, images=n, **rec,
             s_per_image=round(rec["seconds"] / n, 3), images_per_s=round(n / rec["seconds"], 3), **details)
    ratios = {key: round(seconds[slow] / seconds[fast], 2) for key, slow, fast in
              (("faiss_over_default", "score_faiss", "score"),
               ("faiss_over_default_subset", "score_subset_faiss", "score_subset_default"))
              if {slow, fast} <= set(seconds)}
    if ratios:
        emit_to(out / JSONL, bench="user_run", workload=name, step="ratio", **ratios,
                corpus_bytes=store.stat().st_size, corpus_images=len(indexed))
    if {"score", "score_fast"} <= set(seconds):
        emit_to(out / JSONL, bench="user_run", workload=name, step="fast_fidelity",
                fast_over_exact_speedup=round(seconds["score"] / seconds["score_fast"], 2),
                **fidelity(root, work / "run", work / "run_fast"))
    if not keep:
        store.unlink()
    return seconds


def plot(out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(x) for x in (out / "user_run.jsonl").read_text().splitlines()]
    rows = [r for r in rows if r.get("bench") == "user_run" and "s_per_image" in r]
    if not rows:
        return
    fig, (a, b) = plt.subplots(1, 2, figsize=(12, 1.2 + 0.32 * len(rows)))  # a readable line per bar
    labels = [f"{r['workload']}: {r['step']}" for r in rows]
    a.barh(labels, [r["s_per_image"] for r in rows])
    a.set_xlabel("seconds per image (whole process)")
    b.barh(labels, [r["peak_rss_mb"] / 1024 for r in rows])
    b.set_xlabel("peak RSS (GiB)")
    b.set_yticklabels([])
    fig.tight_layout()
    fig.savefig(out / "user_run.png", dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, help="folder for corpora, runs, logs, user_run.jsonl and the plot")
    ap.add_argument("--data", default=str(DATA), help="the magnetic_tile category (MVTec layout)")
    ap.add_argument("--workloads", nargs="*", default=["magnetic_tile", "large"], help="magnetic_tile and/or large")
    ap.add_argument("--quick", action="store_true", help="60 normals, 12 held out, 24 test images per workload")
    ap.add_argument("--steps", nargs="*", default=list(STEPS), choices=STEPS,
                    help="only these steps (the later ones reuse the corpus a run with --keep left in --out)")
    ap.add_argument("--keep", action="store_true", help="keep each workload's corpus (for a later --steps run)")
    ap.add_argument("--extra", nargs=argparse.REMAINDER, default=[], help="options passed to every command")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    data = Path(args.data).resolve()  # a list's relative paths are read from its own folder
    if not data.is_dir():
        sys.exit(f"{data}: no magnetic_tile data here (this benchmark runs on real images only)")
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from bench_score import kernel_rates

    emit_to(out / JSONL, bench="user_run", step="machine", **machine(), kernels_gflops=kernel_rates())
    q = args.quick
    if "magnetic_tile" in args.workloads:
        workload("magnetic_tile", data, out, 60 if q else None, 12 if q else None, 24 if q else None, args.extra,
                 tuple(args.steps), args.keep)
    if "large" in args.workloads:
        root = make_large(data, out / "data", 900, 230, 60)
        workload("large_900", root, out, 60 if q else None, 12 if q else 20, 24 if q else 60, args.extra,
                 tuple(args.steps), args.keep)
    plot(out)


if __name__ == "__main__":
    main()
