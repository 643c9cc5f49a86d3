"""Service benchmark: `spade-faiss serve` under open-loop load (requests arrive at a fixed rate,
not as fast as answers return) at 0.5x, 1x and 2x its measured capacity, for score-only and
map requests: goodput (200s per second), p50/p99 latency, 503 and 504 counts. Capacity is the
throughput of a closed loop of 16 clients. With ``--append N``, the 1x point is measured again
while a niced one-thread `spade-faiss index` appends N new normal images to the served corpus
(docs/design.md §2, "Growing while served"): goodput and p99 against the point without it, and
the images the service took in. Prints JSON lines; writes only under --out.

    .venv/bin/python benchmarks/bench_serve.py --out bench-out            # default backbone, real images
    .venv/bin/python benchmarks/bench_serve.py --out bench-out --quick    # resnet18, generated data
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np

sys.path.insert(0, os.path.dirname(__file__))
from common import dataset_images, emit, machine  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def post(url: str, body: bytes, timeout: float = 120) -> tuple[int, float, float]:
    """(status, seconds, Retry-After seconds or 0) of one request."""
    t = time.perf_counter()
    retry = 0.0
    try:
        with urllib.request.urlopen(urllib.request.Request(url, data=body, method="POST"), timeout=timeout) as r:
            r.read()
            code = r.status
    except urllib.error.HTTPError as e:
        code, retry = e.code, float(e.headers.get("Retry-After") or 0)
    except OSError:
        code = 0
    return code, time.perf_counter() - t, retry


def closed_loop(url: str, bodies: list[bytes], clients: int, seconds: float) -> float:
    """Answers (200) per second with ``clients`` clients sending back to back; a client told
    503 waits the ``Retry-After`` it was given, as the README asks of clients."""
    done, stop = [], time.perf_counter() + seconds

    def client(i):
        j = i
        while time.perf_counter() < stop:
            code, _, retry = post(url, bodies[j % len(bodies)])
            if code == 200:
                done.append(time.perf_counter())
            elif code == 503:
                time.sleep(max(0.0, min(retry, stop - time.perf_counter())))
            j += clients
    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return len(done) / (time.perf_counter() - start)


def open_loop(url: str, bodies: list[bytes], rate: float, seconds: float) -> dict:
    """Requests at a fixed rate, each on its own thread; returns codes and latencies."""
    results, threads = [], []
    n = max(1, int(rate * seconds))
    start = time.perf_counter()
    for i in range(n):
        wait = start + i / rate - time.perf_counter()
        if wait > 0:
            time.sleep(wait)
        t = threading.Thread(target=lambda i=i: results.append(post(url, bodies[i % len(bodies)])))
        t.start()
        threads.append(t)
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    ok = sorted(s for c, s, _ in results if c == 200)
    busy = [s for c, s, _ in results if c == 503]
    codes = [c for c, _, _ in results]
    return {"requests": n, "goodput_per_s": round(len(ok) / wall, 2),
            "p50_ms": round(1e3 * float(np.percentile(ok, 50)), 1) if ok else None,
            "p99_ms": round(1e3 * float(np.percentile(ok, 99)), 1) if ok else None,
            "max_503_ms": round(1e3 * max(busy), 1) if busy else None,
            "n_200": codes.count(200), "n_503": codes.count(503), "n_504": codes.count(504),
            "n_other": sum(c not in (200, 503, 504) for c in codes)}


def with_append(base: str, url: str, bodies: list, capacity: float, args, store: Path, out: Path, kind: str,
                new: list[str], baseline: dict) -> None:
    """The 1x point again while a writer appends ``new`` images beside the served corpus."""
    listing = out / f"append_{kind}.txt"
    listing.write_text("\n".join(new) + "\n")
    before = json.load(urllib.request.urlopen(base + "/v1/info"))["corpus_state"]["images"]
    writer = subprocess.Popen(["nice", "-n", "19", sys.executable, "-m", "spade_faiss", "index", str(listing),
                               "--out", str(store), "--threads", "1", "--batch-size", "4"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    r = open_loop(url, bodies, capacity, args.seconds)
    writer_running = writer.poll() is None
    writer.wait()
    time.sleep(2 * 2.0)  # two refresh intervals (the service's default --refresh-s)
    after = json.load(urllib.request.urlopen(base + "/v1/info"))["corpus_state"]
    emit(bench="serve", step="open_loop_append", kind=kind, load=1, appended=len(new),
         images_before=before, images_after=after["images"], generation=after["generation"],
         writer_outlasted_the_load=writer_running, goodput_fraction_of_load=round(r["goodput_per_s"] / capacity, 3),
         p99_over_no_append=round(r["p99_ms"] / baseline["p99_ms"], 2) if r["p99_ms"] and baseline["p99_ms"]
         else None, **r)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="bench-out")
    ap.add_argument("--backbone", default="wide_resnet50_2")
    ap.add_argument("--n-train", type=int, default=60)
    ap.add_argument("--seconds", type=float, default=20.0, help="per open-loop point")
    ap.add_argument("--timeout", type=float, default=10.0, help="the server's per-request deadline")
    ap.add_argument("--loads", default="0.5,1,2")
    ap.add_argument("--append", type=int, default=0, help="images appended during a second 1x point, per kind")
    ap.add_argument("--quick", action="store_true", help="resnet18, generated data, 5 s points")
    args = ap.parse_args()
    if args.quick:
        args.backbone, args.n_train, args.seconds = "resnet18", 20, 5.0
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    train, test, source = dataset_images(out, args.n_train + 2 * args.append, 12, generated=args.quick)
    train, extra = train[:args.n_train], train[args.n_train:]
    store = out / f"serve_{args.backbone}_{source}_{args.n_train}.h5"
    if not store.exists():
        (out / "serve_train.txt").write_text("\n".join(train))
        subprocess.run([sys.executable, "-m", "spade_faiss", "index", str(out / "serve_train.txt"), "--out",
                        str(store), "--weights", "none", "--backbone", args.backbone, "--device", "cpu"],
                       check=True, capture_output=True)
    bodies = [Path(p).read_bytes() for p in test]
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "spade_faiss", "serve", str(store), "--port", str(port),
                               "--device", "cpu", "--timeout", str(args.timeout)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 300
        while time.time() < deadline:
            try:
                urllib.request.urlopen(base + "/v1/health", timeout=1)
                break
            except OSError:
                time.sleep(0.5)
        info = json.load(urllib.request.urlopen(base + "/v1/info"))
        emit(bench="serve", step="machine", backbone=args.backbone, data=source, images=info["images"],
             service_seconds_per_image=info["service_seconds_per_image"], timeout_s=args.timeout, **machine())
        for kind, query in (("score_only", ""), ("map", "?map=true")):
            url = base + "/v1/score" + query
            capacity = closed_loop(url, bodies, 16, args.seconds)
            emit(bench="serve", step="capacity", kind=kind, answers_per_s=round(capacity, 2))
            for load in map(float, args.loads.split(",")):
                r = open_loop(url, bodies, load * capacity, args.seconds)
                emit(bench="serve", step="open_loop", kind=kind, load=load, rate_per_s=round(load * capacity, 2),
                     goodput_fraction_of_capacity=round(r["goodput_per_s"] / capacity, 3), **r)
                if load == 1 and args.append:
                    new, extra = extra[:args.append], extra[args.append:]
                    with_append(base, url, bodies, capacity, args, store, out, kind, new, r)
    finally:
        server.terminate()
        server.wait(60)


if __name__ == "__main__":
    main()
