"""Every method's whole config: the sections of its module (config/<method>.py) on the shared ones
(`MethodConfig`: model, noise schedule, runtime), with the checks across sections, and the table of methods."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import field_validator, model_validator

from edgeinspect.config.adabldm import AdaBLDMSamplingConfig, AdaBLDMTrainConfig, ForegroundConfig, TrimapControlConfig
from edgeinspect.config.base import FeatureConfig, GuidanceConfig, MethodConfig, Strict, bank_image_levels
from edgeinspect.config.diad import DiADInferenceConfig, DiADScoringConfig, DiADTrainConfig
from edgeinspect.config.dualanodiff import (
    BCMConfig, DualAnoDiffSamplingConfig, DualAnoDiffTrainConfig, LoRABranchConfig, PromptPairConfig, SAIMConfig,
)
from edgeinspect.config.glad import (
    ADPCalibrationConfig, GLADFeatureConfig, GLADInferenceConfig, GLADScoringConfig, GLADTrainConfig,
)


class DetectorConfig(MethodConfig):
    """What the detectors' configs check across sections."""

    @model_validator(mode="after")
    def _image_strides_extracted(self) -> "DetectorConfig":
        bank_image_levels(list(self.features.strides), self.scoring)  # type: ignore[attr-defined]
        return self


class DiADConfig(DetectorConfig):
    method: Literal["diad"] = "diad"
    features: FeatureConfig = FeatureConfig()
    guidance: GuidanceConfig = GuidanceConfig()
    train: DiADTrainConfig = DiADTrainConfig()
    inference: DiADInferenceConfig = DiADInferenceConfig()
    scoring: DiADScoringConfig = DiADScoringConfig()

    @field_validator("inference")
    @classmethod
    def _steps_fit(cls, v: DiADInferenceConfig) -> DiADInferenceConfig:
        if v.steps > v.t_start + 1:
            raise ValueError(f"inference.steps={v.steps} cannot exceed t_start+1={v.t_start + 1}")
        return v


class GLADConfig(DetectorConfig):
    method: Literal["glad"] = "glad"
    features: GLADFeatureConfig = GLADFeatureConfig()
    train: GLADTrainConfig = GLADTrainConfig()
    inference: GLADInferenceConfig = GLADInferenceConfig()
    scoring: GLADScoringConfig = GLADScoringConfig()
    calibration: ADPCalibrationConfig = ADPCalibrationConfig()

    @property
    def category(self) -> str | None:
        t = self.train
        return self.inference.category or t.category or (Path(t.data_root).name if t.data_root else None)


class AdaBLDMConfig(MethodConfig):
    method: Literal["adabldm"] = "adabldm"
    control: TrimapControlConfig = TrimapControlConfig()
    foreground: ForegroundConfig = ForegroundConfig()
    train: AdaBLDMTrainConfig = AdaBLDMTrainConfig()
    sampling: AdaBLDMSamplingConfig = AdaBLDMSamplingConfig()

    @field_validator("sampling")
    @classmethod
    def _some_steps(cls, v: AdaBLDMSamplingConfig) -> AdaBLDMSamplingConfig:
        if v.total_steps < 1 or v.total_steps > 1000:
            raise ValueError(f"free+latent+pixel steps must be in 1..1000, got {v.total_steps}")
        return v


class DualAnoDiffConfig(MethodConfig):
    method: Literal["dualanodiff"] = "dualanodiff"
    lora: LoRABranchConfig = LoRABranchConfig()
    saim: SAIMConfig = SAIMConfig()
    bcm: BCMConfig = BCMConfig()
    prompts: PromptPairConfig = PromptPairConfig()
    train: DualAnoDiffTrainConfig = DualAnoDiffTrainConfig()
    sampling: DualAnoDiffSamplingConfig = DualAnoDiffSamplingConfig()


METHODS: dict[str, type[Strict]] = {"diad": DiADConfig, "glad": GLADConfig, "adabldm": AdaBLDMConfig,
                                     "dualanodiff": DualAnoDiffConfig}
AnyConfig = DiADConfig | GLADConfig | AdaBLDMConfig | DualAnoDiffConfig
