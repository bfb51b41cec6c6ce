"""Stage ``import-model``: import a published LiFlow checkpoint (the authors' Lightning ``.ckpt``,
or an already imported ``.pt``) into this project's flow-model format.

Which file: ``--checkpoint`` as given, else the published ``--name`` or the config's
``pretrained.<kind>``, resolved as explicit path > cache > shipped copy > download
(:func:`liflow_screen.flow.published.resolve_published`).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from ..core.errors import LiflowError
from ..core.settings import Settings
from ..flow import published

log = logging.getLogger(__name__)


def run(settings: Settings, out: Path, *, kind: str | None = None, name: str | None = None,
        checkpoint: Path | None = None, element_index: Path | None = None,
        delta_tau_ps: float | None = None) -> dict[str, Any]:
    """Write the imported checkpoint atomically to ``out``; return its metadata.

    kind: ``propagator`` | ``corrector``: import the config's ``pretrained.<kind>`` (and check the
    file is one); delta_tau_ps: Δτ of the model, ps (known for the published files).
    """
    pc = settings.pretrained
    explicit = checkpoint
    if kind is not None:
        name = name or getattr(pc, kind)
        explicit = explicit or getattr(pc, f"{kind}_path")
        if name is None and explicit is None:
            raise LiflowError(f"config key pretrained.{kind} is not set: nothing to import")
    if name is None and explicit is None:
        raise LiflowError("give --kind, --name or --checkpoint")
    src = explicit if name is None else published.resolve_published(
        name, explicit, download=pc.download, base_url=pc.base_url)
    meta = published.import_checkpoint(src, out, element_index=element_index or pc.element_index,
                                       delta_tau_ps=delta_tau_ps, config=settings)
    if kind is not None and meta["kind"] != kind:
        Path(out).unlink(missing_ok=True)
        raise LiflowError(f"pretrained.{kind} resolves to a {meta['kind']} checkpoint ({src})")
    log.info("imported %s -> %s: %s, prior %s, Δτ %s ps, elements %s", src, out, meta["kind"], meta["prior"],
             meta["delta_tau_ps"], meta["imported_from"]["elements_covered"])
    return meta
