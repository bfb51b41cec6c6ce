"""Batched LiFlow inference (paper Algorithm 1) over many (structure, temperature) pairs at once.

All G trajectories advance together in ONE :class:`GraphBatch`. Per Δτ step (1 ps by default):

1. the Propagator's :class:`Conditioning` of X_tau (periodic neighbour list on the device, edge
   vectors, unit vectors, radial features) is built once;
2. D ~ prior(sigma_prop) is Euler-integrated for ``n_flow`` steps (t = i / n_flow);
3. the Corrector is conditioned once on X~ = X_tau + D, D_c ~ prior(sigma_corr) is integrated the
   same way (``n_flow_corrector`` Euler steps), and X' = X~ + D_c; with ``corrector_every`` = k > 1
   only every k-th step is corrected (P P C for k = 2 ..., paper Appendix E.3), the others are X' = X~;
4. the CoM drift is removed per graph with atomic masses: X' <- X' - CoM(X') + CoM(X_tau).

Noise is counter-based (Philox4x32-10, ``flow.priors.counter_normal``): every prior sample is a pure
function of (the graph's key, step, attempt, Propagator/Corrector, atom), drawn for the whole batch in
one go, so a graph's trajectory does not depend on which other graphs share the batch.
Host work per step does not grow with the number of graphs: one batched neighbour list per
conditioning, one noise draw per model, one divergence check (one host sync) per step; on CUDA each
flow integration is replayed from a captured CUDA graph.
A graph whose step gives non-finite positions or moves any atom more than
``max_step_displacement`` Å is retried with fresh prior samples up to ``retries`` times, then
frozen at its last good frame and flagged diverged while the others continue.
Positions are never wrapped (unwrapped Cartesian, Å).

Long rollouts stream: with ``on_frame`` every frame goes to the callback as it is made and only the
current frame is kept in memory (a 1,000-step rollout of a 3,200-atom cell does not hold 1,001 frames).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ..io import schema
from ..core.errors import InputError
from ..core.geometry import center_of_mass
from .graph import GraphBatch
from .painn import FlowModel
from .priors import counter_normal

log = logging.getLogger(__name__)


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


def rollout_keys(generator: torch.Generator | Sequence[torch.Generator] | Sequence[tuple[int, int]] | Tensor,
                 n_graphs: int) -> Tensor:
    """(G, 2) int64 keys (two 32-bit words) of each graph's counter-based noise stream.

    ``generator``: a (G, 2) tensor or a sequence of G (k0, k1) pairs of keys (``seeds.rollout_key``),
    one torch.Generator (G keys drawn from it) or one generator per graph (one key drawn from each)."""
    if not isinstance(generator, (Tensor, torch.Generator)):
        items = list(generator)
        if items and not isinstance(items[0], torch.Generator):
            generator = torch.tensor([tuple(int(w) for w in k) for k in items], dtype=torch.long)
    if isinstance(generator, Tensor):
        keys = generator.to("cpu", torch.long).reshape(-1, 2)
        if keys.shape[0] != n_graphs:
            raise InputError(f"need one noise key per graph ({n_graphs}), got {keys.shape[0]}")
        if bool(((keys < 0) | (keys > 0xFFFFFFFF)).any()):
            raise InputError("noise keys must be 32-bit words (0 <= k < 2^32)")
        return keys
    if isinstance(generator, torch.Generator):
        return torch.randint(0, 2**32, (n_graphs, 2), generator=generator, device=generator.device,
                             dtype=torch.long).cpu()
    gens = list(generator)
    if len(gens) != n_graphs:
        raise InputError(f"need one generator per graph ({n_graphs}), got {len(gens)}")
    return torch.cat([torch.randint(0, 2**32, (1, 2), generator=gen, device=gen.device, dtype=torch.long).cpu()
                      for gen in gens])


#: Noise draws per (step, attempt): the Propagator's prior sample and the Corrector's.
DRAW_PROPAGATOR, DRAW_CORRECTOR = 0, 1
PRECISIONS = ("fp32", "tf32", "bf16")


def draw_counter(step: int, attempt: int, kind: int) -> tuple[int, int]:
    """Counter words (step, draw) of the prior sample ``kind`` at ``step`` (0-based) and retry
    ``attempt``: a graph's noise is a function of (its key, step, attempt, kind, atom) only."""
    return int(step), 4 * int(attempt) + int(kind)


def integrate_flow(model: FlowModel, g: GraphBatch, d0: Tensor, n_flow: int, cond: Any = None) -> Tensor:
    """Euler integration of the model's flow from D_0 (N,3) Å over t = 0, 1/n, ..., (n-1)/n, with
    one Conditioning of g.pos (built here unless given) for all ``n_flow`` evaluations.
    Returns D_1 (N,3) Å. No host sync inside the loop."""
    cond = model.condition(g) if cond is None else cond
    d = d0
    t = torch.empty(g.n_graphs, dtype=d0.dtype, device=d0.device)
    for i in range(n_flow):
        d = d + model(d, t.fill_(i / n_flow), g, cond) / n_flow
    return d


class _Stream:
    """Per-atom noise stream data of a (sub-)batch: keys (N,2), atom index within its graph (N,)."""

    def __init__(self, keys_graph: Tensor, g: GraphBatch) -> None:
        self.keys = keys_graph.to(g.pos.device)[g.batch]
        self.index = torch.arange(g.pos.shape[0], device=g.pos.device) - g.ptr.to(g.pos.device)[g.batch]

    def normal(self, counter: Tensor, dtype: torch.dtype) -> Tensor:
        return counter_normal(self.keys, self.index, counter, dtype)


#: Edge capacity of a captured CUDA graph, relative to the edges of the step that captured it (a
#: crystal's edge count moves by ~1 % between steps; a step that needs more recaptures).
EDGE_HEADROOM = 1.05


class FlowRunner:
    """Prior draw + Euler flow integration of one model over a (sub-)batch: eagerly, or replayed
    from a captured CUDA graph. Shapes are static in a graph: the conditioning is padded with inert
    edges to a capacity (5 % headroom; a step that needs more captures again), one capture per
    (sub-batch, capacity). The counter (step, draw) lives in a device tensor, so the noise is drawn
    inside the graph too."""

    def __init__(self, model: FlowModel, n_flow: int, cuda_graph: bool) -> None:
        self.model, self.n_flow, self.cuda_graph = model, int(n_flow), bool(cuda_graph)
        self._key: tuple | None = None
        self._graph: Any = None
        self._static: dict[str, Any] = {}

    def eager(self, g: GraphBatch, cond: Any, sigma: Tensor, stream: _Stream, counter: Tensor) -> Tensor:
        d0 = stream.normal(counter, g.pos.dtype) * sigma.unsqueeze(-1)
        return integrate_flow(self.model, g, d0, self.n_flow, cond)

    def __call__(self, g: GraphBatch, cond: Any, sigma: Tensor, stream: _Stream, counter: tuple[int, int],
                 replay: bool = True) -> Tensor:
        """D_1 (N,3) Å; ``replay=False`` runs eagerly even with CUDA graphs (retries: rare, small
        sub-batches, not worth a capture)."""
        if not (self.cuda_graph and replay):
            return self.eager(g, cond, sigma, stream, torch.tensor(counter, device=g.pos.device))
        st = self._static
        key = (id(g.batch), int(g.pos.shape[0]))
        if self._key is None or self._key[:2] != key or cond.n_edges > self._key[2]:
            cap = max(int(cond.n_edges * EDGE_HEADROOM) // 1024 * 1024 + 1024, 4096)
            self._capture(g, cond.padded(cap), sigma, stream, key + (cap,))
        else:
            padded = cond.padded(self._key[2])
            for name in ("edge_index", "vec1", "unit1", "rbfc1", "fcut1"):  # what the field reads
                getattr(st["cond"], name).copy_(getattr(padded, name))
        st["counter"][0].fill_(counter[0])
        st["counter"][1].fill_(counter[1])
        self._graph.replay()
        return st["out"].clone()

    def _capture(self, g: GraphBatch, cond: Any, sigma: Tensor, stream: _Stream, key: tuple) -> None:
        st = self._static
        st.clear()
        self._graph = None
        st["cond"] = cond
        st["g"], st["sigma"], st["stream"] = g, sigma, stream
        st["counter"] = torch.zeros(2, dtype=torch.long, device=g.pos.device)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up (allocator, cuBLAS handles, compiled kernels)
            self.eager(g, cond, sigma, stream, st["counter"])
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            st["out"] = self.eager(g, cond, sigma, stream, st["counter"])
        self._graph, self._key = graph, key


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
    relative to X_tau is removed. Returns (X~, X'), Å. The batched engine (:func:`rollout`) runs
    this step with counter-based noise and CUDA-graph replay; tests replay its steps with this
    function.
    """
    if regressor:
        d = propagator(torch.zeros_like(g.pos), torch.zeros(g.n_graphs, device=g.pos.device), g)
    else:
        d = integrate_flow(propagator, g, d0_prop, n_flow)
    x_prop = g.pos + d
    x_new = x_prop
    if corrector is not None:
        x_cond = _corrector_condition(g, d, x_prop, max_step_displacement)
        x_new = x_prop + integrate_flow(corrector, g.with_pos(x_cond), d0_corr,
                                        n_flow if n_flow_corrector is None else n_flow_corrector)
    return x_prop, remove_com_drift(x_new, g)


def _corrector_condition(g: GraphBatch, d: Tensor, x_prop: Tensor, max_step_displacement: float) -> Tensor:
    """X~ for the Corrector's conditioning; a graph already broken by the Propagator (non-finite, or
    an atom moved more than ``max_step_displacement`` Å) cannot be conditioned on: its Corrector sees
    X_tau instead, and the caller rejects the step."""
    broken = _graph_any(~torch.isfinite(d).all(-1) | (torch.linalg.vector_norm(d, dim=-1) > max_step_displacement), g)
    return torch.where(broken[g.batch].unsqueeze(-1), g.pos, x_prop)


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


#: Edges per message-block launch on CPU: measured on 2 cores, 8 x 112-atom LiFePO4 (41k edges) per
#: step: 1,024 -> 1.69 s, 512 -> 1.77 s, 2,048 -> 1.80-2.15 s, 4,096 -> 2.3-2.6 s, whole graph ~6 s.
CPU_EDGE_CHUNK = 1024
#: Bytes of message-block temporaries per edge (float32: the (E,4F) filter, the gathered phi and
#: the (E,3,F) message for F = 64, with headroom); sizes the CUDA edge chunk from free memory.
BYTES_PER_EDGE = 8192


def edge_chunk_policy(device: torch.device, n_edges: int, edge_chunk: int | str | None = "auto") -> int | None:
    """Edges per message-block launch: ``auto`` = CPU_EDGE_CHUNK on CPU (the (e,3,F) temporaries stay
    in cache) and, on CUDA, the whole graph unless its temporaries exceed a quarter of the free device
    memory (then the largest chunk that fits); an int or None is taken as given."""
    if edge_chunk != "auto":
        return None if edge_chunk is None else int(edge_chunk)
    if device.type != "cuda":
        return CPU_EDGE_CHUNK
    free, _ = torch.cuda.mem_get_info(device)
    fit = max(free // 4 // BYTES_PER_EDGE, 65536)
    return None if n_edges <= fit else int(fit)


def _is_compile_failure(exc: BaseException) -> bool:
    """Whether ``exc`` is torch.compile's own failure (the backend, e.g. Triton, could not compile)."""
    try:
        from torch._dynamo.exc import BackendCompilerFailed
    except ImportError:  # pragma: no cover
        return False
    return isinstance(exc, BackendCompilerFailed)


def compile_policy(device: torch.device, compile: bool | str) -> bool:
    """``rollout.compile``: auto = on for CUDA when Triton is available (measured on an H200: 2.2x
    the structure-ps/s of eager at 512 structures, 1.5x on one 200-atom cell), off on CPU (eager
    cache-sized edge chunks are faster there, and compiling costs ~40 s)."""
    if compile == "auto":
        if device.type != "cuda":
            return False
        try:
            from torch.utils._triton import has_triton
        except ImportError:  # pragma: no cover - older torch
            return False
        return bool(has_triton())
    if isinstance(compile, str):
        raise InputError(f"rollout.compile must be auto, true or false (got {compile!r})")
    return bool(compile)


class _Precision:
    """Context for ``rollout.precision``: fp32 (exact float32), tf32 (CUDA matrix products in
    TF32), bf16 (autocast matrix products and the message filters to bfloat16; positions,
    displacements, geometry and sums stay float32)."""

    def __init__(self, precision: str, device: torch.device) -> None:
        if precision not in PRECISIONS:
            raise InputError(f"unknown rollout precision {precision!r} (expected one of {', '.join(PRECISIONS)})")
        self.precision, self.device = precision, device
        self._saved: tuple | None = None
        self._autocast: Any = None

    def __enter__(self) -> "_Precision":
        if self.precision == "tf32" and self.device.type == "cuda":
            self._saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
            torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
        if self.precision == "bf16":
            # no weight-cast cache: casts made while a CUDA graph is captured must belong to the graph
            self._autocast = torch.autocast(self.device.type, dtype=torch.bfloat16, cache_enabled=False)
            self._autocast.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._autocast is not None:
            self._autocast.__exit__(*exc)
        if self._saved is not None:
            torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = self._saved


def rollout(
    propagator: FlowModel,
    corrector: FlowModel | None,
    g0: GraphBatch,
    sigma_prop: Tensor,
    sigma_corr: Tensor | None,
    n_steps: int,
    n_flow: int,
    generator: torch.Generator | Sequence[torch.Generator] | Tensor,
    max_step_displacement: float = 15.0,
    retries: int = 2,
    regressor: bool = False,
    progress: bool = False,
    corrector_every: int = 1,
    n_flow_corrector: int | None = None,
    on_frame: Callable[[int, np.ndarray, np.ndarray], None] | None = None,
    precision: str = "fp32",
    edge_chunk: int | str | None = "auto",
    cuda_graphs: bool | str = "auto",
    compile: bool | str = "auto",
    start_step: int = 0,
) -> RolloutResult:
    """Run Algorithm 1 for every graph of ``g0`` (initial positions X_0 in Å, temperatures in K).

    sigma_prop / sigma_corr (N,) Å: Propagator / Corrector prior widths (see flow.priors).
    ``generator``: the graphs' noise keys: a (G, 2) tensor (``seeds.rollout_key``), one
    torch.Generator (keys drawn from it) or one generator per graph. Prior samples are counter-based
    (``flow.priors.counter_normal``): a graph's draws depend only on its key, the step, the retry
    and the atom, so its trajectory does not depend on the batch it shares.
    ``regressor``: the Propagator is a regressor, called once per step with d = 0, t = 0, whose
    output is the displacement (no prior sample). ``corrector=None`` skips the Corrector;
    ``corrector_every`` = k corrects steps k, 2k, ... only; ``n_flow_corrector`` its Euler steps.
    ``on_frame(frame, positions, good)``: called with frame 0 and after every step with the
    (N, 3) float32 Å positions of all graphs and the (G,) bool of graphs whose frame is a real one
    (False once a graph has diverged); the result then keeps only the final frame (streamed).
    ``progress``: a tqdm bar over the steps.
    ``start_step``: continue a trajectory whose first ``start_step`` steps were already made (``g0``
    holds its last frame): the noise counters and frame numbers go on from there, so n steps from
    step k give exactly the frames k+1 ... k+n of one uninterrupted rollout with the same keys
    (same seed stream; ``on_frame`` is then not called for the starting frame, which the caller has).
    Engine settings (the numbers do not depend on them, except ``precision``): ``precision``
    fp32 | tf32 | bf16 (see :class:`_Precision`); ``edge_chunk`` (see :func:`edge_chunk_policy`);
    ``cuda_graphs`` (auto = on CUDA): each flow integration (noise draw + ``n_flow`` evaluations)
    is replayed from a captured CUDA graph; ``compile`` (auto = on CUDA with Triton): the model's field
    runs through ``torch.compile`` (``flow.painn.use_compiled_field``; edges are then not chunked;
    the first step pays the compilation, ~10-40 s on an H200). Host work per step does not grow with G: one neighbour list per
    conditioning, one noise draw per model, one divergence check (one host sync) per step.
    """
    n_atoms, n_graphs = int(g0.pos.shape[0]), g0.n_graphs
    if start_step < 0:
        raise InputError(f"start_step must be >= 0 (got {start_step})")
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
    for m in (propagator, corrector):
        if m is not None:
            m.element_index(g0.numbers)  # every element has a row (one check, not one per evaluation)
    keys = rollout_keys(generator, n_graphs)
    from .painn import use_compiled_field

    compile = compile_policy(dev, compile)
    use_compiled_field(compile)
    if compile:
        edge_chunk = None
    sigma_prop = sigma_prop.to(dev, g0.pos.dtype)
    sigma_corr = sigma_corr.to(dev, g0.pos.dtype) if corrector is not None and sigma_corr is not None else None
    use_graphs = dev.type == "cuda" if cuda_graphs == "auto" else bool(cuda_graphs)
    if use_graphs and dev.type != "cuda":
        raise InputError("cuda_graphs needs a CUDA device")
    nfc = n_flow if n_flow_corrector is None else n_flow_corrector
    runners = {"P": FlowRunner(propagator, n_flow, use_graphs and not regressor),
               "C": FlowRunner(corrector, nfc, use_graphs) if corrector is not None else None}

    t_start = time.perf_counter()
    stream_out = on_frame is not None
    positions = torch.empty(1 if stream_out else n_steps + 1, n_atoms, 3, dtype=torch.float32)
    positions[0] = g0.pos.detach().to("cpu", torch.float32)
    if stream_out and start_step == 0:
        on_frame(0, positions[0].numpy(), np.ones(n_graphs, dtype=bool))
    n_ok = torch.zeros(n_graphs, dtype=torch.long)
    diverged = torch.zeros(n_graphs, dtype=torch.bool)
    n_retries = torch.zeros(n_graphs, dtype=torch.long)
    reason = [""] * n_graphs
    x = g0.pos.detach().clone()
    subsets: dict[tuple[int, ...], tuple[GraphBatch, Tensor, Tensor, Tensor | None, _Stream]] = {}
    chunk_set = False

    def sub_for(graphs: tuple[int, ...]) -> tuple[GraphBatch, Tensor, Tensor, Tensor | None, _Stream]:
        """(sub-batch, its global atom indices, sigma_prop, sigma_corr, noise stream) of ``graphs``."""
        if graphs not in subsets:
            if len(subsets) > 2:
                subsets.clear()  # the active set changes rarely; retries use small sub-batches
            if graphs == tuple(range(n_graphs)):
                sub, atoms = g0, torch.arange(n_atoms, device=dev)
            else:
                sub, atoms = subset_batch(g0, graphs)
            sel = torch.as_tensor(graphs, dtype=torch.long)
            subsets[graphs] = (sub, atoms, sigma_prop[atoms], None if sigma_corr is None else sigma_corr[atoms],
                               _Stream(keys[sel], sub))
        return subsets[graphs]

    def propose(graphs: tuple[int, ...], step: int, attempt: int, correct: bool) -> tuple[Tensor, Tensor, GraphBatch]:
        """X' (N_sub,3) for ``graphs`` from X_tau = x; returns (X', atom index, sub-batch). ``step`` is
        the trajectory's own step index (start_step included): it counts the noise."""
        nonlocal chunk_set
        sub, atoms, sp, sc, stream = sub_for(graphs)
        full = len(graphs) == n_graphs
        sub = sub.with_pos(x if full else x[atoms])
        cond = propagator.condition(sub)
        if not chunk_set:
            chunk = edge_chunk_policy(dev, cond.n_edges, edge_chunk)
            for m in (propagator, corrector):
                if m is not None:
                    m.set_edge_chunk(chunk)
            chunk_set = True
        if regressor:
            d = propagator(torch.zeros_like(sub.pos), torch.zeros(sub.n_graphs, device=dev), sub, cond)
        else:
            d = runners["P"](sub, cond, sp, stream, draw_counter(step, attempt, DRAW_PROPAGATOR), replay=attempt == 0)
        x_prop = sub.pos + d
        x_new = x_prop
        if correct:
            x_cond = _corrector_condition(sub, d, x_prop, max_step_displacement)
            gc = sub.with_pos(x_cond)
            cond_c = corrector.condition(gc)
            x_new = x_prop + runners["C"](gc, cond_c, sc, stream, draw_counter(step, attempt, DRAW_CORRECTOR),
                                          replay=attempt == 0)
        return remove_com_drift(x_new, sub), atoms, sub

    steps = range(n_steps)
    if progress:
        from tqdm.auto import tqdm
        steps = tqdm(steps, desc=f"rollout {n_graphs} graphs, {n_atoms} atoms", unit="step", mininterval=10.0)
    try:
        with torch.no_grad(), _Precision(precision, dev):
            active = tuple(range(n_graphs))
            for step in steps:
                if not active:
                    break
                pending = active
                why: dict[int, str] = {}
                tstep = step + start_step  # the trajectory's step index (noise counter, frame number)
                correct = corrector is not None and (tstep + 1) % corrector_every == 0
                for attempt in range(retries + 1):
                    try:
                        x_new, atoms, sub = propose(pending, tstep, attempt, correct)
                    except Exception as exc:  # a failed compilation must not sink a screening run
                        if not (compile and _is_compile_failure(exc)):
                            raise
                        log.warning("torch.compile failed (%s: %s); continuing without it",
                                    type(exc).__name__, str(exc).splitlines()[0][:200])
                        compile = False
                        use_compiled_field(False)
                        runners["P"] = FlowRunner(propagator, n_flow, use_graphs and not regressor)
                        runners["C"] = FlowRunner(corrector, nfc, use_graphs) if corrector is not None else None
                        x_new, atoms, sub = propose(pending, tstep, attempt, correct)
                    disp = torch.nan_to_num(torch.linalg.vector_norm(x_new - sub.pos, dim=-1), nan=float("inf"))
                    max_disp = torch.zeros(sub.n_graphs, device=dev).scatter_reduce(0, sub.batch, disp, reduce="amax",
                                                                                    include_self=True)
                    finite = ~_graph_any(~torch.isfinite(x_new).all(-1), sub)
                    ok_dev = finite & (max_disp <= max_step_displacement)
                    if len(pending) == n_graphs:
                        x = torch.where(ok_dev[sub.batch].unsqueeze(-1), x_new, x)
                    else:
                        x[atoms] = torch.where(ok_dev[sub.batch].unsqueeze(-1), x_new, x[atoms])
                    checks = torch.stack([ok_dev.float(), finite.float(), max_disp]).cpu()  # the step's one host sync
                    ok, fin, mdisp = checks[0].bool().tolist(), checks[1].bool().tolist(), checks[2].tolist()
                    failed = [k for k, good in zip(pending, ok) if not good]
                    for local, k in enumerate(pending):
                        if not ok[local]:
                            why[k] = ("non-finite positions" if not fin[local]
                                      else f"max displacement {mdisp[local]:.3g} Å > {max_step_displacement:g} Å")
                    if attempt > 0:
                        n_retries[list(pending)] += 1
                    pending = tuple(failed)
                    if not pending:
                        break
                for k in pending:
                    diverged[k] = True
                    reason[k] = f"diverged at step {tstep + 1}: {why[k]} (after {retries} retries)"
                if pending:
                    active = tuple(k for k in active if k not in set(pending))
                done = [k for k in active]
                n_ok[done] += 1
                frame = x.detach().to("cpu", torch.float32)
                if stream_out:
                    positions[0] = frame
                    on_frame(tstep + 1, frame.numpy(), (~diverged).numpy())
                else:
                    positions[step + 1] = frame
    finally:
        use_compiled_field(False)  # the switch is process-wide: leave it off for other callers
    # stored frames after a frozen graph's last good step repeat that frame
    ptr = g0.ptr.cpu()
    if not stream_out:
        for k in range(n_graphs):
            last = int(n_ok[k])
            if last < n_steps:
                lo, hi = int(ptr[k]), int(ptr[k + 1])
                positions[last + 1:, lo:hi] = positions[last, lo:hi]
    return RolloutResult(positions=positions, n_ok_steps=n_ok, diverged=diverged, reason=reason, ptr=ptr,
                         n_retries=n_retries, wall_s=time.perf_counter() - t_start, streamed=stream_out)


def frame_rows(frame: int, positions: np.ndarray, ptr: Sequence[int], graphs: Sequence[int], ids: Sequence[str],
               temperatures: Sequence[float], source: str, dt_ps: float,
               replicas: Sequence[int] | None = None) -> list[dict]:
    """``schema.FRAMES`` rows of one frame of the given ``graphs`` (positions (N, 3) Å of the whole
    batch, atom offsets ``ptr``; ``replicas`` the replica of each graph, default 0); time_ps = frame *
    dt_ps. Each row also carries ``temperature`` (int K) for the caller's partitioning (``to_table``
    ignores it); positions are copied."""
    return [{"id": str(ids[k]), "source": source, "replica": int(replicas[k]) if replicas is not None else 0,
             "frame": int(frame), "time_ps": float(frame * dt_ps),
             "positions": np.array(positions[ptr[k]:ptr[k + 1]], dtype=np.float32).reshape(-1),
             "energy": None, "temperature_inst": None, "temperature": int(round(float(temperatures[k])))}
            for k in graphs]
