"""Peak memory of a scoring process does not grow with the number of images it scores."""

import os
import subprocess
import sys

from spade_faiss.apps import cli
from spade_faiss.synthetic import make_dataset

from .conftest import FEAT, RUN


def peak_rss(cmd) -> int:
    """Run ``cmd`` to its end; its own peak resident set in bytes (wait4)."""
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0, proc.stderr.read().decode()[-2000:]
    return usage.ru_maxrss * 1024


def test_peak_rss_of_score_does_not_grow_with_the_number_of_images(tmp_path):
    root = make_dataset(tmp_path / "data", n_train=24, n_good=24, n_defect=24, size=(96, 96), seed=6)
    store = tmp_path / "c.h5"
    assert cli.main(["index", str(root), "--out", str(store), *FEAT, "--crop", "96", "--resize", "96"]) == 0
    tests = sorted(str(p) for p in (root / "test").rglob("*.png"))
    peaks = {}
    for n in (12, 48):
        listing = tmp_path / f"test{n}.txt"
        listing.write_text("\n".join(tests[:n]) + "\n")
        cmd = [sys.executable, "-m", "spade_faiss", "score", str(store), str(listing), "--out", str(tmp_path / f"r{n}"),
               *RUN, "--k-gallery", "8"]
        peaks[n] = peak_rss(cmd)
    assert peaks[48] <= peaks[12] * 1.05 + (32 << 20), peaks  # 4x the images, the same peak
