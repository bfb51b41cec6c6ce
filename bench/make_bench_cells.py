"""Write ``bench/data/bench_cells.npz``: the cells the rollout benchmarks use, so that a machine without
pymatgen (the GPU machine) runs them. Regenerate with ``python bench/make_bench_cells.py``.

* ``lifepo4/*``: pymatgen's bundled LiFePO4 (``util/structures/LiFePO4.json``), 2 x 2 x 1 supercell
  (112 atoms), rattled by 0.05 Å (ase ``rattle``, seed 0), as ``bench_rollout.py`` always used;
* ``lgps/*``: the 200-atom LGPS cell of ``bench_lgps.py`` (pymatgen's partially occupied
  Li10GeP2S12 ordered by lowest Ewald energy, 50 atoms, repeated 2 x 2 x 1).

Each holds ``numbers`` (n,), ``positions`` (n, 3) Å and ``cell`` (3, 3) Å (rows a, b, c).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

OUT = Path(__file__).resolve().parent / "data" / "bench_cells.npz"


def main() -> None:
    import sys

    from pymatgen.core import Structure
    from pymatgen.io.ase import AseAtomsAdaptor
    import pymatgen.util

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from bench_lgps import ordered_lgps

    path = Path(pymatgen.util.__file__).parent / "structures" / "LiFePO4.json"
    lfp = AseAtomsAdaptor.get_atoms(Structure.from_file(path)).repeat((2, 2, 1))
    lfp.rattle(0.05, seed=0)
    lgps = ordered_lgps()[0] * (2, 2, 1)
    arrays = {"lifepo4/numbers": lfp.numbers, "lifepo4/positions": lfp.positions, "lifepo4/cell": lfp.cell.array,
              "lgps/numbers": np.array([s.specie.Z for s in lgps]), "lgps/positions": lgps.cart_coords,
              "lgps/cell": lgps.lattice.matrix}
    OUT.parent.mkdir(exist_ok=True)
    np.savez_compressed(OUT, **arrays)
    print(f"wrote {OUT}: LiFePO4 {len(lfp)} atoms, LGPS {len(lgps)} atoms")


if __name__ == "__main__":
    main()
