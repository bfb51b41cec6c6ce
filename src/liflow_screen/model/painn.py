"""The LiFlow marginal-flow approximator: PaiNN modified for two geometries (paper Appendix D.2).

The model predicts a per-atom vector field v_t(D_t | X_tau, L, a, T) in Å (per unit flow time).
It sees two geometries on ONE periodic radius graph built from the conditioning positions X_tau:

* geometry 1: r_ij,1 = x_j - x_i + S_ij          (X_tau, with Cartesian image offset S_ij, Å)
* geometry 2: r_ij,2 = r_ij,1 + d_j - d_i         (X_tau + D_t)

Radial features are 20 Bessel functions of the distance shifted by ``offset`` (0.5 Å), times a
smooth cosine cutoff envelope of the unshifted distance (5 Å). Filters of the two distances are
summed (Eqs. 26b/27b); the two unit-vector directions get distinct vector filters W'_vs,k.
Vector node features start as D_t ⊗ w (learnable w); the invariant embedding is
f_atom(a) + [f_cont(T/1000) ⊕ f_cont(t)] with sinusoidal f_cont on fixed N(0,1) frequencies.
Everything depending only on X_tau (edges, edge vectors, radial features, unit vectors)
lives in a :class:`Conditioning` that can be built once and reused for every flow step.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..geometry import radius_graph_pbc
from .graph import GraphBatch

_EPS = 1e-9  # Å^2 added under square roots so gradients stay finite at zero length


@dataclass
class Conditioning:
    """Graph quantities that depend only on the conditioning geometry X_tau (and cell).

    The filters are linear in the radial features, W(|r1|) + W(|r2|) = (rbf1 + rbf2) W^T + 2 b,
    so caching rbf1 saves the geometry-1 work without storing per-layer (E,4F) filters.
    """

    edge_index: Tensor  # (2,E) long, (i, j) global atom indices; messages flow j -> i
    vec1: Tensor        # (E,3) Å, r_ij,1 = x_j - x_i + shift
    shift: Tensor       # (E,3) Å, Cartesian lattice-image offset of atom j
    dist1: Tensor       # (E,) Å, |r_ij,1|
    unit1: Tensor       # (E,3) r_ij,1 / |r_ij,1|
    rbf1: Tensor        # (E,R) Bessel features of |r_ij,1| + offset, times the cutoff envelope
    basis: tuple        # (cutoff Å, n radial, offset Å) of the model that built it

    @property
    def n_edges(self) -> int:
        return int(self.edge_index.shape[1])


class BesselRBF(nn.Module):
    """sqrt(2/rc) sin(n pi r'/rc) / r' with r' = r + offset (Å), n = 1..R, times a cosine envelope.

    The envelope 0.5 (cos(pi r / rc) + 1) acts on the unshifted distance r and is 0 for r >= rc.
    """

    def __init__(self, n_radial: int, cutoff: float, offset: float) -> None:
        super().__init__()
        self.cutoff = float(cutoff)
        self.offset = float(offset)
        self.register_buffer("freqs", torch.arange(1, n_radial + 1, dtype=torch.float32) * math.pi / self.cutoff)

    def forward(self, dist: Tensor) -> Tensor:
        r = (dist + self.offset).unsqueeze(-1)
        basis = math.sqrt(2.0 / self.cutoff) * torch.sin(self.freqs * r) / r
        env = 0.5 * (torch.cos(dist * math.pi / self.cutoff) + 1.0) * (dist < self.cutoff).to(dist.dtype)
        return basis * env.unsqueeze(-1)


class SinusoidalEmbedding(nn.Module):
    """f_cont: R -> R^{dim}, interleaved cos/sin(2 pi f_k x) with fixed f_k ~ N(0,1) (Eq. 25)."""

    def __init__(self, dim: int, generator: torch.Generator) -> None:
        super().__init__()
        if dim % 2:
            raise ValueError("sinusoidal embedding dimension must be even")
        self.register_buffer("freqs", torch.randn(dim // 2, generator=generator))

    def forward(self, x: Tensor) -> Tensor:
        arg = 2.0 * math.pi * x.unsqueeze(-1) * self.freqs
        # even index i -> cos, odd index i -> sin (Eq. 25, 0-based)
        return torch.stack([torch.cos(arg), torch.sin(arg)], dim=-1).flatten(-2)


class TwoGeometryInteraction(nn.Module):
    """PaiNN message block with two geometries (Eqs. 26b, 27b).

    Edges are processed in chunks of ``edge_chunk`` so that the (E,3,F) per-edge intermediates stay
    cache-sized on CPU for large batched graphs; the result does not depend on the chunking.
    """

    edge_chunk = 2048

    def __init__(self, features: int, radial: int, message_norm: float = 1.0) -> None:
        super().__init__()
        self.features = features
        self.norm = 1.0 / float(message_norm)  # aggregated messages are divided by message_norm
        self.context = nn.Sequential(nn.Linear(features, features), nn.SiLU(), nn.Linear(features, 4 * features))
        self.filter = nn.Linear(radial, 4 * features)

    def filter_pair(self, rbf_sum: Tensor) -> Tensor:
        """W(|r1|) + W(|r2|) (E,4F) from rbf_sum = rbf(|r1|) + rbf(|r2|) (E,R): the filter is affine."""
        return torch.addmm(2.0 * self.filter.bias, rbf_sum, self.filter.weight.t())

    def forward(self, s: Tensor, v: Tensor, edge_index: Tensor, rbf_sum: Tensor,
                units: Tensor) -> tuple[Tensor, Tensor]:
        """s (N,F), v (N,3,F); rbf_sum (E,R) = rbf1 + rbf2; units (E,3,2) = [r̂1, r̂2] (unit vectors)."""
        feat = self.features
        grad = torch.is_grad_enabled()  # in-place edge ops only when no autograd graph is recorded
        ctx = self.context(s)  # (N,4F)
        ds = torch.zeros_like(s)
        dv = torch.zeros_like(v)
        n_edges = edge_index.shape[1]
        for lo in range(0, n_edges, self.edge_chunk):
            hi = min(lo + self.edge_chunk, n_edges)
            i, j = edge_index[0, lo:hi], edge_index[1, lo:hi]
            x = self.filter_pair(rbf_sum[lo:hi])
            x = x * ctx.index_select(0, j) if grad else x.mul_(ctx.index_select(0, j))
            fs, fvv = x[:, :feat], x[:, feat:2 * feat]
            fvs1, fvs2 = x[:, 2 * feat:3 * feat], x[:, 3 * feat:]
            u = units[lo:hi]
            # v_j ∘ phi_vv W_vv  +  sum_k r̂_k ⊗ (phi_vs,k W'_vs,k)
            msg = v.index_select(0, j)
            msg = msg * fvv.unsqueeze(1) if grad else msg.mul_(fvv.unsqueeze(1))
            msg.addcmul_(u[:, :, 0:1], fvs1.unsqueeze(1))
            msg.addcmul_(u[:, :, 1:2], fvs2.unsqueeze(1))
            ds.index_add_(0, i, fs)
            dv.index_add_(0, i, msg)
        return s + ds * self.norm, v + dv * self.norm


class Mixing(nn.Module):
    """PaiNN update block (intra-atomic mixing of scalar and vector channels)."""

    def __init__(self, features: int) -> None:
        super().__init__()
        self.features = features
        self.vec_mix = nn.Linear(features, 2 * features, bias=False)
        self.context = nn.Sequential(nn.Linear(2 * features, features), nn.SiLU(),
                                     nn.Linear(features, 3 * features))

    def forward(self, s: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        vv, vw = torch.split(self.vec_mix(v), self.features, dim=-1)
        vnorm = torch.sqrt((vv * vv).sum(dim=1) + _EPS)
        a_ss, a_vv, a_sv = torch.split(self.context(torch.cat([s, vnorm], dim=-1)), self.features, dim=-1)
        s = s + a_ss + a_sv * (vv * vw).sum(dim=1)
        v = v + a_vv.unsqueeze(1) * vw
        return s, v


class GatedEquivariantReadout(nn.Module):
    """Gated equivariant block (Schütt et al. 2021) reduced to one output vector per atom:
    v_out = (v W_1) * g(s, |v W_2|) with a scalar gate MLP g."""

    def __init__(self, features: int) -> None:
        super().__init__()
        self.vec_mix = nn.Linear(features, 2, bias=False)
        self.gate = nn.Sequential(nn.Linear(features + 1, features + 1), nn.SiLU(), nn.Linear(features + 1, 1))

    def forward(self, s: Tensor, v: Tensor) -> Tensor:
        mixed = self.vec_mix(v)  # (N,3,2)
        vnorm = torch.sqrt((mixed[..., 1] * mixed[..., 1]).sum(dim=1, keepdim=True) + _EPS)  # (N,1)
        return mixed[..., 0] * self.gate(torch.cat([s, vnorm], dim=-1))  # (N,3)


class FlowModel(nn.Module):
    """Modified PaiNN flow model (Table A2 defaults: 64 features, 20 Bessel functions, 3 layers,
    5 Å cutoff, 0.5 Å offset). ``forward`` returns the per-atom vector field (N,3), Å per unit t.

    Parameters are initialised deterministically from ``seed`` (the global RNG is left untouched).
    Aggregated messages are scaled by 1/sqrt(``avg_neighbors``); since messages are linear in the
    filters this is only a reparametrisation of W (it keeps the untrained model's output bounded
    for dense cells with ~50 neighbours within 5 Å).
    """

    def __init__(self, features: int = 64, radial: int = 20, layers: int = 3, cutoff: float = 5.0,
                 offset: float = 0.5, max_z: int = 100, seed: int = 0, avg_neighbors: float = 32.0) -> None:
        super().__init__()
        if features % 4:
            raise ValueError(f"features must be a multiple of 4, got {features}")
        if cutoff <= 0 or offset < 0 or layers < 1 or radial < 1 or avg_neighbors <= 0:
            raise ValueError("cutoff > 0, offset >= 0, layers >= 1, radial >= 1, avg_neighbors > 0 are required")
        self.hparams: dict = dict(features=features, radial=radial, layers=layers, cutoff=float(cutoff),
                                  offset=float(offset), max_z=max_z, seed=seed, avg_neighbors=float(avg_neighbors))
        self.features, self.cutoff, self.max_z = features, float(cutoff), max_z
        self._basis = (float(cutoff), int(radial), float(offset))
        gen = torch.Generator().manual_seed(seed)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.embedding = nn.Embedding(max_z + 1, features)
            self.embed_T = SinusoidalEmbedding(features // 2, gen)
            self.embed_t = SinusoidalEmbedding(features // 2, gen)
            # w in D_t ⊗ w: small at init so the untrained field is O(0.01-0.1) for Å-sized D_t
            self.vec_weight = nn.Parameter(0.1 * torch.randn(features, generator=gen))
            self.rbf = BesselRBF(radial, cutoff, offset)
            self.interactions = nn.ModuleList([TwoGeometryInteraction(features, radial, math.sqrt(avg_neighbors))
                                               for _ in range(layers)])
            self.mixings = nn.ModuleList([Mixing(features) for _ in range(layers)])
            self.readout = GatedEquivariantReadout(features)

    # ------------------------------------------------------------------ conditioning
    def condition(self, g: GraphBatch) -> Conditioning:
        """Radius graph of X_tau = g.pos (periodic, vesin-torch, on g's device) and its features."""
        if g.numbers.numel() and int(g.numbers.max()) > self.max_z:
            raise ValueError(f"atomic number {int(g.numbers.max())} exceeds max_z={self.max_z}")
        edge_index, shift = radius_graph_pbc(g.pos, g.cell, g.batch, self.cutoff, g.ptr)
        return self.condition_from_edges(g, edge_index, shift)

    def condition_from_edges(self, g: GraphBatch, edge_index: Tensor, shift: Tensor) -> Conditioning:
        """Conditioning from an externally computed edge list (i, j) and Cartesian shifts (Å)."""
        edge_index = edge_index.to(g.pos.device, torch.long)
        shift = shift.to(g.pos.device, g.pos.dtype)
        vec1 = g.pos[edge_index[1]] - g.pos[edge_index[0]] + shift
        dist1 = torch.sqrt((vec1 * vec1).sum(-1) + _EPS)
        rbf1 = self.rbf(dist1)
        return Conditioning(edge_index=edge_index, vec1=vec1, shift=shift, dist1=dist1,
                            unit1=vec1 / dist1.unsqueeze(-1), rbf1=rbf1, basis=self._basis)

    # ------------------------------------------------------------------ forward
    def forward(self, d: Tensor, t: Tensor, g: GraphBatch, cond: Conditioning | None = None) -> Tensor:
        """Vector field v(D_t; X_tau, L, a, T, t) per atom.

        d (N,3) current displacements D_t, Å; t (G,) or scalar flow time in [0,1] per graph;
        ``cond`` a cached :meth:`condition` of the same ``g`` by this model (built if None).
        Returns (N,3).
        """
        if cond is None:
            cond = self.condition(g)
        elif cond.basis != self._basis:
            raise ValueError(f"Conditioning built for radial basis {cond.basis}, this model uses {self._basis}")
        if d.shape != g.pos.shape:
            raise ValueError(f"d has shape {tuple(d.shape)}, expected {tuple(g.pos.shape)}")
        n = d.shape[0]
        t = torch.as_tensor(t, dtype=d.dtype, device=d.device)
        if t.ndim == 0:
            t = t.expand(g.n_graphs)
        # node features
        cont = torch.cat([self.embed_T(g.temperature.to(d.dtype) / 1000.0), self.embed_t(t)], dim=-1)  # (G,F)
        s = self.embedding(g.numbers) + cont[g.batch]
        v = d.unsqueeze(-1) * self.vec_weight  # (N,3,F)
        # geometry 2
        i, j = cond.edge_index[0], cond.edge_index[1]
        vec2 = cond.vec1 + d[j] - d[i]
        dist2 = torch.sqrt((vec2 * vec2).sum(-1) + _EPS)
        unit2 = vec2 / dist2.unsqueeze(-1)
        rbf_sum = cond.rbf1 + self.rbf(dist2)
        units = torch.stack([cond.unit1, unit2], dim=-1)  # (E,3,2)
        for inter, mix in zip(self.interactions, self.mixings):
            s, v = inter(s, v, cond.edge_index, rbf_sum, units)
            s, v = mix(s, v)
        out = self.readout(s, v)
        assert out.shape == (n, 3)
        return out

    def n_parameters(self) -> int:
        """Number of trainable parameters."""
        return sum(p.numel() for p in self.parameters() if p.requires_grad)
