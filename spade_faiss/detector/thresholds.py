"""The thresholds of a Spade: calibration at a false-positive rate on held-out normal images,
overrides, and a calibration-free estimate for pictures (a mixin of :class:`Spade`)."""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable

import numpy as np

from .. import metrics

LOO_THETA = "leave_one_out_theta"  # the corpus attribute keeping it

# A threshold this many times the median held-out score says the held-out set holds outliers.
OUTLIER_RATIO = 10.0


class Thresholds:
    """``tau_`` (image) and ``theta_`` (pixel) thresholds; needs the Spade's corpus and scoring."""

    def calibrate(self, normals: Iterable, fpr: float = 0.01, on_progress=None) -> dict:
        """Set ``tau_`` and ``theta_`` at false-positive rate ``fpr`` over held-out normal
        images and their pixels, store them in the corpus and return the record.

        Images already in the corpus are refused: their distances to themselves are 0, which
        would give thresholds that flag every new normal image.
        """
        metrics.check_fpr(fpr)
        indexed = set(self.store_.sha256s())
        scores, maps, errors = [], [], []
        for r in self.iter_score(normals, maps=True, on_progress=on_progress):
            if r.error:
                errors.append(r.error)
                continue
            if r.image.sha256 in indexed:
                raise ValueError(f"{r.path} is in the corpus: calibrate on held-out normal images that "
                                 f"were not indexed (e.g. hold out every 10th image before `index`)")
            scores.append(r.score)
            maps.append(r.map)
        if not scores:
            raise ValueError("calibrate: none of the normal images could be scored")
        tau = metrics.threshold_at_fpr(scores, fpr)
        above = int(np.sum(np.asarray(scores) > tau))
        th = {"tau": tau, "theta": metrics.threshold_at_fpr(np.stack(maps), fpr), "fpr": fpr,
              "n_images": len(scores), "images_above_tau": above, "skipped": errors,
              "scoring": self.config_.scoring_dict()}
        needed = math.ceil(1 / fpr) if fpr > 0 else None
        if needed and len(scores) < needed:
            warnings.warn(f"calibrate: {len(scores)} held-out images cannot support fpr={fpr} (about {needed} are "
                          f"needed): tau is the largest of their scores ({above} above it); give more held-out "
                          f"normal images, or a larger --fpr", stacklevel=2)
        median = float(np.median(scores))
        if median > 0 and tau > OUTLIER_RATIO * median:
            warnings.warn(f"calibrate: tau={tau:.4g} is {tau / median:.0f}x the median held-out score ({median:.4g}): "
                          f"some held-out images are far from the corpus; are they all normal?", stacklevel=2)
        self.store_.write_thresholds(th)
        self.calibration_, self.tau_, self.theta_ = th, th["tau"], th["theta"]
        return th

    def set_thresholds(self, tau: float | None = None, theta: float | None = None):
        """Override the calibrated thresholds for this object (not stored); None keeps one."""
        self.tau_ = self.tau_ if tau is None else float(tau)
        self.theta_ = self.theta_ if theta is None else float(theta)
        return self

    def leave_one_out_theta(self, n_images: int = 8, fpr: float = 0.01) -> float:
        """A pixel threshold estimated without held-out images (see
        :meth:`QueryPipeline.leave_one_out_theta`): a calibration-free colour scale for
        pictures. Kept per corpus size and scoring parameters, in the object and, when this
        process may write the corpus file, in the file (``index`` stores it, so that a
        one-image ``score`` process does not pay for it)."""
        self._check_ready()
        key = {"images": len(self.store_), "n_images": n_images, "fpr": fpr, "scoring": self.config_.scoring_dict()}
        if getattr(self, "_loo_", (None,))[0] != key:
            stored = self.store_.estimate(LOO_THETA)
            if stored is not None and {k: v for k, v in stored.items() if k != "theta"} == key:
                theta = stored["theta"]
            else:
                theta = self.pipeline_.leave_one_out_theta(n_images, fpr, self.config_, self.options_,
                                                           self.search_device_)
                if self.store_.writable:
                    self.store_.write_estimate(LOO_THETA, {**key, "theta": theta})
            self._loo_ = (key, theta)
        return self._loo_[1]
