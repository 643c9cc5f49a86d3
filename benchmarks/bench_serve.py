"""Service benchmark: requests/s and p50/p99 latency of `spade-faiss serve` on loopback at 1, 4
and 16 concurrent clients (a real server process; requests bounded in count). Prints JSON lines.

    .venv/bin/python benchmarks/bench_serve.py                       # resnet18 corpus, quick
    .venv/bin/python benchmarks/bench_serve.py --backbone wide_resnet50_2 --requests 24
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request

import numpy as np

sys.path.insert(0, os.path.dirname(__file__))
from common import emit, machine, real_images  # noqa: E402

from spade_faiss.detector import Spade  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def post(url: str, body: bytes) -> float:
    t = time.perf_counter()
    with urllib.request.urlopen(urllib.request.Request(url, data=body, method="POST"), timeout=300) as r:
        r.read()
        assert r.status == 200
    return time.perf_counter() - t


def load(url: str, bodies: list[bytes], clients: int, total: int) -> dict:
    latencies: list[float] = []
    lock = threading.Lock()

    def client(i):
        for j in range(i, total, clients):
            lat = post(url, bodies[j % len(bodies)])
            with lock:
                latencies.append(lat)
    t = time.perf_counter()
    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    wall = time.perf_counter() - t
    lat = np.array(latencies) * 1e3
    return {"requests": len(lat), "requests_per_s": round(len(lat) / wall, 2),
            "p50_ms": round(float(np.percentile(lat, 50)), 1), "p99_ms": round(float(np.percentile(lat, 99)), 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backbone", default="resnet18")
    ap.add_argument("--n-train", type=int, default=30)
    ap.add_argument("--k-gallery", type=int, default=10)
    ap.add_argument("--requests", type=int, default=64, help="per concurrency level")
    ap.add_argument("--clients", default="1,4,16")
    ap.add_argument("--device", default="auto")
    args = ap.parse_args()
    emit(bench="serve", step="machine", **machine())
    with tempfile.TemporaryDirectory() as d:
        store = os.path.join(d, "c.h5")
        with Spade.create(store, backbone=args.backbone, weights=None, device="cpu") as spade:
            spade.add(real_images("train", args.n_train))
        port = free_port()
        proc = subprocess.Popen([sys.executable, "-m", "spade_faiss", "serve", store, "--port", str(port),
                                 "--weights", "none", "--device", args.device, "--k-gallery", str(args.k_gallery)],
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        url = f"http://127.0.0.1:{port}"
        try:
            for _ in range(600):
                try:
                    urllib.request.urlopen(url + "/v1/health", timeout=1).read()
                    break
                except OSError:
                    time.sleep(0.2)
            bodies = [open(p, "rb").read() for p in real_images("test", 12)]
            post(url + "/v1/score", bodies[0])  # warm up
            for c in map(int, args.clients.split(",")):
                emit(bench="serve", backbone=args.backbone, k_gallery=args.k_gallery, device=args.device,
                     clients=c, **load(url + "/v1/score", bodies, c, args.requests))
        finally:
            proc.terminate()
            proc.wait(10)


if __name__ == "__main__":
    main()
