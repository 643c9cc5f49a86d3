"""Each image's map maximum in one or more runs over its maximum in a reference run (the same
images, e.g. a compact corpus's run against its float16 source's): where a stored
representation decodes a location far from its feature, the map's maximum shows it. JSON lines:
per run, the ratio's min / median / max over images, how many images exceed 1.5x and 2x, and
the worst image.

    python benchmarks/map_maxima.py REFERENCE_RUN/maps.h5 RUN/maps.h5 [RUN2/maps.h5 ...]

The fourteenth wave's measurement of compact's 46x outlier (the user run's 685-normal default
corpus converted to compact at this commit and at 306c2ba, before the pca exponent; all 583
test images scored with defaults and ``--no-overlays --no-report``)::

    spade-faiss convert corpus.h5 --storage compact --out compact.h5
    spade-faiss score compact.h5 test.txt --out run_compact --no-overlays --no-report
    python benchmarks/map_maxima.py run/maps.h5 run_compact/maps.h5
"""

from __future__ import annotations

import json
import sys

import h5py
import numpy as np


def maxima(path: str) -> dict[str, float]:
    with h5py.File(path, "r") as h:
        return {p.decode(): float(np.nanmax(h["maps"][i])) for i, p in enumerate(h["path"][:])}


def compare(reference: dict[str, float], run: dict[str, float]) -> dict:
    common = sorted(set(reference) & set(run))
    r = np.array([run[p] / reference[p] for p in common])
    worst = common[int(np.argmax(r))]
    return {"images": len(common), "ratio_min": round(float(r.min()), 4), "ratio_median": round(float(np.median(r)), 4),
            "ratio_max": round(float(r.max()), 4), "above_1.5x": int((r > 1.5).sum()), "above_2x": int((r > 2).sum()),
            "worst": worst, "worst_reference_max": reference[worst], "worst_max": run[worst]}


def main() -> None:
    reference = maxima(sys.argv[1])
    for path in sys.argv[2:]:
        print(json.dumps({"bench": "map_maxima", "reference": sys.argv[1], "run": path,
                          **compare(reference, maxima(path))}))


if __name__ == "__main__":
    main()
