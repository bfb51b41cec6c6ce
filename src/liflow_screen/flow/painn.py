"""The LiFlow marginal-flow approximator: PaiNN modified for two geometries (paper Appendix D.2).

The model predicts a per-atom vector field v_t(D_t | X_tau, L, a, T) in Å (per unit flow time).
It sees two geometries on ONE periodic radius graph (``cutoff``, 5 Å) built from X_tau:

* geometry 1: r_ij,1 = x_j - x_i + S_ij          (X_tau, with Cartesian image offset S_ij, Å)
* geometry 2: r_ij,2 = r_ij,1 + d_j - d_i         (X_tau + D_t)

Conventions (those of the authors' published models, so their weights load unchanged):

* radial input r' = min(r + offset, cutoff) (offset 0.5 Å), used for the Bessel basis
  sqrt(2/rc) sin(n pi r'/rc) / r' AND for the cosine cutoff f(r') = (cos(pi r'/rc) + 1)/2,
  so every interaction vanishes smoothly from r = cutoff - offset (4.5 Å) on;
* the cutoff multiplies the whole filter, weights and bias: W_k = (rbf(r'_k) W^T + b) f(r'_k),
  and the two geometries' filters are summed (Eqs. 26b/27b), so a message goes continuously to
  zero as a neighbour moves out (no jump when an edge leaves the radius graph);
* aggregated messages are plain sums (no normalisation);
* the invariant embedding is f_atom(a) + [f(t) ⊕ f(T / ref_temp)] with Gaussian Fourier
  features f(x) = [sin(2 pi w x), cos(2 pi w x)] (sin block, then cos block; the stored
  frequencies include the 2 pi factor; time block first);
* atoms are embedded by an element-table row, not directly by atomic number: ``element_rows``
  maps Z to a row (-1 = not in the table). Models trained here use row = Z; imported models
  carry the table of their training set (see :mod:`liflow_screen.flow.published`).

Everything depending only on X_tau (edges, edge vectors, radial features, unit vectors) lives in a
:class:`Conditioning` built once per LiFlow step and reused for every flow evaluation.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, replace

import numpy as np
import torch
from ase.data import chemical_symbols
from torch import Tensor, nn

from ..core.errors import InputError
from ..core.geometry import radius_graph_pbc
from .graph import GraphBatch

#: Å added to lengths before dividing (unit vectors), as the reference implementation does.
_UNIT_EPS = 1e-8
#: Size of the element table (Z = 0 .. 118).
N_Z = 119


class UnknownElementError(InputError):
    """A structure holds an element that has no row in the model's element table."""


@dataclass
class Conditioning:
    """Graph quantities that depend only on the conditioning geometry X_tau (and cell).

    The filter is affine in the radial features, so the geometry-1 half of
    (rbf1 W^T + b) f1 + (rbf2 W^T + b) f2 = (rbf1 f1 + rbf2 f2) W^T + (f1 + f2) b
    is cached as ``rbfc1`` = rbf1 f1 and ``fcut1`` = f1, without per-layer (E, 4F) filters.
    """

    edge_index: Tensor  # (2,E) long, (i, j) global atom indices; messages flow j -> i
    vec1: Tensor        # (E,3) Å, r_ij,1 = x_j - x_i + shift
    shift: Tensor       # (E,3) Å, Cartesian lattice-image offset of atom j
    dist1: Tensor       # (E,) Å, |r_ij,1|
    unit1: Tensor       # (E,3) r_ij,1 / (|r_ij,1| + 1e-8)
    rbfc1: Tensor       # (E,R) Bessel features of r'_1 times the cutoff f(r'_1)
    fcut1: Tensor       # (E,) cutoff f(r'_1)
    basis: tuple        # (cutoff Å, n radial, offset Å) of the model that built it
    s_static: Tensor | None = None  # (N,F) atom embedding + temperature block of the model ``owner``
    owner: int | None = None         # id() of the model whose node features s_static holds

    @property
    def n_edges(self) -> int:
        """Edges held, padding included."""
        return int(self.edge_index.shape[1])

    def padded(self, capacity: int) -> "Conditioning":
        """The same conditioning with ``capacity`` - E inert edges appended (static shapes for CUDA
        graphs). A padding edge joins an atom to itself at 100 Å: both geometries' cutoff factors and
        radial features are exactly 0 there, so it adds exactly 0 to every message. Padding edges
        are spread over the atoms (edge k on atom k mod N): piled on one atom, their atomic adds
        serialise (measured on an H200: 1.8 s instead of 1.1 s per step for 512 structures)."""
        n = self.n_edges
        if capacity < n:
            raise ValueError(f"edge capacity {capacity} < {n} edges")
        pad = capacity - n
        if pad == 0:
            return self
        dev, dt = self.vec1.device, self.vec1.dtype
        n_atoms = int(self.s_static.shape[0]) if self.s_static is not None else int(self.edge_index.max()) + 1
        who = torch.arange(pad, device=dev, dtype=self.edge_index.dtype) % max(n_atoms, 1)
        far = torch.zeros(pad, 3, dtype=dt, device=dev)
        far[:, 0] = 100.0
        cat = torch.cat
        return replace(self, edge_index=cat([self.edge_index, torch.stack([who, who])], 1),
                       vec1=cat([self.vec1, far]), shift=cat([self.shift, far]),
                       dist1=cat([self.dist1, torch.full((pad,), 100.0, dtype=dt, device=dev)]),
                       unit1=cat([self.unit1, far / 100.0]),
                       rbfc1=cat([self.rbfc1, torch.zeros(pad, self.rbfc1.shape[1], dtype=dt, device=dev)]),
                       fcut1=cat([self.fcut1, torch.zeros(pad, dtype=dt, device=dev)]))


class BesselRBF(nn.Module):
    """Radial features of r' = min(r + offset, rc): Bessel sqrt(2/rc) sin(n pi r'/rc)/r', n = 1..R,
    and the cosine cutoff f(r') = (cos(pi r'/rc) + 1)/2 for r' < rc, else 0 (r, rc, offset in Å)."""

    def __init__(self, n_radial: int, cutoff: float, offset: float) -> None:
        super().__init__()
        self.cutoff = float(cutoff)
        self.offset = float(offset)
        self.prefactor = math.sqrt(2.0 / self.cutoff)
        self.register_buffer("freqs", torch.arange(1, n_radial + 1, dtype=torch.float32) * math.pi / self.cutoff)

    def forward(self, dist: Tensor) -> tuple[Tensor, Tensor]:
        """dist (E,) Å -> (rbf (E,R), cutoff (E,))."""
        r = (dist + self.offset).clamp(max=self.cutoff)
        rbf = self.prefactor * torch.sin(self.freqs * r.unsqueeze(-1)) / r.unsqueeze(-1)
        fcut = 0.5 * (torch.cos(r * (math.pi / self.cutoff)) + 1.0) * (r < self.cutoff).to(r.dtype)
        return rbf, fcut


class FourierEmbedding(nn.Module):
    """f(x) = [sin(w x), cos(w x)] (two blocks) with fixed angular frequencies w = 2 pi k, k ~ N(0,1)."""

    def __init__(self, dim: int, generator: torch.Generator) -> None:
        super().__init__()
        if dim % 2:
            raise ValueError("Fourier embedding dimension must be even")
        self.register_buffer("freqs", torch.randn(dim // 2, generator=generator) * (2.0 * math.pi))

    def forward(self, x: Tensor) -> Tensor:
        arg = self.freqs * x.unsqueeze(-1)
        return torch.cat([torch.sin(arg), torch.cos(arg)], dim=-1)


class TwoGeometryMessage(nn.Module):
    """PaiNN message block with two geometries (Eqs. 26b, 27b).

    Edges are processed in chunks of ``edge_chunk`` (None: all at once) so that the (E,3,F) per-edge
    intermediates stay cache-sized on CPU for large batched graphs; on a GPU the whole graph (or a
    memory-budgeted chunk) is one launch. The result does not depend on the chunking.
    """

    edge_chunk: int | None = 1024

    def __init__(self, features: int, radial: int) -> None:
        super().__init__()
        self.features = features
        self.mlp_phi = nn.Sequential(nn.Linear(features, features), nn.SiLU(), nn.Linear(features, 4 * features))
        self.linear_W = nn.Linear(radial, 4 * features)

    def forward(self, s: Tensor, v: Tensor, edge_index: Tensor, rbf_aug: Tensor,
                units: Tensor) -> tuple[Tensor, Tensor]:
        """s (N,F), v (N,3,F); rbf_aug (E,R+1) = [rbf1 f1 + rbf2 f2, f1 + f2] (the filter's input with
        the cutoff sum as the bias column: W_k = rbf_aug_k [W^T; b]); units (E,3,2) = [r̂1, r̂2].
        Returns the updated (s, v)."""
        phi = self.mlp_phi(s)  # (N,4F)
        w_aug = torch.cat([self.linear_W.weight.t(), self.linear_W.bias.unsqueeze(0)], dim=0)  # (R+1,4F)
        ds = torch.zeros_like(s)
        dv = torch.zeros_like(v)
        w_aug = w_aug.to(rbf_aug.dtype)
        if self.edge_chunk is None:  # no size arithmetic: torch.compile keeps the edge count symbolic
            self._edges(phi, v, edge_index[0], edge_index[1], rbf_aug, w_aug, units, ds, dv)
            return s + ds, v + dv
        n_edges = edge_index.shape[1]
        step = max(int(self.edge_chunk), 1)
        for lo in range(0, n_edges, step):
            hi = min(lo + step, n_edges)
            self._edges(phi, v, edge_index[0, lo:hi], edge_index[1, lo:hi], rbf_aug[lo:hi], w_aug, units[lo:hi],
                        ds, dv)
        return s + ds, v + dv

    def _edges(self, phi: Tensor, v: Tensor, i: Tensor, j: Tensor, rbf_aug: Tensor, w_aug: Tensor, u: Tensor,
               ds: Tensor, dv: Tensor) -> None:
        """Add the messages of edges (i, j) to ds (N,F) and dv (N,3,F), in place."""
        feat = self.features
        grad = torch.is_grad_enabled()  # in-place edge ops only when no autograd graph is recorded
        x = torch.mm(rbf_aug, w_aug)  # (e,4F) filter, cut off
        pj = phi.index_select(0, j)
        x = x * pj if grad or x.dtype != pj.dtype else x.mul_(pj)
        x_s, x_vv = x[:, :feat], x[:, feat:2 * feat]
        x_vs1, x_vs2 = x[:, 2 * feat:3 * feat], x[:, 3 * feat:]
        # v_j ∘ x_vv  +  r̂_1 ⊗ x_vs1  +  r̂_2 ⊗ x_vs2
        msg = v.index_select(0, j)
        msg = msg * x_vv.unsqueeze(1) if grad else msg.mul_(x_vv.unsqueeze(1))
        msg.addcmul_(u[:, :, 0:1], x_vs1.unsqueeze(1))
        msg.addcmul_(u[:, :, 1:2], x_vs2.unsqueeze(1))
        ds.index_add_(0, i, x_s.to(ds.dtype))
        dv.index_add_(0, i, msg.to(dv.dtype))


def _norm3(v: Tensor) -> Tensor:
    """|v| over the Cartesian axis of (N,3,F) vectors -> (N,F). Reduced over a contiguous last axis:
    torch's CPU norm over the middle axis of (N,3,F) is ~10x slower."""
    return torch.linalg.vector_norm(v.transpose(1, 2).contiguous(), dim=-1)


class Update(nn.Module):
    """PaiNN update block: U, V = v W_UV; a_vv, a_sv, a_ss = MLP(s ⊕ |V|);
    v += a_vv U; s += a_ss + a_sv <U, V>."""

    def __init__(self, features: int) -> None:
        super().__init__()
        self.features = features
        self.mlp_a = nn.Sequential(nn.Linear(2 * features, features), nn.SiLU(), nn.Linear(features, 3 * features))
        self.linear_UV = nn.Linear(features, 2 * features, bias=False)

    def forward(self, s: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        u_v, v_v = torch.split(self.linear_UV(v), self.features, dim=-1)
        a = self.mlp_a(torch.cat([s, _norm3(v_v)], dim=-1))
        a_vv, a_sv, a_ss = torch.split(a, self.features, dim=-1)
        return s + a_ss + a_sv * (u_v * v_v).sum(dim=1), v + a_vv.unsqueeze(1) * u_v


class GatedVectorOutput(nn.Module):
    """Gated equivariant block (Schütt et al. 2021) reduced to one output vector per atom:
    [w1, w2] = v W; out = w1 · MLP(s ⊕ |w2|)."""

    def __init__(self, features: int) -> None:
        super().__init__()
        self.linear_v = nn.Linear(features, 2, bias=False)
        self.mlp_s = nn.Sequential(nn.Linear(features + 1, features + 1), nn.SiLU(), nn.Linear(features + 1, 1))

    def forward(self, s: Tensor, v: Tensor) -> Tensor:
        w = self.linear_v(v)  # (N,3,2)
        lin1, act, lin2 = self.mlp_s
        h = lin1(torch.cat([s, torch.linalg.vector_norm(w[..., 1], dim=1, keepdim=True)], dim=-1))  # (N,F+1)
        gate = lin2(_rowwise(act, h))
        return w[..., 0] * gate  # (N,3)


#: Row width (floats) the F+1-wide activation is padded to: a multiple of every CPU kernel's unrolled
#: vector length (2 x 16 floats with AVX-512), so no element goes through a scalar tail.
_ACT_ROW = 64


def _rowwise(act: nn.Module, h: Tensor) -> Tensor:
    """act(h) for (N, C) h with C not a multiple of the SIMD width, computed on rows padded to a
    multiple of ``_ACT_ROW``. ATen's CPU kernels evaluate the last (size mod vector length) elements
    of a tensor with a scalar exp that rounds differently from the vector one; for an (N, 65) input
    that tail falls on the last atom of the batch, so an atom's result would depend on which
    structures share the batch. Padding makes every element take the vector path: results are
    bit-identical whatever the batch (and the same values)."""
    n, c = h.shape
    if c % _ACT_ROW == 0 or h.device.type != "cpu":
        return act(h)
    pad = torch.zeros(n, (c + _ACT_ROW - 1) // _ACT_ROW * _ACT_ROW, dtype=h.dtype, device=h.device)
    pad[:, :c] = h
    return act(pad)[:, :c]


def identity_element_rows(n_elements: int) -> Tensor:
    """Element table of models trained here: row = Z for Z < n_elements, else absent (-1)."""
    z = torch.arange(N_Z)
    return torch.where(z < n_elements, z, torch.full_like(z, -1))


#: ``torch.compile`` switch of :meth:`FlowModel.forward` in inference (see :func:`use_compiled_field`).
_COMPILE: dict[str, bool] = {"on": False}
_COMPILED: dict[str, tuple] = {}


class _Field(nn.Module):
    """Holds a FlowModel so that ``torch.func.functional_call`` can run its :meth:`FlowModel.field`
    with any same-architecture model's weights (one compiled graph for Propagator and Corrector)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, *args: Tensor) -> Tensor:
        return self.model.field(*args)


def use_compiled_field(enabled: bool) -> None:
    """Run inference through a ``torch.compile``d :meth:`FlowModel.field` (dynamic shapes; one
    compilation per architecture, shared by every model of it). Edges should then not be chunked."""
    _COMPILE["on"] = bool(enabled)


def compiled_field(model: "FlowModel"):
    """The compiled field of ``model``'s architecture, bound to ``model``'s weights."""
    key = repr(sorted((k, v) for k, v in model.hparams.items() if k != "seed"))
    if key not in _COMPILED:
        # a copy holds the template, so every model's weights come in as inputs alike (one graph;
        # with the template's own tensors as inputs torch.compile guards on their identity)
        wrapper = _Field(copy.deepcopy(model))
        _COMPILED[key] = (wrapper, torch.compile(
            lambda state, *args: torch.func.functional_call(wrapper, state, args), dynamic=True))
    _, fn = _COMPILED[key]
    state = {f"model.{k}": v for k, v in list(model.named_parameters()) + list(model.named_buffers())}
    return lambda *args: fn(state, *args)


class FlowModel(nn.Module):
    """Modified PaiNN flow model (Table A2 defaults: 64 features, 20 Bessel functions, 3 layers,
    5 Å cutoff, 0.5 Å offset, T / 1000 K). ``forward`` returns the per-atom vector field (N,3),
    Å per unit flow time. Parameters are initialised deterministically from ``seed`` (the global
    RNG is left untouched). ``n_elements`` rows of element embeddings, addressed through the
    ``element_rows`` buffer (Z -> row; identity for models trained here).
    """

    def __init__(self, features: int = 64, radial: int = 20, layers: int = 3, cutoff: float = 5.0,
                 offset: float = 0.5, n_elements: int = 101, ref_temp: float = 1000.0, seed: int = 0) -> None:
        super().__init__()
        if features % 4:
            raise ValueError(f"features must be a multiple of 4, got {features}")
        if cutoff <= 0 or offset < 0 or layers < 1 or radial < 1 or n_elements < 1 or ref_temp <= 0:
            raise ValueError("cutoff > 0, offset >= 0, layers >= 1, radial >= 1, n_elements >= 1, "
                             "ref_temp > 0 are required")
        self.hparams: dict = dict(features=features, radial=radial, layers=layers, cutoff=float(cutoff),
                                  offset=float(offset), n_elements=int(n_elements), ref_temp=float(ref_temp),
                                  seed=seed)
        self.features, self.cutoff, self.ref_temp = features, float(cutoff), float(ref_temp)
        self._basis = (float(cutoff), int(radial), float(offset))
        gen = torch.Generator().manual_seed(seed)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.atom_embedding = nn.Embedding(n_elements, features)
            self.time_embedding = FourierEmbedding(features // 2, gen)
            self.temp_embedding = FourierEmbedding(features // 2, gen)
            self.linear_v = nn.Linear(1, features, bias=False)  # D_t ⊗ w
            self.radial_embedding = BesselRBF(radial, cutoff, offset)
            self.messages = nn.ModuleList([TwoGeometryMessage(features, radial) for _ in range(layers)])
            self.updates = nn.ModuleList([Update(features) for _ in range(layers)])
            self.output_block = GatedVectorOutput(features)
        self.register_buffer("element_rows", identity_element_rows(n_elements))

    # ------------------------------------------------------------------ elements
    def set_element_rows(self, rows: Tensor) -> None:
        """Install an element table (N_Z,) long: Z -> embedding row, -1 where absent."""
        rows = torch.as_tensor(rows, dtype=torch.long).reshape(-1)
        if rows.shape != (N_Z,):
            raise InputError(f"an element table needs {N_Z} entries (Z = 0..118), got {rows.shape[0]}")
        if bool((rows >= self.atom_embedding.num_embeddings).any()):
            raise InputError(f"element table points past the model's {self.atom_embedding.num_embeddings} rows")
        self.element_rows.copy_(torch.where(rows < 0, torch.full_like(rows, -1), rows))

    def unsupported_elements(self, numbers) -> list[str]:
        """Chemical symbols in ``numbers`` that have no row in the element table (sorted by Z)."""
        z = sorted({int(x) for x in (numbers.reshape(-1).tolist() if isinstance(numbers, torch.Tensor)
                                     else np.asarray(numbers).reshape(-1).tolist())})
        rows = self.element_rows.cpu()
        return [chemical_symbols[x] if 0 <= x < N_Z else str(x) for x in z
                if not (0 <= x < N_Z) or int(rows[x]) < 0]

    def element_index(self, numbers: Tensor) -> Tensor:
        """Embedding rows of atomic numbers (N,); UnknownElementError naming what is missing."""
        if numbers.numel() and (int(numbers.min()) < 0 or int(numbers.max()) >= N_Z):
            raise UnknownElementError(f"atomic numbers must be in 0..{N_Z - 1}")
        rows = self.element_rows[numbers]
        if bool((rows < 0).any()):
            missing = self.unsupported_elements(numbers)
            raise UnknownElementError(f"element{'s' if len(missing) > 1 else ''} {', '.join(missing)} "
                                      "not in the model's element table")
        return rows

    # ------------------------------------------------------------------ conditioning
    def condition(self, g: GraphBatch) -> Conditioning:
        """Radius graph of X_tau = g.pos (periodic, vesin-torch, on g's device) and its features."""
        edge_index, shift = radius_graph_pbc(g.pos, g.cell, g.batch, self.cutoff, g.ptr)
        return self.condition_from_edges(g, edge_index, shift)

    def condition_from_edges(self, g: GraphBatch, edge_index: Tensor, shift: Tensor) -> Conditioning:
        """Conditioning from an externally computed edge list (i, j) and Cartesian shifts (Å).

        Also caches the node features that do not depend on the flow time (atom embedding plus the
        temperature block), after checking every element once: the flow loop then needs no check
        (no host sync per evaluation)."""
        edge_index = edge_index.to(g.pos.device, torch.long)
        shift = shift.to(g.pos.device, g.pos.dtype)
        vec1 = g.pos[edge_index[1]] - g.pos[edge_index[0]] + shift
        dist1 = torch.linalg.vector_norm(vec1, dim=-1)
        rbf1, fcut1 = self.radial_embedding(dist1)
        return Conditioning(edge_index=edge_index, vec1=vec1, shift=shift, dist1=dist1,
                            unit1=vec1 / (dist1.unsqueeze(-1) + _UNIT_EPS), rbfc1=rbf1 * fcut1.unsqueeze(-1),
                            fcut1=fcut1, basis=self._basis, s_static=self.static_node_features(g, g.pos.dtype),
                            owner=id(self))

    def static_node_features(self, g: GraphBatch, dtype: torch.dtype) -> Tensor:
        """(N,F): f_atom(a) + [0 ⊕ f(T / ref_temp)], the node features without the flow-time block.

        In inference they are computed (and the elements checked, a host sync) once per batch: a
        rollout conditions the same atoms every step. The cache is keyed by the batch's tensors and
        the weights' versions, so a changed batch or trained weights recompute."""
        if torch.is_grad_enabled():
            return self._static_node_features(g, dtype)
        cache = self.__dict__.setdefault("_static_cache", {})
        key = (id(g.numbers), id(g.temperature), id(g.batch), dtype, self.atom_embedding.weight._version,
               self.temp_embedding.freqs._version, self.element_rows._version)
        hit = cache.get(key)
        if hit is None:
            if len(cache) >= 4:
                cache.pop(next(iter(cache)))
            # the keyed tensors are held so their id() cannot be reused while cached
            hit = cache[key] = ((g.numbers, g.temperature, g.batch), self._static_node_features(g, dtype))
        return hit[1]

    def _static_node_features(self, g: GraphBatch, dtype: torch.dtype) -> Tensor:
        half = self.time_embedding.freqs.shape[0] * 2
        temp = self.temp_embedding(g.temperature.to(dtype) / self.ref_temp)  # (G,F/2)
        cont = torch.cat([torch.zeros(temp.shape[0], half, dtype=temp.dtype, device=temp.device), temp], dim=-1)
        return self.atom_embedding(self.element_index(g.numbers)) + cont[g.batch]

    # ------------------------------------------------------------------ forward
    def forward(self, d: Tensor, t: Tensor, g: GraphBatch, cond: Conditioning | None = None) -> Tensor:
        """Vector field v(D_t; X_tau, L, a, T, t) per atom.

        d (N,3) current displacements D_t, Å; t (G,) or scalar flow time in [0,1] per graph;
        ``cond`` a cached :meth:`condition` of the same ``g`` by this model (built if None).
        Returns (N,3). With a cached conditioning nothing here waits for the host (no sync), so
        the flow loop can be captured in a CUDA graph.
        """
        if cond is None:
            cond = self.condition(g)
        elif cond.basis != self._basis:
            raise ValueError(f"Conditioning built for radial basis {cond.basis}, this model uses {self._basis}")
        if d.shape != g.pos.shape:
            raise ValueError(f"d has shape {tuple(d.shape)}, expected {tuple(g.pos.shape)}")
        t = torch.as_tensor(t, dtype=d.dtype, device=d.device)
        if t.ndim == 0:
            t = t.expand(g.n_graphs)
        # node features: the cached static part plus the flow-time block [f(t) ⊕ 0]
        own = cond.s_static is not None and cond.owner == id(self)  # another model's cache is not used
        s_static = cond.s_static if own else self.static_node_features(g, d.dtype)
        # flow time per atom: no tensor of the compiled field has the batch's graph count as a size
        # (torch.compile would specialise a one-structure batch and compile again)
        args = (d, t[g.batch], s_static, cond.edge_index, cond.vec1, cond.unit1, cond.rbfc1, cond.fcut1)
        if _COMPILE["on"] and not torch.is_grad_enabled():
            return compiled_field(self)(*args)
        return self.field(*args)

    def field(self, d: Tensor, t_atom: Tensor, s_static: Tensor, edge_index: Tensor, vec1: Tensor,
              unit1: Tensor, rbfc1: Tensor, fcut1: Tensor) -> Tensor:
        """The vector field (N,3) from tensors only (what ``torch.compile`` traces): d (N,3) Å,
        t_atom (N,) the flow time of each atom's graph, s_static (N,F), and the conditioning's edge
        tensors (see :class:`Conditioning`)."""
        tfeat = self.time_embedding(t_atom)  # (N,F/2)
        s = s_static + torch.cat([tfeat, torch.zeros_like(tfeat)], dim=-1)
        v = d.unsqueeze(-1) * self.linear_v.weight[:, 0]  # (N,3,F)
        # geometry 2
        i, j = edge_index[0], edge_index[1]
        vec2 = vec1 + d[j] - d[i]
        dist2 = torch.linalg.vector_norm(vec2, dim=-1)
        unit2 = vec2 / (dist2.unsqueeze(-1) + _UNIT_EPS)
        rbf2, fcut2 = self.radial_embedding(dist2)
        rbf_aug = torch.cat([torch.addcmul(rbfc1, rbf2, fcut2.unsqueeze(-1)),
                             (fcut1 + fcut2).unsqueeze(-1)], dim=-1)  # (E,R+1)
        units = torch.stack([unit1, unit2], dim=-1)  # (E,3,2)
        for message, update in zip(self.messages, self.updates):
            s, v = message(s, v, edge_index, rbf_aug, units)
            s, v = update(s, v)
        return self.output_block(s, v)

    def set_edge_chunk(self, edge_chunk: int | None) -> None:
        """Edges per message-block launch in every layer (None: the whole graph at once)."""
        for m in self.messages:
            m.edge_chunk = None if edge_chunk is None else int(edge_chunk)

    def n_parameters(self) -> int:
        """Number of trainable parameters."""
        return sum(p.numel() for p in self.parameters() if p.requires_grad)
