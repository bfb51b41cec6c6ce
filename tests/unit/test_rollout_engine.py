"""The batched rollout engine's design on CPU (CI has no GPU): host work per step that does not grow
with the number of structures, one batched neighbour list per conditioning, counter-based noise,
static-shape padding, atom-budget batching and the precision switch."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from liflow_screen.core import seeds
from liflow_screen.core.geometry import radius_graph_pbc, radius_graph_pbc_vesin
from liflow_screen.flow import painn
from liflow_screen.flow.graph import make_batch
from liflow_screen.flow.painn import FlowModel
from liflow_screen.flow.priors import counter_normal, philox4x32, prior_sigma
from liflow_screen.flow.engine import rollout
from liflow_screen.flow.batching import pack_batches

SMALL = dict(features=16, radial=8, layers=2)


def random_crystals(n: int, seed: int, n_atoms: tuple[int, int] = (3, 12), size: tuple[float, float] = (3.0, 9.0)):
    """``n`` triclinic cells (some narrower than the 5 Å cutoff) with unwrapped positions up to two
    cells outside the box."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        a = rng.uniform(*size)
        cell = np.diag([a, a * rng.uniform(0.8, 1.25), a * rng.uniform(0.8, 1.25)])
        cell += rng.uniform(-0.3, 0.3, (3, 3)) * a * (1 - np.eye(3))
        k = int(rng.integers(*n_atoms))
        numbers = rng.choice([3, 8, 15, 16], size=k)
        numbers[0] = 3
        out.append((numbers, rng.uniform(-2.0, 3.0, (k, 3)) @ cell, cell))
    return out


def batch(cs, temps=None):
    temps = temps if temps is not None else [600.0 + 100 * (k % 4) for k in range(len(cs))]
    return make_batch([c[0] for c in cs], [c[1] for c in cs], [c[2] for c in cs], temps)


# ----------------------------------------------------------------------------- neighbour list
@pytest.mark.parametrize("cutoff", [5.0, 2.5])
def test_batched_cell_list_equals_vesin_edge_for_edge(cutoff: float) -> None:
    """The one-call batched cell list gives vesin's edge set, in the same canonical order, with the
    same Cartesian image shifts, on triclinic cells narrower than the cutoff and unwrapped input;
    also when forced into many atom chunks."""
    g = batch(random_crystals(25, seed=1))
    e_ref, s_ref = radius_graph_pbc_vesin(g.pos, g.cell, g.batch, cutoff, g.ptr)
    for max_candidates in (None, 997):
        e, s = radius_graph_pbc(g.pos, g.cell, g.batch, cutoff, g.ptr, max_candidates=max_candidates)
        assert e.shape[1] > len(g.pos)
        assert torch.equal(e, e_ref)
        assert torch.equal(s, s_ref)
    # the edges are the pairs with |x_j + S - x_i| < cutoff, checked against a brute-force image scan
    k = 3
    lo, hi = int(g.ptr[k]), int(g.ptr[k + 1])
    p, c = g.pos[lo:hi].double(), g.cell[k].double()
    n = 8
    rng = torch.arange(-n, n + 1, dtype=torch.float64)
    images = torch.cartesian_prod(rng, rng, rng) @ c
    vec = p[None, :, None, :] + images[None, None] - p[:, None, None, :]          # (i, j, image, 3)
    d = vec.norm(dim=-1)
    want = int(((d < cutoff) & (d > 1e-9)).sum())
    mine = int(((e[0] >= lo) & (e[0] < hi)).sum())
    assert mine == want


# ----------------------------------------------------------------------------- noise
def test_philox_known_answers_and_normal_moments() -> None:
    """Philox4x32-10 reproduces Random123's known-answer vectors; the Box–Muller variates have the
    moments of a standard normal."""
    m = 0xFFFFFFFF
    t = lambda x: torch.tensor([x], dtype=torch.long)  # noqa: E731
    cases = [((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
             ((m, m, m, m), (m, m), (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
             ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
              (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1))]
    for ctr, key, want in cases:
        got = philox4x32(tuple(t(c) for c in ctr), (t(key[0]), t(key[1])))
        assert [int(x) for x in got] == list(want)
    keys = torch.tensor([[11, 22]]).expand(100_000, 2)
    z = counter_normal(keys, torch.arange(100_000), torch.tensor([5, 1])).double()
    assert z.shape == (100_000, 3)
    np.testing.assert_allclose(z.mean(0).numpy(), 0.0, atol=0.015)
    np.testing.assert_allclose(z.var(0).numpy(), 1.0, atol=0.02)
    np.testing.assert_allclose((z**4).mean(0).numpy(), 3.0, atol=0.1)
    assert abs(float(torch.corrcoef(z.T)[0, 1])) < 0.015
    # another counter or key gives other numbers; the same gives the same
    assert torch.equal(z, counter_normal(keys, torch.arange(100_000), torch.tensor([5, 1])).double())
    assert not torch.equal(z[:10], counter_normal(keys[:10], torch.arange(10), torch.tensor([5, 2])).double())
    assert not torch.equal(z[:10], counter_normal(keys[:10] + 1, torch.arange(10), torch.tensor([5, 1])).double())


def test_noise_keys_come_from_the_seed_recipe() -> None:
    k1 = seeds.rollout_key(3, "emb-Li3N", 900.0, seeds.ROLLOUT)
    assert k1 == seeds.rollout_key(3, "emb-Li3N", 900.0, seeds.ROLLOUT)
    assert k1 != seeds.rollout_key(3, "emb-Li3N", 900.0, seeds.PILOT)
    assert all(0 <= w < 2**32 for w in k1)


# ----------------------------------------------------------------------------- host work per step
class _Count(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.n = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.n += 1
        return func(*args, **(kwargs or {}))


def _ops_and_nl_calls(n_graphs: int, n_steps: int, monkeypatch) -> tuple[int, int]:
    cs = random_crystals(n_graphs, seed=7, n_atoms=(6, 10), size=(6.0, 8.0))
    g = batch(cs)
    prop, corr = FlowModel(**SMALL, seed=1).eval(), FlowModel(**SMALL, seed=2).eval()
    sp, sc = prior_sigma(g, "uniform", 1.0), prior_sigma(g, "isotropic", 0.05)
    keys = torch.tensor([seeds.rollout_key(0, f"s{k}", 700.0, seeds.ROLLOUT) for k in range(n_graphs)])
    calls = []

    def counted(*a, **k):
        calls.append(1)
        return radius_graph_pbc(*a, **k)

    monkeypatch.setattr(painn, "radius_graph_pbc", counted)
    with _Count() as mode:
        rollout(prop, corr, g, sp, sc, n_steps=n_steps, n_flow=3, generator=keys, edge_chunk=None)
    return mode.n, len(calls)


def test_dispatched_ops_per_step_do_not_grow_with_structures(monkeypatch) -> None:
    """The GPU design, guarded on CPU: the torch operations dispatched per rollout step (the
    difference between 3- and 2-step rollouts) are the same for 1 and 64 structures (±5 %), and the
    neighbour list is one batched call per conditioning (Propagator + Corrector: 2 per step)."""
    per_step, nl = {}, {}
    for n_graphs in (1, 64):
        ops3, nl3 = _ops_and_nl_calls(n_graphs, 3, monkeypatch)
        ops2, nl2 = _ops_and_nl_calls(n_graphs, 2, monkeypatch)
        per_step[n_graphs], nl[n_graphs] = ops3 - ops2, nl3 - nl2
    assert nl == {1: 2, 64: 2}
    assert per_step[1] > 100
    assert abs(per_step[64] - per_step[1]) <= 0.05 * per_step[1], per_step


# ----------------------------------------------------------------------------- batch independence
def test_a_structure_rolls_out_the_same_alone_or_in_any_batch() -> None:
    """Counter-based noise: a structure's trajectory is the same alone, in a batch of 5, and in a
    batch in another order (same key), bit for bit on CPU."""
    cs = random_crystals(5, seed=3, n_atoms=(6, 10), size=(6.0, 8.0))
    temps = [650.0, 700.0, 900.0, 1000.0, 1200.0]
    keys = torch.tensor([seeds.rollout_key(1, f"s{k}", temps[k], seeds.ROLLOUT) for k in range(5)])
    prop, corr = FlowModel(**SMALL, seed=4).eval(), FlowModel(**SMALL, seed=5).eval()

    def run(idx: list[int]):
        g = batch([cs[k] for k in idx], [temps[k] for k in idx])
        sp, sc = prior_sigma(g, "uniform", 2.0), prior_sigma(g, "isotropic", 0.05)
        return g, rollout(prop, corr, g, sp, sc, n_steps=3, n_flow=3, generator=keys[idx])

    g_all, all5 = run([0, 1, 2, 3, 4])
    g_rev, rev = run([4, 3, 2, 1, 0])
    g_one, one = run([2])
    lo, hi = int(g_all.ptr[2]), int(g_all.ptr[3])
    assert torch.equal(one.positions, all5.positions[:, lo:hi])
    lo_r, hi_r = int(g_rev.ptr[2]), int(g_rev.ptr[3])
    assert torch.equal(rev.positions[:, lo_r:hi_r], all5.positions[:, lo:hi])
    assert (all5.positions[-1, lo:hi] - all5.positions[0, lo:hi]).abs().max() > 1e-2  # it moved


# ----------------------------------------------------------------------------- static shapes, precision
def test_padded_conditioning_adds_exactly_nothing() -> None:
    """Inert padding edges (static shapes for CUDA graphs) leave the field unchanged."""
    g = batch(random_crystals(3, seed=5, n_atoms=(6, 10), size=(6.0, 8.0)))
    model = FlowModel(**SMALL, seed=6).eval()
    model.set_edge_chunk(None)
    d = 0.2 * torch.randn(g.pos.shape, generator=torch.Generator().manual_seed(0))
    t = torch.full((g.n_graphs,), 0.4)
    with torch.no_grad():
        cond = model.condition(g)
        ref = model(d, t, g, cond)
        pad = model(d, t, g, cond.padded(cond.n_edges + 1000))
    assert pad.abs().max() > 1e-4
    np.testing.assert_allclose(pad.numpy(), ref.numpy(), rtol=0, atol=1e-6)


def test_bf16_precision_is_opt_in_and_close() -> None:
    """precision bf16 changes the numbers (autocast matrix products) but stays close to fp32;
    an unknown precision is refused."""
    from liflow_screen.core.errors import InputError

    g = batch(random_crystals(2, seed=8, n_atoms=(6, 10), size=(6.0, 8.0)))
    prop, corr = FlowModel(**SMALL, seed=1).eval(), FlowModel(**SMALL, seed=2).eval()
    sp, sc = prior_sigma(g, "uniform", 1.0), prior_sigma(g, "isotropic", 0.05)
    keys = torch.tensor([[1, 2], [3, 4]])
    runs = {p: rollout(prop, corr, g, sp, sc, n_steps=1, n_flow=3, generator=keys, precision=p)
            for p in ("fp32", "tf32", "bf16")}
    assert torch.equal(runs["fp32"].positions, runs["tf32"].positions)  # TF32 is a CUDA-only switch
    dev = (runs["bf16"].positions[1] - runs["fp32"].positions[1]).abs().max()
    step = (runs["fp32"].positions[1] - runs["fp32"].positions[0]).abs().max()
    assert 0 < dev < 0.05 * step
    with pytest.raises(InputError, match="precision"):
        rollout(prop, corr, g, sp, sc, n_steps=1, n_flow=1, generator=keys, precision="fp8")


def test_batches_packed_by_atoms() -> None:
    """Pairs sorted by cell size and packed up to the atom budget (and the optional pair cap); a cell
    larger than the budget gets a batch of its own."""
    n_atoms = {"a": 10, "b": 40, "c": 100, "d": 500}
    jobs = [(sid, T, "test") for sid in "dcba" for T in (600.0, 900.0)]
    out = pack_batches(jobs, n_atoms, 100)
    assert [[(j[0], j[1]) for j in b] for b in out] == [
        [("a", 600.0), ("a", 900.0), ("b", 600.0), ("b", 900.0)], [("c", 600.0)], [("c", 900.0)],
        [("d", 600.0)], [("d", 900.0)]]
    assert all(sum(n_atoms[j[0]] for j in b) <= 100 or len(b) == 1 for b in out)
    capped = pack_batches(jobs, n_atoms, 10_000, max_structures=3)
    assert [len(b) for b in capped] == [3, 3, 2]
    assert sorted(j for b in capped for j in b) == sorted(jobs)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (CI has none)")
def test_cuda_graph_replay_equals_eager_on_gpu() -> None:
    g = batch(random_crystals(8, seed=9, n_atoms=(6, 10), size=(6.0, 8.0))).to("cuda")
    prop, corr = FlowModel(**SMALL, seed=1).eval().cuda(), FlowModel(**SMALL, seed=2).eval().cuda()
    sp, sc = prior_sigma(g, "uniform", 1.0), prior_sigma(g, "isotropic", 0.05)
    keys = torch.arange(16).reshape(8, 2)
    a = rollout(prop, corr, g, sp, sc, n_steps=4, n_flow=3, generator=keys, cuda_graphs=True)
    b = rollout(prop, corr, g, sp, sc, n_steps=4, n_flow=3, generator=keys, cuda_graphs=False)
    np.testing.assert_allclose(a.positions.numpy(), b.positions.numpy(), atol=1e-4)


def test_a_failed_compilation_falls_back_to_eager(monkeypatch, caplog) -> None:
    """A torch.compile backend failure (e.g. no working Triton) logs a warning and the rollout goes
    on uncompiled, with the same numbers as an uncompiled run; other errors still propagate."""
    import liflow_screen.flow.engine as ro

    class Broken(RuntimeError):
        pass

    def broken_field(model):
        def fail(*args):
            raise Broken("backend failed")
        return fail

    g = batch(random_crystals(2, seed=2, n_atoms=(6, 10), size=(6.0, 8.0)))
    prop, corr = FlowModel(**SMALL, seed=1).eval(), FlowModel(**SMALL, seed=2).eval()
    sp, sc = prior_sigma(g, "uniform", 1.0), prior_sigma(g, "isotropic", 0.05)
    keys = torch.tensor([[1, 2], [3, 4]])
    ref = rollout(prop, corr, g, sp, sc, n_steps=2, n_flow=2, generator=keys, edge_chunk=None)
    monkeypatch.setattr(painn, "compiled_field", broken_field)
    monkeypatch.setattr(ro, "_is_compile_failure", lambda exc: isinstance(exc, Broken))
    with caplog.at_level("WARNING"):
        got = rollout(prop, corr, g, sp, sc, n_steps=2, n_flow=2, generator=keys, compile=True)
    assert "torch.compile failed" in caplog.text
    assert torch.equal(got.positions, ref.positions)
    monkeypatch.setattr(ro, "_is_compile_failure", lambda exc: False)
    with pytest.raises(Broken):
        rollout(prop, corr, g, sp, sc, n_steps=1, n_flow=2, generator=keys, compile=True)

