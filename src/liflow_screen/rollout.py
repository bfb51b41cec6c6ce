"""Batched LiFlow inference (paper Algorithm 1) over many (structure, temperature) pairs at once.

All G trajectories advance together in ONE :class:`GraphBatch`. Per Δτ step (1 ps by default):

1. the Propagator's :class:`Conditioning` of X_tau (periodic neighbour list on the device, edge
   vectors, unit vectors, radial features) is built once;
2. D ~ prior(sigma_prop) is Euler-integrated for ``n_flow`` steps (t = i / n_flow);
3. the Corrector is conditioned once on X~ = X_tau + D, D_c ~ prior(sigma_corr) is integrated the
   same way (``n_flow_corrector`` Euler steps), and X' = X~ + D_c; with ``corrector_every`` = k > 1
   only every k-th step is corrected (P P C for k = 2 ..., paper Appendix E.3), the others are X' = X~;
4. the CoM drift is removed per graph with atomic masses: X' <- X' - CoM(X') + CoM(X_tau).

Noise is drawn per graph from that graph's own generator (propagator draw, then corrector draw,
per attempt), so a graph's trajectory does not depend on which other graphs share the batch.
A graph whose step gives non-finite positions or moves any atom more than
``max_step_displacement`` Å is retried with fresh prior samples up to ``retries`` times, then
frozen at its last good frame and flagged diverged while the others continue.
Positions are never wrapped (unwrapped Cartesian, Å).

Long rollouts stream: with ``on_frame`` every frame goes to the callback as it is made and only the
current frame is kept in memory (a 1,000-step rollout of a 3,200-atom cell does not hold 1,001 frames).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor

from . import schema
from .errors import InputError
from .geometry import center_of_mass
from .model.graph import GraphBatch
from .model.painn import FlowModel
from .model.priors import sample_prior


@dataclass
class RolloutResult:
    """Trajectories of G graphs. Frames after a graph's last good step repeat that frame.

    A streamed rollout (``on_frame``) keeps only its final frame: ``positions`` is then (1, N, 3).
    """

    positions: Tensor    # (n_steps+1, N, 3) float32 Å, unwrapped, on CPU; frame 0 = input
    n_ok_steps: Tensor   # (G,) long, completed Δτ steps per graph
    diverged: Tensor     # (G,) bool
    reason: list[str]    # per graph, "" when ok
    ptr: Tensor          # (G+1,) atom offsets (as in the input batch)
    n_retries: Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.long))  # (G,) retries used
    wall_s: float = 0.0  # wall time of the whole batched rollout, s
    streamed: bool = False  # frames went to on_frame; positions holds the final frame only

    def trajectory(self, graph: int) -> np.ndarray:
        """(n_ok_steps+1, n_atoms, 3) float32 Å of one graph, up to its last good frame."""
        if self.streamed:
            raise InputError("a streamed rollout keeps no trajectory: its frames went to on_frame")
        lo, hi = int(self.ptr[graph]), int(self.ptr[graph + 1])
        return self.positions[: int(self.n_ok_steps[graph]) + 1, lo:hi].numpy()


def subset_batch(g: GraphBatch, graphs: Sequence[int]) -> tuple[GraphBatch, Tensor]:
    """The sub-batch of ``graphs`` (in that order) and the global atom indices it holds (N_sub,)."""
    dev = g.pos.device
    ptr = g.ptr.tolist()
    counts = [ptr[k + 1] - ptr[k] for k in graphs]
    atoms = torch.cat([torch.arange(ptr[k], ptr[k + 1], device=dev) for k in graphs])
    sel = torch.as_tensor(list(graphs), dtype=torch.long, device=dev)
    new_ptr = torch.zeros(len(graphs) + 1, dtype=torch.long, device=dev)
    new_ptr[1:] = torch.cumsum(torch.as_tensor(counts, device=dev), 0)
    sub = GraphBatch(
        numbers=g.numbers[atoms], pos=g.pos[atoms], cell=g.cell[sel],
        batch=torch.repeat_interleave(torch.arange(len(graphs), device=dev), torch.as_tensor(counts, device=dev)),
        ptr=new_ptr, temperature=g.temperature[sel], masses=g.masses[atoms],
    )
    return sub, atoms


def graph_generators(generator: torch.Generator | Sequence[torch.Generator], n_graphs: int) -> list[torch.Generator]:
    """One noise generator per graph: the given list, or G generators seeded from ``generator``."""
    if isinstance(generator, torch.Generator):
        seeds = torch.randint(0, 2**62, (n_graphs,), generator=generator, device=generator.device).tolist()
        return [torch.Generator(device=generator.device).manual_seed(int(s)) for s in seeds]
    gens = list(generator)
    if len(gens) != n_graphs:
        raise InputError(f"need one generator per graph ({n_graphs}), got {len(gens)}")
    return gens


def _draw(sigma: Tensor, ptr: list[int], gens: list[torch.Generator]) -> Tensor:
    """Prior sample for a sub-batch, each graph from its own generator (fixed per-graph order)."""
    return torch.cat([sample_prior(sigma[lo:hi], gen) for lo, hi, gen in zip(ptr[:-1], ptr[1:], gens)])


def integrate_flow(model: FlowModel, g: GraphBatch, d0: Tensor, n_flow: int) -> Tensor:
    """Euler integration of the model's flow from D_0 (N,3) Å over t = 0, 1/n, ..., (n-1)/n, with
    one Conditioning of g.pos built for all ``n_flow`` evaluations. Returns D_1 (N,3) Å."""
    cond = model.condition(g)
    d = d0
    t = torch.empty(g.n_graphs, dtype=d0.dtype, device=d0.device)
    for i in range(n_flow):
        d = d + model(d, t.fill_(i / n_flow), g, cond) / n_flow
    return d


def remove_com_drift(x_new: Tensor, g: GraphBatch) -> Tensor:
    """X' - CoM(X') + CoM(X_tau) per graph (masses in amu; X_tau = g.pos), Å."""
    shift = (center_of_mass(g.pos, g.masses, g.batch, g.n_graphs)
             - center_of_mass(x_new, g.masses, g.batch, g.n_graphs))
    return x_new + shift[g.batch]


def liflow_step(propagator: FlowModel, corrector: FlowModel | None, g: GraphBatch, d0_prop: Tensor | None,
                d0_corr: Tensor | None, n_flow: int, regressor: bool = False,
                max_step_displacement: float = math.inf, n_flow_corrector: int | None = None) -> tuple[Tensor, Tensor]:
    """One Δτ step of Algorithm 1 from X_tau = g.pos, given the prior draws (N,3) Å.

    Propagator: X~ = X_tau + D with D integrated from ``d0_prop`` (a regressor is called once at
    D = 0, t = 0 instead); Corrector (if any): conditioned on X~, D_c integrated from ``d0_corr``
    in ``n_flow_corrector`` (default ``n_flow``) Euler steps, X' = X~ + D_c; finally the CoM drift
    relative to X_tau is removed. Returns (X~, X'), Å.
    A graph already broken by the Propagator (non-finite, or an atom moved more than
    ``max_step_displacement`` Å) cannot be conditioned on: its Corrector sees X_tau instead, and
    the caller rejects the step.
    """
    if regressor:
        cond = propagator.condition(g)
        d = propagator(torch.zeros_like(g.pos), torch.zeros(g.n_graphs, device=g.pos.device), g, cond)
    else:
        d = integrate_flow(propagator, g, d0_prop, n_flow)
    x_prop = g.pos + d
    x_new = x_prop
    if corrector is not None:
        broken = _graph_any(~torch.isfinite(d).all(-1)
                            | (torch.linalg.vector_norm(d, dim=-1) > max_step_displacement), g)
        x_cond = torch.where(broken[g.batch].unsqueeze(-1), g.pos, x_prop)
        x_new = x_prop + integrate_flow(corrector, g.with_pos(x_cond), d0_corr,
                                        n_flow if n_flow_corrector is None else n_flow_corrector)
    return x_prop, remove_com_drift(x_new, g)


def _graph_any(flags: Tensor, g: GraphBatch) -> Tensor:
    """(G,) bool: whether any atom of each graph has its flag (N,) set."""
    return torch.zeros(g.n_graphs, dtype=torch.long, device=flags.device).index_add_(0, g.batch, flags.long()) > 0


def _check_sigma(sigma: Tensor | None, n_atoms: int, name: str) -> None:
    if sigma is None:
        raise InputError(f"{name} is required")
    if sigma.shape != (n_atoms,):
        raise InputError(f"{name} has shape {tuple(sigma.shape)}, expected ({n_atoms},)")
    if not bool(torch.isfinite(sigma).all()) or bool((sigma < 0).any()):
        raise InputError(f"{name} must be finite and >= 0 Å")


def rollout(
    propagator: FlowModel,
    corrector: FlowModel | None,
    g0: GraphBatch,
    sigma_prop: Tensor,
    sigma_corr: Tensor | None,
    n_steps: int,
    n_flow: int,
    generator: torch.Generator | Sequence[torch.Generator],
    max_step_displacement: float = 15.0,
    retries: int = 2,
    regressor: bool = False,
    progress: bool = False,
    corrector_every: int = 1,
    n_flow_corrector: int | None = None,
    on_frame: Callable[[int, np.ndarray, np.ndarray], None] | None = None,
) -> RolloutResult:
    """Run Algorithm 1 for every graph of ``g0`` (initial positions X_0 in Å, temperatures in K).

    sigma_prop / sigma_corr (N,) Å: Propagator / Corrector prior widths (see model.priors).
    ``generator``: one torch.Generator (per-graph generators are seeded from it) or one per graph.
    ``regressor``: the Propagator is a regressor, called once per step with d = 0, t = 0, whose
    output is the displacement (no prior sample). ``corrector=None`` skips the Corrector;
    ``corrector_every`` = k corrects steps k, 2k, ... only; ``n_flow_corrector`` its Euler steps.
    ``on_frame(frame, positions, good)``: called with frame 0 and after every step with the
    (N, 3) float32 Å positions of all graphs and the (G,) bool of graphs whose frame is a real one
    (False once a graph has diverged); the result then keeps only the final frame (streamed).
    ``progress``: a tqdm bar over the steps.
    """
    n_atoms, n_graphs = int(g0.pos.shape[0]), g0.n_graphs
    if n_steps < 1 or n_flow < 1:
        raise InputError(f"n_steps and n_flow must be >= 1 (got {n_steps}, {n_flow})")
    if retries < 0 or not max_step_displacement > 0:
        raise InputError("retries must be >= 0 and max_step_displacement > 0 Å")
    if corrector_every < 1 or (n_flow_corrector is not None and n_flow_corrector < 1):
        raise InputError(f"corrector_every and n_flow_corrector must be >= 1 (got {corrector_every}, {n_flow_corrector})")
    if n_graphs == 0 or n_atoms == 0:
        raise InputError("empty graph batch")
    if not bool(torch.isfinite(g0.pos).all()):
        raise InputError("initial positions contain NaN or inf")
    dev = g0.pos.device
    sigma_prop = torch.zeros(n_atoms, device=dev) if (regressor and sigma_prop is None) else sigma_prop
    _check_sigma(sigma_prop, n_atoms, "sigma_prop")
    if corrector is not None:
        _check_sigma(sigma_corr, n_atoms, "sigma_corr")
    gens = graph_generators(generator, n_graphs)
    sigma_prop = sigma_prop.to(dev, g0.pos.dtype)
    sigma_corr = sigma_corr.to(dev, g0.pos.dtype) if corrector is not None and sigma_corr is not None else None

    t_start = time.perf_counter()
    stream = on_frame is not None
    positions = torch.empty(1 if stream else n_steps + 1, n_atoms, 3, dtype=torch.float32)
    positions[0] = g0.pos.detach().to("cpu", torch.float32)
    if stream:
        on_frame(0, positions[0].numpy(), np.ones(n_graphs, dtype=bool))
    n_ok = torch.zeros(n_graphs, dtype=torch.long)
    diverged = torch.zeros(n_graphs, dtype=torch.bool)
    n_retries = torch.zeros(n_graphs, dtype=torch.long)
    reason = [""] * n_graphs
    x = g0.pos.detach().clone()
    subsets: dict[tuple[int, ...], tuple[GraphBatch, Tensor]] = {}

    def sub_for(graphs: tuple[int, ...]) -> tuple[GraphBatch, Tensor]:
        if graphs == tuple(range(n_graphs)):
            return g0, torch.arange(n_atoms, device=dev)
        if graphs not in subsets:
            subsets.clear()  # keep only the latest (active set changes rarely)
            subsets[graphs] = subset_batch(g0, graphs)
        return subsets[graphs]

    def one_step(graphs: tuple[int, ...], correct: bool) -> tuple[Tensor, Tensor, GraphBatch]:
        """Propose X' for ``graphs`` from X_tau = x; returns (X' (N_sub,3), atom index, sub-batch)."""
        sub, atoms = sub_for(graphs)
        sub = sub.with_pos(x[atoms])
        ptr = sub.ptr.tolist()
        sub_gens = [gens[k] for k in graphs]
        corr = corrector if correct else None
        d0_p = None if regressor else _draw(sigma_prop[atoms], ptr, sub_gens)
        d0_c = _draw(sigma_corr[atoms], ptr, sub_gens) if corr is not None else None
        _, x_new = liflow_step(propagator, corr, sub, d0_p, d0_c, n_flow, regressor=regressor,
                               max_step_displacement=max_step_displacement, n_flow_corrector=n_flow_corrector)
        return x_new, atoms, sub

    steps = range(n_steps)
    if progress:
        from tqdm.auto import tqdm
        steps = tqdm(steps, desc=f"rollout {n_graphs} graphs", unit="step", mininterval=10.0)
    with torch.no_grad():
        for step in steps:
            active = tuple(k for k in range(n_graphs) if not diverged[k])
            if not active:
                break
            pending = active
            why: dict[int, str] = {}
            correct = corrector is not None and (step + 1) % corrector_every == 0
            for attempt in range(retries + 1):
                x_new, atoms, sub = one_step(pending, correct)
                disp = torch.linalg.vector_norm(x_new - sub.pos, dim=-1)
                disp = torch.nan_to_num(disp, nan=float("inf"))
                max_disp = torch.full((sub.n_graphs,), 0.0, device=dev).scatter_reduce(
                    0, sub.batch, disp, reduce="amax", include_self=True).cpu()
                finite = ~_graph_any(~torch.isfinite(x_new).all(-1), sub).cpu()
                ok = finite & (max_disp <= max_step_displacement)
                ok_atoms = ok.to(dev)[sub.batch]
                x[atoms[ok_atoms]] = x_new[ok_atoms]
                failed = []
                for local, k in enumerate(pending):
                    if ok[local]:
                        continue
                    failed.append(k)
                    why[k] = ("non-finite positions" if not finite[local]
                              else f"max displacement {float(max_disp[local]):.3g} Å > {max_step_displacement:g} Å")
                if attempt > 0:
                    n_retries[list(pending)] += 1
                pending = tuple(failed)
                if not pending:
                    break
            for k in pending:
                diverged[k] = True
                reason[k] = f"diverged at step {step + 1}: {why[k]} (after {retries} retries)"
            done = [k for k in active if k not in pending]
            n_ok[done] += 1
            frame = x.detach().to("cpu", torch.float32)
            if stream:
                positions[0] = frame
                on_frame(step + 1, frame.numpy(), (~diverged).numpy())
            else:
                positions[step + 1] = frame
    # stored frames after a frozen graph's last good step repeat that frame
    ptr = g0.ptr.cpu()
    if not stream:
        for k in range(n_graphs):
            last = int(n_ok[k])
            if last < n_steps:
                lo, hi = int(ptr[k]), int(ptr[k + 1])
                positions[last + 1:, lo:hi] = positions[last, lo:hi]
    return RolloutResult(positions=positions, n_ok_steps=n_ok, diverged=diverged, reason=reason, ptr=ptr,
                         n_retries=n_retries, wall_s=time.perf_counter() - t_start, streamed=stream)


def frame_rows(frame: int, positions: np.ndarray, ptr: Sequence[int], graphs: Sequence[int], ids: Sequence[str],
               temperatures: Sequence[float], source: str, dt_ps: float) -> list[dict]:
    """``schema.FRAMES`` rows of one frame of the given ``graphs`` (positions (N, 3) Å of the whole
    batch, atom offsets ``ptr``); time_ps = frame * dt_ps. Each row also carries ``temperature``
    (int K) for the caller's partitioning (``to_table`` ignores it); positions are copied."""
    return [{"id": str(ids[k]), "source": source, "frame": int(frame), "time_ps": float(frame * dt_ps),
             "positions": np.array(positions[ptr[k]:ptr[k + 1]], dtype=np.float32).reshape(-1),
             "energy": None, "temperature_inst": None, "temperature": int(round(float(temperatures[k])))}
            for k in graphs]


def rollout_status_rows(result: RolloutResult, ids: Sequence[str], temperatures: Sequence[float], source: str,
                        dt_ps: float, split: str | Sequence[str] = "test", wall_s: float | None = None) -> list[dict]:
    """``schema.STATUS`` rows, one per graph: status ok | diverged, n_frames, duration_ps.

    ``wall_s`` defaults to the batched rollout's wall time shared equally by its graphs.
    """
    n_graphs = len(result.reason)
    if len(ids) != n_graphs or len(temperatures) != n_graphs:
        raise InputError(f"need {n_graphs} ids and temperatures, got {len(ids)} and {len(temperatures)}")
    splits = [split] * n_graphs if isinstance(split, str) else list(split)
    share = (result.wall_s if wall_s is None else wall_s) / n_graphs
    return [schema.status_row(ids[k], temperatures[k], splits[k], source,
                              "diverged" if bool(result.diverged[k]) else "ok", result.reason[k],
                              int(result.n_ok_steps[k]) + 1, int(result.n_ok_steps[k]) * dt_ps, share)
            for k in range(n_graphs)]
