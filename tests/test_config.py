import pytest

from edgeinspect.config import ConfigError, build_config, load_config
from tests.conftest import REPO


@pytest.mark.parametrize("preset", ["tiny", "edge"])
def test_presets_validate(preset):
    cfg = build_config("diad", preset)
    assert cfg.model.preset == preset
    assert cfg.model.latent_size * cfg.model.vae.downsample_factor == cfg.model.image_size


def test_sd15_needs_a_local_folder():
    with pytest.raises(ConfigError, match="sd15_path"):
        build_config("diad", "sd15")


def test_unknown_field_is_named(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("method: diad\ntrain:\n  batch_sise: 4\n")
    with pytest.raises(ConfigError) as e:
        load_config(f)
    assert "train.batch_sise" in str(e.value)


def test_wrong_type_is_named(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("inference:\n  steps: many\n")
    with pytest.raises(ConfigError) as e:
        load_config(f)
    assert "inference.steps" in str(e.value)


def test_yaml_and_overrides(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("model:\n  preset: tiny\ninference:\n  steps: 3\n")
    cfg = load_config(f, overrides=["inference.seed=7", "guidance.injection=full"])
    assert cfg.model.preset == "tiny" and cfg.inference.steps == 3 and cfg.inference.seed == 7
    assert cfg.guidance.injection == "full"
    with pytest.raises(ConfigError, match="guidance.injection"):
        load_config(f, overrides=["guidance.injection=everywhere"])


def test_image_size_must_fit_the_downsampling():
    with pytest.raises(ConfigError, match="multiple of"):
        build_config("diad", "edge", {"model": {"image_size": 100}})


def test_missing_file_and_unknown_preset(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="unknown preset"):
        build_config("diad", "huge")


@pytest.mark.parametrize("path", sorted((REPO / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_configs_validate(path):
    cfg = load_config(path)
    assert cfg.model.latent_size * cfg.model.vae.downsample_factor == cfg.model.image_size


def test_f4_config_has_a_finer_latent():
    f8 = load_config(REPO / "configs/diad_mtd_edge.yaml")
    f4 = load_config(REPO / "configs/diad_mtd_edge_f4.yaml")
    assert f8.model.vae.downsample_factor == 8 and f4.model.vae.downsample_factor == 4
    assert f4.model.latent_size == 2 * f8.model.latent_size
