import pytest
import torch

from edgeinspect.config import build_config
from edgeinspect.models.backbones import build_unet, build_vae


def test_edge_preset_sizes():
    cfg = build_config("diad", "edge").model
    vae, unet = build_vae(cfg), build_unet(cfg)
    assert cfg.latent_size == 16 and cfg.vae.kind == "anchored" and cfg.vae.latent_channels == 16
    n_vae = sum(p.numel() for p in vae.parameters()) / 1e6
    n_unet = sum(p.numel() for p in unet.parameters()) / 1e6
    assert 1 < n_vae < 10 and 5 < n_unet < 40  # "a few M to tens of M parameters"
    with torch.no_grad():
        z = vae.encode(torch.zeros(1, 3, 128, 128)).latent_dist.mean
        assert z.shape == (1, 16, 16, 16)
        out = unet(z, torch.tensor([10.0]), encoder_hidden_states=torch.zeros(1, 8, 128)).sample
    assert out.shape == z.shape


def test_sd15_preset_loads_local_diffusers_folders(tmp_path):
    tiny = build_config("diad", "tiny").model  # a KL autoencoder, as SD's
    vae, unet = build_vae(tiny), build_unet(tiny)
    vae.save_pretrained(tmp_path / "sd" / "vae")
    unet.save_pretrained(tmp_path / "sd" / "unet")
    cfg = build_config("diad", "sd15", {"model": {"sd15_path": str(tmp_path / "sd")}}).model
    vae2, unet2 = build_vae(cfg), build_unet(cfg)
    for a, b in ((vae, vae2), (unet, unet2)):
        for (k, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items()):
            assert torch.equal(x, y), k


def test_sd15_missing_folder_is_a_clear_error(tmp_path):
    cfg = build_config("diad", "sd15", {"model": {"sd15_path": str(tmp_path / "nothing")}}).model
    with pytest.raises(FileNotFoundError, match="diffusers model folder"):
        build_vae(cfg)
