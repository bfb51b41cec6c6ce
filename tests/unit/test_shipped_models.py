"""The published universal Propagator and Corrector shipped with the package (``data/models``).

Checked: the shipped files match ``PROVENANCE.json`` (SHA-256, sources, license); the shipped models
load and reproduce the reference implementation's outputs for all four structures of the in-repository
``tests/data/parity_fixture.npz``; the generator turns checkpoints in the authors' format into the
shipped files (and, where the authors' files are at hand, reproduces them from those byte for byte);
resolution order explicit > cache > shipped > download (with downloads off: no network); the import
step copies a shipped copy (or re-tables it with an element_index). Nothing here needs ``../shared``.
"""

from __future__ import annotations

import importlib.resources
import importlib.util
import json
import shutil
import urllib.request

import numpy as np
import pytest
import torch
import yaml
from test_published import (DATA, FIXTURE, FIXTURE_STRUCTURES, SHARED, TOL, original, published_as,
                            shipped_as_lightning)

from conftest import REPO, parity_errors
from liflow_screen.core.errors import InputError, LiflowError
from liflow_screen.io.files import sha256_of
from liflow_screen.flow import published as pub
from liflow_screen.flow.training import CKPT_FORMAT, flow_meta, load_flow


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    """Any download attempt fails the test."""
    def refuse(*args, **kwargs):
        raise AssertionError("a download was attempted")
    monkeypatch.setattr(urllib.request, "urlopen", refuse)


@pytest.fixture
def empty_cache(tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    cache.mkdir()
    monkeypatch.setenv("LIFLOW_SCREEN_CACHE", str(cache))
    return cache


def _record() -> dict:
    return json.loads((pub.shipped_dir() / "PROVENANCE.json").read_text())


# ----------------------------------------------------------------------------- the shipped files
def test_shipped_files_match_provenance() -> None:
    data = importlib.resources.files("liflow_screen") / "data" / "models"
    rec = _record()
    assert rec["shipped"] == list(pub.SHIPPED) == ["P_universal", "C_universal"]
    assert set(rec["not_shipped"]) == set(pub.PUBLISHED) - set(pub.SHIPPED)
    assert rec["source"]["commit"] == pub.COMMIT and pub.REPOSITORY in rec["source"]["repository"]
    assert rec["conversion"]["format"] == CKPT_FORMAT and rec["conversion"]["date"]
    shipped_pt = sorted(p.name for p in pub.shipped_dir().glob("*.pt"))
    assert shipped_pt == ["C_universal.pt", "P_universal.pt"]  # only these two ship
    for name in pub.SHIPPED:
        m = rec["models"][name]
        f = data / m["file"]
        assert f.is_file()
        assert sha256_of(f) == m["sha256"]
        assert f.stat().st_size == m["bytes"] < 1_000_000  # float32 state dict only (~0.7 MB)
        assert m["source_file"] == pub.PUBLISHED[name].file
        assert m["source_sha256"] == pub.PUBLISHED[name].sha256
        assert pub.shipped_model(name) == pub.shipped_dir() / m["file"]
        meta = flow_meta(f)
        assert meta["kind"] == m["kind"] == pub.PUBLISHED[name].kind and meta["variant"] == "published"
        imp = meta["imported_from"]
        assert imp["sha256"] == pub.PUBLISHED[name].sha256 and imp["commit"] == pub.COMMIT and "MIT" in imp["license"]
        assert imp["elements_covered"] == list(pub.PINNED_ELEMENTS)
        blob = torch.load(f, map_location="cpu", weights_only=True)
        assert {v.dtype for v in blob["model"].values()} == {torch.float32, torch.int64}
        assert "optimizer_states" not in blob and "created_utc" not in blob["provenance"]  # deterministic
    lic = (data / "LICENSE").read_text()
    assert lic.startswith("MIT License") and "Permission is hereby granted" in lic
    assert (data / "LICENSE").read_bytes() == (DATA / "LICENSE-liflow").read_bytes()  # verbatim
    if (orig := original("LICENSE")) is not None:
        assert (data / "LICENSE").read_bytes() == orig.read_bytes()
    assert pub.shipped_model("P_LGPS") is None  # not shipped


def test_shipped_models_reproduce_the_reference(one_torch_thread) -> None:
    """The shipped P and C reproduce the reference implementation's outputs and one whole step, for
    all four structures of the fixture, within 1e-4 Å."""
    prop, corr = load_flow(pub.shipped_model("P_universal")), load_flow(pub.shipped_model("C_universal"))
    fx = np.load(FIXTURE)
    for s in FIXTURE_STRUCTURES:
        err = parity_errors(prop, corr, fx, s)
        assert max(err["evals"].values()) < TOL, (s, err)
        assert err["after_P"] < TOL and err["next"] < TOL, (s, err)
        assert err["move"] > 0.05, s  # a real move
        assert max(err["evals"].values()) > 0, s  # float32 round-off: never exactly equal


def _generator():
    script = REPO / "scripts" / "ship_published_models.py"
    spec = importlib.util.spec_from_file_location("ship_published_models", script)
    ship = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ship)
    return ship


def test_generator_reproduces_the_shipped_files(tmp_path, capsys) -> None:
    """The generator, given checkpoints in the authors' format with the shipped weights, reference
    config and training step, writes the shipped files: the same weights and metadata except the
    recorded source SHA-256, and with that put back, the same bytes (same torch). Where the authors'
    files are at hand, its own ``--check`` reproduces the shipped files from them."""
    ship = _generator()
    src, out = tmp_path / "source", tmp_path / "out"
    src.mkdir()
    ckpt = {name: shipped_as_lightning(name, src / pub.PUBLISHED[name].file) for name in pub.SHIPPED}
    shutil.copyfile(DATA / "LICENSE-liflow", src / "LICENSE")
    shipped = _record()
    with published_as(ckpt):
        rec = ship.generate(src, out, shipped["conversion"]["date"])
    assert sorted(p.name for p in out.iterdir()) == ["C_universal.pt", "LICENSE", "PROVENANCE.json", "PROVENANCE.md",
                                                     "P_universal.pt"]
    same_torch = torch.__version__ == shipped["conversion"]["versions"]["torch"]
    for name in pub.SHIPPED:
        got, want = out / f"{name}.pt", pub.shipped_dir() / f"{name}.pt"
        assert ship._same_weights(got, want) == ["metadata imported_from"]
        blob = torch.load(got, map_location="cpu", weights_only=True)
        real = torch.load(want, map_location="cpu", weights_only=True)["imported_from"]["sha256"]
        assert blob["imported_from"]["sha256"] == sha256_of(ckpt[name]) != real
        blob["imported_from"]["sha256"] = real
        (tmp_path / "fixed").mkdir(exist_ok=True)
        torch.save(blob, tmp_path / "fixed" / f"{name}.pt")
        assert ship._same_weights(tmp_path / "fixed" / f"{name}.pt", want) == []
        if same_torch:
            assert (tmp_path / "fixed" / f"{name}.pt").read_bytes() == want.read_bytes(), name
        m, s = rec["models"][name], shipped["models"][name]
        assert m.keys() == s.keys() and {k for k in s if m[k] != s[k]} == {"sha256", "source_sha256", "source_bytes"}
        assert m["source_sha256"] == sha256_of(ckpt[name]) and m["sha256"] == sha256_of(got)
    for key in ("source", "shipped", "not_shipped", "note", "what"):
        assert rec[key] == shipped[key], key
    assert json.loads((out / "PROVENANCE.json").read_text()) == rec
    assert (out / "LICENSE").read_bytes() == (pub.shipped_dir() / "LICENSE").read_bytes()
    # files not carrying the published digests are refused by the generator
    with pytest.raises(SystemExit, match="the published file has"):
        ship.generate(src, tmp_path / "out2", shipped["conversion"]["date"])
    # the authors' files, where at hand: the check the script itself runs (byte-identical with the same torch)
    if all(original(pub.PUBLISHED[n].file) for n in pub.SHIPPED) and original("LICENSE"):
        capsys.readouterr()
        assert ship.main(["--check", "--source", str(SHARED)]) == 0
        assert capsys.readouterr().out.count("identical") == 2


# ----------------------------------------------------------------------------- resolution
def test_resolution_nothing_cached_uses_the_shipped_copy_offline(empty_cache) -> None:
    for name in pub.SHIPPED:
        assert pub.resolve_published(name, download=False) == pub.shipped_model(name)
        assert pub.resolve_published(name, download=True) == pub.shipped_model(name)  # no download needed
        with pytest.raises(LiflowError, match="downloads are off"):
            pub.resolve_published(name, download=False, shipped=False)
    # the single-material models do not ship: offline with no cache, one message
    with pytest.raises(LiflowError) as exc:
        pub.resolve_published("P_LGPS", download=False)
    assert "downloads are off" in str(exc.value) and "shipped" not in str(exc.value)


def test_resolution_order_explicit_then_cache_then_shipped(tmp_path, empty_cache) -> None:
    src = shipped_as_lightning("P_universal", tmp_path / "P_universal.ckpt")  # the authors' format
    explicit = tmp_path / "mine.ckpt"
    shutil.copyfile(src, explicit)
    cached = empty_cache / "P_universal.ckpt"
    with published_as({"P_universal": src}):
        # 3. no explicit, nothing cached: the shipped copy
        assert pub.resolve_published("P_universal", download=False) == pub.shipped_model("P_universal")
        # 2. a cached file with the published SHA-256 comes before the shipped copy ...
        shutil.copyfile(src, cached)
        assert pub.resolve_published("P_universal", download=False) == cached
        # 1. ... and an explicit path before both
        assert pub.resolve_published("P_universal", explicit=explicit, download=False) == explicit
        # what resolves imports: the cached Lightning file gives the shipped weights
        pub.import_checkpoint(pub.resolve_published("P_universal", download=False), tmp_path / "p.pt")
        a = torch.load(tmp_path / "p.pt", weights_only=True)["model"]
        b = torch.load(pub.shipped_model("P_universal"), weights_only=True)["model"]
        assert all(torch.equal(a[k], b[k]) for k in b)
        # a cached file with the wrong bytes is passed over for the shipped copy
        cached.write_bytes(b"tampered")
        assert pub.resolve_published("P_universal", download=False) == pub.shipped_model("P_universal")
    # against the real published digest, the test file in the cache is not the published one either
    shutil.copyfile(src, cached)
    assert pub.resolve_published("P_universal", download=False) == pub.shipped_model("P_universal")


def test_missing_or_altered_shipped_copy_is_not_used(tmp_path, monkeypatch, empty_cache) -> None:
    alt = tmp_path / "models"
    shutil.copytree(pub.shipped_dir(), alt)
    monkeypatch.setattr(pub, "shipped_dir", lambda: alt)
    assert pub.shipped_model("C_universal") == alt / "C_universal.pt"
    raw = bytearray((alt / "C_universal.pt").read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    (alt / "C_universal.pt").write_bytes(bytes(raw))
    assert pub.shipped_model("C_universal") is None
    (alt / "P_universal.pt").unlink()
    assert pub.shipped_model("P_universal") is None
    with pytest.raises(LiflowError) as exc:
        pub.resolve_published("P_universal", download=False)
    msg = str(exc.value)
    assert "\n" not in msg and "downloads are off" in msg and "reinstall" in msg


# ----------------------------------------------------------------------------- the import step
def test_import_model_copies_the_shipped_copy(tmp_path, empty_cache) -> None:
    """What the workflow's import_model rule runs, on a fresh offline machine: a byte copy."""
    from liflow_screen import cli

    cfg = tmp_path / "config.yaml"
    cfg.write_text(yaml.safe_dump({"train": {"variants": []}, "pretrained": {
        "propagator": "P_universal", "corrector": "C_universal", "download": False}}))
    for kind, name in (("propagator", "P_universal"), ("corrector", "C_universal")):
        out = tmp_path / "models" / f"{kind}.pt"
        assert cli.main(["import-model", "--config", str(cfg), "--kind", kind, "--out", str(out)]) == 0
        assert sha256_of(out) == _record()["models"][name]["sha256"]
        assert load_flow(out).liflow_meta["kind"] == kind
    # a shipped copy given where the other kind is expected is refused, and nothing is left behind
    out = tmp_path / "wrong.pt"
    cfg.write_text(yaml.safe_dump({"train": {"variants": []}, "pretrained": {
        "propagator": "P_universal", "corrector": "C_universal", "download": False,
        "corrector_path": str(pub.shipped_model("P_universal"))}}))
    assert cli.main(["import-model", "--config", str(cfg), "--kind", "corrector", "--out", str(out)]) == 2
    assert not out.exists()


def test_import_of_an_imported_checkpoint(tmp_path) -> None:
    ship = pub.shipped_model("P_universal")
    meta = pub.import_checkpoint(ship, tmp_path / "copy.pt")
    assert meta["kind"] == "propagator" and meta["delta_tau_ps"] == 1.0
    assert (tmp_path / "copy.pt").read_bytes() == ship.read_bytes()
    with pytest.raises(InputError, match="Δτ"):
        pub.import_checkpoint(ship, tmp_path / "dt.pt", delta_tau_ps=0.5)
    # with the user's element table: a copy with that table (Br gets row 31), weights unchanged
    table = np.full(96, -1, dtype=np.int64)
    table[list(pub.PINNED_ELEMENTS)] = np.arange(len(pub.PINNED_ELEMENTS))
    table[35] = 31
    np.save(tmp_path / "element_index.npy", table)
    meta = pub.import_checkpoint(ship, tmp_path / "br.pt", element_index=tmp_path / "element_index.npy")
    assert 35 in meta["imported_from"]["elements_covered"]
    model = load_flow(tmp_path / "br.pt")
    assert model.unsupported_elements([3, 35]) == [] and int(model.element_rows[35]) == 31
    a = torch.load(ship, weights_only=True)["model"]
    b = torch.load(tmp_path / "br.pt", weights_only=True)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a if k != "element_rows")
    # a flow-model checkpoint that is not an import is not taken for one
    torch.save({"format": CKPT_FORMAT, "kind": "propagator", "variant": "adaptive", "model": {}}, tmp_path / "own.pt")
    with pytest.raises(InputError, match="not an imported published model"):
        pub.import_checkpoint(tmp_path / "own.pt", tmp_path / "x.pt")
    assert not (tmp_path / "x.pt").exists()
