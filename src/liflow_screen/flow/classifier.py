"""Prior selector (paper Appendix D.1): per species group, is the displacement small ("slow")?

For each species group S in {"li", "frame"} a binary MLP classifier (hidden 32, 16 by default)
maps ``[mean invariant descriptors of the atoms of S] ⊕ [T / 1000 K]`` to P(slow), where the
label is ``slow = rate_S < dataset.slow_threshold`` (0.1 Å²/ps; the rate is the slope of the
group's multi-origin MSD over the later half of the trajectory, ``analysis.mobility_rate``). A predicted "slow" group gets
the *small* adaptive prior scale of Eq. (10), a "fast" group the *large* one.

Degenerate cases (documented behaviour):

* **single-class training set** - if every finite training row of a group has the same label, no
  network is trained; the classifier predicts that class with probability 1 (0) and its report
  says ``status: "single-class training set"``.
* **empty group / NaN descriptors** - a structure with no atoms of the group (e.g. no frame atoms)
  has NaN mean descriptors. Such rows are dropped from training and evaluation (counted as
  ``n_skipped``); at prediction time they get ``predict_proba = NaN`` and ``predict_slow = True``
  (the *small* prior). The prior scale of an empty group multiplies no atom, so the choice
  has no effect on any displacement.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from ..core.errors import InputError
from ..io.files import atomic_path, load_torch_file, provenance

GROUPS: tuple[str, ...] = ("li", "frame")
FORMAT = "liflow-prior-selector/1"
SINGLE_CLASS = "single-class training set"


def _inputs(desc: np.ndarray, temps: np.ndarray, what: str) -> np.ndarray:
    """Check shapes and return ``[desc, T/1000]`` as float64 (M, F+1)."""
    d = np.asarray(desc, dtype=np.float64)
    if d.ndim == 1:
        d = d[:, None]
    if d.ndim != 2:
        raise InputError(f"{what}: descriptors must be a 2-D array (rows, features), got shape {d.shape}")
    t = np.asarray(temps, dtype=np.float64).reshape(-1)
    if t.shape[0] != d.shape[0]:
        raise InputError(f"{what}: {d.shape[0]} descriptor rows but {t.shape[0]} temperatures")
    if not np.all(np.isfinite(t)) or np.any(t <= 0):
        raise InputError(f"{what}: temperatures must be finite and > 0 K")
    return np.concatenate([d, t[:, None] / 1000.0], axis=1)


def _labels(slow: np.ndarray, n: int, what: str) -> np.ndarray:
    y = np.asarray(slow).reshape(-1)
    if y.shape[0] != n:
        raise InputError(f"{what}: {n} descriptor rows but {y.shape[0]} labels")
    if y.dtype != bool:
        if not np.all(np.isin(y, (0, 1))):
            raise InputError(f"{what}: labels must be boolean (slow = True)")
        y = y.astype(bool)
    return y


class GroupClassifier(nn.Module):
    """MLP P(slow | features) for one species group, with input standardisation stored as buffers."""

    def __init__(self, in_dim: int, hidden: Sequence[int] = (32, 16)) -> None:
        super().__init__()
        self.in_dim = int(in_dim)
        self.hidden = tuple(int(h) for h in hidden)
        layers: list[nn.Module] = []
        width = self.in_dim
        for h in self.hidden:
            layers += [nn.Linear(width, h), nn.SiLU()]
            width = h
        layers.append(nn.Linear(width, 1))
        self.net = nn.Sequential(*layers)
        self.register_buffer("mean", torch.zeros(self.in_dim, dtype=torch.float64))
        self.register_buffer("std", torch.ones(self.in_dim, dtype=torch.float64))
        # None = trained network; True/False = constant prediction (single-class training set).
        self.constant: bool | None = None

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """(M, F) raw float64 inputs -> (M,) logits of P(slow)."""
        z = ((x - self.mean) / self.std).to(torch.float32)
        return self.net(z).squeeze(-1)

    def proba(self, x: np.ndarray) -> np.ndarray:
        """(M, F) inputs (finite rows) -> (M,) P(slow)."""
        if self.constant is not None:
            return np.full(x.shape[0], 1.0 if self.constant else 0.0)
        with torch.no_grad():
            return torch.sigmoid(self.logits(torch.as_tensor(x, dtype=torch.float64))).double().numpy()


def _weighted_bce(logits: torch.Tensor, y: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return (nn.functional.binary_cross_entropy_with_logits(logits, y, reduction="none") * w).sum() / w.sum()


def _balance_weights(y: np.ndarray) -> np.ndarray:
    """Per-sample weights so that both classes carry equal total weight (class-balanced BCE)."""
    n = len(y)
    n_pos = max(int(y.sum()), 1)
    n_neg = max(n - int(y.sum()), 1)
    return np.where(y, n / (2.0 * n_pos), n / (2.0 * n_neg))


def _fit_group(
    x: np.ndarray, y: np.ndarray, hidden: Sequence[int], epochs: int, lr: float, seed: int,
    val: tuple[np.ndarray, np.ndarray] | None, patience: int,
) -> tuple[GroupClassifier, dict[str, Any]]:
    """Train one group classifier on finite rows ``x`` (M, F) and labels ``y`` (M,)."""
    report: dict[str, Any] = {"n_train": int(len(y)), "n_train_slow": int(y.sum())}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = GroupClassifier(x.shape[1], hidden)
    if len(y) == 0:
        raise InputError("prior selector: no training rows with finite descriptors for a group")
    if y.all() or not y.any():
        model.constant = bool(y[0])
        report.update(status=SINGLE_CLASS, predicts="slow" if y[0] else "fast", epochs_run=0)
        return model, report
    mean = x.mean(axis=0)
    std = x.std(axis=0)
    std = np.where(std > 1e-8, std, 1.0)
    model.mean.copy_(torch.as_tensor(mean))
    model.std.copy_(torch.as_tensor(std))

    xt = torch.as_tensor(x, dtype=torch.float64)
    yt = torch.as_tensor(y, dtype=torch.float32)
    wt = torch.as_tensor(_balance_weights(y), dtype=torch.float32)
    if val is not None and len(val[1]) > 0:
        xv = torch.as_tensor(val[0], dtype=torch.float64)
        yv = torch.as_tensor(val[1], dtype=torch.float32)
        wv = torch.as_tensor(_balance_weights(val[1]), dtype=torch.float32)
    else:
        xv = None
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    best = float("inf")
    best_state = copy.deepcopy(model.state_dict())
    best_epoch = 0
    since = 0
    epoch = 0
    train_loss = float("nan")
    for epoch in range(1, epochs + 1):
        model.train()
        opt.zero_grad()
        loss = _weighted_bce(model.logits(xt), yt, wt)
        loss.backward()
        opt.step()
        train_loss = float(loss.detach())
        if xv is not None:
            with torch.no_grad():
                vloss = float(_weighted_bce(model.logits(xv), yv, wv))
            if vloss < best - 1e-7:
                best, best_epoch, since = vloss, epoch, 0
                best_state = copy.deepcopy(model.state_dict())
            else:
                since += 1
                if since >= patience:
                    break
    if xv is not None:
        model.load_state_dict(best_state)
        report.update(best_val_loss=best, best_epoch=best_epoch)
    model.eval()
    report.update(status="trained", epochs_run=epoch, final_train_loss=train_loss)
    return model, report


class PriorSelector:
    """Two group classifiers ("li", "frame") predicting slow (small-prior) vs fast (large-prior)."""

    def __init__(self, models: dict[str, GroupClassifier], report: dict[str, dict[str, Any]],
                 config: dict[str, Any]) -> None:
        self.models = models
        self.report = report
        self.config = config
        self.provenance: dict[str, Any] | None = None

    @classmethod
    def fit(
        cls,
        desc: Mapping[str, np.ndarray],
        temps: np.ndarray,
        slow: Mapping[str, np.ndarray],
        hidden: Sequence[int] = (32, 16),
        epochs: int = 300,
        lr: float = 1e-3,
        seed: int = 0,
        val: tuple[Mapping[str, np.ndarray], np.ndarray, Mapping[str, np.ndarray]] | None = None,
        patience: int = 30,
    ) -> "PriorSelector":
        """Train both group classifiers, full batch, Adam, class-balanced BCE.

        desc[g]: (M, F_g) mean invariant descriptors of group g per (structure, T) row (NaN rows =
        empty group); temps: (M,) K; slow[g]: (M,) bool labels (MSD_g/τ < threshold).
        val: optional ``(desc, temps, slow)`` with the same layout; enables early stopping on the
        validation loss (``patience`` epochs without improvement) and keeps the best epoch.
        """
        if epochs < 1 or lr <= 0:
            raise InputError("prior selector: epochs must be >= 1 and lr > 0")
        models: dict[str, GroupClassifier] = {}
        report: dict[str, dict[str, Any]] = {}
        for i, g in enumerate(GROUPS):
            if g not in desc or g not in slow:
                raise InputError(f"prior selector: missing descriptors or labels for group {g!r}")
            x = _inputs(desc[g], temps, f"prior selector ({g})")
            y = _labels(slow[g], x.shape[0], f"prior selector ({g})")
            ok = np.all(np.isfinite(x), axis=1)
            vpair = None
            if val is not None:
                vd, vt, vs = val
                xv = _inputs(vd[g], vt, f"prior selector validation ({g})")
                yv = _labels(vs[g], xv.shape[0], f"prior selector validation ({g})")
                if xv.shape[1] != x.shape[1]:
                    raise InputError(f"prior selector validation ({g}): {xv.shape[1] - 1} descriptor "
                                     f"features, training has {x.shape[1] - 1}")
                vok = np.all(np.isfinite(xv), axis=1)
                vpair = (xv[vok], yv[vok])
            model, rep = _fit_group(x[ok], y[ok], hidden, epochs, lr, seed + i, vpair, patience)
            rep["n_skipped"] = int((~ok).sum())
            models[g], report[g] = model, rep
        config = {"hidden": [int(h) for h in hidden], "epochs": int(epochs), "lr": float(lr),
                  "seed": int(seed), "patience": int(patience), "groups": list(GROUPS)}
        return cls(models, report, config)

    def _model(self, group: str) -> GroupClassifier:
        if group not in self.models:
            raise InputError(f"prior selector: unknown group {group!r} (expected one of {', '.join(GROUPS)})")
        return self.models[group]

    def predict_proba(self, group: str, desc: np.ndarray, temps: np.ndarray) -> np.ndarray:
        """(M,) P(slow) for group ``group``; NaN where the descriptors are NaN (empty group)."""
        model = self._model(group)
        x = _inputs(desc, temps, f"prior selector ({group})")
        if x.shape[1] != model.in_dim:
            raise InputError(f"prior selector ({group}): {x.shape[1] - 1} descriptor features, "
                             f"model expects {model.in_dim - 1}")
        ok = np.all(np.isfinite(x), axis=1)
        out = np.full(x.shape[0], np.nan)
        if ok.any():
            out[ok] = model.proba(x[ok])
        return out

    def predict_slow(self, group: str, desc: np.ndarray, temps: np.ndarray) -> np.ndarray:
        """(M,) bool: True = slow = small prior. Empty groups (NaN descriptors) -> True."""
        p = self.predict_proba(group, desc, temps)
        return np.where(np.isfinite(p), p >= 0.5, True)

    def evaluate(self, group: str, desc: np.ndarray, temps: np.ndarray, slow: np.ndarray) -> dict[str, Any]:
        """Accuracy and confusion matrix [[tn, fp], [fn, tp]] (positive = slow) on finite rows."""
        p = self.predict_proba(group, desc, temps)
        y = _labels(slow, len(p), f"prior selector ({group})")
        ok = np.isfinite(p)
        pred, truth = p[ok] >= 0.5, y[ok]
        tn = int(np.sum(~pred & ~truth))
        fp = int(np.sum(pred & ~truth))
        fn = int(np.sum(~pred & truth))
        tp = int(np.sum(pred & truth))
        n = int(ok.sum())
        return {
            "accuracy": (tn + tp) / n if n else float("nan"),
            "confusion": [[tn, fp], [fn, tp]],
            "n": n,
            "n_skipped": int((~ok).sum()),
            "status": self.report.get(group, {}).get("status", "trained"),
        }

    def save(self, path: str | os.PathLike[str], config: dict[str, Any] | None = None) -> None:
        """Write weights, standardisation, report, config and provenance to a torch file atomically."""
        blob = {
            "format": FORMAT,
            "config": self.config,
            "report": self.report,
            "groups": {
                g: {"in_dim": m.in_dim, "hidden": list(m.hidden), "constant": m.constant,
                    "state_dict": {k: v.clone() for k, v in m.state_dict().items()}}
                for g, m in self.models.items()
            },
            "provenance": provenance(config if config is not None else self.config),
        }
        with atomic_path(path) as tmp:
            torch.save(blob, tmp)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> "PriorSelector":
        """Read a file written by :meth:`save`."""
        blob = load_torch_file(path, FORMAT, "prior selector")
        models: dict[str, GroupClassifier] = {}
        for g, rec in blob["groups"].items():
            m = GroupClassifier(rec["in_dim"], rec["hidden"])
            m.load_state_dict(rec["state_dict"])
            m.constant = rec["constant"]
            m.eval()
            models[g] = m
        sel = cls(models, blob["report"], blob["config"])
        sel.provenance = blob.get("provenance")
        return sel
