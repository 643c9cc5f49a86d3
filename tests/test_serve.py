"""The HTTP service as a real server process on loopback: answers equal the library's, what a
request asks decides what runs, deadlines give 503 at once (never 504), abandoned work is not
done, metrics, graceful shutdown."""

import base64
import http.client
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from spade_faiss.apps import cli
from spade_faiss.datasets import discover
from spade_faiss.detector import Spade
from spade_faiss.synthetic import make_dataset

from .conftest import FEAT, RUN

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


def metric(text: str, name: str, **labels) -> float:
    """The value of one Prometheus sample (0 when absent)."""
    for line in text.splitlines():
        m = re.match(rf"{name}(?:{{(.*)}})? ([0-9.e+-]+)$", line)
        if m and all(f'{k}="{v}"' in (m.group(1) or "") for k, v in labels.items()):
            return float(m.group(2))
    return 0.0


def wait_for(condition, timeout: float = 60.0, step: float = 0.01) -> None:
    """Wait until ``condition()`` holds (observable progress), failing after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "the awaited progress did not happen"
        time.sleep(step)


class Server:
    def __init__(self, store, tmp_path, *extra):
        (tmp_path / "token").write_text(TOKEN + "\n")
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "spade_faiss", "serve", *map(str, store if isinstance(store, list) else [store]),
             "--port", str(self.port), *RUN,
             "--k-gallery", "5", "--token-file", str(tmp_path / "token"), *extra],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        deadline = time.time() + 120
        while time.time() < deadline:
            try:
                if request(self.url + "/v1/health", token=None, timeout=1)[0] == 200:
                    return
            except OSError:
                time.sleep(0.2)
        self.stop()
        raise RuntimeError("server did not start: " + self.proc.stderr.read().decode())

    def metrics(self) -> str:
        return request(self.url + "/metrics")[1].decode()

    def depth(self, lane: str) -> int:
        """Jobs waiting in ``lane`` now (``/v1/health``)."""
        return int(json.loads(request(self.url + "/v1/health")[1])["queue_depth"][lane])

    def stop(self):
        self.proc.terminate()
        return self.proc.wait(30)


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


def decoded_map(out: dict) -> np.ndarray:
    return np.frombuffer(base64.b64decode(out["map_f32"]), "<f4").reshape(out["map_shape"])


def test_answers_equal_the_library_and_map_decides_what_runs(server, store, dataset):
    paths = [s.path for s in discover(dataset, "test")]
    with Spade.open(store, k_gallery=5) as spade:
        want = spade.score(paths)
    body = open(paths[0], "rb").read()
    code, raw, _ = request(server.url + "/v1/score", body)
    out = json.loads(raw)
    assert code == 200 and out["score"] == float(want.image_scores[0]) and out["map"] == "not requested"
    assert "map_png" not in out and len(out["neighbours"]) == 5
    code, raw, _ = request(server.url + "/v1/score?map=true&raw=true", body)
    out = json.loads(raw)
    assert code == 200 and out["map"] == "computed" and out["map_png"] and out["map_max"] == float(want.maps[0].max())
    np.testing.assert_array_equal(decoded_map(out), want.maps[0])  # bitwise, whatever the batch
    assert request(server.url + "/v1/score?map=auto", body)[0] == 400  # not calibrated
    assert request(server.url + "/v1/score?map=maybe", body)[0] == 400
    info = json.loads(request(server.url + "/v1/info")[1])
    assert info["images"] == 12 and set(info["service_seconds_per_image"]) == {"score", "map"}
    assert all(v > 0 for v in info["service_seconds_per_image"].values())


def test_a_compact_corpus_is_served_with_the_library_s_maps(tmp_path, dataset):
    """A pca/lossless corpus: the service process decodes it on its own (hdf5plugin registered
    by the store, pca arrays read from the file) and answers bitwise what the library does."""
    store = tmp_path / "compact.h5"
    assert cli.main(["index", str(dataset), "--out", str(store), *FEAT, "--storage",
                     "layer1=pca12,layer2=float16+zstd,layer3=pca16"]) == 0
    paths = [s.path for s in discover(dataset, "test")]
    with Spade.open(store, k_gallery=5) as spade:
        want = spade.score(paths[:2])
    s = Server(store, tmp_path)
    try:
        for i, p in enumerate(paths[:2]):
            code, raw, _ = request(s.url + "/v1/score?map=true&raw=true", open(p, "rb").read())
            out = json.loads(raw)
            assert code == 200 and out["score"] == float(want.image_scores[i])
            np.testing.assert_array_equal(decoded_map(out), want.maps[i])
    finally:
        s.stop()


def test_concurrent_clients_are_batched_and_counted(server, store, dataset):
    paths = [s.path for s in discover(dataset, "test")]
    with Spade.open(store, k_gallery=5) as spade:
        want = dict(zip(paths, spade.score(paths, maps=False).image_scores.tolist()))
    bodies = {p: open(p, "rb").read() for p in paths}
    before = server.metrics()
    failures = []

    def client(i):
        for j in range(10):
            p = paths[(i + j) % len(paths)]
            c, b, _ = request(server.url + "/v1/score", bodies[p])
            if c != 200 or json.loads(b)["score"] != want[p]:
                failures.append((p, c, b[:200]))
    threads = [threading.Thread(target=client, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert failures == []
    after = server.metrics()
    assert metric(after, "spade_requests_total", path="/v1/score", code="200") - \
        metric(before, "spade_requests_total", path="/v1/score", code="200") == 160
    batches = metric(after, "spade_batch_size_count") - metric(before, "spade_batch_size_count")
    assert 0 < batches < 160  # requests were batched together
    assert metric(after, "spade_request_seconds_count", lane="score") >= 160
    assert 'spade_queue_depth{corpus="c",lane="map"}' in after  # per corpus: the file's stem names it
    assert metric(after, "spade_service_seconds", corpus="c", lane="score") > 0


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
def test_what_anyone_can_send_cannot_grow_the_metrics_and_errors_have_one_shape(server, dataset):
    for path in ("/random-1", "/admin/../x", "/v1/scoreX", "/v1/info/deeper"):
        code, body, _ = request(server.url + path, token=None)
        assert code == 401 and set(json.loads(body)) == {"error"}
        code, body, _ = request(server.url + path)
        assert code == 404 and set(json.loads(body)) == {"error"}, body
    code, body, _ = request(server.url + "/v1/health", b"x")  # POST on a GET route
    assert code == 405 and set(json.loads(body)) == {"error"}
    code, body, _ = request(server.url + "/v1/score?raw=notabool", b"x")
    assert code == 422 and "raw" in json.loads(body)["error"]
    text = server.metrics()
    assert "random" not in text and "deeper" not in text and 'path="other"' in text


def test_the_bearer_scheme_is_case_insensitive(server):
    for scheme in ("bearer", "BEARER", "Bearer"):
        assert request(server.url + "/v1/info", token=None, headers={"Authorization": f"{scheme} {TOKEN}"})[0] == 200
    assert request(server.url + "/v1/info", token=None, headers={"Authorization": f"Basic {TOKEN}"})[0] == 401


def test_a_client_s_own_shorter_deadline_is_refused_at_once_when_it_cannot_be_met(server, dataset):
    good = open(discover(dataset, "test")[0].path, "rb").read()
    code, body, headers = request(server.url + "/v1/score?map=true&timeout=0.000001", good)
    assert code == 503 and "retry-after" in {k.lower() for k in headers}, body
    code, _, _ = request(server.url + "/v1/score?map=true", good, headers={"X-Request-Timeout": "0.000001"})
    assert code == 503
    assert request(server.url + "/v1/score?timeout=-1", good)[0] == 400
    code, body, _ = request(server.url + "/v1/score", good, headers={"X-Request-Timeout": "soon"})
    assert code == 400 and b"'soon'" in body and b"nan" not in body, body  # the value as sent, not "nan"
    assert request(server.url + "/v1/score?timeout=30", good)[0] == 200


def test_binds_to_loopback_by_default(server):
    assert listening_addresses(server.port) == {"127.0.0.1"}
    args = cli.build_parser().parse_args(["serve", "x.h5"])
    assert args.host == "127.0.0.1"


# --- load: a corpus of 60 images, real service times --------------------------------------

@pytest.fixture(scope="module")
def big(tmp_path_factory):
    """60 normal images (224 crop, resnet18): stage 2 takes real time here."""
    root = make_dataset(tmp_path_factory.mktemp("big") / "tile", n_train=60, n_good=6, n_defect=6,
                        size=(160, 160), seed=3)
    store = root.parent / "c.h5"
    assert cli.main(["index", str(root), "--out", str(store), "--backbone", "resnet18", "--weights", "none",
                     "--device", "cpu"]) == 0
    return root, store


def concurrently(n, fn):
    results = [None] * n
    threads = [threading.Thread(target=lambda i=i: results.__setitem__(i, fn(i))) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


def timed_request(url, body):
    t = time.monotonic()
    code, raw, headers = request(url, body, timeout=120)
    return code, raw, headers, time.monotonic() - t


def test_load_score_only_and_maps_within_deadlines(big, tmp_path):
    root, store = big
    paths = [s.path for s in discover(root, "test")]
    bodies = [open(p, "rb").read() for p in paths]
    with Spade.open(store, k_gallery=5) as spade:
        want = spade.score(paths)
    server = Server(store, tmp_path, "--timeout", "10")
    try:
        got = concurrently(24, lambda i: timed_request(server.url + "/v1/score", bodies[i % len(paths)]))
        assert [g[0] for g in got] == [200] * 24
        for i, g in enumerate(got):
            assert json.loads(g[1])["score"] == float(want.image_scores[i % len(paths)])
        got = concurrently(12, lambda i: timed_request(server.url + "/v1/score?map=true&raw=true",
                                                       bodies[i % len(paths)]))
        assert {g[0] for g in got} <= {200, 503}, [g[0] for g in got]
        for i, (code, raw, headers, _) in enumerate(got):
            if code == 503:
                assert int(headers["Retry-After"]) >= 0
            else:
                np.testing.assert_array_equal(decoded_map(json.loads(raw)), want.maps[i % len(paths)])
        text = server.metrics()
        assert metric(text, "spade_requests_total", path="/v1/score", code="504") == 0
        refused = metric(text, "spade_rejected_total", reason="cannot be served before the deadline")
        assert refused == sum(g[0] == 503 for g in got)  # every 503 was a refusal at admission, before any work
    finally:
        assert server.stop() == 0


def test_tight_deadlines_answer_503_at_once_never_504(big, tmp_path):
    root, store = big
    body = open(discover(root, "test")[0].path, "rb").read()
    server = Server(store, tmp_path, "--timeout", "0.5", "--max-batch", "2")
    try:
        # Half the clients give themselves no time at all (?timeout=1e-6): those are refused at
        # admission whatever the machine's speed; the others race the 0.5 s server deadline.
        got = concurrently(16, lambda i: timed_request(
            server.url + "/v1/score?map=true" + ("&timeout=0.000001" if i % 2 else ""), body))
        codes = [g[0] for g in got]
        assert set(codes) <= {200, 503} and all(c == 503 for c in codes[1::2]), codes
        text = server.metrics()
        refused = metric(text, "spade_rejected_total", reason="cannot be served before the deadline")
        late = metric(text, "spade_rejected_total", reason="deadline passed")
        assert refused >= 8 and refused + late == codes.count(503)
        assert metric(text, "spade_requests_total", path="/v1/score", code="504") == 0
    finally:
        server.stop()


def test_a_request_that_cannot_be_admitted_is_refused_before_its_image_is_decoded(store, tmp_path):
    """Under overload a refusal must cost next to nothing: admission comes before decoding, so
    an undecodable body that could not be served in time gets 503 (not 400), at once."""
    server = Server(store, tmp_path, "--timeout", "0.001")  # no work fits in 1 ms
    try:
        code, raw, headers, seconds = timed_request(server.url + "/v1/score?map=true", b"not an image at all")
        assert code == 503 and b"deadline" in raw and "retry-after" in {k.lower() for k in headers}, raw
        assert metric(server.metrics(), "spade_rejected_total", reason="cannot be served before the deadline") == 1
    finally:
        assert server.stop() == 0


def test_a_client_that_leaves_is_not_scored(big, tmp_path):
    root, store = big
    body = open(discover(root, "test")[0].path, "rb").read()
    server = Server(store, tmp_path, "--timeout", "60", "--max-batch", "1")
    try:
        # Keep the worker busy with maps, then send one more request and leave before its turn.
        busy = [threading.Thread(target=request, args=(server.url + "/v1/score?map=true", body)) for _ in range(6)]
        for t in busy:
            t.start()
        wait_for(lambda: server.depth("map") >= 3)  # the worker is busy and maps wait: progress, not time
        before = server.depth("map")
        conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=5)
        conn.request("POST", "/v1/score?map=true", body, {"Authorization": f"Bearer {TOKEN}"})
        # queued behind the others: the lane grew (or the worker took one as ours arrived)
        wait_for(lambda: server.depth("map") >= before or metric(server.metrics(), "spade_batch_size_count") > 6)
        conn.sock.shutdown(socket.SHUT_RDWR)
        conn.close()
        for t in busy:
            t.join()
        deadline = time.time() + 10
        while time.time() < deadline and metric(server.metrics(), "spade_dropped_total", reason="abandoned") < 1:
            time.sleep(0.2)
        text = server.metrics()
        assert metric(text, "spade_client_disconnects_total") >= 1
        assert metric(text, "spade_dropped_total", reason="abandoned") >= 1
    finally:
        server.stop()


def test_sigterm_during_load_answers_every_accepted_request_and_exits_0(big, tmp_path):
    root, store = big
    body = open(discover(root, "test")[0].path, "rb").read()
    server = Server(store, tmp_path, "--timeout", "60")
    conns = []
    for _ in range(8):  # accepted: connected and sent before the signal
        conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
        conn.request("POST", "/v1/score?map=true", body, {"Authorization": f"Bearer {TOKEN}"})
        conns.append(conn)
    wait_for(lambda: server.depth("map") >= 1)  # accepted and queued: progress, not time
    server.proc.send_signal(signal.SIGTERM)
    codes = [c.getresponse().status for c in conns]
    assert set(codes) <= {200, 503} and codes.count(200) >= 1, codes
    assert server.proc.wait(60) == 0


def test_a_served_corpus_grows_while_it_answers_and_every_answer_is_its_state_s(tmp_path):
    """A writer appends 20 images in 5 commits while a client streams requests: every request
    is answered, each answer equals Spade.score on the corpus state it reports, and the served
    state reaches all 26 images; thresholds calibrated meanwhile reach the service too."""
    root = make_dataset(tmp_path / "line", n_train=30, n_good=1, n_defect=1, size=(80, 80), seed=5)
    train = [s.path for s in discover(root, "train")]
    first = tmp_path / "first"
    first.mkdir()
    for p in train[:6]:
        os.symlink(p, first / os.path.basename(p))
    store = tmp_path / "c.h5"
    assert cli.main(["index", str(first), "--out", str(store), *FEAT]) == 0
    server = Server(store, tmp_path, "--refresh-s", "0.2")
    probe = [s.path for s in discover(root, "test")][1]
    body = open(probe, "rb").read()
    listing = tmp_path / "shift.txt"
    listing.write_text("\n".join(train[6:26]) + "\n")
    answers = []
    try:
        writer = subprocess.Popen([sys.executable, "-m", "spade_faiss", "index", str(listing), "--out", str(store),
                                   "--batch-size", "4"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.time() + 120
        while time.time() < deadline:
            code, raw, _ = request(server.url + "/v1/score?map=true&raw=true", body)
            assert code == 200, raw
            answers.append(json.loads(raw))
            if writer.poll() is not None and answers[-1]["corpus"]["images"] == 26:
                break
        assert writer.wait() == 0, writer.stderr.read().decode()
        assert answers[-1]["corpus"]["images"] == 26 and answers[-1]["corpus"]["generation"] == 5
        info = json.loads(request(server.url + "/v1/info")[1])
        assert info["images"] == 26 and info["corpus_state"]["generation"] == 5
        assert info["corpus_state"]["thresholds"]["tau"] is None
        # Calibrated while served: the new thresholds are used.
        held = tmp_path / "held"
        held.mkdir()
        for p in train[26:30]:
            os.symlink(p, held / os.path.basename(p))
        assert cli.main(["calibrate", str(store), str(held), "--fpr", "0.25", *RUN]) == 0
        for _ in range(100):
            info = json.loads(request(server.url + "/v1/info")[1])
            if info["corpus_state"]["thresholds"]["tau"] is not None:
                break
            time.sleep(0.1)
        assert info["corpus_state"]["thresholds_changed_at"] and info["thresholds"]["tau"] == \
            info["corpus_state"]["thresholds"]["tau"]
        assert "is_anomalous" in json.loads(request(server.url + "/v1/score", body)[1])
        assert metric(server.metrics(), "spade_corpus_images") == 26.0
        # Calibrated: a map answer lists its defect regions at theta, in the image's pixels (issue 38).
        from spade_faiss.images import load_image
        from spade_faiss.regions import find_regions
        from spade_faiss.scoring import map_to_original

        out = json.loads(request(server.url + "/v1/score?map=true&raw=true", body)[1])
        with Spade.open(store) as local:
            resize = local.resize
        want = find_regions(map_to_original(decoded_map(out), load_image(probe).size, resize),
                            info["thresholds"]["theta"])
        assert out["regions"] == [g.as_dict() for g in want]
    finally:
        server.stop()
    states = sorted({a["corpus"]["generation"] for a in answers})
    assert len(states) >= 2  # the stream saw the corpus grow
    for g in states:
        with Spade.open(store, generation=g, k_gallery=5) as spade:
            want = spade.score([probe])
        for a in (a for a in answers if a["corpus"]["generation"] == g):
            assert a["corpus"]["images"] == len(spade.paths_)
            assert a["score"] == float(want.image_scores[0])
            np.testing.assert_array_equal(decoded_map(a), want.maps[0])


def test_two_corpora_in_one_service_answer_as_each_alone_with_one_model(store, dataset, tmp_path):
    other_data = make_dataset(tmp_path / "other", n_train=8, n_good=1, n_defect=1, size=(96, 96), seed=7)
    other = tmp_path / "other.h5"
    assert cli.main(["index", str(other_data), "--out", str(other), *FEAT]) == 0
    server = Server([f"tiles={store}", f"parts={other}"], tmp_path)
    try:
        listing = json.loads(request(server.url + "/v1/corpora")[1])
        assert sorted(listing["corpora"]) == ["parts", "tiles"] and listing["models"] == 1  # same weights
        assert listing["corpora"]["tiles"]["images"] == 12 and listing["corpora"]["parts"]["images"] == 8
        probe = [s.path for s in discover(dataset, "test")][0]
        body = open(probe, "rb").read()
        for name, path in (("tiles", store), ("parts", other)):
            with Spade.open(path, k_gallery=5) as alone:
                want = alone.score([probe])
            code, raw, _ = request(server.url + f"/v1/corpora/{name}/score?map=true&raw=true", body)
            out = json.loads(raw)
            assert code == 200 and out["score"] == float(want.image_scores[0])
            np.testing.assert_array_equal(decoded_map(out), want.maps[0])
            assert json.loads(request(server.url + f"/v1/corpora/{name}/info")[1])["name"] == name
        code, raw, _ = request(server.url + "/v1/score", body)
        assert code == 404 and "parts" in json.loads(raw)["error"]
        assert request(server.url + "/v1/corpora/nope/score", body)[0] == 404
        text = server.metrics()
        assert metric(text, "spade_corpus_images", corpus="parts") == 8.0
        assert metric(text, "spade_requests_total", path="/v1/corpora/{name}/score", code="200") == 2.0
    finally:
        server.stop()


def test_a_mistyped_thresholds_file_keeps_the_last_good_state_and_health_names_it(tmp_path, dataset):
    """A hand-edited thresholds.json beside a served corpus: the refresh fails and is counted,
    the corpus answers from its last good state, /v1/health says degraded naming the corpus and
    the reason; once the file is right again, health is ok and the new thresholds are served."""
    store = tmp_path / "c.h5"
    assert cli.main(["index", str(dataset), "--out", str(store), *FEAT]) == 0
    image = open(discover(dataset, "test")[0].path, "rb").read()
    server = Server(store, tmp_path, "--refresh-s", "0.05")

    def health():
        code, raw, _ = request(server.url + "/v1/health", token=None)
        return code, json.loads(raw)

    try:
        folder = Path(f"{store}.appends")
        folder.mkdir()
        (folder / "thresholds.json").write_text('{"tau": "abc", "theta": 1.0}')
        wait_for(lambda: health()[1]["status"] == "degraded")
        code, body = health()
        assert code == 200 and "tau='abc'" in body["problems"]["c"], body
        assert request(server.url + "/v1/score?map=true", image)[0] == 200  # still answering
        assert metric(server.metrics(), "spade_corpus_refreshes_total", result="failed") >= 1
        info = json.loads(request(server.url + "/v1/info")[1])
        assert info["corpus_state"]["thresholds"]["tau"] is None  # the last good state
        good = folder / "thresholds.json.new"
        good.write_text('{"tau": 5.0, "theta": 1.0}')
        os.replace(good, folder / "thresholds.json")  # whole, as calibrate writes it

        def state():
            return json.loads(request(server.url + "/v1/info")[1])["corpus_state"]

        wait_for(lambda: state()["thresholds"]["tau"] == 5.0)
        assert state()["problem"] is None and health()[1]["status"] == "ok"
    finally:
        assert server.stop() == 0


def test_a_short_clip_is_answered_per_frame_as_the_library_scores_its_frames(server, store, dataset, tmp_path):
    """Issue 37: a video clip uploaded to /v1/score (a real MJPG AVI) is answered per frame, in
    frame order, each answer equal to the library's score and map of that decoded frame; a
    clip over the frame limit is refused (413), and so is one that is not a readable video."""
    import cv2

    from spade_faiss.apps.serve import MAX_CLIP_FRAMES

    paths = [s.path for s in discover(dataset, "test")][:4]
    clip = tmp_path / "clip.avi"
    writer = cv2.VideoWriter(str(clip), cv2.VideoWriter_fourcc(*"MJPG"), 5.0, (96, 96))
    for p in paths:
        writer.write(cv2.imread(p))
    writer.release()
    cap, frames = cv2.VideoCapture(str(clip)), []
    while True:
        ok, bgr = cap.read()
        if not ok:
            break
        frames.append(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB))
    with Spade.open(store, k_gallery=5) as spade:
        want = spade.score(frames)
    code, raw, _ = request(server.url + "/v1/score?map=true&raw=true", clip.read_bytes())
    assert code == 200, raw
    out = json.loads(raw)
    assert [f["frame"] for f in out["frames"]] == list(range(len(frames))) == list(range(4))
    assert [f["time_s"] for f in out["frames"]] == [0.0, 0.2, 0.4, 0.6]
    for f, score, amap in zip(out["frames"], want.image_scores, want.maps):
        assert f["score"] == float(score)
        np.testing.assert_array_equal(decoded_map(f), amap)
    long = tmp_path / "long.avi"
    writer = cv2.VideoWriter(str(long), cv2.VideoWriter_fourcc(*"MJPG"), 5.0, (32, 32))
    for _ in range(MAX_CLIP_FRAMES + 1):
        writer.write(np.zeros((32, 32, 3), np.uint8))
    writer.release()
    code, raw, _ = request(server.url + "/v1/score", long.read_bytes())
    assert code == 413 and b"more than" in raw
    code, raw, _ = request(server.url + "/v1/score", b"RIFF\x00\x00\x00\x00AVI " + b"\x00" * 64)
    assert code == 400 and b"video" in raw
