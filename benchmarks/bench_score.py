"""Scoring benchmark: end-to-end marginal time per image of `spade-faiss score` (default engine
`auto`) against the float32 brute-force floor and `--stage2 faiss`, in the default environment
and with the OPENBLAS variables unset; per level, the stage-2 time, effective GFLOP/s and
fraction pruned of each engine (pruned, dense, faiss) for K in --ks and concat mode.
A stage table (``step="stages"``): seconds per image of decoding and resizing, the backbone,
stage 1, gallery reads, each stage-2 level (with its fraction pruned), map assembly and
smoothing, the run files with and without overlays, and the report. ``--size 900`` scores
the same images as MVTec-style 900x900 RGB parts (upscaled copies written under --out).
Prints JSON lines; writes only under --out.

    .venv/bin/python benchmarks/bench_score.py --out bench-out             # 60 normal + 12 test real images
    .venv/bin/python benchmarks/bench_score.py --out bench-out --size 900  # the same as 900x900 RGB parts
    .venv/bin/python benchmarks/bench_score.py --out bench-out --quick     # small backbone, generated data
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import faiss
import numpy as np
import torch

sys.path.insert(0, os.path.dirname(__file__))
from common import dataset_images, emit, machine  # noqa: E402

from spade_faiss import Spade, patch_search  # noqa: E402
from spade_faiss.apps.allocator import keep_freed_memory  # noqa: E402

OPENBLAS_VARS = ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE")


def best_of(fn, repeat: int = 3) -> float:
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def kernel_rates(m: int = 3136, n: int = 15680, k: int = 256) -> dict:
    """GFLOP/s of one stage-2 block product (layer1 shape) on every kernel available here."""
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((m, k), dtype=np.float32), rng.standard_normal((n, k), dtype=np.float32)
    flop = 2 * m * n * k / 1e9
    out = np.empty((m, n), np.float32)
    ta, tb = torch.from_numpy(a), torch.from_numpy(b)
    to = torch.empty(m, n)
    ha, hb, ho = ta.bfloat16(), tb.bfloat16(), torch.empty(m, n, dtype=torch.bfloat16)
    rates = {"numpy_float32": flop / best_of(lambda: np.matmul(a, b.T, out=out)),
             "torch_float32": flop / best_of(lambda: torch.mm(ta, tb.T, out=to)),
             "torch_bfloat16": flop / best_of(lambda: torch.mm(ha, hb.T, out=ho)),
             "faiss_knn": flop / best_of(lambda: faiss.knn(a, b, 1))}
    return {key: round(v, 1) for key, v in rates.items()}


def kernel_rates_in(env: dict) -> dict:
    """:func:`kernel_rates` measured in a fresh process with ``env`` (OpenBLAS reads its
    variables at start-up)."""
    out = subprocess.run([sys.executable, __file__, "--kernels-only"], env=env, capture_output=True, text=True,
                         check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def cli(*args, env=None) -> tuple[float, float | None]:
    """Wall seconds and peak RSS (MB, when GNU time is there) of one `spade-faiss` process."""
    cmd = [sys.executable, "-m", "spade_faiss", *map(str, args)]
    timer = shutil.which("time") or ("/usr/bin/time" if os.path.exists("/usr/bin/time") else None)
    if timer:
        cmd = [timer, "-f", "%M"] + cmd
    t = time.perf_counter()
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t
    if done.returncode:
        sys.exit(f"{' '.join(cmd)} failed:\n{done.stderr[-2000:]}")
    rss = float(done.stderr.strip().splitlines()[-1]) / 1024 if timer else None
    return wall, rss


def end_to_end(store: Path, test: list[str], out: Path, backbone_s: float, floor_gflop: float,
               envs: tuple, repeat: int) -> None:
    """The CLI's score time for len(test) images minus its time for one, per extra image (each
    the fastest of ``repeat`` fresh processes: this machine's speed drifts between runs)."""
    lists = {}
    for n in (1, len(test)):
        lists[n] = out / f"test{n}.txt"
        lists[n].write_text("\n".join(test[:n]))
    for env_name in envs:
        env = dict(os.environ)
        if env_name == "openblas_unset":
            for var in OPENBLAS_VARS:
                env.pop(var, None)
        walls = {}
        rates = kernel_rates_in(env)
        emit(bench="score", step="kernels", env=env_name, gflops_per_s=rates)
        for stage2 in ("auto", "auto_float32_bounds", "faiss"):
            # auto_float32_bounds: the default engines with float32 bound GEMMs, as on a CPU
            # without native bfloat16 (the variable skips the start-up measurement).
            run_env = dict(env, SPADE_FAISS_BOUND_DTYPE="float32") if stage2 == "auto_float32_bounds" else env
            engine = stage2.removesuffix("_float32_bounds")
            runs = {n: min(cli("score", store, lists[n], "--out", out / f"run_{stage2}_{n}", "--restart", "--device",
                               "cpu", "--stage2", engine, env=run_env) for _ in range(repeat)) for n in lists}
            n = len(test)
            marginal = (runs[n][0] - runs[1][0]) / (n - 1)
            walls[stage2] = marginal
            floor = backbone_s + floor_gflop / max(rates["numpy_float32"], rates["torch_float32"], rates["faiss_knn"])
            emit(bench="score", step="end_to_end", env=env_name, stage2=stage2, images=n,
                 seconds_1=round(runs[1][0], 2), seconds_n=round(runs[n][0], 2),
                 marginal_s_per_image=round(marginal, 3), float32_floor_s=round(floor, 3),
                 ratio_to_floor=round(marginal / floor, 3), peak_rss_mb=runs[n][1] and round(runs[n][1]))
        emit(bench="score", step="speedup", env=env_name, faiss_over_auto=round(walls["faiss"] / walls["auto"], 2),
             faiss_over_auto_float32_bounds=round(walls["faiss"] / walls["auto_float32_bounds"], 2))


def per_level(store: Path, test: list[str], ks: list[int], concat_k: int) -> None:
    """Stage-2 seconds per image and level, each engine, same process, warm caches; ``auto``
    names the engine the default picks for that level."""
    configs = [("per_level", k) for k in ks] + ([("concat", concat_k)] if concat_k else [])
    for mode, k in configs:
        queries = test if mode == "per_level" else test[:2]
        times = {}
        for stage2 in ("pruned", "dense", "faiss"):
            spade = Spade.open(store, device="cpu", stage2=stage2, k_gallery=k, k_image=min(5, k), pixel_mode=mode)
            spade.score(queries[:1])  # warm: model, caches, projections
            spade.timings_.clear()
            spade.score(queries)
            shapes = spade.info()["levels"]
            names = ["concat"] if mode == "concat" else list(shapes)
            for name in names:
                h, w, c = shapes["layer1"][:2] + [sum(s[2] for s in shapes.values())] if name == "concat" \
                    else shapes[name]
                gflop = 2 * (h * w) * (k * h * w) * c / 1e9
                sec = spade.timings_[f"stage2.{name}"] / len(queries)
                times[(stage2, name)] = sec
                row = dict(bench="score", step="stage2", stage2=stage2, mode=mode, k_gallery=k, level=name,
                           images=len(queries), seconds_per_image=round(sec, 4), brute_force_gflop=round(gflop, 2),
                           effective_gflops_per_s=round(gflop / sec, 1),
                           auto=patch_search.level_engine("auto", "cpu", (h, w, c), k))
                if stage2 == "pruned":
                    row["fraction_pruned"] = spade.pruning_stats_[name]["pruned"]
                else:
                    row["pruned_speedup"] = round(sec / times[("pruned", name)], 2)
                emit(**row)
            spade.close()


def as_large(paths: list[str], out: Path, size: int) -> list[str]:
    """RGB copies of ``paths`` at ``size`` x ``size`` (bicubic), in the same folder layout."""
    import cv2

    done = []
    for p in paths:
        q = out / f"large{size}" / Path(p).parent.name / (Path(p).stem + ".png")
        if not q.exists():
            q.parent.mkdir(parents=True, exist_ok=True)
            img = cv2.imread(p, cv2.IMREAD_COLOR)
            cv2.imwrite(str(q), cv2.resize(img, (size, size), interpolation=cv2.INTER_CUBIC))
        done.append(str(q))
    return done


def stage_table(store: Path, test: list[str], out: Path, size: int | None) -> None:
    """Where one image's time goes when `score` runs it, stage by stage, same process, warm."""
    from spade_faiss import images
    from spade_faiss.apps.report import write_report
    from spade_faiss.apps.runs import RunDir, colour_scale

    with Spade.open(store, device="cpu") as spade:
        spade.score(test[:1])  # warm: model, caches, projections
        t = time.perf_counter()
        for p in test:
            images.prepare(p, spade.resize, spade.crop)
        decode = (time.perf_counter() - t) / len(test)
        spade.timings_.clear()
        t = time.perf_counter()
        results = list(spade.iter_score(test, maps=True))
        scoring = (time.perf_counter() - t) / len(test)
        stages = {k: v / len(test) for k, v in spade.timings_.items()}
        pruned = {k: v["pruned"] for k, v in spade.pruning_stats_.items()}
        scale = colour_scale(spade)
        files = {}
        for overlays in (False, True):
            run = RunDir(out / f"stages_run_{overlays}")
            if run.path.exists():
                run.clear()
            writer = run.writer(spade.crop, spade.resize, colour_max=scale if overlays else None, theta=spade.theta_)
            t = time.perf_counter()
            for r in results:
                writer.write([r])
            files[overlays] = (time.perf_counter() - t) / len(test)
        t = time.perf_counter()
        write_report(run.path)
        report = (time.perf_counter() - t) / len(test)
    emit(bench="score", step="stages", size=size or "original", images=len(test),
         decode_and_resize_s=round(decode, 4), scoring_loop_s=round(scoring, 4),
         **{f"{k}_s": round(v, 4) for k, v in sorted(stages.items())},
         fraction_pruned=pruned, run_files_no_overlays_s=round(files[False], 4),
         overlays_s=round(files[True] - files[False], 4), report_s=round(report, 4))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="bench-out", help="folder for corpora and runs (created)")
    ap.add_argument("--n-train", type=int, default=60)
    ap.add_argument("--n-test", type=int, default=12)
    ap.add_argument("--ks", default="5,10,50")
    ap.add_argument("--concat-k", type=int, default=10, help="0: no concat row")
    ap.add_argument("--backbone", default="wide_resnet50_2")
    ap.add_argument("--repeat", type=int, default=3, help="fresh processes per end-to-end timing (the fastest)")
    ap.add_argument("--size", type=int, default=None, help="score the images as SIZE x SIZE RGB parts (e.g. 900)")
    ap.add_argument("--stages-only", action="store_true", help="the stage table only (no end-to-end runs)")
    ap.add_argument("--kernels-only", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--quick", action="store_true", help="resnet18, generated data, 12 + 3 images, K=5, one run")
    args = ap.parse_args()
    if args.kernels_only:
        print(json.dumps(kernel_rates()))
        return
    envs = ("default", "openblas_unset")
    if args.quick:
        args.backbone, args.n_train, args.n_test, args.ks, args.concat_k = "resnet18", 12, 3, "5", 0
        args.repeat, envs = 1, ("default",)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    train, test, source = dataset_images(out, args.n_train, args.n_test, generated=args.quick)
    if args.size:
        train, test, source = as_large(train, out, args.size), as_large(test, out, args.size), f"{source}{args.size}"
    store = out / f"score_{args.backbone}_{source}_{args.n_train}.h5"
    if not store.exists():
        (out / "train.txt").write_text("\n".join(train))
        cli("index", out / "train.txt", "--out", store, "--weights", "none", "--backbone", args.backbone,
            "--device", "cpu")
    emit(bench="score", step="machine", data=source, **machine())
    keep_freed_memory()  # as the CLI does: the stage table and the floor then run as `score` does
    stage_table(store, test, out, args.size)
    if args.stages_only:
        return
    with Spade.open(store, device="cpu", k_gallery=min(50, args.n_train)) as spade:
        spade.score(test[:1], maps=False)
        backbone_s = float("inf")
        for _ in range(3):  # the fastest pass: the floor must not be inflated by this machine's noise
            spade.timings_.clear()
            spade.score(test, maps=False)
            backbone_s = min(backbone_s, spade.timings_["backbone"] / len(test))
        shapes = spade.info()["levels"]
    floor_gflop = sum(2 * (h * w) * (50 * h * w) * c / 1e9 for h, w, c in shapes.values())
    emit(bench="score", step="floor", backbone_s_per_image=round(backbone_s, 3),
         brute_force_gflop_k50=round(floor_gflop, 1))
    end_to_end(store, test, out, backbone_s, floor_gflop, envs, args.repeat)
    per_level(store, test, [int(k) for k in args.ks.split(",")], args.concat_k)


if __name__ == "__main__":
    main()
