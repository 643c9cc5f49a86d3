"""What each ``spade-faiss`` command does: parse results into Spade calls, print one JSON line
on stdout, report skipped inputs on stderr, return the exit status."""

from __future__ import annotations

import gc
import json
import os
import sys
import time
from pathlib import Path

from .. import datasets, temporal
from ..clock import utc_now
from ..config import PARAMS, SERVICE_DEFAULTS, Maps, check_values
from ..detector import Spade, describe, held_out_list
from ..metrics import check_fpr
from ..tiles import Tiling
from ..video import Sampling
from .progress import Progress

EXIT_ERROR = 1
EXIT_PARTIAL = 3


def spade_params(args) -> dict:
    """The Spade parameters among the parsed options (config.PARAMS), as given: an option left
    out is absent, and so takes the library's default or the corpus's own value."""
    return {k: getattr(args, k) for k in PARAMS if hasattr(args, k)}


def report_errors(errors, what: str) -> int:
    if not errors:
        return 0
    print(f"spade-faiss: {len(errors)} input(s) {what}:", file=sys.stderr)
    for _, reason in errors:
        print(f"  {reason}", file=sys.stderr)
    return EXIT_PARTIAL


def describe_source(src, split: str, samples) -> None:
    """One line on stderr when an MVTec category decides what is read."""
    if datasets.source_kind(src) == "category":
        part = "train/good" if split == "train" else "test/*"
        left = "test/ and ground_truth/ are" if split == "train" else "train/ is"
        print(f"spade-faiss: {src} is an MVTec category: using {part} ({len(samples)} images); {left} left out",
              file=sys.stderr)


def sampling(args) -> Sampling:
    """Which frames of a video source are items (the ``input`` options)."""
    return Sampling(args.frame_stride, args.start_s, args.end_s)


def tiling(args) -> Tiling:
    """Which tiles of an image are items (the ``input`` options)."""
    return Tiling(args.tile, args.tile_overlap)


def cmd_index(args) -> int:
    if not 0.0 <= args.hold_out < 1.0:
        raise ValueError(f"--hold-out {args.hold_out}: expected a fraction in [0, 1)")
    check_fpr(args.fpr)
    samples = datasets.discover(args.src, split="train", sampling=sampling(args), tiling=tiling(args))
    describe_source(args.src, "train", samples)
    held = []
    if args.hold_out:
        samples, held = datasets.hold_out(samples, args.hold_out, args.seed)
        if not held or not samples:
            raise ValueError(f"--hold-out {args.hold_out}: {len(held)} of {len(samples) + len(held)} images held out; "
                             f"both parts need at least one image")
        Path(held_out_list(args.out)).write_text("".join(s.path + "\n" for s in held))
        print(f"spade-faiss: holding out {len(held)} of {len(samples) + len(held)} normal images for calibration "
              f"({held_out_list(args.out)})", file=sys.stderr)
    params = spade_params(args)
    if args.backend == "ray":
        from .distributed import index_ray
        t = time.perf_counter()
        summary = index_ray([s.path for s in samples], args.out, params, args.ray_workers, args.batch_size,
                            args.ray_address, args.gpus_per_worker)
        errors = summary.pop("errors")
        print(json.dumps({**summary, "errors": len(errors), "seconds": round(time.perf_counter() - t, 2)}))
        return report_errors(errors, "skipped")
    created = not os.path.exists(args.out)
    spade = Spade.create(args.out, **params) if created else Spade.open(args.out, mode="a", **params).load_backbone()
    try:
        with spade, Progress(len(samples), "indexing") as bar:
            report = spade.add(samples, on_progress=bar.update)
            if spade.store_.writable and len(spade.paths_) >= 2 and spade.tau_ is None:
                spade.leave_one_out_theta()  # stored: the colour scale of later runs' pictures
            info = spade.info()
    except BaseException:
        if created and os.path.exists(args.out) and not _has_images(args.out):
            os.remove(args.out)
        raise
    rate = report.added / report.seconds if report.seconds else 0.0
    print(json.dumps({"store": args.out, "added": report.added, "duplicates": report.duplicates,
                      "errors": len(report.errors), "images": info["images"], "bytes": info["bytes"],
                      "seconds": round(report.seconds, 2), "images_per_s": round(rate, 2)}))
    if report.added == 0 and report.duplicates == 0:
        if created:
            os.remove(args.out)
        print(f"spade-faiss: error: no image of {args.src} could be indexed", file=sys.stderr)
        report_errors(report.errors, "skipped")
        return EXIT_ERROR
    status = report_errors(report.errors, "skipped")
    if held:
        calibrated = _calibrate(args.out, held, args.fpr, spade_params(args), args.event_s)
        status = max(status, calibrated)
    return status


def _has_images(path) -> bool:
    try:
        return describe(path)["images"] > 0
    except (ValueError, OSError):
        return False


def _image_index_params(args) -> dict:
    """The image index's parameters given to ``reindex`` and ``rollback`` (which rebuild it)."""
    return dict(index=args.index, nlist=args.nlist, nprobe=args.nprobe, encoding=args.encoding,
                target_recall=args.target_recall, seed=args.seed)


def cmd_reindex(args) -> int:
    with Spade.open(args.store, mode="a", **_image_index_params(args)) as spade:
        t = time.perf_counter()
        attrs = spade.reindex()
    print(json.dumps({"store": args.store, **attrs, "seconds": round(time.perf_counter() - t, 2)}))
    return 0


def cmd_remove(args) -> int:
    targets = list(args.images)
    if args.list:
        targets += datasets.list_file(args.list)
    with Spade.open(args.store, mode="a", device="cpu") as spade:
        info = spade.remove(targets)
    if info["pending"]:
        print(f"spade-faiss: {args.store} is being read: the removal is recorded beside it; readers stop retrieving "
              f"those images at their next refresh, and the next command with the corpus to itself rewrites it",
              file=sys.stderr)
    if info["thresholds_stale"]:
        print(f"spade-faiss: warning: {args.store}: its thresholds were calibrated with the removed images in the "
              f"corpus: recalibrate (`spade-faiss calibrate`)", file=sys.stderr)
    print(json.dumps(info, indent=2))
    return 0


def cmd_rollback(args) -> int:
    with Spade.open(args.store, mode="a", device="cpu", **_image_index_params(args)) as spade:
        info = spade.rollback(args.generation)
    if info["thresholds_stale"]:
        print(f"spade-faiss: warning: {args.store}: its thresholds were calibrated on another state of the corpus: "
              f"recalibrate (`spade-faiss calibrate`)", file=sys.stderr)
    print(json.dumps(info, indent=2))
    return 0


def cmd_convert(args) -> int:
    from ..detector import convert

    t = time.perf_counter()
    with Progress(describe(args.store)["images"], "converting") as bar:
        info = convert(args.store, args.out, args.storage, args.seed, on_progress=bar.update)
    print(json.dumps({"store": args.out, "images": info["images"], "storage": info["config"]["storage"],
                      "bytes_per_image": info["bytes_per_image"], "seconds": round(time.perf_counter() - t, 2)}))
    return 0


def cmd_info(args) -> int:
    print(json.dumps(describe(args.store), indent=2))
    return 0


def cmd_calibrate(args) -> int:
    check_fpr(args.fpr)  # before the model loads
    samples = datasets.discover(args.src, split="train", sampling=sampling(args), tiling=tiling(args))
    describe_source(args.src, "train", samples)
    return _calibrate(args.store, samples, args.fpr, spade_params(args), args.event_s)


def _calibrate(store, samples, fpr: float, params: dict, event_s: float) -> int:
    with Spade.open(store, mode="a", **params) as spade:
        spade.load_backbone()
        with Progress(len(samples), "calibrating") as bar:
            th = spade.calibrate(samples, fpr, on_progress=bar.update, event_s=event_s)
    spread = th["held_out_scores"]
    print(f"spade-faiss: held-out scores min {spread['min']:.4g}, quartiles {spread['q25']:.4g} / "
          f"{spread['median']:.4g} / {spread['q75']:.4g}, max {spread['max']:.4g}; tau {th['tau']:.4g}",
          file=sys.stderr)
    if "temporal" in th:
        t = th["temporal"]
        print(f"spade-faiss: temporal smoothing chosen on {t['frames']} held-out normal frames for events of "
              f"{t['event_s']:g} s ({t['event_frames']} sampled frames): sigma {t['sigma']:g} frames, "
              f"smoothed-score threshold {t['tau']:.4g}", file=sys.stderr)
    print(json.dumps({"store": str(store), **{k: v for k, v in th.items() if k != "skipped"}}))
    return report_errors([(None, e) for e in th["skipped"]], "skipped")


def cmd_score(args) -> int:
    from .allocator import release_freed_memory
    from .explain import TopExplained
    from .pictures import colour_scale
    from .runs import RunDir, run_manifest, score_into_run
    from .stitching import write_tiled
    from .stopping import stop_on_interrupt

    if not 0 <= args.shard_index < args.num_shards:
        raise ValueError(f"--shard-index {args.shard_index}: expected 0 <= i < --num-shards {args.num_shards}")
    samples = datasets.discover(args.src, split="test", sampling=sampling(args), tiling=tiling(args))
    describe_source(args.src, "test", samples)
    samples = samples[args.shard_index::args.num_shards]
    run = RunDir(args.out)
    spade = Spade.open(args.store, **spade_params(args))
    with spade:
        spade.set_thresholds(tau=args.tau, theta=args.theta)
        maps = Maps.from_cli(args.maps)
        if maps is Maps.AUTO and spade.tau_ is None:
            raise ValueError("--maps auto needs an image threshold: run `spade-faiss calibrate` or pass --tau")
        spade.load_backbone()
        run.open(run_manifest(spade, args.store, args.src, args.maps), args.restart)
        tau, theta, resize, calibration = spade.tau_, spade.theta_, spade.resize, spade.calibration_
        scale = None if args.no_overlays or maps is Maps.NONE else colour_scale(spade)
        writer = run.writer(spade.crop, spade.resize, args.shard_index, args.num_shards, colour_max=scale,
                            theta=spade.theta_)
        todo = [s for s in samples if not writer.is_done(s.path)]
        start, top = time.perf_counter(), TopExplained()
        with Progress(len(samples), "scoring", done=len(samples) - len(todo)) as bar, stop_on_interrupt() as stop:
            if args.backend == "ray":
                from .distributed import score_ray
                results = score_ray(args.store, todo, spade.get_params(), maps, args.ray_workers, args.batch_size,
                                    args.ray_address, args.gpus_per_worker, args.correspondences)
            else:
                results = spade.iter_score(todo, maps=maps, correspondences=args.correspondences)
            errors = score_into_run(results, writer, top.offer, on_progress=bar.update, check_stop=stop.check)
        top.write(run.explain, spade.paths_, spade.resize, spade.crop)
        work = {"stage_seconds": {k: round(v, 3) for k, v in spade.timings_.items()},
                "bytes_read": spade.bytes_read_, "pruning": spade.pruning_stats_,
                "memory": spade.memory_} if args.backend == "local" else {}
    del spade, results  # the model and galleries: the report's plotting reuses their memory
    gc.collect()
    release_freed_memory()
    summary = {"run": args.out, "scored": len(todo) - len(errors), "skipped_done": len(samples) - len(todo),
               "errors": len(errors)}
    sigma, frames_tau, sigma_from = temporal.in_force(args.temporal_sigma, calibration, tau, args.tau is not None)
    frames = run.write_frames(sigma, frames_tau)  # video frames: scores along each video, smoothed
    tiled = write_tiled(run, resize, tau, scale, theta)  # tiles: each image's largest tile score, stitched map
    run.record_invocation({**summary, **work, "seconds": round(time.perf_counter() - start, 2), "finished": utc_now(),
                           **({"frames": frames, "temporal_sigma": sigma, "temporal_sigma_from": sigma_from,
                               "frames_tau": frames_tau} if frames else {}),
                           **({"tiled_images": tiled, "tile": args.tile, "tile_overlap": args.tile_overlap}
                              if tiled else {})})
    if not args.no_report:
        from .report import write_report
        write_report(args.out)
    print(json.dumps(summary))
    return report_errors(errors, "skipped (see errors.csv)")


def cmd_evaluate(args) -> int:
    from .evaluation import evaluate
    from .runs import RunDir

    params = spade_params(args)
    if args.protocol == "stc":
        from .stc import evaluate_stc, table

        report = evaluate_stc(args.dataset, args.out, params, args.train_frames, args.test_stride)
        print(table(report))
        print(json.dumps({"run": args.out, **{k: report[k] for k in ("frame_AUROC", "pixel_AUROC")}}))
        return 0
    report = evaluate(args.dataset, args.out, args.categories, params, args.fpr, overlays=not args.no_overlays)
    print(RunDir(args.out).table.read_text())
    print(json.dumps({"run": args.out, "mean": report["mean"]}))
    return 0


def cmd_explain(args) -> int:
    from .explain import nearest_images, sheet
    from .pictures import save_png

    if not Path(args.image).is_file():
        raise FileNotFoundError(f"{args.image}: no such image")
    with Spade.open(args.store, **spade_params(args)) as spade:
        spade.load_backbone()
        result = next(spade.iter_score([args.image], maps=True, correspondences=True))
        if result.error:
            raise ValueError(result.error)
        save_png(args.out, sheet(result, spade.paths_, spade.resize, spade.crop))
        points = nearest_images(result, spade.paths_, spade.crop)
    print(json.dumps({"image": args.image, "score": result.score, "explanation": args.out, "points": points}))
    return 0


def cmd_watch(args) -> int:
    from .watch import watch

    summary = watch(args, spade_params(args))
    print(json.dumps(summary))
    if summary.get("source_error"):
        print(f"spade-faiss: error: {args.source}: {summary['source_error']}", file=sys.stderr)
        return EXIT_ERROR
    return 0


def cmd_report(args) -> int:
    from .report import write_report

    print(json.dumps({"report": str(write_report(args.run))}))
    return 0


def cmd_verify(args) -> int:
    from .verify import verify

    problems = verify(args.store, rehash=args.rehash, deep=args.deep, repair=args.repair)
    for p in problems:
        print(f"spade-faiss: problem: {p}", file=sys.stderr)
    print(json.dumps({"store": args.store, "ok": not problems, "problems": len(problems)}))
    return EXIT_ERROR if problems else 0


def _check_address(host: str, port: int) -> None:
    """Refuse an address this process cannot listen on (in use, not this machine's) before the
    models load, in one line."""
    import socket

    try:
        with socket.create_server((host, port)):
            pass
    except OSError as e:
        raise ValueError(f"cannot listen on {host}:{port} ({e.strerror or e}): choose another --port or "
                         f"--host") from None


def cmd_serve(args) -> int:
    import contextlib

    try:
        from .serve import run
        from .served import corpus_names, share_models
    except ImportError as e:
        raise ImportError(f"`serve` needs the 'serve' extra: pip install 'spade_faiss[serve]' "
                          f"({e.name} is missing)") from None
    limits = {name: getattr(args, name) for name in SERVICE_DEFAULTS}
    check_values(limits)  # before any model loads
    _check_address(limits["host"], limits["port"])
    token = None
    if args.token_file:
        if os.stat(args.token_file).st_mode & 0o077:
            print(f"spade-faiss: warning: {args.token_file} can be read by other users: chmod 600 it",
                  file=sys.stderr)
        token = Path(args.token_file).read_text().strip()
        if not token:
            raise ValueError(f"{args.token_file}: empty token file")
    named = corpus_names(args.store)
    with contextlib.ExitStack() as stack:
        spades = {name: stack.enter_context(Spade.open(path, **spade_params(args))) for name, path in named.items()}
        models = share_models(list(spades.values()))
        print(json.dumps({"serving": named, "models": models, "url": f"http://{args.host}:{args.port}"}), flush=True)
        host, port = limits.pop("host"), limits.pop("port")
        limits["max_upload_bytes"] = int(limits.pop("max_upload_mb") * 2**20)
        run(spades, host, port, token=token, **limits)
    return 0


# Script name and its --quick arguments (generated data, small sizes).
BENCHES = {
    "patch_search": ("bench_patch_search.py", ["--quick"]),
    "image_index": ("bench_image_index.py", ["--sizes", "10000", "--queries", "50"]),
    "scaling": ("bench_scaling.py", ["--quick"]),
    "index": ("bench_index.py", ["--quick"]),
    "score": ("bench_score.py", ["--quick"]),
    "serve": ("bench_serve.py", ["--quick"]),
    "ray": ("bench_ray.py", ["--quick"]),
    "locality": ("bench_locality.py", ["--quick"]),
}


def cmd_bench(args) -> int:
    import subprocess

    folder = Path(__file__).resolve().parents[2] / "benchmarks"
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: benchmarks/ ships with the source tree; run from a checkout")
    which = args.which or list(BENCHES)
    if which[0] == "compress" and len(which) != 3:
        raise ValueError("bench compress needs CORPUS HELD_OUT: a corpus file and held-out images "
                         "(an MVTec category's test/ gives AUROC and AU-PRO too)")
    unknown = sorted(set(which) - set(BENCHES)) if which[0] != "compress" else []
    if unknown:
        raise ValueError(f"unknown benchmark(s) {unknown}: expected any of {list(BENCHES)}")
    if args.out is None:  # made once the request is known to be sound: a refused one leaves nothing behind
        import tempfile

        args.out = tempfile.mkdtemp(prefix="spade-bench-")
        print(f"spade-faiss: benchmark files go to {args.out}", file=sys.stderr)
    if which[0] == "compress":
        cmd = [sys.executable, str(folder / "bench_compress.py"), "--corpus", which[1], "--held-out", which[2],
               "--out", args.out]
        return subprocess.call(cmd)
    os.makedirs(args.out, exist_ok=True)
    for name in which:
        script, quick = BENCHES[name]
        cmd = [sys.executable, str(folder / script), "--out", args.out] + (quick if args.quick else [])
        print(f"# {' '.join(cmd)}", file=sys.stderr, flush=True)
        code = subprocess.call(cmd)
        if code:
            raise RuntimeError(f"{script} exited with status {code} (its message is above)")
    return 0


COMMANDS = {"index": cmd_index, "remove": cmd_remove, "rollback": cmd_rollback,
            "reindex": cmd_reindex, "convert": cmd_convert, "info": cmd_info, "score": cmd_score,
            "calibrate": cmd_calibrate, "evaluate": cmd_evaluate, "explain": cmd_explain, "report": cmd_report,
            "bench": cmd_bench, "verify": cmd_verify, "serve": cmd_serve,
            "watch": cmd_watch}
