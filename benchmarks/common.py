"""Helpers shared by the benchmark scripts: JSON lines, peak RSS, the machine, the data."""

from __future__ import annotations

import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DATA = Path(os.environ.get("SPADE_FAISS_DATA", ROOT.parent / "shared" / "data" / "magnetic_tile"))


def emit(**record) -> None:
    print(json.dumps(record), flush=True)


def emit_to(path: Path, **record) -> None:
    """One JSON line on stdout and appended to ``path`` (a benchmark's raw lines)."""
    line = json.dumps(record)
    print(line, flush=True)
    with open(path, "a") as f:
        f.write(line + "\n")


def begin(out: str | Path, jsonl: str, bench: str) -> Path:
    """A benchmark's output folder (made) with the machine's line written first in its raw lines."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    emit_to(out / jsonl, bench=bench, step="machine", **machine())
    return out


def process(cmd: list, log: Path, env: dict | None = None, stdout: bool = False) -> dict:
    """Run one process to its end: its wall seconds and its own peak RSS (MB, ``wait4``); its
    output goes to ``log`` (with ``stdout``: its stderr only, and its stdout's last line is
    returned as ``last_line``). A failure ends the benchmark, naming the log."""
    cmd = [str(c) for c in cmd]
    t = time.perf_counter()
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE if stdout else f, stderr=f if stdout else subprocess.STDOUT,
                                env=env, text=True)
        out = proc.stdout.read() if stdout else ""
        _, status, usage = os.wait4(proc.pid, 0)
    code = os.waitstatus_to_exitcode(status)
    if code:
        sys.exit(f"{' '.join(cmd)} exited {code}; see {log}:\n{log.read_text()[-3000:]}")
    rec = {"seconds": round(time.perf_counter() - t, 2), "peak_rss_mb": round(usage.ru_maxrss / 1024)}
    if stdout:
        rec["last_line"] = out.strip().splitlines()[-1]
    return rec


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def machine() -> dict:
    import faiss
    import torch
    return {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
            "torch_threads": torch.get_num_threads(), "faiss": faiss.__version__, "torch": torch.__version__,
            "python": sys.version.split()[0], "openblas_coretype": os.environ.get("OPENBLAS_CORETYPE"),
            "cpu_model": cpu_model(), "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "faiss_gpus": faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0}


def cpu_model() -> str | None:
    """The processor's name from /proc/cpuinfo (Linux), for the machine a figure came from."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def real_images(split: str, n: int, data: Path = DATA) -> list[str]:
    """The first ``n`` images of the magnetic_tile dataset's ``train`` or ``test`` split
    (test: interleaved over the defect classes so that a few images cover all of them)."""
    from spade_faiss.datasets import discover
    samples = discover(data, split=split)
    if split == "test":
        by_class: dict[str, list] = {}
        for s in samples:
            by_class.setdefault(s.defect, []).append(s)
        samples = [c[i] for i in range(max(map(len, by_class.values()))) for c in by_class.values() if i < len(c)]
    if len(samples) < n:
        sys.exit(f"{data}: only {len(samples)} {split} images, {n} requested")
    return [s.path for s in samples[:n]]


def dataset_images(out: Path, n_train: int, n_test: int, generated: bool = False) -> tuple[list, list, str]:
    """(train paths, test paths, source name): the real magnetic_tile images beside the
    repository, or, when they are absent (a fresh clone elsewhere) or ``generated`` is asked,
    a seeded synthetic category written under ``out``."""
    if not generated and DATA.is_dir():
        return real_images("train", n_train), real_images("test", n_test), "magnetic_tile"
    if not generated:
        print(f"# {DATA} is not here: using generated images", file=sys.stderr)
    from spade_faiss.datasets import discover
    from spade_faiss.synthetic import make_dataset
    root = out / "data" / f"synthetic_{n_train}_{n_test}"
    if not (root / "train").is_dir():
        make_dataset(root, n_train=n_train, n_good=n_test // 2, n_defect=n_test - n_test // 2, size=(128, 128))
    return [s.path for s in discover(root, "train")], [s.path for s in discover(root, "test")], "synthetic"
