"""95 % confidence intervals for the accuracy of a report cell: a grid cell holds 6-20 samples, so a mean alone
cannot tell a real drop from a few unlucky keys (issue #23 asks for an interval per cell).

Pass/fail scores (every score 0 or 1) get the Wilson score interval, which stays inside [0, 1] and is sensible at
0/n and n/n where the normal approximation collapses to a point; partial-credit scores get a Student t-interval
on the mean, clipped to [0, 1]. Plain Python (no scipy): the t quantiles are a table and an expansion."""

from __future__ import annotations

import math

#: the two-sided 95 % normal quantile
Z95 = 1.959964

#: the 97.5 % quantile of Student's t for 1..30 degrees of freedom (standard tables, 4 decimals)
_T975 = (12.7062, 4.3027, 3.1824, 2.7764, 2.5706, 2.4469, 2.3646, 2.3060, 2.2622, 2.2281, 2.2010, 2.1788, 2.1604,
         2.1448, 2.1314, 2.1199, 2.1098, 2.1009, 2.0930, 2.0860, 2.0796, 2.0739, 2.0687, 2.0639, 2.0595, 2.0555,
         2.0518, 2.0484, 2.0452, 2.0423)


def wilson_interval(k: int, n: int, z: float = Z95) -> tuple[float, float] | None:
    """The Wilson score interval of ``k`` successes in ``n`` trials (95 % by default); None when ``n`` is 0 (no
    sample, no interval)."""
    if n <= 0:
        return None
    if not 0 <= k <= n:
        raise ValueError(f"k={k} successes out of n={n} trials: k must be between 0 and n")
    p = k / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def t975(df: int) -> float:
    """Student's t 97.5 % quantile: the table up to 30 degrees of freedom, a Cornish-Fisher expansion beyond
    (within 1e-4 of the exact value there)."""
    if df < 1:
        raise ValueError(f"df={df}: a t quantile needs at least one degree of freedom")
    if df <= len(_T975):
        return _T975[df - 1]
    z = Z95
    return (z + (z ** 3 + z) / (4 * df) + (5 * z ** 5 + 16 * z ** 3 + 3 * z) / (96 * df ** 2)
            + (3 * z ** 7 + 19 * z ** 5 + 17 * z ** 3 - 15 * z) / (384 * df ** 3))


def is_binary(scores) -> bool:
    """Whether every score is exactly 0 or 1 (pass/fail), the case the Wilson interval is for."""
    return all(s in (0, 1) for s in scores)


def score_interval(scores) -> dict:
    """The interval of the mean of ``scores`` (Nones dropped): ``n``, ``k`` (successes, pass/fail scores only),
    ``ci_low``, ``ci_high`` and ``ci_method`` (``wilson``, ``t``, or None when there is no interval: no sample, or
    one partial-credit sample)."""
    xs = [s for s in scores if s is not None]
    n = len(xs)
    out = {"n": n, "k": None, "ci_low": None, "ci_high": None, "ci_method": None}
    if n and is_binary(xs):
        k = int(sum(xs))
        lo, hi = wilson_interval(k, n)
        return {**out, "k": k, "ci_low": lo, "ci_high": hi, "ci_method": "wilson"}
    if n >= 2:
        mean = sum(xs) / n
        sd = math.sqrt(sum((x - mean) ** 2 for x in xs) / (n - 1))
        half = t975(n - 1) * sd / math.sqrt(n)
        return {**out, "ci_low": max(0.0, mean - half), "ci_high": min(1.0, mean + half), "ci_method": "t"}
    return out


def format_score(scores, digits: int = 2) -> str:
    """A report cell: ``0.80 (16/20, 0.58-0.92)`` for pass/fail scores (Wilson), ``0.53 (20, t 0.41-0.65)`` for
    partial credit (t-interval), ``0.40 (1, n/a)`` for one partial-credit sample, ``-`` without samples."""
    xs = [s for s in scores if s is not None]
    if not xs:
        return "-"
    ci = score_interval(xs)
    mean = f"{sum(xs) / len(xs):.{digits}f}"
    bounds = (f"{ci['ci_low']:.{digits}f}-{ci['ci_high']:.{digits}f}" if ci["ci_method"] else "n/a")
    if ci["ci_method"] == "wilson":
        return f"{mean} ({ci['k']}/{ci['n']}, {bounds})"
    return f"{mean} ({ci['n']}, {'t ' if ci['ci_method'] == 't' else ''}{bounds})"


#: the note under a table whose cells :func:`format_score` wrote
NOTE = ("Accuracy cells: mean (k/n, 95 % Wilson score interval) when every score is 0 or 1 (pass/fail); "
        "mean (n, t lo-hi) is a 95 % Student t-interval on the mean, clipped to [0, 1], for partial-credit "
        "scores (n/a with one such sample).")
