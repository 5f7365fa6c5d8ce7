"""Per-step schedules (paper App. A.1): warm-up + cosine lr, BYOL's cosine EMA momentum."""
import math

import pytest

from mscn.train.schedule import ema_at, lr_at


def test_lr_warmup_is_linear_and_reaches_peak():
    peak = 4.8
    assert lr_at(0, 100, 10, peak) == pytest.approx(peak / 10)
    assert lr_at(4, 100, 10, peak) == pytest.approx(peak * 5 / 10)
    assert lr_at(9, 100, 10, peak) == pytest.approx(peak)
    assert lr_at(10, 100, 10, peak) == pytest.approx(peak)  # cosine starts at the peak


def test_lr_cosine_midpoint_end_and_floor():
    peak, total, warm = 2.0, 110, 10
    assert lr_at(60, total, warm, peak) == pytest.approx(1.0)  # halfway through the cosine
    assert lr_at(total, total, warm, peak) == pytest.approx(0.0, abs=1e-12)
    assert lr_at(total, total, warm, peak, min_lr_ratio=0.1) == pytest.approx(0.2)
    assert lr_at(60, total, warm, peak, min_lr_ratio=0.1) == pytest.approx(0.2 + 1.8 / 2)
    values = [lr_at(s, total, warm, peak) for s in range(warm, total)]
    assert all(a >= b for a, b in zip(values, values[1:]))  # monotone decay after warm-up


def test_lr_without_warmup_starts_at_peak():
    assert lr_at(0, 50, 0, 1.5) == pytest.approx(1.5)


def test_ema_cosine_from_base_to_final():
    assert ema_at(0, 1000, 0.996, 1.0) == pytest.approx(0.996)
    assert ema_at(500, 1000, 0.996, 1.0) == pytest.approx(0.998)
    assert ema_at(1000, 1000, 0.996, 1.0) == pytest.approx(1.0)
    s = 250
    expected = 1.0 - 0.004 * (math.cos(math.pi * s / 1000) + 1) / 2
    assert ema_at(s, 1000, 0.996, 1.0) == pytest.approx(expected)
    values = [ema_at(k, 100, 0.99, 1.0) for k in range(101)]
    assert all(a <= b for a, b in zip(values, values[1:]))
