"""The DualAnoDiff model: one frozen UNet, two LoRA branches, SAIM and BCM, and the `dual_unet` role.

Branches. Branch "whole" denoises the whole anomalous image I, branch "part" the anomaly part
I_a = I * M (background 0 in [-1, 1]). They share every base weight of the UNet, which is frozen;
each has its own peft LoRA adapter (named "whole" and "part") on the attention projections
(`lora.target_modules`, default to_q/to_k/to_v/to_out.0 of every attention layer).

Batch layout. One UNet call runs both branches as one batch, group-major: rows
[whole_0 .. whole_{n-1} | part_0 .. part_{n-1} | background_0 .. background_{n-1}], so pair j is
rows j and n + j, and its BCM background (when there is one) row 2n + j. Every row of pair j has
the same timestep; the background rows use the whole branch's adapter and the context of their
whole row (they are "the background run through the UNet with branch 0"; under classifier-free
guidance the unconditional pairs' backgrounds get the empty prompt with them). Group-major blocks, not
interleaved rows, because then every per-branch operation is a reshape to (groups, n, ...) with
a constant group count, which an exported graph keeps valid for any batch size.

Per-row adapters. peft's own mixed-batch path (`adapter_names=`) is refused in training mode by
LoraModel, and its layer code selects rows with Python index lists, which a traced graph would
freeze for one batch size. So the adapters are peft's (LoraConfig, inject_adapter_in_model, its
lora_A/lora_B/scaling per adapter), injected through peft's custom-module dispatch as
`BranchLoraLinear` / `BranchLoraConv2d`, peft's lora.Linear / lora.Conv2d whose forward applies
adapter "whole" to the whole and background row blocks and "part" to the part block. Convolutions
are valid targets (e.g. the resnets' conv1/conv2 and conv_out): the attention layers of a small UNet
sit only at its lower resolutions, and the part branch must change what the full-resolution layers
draw (an empty background).

SAIM (after attn1 and/or attn2 of every transformer block, `saim.after`): per spatial position the
two branches' attention outputs form a sequence of length 2 -> LayerNorm -> linear (q, k, v) ->
multi-head attention across the two -> linear out -> residual. The out linear starts at zero, so
training starts from the plain base UNet. The background rows pass through unchanged.

BCM (every transformer block's attn1): the background rows' self-attention input h_bg is taken
in the same UNet call (it depends only on the background's own rows: SAIM and BCM never write into
them), and the whole rows' keys/values are computed from (1 - a) h + a MLP(h_bg), with `a` a
learnable scalar that starts at 0; queries still come from h. The part and background rows keep
their own keys/values. With a = 0 the whole branch is exactly the branch without BCM.

Both are forward hooks on the diffusers attention modules, so the UNet stays diffusers' own and
its attention processors are untouched; the hooks read the current row layout from a
`BranchLayout` that `DualAnoDiffModel.dual_forward` sets for the duration of one UNet call.

Construction order: base weights are loaded (through `load_base`) before peft wraps the attention
projections, because the wrap renames `to_q.weight` to `to_q.base_layer.weight` and a base
checkpoint holds the plain names.
"""

from __future__ import annotations

import math
import warnings
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from diffusers.models.attention import BasicTransformerBlock
from peft import LoraConfig, inject_adapter_in_model
from peft.tuners.lora.layer import Conv2d as PeftLoraConv2d
from peft.tuners.lora.layer import Linear as PeftLoraLinear
from torch import nn
from torch.nn.modules.module import _IncompatibleKeys

from edgeinspect.config import DualAnoDiffConfig
from edgeinspect.models.diad import LatentDiffusionModel, VAEDecoderNet, VAEEncoderNet

ADAPTERS = ("whole", "part")
# The adapter of each row block, in the batch layout's order (background rows: branch 0).
_BLOCK_ADAPTERS = ("whole", "part", "whole")
TRAINABLE_PREFIXES = ("saim.", "bcm.", "prompt_encoder.")


def is_trainable_key(name: str) -> bool:
    """LoRA adapters, SAIM, BCM and the prompt encoder; everything else is the frozen base."""
    return ".lora_A." in name or ".lora_B." in name or name.startswith(TRAINABLE_PREFIXES)


class BranchLayout:
    """How many row blocks (2: whole, part; 3: + background) the UNet call in progress has."""

    def __init__(self):
        self.blocks: int | None = None

    @contextmanager
    def rows(self, blocks: int) -> Iterator[None]:
        self.blocks = blocks
        try:
            yield
        finally:
            self.blocks = None

    def current(self) -> int:
        if self.blocks is None:
            raise RuntimeError("the DualAnoDiff UNet runs only through DualAnoDiffModel.dual_forward "
                               "(its LoRA, SAIM and BCM need to know which rows are which branch)")
        return self.blocks


class _BranchRows:
    """The per-row-block forward shared by the Linear and Conv2d LoRA layers (see the module docstring).

    The blocks' adapter factors are stacked once per call in the form each layer type applies fastest:
    Linear layers take all blocks' deltas in one batched matmul per factor; Conv2d layers one
    convolution pair per block (a grouped convolution over the blocks side by side needs two
    transposing copies and measured slower on the CPU: 26 vs 16 ms at 48 x 64 x 32 x 32, rank 32).
    Without gradients (sampling) the stacked factors, the LoRA scaling folded into B, are kept between
    calls and rebuilt when a LoRA weight changes (in place: its version counter; moved or cast: its
    storage and dtype): a few operators per layer instead of a dozen, which is what a GPU step of this
    small UNet spends its time dispatching (benchmarks/dual_step.py). Both adapters share one dropout
    rate (`lora.dropout`), so one dropout over all rows draws as per-block ones would.
    """

    layout: BranchLayout  # set by DualAnoDiffModel after injection
    _factors_cache: tuple[tuple, tuple] | None = None

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        result = self.base_layer(x, *args, **kwargs)
        names = _BLOCK_ADAPTERS[:self.layout.current()]
        dtype = self.lora_A[names[0]].weight.dtype
        x = self.lora_dropout[names[0]](x if x.dtype == dtype else x.to(dtype))
        delta = self._deltas(x, len(names), *self._factors(names))
        return result + (delta if delta.dtype == result.dtype else delta.to(result.dtype)).reshape(result.shape)

    def _factors(self, names: tuple[str, ...]) -> tuple:
        """The blocks' A weights and scaled B weights, in the form `_deltas` takes."""
        a = [self.lora_A[n].weight for n in names]
        b = [self.lora_B[n].weight for n in names]

        def stack() -> tuple:
            return self._stack(a, [w * self.scaling[n] for w, n in zip(b, names)])

        if torch.is_grad_enabled() and any(w.requires_grad for w in a + b):
            return stack()
        key = (names, *((w._version, w.data_ptr(), w.dtype, w.device) for w in a + b))
        if self._factors_cache is None or self._factors_cache[0] != key:
            with torch.no_grad():
                self._factors_cache = (key, stack())
        return self._factors_cache[1]


class BranchLoraLinear(_BranchRows, PeftLoraLinear):
    """peft's LoRA Linear with one adapter per row block."""

    @staticmethod
    def _stack(a: list[torch.Tensor], b: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.stack(a).transpose(1, 2), torch.stack(b).transpose(1, 2)  # (blocks, in, r), (blocks, r, out)

    @staticmethod
    def _deltas(x: torch.Tensor, blocks: int, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return torch.bmm(torch.bmm(x.reshape(blocks, -1, x.shape[-1]), a), b)


class BranchLoraConv2d(_BranchRows, PeftLoraConv2d):
    """peft's LoRA Conv2d (A: the layer's kernel to rank r, B: 1x1) with one adapter per row block."""

    @staticmethod
    def _stack(a: list[torch.Tensor], b: list[torch.Tensor]) -> tuple[tuple[torch.Tensor, ...], ...]:
        return tuple(a), tuple(b)

    def _deltas(self, x: torch.Tensor, blocks: int, a: tuple[torch.Tensor, ...], b: tuple[torch.Tensor, ...]
                ) -> torch.Tensor:
        conv = self.lora_A[ADAPTERS[0]]
        return torch.cat([F.conv2d(F.conv2d(xb, wa, None, conv.stride, conv.padding, conv.dilation), wb)
                          for xb, wa, wb in zip(x.unflatten(0, (blocks, -1)).unbind(), a, b)])


class SAIM(nn.Module):
    """Self-attention interaction: per position, attention across the (whole, part) pair."""

    def __init__(self, channels: int, heads: int):
        super().__init__()
        if channels % heads:
            raise ValueError(f"saim.heads={heads} must divide the attention width {channels}")
        self.heads = heads
        self.norm = nn.LayerNorm(channels)
        self.qkv = nn.Linear(channels, 3 * channels)
        self.out = nn.Linear(channels, channels)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, whole: torch.Tensor, part: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(n, L, C) each -> the same, each position mixed only with the same position of the other."""
        seq = torch.stack([whole, part], dim=2)  # (n, L, 2, C)
        n, length, _, c = seq.shape
        d = c // self.heads
        q, k, v = self.qkv(self.norm(seq)).reshape(n, length, 2, 3, self.heads, d).permute(3, 0, 1, 4, 2, 5)
        weights = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d), dim=-1)  # (n, L, H, 2, 2)
        mixed = (weights @ v).permute(0, 1, 3, 2, 4).reshape(n, length, 2, c)
        seq = seq + self.out(mixed)
        return seq[:, :, 0], seq[:, :, 1]


class BCM(nn.Module):
    """Background compensation for one self-attention layer: (1 - a) h + a f(h_bg), a from 0;
    f = MLP ("plain") or identity + MLP with a zero-initialised last layer ("residual")."""

    def __init__(self, channels: int, hidden: int, mlp: str = "plain"):
        super().__init__()
        if mlp not in ("plain", "residual"):
            raise ValueError(f"BCM mlp must be 'plain' or 'residual', not {mlp!r}")
        self.mlp = nn.Sequential(nn.Linear(channels, hidden), nn.SiLU(), nn.Linear(hidden, channels))
        self.residual = mlp == "residual"
        if self.residual:
            nn.init.zeros_(self.mlp[2].weight)
            nn.init.zeros_(self.mlp[2].bias)
        self.gate = nn.Parameter(torch.zeros(()))

    def forward(self, h: torch.Tensor, h_background: torch.Tensor) -> torch.Tensor:
        f = self.mlp(h_background)
        if self.residual:
            f = h_background + f
        return (1 - self.gate) * h + self.gate * f


def _saim_hook(saim: SAIM, layout: BranchLayout) -> Callable:
    def hook(_module: nn.Module, _args, output: torch.Tensor) -> torch.Tensor:
        blocks = output.reshape(layout.current(), -1, *output.shape[1:])
        whole, part = saim(blocks[0], blocks[1])
        return torch.cat([whole, part, *blocks[2:]])

    return hook


def _bcm_hook(bcm: BCM, layout: BranchLayout) -> Callable:
    def hook(_module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        if layout.current() < 3:  # no background in this call: plain self-attention
            return None
        h = args[0] if args else kwargs["hidden_states"]
        whole, part, background = h.reshape(3, -1, *h.shape[1:])
        kwargs = dict(kwargs, encoder_hidden_states=torch.cat([bcm(whole, background), part, background]))
        return args, kwargs

    return hook


class DualAnoDiffModel(LatentDiffusionModel):
    """Autoencoder, frozen UNet with the two LoRA branches, SAIM, BCM and the trainable prompt encoder.

    `load_base(model)` is called on the plain latent-diffusion parts before the branches are added
    (base checkpoints name the UNet's weights as the unwrapped UNet does)."""

    def __init__(self, cfg: DualAnoDiffConfig, load_base: Callable[[LatentDiffusionModel], None] | None = None):
        super().__init__(cfg)
        if load_base is not None:
            load_base(self)
        self.layout = BranchLayout()
        self._add_lora()
        self.saim = nn.ModuleDict()
        self.bcm = nn.ModuleDict()
        for path, block in self.unet.named_modules():
            if not isinstance(block, BasicTransformerBlock):
                continue
            key = path.replace(".", "_")
            for where, name in (("self", "attn1"), ("cross", "attn2")):
                attn = getattr(block, name, None)
                if attn is not None and where in cfg.saim.after:
                    saim = SAIM(attn.out_dim, cfg.saim.heads)
                    self.saim[f"{key}_{name}"] = saim
                    attn.register_forward_hook(_saim_hook(saim, self.layout))
            if cfg.bcm.enabled:
                dim = block.attn1.query_dim
                bcm = BCM(dim, max(1, round(cfg.bcm.mlp_ratio * dim)), cfg.bcm.mlp)
                self.bcm[key] = bcm
                block.attn1.register_forward_pre_hook(_bcm_hook(bcm, self.layout), with_kwargs=True)
        for name, p in self.named_parameters():
            p.requires_grad_(is_trainable_key(name))

    def _add_lora(self) -> None:
        c = self.cfg.lora
        for i, adapter in enumerate(ADAPTERS):
            config = LoraConfig(r=c.rank, lora_alpha=c.alpha, target_modules=list(c.target_modules),
                                lora_dropout=c.dropout)
            config._register_custom_module({nn.Linear: BranchLoraLinear, nn.Conv2d: BranchLoraConv2d})
            with warnings.catch_warnings():
                if i:  # peft warns that a second adapter goes into the same model: that is the point
                    warnings.filterwarnings("ignore", message="Already found a `peft_config`")
                inject_adapter_in_model(config, self.unet, adapter_name=adapter)
        layers = [m for m in self.unet.modules() if isinstance(m, _BranchRows)]
        if not layers:
            raise ValueError(f"lora.target_modules={c.target_modules} matches no Linear or Conv2d layer of the UNet")
        for m in layers:
            m.layout = self.layout

    def dual_forward(self, sample_whole: torch.Tensor, sample_part: torch.Tensor, timestep: torch.Tensor,
                     ctx_whole: torch.Tensor, ctx_part: torch.Tensor, background: torch.Tensor | None = None
                     ) -> tuple[torch.Tensor, torch.Tensor]:
        """Noise predictions of both branches for n pairs; `background` (n, C, h, w): the BCM
        background latent noised to the same timestep (None: no background compensation)."""
        if background is not None and not self.cfg.bcm.enabled:
            raise ValueError("a background was given but this model has no BCM (bcm.enabled is false)")
        n = sample_whole.shape[0]
        samples, contexts = [sample_whole, sample_part], [ctx_whole, ctx_part]
        if background is not None:
            samples.append(background)
            contexts.append(ctx_whole)
        blocks = len(samples)
        t = timestep.reshape(-1).expand(n).repeat(blocks)
        with self.layout.rows(blocks):
            eps = self.unet(torch.cat(samples), t, encoder_hidden_states=torch.cat(contexts)).sample
        return eps[:n], eps[n:2 * n]

    def trainable_names(self) -> list[str]:
        return [k for k in self.state_dict() if is_trainable_key(k)]

    def role_modules(self) -> dict[str, nn.Module]:
        unet = DualUNet(self) if self.cfg.bcm.enabled else DualUNetPlain(self)
        role = "dual_unet" if self.cfg.bcm.enabled else "dual_unet_plain"
        return {"vae_encoder": VAEEncoderNet(self.vae), role: unet, "vae_decoder": VAEDecoderNet(self.vae)}


class DualUNet(nn.Module):
    """The `dual_unet` role (BCM on): one graph for both branches and the background."""

    def __init__(self, model: DualAnoDiffModel):
        super().__init__()
        self.model = model

    def forward(self, sample_whole: torch.Tensor, sample_part: torch.Tensor, background: torch.Tensor,
                timestep: torch.Tensor, ctx_whole: torch.Tensor, ctx_part: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor]:
        return self.model.dual_forward(sample_whole, sample_part, timestep, ctx_whole, ctx_part, background)


class DualUNetPlain(nn.Module):
    """The `dual_unet_plain` role (BCM off): as `dual_unet` without the background input."""

    def __init__(self, model: DualAnoDiffModel):
        super().__init__()
        self.model = model

    def forward(self, sample_whole: torch.Tensor, sample_part: torch.Tensor, timestep: torch.Tensor,
                ctx_whole: torch.Tensor, ctx_part: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.model.dual_forward(sample_whole, sample_part, timestep, ctx_whole, ctx_part)


class TrainableWeights(nn.Module):
    """A checkpoint view of a DualAnoDiff model: its state dict holds only the trainable weights
    (LoRA, SAIM, BCM, prompt encoder), so checkpoints stay small and the frozen base is read from
    the base checkpoint it came from. The Trainer saves and resumes it like any module."""

    def __init__(self, model: DualAnoDiffModel):
        super().__init__()
        self.model = model
        self.names = model.trainable_names()

    def state_dict(self, *args, **kwargs) -> OrderedDict[str, torch.Tensor]:
        full = self.model.state_dict()
        return OrderedDict((k, full[k]) for k in self.names)

    def load_state_dict(self, state_dict: Mapping[str, torch.Tensor], strict: bool = True, assign: bool = False
                        ) -> _IncompatibleKeys:
        wanted = set(self.names)
        missing = [k for k in self.names if k not in state_dict]
        unexpected = [k for k in state_dict if k not in wanted]
        if strict and (missing or unexpected):
            raise RuntimeError(f"trainable weights do not match: missing {missing[:8]}, unexpected {unexpected[:8]}")
        self.model.load_state_dict({k: v for k, v in state_dict.items() if k in wanted}, strict=False, assign=assign)
        return _IncompatibleKeys(missing, unexpected)
