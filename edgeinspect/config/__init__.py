"""Validated configuration: pydantic models loaded from YAML, with model presets.

Every default that the methods document names (noise schedule, step counts, loss weights, scoring
kernels) is a field here, never a constant in code. Unknown fields are errors, so a typo in a YAML
file fails loudly with the field's dotted path instead of being silently ignored.

    base.py         sections every method shares (networks, scheduler, features, guidance, training loop,
                    runtime) and ConfigError
    diad.py, glad.py, adabldm.py, dualanodiff.py   one module per method: its sections
    methods.py      each method's whole config (its sections on MethodConfig) and the METHODS table
    presets.py      tiny / edge / sd15 defaults per method
    load.py         build_config, load_config, parse_overrides, merge_config, dump_config

Import from the package: `from edgeinspect.config import load_config, DiADConfig`.
"""

from edgeinspect.config.base import (
    ConfigError, Strict, VAEConfig, UNetConfig, PromptEncoderConfig, ModelConfig, SchedulerConfig, FeatureConfig,
    GuidanceConfig, TrainLoopConfig, AutoencoderStageConfig, RuntimeConfig, MethodConfig, anchor_layout,
    BankConfig, BANK_REFERENCES, Decoder, Encoder, REFERENCES, Reference, frame_size, bank_image_levels,
)
from edgeinspect.config.diad import DiADTrainConfig, DiADInferenceConfig, DiADScoringConfig
from edgeinspect.config.glad import (
    SyntheticAnomalyConfig, GLADFeatureConfig, GLADTrainConfig, GLADCategorySettings, GLADInferenceConfig,
    GLADScoringConfig, ADPCalibrationConfig,
)
from edgeinspect.config.adabldm import (
    ForegroundConfig, PlacementConfig, TrimapControlConfig, AdaBLDMTrainConfig, PasteMode, AdaBLDMSamplingConfig,
)
from edgeinspect.config.dualanodiff import (
    LoRABranchConfig, SAIMConfig, BCMConfig, PromptPairConfig, DualAnoDiffTrainConfig, PartMaskConfig,
    DualAnoDiffSamplingConfig,
)
from edgeinspect.config.methods import DiADConfig, GLADConfig, AdaBLDMConfig, DualAnoDiffConfig, METHODS, AnyConfig
from edgeinspect.config.presets import PRESETS
from edgeinspect.config.load import (
    merge_config, parse_overrides, build_config, load_config, dump_config,
)

__all__ = [
    "ConfigError", "AutoencoderStageConfig", "anchor_layout", "BankConfig", "BANK_REFERENCES", "REFERENCES",
    "Reference",
    "Encoder",
    "Decoder",
    "frame_size", "bank_image_levels",
    "Strict",
    "VAEConfig",
    "UNetConfig",
    "PromptEncoderConfig",
    "ModelConfig",
    "SchedulerConfig",
    "FeatureConfig",
    "GuidanceConfig",
    "TrainLoopConfig",
    "RuntimeConfig",
    "MethodConfig",
    "DiADTrainConfig",
    "DiADInferenceConfig",
    "DiADScoringConfig",
    "SyntheticAnomalyConfig",
    "GLADFeatureConfig",
    "GLADTrainConfig",
    "GLADCategorySettings",
    "GLADInferenceConfig",
    "GLADScoringConfig",
    "ADPCalibrationConfig",
    "ForegroundConfig",
    "PlacementConfig",
    "TrimapControlConfig",
    "AdaBLDMTrainConfig",
    "PasteMode",
    "AdaBLDMSamplingConfig",
    "LoRABranchConfig",
    "SAIMConfig",
    "BCMConfig",
    "PromptPairConfig",
    "DualAnoDiffTrainConfig",
    "PartMaskConfig",
    "DualAnoDiffSamplingConfig",
    "DiADConfig",
    "GLADConfig",
    "AdaBLDMConfig",
    "DualAnoDiffConfig",
    "METHODS",
    "AnyConfig",
    "PRESETS",
    "merge_config",
    "parse_overrides",
    "build_config",
    "load_config",
    "dump_config",
]
