"""Trajectory analysis: MSD and resolution, kinisi self-diffusion, Arrhenius fits, Nernst–Einstein, RDF,
log-MSD metrics. Pure functions on numpy arrays (Å, ps, K, eV, cm²/s, S/cm; positions unwrapped).

Modules: :mod:`.displacement` (checks, MSD, is diffusion resolved), :mod:`.diffusion` (kinisi),
:mod:`.arrhenius` (fits, conductivity), :mod:`.rdf`. Their public names are re-exported here.
"""

from ..core.constants import A2_PER_PS_TO_CM2_PER_S, E_CHARGE, K_B_EV, K_B_J
from .displacement import (
    species_mask,
    frame_step_ps,
    msd_single_origin,
    msd_multi_origin,
    mobility_rate,
    PLATEAU_PS,
    SITE_RADIUS_FRACTION,
    MOLTEN_OCCUPANCY,
    NON_GAUSSIAN_LAG_PS,
    CONTINUOUS_ALPHA2,
    FRAME_MELT_FRACTION,
    excess_msd,
    hop_length,
    diffusion_resolution,
    site_occupancy,
    remove_framework_drift,
    non_gaussian_parameter,
    framework_melt_ratio,
    log_msd_metrics,
)
from .diffusion import (
    coarse_lag_grid,
    KINISI_MAX_SPAN,
    kinisi_diffusion,
)
from .arrhenius import (
    arrhenius_fit,
    ARRHENIUS_E_A_RANGE,
    ARRHENIUS_LN_D0_RANGE,
    ARRHENIUS_SIGMA_FLOOR_LN,
    ARRHENIUS_BOUND_SIGMA_LN,
    ARRHENIUS_P_MIN,
    arrhenius_fit_censored,
    nernst_einstein_conductivity,
)
from .rdf import (
    rdf,
    rdf_mae,
)

__all__ = [
    "A2_PER_PS_TO_CM2_PER_S",
    "E_CHARGE",
    "K_B_EV",
    "K_B_J",
    "species_mask",
    "frame_step_ps",
    "msd_single_origin",
    "msd_multi_origin",
    "mobility_rate",
    "PLATEAU_PS",
    "SITE_RADIUS_FRACTION",
    "MOLTEN_OCCUPANCY",
    "NON_GAUSSIAN_LAG_PS",
    "CONTINUOUS_ALPHA2",
    "FRAME_MELT_FRACTION",
    "excess_msd",
    "hop_length",
    "diffusion_resolution",
    "site_occupancy",
    "remove_framework_drift",
    "non_gaussian_parameter",
    "framework_melt_ratio",
    "log_msd_metrics",
    "coarse_lag_grid",
    "KINISI_MAX_SPAN",
    "kinisi_diffusion",
    "arrhenius_fit",
    "ARRHENIUS_E_A_RANGE",
    "ARRHENIUS_LN_D0_RANGE",
    "ARRHENIUS_SIGMA_FLOOR_LN",
    "ARRHENIUS_BOUND_SIGMA_LN",
    "ARRHENIUS_P_MIN",
    "arrhenius_fit_censored",
    "nernst_einstein_conductivity",
    "rdf",
    "rdf_mae",
]
