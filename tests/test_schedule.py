import math

import pytest

from vitdist.schedule import lr_at

KW = dict(lr=1e-3, min_lr=1e-5, warmup_steps=10, total_steps=110)


def test_first_step_is_not_wasted():
    assert lr_at(0, **KW) == pytest.approx(1e-4)


def test_warmup_is_linear_and_reaches_peak():
    assert [lr_at(s, **KW) for s in range(10)] == pytest.approx([1e-4 * (s + 1) for s in range(10)])
    assert lr_at(9, **KW) == pytest.approx(1e-3)
    assert lr_at(10, **KW) == pytest.approx(1e-3)


def test_cosine_midpoint_and_end():
    assert lr_at(60, **KW) == pytest.approx((1e-3 + 1e-5) / 2)
    assert lr_at(110, **KW) == pytest.approx(1e-5)
    last = lr_at(109, **KW)
    assert 1e-5 < last < 1e-5 + 1e-6
    assert all(lr_at(s, **KW) > lr_at(s + 1, **KW) for s in range(10, 109))


def test_past_the_end_stays_at_min_lr():
    assert lr_at(10_000, **KW) == pytest.approx(1e-5)


def test_no_warmup():
    assert lr_at(0, lr=1.0, min_lr=0.0, warmup_steps=0, total_steps=4) == pytest.approx(1.0)
    assert lr_at(2, lr=1.0, min_lr=0.0, warmup_steps=0, total_steps=4) == pytest.approx(0.5 * (1 + math.cos(math.pi / 2)))
