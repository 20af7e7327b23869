"""The one interface between loops and backends: networks by role, named tensors in and out.

Loops hold a `Networks` mapping (role -> Network) and never see torch modules, ONNX sessions or
TensorRT engines. Tensors are torch tensors on the backend's device, so a GPU backend keeps every
intermediate on the device between calls (onnxruntime IO binding and TensorRT bind their memory).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Protocol

import torch
from torch import nn

from edgeinspect.core.roles import ROLE_SIGNATURES, Signature


class Network(Protocol):
    input_names: tuple[str, ...]
    output_names: tuple[str, ...]

    def __call__(self, **inputs: torch.Tensor) -> dict[str, torch.Tensor]: ...


def require_inputs(input_names: tuple[str, ...], inputs: Mapping[str, torch.Tensor]) -> None:
    """Every backend's networks refuse a call that lacks one of their inputs, with the same message."""
    missing = set(input_names) - set(inputs)
    if missing:
        raise TypeError(f"missing inputs {sorted(missing)}; expected {input_names}")


class MissingNetworkError(KeyError):
    pass


class Networks(Mapping[str, Network]):
    """Role -> Network, with a clear error for a role the backend does not supply."""

    def __init__(self, networks: dict[str, Network], device: torch.device | str = "cpu", name: str = "torch"):
        self._networks = dict(networks)
        self.device = torch.device(device)
        self.name = name

    def __getitem__(self, role: str) -> Network:
        try:
            return self._networks[role]
        except KeyError:
            raise MissingNetworkError(
                f"backend {self.name!r} has no network {role!r} (it has {sorted(self._networks)})"
            ) from None

    def __iter__(self):
        return iter(self._networks)

    def __len__(self) -> int:
        return len(self._networks)


class TorchNetwork:
    """A torch module behind the named-tensor interface (inference mode, outputs by name)."""

    def __init__(self, module: nn.Module | Callable, input_names: tuple[str, ...], output_names: tuple[str, ...]):
        self.module = module
        self.input_names, self.output_names = tuple(input_names), tuple(output_names)

    def __call__(self, **inputs: torch.Tensor) -> dict[str, torch.Tensor]:
        require_inputs(self.input_names, inputs)
        with torch.inference_mode():
            out = self.module(*(inputs[n] for n in self.input_names))
        if isinstance(out, torch.Tensor):
            out = (out,)
        elif isinstance(out, dict):
            out = tuple(out[n] for n in self.output_names)
        return dict(zip(self.output_names, out, strict=True))


def torch_networks(modules: dict[str, nn.Module], device: torch.device | str = "cpu",
                   signatures: dict[str, Signature] | None = None) -> Networks:
    sig = dict(ROLE_SIGNATURES)
    sig.update(signatures or {})
    nets = {}
    for role, m in modules.items():
        if role not in sig:
            raise KeyError(f"no signature for role {role!r}")
        m.eval().to(device)
        nets[role] = TorchNetwork(m, *sig[role])
    return Networks(nets, device, "torch")
