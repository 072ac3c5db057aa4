"""Analytic bounds of the paper, used to pick estimator settings and to test estimators.

* Theorem 3: the power series truncated after ``n`` terms is off by at most
  ``-d (ln(1 - L) + sum_{k=1}^n L^k / k) = d * sum_{k>n} L^k / k`` (``L = Lip(g)``, ``d`` the dimension).
* Lemma 7: ``d * ln(1 - L) <= ln det(I + J_g) <= d * ln(1 + L)``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence


def _check_lipschitz(lip: float) -> None:
    if not 0.0 <= lip < 1.0:
        raise ValueError(f"the bound needs 0 <= Lip(g) < 1, got {lip}")


def power_series_truncation_bound(lip: float, dim: int, n_terms: int) -> float:
    """Theorem 3: worst-case ``|PS(J, n) - ln det(I + J)|`` in nats for one block."""
    _check_lipschitz(lip)
    head = sum(lip**k / k for k in range(1, n_terms + 1))
    # -ln(1-L) - head, computed without cancellation for small L
    tail = -math.log1p(-lip) - head
    return dim * max(tail, 0.0)


def logdet_bounds(lip: float, dim: int) -> tuple[float, float]:
    """Lemma 7 for one block: ``(d ln(1 - L), d ln(1 + L))``."""
    _check_lipschitz(lip)
    return dim * math.log1p(-lip), dim * math.log1p(lip)


def flow_bias_bound_bits_per_dim(lips: Sequence[float], dims: Sequence[int], n_terms: int, total_dim: int) -> float:
    """Theorem 3 summed over blocks, in bits per data dimension."""
    nats = sum(power_series_truncation_bound(lip, d, n_terms) for lip, d in zip(lips, dims, strict=True))
    return nats / (total_dim * math.log(2))


def choose_n_terms(
    lips: Sequence[float], dims: Sequence[int], total_dim: int, *, tol_bits_per_dim: float = 1e-4, max_terms: int = 500
) -> int:
    """Fewest series terms whose Theorem-3 bias bound is below ``tol_bits_per_dim`` (App. C.3)."""
    for n in range(1, max_terms + 1):
        if flow_bias_bound_bits_per_dim(lips, dims, n, total_dim) < tol_bits_per_dim:
            return n
    worst = max(lips, default=0.0)
    raise ValueError(
        f"no n <= {max_terms} brings the Theorem 3 bias under {tol_bits_per_dim} bits/dim "
        f"(largest block Lipschitz bound {worst:.4f}); raise max_terms or the tolerance"
    )
