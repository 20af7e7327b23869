"""scoring.reference: reconstruction (the papers'), bank and hybrid for DiAD and GLAD; the normal-feature bank
(greedy k-centre coreset, hashed in the bundle) and its search as the `bank_distance` network on every backend."""

from __future__ import annotations

import json
import shutil
import warnings

import numpy as np
import pytest
import torch

from edgeinspect.calibration.bank import bank_bytes, fit_bank, greedy_coreset, training_normals
from edgeinspect.cli import main
from edgeinspect.config import ConfigError, build_config
from edgeinspect.models.features import BankDistance
from edgeinspect.runtime.bank import BANK_PAYLOAD, BankError, NormalBank, hybrid_maps
from edgeinspect.runtime.bundle_loading import BundleError, load_bundle
from edgeinspect.runtime.bundle_update import set_payload
from edgeinspect.runtime.detector import bundle_pipeline
from edgeinspect.runtime.run_detector import model_pipeline
from edgeinspect.runtime.glad import min_cosine_distance_map
from edgeinspect.runtime.torch_backend import load_diad, load_glad

try:
    from tests.test_export import make_tiny_run, tiny_bundle, tiny_features
    from tests.test_export_glad import glad_features, sample_frames, tiny_glad_bundle
except ImportError:  # run from inside tests/
    from test_export import make_tiny_run, tiny_bundle, tiny_features
    from test_export_glad import glad_features, sample_frames, tiny_glad_bundle


@pytest.fixture(scope="module")
def sample():
    from tests.conftest import SAMPLE as root

    return root


# --------------------------------------------------------------------------- config and pieces


def test_reference_setting_reads_the_old_name_and_refuses_unknown_ones():
    assert build_config("diad", "tiny").scoring.reference == "reconstruction"
    assert build_config("glad", "edge").scoring.reference == "bank"  # the edge presets ship the bank
    assert build_config("diad", "edge").scoring.reference == "bank"
    assert build_config("diad", "tiny", {"scoring": {"reference": "input"}}).scoring.reference == "reconstruction"
    assert build_config("glad", "tiny", {"scoring": {"reference": "vae_roundtrip"}}).scoring.reference == "vae_roundtrip"
    with pytest.raises(ConfigError, match="reference"):
        build_config("glad", "tiny", {"scoring": {"reference": "nearest"}})
    assert build_config("diad", "edge").scoring.bank.size == 16384


def test_greedy_coreset_covers_every_cluster_and_is_seeded():
    g = torch.Generator().manual_seed(0)
    centres = torch.eye(6) * 10
    points = torch.cat([c + 0.01 * torch.randn(50, 6, generator=g) for c in centres])  # 6 tight clusters
    picked = greedy_coreset(points, 6, 0, seed=3)
    assert sorted((picked // 50).tolist()) == list(range(6))  # one pick per cluster: the k-centre property
    assert torch.equal(picked, greedy_coreset(points, 6, 0, seed=3))
    projected = greedy_coreset(points, 6, 3, seed=3)  # on a 3-d random projection the clusters stay apart
    assert sorted((projected // 50).tolist()) == list(range(6))
    with pytest.raises(BankError, match="scoring.bank.size"):
        greedy_coreset(points, 301, 0, seed=0)


def test_bank_distance_is_the_min_cosine_distance_to_the_bank():
    g = torch.Generator().manual_seed(1)
    feats = [torch.randn(2, 8, 5, 4, generator=g), torch.randn(2, 16, 3, 3, generator=g)]
    banks = [torch.nn.functional.normalize(torch.randn(n, c, generator=g), dim=1) for n, c in ((30, 8), (7, 16))]
    out = BankDistance(2)(*feats, *banks)
    for f, bank, d in zip(feats, banks, out, strict=True):
        assert d.shape == (f.shape[0], *f.shape[-2:])
        ref = min_cosine_distance_map(f, bank.T.reshape(1, bank.shape[1], 1, -1).expand(f.shape[0], -1, -1, -1))
        torch.testing.assert_close(d, ref, atol=1e-5, rtol=1e-5)
    # a feature equal (up to scale) to a bank vector is at distance 0
    f = (banks[0][4] * 3).view(1, 8, 1, 1)
    assert float(BankDistance(1)(f, banks[0])[0]) == pytest.approx(0.0, abs=1e-6)


def test_hybrid_map_is_the_sum_of_the_scaled_maps():
    rec, bank = torch.full((1, 2, 2), 0.5), torch.full((1, 2, 2), 0.02)
    torch.testing.assert_close(hybrid_maps(rec, bank, (0.25, 0.01)), torch.full((1, 2, 2), 4.0))


# --------------------------------------------------------------------------- DiAD: torch and onnxruntime


@pytest.fixture(scope="module")
def diad(sample):
    """(torch pipeline, its bank, a copy of the tiny DiAD bundle with that bank stored, frames)."""
    run, bundle = tiny_bundle()
    cfg, model = load_diad(run)
    pipe = model_pipeline(cfg, model, tiny_features())
    bank = fit_bank(pipe, training_normals(sample), cfg.model.image_size, 4)
    copy = bundle.parent / "bundle-with-bank"
    shutil.rmtree(copy, ignore_errors=True)
    shutil.copytree(bundle, copy)
    set_payload(copy, BANK_PAYLOAD, bank_bytes(bank))
    return pipe, bank, copy, sample_frames()


def test_the_bank_is_a_coreset_of_unit_training_vectors_with_scales_from_held_out_normals(diad, sample):
    pipe, bank, _, _ = diad
    cfg = pipe.scoring.bank
    assert [tuple(v.shape) for v in bank.vectors] == [(cfg.size, 24), (cfg.size, 40), (cfg.size, 112)]
    for v in bank.vectors:
        torch.testing.assert_close(v.norm(dim=1), torch.ones(cfg.size), atol=1e-5, rtol=0)
        assert len(torch.unique(v, dim=0)) == cfg.size  # k-centre never picks a vector twice
    assert bank.info["held_out_images"] == cfg.scale_images
    assert bank.info["train_images"] == len(training_normals(sample)) - cfg.scale_images
    assert bank.scales is not None and all(s > 0 for s in bank.scales)
    # seeded: built again, the same bank
    again = fit_bank(pipe, training_normals(sample), 64, 4)
    assert all(torch.equal(a, b) for a, b in zip(bank.vectors, again.vectors, strict=True))
    assert again.scales == pytest.approx(bank.scales)


@pytest.mark.parametrize("reference", ["reconstruction", "bank", "hybrid"])
def test_diad_references_agree_torch_vs_onnxruntime(diad, reference):
    pipe, bank, copy, frames = diad
    t = pipe.using(reference, bank)(frames)
    o = bundle_pipeline(copy, "onnxruntime", intra_op_threads=1, overrides={"scoring": {"reference": reference}})(frames)
    torch.testing.assert_close(o.scores, t.scores, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(o.maps, t.maps, atol=1e-4, rtol=1e-4)
    assert (t.reconstructions is None) == (reference == "bank")
    assert ("denoise" in t.timings_ms) == (reference != "bank")


def test_diad_reconstruction_reference_is_the_default_scoring_unchanged(diad):
    pipe, bank, _, frames = diad
    default, explicit = pipe(frames), pipe.using("reconstruction", bank)(frames)
    assert torch.equal(default.scores, explicit.scores) and torch.equal(default.maps, explicit.maps)


def test_diad_hybrid_is_the_scaled_sum_of_the_two_references(diad):
    from edgeinspect.runtime.scoring import pooled_max_score

    pipe, bank, _, frames = diad
    rec, only_bank, hybrid = (pipe.using(r, bank)(frames) for r in ("reconstruction", "bank", "hybrid"))
    torch.testing.assert_close(hybrid.maps, hybrid_maps(rec.maps, only_bank.maps, bank.scales), atol=1e-5, rtol=1e-5)
    s = pipe.scoring
    torch.testing.assert_close(hybrid.scores, pooled_max_score(hybrid.maps, s.pool_size, s.pool_iterations))
    assert float(only_bank.maps.min()) >= 0


def test_bank_reference_needs_only_the_extractor_and_the_bank_search(diad):
    from edgeinspect.core.networks import MissingNetworkError, Networks
    from edgeinspect.runtime.detector import assemble_pipeline

    pipe, bank, _, frames = diad
    nets = Networks({r: pipe.nets[r] for r in ("features", "bank_distance")})
    cfg = build_config("diad", "tiny", {"scoring": {"reference": "bank"}})
    alone = assemble_pipeline(cfg, nets, torch.zeros(1, 1, 1), bank=bank)
    torch.testing.assert_close(alone(frames).scores, pipe.using("bank", bank)(frames).scores)
    with pytest.raises(MissingNetworkError, match="vae_encoder"):
        alone.using("hybrid")
    with pytest.raises(BankError, match="edgeinspect bank"):
        assemble_pipeline(cfg, nets, torch.zeros(1, 1, 1))
    no_scales = NormalBank(bank.vectors)
    with pytest.raises(BankError, match="scale_images"):
        pipe.using("hybrid", no_scales)


def test_the_bank_in_a_bundle_is_hashed_and_required(diad, tmp_path):
    _, _, copy, _ = diad
    b = load_bundle(copy)
    assert b.manifest["payload"] == {"bank": "bank.safetensors"} and "bank.safetensors" in b.manifest["files"]
    assert b.network("bank_distance").input_names[-1] == "bank_2"
    tampered = tmp_path / "tampered"
    shutil.copytree(copy, tampered)
    data = bytearray((tampered / "bank.safetensors").read_bytes())
    data[-1] ^= 1
    (tampered / "bank.safetensors").write_bytes(bytes(data))
    with pytest.raises(BundleError, match="bank.safetensors does not match its sha256"):
        load_bundle(tampered)
    with pytest.raises(BundleError, match="edgeinspect bank --bundle"):
        bundle_pipeline(tiny_bundle()[1], "onnxruntime", overrides={"scoring": {"reference": "bank"}})


def test_calibration_works_on_bank_scores_unchanged(diad, sample, tmp_path):
    from edgeinspect.calibration.calibrate import calibrate_bundle, load_frames, select_normals

    pipe, bank, copy, _ = diad
    bundle = tmp_path / "bundle"
    shutil.copytree(copy, bundle)
    set_payload(bundle, BANK_PAYLOAD, (copy / "bank.safetensors").read_bytes(), {"reference": "bank"})
    assert load_bundle(bundle).config.scoring.reference == "bank"
    cal = calibrate_bundle(bundle, sample, target_frr=0.5, threads=1)
    normals = select_normals(sample)
    scores = pipe.using("bank", bank)(load_frames(normals, 64)).scores.double().numpy()
    k = cal["image"]["k"]
    assert cal["image"]["threshold"] == pytest.approx(np.sort(scores)[k - 1], abs=1e-4)
    result = bundle_pipeline(bundle, "onnxruntime", intra_op_threads=1)(load_frames(normals, 64))
    assert result.verdicts == ["NG" if s > cal["image"]["threshold"] else "OK" for s in result.scores.tolist()]
    # storing another bank with another reference empties the calibration: its thresholds fit other scores
    set_payload(bundle, BANK_PAYLOAD, (copy / "bank.safetensors").read_bytes(), {"reference": "hybrid"})
    assert load_bundle(bundle).calibration is None


# --------------------------------------------------------------------------- GLAD


@pytest.mark.parametrize("reference", ["bank", "hybrid"])
def test_glad_references_agree_torch_vs_onnxruntime(sample, reference, tmp_path):
    run, bundle = tiny_glad_bundle()
    cfg, model, extra = load_glad(run)
    pipe = model_pipeline(cfg, model, glad_features(cfg), threshold=extra["adp_threshold"])
    bank = fit_bank(pipe, training_normals(sample), 64, 4)
    copy = tmp_path / "bundle"
    shutil.copytree(bundle, copy)
    set_payload(copy, BANK_PAYLOAD, bank_bytes(bank), {"reference": reference})
    frames = sample_frames()
    t = pipe.using(reference, bank)(frames)
    o = bundle_pipeline(copy, "onnxruntime", intra_op_threads=1)(frames)
    torch.testing.assert_close(o.scores, t.scores, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(o.maps, t.maps, atol=1e-4, rtol=1e-4)
    if reference == "bank":  # no diffusion: nothing fired, no reconstruction
        assert t.reconstructions is None and (t.fire_step == -1).all() and t.draw_scores.shape == (len(frames), 1)
        assert "denoise" not in t.timings_ms
    else:
        rec = pipe.using("reconstruction")(frames)
        torch.testing.assert_close(t.maps, hybrid_maps(rec.maps, pipe.using("bank", bank)(frames).maps, bank.scales),
                                   atol=1e-5, rtol=1e-5)
        assert torch.equal(t.fire_step, rec.fire_step)  # the bank changes the final scoring only, not ADP


def test_the_bank_search_splits_a_frame_into_row_strips_when_it_exceeds_its_memory_budget_but_not_on_tensorrt(diad):
    from edgeinspect.core.networks import Networks
    from edgeinspect.runtime.bank import bank_distance_maps

    pipe, bank, _, frames = diad
    feats = pipe.bank_features(frames[:2])
    calls: list[tuple[int, ...]] = []
    net = pipe.nets["bank_distance"]

    def recorder(**inputs: torch.Tensor) -> dict[str, torch.Tensor]:
        calls.append(tuple(inputs["feature_0"].shape))
        return net(**inputs)

    per_frame_mb = max(f.shape[-2] * f.shape[-1] * v.shape[0] * 4 for f, v in zip(feats, bank.vectors)) / 2**20
    whole = bank_distance_maps(Networks({"bank_distance": recorder}), feats, bank, (64, 64), 2 * per_frame_mb)
    assert [c[0] for c in calls] == [2]  # both frames in one call
    calls.clear()
    strips = bank_distance_maps(Networks({"bank_distance": recorder}), feats, bank, (64, 64), per_frame_mb / 3.5)
    h = feats[0].shape[-2]
    assert len(calls) == 2 * 4 and all(c[0] == 1 and c[2] < h for c in calls)  # per frame, 4 row strips
    for a, b in zip(whole, strips, strict=True):
        torch.testing.assert_close(a, b)
    calls.clear()
    bank_distance_maps(Networks({"bank_distance": recorder}, name="tensorrt"), feats, bank, (64, 64), per_frame_mb / 3.5)
    assert calls == [(1, *feats[0].shape[1:])] * 2  # engines are built for the whole map: one frame per call


COARSE = {"image_strides": [16], "image_blur_sigma": 2.0}  # the image score from the stride-16 level alone


@pytest.mark.parametrize("method", ["diad", "glad"])
def test_the_bank_image_score_pools_the_chosen_levels_and_the_map_keeps_every_level(sample, method, tmp_path):
    """scoring.bank.image_strides: the image score is the method's pooling of the chosen levels' bank distances
    blurred by image_blur_sigma, the pixel map stays the sum of every level; the same on onnxruntime."""
    from edgeinspect.runtime.bank import bank_distance_maps
    from edgeinspect.runtime.scoring import gaussian_blur, pooled_max_score, topk_mean_score

    if method == "diad":
        (run, bundle), load = tiny_bundle(), load_diad
    else:
        (run, bundle), load = tiny_glad_bundle(), load_glad
    cfg, model, *_ = load(run, {"scoring": {"bank": COARSE}})
    features = tiny_features() if method == "diad" else glad_features(cfg)
    pipe = model_pipeline(cfg, model, features)
    bank = fit_bank(pipe, training_normals(sample), 64, 4)
    pipe = pipe.using("bank", bank)
    frames = sample_frames()
    coarse = pipe(frames)
    every = model_pipeline(load(run)[0], model, features).using("bank", bank)(frames)
    torch.testing.assert_close(coarse.maps, every.maps)  # the pixel map: every level, as before
    assert pipe.image_levels == (2,) and every.scores.shape == coarse.scores.shape
    levels = bank_distance_maps(pipe.nets, pipe.bank_features(frames), bank, (64, 64), 64.0)
    image_map = gaussian_blur(levels[2], 2.0)
    expected = (pooled_max_score(image_map, cfg.scoring.pool_size, cfg.scoring.pool_iterations) if method == "diad"
                else topk_mean_score(image_map, cfg.inference.top_k))
    torch.testing.assert_close(coarse.scores, expected.float().cpu())
    assert not torch.allclose(coarse.scores, every.scores)  # the chosen level is not the sum's pooling
    copy = tmp_path / "bundle"
    shutil.copytree(bundle, copy)
    set_payload(copy, BANK_PAYLOAD, bank_bytes(bank), {"reference": "bank"})
    o = bundle_pipeline(copy, "onnxruntime", intra_op_threads=1, overrides={"scoring": {"bank": COARSE}})(frames)
    torch.testing.assert_close(o.scores, coarse.scores, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(o.maps, coarse.maps, atol=1e-4, rtol=1e-4)


def test_bank_image_strides_must_be_extracted_levels():
    edge = build_config("diad", "edge").scoring.bank
    assert (edge.image_strides, edge.image_blur_sigma) == ([16], 8.0)
    assert build_config("glad", "edge").scoring.bank.image_strides == [16]
    with pytest.raises(ConfigError, match=r"\[32\] not among features.strides"):
        build_config("diad", "tiny", {"scoring": {"bank": {"image_strides": [16, 32]}}})
    with pytest.raises(ConfigError, match="at least one feature stride"):
        build_config("glad", "tiny", {"scoring": {"bank": {"image_strides": []}}})


# --------------------------------------------------------------------------- the command line


def test_bank_verb_on_a_run_and_on_a_bundle_scores_alike(sample, tmp_path, capsys):
    """`edgeinspect bank --model RUN`, export with --reference bank, then `test` on the run (torch) and on the
    bundle (onnxruntime) give the same scores (the tiny extractor has random weights: seeded alike on every
    side, it is the same extractor)."""
    run = make_tiny_run(tmp_path / "run")
    torch.manual_seed(0)
    assert main(["bank", "--model", str(run), "--data", str(sample), "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "bank.safetensors" in out and "32x24, 32x40, 32x112" in out and "hybrid scales" in out
    bundle = tmp_path / "bundle"
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*RANDOM weights.*")
        assert main(["export", "--model", str(run), "--out", str(bundle), "--reference", "bank", "--quiet",
                     "--threads", "1"]) == 0
    assert load_bundle(bundle).config.scoring.reference == "bank"
    results = {}
    for name, source in (("run", ["--model", str(run), "--set", "scoring.reference=bank"]),
                         ("bundle", ["--bundle", str(bundle)])):
        torch.manual_seed(0)
        dest = tmp_path / f"{name}.json"
        assert main(["test", *source, "--data", str(sample), "--out", str(dest), "--quiet", "--threads", "1"]) == 0
        results[name] = json.loads(dest.read_text())
    diff = max(abs(a["score"] - b["score"]) for a, b in zip(results["run"]["per_image"], results["bundle"]["per_image"]))
    assert diff <= 1e-4, diff
    imgs = sorted((sample / "test" / "break").iterdir())[:2]
    rows = {}
    for name, source in (("run", ["--model", str(run), "--set", "scoring.reference=bank"]),
                         ("bundle", ["--bundle", str(bundle)])):
        torch.manual_seed(0)
        assert main(["predict", *source, *map(str, imgs), "--out", str(tmp_path / f"p{name}"), "--threads", "1"]) == 0
        rows[name] = json.loads((tmp_path / f"p{name}" / "scores.json").read_text())["results"]
    assert [r["score"] for r in rows["bundle"]] == pytest.approx([r["score"] for r in rows["run"]], abs=1e-4)
    # the bank verb on the bundle stores (re-hashes) its bank; without one, a bank reference is refused
    torch.manual_seed(0)
    assert main(["bank", "--bundle", str(bundle), "--data", str(sample), "--reference", "hybrid", "--quiet",
                 "--threads", "1"]) == 0
    assert "MiB" in capsys.readouterr().out and load_bundle(bundle).config.scoring.reference == "hybrid"
    export_without = tmp_path / "no-bank"
    assert main(["export", "--model", str(make_tiny_run(tmp_path / "run2")), "--out", str(export_without),
                 "--reference", "bank", "--quiet"]) == 2
    assert "edgeinspect bank --model" in capsys.readouterr().err


def test_training_ends_with_the_bank_its_reference_needs(sample, tmp_path, monkeypatch):
    """`edgeinspect train` of a detector whose scoring.reference is bank or hybrid leaves the bank in the final
    checkpoint (test/export/serve need no separate `bank` step); reconstruction leaves none; a finished run's
    bank is not rebuilt; without training data the error says what is missing."""
    from edgeinspect import cli
    from edgeinspect.calibration.bank import finish_training_bank
    from edgeinspect.core.runs import resolve_checkpoint
    from edgeinspect.runtime.bank import BANK_FILE, read_bank

    runs = {ref: make_tiny_run(tmp_path / ref, overrides={"scoring": {"reference": ref}})
            for ref in ("reconstruction", "hybrid")}
    monkeypatch.setitem(cli.TRAINERS, "diad", lambda cfg, run, **_: resolve_checkpoint(runs[str(run.name)]))
    for ref, run in runs.items():
        torch.manual_seed(0)
        assert main(["train", "diad", "--preset", "tiny", "--run", str(tmp_path / ref), "--data", str(sample),
                     "--set", f"scoring.reference={ref}", "--quiet"]) == 0
    assert not (resolve_checkpoint(runs["reconstruction"]) / BANK_FILE).exists()
    path = resolve_checkpoint(runs["hybrid"]) / BANK_FILE
    bank = read_bank(path)
    assert [v.shape[0] for v in bank.vectors] == [32, 32, 32] and bank.scales is not None
    stamp = path.stat().st_mtime_ns
    cfg = build_config("diad", "tiny", {"scoring": {"reference": "hybrid"}, "train": {"data_root": str(sample)}})
    assert finish_training_bank(cfg, resolve_checkpoint(runs["hybrid"])) is None and path.stat().st_mtime_ns == stamp
    with pytest.raises(BankError, match="train.data_root"):
        finish_training_bank(build_config("diad", "tiny", {"scoring": {"reference": "bank"}}),
                             resolve_checkpoint(runs["reconstruction"]))


# --------------------------------------------------------------------------- the bank's own view of the frame


def test_frames_are_read_at_the_banks_view_only_where_the_bank_is_searched():
    from edgeinspect.config import frame_size
    from edgeinspect.export.examples import ExportSizes

    edge = build_config("diad", "edge")  # the bank sees the frame at 256 px; the diffusion runs at 128
    assert (edge.model.image_size, edge.scoring.bank.feature_size, edge.scoring.bank.neighbourhood) == (128, 256, 3)
    assert [frame_size(128, edge.scoring, r) for r in ("bank", "hybrid", "reconstruction")] == [256, 256, 128]
    tiny = build_config("diad", "tiny")
    assert frame_size(tiny.model.image_size, tiny.scoring, "bank") == tiny.model.image_size  # no view of its own
    with pytest.raises(ConfigError, match="odd"):
        build_config("diad", "tiny", {"scoring": {"bank": {"neighbourhood": 2}}})
    # the bank reference's graphs deploy (TensorRT pins them) at the size its extractor runs at
    view = {"scoring": {"bank": {"feature_size": 128}}}
    assert ExportSizes(build_config("diad", "tiny", merge(view, "bank"))).feature == 128
    assert ExportSizes(build_config("diad", "tiny", merge(view, "reconstruction"))).feature == tiny.model.image_size


def merge(view: dict, reference: str) -> dict:
    return {"scoring": {**view["scoring"], "reference": reference}}


def test_neighbourhood_average_is_patchcores_local_mean():
    from edgeinspect.runtime.pipeline import neighbourhood_average

    f = torch.arange(20.0).view(1, 1, 4, 5)
    [g] = neighbourhood_average([f], 3)
    assert g.shape == f.shape
    assert float(g[0, 0, 1, 1]) == pytest.approx(float(f[0, 0, :3, :3].mean()))
    assert float(g[0, 0, 0, 0]) == pytest.approx(float(f[0, 0, :2, :2].mean()))  # the border: the part inside
    assert neighbourhood_average([f], 1)[0] is f


@pytest.fixture(scope="module")
def viewed(sample):
    """A tiny DiAD pipeline (64-px model image) whose bank sees frames read at 128 px, 3 x 3 averaged; its bank;
    test frames read at 128 px and the same frames at the model size (area downscale)."""
    from edgeinspect.config import frame_size

    run, _ = tiny_bundle()
    cfg, model = load_diad(run, {"scoring": {"bank": {"feature_size": 128, "neighbourhood": 3}}})
    pipe = model_pipeline(cfg, model, tiny_features())
    at = frame_size(cfg.model.image_size, cfg.scoring, "bank")
    assert at == 128 and pipe.frame_size == cfg.model.image_size  # its reference, reconstruction, has no view
    bank = fit_bank(pipe, training_normals(sample), at, 4)
    assert pipe.using("bank", bank).frame_size == 128
    big = sample_frames(128)
    return pipe, bank, big, torch.nn.functional.interpolate(big, size=(64, 64), mode="area")


def test_the_bank_searches_the_frames_own_features_and_the_diffusion_its_downscaled_copy(viewed):
    from edgeinspect.core.networks import TorchNetwork

    pipe, bank, big, small = viewed
    seen: list[torch.Tensor] = []
    net = pipe.nets["features"]
    recorder = TorchNetwork(lambda image: (seen.append(image), net.module(image))[1], net.input_names,
                            net.output_names)
    only_bank = pipe.using("bank", bank)
    only_bank.nets = type(pipe.nets)({**pipe.nets, "features": recorder})
    r = only_bank(big)
    assert r.maps.shape == (len(big), 64, 64)  # maps at the model image size
    assert len(seen) == 1 and torch.equal(seen[0], big)  # the frame itself, not the model image upscaled
    # the reconstruction reference sees the frame area-downscaled to the model image: the same as given that
    rec_big, rec_small = pipe.using("reconstruction")(big), pipe.using("reconstruction")(small)
    torch.testing.assert_close(rec_big.maps, rec_small.maps)
    torch.testing.assert_close(rec_big.scores, rec_small.scores)
    # the hybrid sums the two views' maps
    hybrid = pipe.using("hybrid", bank)(big)
    torch.testing.assert_close(hybrid.maps, hybrid_maps(rec_small.maps, pipe.using("bank", bank)(big).maps,
                                                        bank.scales), atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="smaller than the model image"):
        pipe(sample_frames(32))


def test_a_training_frame_matches_the_bank_built_from_its_averaged_features(viewed, sample):
    """The bank holds neighbourhood-averaged vectors of frames read at the bank's size: searching a training
    normal's own averaged features finds nearer vectors than its raw features do (the
    same bank searched with un-averaged features of the frame)."""
    from edgeinspect.calibration.calibrate import load_frames
    from edgeinspect.runtime.bank import bank_distance_maps

    pipe, bank, _, _ = viewed
    frames = load_frames(training_normals(sample)[:4], 128)
    averaged = sum(bank_distance_maps(pipe.nets, pipe.bank_features(frames), bank, (64, 64), 64.0))
    raw = sum(bank_distance_maps(pipe.nets, pipe.features_of(frames, 128), bank, (64, 64), 64.0))
    assert float(averaged.mean()) < 0.8 * float(raw.mean())


def test_evaluation_reads_frames_at_the_view_and_masks_at_the_model_size(sample):
    from edgeinspect.evaluation.evaluate import load_eval_split

    split = load_eval_split(sample, 64, frames=128)
    assert split.images.shape[1:] == (128, 128, 3) and split.masks.shape[1:] == (64, 64)
    assert split.masks[split.labels == 1].any(axis=(1, 2)).all()


def test_tensorrt_refuses_a_hybrid_that_runs_the_extractor_at_two_sizes(diad):
    from edgeinspect.runtime.tensorrt_engines import bundle_profiles

    _, _, copy, _ = diad
    same = load_bundle(copy, overrides={"scoring": {"reference": "hybrid"}})
    assert "features" in bundle_profiles(same, roles=("features",))
    two = load_bundle(copy, overrides={"scoring": {"reference": "hybrid", "bank": {"feature_size": 128}}})
    with pytest.raises(BundleError, match="two sizes"):
        bundle_profiles(two, roles=("features",))


def test_int8_calibration_of_a_bank_bundle_records_the_networks_its_scoring_skips(diad, sample, tmp_path):
    """A bank-reference bundle runs no diffusion, yet its UNet is still worth an int8 graph (hybrid, the papers'
    scoring): its inputs are recorded from a pipeline that runs it; the feature extractor's from the bundle's own."""
    from edgeinspect.calibration.qdq import _recorded_items
    from edgeinspect.calibration.calibrate import select_normals

    _, _, copy, _ = diad
    bundle = tmp_path / "bundle"
    shutil.copytree(copy, bundle)
    set_payload(bundle, BANK_PAYLOAD, (copy / "bank.safetensors").read_bytes(), {"reference": "bank"})
    b = load_bundle(bundle)
    cache: dict = {}
    unet = _recorded_items(b, "unet", select_normals(sample)[:2], 4, 2, 1, cache)
    assert len(unet) == 4 and {"sample", "timestep", "hint"} <= set(unet[0])
    assert "unet" not in cache["pipe"].nets and "unet" in cache["pipe.all"].nets
    feats = _recorded_items(b, "features", select_normals(sample)[:2], 2, 2, 1, cache)
    assert feats and feats[0]["image"].shape[-1] == cache["pipe"].frame_size  # the frames the bank reads
