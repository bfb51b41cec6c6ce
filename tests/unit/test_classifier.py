"""Prior selector: separable synthetic data, confusion matrix, save/load, degenerate cases."""

from __future__ import annotations

import numpy as np
import pytest

from liflow_screen.core.errors import InputError
from liflow_screen.flow.classifier import SINGLE_CLASS, PriorSelector

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _synthetic(n: int, seed: int) -> tuple[dict[str, np.ndarray], np.ndarray, dict[str, np.ndarray]]:
    """Descriptors (8 features) and T; slow iff a linear score of descriptors and T/1000 is low.

    Li: slow when f0 + 2 (T/1000) < 2.0 (hotter -> faster); frame: slow when f1 - f2 < 0.5.
    Rows within 0.1 of the boundary are dropped so the classes are cleanly separable.
    """
    rng = np.random.default_rng(seed)
    out_d: dict[str, list[np.ndarray]] = {"li": [], "frame": []}
    temps: list[float] = []
    lab: dict[str, list[bool]] = {"li": [], "frame": []}
    while len(temps) < n:
        dli = rng.normal(size=8)
        dfr = rng.normal(size=8) + 0.5
        t = float(rng.choice([600.0, 800.0, 1000.0, 1200.0]))
        s_li = dli[0] + 2 * t / 1000.0 - 2.0
        s_fr = dfr[1] - dfr[2] - 0.5
        if abs(s_li) < 0.1 or abs(s_fr) < 0.1:
            continue
        out_d["li"].append(dli)
        out_d["frame"].append(dfr)
        temps.append(t)
        lab["li"].append(s_li < 0)
        lab["frame"].append(s_fr < 0)
    return ({g: np.array(v) for g, v in out_d.items()}, np.array(temps),
            {g: np.array(v) for g, v in lab.items()})


@pytest.fixture(scope="module")
def fitted() -> tuple[PriorSelector, tuple]:
    d, t, s = _synthetic(400, seed=1)
    dv, tv, sv = _synthetic(100, seed=2)
    sel = PriorSelector.fit(d, t, s, hidden=(32, 16), epochs=400, lr=1e-2, seed=0, val=(dv, tv, sv))
    return sel, _synthetic(300, seed=3)


def test_separable_heldout_accuracy(fitted) -> None:
    sel, (d, t, s) = fitted
    for g in ("li", "frame"):
        # Both classes are present in the held-out set (the test would be vacuous otherwise).
        assert 0.2 < s[g].mean() < 0.8
        ev = sel.evaluate(g, d[g], t, s[g])
        assert ev["n"] == 300
        assert ev["accuracy"] >= 0.95, (g, ev)
        assert sel.report[g]["status"] == "trained"


def test_confusion_matrix_matches_independent_count(fitted) -> None:
    sel, (d, t, s) = fitted
    g = "li"
    p = sel.predict_proba(g, d[g], t)
    pred = sel.predict_slow(g, d[g], t)
    assert np.array_equal(pred, p >= 0.5)
    tn = fp = fn = tp = 0
    for yi, pi in zip(s[g].tolist(), pred.tolist()):
        if yi and pi:
            tp += 1
        elif yi:
            fn += 1
        elif pi:
            fp += 1
        else:
            tn += 1
    ev = sel.evaluate(g, d[g], t, s[g])
    assert ev["confusion"] == [[tn, fp], [fn, tp]]
    assert ev["accuracy"] == pytest.approx((tn + tp) / len(pred))


def test_temperature_matters(fitted) -> None:
    """Same Li descriptors, hotter -> lower P(slow) (the synthetic rule depends on T/1000)."""
    sel, _ = fitted
    d = np.zeros((1, 8))
    d[0, 0] = 0.4  # slow at 600 K (0.4 + 1.2 < 2), fast at 1200 K (0.4 + 2.4 > 2)
    p600 = sel.predict_proba("li", d, np.array([600.0]))[0]
    p1200 = sel.predict_proba("li", d, np.array([1200.0]))[0]
    assert p600 > 0.5 > p1200


def test_save_load_roundtrip(fitted, tmp_path) -> None:
    sel, (d, t, s) = fitted
    path = tmp_path / "selector.pt"
    sel.save(path, config={"train": {"classifier_hidden": [32, 16]}})
    back = PriorSelector.load(path)
    for g in ("li", "frame"):
        assert np.array_equal(back.predict_proba(g, d[g], t), sel.predict_proba(g, d[g], t))
    assert back.report == sel.report
    assert back.provenance is not None and "versions" in back.provenance


def test_same_seed_same_model() -> None:
    d, t, s = _synthetic(120, seed=5)
    a = PriorSelector.fit(d, t, s, epochs=50, seed=7)
    b = PriorSelector.fit(d, t, s, epochs=50, seed=7)
    c = PriorSelector.fit(d, t, s, epochs=50, seed=8)
    assert np.array_equal(a.predict_proba("li", d["li"], t), b.predict_proba("li", d["li"], t))
    assert not np.array_equal(a.predict_proba("li", d["li"], t), c.predict_proba("li", d["li"], t))


def test_single_class_and_empty_group(tmp_path) -> None:
    d, t, s = _synthetic(60, seed=4)
    s = {"li": s["li"], "frame": np.ones(60, dtype=bool)}  # every frame group slow
    d["frame"][:10] = np.nan  # ten structures without frame atoms
    sel = PriorSelector.fit(d, t, s, epochs=20, seed=0)
    assert sel.report["frame"]["status"] == SINGLE_CLASS
    assert sel.report["frame"]["n_skipped"] == 10
    assert sel.report["frame"]["n_train"] == 50
    p = sel.predict_proba("frame", d["frame"], t)
    assert np.all(np.isnan(p[:10])) and np.all(p[10:] == 1.0)
    assert sel.predict_slow("frame", d["frame"], t).all()  # empty group -> small prior too
    ev = sel.evaluate("frame", d["frame"], t, s["frame"])
    assert ev == {"accuracy": 1.0, "confusion": [[0, 0], [0, 50]], "n": 50, "n_skipped": 10,
                  "status": SINGLE_CLASS}
    sel.save(tmp_path / "s.pt")
    assert np.array_equal(PriorSelector.load(tmp_path / "s.pt").predict_slow("frame", d["frame"], t),
                          sel.predict_slow("frame", d["frame"], t))


def test_bad_input(tmp_path) -> None:
    d, t, s = _synthetic(20, seed=6)
    with pytest.raises(InputError, match="temperatures"):
        PriorSelector.fit(d, t[:10], s)
    with pytest.raises(InputError, match="group 'frame'"):
        PriorSelector.fit({"li": d["li"]}, t, s)
    sel = PriorSelector.fit(d, t, s, epochs=5)
    with pytest.raises(InputError, match="model expects 8"):
        sel.predict_proba("li", d["li"][:, :3], t)
    with pytest.raises(InputError, match="unknown group"):
        sel.predict_proba("na", d["li"], t)
    (tmp_path / "junk.pt").write_bytes(b"not a torch file")
    with pytest.raises(InputError, match="cannot read"):
        PriorSelector.load(tmp_path / "junk.pt")
