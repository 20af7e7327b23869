"""DualAnoDiff training (trainable-only checkpoints, resume, CLI) and resumable generation."""

import json
import shutil

import cv2
import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import edgeinspect.training.dualanodiff as dual_training
from edgeinspect.cli import main
from edgeinspect.config import build_config, dump_config
from edgeinspect.core.ddim import DDIM
from edgeinspect.data.batches import TrainingBatches
from edgeinspect.generation.dualanodiff import generate_dualanodiff
from edgeinspect.models.diad import LatentDiffusionModel
from edgeinspect.models.dualanodiff import is_trainable_key
from edgeinspect.generation.writer import GenerationError, GenerationWriter, item_seed
from edgeinspect.core.runs import CheckpointError, TrainState, latest_checkpoint, load_state
from edgeinspect.training.checkpoint import save_checkpoint
from edgeinspect.core.atomic import write_json_atomic
from edgeinspect.training.dualanodiff import fewshot_names, load_dualanodiff, train_dualanodiff
from tests.conftest import check_resume_bit_for_bit

BASE_SCALING = 0.7


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    from tests.conftest import make_mvtec

    return make_mvtec(tmp_path_factory.mktemp("dual") / "cat", n_train=4, n_good=1, n_defect=3)


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A tiny DiAD-layout run with a `unet-final` checkpoint (random weights are enough here)."""
    cfg = build_config("diad", "tiny")
    torch.manual_seed(0)
    run = tmp_path_factory.mktemp("base") / "run"
    save_checkpoint(run, "unet-final", LatentDiffusionModel(cfg), TrainState("unet", 0, 0.0,
                                                                              {"scaling_factor": BASE_SCALING}))
    write_json_atomic(run / "config.json", dump_config(cfg))
    return run


def _cfg(data_root, base, **train):
    t = {"data_root": str(data_root), "init_from": str(base), "defect_type": "scratch",
         "images": ["000.png", "002"], "steps": 4, "checkpoint_every": 2}
    t.update(train)
    return build_config("dualanodiff", "tiny", {"train": t})


def _weights(run):
    return load_file(str(latest_checkpoint(run) / "model.safetensors"))


def test_checkpoints_hold_only_trained_weights_and_load_onto_the_base(tmp_path, data_root, base):
    ckpt = train_dualanodiff(_cfg(data_root, base), tmp_path / "run", progress=False)
    assert ckpt.name == "done"
    saved = _weights(tmp_path / "run")
    assert saved and all(is_trainable_key(k) for k in saved)
    assert any(".lora_A.part." in k for k in saved) and any(k.startswith("bcm.") for k in saved)
    extra = load_state(ckpt).extra
    assert extra["scaling_factor"] == pytest.approx(BASE_SCALING)
    assert extra["base_checkpoint"] == str((base / "checkpoints" / "unet-final").resolve())
    assert extra["fewshot_images"] == ["000.png", "002.png"] and extra["defect_type"] == "scratch"
    assert extra["backgrounds"] == ["inpainted"]
    cfg, model, _ = load_dualanodiff(tmp_path / "run")
    assert model.scaling_factor == pytest.approx(BASE_SCALING)
    state = model.state_dict()
    assert all(torch.equal(state[k], v) for k, v in saved.items())
    base_w = load_file(str(base / "checkpoints" / "unet-final" / "model.safetensors"))
    key = next(k for k in state if k.endswith("attn1.to_q.base_layer.weight"))
    assert torch.equal(state[key], base_w[key.replace(".base_layer", "")])  # the frozen base, untouched
    log = [json.loads(ln) for ln in (tmp_path / "run" / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2, 3, 4] and all(np.isfinite(r["loss"]) for r in log)
    with pytest.raises(ValueError, match="cannot override"):
        load_dualanodiff(tmp_path / "run", {"lora": {"rank": 8}})
    moved = tmp_path / "moved" / "checkpoints" / "done"
    shutil.copytree(ckpt, moved)
    shutil.copy(tmp_path / "run" / "config.json", tmp_path / "moved" / "config.json")
    state = json.loads((moved / "state.json").read_text())
    state["extra"]["base_checkpoint"] = str(tmp_path / "gone")
    (moved / "state.json").write_text(json.dumps(state))
    with pytest.raises(CheckpointError, match="base checkpoint .* missing"):
        load_dualanodiff(moved)


def test_remove_defects_fills_the_defect_from_its_surroundings():
    img = np.full((1, 3, 32, 32), 120, np.uint8)
    img[0, :, 10:16, 12:20] = 10  # a dark defect
    mask = np.zeros((1, 32, 32), np.uint8)
    mask[0, 11:15, 13:19] = 1  # the annotation a little smaller than the defect: the dilation covers it
    out = dual_training.remove_defects(torch.from_numpy(img), torch.from_numpy(mask), dilation=2).numpy()
    assert out.shape == img.shape and out.dtype == np.uint8
    assert np.abs(out.astype(int) - 120).max() <= 2  # the defect is gone, nothing else moved
    assert np.array_equal(dual_training.remove_defects(torch.from_numpy(img), torch.from_numpy(mask), 0)[0, :, :5],
                          img[0, :, :5])


@pytest.mark.parametrize("background", ["inpainted", "normals"])
def test_bcm_background_of_a_training_pair(tmp_path, data_root, base, monkeypatch, background):
    """"inpainted": each pair's background is its own image with the defect removed, flipped with it;
    "normals": normals drawn independently of the pair."""
    calls = []

    def tagged(vae, images, flips, scaling_factor, batch=16):  # latent value = call * 1000 + flip * 100 + image
        k = len(calls)
        calls.append(images)
        n, size = len(images), build_config("dualanodiff", "tiny").model.latent_size
        ids = torch.arange(4)[:, None] * 100 + torch.arange(n)[None] + k * 1000
        return ids[:, :, None, None, None].float().expand(4, n, 4, size, size).clone()

    class NoNoise(DDIM):  # alphas_cumprod = 1: the noised latent is the clean one
        def __init__(self, cfg):
            super().__init__(cfg)
            self.alphas_cumprod = torch.ones(cfg.num_train_timesteps, dtype=torch.float64)

    seen = []
    real = dual_training.DualAnoDiffModel.dual_forward

    def spy(self, zw, zp, t, cw, cp, bg=None):
        seen.append((zw[:, 0, 0, 0].clone(), bg[:, 0, 0, 0].clone()))
        return real(self, zw, zp, t, cw, cp, bg)

    monkeypatch.setattr(dual_training, "encode_variants", tagged)
    monkeypatch.setattr(dual_training, "DDIM", NoNoise)
    monkeypatch.setattr(dual_training.DualAnoDiffModel, "dual_forward", spy)
    train_dualanodiff(_cfg(data_root, base, steps=6, background=background), tmp_path / "run", progress=False)
    whole = torch.cat([w for w, _ in seen])
    bg = torch.cat([b for _, b in seen])
    if background == "inpainted":
        assert calls[2].shape == calls[0].shape  # one background per few-shot image
        assert torch.equal(bg - 2000, whole)  # the pair's own image, same flip
    else:
        assert len(calls[2]) == 4 and not torch.equal(bg - 2000, whole)


def test_interrupted_training_resumes_bit_for_bit(tmp_path, data_root, base, monkeypatch):
    cfg = _cfg(data_root, base, steps=5)
    check_resume_bit_for_bit(train_dualanodiff, cfg, tmp_path, TrainingBatches, monkeypatch, "dual")


def test_fewshot_sources_and_errors(tmp_path, data_root, base):
    split = tmp_path / "split.json"
    split.write_text(json.dumps({"fewshot": {"scratch": ["001.png"]}, "adabldm_seeds": {}, "evaluation": {}}))
    cfg = _cfg(data_root, base, images=None, split_file=str(split))
    assert fewshot_names(cfg) == ["001.png"]
    with pytest.raises(ValueError, match="not both"):
        _cfg(data_root, base, split_file=str(split))
    with pytest.raises(Exception, match="no image"):
        train_dualanodiff(_cfg(data_root, base, images=["404.png"]), tmp_path / "r1", progress=False)
    with pytest.raises(ValueError, match="init_from"):
        train_dualanodiff(_cfg(data_root, base, init_from=None), tmp_path / "r2", progress=False)
    other = _cfg(data_root, base).model_dump(mode="json")
    other["model"]["unet"]["layers_per_block"] = 2
    other.pop("method")
    with pytest.raises(CheckpointError, match="different model config"):
        train_dualanodiff(build_config("dualanodiff", "tiny", other), tmp_path / "r3", progress=False)


def _read(folder, i):
    return (cv2.imread(str(folder / "images" / f"{i:06d}.png")), cv2.imread(str(folder / "masks" / f"{i:06d}.png")))


def test_cli_train_then_generation_resumes_without_duplicates_or_gaps(tmp_path, data_root, base, monkeypatch):
    run = tmp_path / "run"
    assert main(["train", "dualanodiff", "--preset", "tiny", "--data", str(data_root), "--run", str(run), "--quiet",
                 "--set", f"train.init_from={base}", "--set", "train.defect_type=scratch",
                 "--set", "train.images=[000.png, 001.png]", "--set", "train.steps=2"]) == 0
    assert load_state(latest_checkpoint(run)).stage == "done"

    full = generate_dualanodiff(run, tmp_path / "full", 5, progress=False)
    index = json.loads((full / "index.json").read_text())
    assert sorted(index["items"], key=int) == ["0", "1", "2", "3", "4"]
    item = index["items"]["3"]
    assert item["seed"] == item_seed(0, "scratch", 3) and item["defect_type"] == "scratch" and item["background"].endswith(".png")
    assert index["settings"]["sampling"]["guidance_scale"] == 2.5

    real = GenerationWriter.write

    def killed_at_item_3(self, i, *args, **kwargs):
        if i == 3:
            raise KeyboardInterrupt
        return real(self, i, *args, **kwargs)

    monkeypatch.setattr(GenerationWriter, "write", killed_at_item_3)
    with pytest.raises(KeyboardInterrupt):
        generate_dualanodiff(run, tmp_path / "cut", 5, progress=False)
    monkeypatch.setattr(GenerationWriter, "write", real)
    assert sorted(json.loads((tmp_path / "cut" / "index.json").read_text())["items"], key=int) == ["0", "1", "2"]
    generate_dualanodiff(run, tmp_path / "cut", 5, progress=False)
    resumed = json.loads((tmp_path / "cut" / "index.json").read_text())
    assert _untimed(resumed["items"]) == _untimed(index["items"])
    assert len(list((tmp_path / "cut" / "images").glob("*.png"))) == 5
    for i in range(5):
        a, b = _read(full, i), _read(tmp_path / "cut", i)
        assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])
    with pytest.raises(GenerationError, match="different settings"):
        generate_dualanodiff(run, tmp_path / "cut", 5, overrides={"sampling": {"guidance_scale": 3.0}},
                             progress=False)


def _untimed(items: dict) -> dict:
    """Index items without their wall-clock fields (which differ between runs)."""
    return {k: {f: v for f, v in it.items() if f != "sampling_s"} for k, it in items.items()}


def test_defect_weighted_loss_gets_each_pairs_own_flipped_mask(tmp_path, data_root, base, monkeypatch):
    """With train.defect_loss_weight the loss sees, per pair, that image's mask flipped with it (for both
    branches), at the weight configured; 0 keeps the paper's plain MSE (checked in test_training)."""
    size = build_config("dualanodiff", "tiny").model.latent_size

    def tagged(vae, images, flips, scaling_factor, batch=16):  # latent value = flip * 100 + image
        ids = torch.arange(4)[:, None] * 100 + torch.arange(len(images))[None]
        return ids[:, :, None, None, None].float().expand(4, len(images), 4, size, size).clone()

    class NoNoise(DDIM):
        def __init__(self, cfg):
            super().__init__(cfg)
            self.alphas_cumprod = torch.ones(cfg.num_train_timesteps, dtype=torch.float64)

    seen, real = [], dual_training.defect_weighted_mse

    def spy(pred, target, mask, weight):
        seen.append((mask.clone(), weight))
        return real(pred, target, mask, weight)

    zs = []
    real_forward = dual_training.DualAnoDiffModel.dual_forward

    def forward_spy(self, zw, zp, t, cw, cp, bg=None):
        zs.append(zw[:, 0, 0, 0].clone())
        return real_forward(self, zw, zp, t, cw, cp, bg)

    monkeypatch.setattr(dual_training, "encode_variants", tagged)
    monkeypatch.setattr(dual_training, "DDIM", NoNoise)
    monkeypatch.setattr(dual_training, "defect_weighted_mse", spy)
    monkeypatch.setattr(dual_training.DualAnoDiffModel, "dual_forward", forward_spy)
    cfg = _cfg(data_root, base, steps=4, defect_loss_weight=5.0)
    train_dualanodiff(cfg, tmp_path / "run", progress=False)
    _, masks, _ = dual_training.load_fewshot(data_root, "scratch", ["000.png", "002"], cfg.model.image_size)
    assert masks.any() and len({int(f) for z in zs for f in z // 100}) > 1  # several flips drawn
    assert len(seen) == 2 * len(zs) == 8 and {w for _, w in seen} == {5.0}
    for k, z in enumerate(zs):
        flip, image = (z // 100).long(), (z % 100).long()
        want = TrainingBatches.apply_flip(masks[image][:, None].float(), flip)
        assert torch.equal(seen[2 * k][0], want) and torch.equal(seen[2 * k + 1][0], want)


def test_dual_step_benchmark_times_and_counts_the_steps_calls(tmp_path, data_root, base):
    """benchmarks/dual_step.py on a tiny run: its files, and a dispatch count that does not grow with
    the batch (the branch adapters run batched, not per row block)."""
    from benchmarks.dual_step import main as bench

    run = tmp_path / "run"
    assert main(["train", "dualanodiff", "--preset", "tiny", "--data", str(data_root), "--run", str(run), "--quiet",
                 "--set", f"train.init_from={base}", "--set", "train.defect_type=scratch",
                 "--set", "train.images=[000.png]", "--set", "train.steps=1"]) == 0
    assert bench(["--model", str(run), "--batch", "1,3", "--warmup", "1", "--repeats", "3", "--threads", "1",
                  "--set", "sampling.keep_background=true", "--results", str(tmp_path), "--machine", "test"]) == 0
    res = json.loads((tmp_path / "dual_step_test.json").read_text())
    md = (tmp_path / "dual_step_test.md").read_text()
    one, three = res["by_batch"]["1"], res["by_batch"]["3"]
    assert one["rows_per_unet_call"] == 2 * 3 and three["rows_per_unet_call"] == 3 * 2 * 3  # CFG x (whole, part, bg)
    for e in (one, three):
        assert e["unet_ms"]["p90"] >= e["unet_ms"]["p50"] >= e["unet_ms"]["p10"] > 0
        assert e["step_ms_p50"] == pytest.approx(e["unet_ms"]["p50"] + e["decoder_ms"]["p50"])
        assert e["aten_ops_per_step"] == e["aten_ops_unet"] + e["aten_ops_decoder"] and e["aten_ops_decoder"] > 0
    assert one["aten_ops_unet"] == three["aten_ops_unet"] > 100
    assert "| 3 | 18 |" in md and res["settings"]["keep_background"] is True and "dual_step_test.json" in md
