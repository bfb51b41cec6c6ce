"""The one home of physical constants and element numbers (from ase.units / ase.data).

Units: energies in eV, temperatures in K, lengths in Å, times in ps, charge in C.
"""

from __future__ import annotations

from ase.data import atomic_numbers as _atomic_numbers
from ase.units import create_units

#: ase's CODATA 2018 table (the exact SI 2019 k_B and e; ase's module default is CODATA 2014).
_U = create_units("2018")
#: Boltzmann constant, eV/K.
K_B_EV: float = float(_U["kB"])
#: Elementary charge, C (exact).
E_CHARGE: float = float(_U["_e"])
#: Boltzmann constant, J/K (exact).
K_B_J: float = float(_U["_k"])
#: 1 Å²/ps in cm²/s.
A2_PER_PS_TO_CM2_PER_S: float = 1e-16 / 1e-12
#: Atomic number of lithium: the mobile species throughout.
LI_Z: int = int(_atomic_numbers["Li"])
