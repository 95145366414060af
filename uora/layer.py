"""The UORA layer: per-layer trainable vectors d and b around a frozen (possibly quantised) linear layer.

Shared state (the projections A and B of each adapter) lives on the tuner (`UoraModel`); every layer
holds a reference to the same `ProjectionDict`s, so writing A or B once (re-initialisation, loading) is
seen by all layers. The projections stay float32; a layer whose vectors d and b are in another dtype
computes with the dict's cached copy in that dtype (see `uora.projections`).
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
import torch.nn.functional as F
from peft.tuners.tuners_utils import BaseTunerLayer, _get_in_out_features, check_adapters_to_merge
from peft.utils import quantization_extra_repr, resolve_quantization_backend
from peft.utils.other import transpose
from torch import nn

from .config import UoraConfig
from .projections import ProjectionDict


class UoraLayer(BaseTunerLayer):
    """Adapter state of one adapted layer: `uora_lambda_d[adapter]` (r) and `uora_lambda_b[adapter]` (out)."""

    adapter_layer_names = ("uora_lambda_b", "uora_lambda_d")
    other_param_names = ("uora_A", "uora_B", "uora_dropout", "r")

    def __init__(self, base_layer: nn.Module, **kwargs: Any) -> None:
        self.base_layer = base_layer
        self.quantization_backend = resolve_quantization_backend(
            self.get_base_layer(), get_apply_tensor_subclass=kwargs.get("get_apply_tensor_subclass")
        )
        self.r: dict[str, int] = {}
        self.uora_dropout = nn.ModuleDict({})
        self.uora_lambda_b = nn.ParameterDict({})
        self.uora_lambda_d = nn.ParameterDict({})
        # references to the tuner's shared ProjectionDicts (set in update_layer)
        self.uora_A: ProjectionDict | None = None
        self.uora_B: ProjectionDict | None = None
        self._disable_adapters = False
        self.merged_adapters: list[str] = []

        in_features, out_features = _get_in_out_features(self.get_base_layer())
        if in_features is None or out_features is None:
            raise TypeError(f"Unsupported layer type {type(self.get_base_layer())} for UORA")
        self.in_features = in_features
        self.out_features = out_features
        self.kwargs = kwargs

    def update_layer(
        self,
        adapter_name: str,
        uora_A: ProjectionDict,
        uora_B: ProjectionDict,
        r: int,
        config: UoraConfig,
        inference_mode: bool = False,
        **kwargs: Any,
    ) -> None:
        if r <= 0:
            raise ValueError(f"UoraConfig.r must be a positive integer, got {r}")
        if adapter_name not in uora_A or adapter_name not in uora_B:
            raise ValueError(
                f"UORA projections for adapter {adapter_name!r} were not created before injection"
            )
        proj_a, proj_b = uora_A[adapter_name], uora_B[adapter_name]
        # Each adapter has its own projections sized for its own targets; check this layer fits them.
        if proj_a.shape[0] != r or proj_b.shape[1] != r:
            raise ValueError(
                f"uora_A/uora_B of adapter {adapter_name!r} have rank {proj_a.shape[0]}, expected {r}"
            )
        if proj_a.shape[1] < self.in_features or proj_b.shape[0] < self.out_features:
            raise ValueError(
                f"uora_A/uora_B of adapter {adapter_name!r} have shapes "
                f"{tuple(proj_a.shape)}/{tuple(proj_b.shape)}, "
                f"too small for a layer with in={self.in_features}, out={self.out_features}"
            )
        self.r[adapter_name] = r
        dropout = nn.Dropout(p=config.uora_dropout) if config.uora_dropout > 0.0 else nn.Identity()
        self.uora_dropout.update(nn.ModuleDict({adapter_name: dropout}))
        if config.init_weights:  # d = d_initial, b = 0: ΔW = 0
            lambda_b, lambda_d = torch.zeros(self.out_features), torch.full((r,), float(config.d_initial))
        else:  # as PEFT's VeRA: b = 1, d ~ N(0, 1) from torch's global generator, a non-zero ΔW for tests
            lambda_b, lambda_d = torch.ones(self.out_features), torch.randn(r)
        self.uora_lambda_b[adapter_name] = nn.Parameter(lambda_b, requires_grad=True)
        self.uora_lambda_d[adapter_name] = nn.Parameter(lambda_d, requires_grad=True)
        self.uora_A = uora_A
        self.uora_B = uora_B
        self._move_adapter_to_device_of_base_layer(adapter_name)
        self.set_adapter(self.active_adapters, inference_mode=inference_mode)

    def reset_uora_parameters(self, adapter_name: str, d_initial: float = 0.1) -> None:
        """d = d_initial, b = 0: the adapter starts as an exact no-op (ΔW = 0)."""
        if adapter_name in self.uora_lambda_d:
            with torch.no_grad():
                self.uora_lambda_d[adapter_name].fill_(d_initial)
                self.uora_lambda_b[adapter_name].zero_()

    def _move_adapter_to_device_of_base_layer(
        self, adapter_name: str, device: torch.device | None = None
    ) -> None:
        """PEFT's move, except that A and B only change device, never dtype.

        PEFT would cast them to the base layer's dtype (e.g. bf16), rounding the float32 masters; a
        layer in another dtype computes with the shared dict's copy instead (`_projections`).
        """
        shared = {}
        for attr in ("uora_A", "uora_B"):
            container = getattr(self, attr, None)
            if container is not None and adapter_name in container:
                shared[attr] = container[adapter_name]
        super()._move_adapter_to_device_of_base_layer(adapter_name, device=device)
        for attr, tensor in shared.items():
            moved = getattr(self, attr)[adapter_name]
            getattr(self, attr)[adapter_name] = tensor.to(moved.device)

    def _projections(
        self, adapter: str, dtype: torch.dtype, device: torch.device
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Sliced (A[:, :in], B[:out, :]) in `dtype` on `device`.

        The float32 masters themselves when `dtype` is float32 on their device; otherwise the shared
        dict's cached copy (made once per change of A/B for every layer, never written in place), so
        the masters are never rounded however d and b are cast.
        """
        proj_a = self.uora_A.compute(adapter, dtype, device)
        proj_b = self.uora_B.compute(adapter, dtype, device)
        return proj_a[:, : self.in_features], proj_b[: self.out_features, :]


class Linear(nn.Module, UoraLayer):
    """UORA on `nn.Linear`, transformers' `Conv1D` (fan_in_fan_out) and quantised linear layers."""

    def __init__(
        self,
        base_layer: nn.Module,
        uora_A: ProjectionDict,
        uora_B: ProjectionDict,
        adapter_name: str,
        config: UoraConfig,
        r: int = 0,
        is_target_conv_1d_layer: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__()
        UoraLayer.__init__(self, base_layer, **kwargs)
        self.fan_in_fan_out = config.fan_in_fan_out
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, uora_A, uora_B, r, config=config)
        self.is_target_conv_1d_layer = is_target_conv_1d_layer

    def get_delta_weight(self, adapter: str) -> torch.Tensor:
        """ΔW = (b ⊙ B[:out]) (d ⊙ A[:, :in]) in float32, in the base weight's layout (transposed for Conv1D).

        Float32 from the float32 masters whatever d's dtype, so a merge rounds ΔW once, into the
        weight's dtype, instead of multiplying already-rounded factors (a one-off out × in matmul).
        """
        lambda_d = self.uora_lambda_d[adapter]
        lambda_b = self.uora_lambda_b[adapter]
        proj_a, proj_b = self._projections(adapter, torch.float32, lambda_d.device)
        delta = (lambda_b.float().unsqueeze(-1) * proj_b) @ (lambda_d.float().unsqueeze(-1) * proj_a)
        return transpose(delta, self.fan_in_fan_out)

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        """Add ΔW of the active (or given) adapters into the base weight (free inference afterwards)."""
        adapter_names = check_adapters_to_merge(self, adapter_names)
        for adapter in adapter_names:
            if adapter not in self.uora_lambda_d:
                continue
            weight = self.get_base_weight()
            delta = self.get_delta_weight(adapter).to(weight.dtype)
            if safe_merge:
                weight = weight.clone() + delta
                if not torch.isfinite(weight).all():
                    raise ValueError(
                        f"NaNs detected in the merged weights. The adapter {adapter} seems to be broken"
                    )
            else:
                weight += delta
            self.set_base_weight(weight)
            self.merged_adapters.append(adapter)

    def unmerge(self) -> None:
        if not self.merged:
            warnings.warn("Already unmerged. Nothing to do.", stacklevel=2)
            return
        while self.merged_adapters:
            adapter = self.merged_adapters.pop()
            if adapter in self.uora_lambda_d:
                weight = self.get_base_weight()
                weight -= self.get_delta_weight(adapter).to(weight.dtype)
                self.set_base_weight(weight)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        previous_dtype = x.dtype
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            result = self.base_layer(x, *args, **kwargs)
        elif self.merged:
            result = self.base_layer(x, *args, **kwargs)
        else:
            result = self.base_layer(x, *args, **kwargs)
            orig_dtype = result.dtype
            if self.quantization_backend is not None:
                result = self.quantization_backend.maybe_clone_base_result(result)
            for adapter in self.active_adapters:
                if adapter not in self.uora_lambda_d:
                    continue
                lambda_d = self.uora_lambda_d[adapter]
                lambda_b = self.uora_lambda_b[adapter]
                proj_a, proj_b = self._projections(adapter, lambda_d.dtype, x.device)
                h = self._cast_input_dtype(self.uora_dropout[adapter](x), lambda_d.dtype)
                result = result + lambda_b * F.linear(lambda_d * F.linear(h, proj_a), proj_b)
            result = result.to(orig_dtype)
        return result.to(previous_dtype)

    def supports_lora_conversion(self, adapter_name: str = "default") -> bool:
        return True

    def __repr__(self) -> str:
        return "uora." + super().__repr__()

    def extra_repr(self) -> str:
        return quantization_extra_repr(self)
