"""Helpers shared by the benchmark scripts: JSON lines, peak RSS, the real dataset, corpora."""

from __future__ import annotations

import json
import os
import platform
import resource
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT.parent / "shared" / "data" / "magnetic_tile"


def emit(**record) -> None:
    print(json.dumps(record), flush=True)


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def machine() -> dict:
    import faiss
    import torch
    return {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
            "torch_threads": torch.get_num_threads(), "faiss": faiss.__version__, "torch": torch.__version__,
            "python": sys.version.split()[0]}


def real_images(split: str, n: int, data: Path = DATA) -> list[str]:
    """The first ``n`` images of the magnetic_tile dataset's ``train`` or ``test`` split
    (test: interleaved over the defect classes so that a few images cover all of them)."""
    from spade_faiss.images import discover
    samples = discover(data, split=split)
    if split == "test":
        by_class: dict[str, list] = {}
        for s in samples:
            by_class.setdefault(s.defect, []).append(s)
        rows = [c[i] for i in range(max(map(len, by_class.values()))) for c in by_class.values() if i < len(c)]
        samples = rows
    if len(samples) < n:
        sys.exit(f"{data}: only {len(samples)} {split} images, {n} requested")
    return [s.path for s in samples[:n]]
