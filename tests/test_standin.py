"""The demo's synthetic stand-in SAM: official-format files, the two stages, reproducible, cached, always labelled."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from flaresam.models import standin

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TINY = dataclasses.replace(standin.DEFAULT_RECIPE, cases=2, size=32, slices=8, sam_steps=3, hq_steps=2, batch=2)


@pytest.fixture
def tiny_recipe(monkeypatch):
    monkeypatch.setattr(standin, "DEFAULT_RECIPE", TINY)
    return TINY


def test_standin_files_are_official_format_and_two_stage(tiny_recipe, run_cli):
    from flaresam.models.sam.archs import HQ_MODULES
    from flaresam.models.sam.checkpoint import detect_arch, is_hq_key, read_state_dict
    from flaresam.models.sam.network import build_network

    files = standin.standin_checkpoints(quiet=True)
    sam, hq = read_state_dict(files["sam"]), read_state_dict(files["hqsam"])
    assert detect_arch(sam) == detect_arch(hq) == standin.STANDIN_ARCH
    assert not any(is_hq_key(k) for k in sam)
    hq_keys = [k for k in hq if is_hq_key(k)]
    assert {k.split(".")[1] for k in hq_keys} == set(HQ_MODULES)
    # stage 2 trains HQ-SAM's parts only: every SAM tensor is the same in both files
    assert set(hq) - set(hq_keys) == set(sam)
    assert all(torch.equal(sam[k], hq[k]) for k in sam)
    # and both stages changed what they train (against the seeded random initialisation)
    fresh = build_network("hqsam", standin.STANDIN_ARCH, seed=TINY.seed).state_dict()
    assert not torch.equal(fresh["mask_decoder.hf_mlp.layers.0.weight"], hq["mask_decoder.hf_mlp.layers.0.weight"])
    assert not torch.equal(fresh["image_encoder.patch_embed.proj.weight"], sam["image_encoder.patch_embed.proj.weight"])
    # the prompt encoder's Fourier features carry the recipe's finer scales
    pe = sam["prompt_encoder.pe_layer.positional_encoding_gaussian_matrix"]
    groups = torch.tensor_split(pe, len(TINY.pe_scales), dim=1)
    assert groups[-1].std() > 2 * groups[0].std()

    # loaded through the same --checkpoint path as real weights, and said to be the stand-in
    from flaresam.models.registry import build_step

    step = build_step("hqsam", checkpoint=str(files["hqsam"]))
    assert step.arch == standin.STANDIN_ARCH and step.config()["checkpoint_sha256"]
    record = json.loads((files["sam"].parent / standin.RECORD).read_text(encoding="utf-8"))
    assert "NOT SAM's real weights" in record["what"] and record["recipe"]["sam_steps"] == TINY.sam_steps

    # the command: cached files, their SHA-256, and the label
    r = run_cli("weights", "standin", "--json", "-q")
    assert r.code == 0, r
    out = json.loads(r.out)
    assert out["files"] == {m: str(p) for m, p in files.items()}
    assert out["sha256"] == record["sha256"]
    r = run_cli("weights", "standin", "-q")
    assert r.code == 0 and "synthetic stand-in" in r.err and record["sha256"]["sam"] in r.out


def test_standin_is_reproducible_and_cached(tiny_recipe, tmp_path):
    a = standin.standin_checkpoints(quiet=True)
    stamp = {m: p.stat().st_mtime_ns for m, p in a.items()}
    assert standin.standin_checkpoints(quiet=True) == a
    assert {m: p.stat().st_mtime_ns for m, p in a.items()} == stamp  # cached: not rebuilt
    record = standin.build_standin(tmp_path / "again", TINY, quiet=True)
    first = json.loads((a["sam"].parent / standin.RECORD).read_text(encoding="utf-8"))
    assert record["sha256"] == first["sha256"]  # the same recipe gives the same bytes
    other = standin.build_standin(tmp_path / "other", dataclasses.replace(TINY, seed=1), quiet=True)
    assert other["sha256"]["sam"] != first["sha256"]["sam"]


def test_standin_never_sees_the_demo_cases():
    """Its phantoms come from another seed root than demo-data's cases (flaresam.data.phantom._case_seed)."""
    import numpy as np

    from flaresam.data.phantom import _case_seed

    demo = {_case_seed(seed, i) for seed in range(3) for i in range(50)}
    ours = {int(np.random.SeedSequence([standin.PHANTOM_ROOT, s, i]).generate_state(1)[0]) for s in range(3) for i in range(100)}
    assert not demo & ours


def test_predict_says_when_a_model_is_no_segmenter():
    from flaresam.predict.model import provenance_note

    assert provenance_note({"model": {"arch": "vit_b", "init": "checkpoint"}, "synthetic_data": False}) is None
    note = provenance_note({"model": {"arch": "demo", "init": "checkpoint"}, "synthetic_data": True})
    assert "synthetic phantoms" in note and "stand-in" in note and "\n" not in note
    assert "randomly initialised" in provenance_note({"model": {"arch": "vit_b", "init": "random"}})
    random_demo = provenance_note({"model": {"arch": "demo", "init": "random"}})  # the demo's size, not the stand-in
    assert "randomly initialised" in random_demo and "stand-in" not in random_demo
