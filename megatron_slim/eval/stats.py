"""Noise of a held-out loss: the standard error over evaluation windows, and paired differences between two models.

A held-out loss is the mean of per-window losses; windows differ far more from each other (topic, length of the
documents, how predictable the text is) than two similar models differ on one window. Comparing two models by
their separate standard errors therefore drowns small real differences in between-window variance. Evaluated on
the SAME windows, the per-window differences d_i = a_i - b_i cancel what the windows share, and the standard error
of mean(d) measures only how consistently one model beats the other.

Plain float64 arithmetic on sequences or tensors; no I/O.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch


@dataclass(frozen=True)
class PairedDiff:
    """mean(a - b) over shared windows, its standard error, the number of windows, and whether |mean| > 2 se."""

    mean: float
    se: float  # nan for a single window
    n: int
    significant: bool


def _as_float64(values: Sequence[float] | torch.Tensor, name: str) -> np.ndarray:
    """A 1-D float64 array of at least one value."""
    if isinstance(values, torch.Tensor):
        values = values.detach().to("cpu", torch.float64).numpy()
    array = np.asarray(values, dtype=np.float64)
    if array.ndim != 1 or array.size == 0:
        raise ValueError(f"{name}: expected a non-empty 1-D sequence of values, got shape {array.shape}")
    return array


def mean_se(values: Sequence[float] | torch.Tensor) -> tuple[float, float]:
    """(mean, standard error of the mean) with se = sample std (ddof=1) / sqrt(n).

    One value has no spread to estimate: its se is nan (never 0, which would claim certainty)."""
    x = _as_float64(values, "mean_se")
    mean = float(x.mean())
    if x.size == 1:
        return mean, math.nan
    return mean, float(x.std(ddof=1) / math.sqrt(x.size))


def paired_difference(a: Sequence[float] | torch.Tensor, b: Sequence[float] | torch.Tensor) -> PairedDiff:
    """Paired comparison of two models' per-window values on the same windows, in the same order: d_i = a_i - b_i.

    Significant iff |mean(d)| > 2 se(d) with at least two windows (about 95% two-sided for a normal mean); pairing
    removes the between-window variance that unpaired standard errors would include."""
    x, y = _as_float64(a, "paired_difference a"), _as_float64(b, "paired_difference b")
    if x.size != y.size:
        raise ValueError(f"paired_difference needs values of the same windows: got {x.size} and {y.size} values")
    mean, se = mean_se(x - y)
    return PairedDiff(mean=mean, se=se, n=int(x.size), significant=bool(x.size >= 2 and abs(mean) > 2 * se))


def _seed_se(per_seed: np.ndarray) -> float:
    """Standard error of the mean over training seeds; 0 for one seed (its spread is unmeasured, and the window
    term alone then describes the comparison, as for a single run)."""
    return float(per_seed.std(ddof=1) / math.sqrt(per_seed.size)) if per_seed.size > 1 else 0.0


def replicated_mean(runs: Sequence[Sequence[float]]) -> tuple[float, float]:
    """(mean, standard error) of a held-out loss measured by several training seeds of one model on the same
    windows: runs[s][w] is seed s's loss on window w. The error combines the windows' (over the seed-averaged
    per-window losses) and the seeds' (over the seeds' mean losses); one seed gives `mean_se` of its windows."""
    x = np.stack([_as_float64(r, "replicated_mean") for r in runs])
    mean, window_se = mean_se(x.mean(axis=0))
    return mean, math.sqrt(window_se ** 2 + _seed_se(x.mean(axis=1)) ** 2)


def replicated_difference(a: Sequence[Sequence[float]], b: Sequence[Sequence[float]]) -> PairedDiff:
    """Paired comparison of two models each trained with the same training seeds (a[s], b[s]: seed s's per-window
    losses on the same windows). mean: the mean over seeds and windows of a - b; its standard error combines the
    window term (paired, over the seed-averaged differences) with the seed term (the spread of the seeds' mean
    differences: how much the verdict would move with the data order and initialisation). One seed gives
    `paired_difference`."""
    x = np.stack([_as_float64(r, "replicated_difference a") for r in a])
    y = np.stack([_as_float64(r, "replicated_difference b") for r in b])
    if x.shape != y.shape:
        raise ValueError(f"replicated_difference needs the same seeds and windows: got {x.shape} and {y.shape}")
    window = paired_difference(x.mean(axis=0), y.mean(axis=0))
    se = math.sqrt(window.se ** 2 + _seed_se((x - y).mean(axis=1)) ** 2)
    significant = bool(window.n >= 2 and abs(window.mean) > 2 * se)
    return PairedDiff(mean=window.mean, se=se, n=window.n, significant=significant)
