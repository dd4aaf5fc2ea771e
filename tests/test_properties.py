"""Property-based checks (hypothesis) of the composer, the region plan and the metrics on random small volumes."""

import numpy as np
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from custom.metrics import dice_per_label, jacobian_stats
from custom.plan import RegionPlan

SETTINGS = settings(max_examples=25, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])


@st.composite
def label_pair(draw):
    """Random (fixed, moving) label maps (1, 1, X, Y, Z) with 1-4 ids and a random seed for fields."""
    shape = tuple(draw(st.integers(4, 9)) for _ in range(3))
    n = draw(st.integers(1, 4))
    seed = draw(st.integers(0, 2**16))
    rng = np.random.default_rng(seed)
    fixed = rng.integers(0, n + 1, shape)
    moving = np.where(rng.random(shape) < 0.3, rng.integers(0, n + 1, shape), fixed)
    t = lambda a: torch.as_tensor(a, dtype=torch.float32)[None, None]  # noqa: E731
    return t(fixed), t(moving), seed


@SETTINGS
@given(label_pair(), st.integers(0, 3))
def test_composed_field_equals_each_sub_field_inside_its_region(pair, margin):
    fixed, moving, seed = pair
    plan = RegionPlan.build(fixed, moving, margin=margin, warn=False)
    gen = torch.Generator().manual_seed(seed)
    subs = [torch.randn([1, 3] + plan.box_shape(i), generator=gen) for i in range(len(plan))]
    u = plan.compose(subs)
    assert torch.isfinite(u).all()
    for i, r in enumerate(plan.regions):
        full = torch.zeros_like(u)
        full[(slice(None), slice(None)) + plan.boxes[i]] = subs[i]
        inside = fixed[0, 0] == r
        torch.testing.assert_close(u[0][:, inside], full[0][:, inside])
    # every fixed voxel of a registered region lies in that region's box
    for i, r in enumerate(plan.regions):
        box_mask = torch.zeros_like(fixed[0, 0], dtype=torch.bool)
        box_mask[plan.boxes[i]] = True
        assert bool(box_mask[fixed[0, 0] == r].all())


@SETTINGS
@given(label_pair())
def test_dice_is_a_percentage_and_perfect_on_identical_maps(pair):
    fixed, moving, _ = pair
    ids = sorted({int(v) for v in torch.unique(fixed)} - {0}) or [1]
    d = dice_per_label(moving, fixed, ids)
    ok = d[~torch.isnan(d)]
    assert ((ok >= 0) & (ok <= 100)).all()
    same = dice_per_label(fixed, fixed, ids)
    assert torch.all(torch.isnan(same) | (same == 100))


@SETTINGS
@given(st.tuples(st.integers(5, 10), st.integers(5, 10), st.integers(5, 10)), st.floats(-3, 3), st.integers(0, 2))
def test_jacobian_of_identity_and_translations_is_one(shape, shift, border):
    ddf = torch.full((1, 3) + shape, float(shift))
    stats = jacobian_stats(ddf, border=border)
    assert stats["sdlogj"] < 1e-6 and stats["neg_jac_count"] == 0


@SETTINGS
@given(label_pair())
def test_no_nan_out_of_finite_input(pair):
    fixed, moving, seed = pair
    from custom.inferer import SegRegInferer

    class Net(torch.nn.Module):
        def forward(self, x):
            return torch.tanh(x[:, :1].repeat(1, 3, 1, 1, 1) - x[:, 1:].repeat(1, 3, 1, 1, 1))

    gen = torch.Generator().manual_seed(seed)
    images = torch.rand((1, 2) + tuple(fixed.shape[2:]), generator=gen)
    with torch.no_grad():
        out = SegRegInferer(margin=1, divisor=1, num_steps=3)(images, Net(), fixed, moving)
    assert all(torch.isfinite(v).all() for v in out.values())
