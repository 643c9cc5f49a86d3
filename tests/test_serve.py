"""The HTTP service as a real server process on loopback."""

import http.client
import json
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import pytest

from spade_faiss.apps import cli
from spade_faiss.datasets import discover
from spade_faiss.detector import Spade

from .conftest import FEAT, RUN, SMALL

pytest.importorskip("fastapi")
TOKEN = "s3cret-token"


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def request(url, data=None, token=TOKEN, headers=None, timeout=60):
    h = dict(headers or {})
    if token:
        h["Authorization"] = f"Bearer {token}"
    req = urllib.request.Request(url, data=data, headers=h, method="POST" if data is not None else "GET")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, r.read(), dict(r.headers)
    except urllib.error.HTTPError as e:
        return e.code, e.read(), dict(e.headers)


class Server:
    def __init__(self, store, tmp_path, *extra):
        (tmp_path / "token").write_text(TOKEN + "\n")
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "spade_faiss", "serve", str(store), "--port", str(self.port), *RUN,
             "--k-gallery", "5", "--token-file", str(tmp_path / "token"), *extra],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        deadline = time.time() + 60
        while time.time() < deadline:
            try:
                if request(self.url + "/v1/health", token=None, timeout=1)[0] == 200:
                    return
            except OSError:
                time.sleep(0.2)
        self.stop()
        raise RuntimeError("server did not start: " + self.proc.stderr.read().decode())

    def stop(self):
        self.proc.terminate()
        self.proc.wait(10)


@pytest.fixture(scope="module")
def store(tmp_path_factory, dataset):
    out = tmp_path_factory.mktemp("serve") / "c.h5"
    assert cli.main(["index", str(dataset), "--out", str(out), *FEAT]) == 0
    return out


@pytest.fixture(scope="module")
def server(store, tmp_path_factory):
    s = Server(store, tmp_path_factory.mktemp("srv"))
    yield s
    s.stop()


def test_scores_equal_the_library_and_concurrent_clients(server, store, dataset):
    paths = [s.path for s in discover(dataset, "test")]
    with Spade.open(store, k_gallery=5, **SMALL) as spade:
        want = dict(zip(paths, spade.score(paths).image_scores.tolist()))
    bodies = {p: open(p, "rb").read() for p in paths}
    code, body, _ = request(server.url + "/v1/score?map=true", bodies[paths[0]])
    assert code == 200
    out = json.loads(body)
    assert out["score"] == pytest.approx(want[paths[0]], rel=1e-5)
    assert len(out["neighbours"]) == 5 and out["map_png"] and out["map_max"] > 0
    failures = []

    def client(i):
        for j in range(20):
            p = paths[(i + j) % len(paths)]
            c, b, _ = request(server.url + "/v1/score", bodies[p])
            if c != 200 or abs(json.loads(b)["score"] - want[p]) > 1e-4 * abs(want[p]):
                failures.append((p, c, b[:200]))
    threads = [threading.Thread(target=client, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert failures == []
    code, text, _ = request(server.url + "/metrics")
    text = text.decode()
    assert code == 200 and 'spade_requests_total{path="/v1/score",code="200"} 321' in text
    batches = [ln for ln in text.splitlines() if ln.startswith("spade_batch_size_count")]
    assert int(batches[0].split()[1]) < 321  # requests were batched together


def test_bad_requests_get_the_right_status_and_the_server_stays_healthy(server, dataset):
    good = open(discover(dataset, "test")[0].path, "rb").read()
    assert request(server.url + "/v1/score", good, token=None)[0] == 401
    assert request(server.url + "/v1/score", good, token="wrong")[0] == 401
    assert request(server.url + "/v1/info", token=None)[0] == 401
    code, body, _ = request(server.url + "/v1/score", b"garbage bytes")
    assert code == 400 and "not a decodable image" in json.loads(body)["error"]
    assert request(server.url + "/v1/score", b"")[0] == 400
    assert request(server.url + "/v1/score", good[: len(good) // 2])[0] == 400
    from .test_odd_images import png_bomb
    code, body, _ = request(server.url + "/v1/score", png_bomb(100_000, 100_000))
    assert code == 413 and "pixels" in json.loads(body)["error"]
    # An oversize upload is refused from its Content-Length, before the body is read (as curl
    # does with Expect: 100-continue, the client waits for the answer before sending).
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    conn.putrequest("POST", "/v1/score")
    conn.putheader("Content-Length", str(33 * 2**20))
    conn.putheader("Authorization", f"Bearer {TOKEN}")
    conn.endheaders()
    assert conn.getresponse().status == 413
    conn.close()
    boundary = "XyZ"
    multipart = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a.png\"\r\n"
                 f"Content-Type: image/png\r\n\r\n").encode() + good + f"\r\n--{boundary}--\r\n".encode()
    code, body, _ = request(server.url + "/v1/score", multipart,
                            headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})
    assert code == 200 and json.loads(body)["score"] > 0
    assert request(server.url + "/v1/health", token=None)[0] == 200
    code, body, _ = request(server.url + "/v1/info")
    assert code == 200 and json.loads(body)["images"] == 12
    assert request(server.url + "/v1/score", good)[0] == 200


def test_full_queue_answers_503_with_retry_after(store, tmp_path, dataset):
    s = Server(store, tmp_path, "--queue-size", "1", "--max-batch", "1", "--batch-window-ms", "0")
    try:
        good = open(discover(dataset, "test")[0].path, "rb").read()
        codes, retry = [], []

        def client():
            c, _, h = request(s.url + "/v1/score", good)
            codes.append(c)
            if c == 503:
                retry.append(h.get("Retry-After") or h.get("retry-after"))
        threads = [threading.Thread(target=client) for _ in range(24)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert set(codes) <= {200, 503} and 503 in codes and 200 in codes
        assert set(retry) == {"1"}
        assert request(s.url + "/v1/score", good)[0] == 200
    finally:
        s.stop()


def listening_addresses(port: int) -> set[str]:
    """IPv4 addresses with a TCP socket listening on ``port``, from the kernel's table."""
    found = set()
    with open("/proc/net/tcp") as f:
        for line in f.readlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            ip, p = local.split(":")
            if state == "0A" and int(p, 16) == port:  # 0A: LISTEN
                found.add(socket.inet_ntoa(bytes.fromhex(ip)[::-1]))
    return found


@pytest.mark.skipif(not os.path.exists("/proc/net/tcp"), reason="reads Linux's socket table")
def test_binds_to_loopback_by_default(server):
    assert listening_addresses(server.port) == {"127.0.0.1"}
    args = cli.build_parser().parse_args(["serve", "x.h5"])
    assert args.host == "127.0.0.1"
