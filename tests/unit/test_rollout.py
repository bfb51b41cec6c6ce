"""Batched LiFlow rollout (Algorithm 1): shapes, CoM, divergence handling, batching, caching."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from liflow_screen.io import schema
from liflow_screen.core.errors import InputError
from liflow_screen.core.geometry import center_of_mass
from liflow_screen.flow.graph import GraphBatch, make_batch
from liflow_screen.flow.painn import Conditioning, FlowModel
from liflow_screen.flow.priors import counter_normal, prior_sigma
from liflow_screen.flow.engine import frame_rows, rollout, subset_batch

SMALL = dict(features=16, radial=8, layers=2)


class Counting(FlowModel):
    """A FlowModel that counts condition() and forward() calls and records (d, t, cond)."""

    def __init__(self, **kw) -> None:
        super().__init__(**kw)
        self.n_condition = 0
        self.calls: list[tuple[torch.Tensor, torch.Tensor, bool]] = []

    def condition(self, g: GraphBatch) -> Conditioning:
        self.n_condition += 1
        return super().condition(g)

    def forward(self, d, t, g, cond=None):  # type: ignore[override]
        self.calls.append((d.clone(), torch.as_tensor(t).clone(), cond is not None))
        return super().forward(d, t, g, cond)


class Zero(FlowModel):
    """Vector field identically zero: a step is then exactly the prior samples."""

    def forward(self, d, t, g, cond=None):  # type: ignore[override]
        return torch.zeros_like(d)


class BlowUp(FlowModel):
    """Returns ``value`` for atoms of graphs at ``bad_temperature`` K (identified by T, not index)."""

    def __init__(self, bad_temperature: float, value: float, **kw) -> None:
        super().__init__(**kw)
        self.bad_temperature, self.value, self.n_condition = bad_temperature, value, 0

    def condition(self, g: GraphBatch) -> Conditioning:
        self.n_condition += 1
        return super().condition(g)

    def forward(self, d, t, g, cond=None):  # type: ignore[override]
        out = super().forward(d, t, g, cond)
        bad = (g.temperature[g.batch] == self.bad_temperature).unsqueeze(-1)
        sign = (torch.arange(len(d)) % 2 * 2 - 1).to(out.dtype).unsqueeze(-1)  # not a pure translation
        return torch.where(bad, self.value * sign.expand_as(out), out)


def crystals(seed: int = 0) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(seed)
    out = []
    for n, a in ((8, 4.2), (6, 3.9)):
        cell = np.diag([a, a * 1.1, a * 0.95]) + 0.3 * rng.uniform(-1, 1, (3, 3)) * (1 - np.eye(3))
        numbers = np.array([3, 3, 3, 16, 16, 15, 8, 3][:n])
        out.append((numbers, rng.uniform(0, 1, (n, 3)) @ cell, cell))
    return out


def batch_of(cs, temps) -> GraphBatch:
    return make_batch([c[0] for c in cs], [c[1] for c in cs], [c[2] for c in cs], temps)


def gens(*seeds: int) -> list[torch.Generator]:
    return [torch.Generator().manual_seed(s) for s in seeds]


def test_shapes_units_and_exact_prior_step() -> None:
    """With zero vector fields a step is X + D_prop + D_corr minus the CoM shift, with prior widths in Å."""
    g = batch_of(crystals(), [600.0, 1000.0])
    sp = prior_sigma(g, "uniform", scale=1.0)
    sc = prior_sigma(g, "isotropic", scale=0.05)
    res = rollout(Zero(**SMALL), Zero(**SMALL), g, sp, sc, n_steps=3, n_flow=4, generator=gens(1, 2))
    n = len(g.pos)
    assert res.positions.shape == (4, n, 3) and res.positions.dtype == torch.float32
    assert res.n_ok_steps.tolist() == [3, 3] and res.diverged.tolist() == [False, False]
    assert res.reason == ["", ""]
    assert torch.equal(res.positions[0], g.pos)
    # replay the counter-based noise by hand, graph by graph: key drawn from each graph's generator,
    # counter (step, draw) with draw 0 = Propagator, 1 = Corrector, atom index within the graph
    keys = [torch.randint(0, 2**32, (1, 2), generator=gen, dtype=torch.long) for gen in gens(1, 2)]
    x = g.pos.clone()
    ptr = g.ptr.tolist()

    def draw(k: int, lo: int, hi: int, step: int, kind: int, sigma: torch.Tensor) -> torch.Tensor:
        z = counter_normal(keys[k].expand(hi - lo, 2), torch.arange(hi - lo), torch.tensor([step, kind]))
        return z * sigma[lo:hi, None]

    for step in range(3):
        new = []
        for k in range(2):
            lo, hi = ptr[k], ptr[k + 1]
            xk = x[lo:hi] + draw(k, lo, hi, step, 0, sp) + draw(k, lo, hi, step, 1, sc)
            m = g.masses[lo:hi, None]
            xk = xk - (m * xk).sum(0) / m.sum() + (m * x[lo:hi]).sum(0) / m.sum()
            new.append(xk)
        x = torch.cat(new)
        np.testing.assert_allclose(res.positions[step + 1].numpy(), x.numpy(), atol=1e-5)
    # mean-square step of Li at 1000 K ~ 3 (sigma_MB^2 + 0.05^2) Å^2 (loose: few atoms)
    assert 0.0 < (res.positions[1] - res.positions[0]).abs().max() < 1.0


def test_com_drift_removed() -> None:
    g = batch_of(crystals(1), [800.0, 1200.0])
    sp = prior_sigma(g, "uniform", scale=3.0)
    res = rollout(FlowModel(**SMALL, seed=1), FlowModel(**SMALL, seed=2), g, sp,
                  prior_sigma(g, "isotropic", scale=0.1), n_steps=4, n_flow=3, generator=torch.Generator().manual_seed(0))
    com0 = center_of_mass(g.pos, g.masses, g.batch, 2)
    moved = 0.0
    for f in range(1, 5):
        com = center_of_mass(res.positions[f], g.masses, g.batch, 2)
        assert (com - com0).abs().max() < 1e-4
        moved = max(moved, float((res.positions[f] - g.pos).abs().max()))
    assert moved > 0.05  # atoms did move


@pytest.mark.parametrize("value", [float("nan"), 1.0e3])
def test_divergent_graph_is_frozen_others_complete(value: float) -> None:
    g = batch_of(crystals(2), [700.0, 1234.0])
    model = BlowUp(1234.0, value, **SMALL)
    sp = prior_sigma(g, "uniform")
    res = rollout(model, None, g, sp, None, n_steps=3, n_flow=2, generator=gens(5, 6), retries=2)
    assert res.diverged.tolist() == [False, True]
    assert res.n_ok_steps.tolist() == [3, 0]
    assert res.n_retries.tolist() == [0, 2]
    assert "step 1" in res.reason[1] and ("non-finite" if value != value else "max displacement") in res.reason[1]
    assert res.reason[0] == ""
    # step 1: one batched attempt + 2 retries of graph 1 alone; steps 2, 3: graph 0 alone
    assert model.n_condition == 3 + 2
    lo = int(g.ptr[1])
    for f in range(4):  # frozen graph keeps its last good frame (the initial one)
        assert torch.equal(res.positions[f, lo:], g.pos[lo:])
    assert torch.isfinite(res.positions).all()
    assert (res.positions[3, :lo] != g.pos[:lo]).any()
    assert res.trajectory(1).shape == (1, len(g.pos) - lo, 3) and res.trajectory(0).shape == (4, lo, 3)
    # the good graph is unaffected by its diverging neighbour
    alone = rollout(BlowUp(1234.0, value, **SMALL), None, subset_batch(g, [0])[0], sp[:lo], None,
                    n_steps=3, n_flow=2, generator=gens(5))
    np.testing.assert_allclose(alone.positions.numpy(), res.positions[:, :lo].numpy(), atol=1e-5)


def test_batched_equals_single_with_same_noise() -> None:
    cs = crystals(3)
    temps = [650.0, 1100.0]
    g = batch_of(cs, temps)
    prop, corr = FlowModel(**SMALL, seed=4), FlowModel(**SMALL, seed=5)
    sp, sc = prior_sigma(g, "uniform", scale=2.0), prior_sigma(g, "isotropic", scale=0.05)
    both = rollout(prop, corr, g, sp, sc, n_steps=3, n_flow=3, generator=gens(11, 12))
    lo = int(g.ptr[1])
    for k, (sl, seed) in enumerate([(slice(0, lo), 11), (slice(lo, None), 12)]):
        gk = batch_of([cs[k]], [temps[k]])
        one = rollout(prop, corr, gk, sp[sl], sc[sl], n_steps=3, n_flow=3, generator=gens(seed))
        np.testing.assert_allclose(one.positions.numpy(), both.positions[:, sl].numpy(), atol=2e-5)
    # different noise gives a different trajectory (the comparison above can fail)
    other = rollout(prop, corr, g, sp, sc, n_steps=3, n_flow=3, generator=gens(11, 13))
    assert torch.equal(other.positions[:, :lo], both.positions[:, :lo])
    assert (other.positions[1:, lo:] - both.positions[1:, lo:]).abs().max() > 1e-3


def test_conditioning_built_once_per_step() -> None:
    g = batch_of(crystals(4), [900.0, 900.0])
    prop, corr = Counting(**SMALL, seed=1), Counting(**SMALL, seed=2)
    sp, sc = prior_sigma(g, "uniform"), prior_sigma(g, "isotropic", scale=0.05)
    rollout(prop, corr, g, sp, sc, n_steps=3, n_flow=5, generator=torch.Generator().manual_seed(1))
    assert prop.n_condition == 3 and corr.n_condition == 3
    assert len(prop.calls) == 15 and len(corr.calls) == 15
    assert all(has_cond for _, _, has_cond in prop.calls + corr.calls)
    assert [float(t[0]) for _, t, _ in prop.calls[:5]] == pytest.approx([0.0, 0.2, 0.4, 0.6, 0.8])


def test_regressor_single_call_with_zero_input() -> None:
    g = batch_of(crystals(5), [1000.0, 600.0])
    prop = Counting(**SMALL, seed=3)
    res = rollout(prop, None, g, prior_sigma(g, "uniform"), None, n_steps=2, n_flow=10,
                  generator=torch.Generator().manual_seed(0), regressor=True)
    assert len(prop.calls) == 2 and prop.n_condition == 2
    for d, t, _ in prop.calls:
        assert torch.equal(d, torch.zeros_like(d)) and torch.equal(t, torch.zeros_like(t))
    with torch.no_grad():
        step = FlowModel(**SMALL, seed=3)(torch.zeros_like(g.pos), torch.zeros(2), g)
    x = g.pos + step
    x = x - center_of_mass(x, g.masses, g.batch, 2)[g.batch] + center_of_mass(g.pos, g.masses, g.batch, 2)[g.batch]
    np.testing.assert_allclose(res.positions[1].numpy(), x.numpy(), atol=1e-5)


def test_rows_match_schema_and_bad_input() -> None:
    g = batch_of(crystals(6), [700.0, 1234.0])
    sp = prior_sigma(g, "uniform")
    stored = rollout(BlowUp(1234.0, float("nan"), **SMALL), None, g, sp, None, n_steps=2, n_flow=2,
                     generator=gens(1, 2), retries=0)
    rows: list[dict] = []
    ptr = g.ptr.tolist()
    res = rollout(BlowUp(1234.0, float("nan"), **SMALL), None, g, sp, None, n_steps=2, n_flow=2,
                  generator=gens(1, 2), retries=0,
                  on_frame=lambda f, x, ok: rows.extend(frame_rows(f, x, ptr, [k for k in (0, 1) if ok[k]], ["a", "b"],
                                                                   [700.0, 1234.0], "liflow:adaptive", 1.0)))
    rows.sort(key=lambda r: (r["id"], r["frame"]))
    assert [(r["id"], r["frame"]) for r in rows] == [("a", 0), ("a", 1), ("a", 2), ("b", 0)]
    assert rows[2]["time_ps"] == 2.0 and rows[2]["positions"].shape == (8 * 3,)
    assert {r.pop("temperature") for r in rows} == {700, 1234}
    np.testing.assert_array_equal(rows[2]["positions"], stored.positions[2, :8].numpy().ravel())
    table = schema.to_table(rows, "frames")
    assert table.schema.equals(schema.FRAMES) and table.num_rows == 4
    assert res.diverged.tolist() == [False, True] and res.n_ok_steps.tolist() == [2, 0]
    status = [schema.status_row(i, T, "test", "liflow:adaptive", "diverged" if bad else "ok", why, int(n) + 1, float(n))
              for i, T, bad, why, n in zip("ab", (700.0, 1234.0), res.diverged.tolist(), res.reason, res.n_ok_steps)]
    table = schema.to_table(status, "status")
    assert table.num_rows == 2 and table.column("replica").to_pylist() == [0, 0]
    with pytest.raises(InputError):
        rollout(FlowModel(**SMALL), None, g, sp[:3], None, n_steps=1, n_flow=1, generator=gens(1, 2))
    with pytest.raises(InputError):
        rollout(FlowModel(**SMALL), FlowModel(**SMALL), g, sp, None, n_steps=1, n_flow=1, generator=gens(1, 2))
    with pytest.raises(InputError):
        rollout(FlowModel(**SMALL), None, g, sp, None, n_steps=0, n_flow=1, generator=gens(1, 2))
    with pytest.raises(InputError):
        rollout(FlowModel(**SMALL), None, g, sp, None, n_steps=1, n_flow=1, generator=gens(1))


def test_corrector_every_k_steps_and_its_own_flow_steps() -> None:
    """corrector_every=2, n_flow_corrector=2: steps 1, 3 are Propagator only (no corrector draw), steps
    2, 4 are P + C with 2 Euler steps: replayed by hand with liflow_step and the same per-graph draws."""
    from liflow_screen.flow.engine import liflow_step

    g = batch_of(crystals(6)[:1], [900.0])
    prop, corr = Counting(**SMALL, seed=7), Counting(**SMALL, seed=8)
    sp, sc = prior_sigma(g, "uniform", scale=2.0), prior_sigma(g, "isotropic", scale=0.05)
    res = rollout(prop, corr, g, sp, sc, n_steps=4, n_flow=3, generator=gens(21), corrector_every=2,
                  n_flow_corrector=2)
    assert corr.n_condition == 2 and len(corr.calls) == 2 * 2  # 2 corrected steps x 2 Euler steps
    assert prop.n_condition == 4 and len(prop.calls) == 4 * 3
    key, x = torch.randint(0, 2**32, (1, 2), generator=gens(21)[0], dtype=torch.long), g.pos.clone()
    idx = torch.arange(len(x))
    with torch.no_grad():
        for step in range(4):
            d0p = counter_normal(key.expand(len(x), 2), idx, torch.tensor([step, 0])) * sp[:, None]
            correct = (step + 1) % 2 == 0
            d0c = counter_normal(key.expand(len(x), 2), idx, torch.tensor([step, 1])) * sc[:, None] if correct else None
            _, x = liflow_step(prop, corr if correct else None, g.with_pos(x), d0p, d0c, 3, n_flow_corrector=2)
            np.testing.assert_allclose(res.positions[step + 1].numpy(), x.numpy(), atol=1e-5)
    every = rollout(prop, corr, g, sp, sc, n_steps=4, n_flow=3, generator=gens(21))
    assert (every.positions[1] - res.positions[1]).abs().max() > 1e-4  # k = 1 corrects step 1: differs
    with pytest.raises(InputError, match="corrector_every"):
        rollout(prop, corr, g, sp, sc, n_steps=1, n_flow=1, generator=gens(1), corrector_every=0)


@pytest.mark.parametrize("value", [float("nan"), 1.0e3])
def test_streamed_rollout_same_frames_bounded_memory(value: float) -> None:
    """on_frame gets every frame (the same as the stored rollout); a diverged graph's frames stop
    being marked good; the result keeps the final frame only."""
    g = batch_of(crystals(7), [700.0, 1234.0])
    sp, sc = prior_sigma(g, "uniform"), prior_sigma(g, "isotropic", scale=0.05)
    stored = rollout(BlowUp(1234.0, value, **SMALL), FlowModel(**SMALL, seed=3), g, sp, sc, n_steps=3, n_flow=2,
                     generator=gens(5, 6), retries=0)
    seen: list[tuple[int, np.ndarray, np.ndarray]] = []
    res = rollout(BlowUp(1234.0, value, **SMALL), FlowModel(**SMALL, seed=3), g, sp, sc, n_steps=3, n_flow=2,
                  generator=gens(5, 6), retries=0, on_frame=lambda f, x, ok: seen.append((f, x.copy(), ok.copy())))
    assert [s[0] for s in seen] == [0, 1, 2, 3]
    for f, x, ok in seen:
        np.testing.assert_array_equal(x, stored.positions[f].numpy())
        assert ok.tolist() == ([True, True] if f == 0 else [True, False])
    assert res.streamed and res.positions.shape == (1, len(g.pos), 3)
    assert torch.equal(res.positions[0], stored.positions[-1])
    assert res.n_ok_steps.tolist() == stored.n_ok_steps.tolist() == [3, 0]
    with pytest.raises(InputError, match="streamed"):
        res.trajectory(0)
