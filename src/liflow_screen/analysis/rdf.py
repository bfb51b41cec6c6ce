"""Radial distribution function and its mean absolute error.

Conventions (as everywhere in the package): positions ``pos`` (F, n, 3) in Å, **unwrapped**
Cartesian; ``times_ps`` (F,) in ps; ``numbers`` (n,) atomic numbers; ``cell`` (3, 3) Å with lattice
vectors as rows; MSD in Å², diffusion coefficients in cm²/s, temperatures in K, energies in eV,
conductivity in S/cm.
"""

from __future__ import annotations

import math

import numpy as np

from ..core.errors import InputError
from .displacement import _as_cell, _as_traj, species_mask

# --------------------------------------------------------------------------------------------
# radial distribution function
# --------------------------------------------------------------------------------------------

def rdf(
    pos: np.ndarray,
    numbers: np.ndarray,
    cell: np.ndarray,
    r_max: float = 5.0,
    n_bins: int = 100,
    discard: float = 0.2,
    pair: tuple[str | None, str | None] | None = None,
    max_frames: int | None = 200,
) -> tuple[np.ndarray, np.ndarray]:
    """Radial distribution function g(r) (Eq. 14), averaged over frames, r in Å.

    g_AB(r) = V / (n_A n_B) · <Σ_{i∈A} Σ_{j∈B, j≠i} δ(r − r_ij)> / (4π r²), histogrammed in
    ``n_bins`` shells up to ``r_max`` (shell volumes exact). ``pair`` None = all atoms (Eq. 14);
    ("Li", "Li") or ("Li", None) (Li – any atom) for species-resolved curves. The first
    ``discard`` fraction of frames is dropped, then at most ``max_frames`` evenly spaced frames
    are used. Periodic pair distances come from :func:`geometry.neighbor_pairs` (vesin, NumPy),
    exact for unwrapped positions and any cutoff. Returns bin centres r and g(r).
    """
    from ..core.geometry import neighbor_pairs

    x = np.asarray(pos, dtype=np.float64)
    if x.ndim == 2:
        x = x[None]
    x = _as_traj(x)
    c = _as_cell(cell)
    nums = np.asarray(numbers, dtype=int)
    if nums.shape != (x.shape[1],):
        raise InputError(f"numbers must have shape ({x.shape[1]},), got {nums.shape}")
    if r_max <= 0 or n_bins < 1:
        raise InputError("r_max must be positive (Å) and n_bins at least 1")
    if not 0.0 <= discard < 1.0:
        raise InputError("discard must be in [0, 1)")
    a_spec, b_spec = (None, None) if pair is None else pair
    ma, mb = species_mask(nums, a_spec), species_mask(nums, b_spec)
    if not ma.any() or not mb.any():
        raise InputError(f"no atoms for RDF pair {pair}")
    frames = x[int(math.floor(discard * x.shape[0])):]
    if max_frames is not None and frames.shape[0] > max_frames:
        frames = frames[np.unique(np.linspace(0, frames.shape[0] - 1, max_frames).round().astype(int))]
    n_f = frames.shape[0]
    edges = np.linspace(0.0, float(r_max), int(n_bins) + 1)
    hist = np.zeros(int(n_bins), dtype=np.float64)
    for frame in frames:
        i, j, dist = neighbor_pairs(frame, c, float(r_max))
        keep = ma[i] & mb[j]
        hist += np.histogram(dist[keep], bins=edges)[0]
    volume = abs(np.linalg.det(c))
    shell = 4.0 / 3.0 * np.pi * (edges[1:] ** 3 - edges[:-1] ** 3)
    rho_b = mb.sum() / volume
    g_r = hist / (n_f * ma.sum() * rho_b * shell)
    return 0.5 * (edges[1:] + edges[:-1]), g_r


def rdf_mae(g_ref: np.ndarray, g_gen: np.ndarray, r: np.ndarray) -> float:
    """RDF MAE = (1/r_cut) ∫_0^{r_cut} |ĝ(r) − g(r)| dr on a uniform histogram (bin centres ``r``, Å).

    r_cut is the outer edge of the last bin; the integral is exact for histogrammed g(r).
    """
    a = np.asarray(g_ref, dtype=np.float64)
    b = np.asarray(g_gen, dtype=np.float64)
    rr = np.asarray(r, dtype=np.float64)
    if a.shape != b.shape or a.shape != rr.shape or rr.size < 2:
        raise InputError("g_ref, g_gen and r must be 1-D arrays of the same length (>= 2)")
    dr = np.diff(rr)
    if not np.allclose(dr, dr[0], rtol=1e-6):
        raise InputError("rdf_mae needs uniformly spaced bins")
    r_cut = rr[-1] + 0.5 * dr[0]
    return float(np.sum(np.abs(b - a)) * dr[0] / r_cut)
