import math

import pytest

from pipeline.bounds import choose_n_terms, flow_bias_bound_bits_per_dim, logdet_bounds, power_series_truncation_bound


def test_theorem_3_bound_is_the_series_tail():
    for lip in (0.1, 0.5, 0.9):
        tail = sum(lip**k / k for k in range(8, 4000))
        assert power_series_truncation_bound(lip, 3, 7) == pytest.approx(3 * tail, rel=1e-9)


def test_lemma_7():
    low, high = logdet_bounds(0.5, 4)
    assert low == pytest.approx(4 * math.log(0.5)) and high == pytest.approx(4 * math.log(1.5))


def test_choose_n_terms_is_minimal():
    lips, dims = [0.7, 0.6], [784, 392]
    n = choose_n_terms(lips, dims, 784, tol_bits_per_dim=1e-4)
    assert flow_bias_bound_bits_per_dim(lips, dims, n, 784) < 1e-4
    assert flow_bias_bound_bits_per_dim(lips, dims, n - 1, 784) >= 1e-4
    with pytest.raises(ValueError, match="no n <= 3"):
        choose_n_terms([0.99], [10], 10, max_terms=3)
    with pytest.raises(ValueError, match="Lip"):
        power_series_truncation_bound(1.0, 1, 5)
