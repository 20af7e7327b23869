"""What a method exports: one `RoleExport` per network role, from a registry of role builders.

A method registers a builder per role (`register_role("diad", "unet")(fn)`); the builder gets the
loaded model and returns the torch module, example inputs at the deployment size, probe inputs at
another batch (and size, where the graph is spatially dynamic), the output names and the dynamic axes.
Export, parity checks, fp16 conversion, the bundle manifest and TensorRT profiles all work from these,
so GLAD, AdaBLDM or DualAnoDiff add their networks by registering more roles, with no change here
(`edgeinspect.export.methods` imports every method's module, which registers its roles).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn


@dataclass
class ExportContext:
    """Everything a role builder may need: the method's config, its model, the feature extractor, the
    prompt context (a constant per deployment), the named contexts of a generator's loop (AdaBLDM:
    defect, empty; DualAnoDiff: whole, part, empty) and method options (AdaBLDM: the defect type)."""

    cfg: Any
    model: nn.Module
    features: nn.Module | None = None
    context: torch.Tensor | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    contexts: dict[str, torch.Tensor] = field(default_factory=dict)


@dataclass
class RoleExport:
    role: str
    module: nn.Module
    inputs: dict[str, torch.Tensor]  # example inputs at the deployment size (batch 2: no batch-1 specialisation)
    probe: dict[str, torch.Tensor]  # another batch and, where spatially dynamic, another size
    output_names: tuple[str, ...]
    dynamic_axes: dict[str, dict[int, str]]  # per input: axis -> name ("batch" for the batch axis)
    batch_multiplier: int = 1  # the loop calls the network with this many times the frame batch
    pipeline: bool = True  # called by the method's loop; False: exported for use on its own
    fp16: bool = True  # worth an fp16 variant (the VAE stays fp32)
    notes: str = ""

    @property
    def input_names(self) -> tuple[str, ...]:
        return tuple(self.inputs)

    def deploy_shape(self, name: str) -> tuple[int, ...]:
        """An input's concrete shape at batch 1 and the deployment size."""
        shape = list(self.inputs[name].shape)
        for axis, axis_name in self.dynamic_axes.get(name, {}).items():
            if axis_name == "batch":
                shape[axis] = 1
        return tuple(shape)


# A builder returns None when its role does not apply to the model at hand (DualAnoDiff exports
# dual_unet with BCM and dual_unet_plain without).
RoleBuilder = Callable[[ExportContext], "RoleExport | None"]
REGISTRY: dict[str, dict[str, RoleBuilder]] = {}


def register_role(method: str, role: str) -> Callable[[RoleBuilder], RoleBuilder]:
    """Decorator: `builder(ctx) -> RoleExport` exports `role` for `method` (registration order is kept)."""

    def deco(fn: RoleBuilder) -> RoleBuilder:
        REGISTRY.setdefault(method, {})[role] = fn
        return fn

    return deco
