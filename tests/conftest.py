"""Shared fixtures: tiny seeded datasets written as real PNG files, and small-backbone params."""

import contextlib
import os
import subprocess

import numpy as np
import pytest

from spade_faiss.synthetic import make_dataset

# A small backbone at a small crop keeps most tests fast; a few end-to-end tests use the real
# default (wide_resnet50_2 at 224).
SMALL = dict(backbone="resnet18", weights=None, resize=72, crop=64, device="cpu", seed=0)


@pytest.fixture(scope="session")
def dataset(tmp_path_factory):
    """An MVTec-layout category: 12 train, 3 good test, 4 defect test images (96x96)."""
    return make_dataset(tmp_path_factory.mktemp("data") / "tile", n_train=12, n_good=3, n_defect=4,
                        size=(96, 96), seed=0)


@pytest.fixture
def rng():
    return np.random.default_rng(0)

# CLI options: features for `index` (a small backbone), and the run options for commands that
# open a corpus (they take its features and weights from the corpus).
FEAT = ["--backbone", "resnet18", "--weights", "none", "--resize", "72", "--crop", "64", "--device", "cpu"]
RUN = ["--device", "cpu"]


@contextlib.contextmanager
def small_disk(tmp_path, kib: int):
    """A real file system of ``kib`` KiB (tmpfs; needs root, which CI has)."""
    disk = tmp_path / "small_disk"
    disk.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={kib}k", "tmpfs", str(disk)],
                      capture_output=True).returncode:
        if os.environ.get("CI"):  # CI runs as root: there the test must run, not skip
            pytest.fail("cannot mount a small tmpfs")
        pytest.skip("cannot mount a small tmpfs here (needs root)")
    try:
        yield disk
    finally:
        subprocess.run(["umount", str(disk)], check=False)
