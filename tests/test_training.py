import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from edgeinspect.config import build_config
from edgeinspect.runtime.torch_backend import load_diad
from edgeinspect.core.runs import CheckpointError, TrainState, latest_checkpoint, load_model_weights, load_state
from edgeinspect.training.checkpoint import load_optimizer, save_checkpoint
from edgeinspect.training.diad import train_diad
from edgeinspect.training.loop import Stage, Trainer, training_device


def test_checkpoint_roundtrip(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 1))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model(torch.randn(5, 3)).sum().backward()
    opt.step()
    state = TrainState("unet", 7, 12.5, {"scaling_factor": 0.3})
    path = save_checkpoint(tmp_path, "unet-0000007", model, state, opt)
    assert latest_checkpoint(tmp_path) == path
    other = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 1))
    load_model_weights(other, path)
    for a, b in zip(model.state_dict().values(), other.state_dict().values()):
        assert torch.equal(a, b)
    opt2 = torch.optim.AdamW(other.parameters(), lr=1e-2)
    assert load_optimizer(opt2, path)
    s1, s2 = opt.state_dict()["state"], opt2.state_dict()["state"]
    assert s1.keys() == s2.keys()
    for k in s1:
        for name in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(torch.as_tensor(s1[k][name]), torch.as_tensor(s2[k][name]))
    assert load_state(path) == state
    with pytest.raises(CheckpointError, match="does not match"):
        load_model_weights(nn.Linear(3, 1), path)


def test_failed_checkpoint_write_leaves_the_previous_one_and_no_partial_copy(tmp_path, monkeypatch):
    """A full disk in the middle of a write: the half-written copy is removed (its space given back),
    `latest` still names the previous checkpoint, and the error says which one that is."""
    import edgeinspect.training.checkpoint as ck

    m = nn.Linear(2, 2)
    first = save_checkpoint(tmp_path, "a-0000001", m, TrainState("a", 1))
    real_save = ck.save_file
    calls = []

    def full_disk(tensors, path):
        calls.append(path)
        if len(calls) == 2:  # the weights went through, the RNG state does not
            raise OSError(28, "No space left on device")
        real_save(tensors, path)

    monkeypatch.setattr(ck, "save_file", full_disk)
    with pytest.raises(CheckpointError, match="a-0000002.*No space left.*latest complete one is a-0000001"):
        save_checkpoint(tmp_path, "a-0000002", m, TrainState("a", 2))
    assert sorted(d.name for d in (tmp_path / "checkpoints").iterdir()) == ["a-0000001", "latest"]
    assert latest_checkpoint(tmp_path) == first and load_state(first) == TrainState("a", 1)


def test_pruning_keeps_stage_finals_and_latest(tmp_path):
    m = nn.Linear(2, 2)
    for i, name in enumerate(["a-0000001", "a-final", "b-0000001", "b-0000002", "b-0000003"]):
        save_checkpoint(tmp_path, name, m, TrainState("a", i), keep=2)
        time.sleep(0.01)
    names = sorted(d.name for d in (tmp_path / "checkpoints").iterdir() if d.is_dir())
    assert names == ["a-final", "b-0000002", "b-0000003"]


def _toy_run(run_dir, interrupt_at=None):
    torch.manual_seed(0)
    model = nn.Linear(4, 1)
    gen = torch.Generator().manual_seed(1)
    w_true = torch.arange(4.0)

    def make_loss(stage_offset):
        def loss(step):
            if interrupt_at is not None and (stage_offset, step) == interrupt_at:
                raise KeyboardInterrupt
            x = torch.randn(8, 4, generator=gen)
            noise = torch.randn(8, 1) * 0.01  # the global RNG: restored on resume as well
            return (model(x) - (x @ w_true)[:, None] - noise).pow(2).mean()
        return loss

    stages = [Stage("first", 6, 1e-1, model.parameters, make_loss(0)),
              Stage("second", 5, 1e-2, model.parameters, make_loss(1))]
    trainer = Trainer(run_dir, model, stages, checkpoint_every=2, keep=2, log_every=1, weight_decay=0.0,
                      grad_clip=0.0, progress=False, generators={"data": gen})
    trainer.resume()
    trainer.run()
    return model


@pytest.mark.parametrize("interrupt_at", [(0, 3), (1, 0), (1, 4)])
def test_interrupted_and_resumed_equals_uninterrupted(tmp_path, interrupt_at):
    ref = _toy_run(tmp_path / "ref")
    with pytest.raises(KeyboardInterrupt):
        _toy_run(tmp_path / "cut", interrupt_at=interrupt_at)
    state = load_state(latest_checkpoint(tmp_path / "cut"))
    assert (state.stage, state.step) == (("first", "second")[interrupt_at[0]], interrupt_at[1]) or (
        interrupt_at[1] == 0 and state.stage == "first")
    resumed = _toy_run(tmp_path / "cut")
    assert torch.equal(ref.weight, resumed.weight) and torch.equal(ref.bias, resumed.bias)
    log = [json.loads(ln) for ln in (tmp_path / "cut" / "train_log.jsonl").read_text().splitlines()]
    assert log[-1]["stage"] == "second" and log[-1]["step"] == 5


def test_training_device_choices(monkeypatch):
    assert training_device("cpu") == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert training_device("auto") == torch.device("cpu")
    with pytest.raises(RuntimeError, match="sees no CUDA GPU"):
        training_device("cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(RuntimeError, match="only 1 GPU"):
        training_device("cuda:1")
    with pytest.raises(ValueError, match="train.device must be"):
        build_config("diad", "tiny", {"train": {"device": "gpu"}})


def _tiny_cfg(data_root, **train):
    t = {"data_root": str(data_root), "autoencoder_steps": 2, "unet_steps": 2, "guidance_steps": 2}
    t.update(train)
    return build_config("diad", "tiny", {"train": t})


def test_diad_training_updates_the_right_parts(tmp_path, synthetic_mvtec):
    cfg = _tiny_cfg(synthetic_mvtec)
    torch.manual_seed(0)
    from edgeinspect.models.diad import DiADModel

    init = {k: v.clone() for k, v in DiADModel(cfg).state_dict().items()}
    ckpt = train_diad(cfg, tmp_path / "run", progress=False)
    assert ckpt.name == "done"
    _, model = load_diad(tmp_path / "run")
    after = model.state_dict()
    changed = {k for k in init if not torch.equal(init[k], after[k])}
    assert any(k.startswith("vae.") for k in changed)
    assert any(k.startswith("unet.up_blocks") for k in changed)
    assert any(k.startswith("guidance.sff") for k in changed)
    assert any(k.startswith("guidance.zero_convs") for k in changed)
    sf = load_state(ckpt).extra["scaling_factor"]
    assert model.scaling_factor == pytest.approx(sf) and sf != 0.18215
    with pytest.raises(CheckpointError, match="--resume"):
        train_diad(cfg, tmp_path / "run", progress=False)


def test_guidance_stage_freezes_unet_encoder(tmp_path, synthetic_mvtec):
    """With only the guidance stage, UNet encoder/middle and the autoencoder stay exactly as they were."""
    cfg = _tiny_cfg(synthetic_mvtec, autoencoder_steps=0, unet_steps=0, guidance_steps=3)
    torch.manual_seed(0)
    from edgeinspect.models.diad import DiADModel

    init = DiADModel(cfg).state_dict()
    init = {k: v.clone() for k, v in init.items()}
    train_diad(cfg, tmp_path / "run", progress=False)
    _, model = load_diad(tmp_path / "run")
    after = model.state_dict()
    frozen = [k for k in init if k.startswith(("unet.down_blocks", "unet.mid_block", "unet.time_embedding",
                                                "unet.conv_in", "vae.", "prompt_encoder."))]
    assert frozen and all(torch.equal(init[k], after[k]) for k in frozen)
    assert any(not torch.equal(init[k], after[k]) for k in init if k.startswith("unet.up_blocks"))


def test_sigterm_writes_a_checkpoint_and_resume_finishes(tmp_path, synthetic_mvtec):
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "edgeinspect.cli", "train", "diad", "--preset", "tiny", "--data",
           str(synthetic_mvtec), "--run", str(run), "--quiet", "--set", "train.autoencoder_steps=100000",
           "--set", "train.checkpoint_every=1000000"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    log = run / "train_log.jsonl"
    deadline = time.time() + 120
    while not (log.is_file() and log.read_text().count("\n") >= 3):
        assert proc.poll() is None, proc.communicate()
        assert time.time() < deadline, "training never started"
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    state = load_state(latest_checkpoint(run))
    assert state.stage == "autoencoder" and state.step >= 3
    done = subprocess.run(cmd[:-4] + ["--resume", "--set", "train.autoencoder_steps=" + str(state.step + 2),
                                      "--set", "train.checkpoint_every=1000000"],
                          capture_output=True, text=True, timeout=300, env={**os.environ})
    assert done.returncode == 0, done.stderr
    assert load_state(latest_checkpoint(run)).stage == "done"


# --------------------------------------------------------------------------- defect-weighted loss


def test_defect_weighted_mse_values_and_gradients():
    from edgeinspect.training.base import defect_weighted_mse

    torch.manual_seed(0)
    pred, target = torch.randn(2, 4, 4, 4, requires_grad=True), torch.randn(2, 4, 4, 4)
    mask = torch.zeros(2, 1, 16, 16)
    assert torch.equal(defect_weighted_mse(pred, target, mask, 0.0), F.mse_loss(pred, target))
    # no defect pixels: the plain MSE whatever the weight
    assert torch.allclose(defect_weighted_mse(pred, target, mask, 9.0), F.mse_loss(pred, target))
    # sample 0: one latent cell (4x4 image px) fully defect, sample 1: half of one cell
    mask[0, 0, :4, :4] = 1
    mask[1, 0, 4:6, 4:8] = 1
    w = 9.0
    err = (pred - target).detach() ** 2
    cell = torch.zeros(2, 1, 4, 4)
    cell[0, 0, 0, 0], cell[1, 0, 1, 1] = 1.0, 0.5
    wt = (1 + w * cell).expand(2, 4, 4, 4)
    want = torch.stack([(wt[i] * err[i]).sum() / wt[i].sum() for i in range(2)]).mean()
    got = defect_weighted_mse(pred, target, mask, w)
    assert torch.allclose(got, want)
    got.backward()
    g = pred.grad.abs() / (pred - target).detach().abs()
    assert torch.allclose(g[0, :, 0, 0], g[0, :, 3, 3] * (1 + w))  # the defect cell pulls 1 + w times harder
    with pytest.raises(ValueError, match="mask must be"):
        defect_weighted_mse(pred, target, torch.zeros(2, 16, 16), w)
