"""Timestep stages and segment plans (host-free)."""
import math

import pytest
import torch

from sefi_core.sefi.stages import (ActiveRange, even_boundaries, percent_to_timestep, plan_segments,
                              segment_of_timestep, stage_of_timestep, validate_boundaries)


def test_even_boundaries_split_1000_timesteps():
    assert even_boundaries(5) == (1000, 800, 600, 400, 200, 0)
    assert even_boundaries(1) == (1000, 0)
    assert len(even_boundaries(10)) == 11


@pytest.mark.parametrize("t, stage", [(999, 0), (800, 0), (799.99, 1), (600, 1), (599, 2), (200, 3), (199.5, 4), (0, 4)])
def test_stage_of_timestep_noisiest_first(t, stage):
    assert stage_of_timestep(t, even_boundaries(5)) == stage


def test_stage_of_timestep_tensor_matches_scalar():
    ts = torch.linspace(0, 999, 97)
    expected = [stage_of_timestep(float(t), even_boundaries(10)) for t in ts]
    assert stage_of_timestep(ts, even_boundaries(10)).tolist() == expected
    # each stage of the integer training timesteps holds 1000/S of them
    counts = torch.bincount(stage_of_timestep(torch.arange(1000.0), even_boundaries(5)))
    assert counts.tolist() == [200] * 5


def test_validate_boundaries_rejects_bad():
    with pytest.raises(ValueError):
        validate_boundaries((1000, 500, 500, 0), 3)
    with pytest.raises(ValueError):
        validate_boundaries((900, 0), 1)


def test_percent_to_timestep_follows_host_convention():
    assert percent_to_timestep(0.0) == math.inf
    assert percent_to_timestep(1.0) == -math.inf
    assert percent_to_timestep(0.25) == pytest.approx(0.75 * 999)


def test_plan_single_identity_is_its_stages():
    plan = plan_segments([(even_boundaries(5), ActiveRange())])
    assert plan.cuts == (800, 600, 400, 200)
    assert plan.stages == ((0,), (1,), (2,), (3,), (4,))


def test_plan_active_range_adds_cuts_and_switches_off():
    active = ActiveRange.from_percent(0.3, 0.7)  # timesteps [299.7, 699.3)
    plan = plan_segments([(even_boundaries(5), active)])
    assert plan.cuts == pytest.approx((800, 699.3, 600, 400, 299.7, 200))
    assert plan.stages == ((None,), (None,), (1,), (2,), (3,), (None,), (None,))


def test_plan_two_identities_with_different_stage_counts():
    plan = plan_segments([(even_boundaries(5), ActiveRange()), (even_boundaries(10), ActiveRange())])
    assert len(plan.cuts) == 9
    for g, (s5, s10) in enumerate(plan.stages):
        assert s5 == g // 2 and s10 == g


def test_segment_of_timestep_agrees_with_plan():
    plan = plan_segments([(even_boundaries(5), ActiveRange.from_percent(0.1, 0.9))])
    cuts = torch.tensor([plan.cuts])
    for t in [999.0, 950.0, 850.0, 700.0, 123.0, 50.0, 0.0]:
        g = int(segment_of_timestep(torch.tensor([t]), cuts))
        active = ActiveRange.from_percent(0.1, 0.9).contains(t)
        assert plan.stages[g][0] == (stage_of_timestep(t, even_boundaries(5)) if active else None)
