"""`UoraModel`: the PEFT tuner — shared projections per adapter, module replacement, save/load hooks.

Differences from PEFT's VeRA, on purpose:
- each adapter owns its projections `uora_A[name]`/`uora_B[name]`, drawn from its own config (seed,
  rank, init, target sizes) and created in `inject_adapter`, so `add_adapter` of a second UORA adapter
  never overwrites or reuses the first one's;
- projections are always saved (re-initialisation changes them), and always float32: they live in a
  `ProjectionDict`, which whole-model casts move but never round (layers in bf16 compute with a cached
  copy), so a bf16 run saves and re-initialises exactly what a float32 run would;
- the re-initialisation state lives next to them as persistent buffers (`uora_reinit_counts[name]`:
  one int32 dead-counter per layer and slot; `uora_reinit_draws[name]`: how many target pairs the
  `resample` mode has drawn). It is therefore part of the adapter state dict: `save_pretrained`,
  Trainer checkpoints and `load_adapter` on resume carry it with no extra machinery.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from peft.tuners._buffer_dict import BufferDict
from peft.tuners.tuners_utils import (
    BaseTuner,
    BaseTunerLayer,
    _get_in_out_features,
    _maybe_include_all_linear_layers,
)
from peft.utils import (
    TRANSFORMERS_MODELS_TO_VERA_TARGET_MODULES_MAPPING,
    get_quantization_kwargs,
    resolve_quantization_backend,
)
from torch import nn
from transformers.pytorch_utils import Conv1D

from ._registry import UORA_PREFIX
from .config import UoraConfig
from .init import derived_seed, init_projection_pair
from .layer import Linear, UoraLayer
from .projections import ProjectionDict

_SHARED_ATTRS = ("uora_A", "uora_B")
_STATE_ATTRS = ("uora_reinit_counts", "uora_reinit_draws")


def _get_tuner_layer_class(target_base_layer: nn.Module) -> type[UoraLayer] | None:
    if isinstance(target_base_layer, (nn.Linear, Conv1D)):
        return Linear
    backend = resolve_quantization_backend(target_base_layer)
    if backend is not None:
        return {"linear": Linear}.get(backend.layer_type)
    return None


class UoraModel(BaseTuner):
    """Creates a UORA model from a transformers model (use `peft.get_peft_model` with a `UoraConfig`).

    Example:
        >>> import uora
        >>> from peft import get_peft_model
        >>> model = get_peft_model(base_model, uora.UoraConfig(r=256, target_modules="all-linear"))
    """

    uses_shared_state: bool = True
    prefix: str = UORA_PREFIX
    tuner_layer_cls = UoraLayer
    target_module_mapping = TRANSFORMERS_MODELS_TO_VERA_TARGET_MODULES_MAPPING

    # ------------------------------------------------------------------ shared state
    def _ensure_shared_containers(self) -> None:
        for attr in _SHARED_ATTRS:  # float32 masters, whatever the model is cast to
            if attr not in self._modules:
                setattr(self, attr, ProjectionDict())
        for attr in _STATE_ATTRS:
            if attr not in self._modules:
                setattr(self, attr, BufferDict({}, persistent=True))

    def _find_dim(self, config: UoraConfig) -> tuple[int, int]:
        """Largest (out, in) among the layers this adapter targets: the size of its A and B."""
        model_config = self.get_model_config(self.model)
        peft_config = self._prepare_adapter_config(config, model_config)
        peft_config = _maybe_include_all_linear_layers(peft_config, self.model)
        largest: tuple[int, int] | None = None
        for key, module in self.model.named_modules():
            if not self._check_target_module_exists(peft_config, key):
                continue
            base = module.get_base_layer() if isinstance(module, BaseTunerLayer) else module
            if _get_tuner_layer_class(base) is None:
                continue
            in_features, out_features = _get_in_out_features(base)
            shape = (out_features, in_features)
            largest = shape if largest is None else (max(largest[0], shape[0]), max(largest[1], shape[1]))
        if largest is None:
            raise ValueError(
                "No layers compatible with UORA were found. Please check `UoraConfig.target_modules` "
                "(only Linear, Conv1D and quantised linear layers are supported)."
            )
        return largest

    def _init_projections(self, config: UoraConfig, adapter_name: str) -> None:
        """Create this adapter's A (r × in_max) and B (out_max × r) from its own seed."""
        self._ensure_shared_containers()
        out_dim, in_dim = self._find_dim(config)
        if self._model_on_meta():
            # shapes only (parameter counting, deferred loading): no data to draw
            proj_a = torch.empty((config.r, in_dim), device="meta")
            proj_b = torch.empty((out_dim, config.r), device="meta")
        else:
            proj_a, proj_b = init_projection_pair(
                config.r, in_dim, out_dim, config.projection_prng_key, config.projection_init
            )
        self.uora_A[adapter_name] = proj_a
        self.uora_B[adapter_name] = proj_b

    def _model_on_meta(self) -> bool:
        first = next(self.model.parameters(), None)
        return first is not None and first.device.type == "meta"

    def _init_reinit_state(self, adapter_name: str) -> None:
        """Zero dead-counters (one row per adapted layer, in module order) and zero target draws."""
        layers = self.uora_layers(adapter_name)
        r = self.peft_config[adapter_name].r
        device = self.uora_A[adapter_name].device
        self.uora_reinit_counts[adapter_name] = torch.zeros(
            (len(layers), r), dtype=torch.int32, device=device
        )
        self.uora_reinit_draws[adapter_name] = torch.zeros((1,), dtype=torch.int64, device=device)
        self._invalidate_reinit_cache(adapter_name)

    def _invalidate_reinit_cache(self, adapter_name: str | None = None) -> None:
        caches = self.__dict__.setdefault("_uora_cache", {"layers": {}, "targets": {}})
        for cache in caches.values():
            if adapter_name is None:
                cache.clear()
            else:
                cache.pop(adapter_name, None)

    def uora_layers(self, adapter_name: str) -> list[UoraLayer]:
        """The layers holding `adapter_name`, in module order: row ℓ of `uora_reinit_counts[adapter_name]`."""
        cache = self.__dict__.setdefault("_uora_cache", {"layers": {}, "targets": {}})["layers"]
        if adapter_name not in cache:
            cache[adapter_name] = [
                m
                for m in self.model.modules()
                if isinstance(m, UoraLayer) and adapter_name in m.uora_lambda_d
            ]
        return cache[adapter_name]

    def reinit_targets(self, adapter_name: str, draw_index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Target pair (R_A, R_B), float32 on A's device, for draw `draw_index` of this adapter's stream.

        `fixed` mode always uses draw 0 (cached); `resample` uses draw k for its k-th check with events.
        Targets use the adapter's `projection_init`, so interpolated slots keep the scale of the others.
        """
        config: UoraConfig = self.peft_config[adapter_name]
        proj_a, proj_b = self.uora_A[adapter_name], self.uora_B[adapter_name]
        cache = self.__dict__.setdefault("_uora_cache", {"layers": {}, "targets": {}})["targets"]
        key = (draw_index, proj_a.device)
        if config.reinit_target == "fixed" and cache.get(adapter_name, (None,))[0] == key:
            return cache[adapter_name][1]
        target_a, target_b = init_projection_pair(
            config.r,
            proj_a.shape[1],
            proj_b.shape[0],
            derived_seed(config.reinit_seed, draw_index),
            config.projection_init,
        )
        pair = (target_a.to(proj_a.device), target_b.to(proj_a.device))
        if config.reinit_target == "fixed":
            cache[adapter_name] = (key, pair)
        return pair

    # ------------------------------------------------------------------ injection
    def inject_adapter(
        self,
        model: nn.Module,
        adapter_name: str,
        autocast_adapter_dtype: bool = True,
        low_cpu_mem_usage: bool = False,
        state_dict: dict[str, torch.Tensor] | None = None,
    ) -> None:
        """Create this adapter's projections, inject the layers, then create its re-init state.

        Overridden (rather than using the pre/post-injection hooks) because PEFT calls those hooks only
        for the first adapter, while `add_adapter`/`load_adapter` call `inject_adapter` directly.
        """
        config = self.peft_config[adapter_name]
        self._init_projections(config, adapter_name)
        try:
            super().inject_adapter(
                model,
                adapter_name,
                autocast_adapter_dtype=autocast_adapter_dtype,
                low_cpu_mem_usage=low_cpu_mem_usage,
                state_dict=state_dict,
            )
        except Exception:
            for attr in _SHARED_ATTRS:
                if adapter_name in getattr(self, attr):
                    del getattr(self, attr)[adapter_name]
            raise
        self._init_reinit_state(adapter_name)

    def _check_new_adapter_config(self, config: UoraConfig) -> None:
        super()._check_new_adapter_config(config)
        if not config.save_projection:
            raise ValueError(
                "UoraConfig.save_projection=False is not supported (re-initialisation changes A and B)"
            )

    def _create_and_replace(
        self,
        uora_config: UoraConfig,
        adapter_name: str,
        target: nn.Module,
        target_name: str,
        parent: nn.Module,
        current_key: str,
        **optional_kwargs: Any,
    ) -> None:
        if current_key is None:
            raise ValueError("Current Key shouldn't be `None`")
        r = uora_config.r
        kwargs = {
            "r": r,
            "loaded_in_8bit": getattr(self.model, "is_loaded_in_8bit", False),
            "loaded_in_4bit": getattr(self.model, "is_loaded_in_4bit", False),
            "bias": hasattr(target, "bias") and target.bias is not None,
        }
        kwargs.update(get_quantization_kwargs(self))
        if isinstance(target, Linear):
            target.update_layer(adapter_name, self.uora_A, self.uora_B, r, config=uora_config)
        else:
            new_module = self._create_new_module(
                uora_config, self.uora_A, self.uora_B, adapter_name, target, **kwargs
            )
            if adapter_name not in self.active_adapter:
                new_module.requires_grad_(False)
            self._replace_module(parent, target_name, new_module, target)

    @staticmethod
    def _create_new_module(
        uora_config: UoraConfig,
        uora_A: ProjectionDict,
        uora_B: ProjectionDict,
        adapter_name: str,
        target: nn.Module,
        **kwargs: Any,
    ) -> nn.Module:
        base = target.get_base_layer() if isinstance(target, BaseTunerLayer) else target
        layer_cls = _get_tuner_layer_class(base)
        if layer_cls is None:
            raise TypeError(
                f"Target module {target} is not supported by UORA. Only `torch.nn.Linear` (optionally "
                "quantised) and `transformers.pytorch_utils.Conv1D` are supported."
            )
        if isinstance(base, Conv1D):
            kwargs["is_target_conv_1d_layer"] = True
            if not uora_config.fan_in_fan_out:
                warnings.warn(
                    "fan_in_fan_out is set to False but the target module is `Conv1D`. "
                    "Setting fan_in_fan_out to True.",
                    stacklevel=2,
                )
                uora_config.fan_in_fan_out = True
        elif uora_config.fan_in_fan_out:
            warnings.warn(
                "fan_in_fan_out is set to True but the target module is `torch.nn.Linear`. "
                "Setting fan_in_fan_out to False.",
                stacklevel=2,
            )
            uora_config.fan_in_fan_out = False
        return layer_cls(target, uora_A, uora_B, adapter_name, config=uora_config, **kwargs)

    def delete_adapter(self, adapter_name: str) -> None:
        """Delete the adapter from every layer and drop its projections and re-init state."""
        super().delete_adapter(adapter_name)
        for attr in (*_SHARED_ATTRS, *_STATE_ATTRS):
            container = self._modules.get(attr)
            if container is not None and adapter_name in container:
                del container[adapter_name]
        self._invalidate_reinit_cache(adapter_name)

    # ------------------------------------------------------------------ state dict
    @classmethod
    def _get_adapter_state_dict(cls, model, config, adapter_name, state_dict, unwanted_adapter_names):
        to_return = super()._get_adapter_state_dict(
            model, config, adapter_name, state_dict, unwanted_adapter_names
        )
        # every layer references the shared containers, so the state dict repeats them per layer: keep only
        # the tuner-level entries ("base_model.uora_A.<adapter>", ...)
        shared = (*_SHARED_ATTRS, *_STATE_ATTRS)
        to_return = {k: v for k, v in to_return.items() if not any(f".{attr}." in k for attr in shared)}
        for attr in shared:
            key = f"base_model.{attr}.{adapter_name}"
            if key in state_dict:
                to_return[key] = state_dict[key]
            elif attr in _SHARED_ATTRS:
                raise ValueError(
                    f"UORA projection {key} is missing from the model state dict; cannot save the adapter"
                )
        return to_return

    @classmethod
    def _remap_adapter_state_dict_for_load(cls, model, config, adapter_name, state_dict):
        remapped = super()._remap_adapter_state_dict_for_load(model, config, adapter_name, state_dict)
        for attr in _SHARED_ATTRS:
            if (
                f"base_model.{attr}.{adapter_name}" not in remapped
                and f"{attr}.{adapter_name}" not in remapped
            ):
                raise ValueError(
                    f"The UORA checkpoint has no '{attr}' projection; UORA adapters must be saved with their "
                    "projections (they change during training)"
                )
        # invalidate caches: loading may have changed the layer set's state
        for module in model.modules():
            if isinstance(module, UoraModel):
                module._invalidate_reinit_cache(adapter_name)
        return remapped
