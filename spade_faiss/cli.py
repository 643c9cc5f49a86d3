"""``spade-faiss`` command line: index, reindex, info, score.

Exit status: 0 success; 1 error (one line on stderr naming the file or value); 3 finished but
some inputs were skipped (each listed with its reason).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
import warnings
from pathlib import Path

from . import __version__

EXIT_ERROR = 1
EXIT_PARTIAL = 3


def _weights(value: str):
    return None if value in ("none", "random") else value


def _add_feature_args(p: argparse.ArgumentParser, defaults: bool):
    d = (lambda v: v) if defaults else (lambda v: None)
    p.add_argument("--backbone", default=d("wide_resnet50_2"),
                   help="wide_resnet50_2 | wide_resnet101_2 | resnet18 | resnet50")
    p.add_argument("--weights", default="imagenet", type=_weights,
                   help="'imagenet' (torch hub cache, downloaded if missing), a local state_dict file, "
                        "or 'none' for seeded random init")
    p.add_argument("--seed", type=int, default=0, help="seed of the random init (--weights none)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda[:N]")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--workers", type=int, default=2, help="image decoding threads")
    p.add_argument("--resize", type=int, default=d(256))
    p.add_argument("--crop", type=int, default=d(224))


def _add_engine_args(p: argparse.ArgumentParser):
    p.add_argument("--engine", default="local", choices=["local", "ray"], help="'ray' needs the 'ray' extra")
    p.add_argument("--ray-workers", type=int, default=2, help="Ray actors (--engine ray)")
    p.add_argument("--ray-address", help="join an existing Ray cluster (default: start a local one)")
    p.add_argument("--gpus-per-worker", type=float, default=0.0, help="GPU share of each Ray actor")


def _add_scoring_args(p: argparse.ArgumentParser):
    p.add_argument("--k-image", type=int, help="default: min(5, --k-gallery)")
    p.add_argument("--k-gallery", type=int, default=50)
    p.add_argument("--kappa", type=int, default=1)
    p.add_argument("--pixel-mode", default="per_level", choices=["per_level", "concat"])
    p.add_argument("--sigma", type=float, default=4.0)
    p.add_argument("--nprobe", type=int)


def _scoring_params(args) -> dict:
    params = dict(weights=args.weights, seed=args.seed, device=args.device, batch_size=args.batch_size,
                  workers=args.workers, k_gallery=args.k_gallery, kappa=args.kappa,
                  k_image=args.k_image if args.k_image is not None else min(5, args.k_gallery),
                  pixel_mode=args.pixel_mode, sigma=args.sigma, nprobe=args.nprobe)
    params.update({k: v for k, v in dict(backbone=args.backbone, resize=args.resize, crop=args.crop).items()
                   if v is not None})
    return params


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="spade-faiss",
                                 description="SPADE anomaly detection over faiss-indexed HDF5 corpora")
    ap.add_argument("--version", action="version", version=__version__)
    ap.add_argument("-v", "--verbose", action="store_true")
    sub = ap.add_subparsers(dest="command", required=True)

    p = sub.add_parser("index", help="index normal images into a corpus file (appends new images only)")
    p.add_argument("src", help="a folder, a text file of paths, or an MVTec category (uses train/good)")
    p.add_argument("--out", required=True, help="corpus file, e.g. indexes/NAME.h5")
    _add_feature_args(p, defaults=True)
    p.add_argument("--dtype", default="float16", choices=["float16", "float32"])
    p.add_argument("--index", default="auto", choices=["auto", "flat", "ivf"])
    p.add_argument("--nlist", type=int)
    p.add_argument("--nprobe", type=int)
    _add_engine_args(p)

    p = sub.add_parser("reindex", help="rebuild and retrain the image index of a corpus")
    p.add_argument("store")
    p.add_argument("--index", default="auto", choices=["auto", "flat", "ivf"])
    p.add_argument("--nlist", type=int)
    p.add_argument("--nprobe", type=int)
    p.add_argument("--encoding", default="Flat", help="IVF list encoding: Flat, SQ8, PQ{m}")

    p = sub.add_parser("calibrate", help="set image/pixel thresholds from held-out normal images")
    p.add_argument("store")
    p.add_argument("src", help="held-out normal images: a folder, a list file, or an MVTec category (train/good)")
    _add_feature_args(p, defaults=False)
    _add_scoring_args(p)
    p.add_argument("--fpr", type=float, default=0.01, help="false-positive rate on normal images and pixels")

    p = sub.add_parser("evaluate", help="paper-style evaluation of MVTec-layout categories")
    p.add_argument("dataset", help="a dataset root with categories, or one category")
    p.add_argument("--categories", nargs="*")
    p.add_argument("--out", required=True, help="run directory (corpora are built or reused there)")
    _add_feature_args(p, defaults=True)
    _add_scoring_args(p)
    p.add_argument("--dtype", default="float16", choices=["float16", "float32"])
    p.add_argument("--fpr", type=float, default=0.01)

    p = sub.add_parser("bench", help="run the benchmark scripts of benchmarks/ (JSON lines on stdout)")
    p.add_argument("which", nargs="*", default=list(BENCHES), help=f"any of {list(BENCHES)} (default: all)")
    p.add_argument("--quick", action="store_true", help="small sizes: a minute or two in all")

    p = sub.add_parser("verify", help="check a corpus file's integrity; non-zero exit on any problem")
    p.add_argument("store")
    p.add_argument("--rehash", action="store_true", help="re-hash the source images and compare")
    p.add_argument("--deep", action="store_true", help="read every level row")

    p = sub.add_parser("serve", help="online scoring over HTTP (needs the 'serve' extra)")
    p.add_argument("store")
    p.add_argument("--host", default="127.0.0.1", help="default loopback only")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--token-file", help="file holding the bearer token required by every endpoint but /v1/health")
    p.add_argument("--max-upload-mb", type=float, default=32)
    p.add_argument("--max-pixels", type=int, default=50_000_000)
    p.add_argument("--timeout", type=float, default=30.0, help="per-request seconds")
    p.add_argument("--queue-size", type=int, default=64)
    p.add_argument("--max-batch", type=int, default=8)
    p.add_argument("--batch-window-ms", type=float, default=5.0)
    _add_feature_args(p, defaults=False)
    _add_scoring_args(p)

    p = sub.add_parser("info", help="print a corpus file's metadata")
    p.add_argument("store")

    p = sub.add_parser("score", help="score images against a corpus: scores.csv, maps.h5, overlays")
    p.add_argument("store")
    p.add_argument("src", help="a folder, a text file of paths, or an MVTec category (uses test/)")
    p.add_argument("--out", required=True, help="run directory")
    _add_feature_args(p, defaults=False)
    _add_scoring_args(p)
    p.add_argument("--segment", default="all", choices=["all", "anomalous"],
                   help="'anomalous': pixel maps only for images above the image threshold")
    p.add_argument("--tau", type=float, help="image threshold (default: the corpus's calibrated one)")
    p.add_argument("--theta", type=float, help="pixel threshold (default: the corpus's calibrated one)")
    p.add_argument("--no-overlays", action="store_true")
    p.add_argument("--shard-index", type=int, default=0)
    p.add_argument("--num-shards", type=int, default=1)
    _add_engine_args(p)
    return ap


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    warnings.simplefilter("default")
    try:
        return COMMANDS[args.command](args)
    except KeyboardInterrupt:
        print("spade-faiss: interrupted; committed work is kept, re-run to resume", file=sys.stderr)
        return 130
    except (ValueError, FileNotFoundError, FileExistsError, OSError, RuntimeError) as e:
        print(f"spade-faiss: error: {str(e).splitlines()[0] if str(e) else type(e).__name__}", file=sys.stderr)
        return EXIT_ERROR


def _progress(total, desc):
    from tqdm import tqdm
    return tqdm(total=total, desc=desc, unit="img", file=sys.stderr, disable=None, dynamic_ncols=True)


def _report_errors(errors, what) -> int:
    if not errors:
        return 0
    print(f"spade-faiss: {len(errors)} input(s) {what}:", file=sys.stderr)
    for _, reason in errors:
        print(f"  {reason}", file=sys.stderr)
    return EXIT_PARTIAL


def cmd_index(args) -> int:
    from .detector import Spade
    from .images import discover

    samples = discover(args.src, split="train")
    params = dict(backbone=args.backbone, weights=args.weights, seed=args.seed, device=args.device,
                  batch_size=args.batch_size, resize=args.resize, crop=args.crop,
                  dtype=args.dtype, index=args.index, nlist=args.nlist, nprobe=args.nprobe)
    if args.engine == "ray":
        from .distributed import index_ray
        t = time.perf_counter()
        summary = index_ray([s.path for s in samples], args.out, params, args.ray_workers, args.batch_size,
                            args.ray_address, args.gpus_per_worker)
        errors = summary.pop("errors")
        print(json.dumps({**summary, "errors": len(errors), "seconds": round(time.perf_counter() - t, 2)}))
        return _report_errors(errors, "skipped")
    params["workers"] = args.workers
    created = not os.path.exists(args.out)
    spade = Spade.create(args.out, **params) if created else Spade.open(args.out, mode="a", **params)
    with spade, _progress(len(samples), "indexing") as bar:
        report = spade.add(samples, on_batch=bar.update)
        n, size = len(spade.store_), spade.store_.nbytes_on_disk()
    rate = report.added / report.seconds if report.seconds else 0.0
    print(json.dumps({"store": args.out, "added": report.added, "duplicates": report.duplicates,
                      "errors": len(report.errors), "images": n, "bytes": size,
                      "seconds": round(report.seconds, 2), "images_per_s": round(rate, 2)}))
    if report.added == 0 and report.duplicates == 0:
        if created:
            os.remove(args.out)
        print(f"spade-faiss: error: no image of {args.src} could be indexed", file=sys.stderr)
        _report_errors(report.errors, "skipped")
        return EXIT_ERROR
    return _report_errors(report.errors, "skipped")


def cmd_reindex(args) -> int:
    from .image_index import ImageIndex
    from .store import FeatureStore

    with FeatureStore.open(args.store, "a") as store:
        t = time.perf_counter()
        index = ImageIndex.build(store.pool(), args.index, args.nlist, args.nprobe, args.encoding)
        index.save(store)
        print(json.dumps({"store": args.store, **index.attrs(), "seconds": round(time.perf_counter() - t, 2)}))
    return 0


def cmd_info(args) -> int:
    from .image_index import ImageIndex
    from .store import FeatureStore

    with FeatureStore.open(args.store) as store:
        index = ImageIndex.load(store)
        attrs = store.attrs
        info = {"store": args.store, "format_version": int(attrs["format_version"]),
                "library_version": str(attrs.get("library_version")), "created": str(attrs.get("created")),
                "images": len(store), "bytes": store.nbytes_on_disk(), "config": store.config.feature_dict(),
                "levels": {k: list(v) for k, v in store.level_shapes.items()}, "pool_dim": store.pool_dim,
                "index": index.attrs() if index else None,
                "thresholds": json.loads(attrs["thresholds"]) if "thresholds" in attrs else None}
    print(json.dumps(info, indent=2))
    return 0


def cmd_score(args) -> int:
    from . import images as imglib
    from .detector import Spade
    from .runs import RunWriter, score_rows

    if not 0 <= args.shard_index < args.num_shards:
        raise ValueError(f"--shard-index {args.shard_index}: expected 0 <= i < --num-shards {args.num_shards}")
    samples = imglib.discover(args.src, split="test")[args.shard_index::args.num_shards]
    if args.engine == "ray":
        from .distributed import score_ray
        summary = score_ray(args.store, [s.path for s in samples], args.out, _scoring_params(args),
                            args.ray_workers, args.batch_size, not args.no_overlays, args.ray_address,
                            args.gpus_per_worker)
        errors = summary.pop("errors")
        print(json.dumps({**summary, "errors": len(errors)}))
        return _report_errors(errors, "skipped (see errors.*.csv)")
    spade = Spade.open(args.store, **_scoring_params(args))
    thresholds = spade.store_.thresholds() or {}
    if thresholds and args.tau is None:
        used = {k: getattr(spade, k) for k in thresholds.get("scoring", {})}
        if used != thresholds.get("scoring", used):
            print(f"spade-faiss: warning: thresholds were calibrated with {thresholds['scoring']}, "
                  f"scoring uses {used}", file=sys.stderr)
    tau = args.tau if args.tau is not None else thresholds.get("tau")
    theta = args.theta if args.theta is not None else thresholds.get("theta")
    if args.segment == "anomalous" and tau is None:
        raise ValueError("--segment anomalous needs an image threshold: run `spade-faiss calibrate` or pass --tau")
    writer = RunWriter(args.out, spade.crop, args.shard_index, args.num_shards, overlays=not args.no_overlays)
    todo = [s for s in samples if s.path not in writer.done and imglib.printable(s.path) not in writer.failed]
    errors = []
    with spade, _progress(len(samples), "scoring") as bar:
        bar.update(len(samples) - len(todo))
        paths = spade.store_.paths()
        for batch in imglib.iter_prepared(todo, spade.batch_size, spade.resize, spade.crop, spade.workers):
            result = spade.score_prepared(batch, segment=True if args.segment == "all" else float(tau))
            writer.write(*score_rows(spade, batch, result, tau, theta, not args.no_overlays, paths))
            writer.write_errors(result.errors)
            errors += result.errors
            bar.update(len(batch))
    print(json.dumps({"run": args.out, "scored": len(todo) - len(errors), "skipped_done": len(samples) - len(todo),
                      "errors": len(errors)}))
    return _report_errors(errors, "skipped (see errors.csv)")


# Script name and its --quick arguments.
BENCHES = {
    "patch_search": ("bench_patch_search.py", ["--ks", "5", "--modes", "per_level", "--repeat", "1"]),
    "image_index": ("bench_image_index.py", ["--sizes", "10000", "--queries", "50"]),
    "scaling": ("bench_scaling.py", ["--sizes", "100,1000", "--queries", "5"]),
    "index": ("bench_index.py", ["--backbone", "resnet18", "--throughput-n", "16", "--rss-ns", "50"]),
    "score": ("bench_score.py", ["--backbone", "resnet18", "--n-train", "10", "--n-test", "2", "--ks", "5"]),
}


def cmd_bench(args) -> int:
    import subprocess

    folder = Path(__file__).resolve().parent.parent / "benchmarks"
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: benchmarks/ ships with the source tree; run from a checkout")
    unknown = sorted(set(args.which) - set(BENCHES))
    if unknown:
        raise ValueError(f"unknown benchmark(s) {unknown}: expected any of {list(BENCHES)}")
    for name in args.which:
        script, quick = BENCHES[name]
        cmd = [sys.executable, str(folder / script)] + (quick if args.quick else [])
        print(f"# {' '.join(cmd)}", file=sys.stderr, flush=True)
        code = subprocess.call(cmd)
        if code:
            raise RuntimeError(f"{script} exited with status {code}")
    return 0


def cmd_verify(args) -> int:
    from .verify import verify

    problems = verify(args.store, rehash=args.rehash, deep=args.deep)
    for p in problems:
        print(f"spade-faiss: problem: {p}", file=sys.stderr)
    print(json.dumps({"store": args.store, "ok": not problems, "problems": len(problems)}))
    return EXIT_ERROR if problems else 0


def cmd_serve(args) -> int:
    from .detector import Spade
    from .serve import run

    token = None
    if args.token_file:
        token = Path(args.token_file).read_text().strip()
        if not token:
            raise ValueError(f"{args.token_file}: empty token file")
    spade = Spade.open(args.store, **_scoring_params(args))
    print(json.dumps({"serving": args.store, "url": f"http://{args.host}:{args.port}"}), flush=True)
    with spade:
        run(spade, args.host, args.port, token=token, max_upload_bytes=int(args.max_upload_mb * 2**20),
            max_pixels=args.max_pixels, timeout_s=args.timeout, queue_size=args.queue_size,
            max_batch=args.max_batch, batch_window_ms=args.batch_window_ms)
    return 0


def cmd_calibrate(args) -> int:
    from .detector import Spade
    from .evaluation import calibrate
    from .images import discover

    samples = discover(args.src, split="train")
    with Spade.open(args.store, mode="a", **_scoring_params(args)) as spade, \
            _progress(len(samples), "calibrating") as bar:
        th = calibrate(spade, samples, args.fpr, on_batch=bar.update)
    print(json.dumps({"store": args.store, **th}))
    return 0


def cmd_evaluate(args) -> int:
    from .evaluation import evaluate

    params = _scoring_params(args)
    params["dtype"] = args.dtype
    report = evaluate(args.dataset, args.out, args.categories, params, args.fpr, progress=None)
    print(Path(args.out, "table.md").read_text())
    print(json.dumps({"run": args.out, "mean": report["mean"]}))
    return 0


COMMANDS = {"index": cmd_index, "reindex": cmd_reindex, "info": cmd_info, "score": cmd_score,
            "calibrate": cmd_calibrate, "evaluate": cmd_evaluate, "bench": cmd_bench,
            "verify": cmd_verify, "serve": cmd_serve}


if __name__ == "__main__":
    sys.exit(main())
