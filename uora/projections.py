"""`ProjectionDict`: the container of the shared projections — float32 masters, cached compute copies.

A and B are moved by re-initialisation many times over a run, and each move is an interpolation
``α·A + (1 − α)·R`` that must not be rounded: rounded to bfloat16 (8 bits of mantissa), the rows
drift away from unit norm and orthogonality a little more with every event, and the adapter saved at
the end would hold bf16 projections. So the masters stay float32 whatever happens to the model:

- whole-model casts (``model.to(torch.bfloat16)``, ``model.half()``, an engine that casts the module
  through ``nn.Module._apply``) move them to the new device but never change their dtype;
- anything assigned or loaded into the dict (a bf16 checkpoint, ``load_state_dict(assign=True)``) is
  stored as float32 (an exact upcast: what was rounded before stays rounded, nothing more is lost).

Layers whose trainable vectors are in another dtype (TRL casts the trainable parameters of 8-bit models
to bf16, DeepSpeed's bf16 engine casts every parameter) compute with a copy in that dtype: one per
(adapter, dtype, device), shared by all layers, made on first use and remade only after the master
changed (its tensor ``_version`` moves on every in-place write: re-initialisation, ``copy_``, loading;
replacing, moving or loading a master drops every copy). A copy is never written in place, so a
forward recomputed under gradient checkpointing, or one whose graph still holds the old copy, sees
exactly the projections of its step. Cost: one extra copy of A and B in the compute dtype (Llama-2-7B
at r=1024: A and B are ~45 MB each in float32, ~22 MB each in bf16).
"""

from __future__ import annotations

import weakref
from typing import Any

import torch
from peft.tuners._buffer_dict import BufferDict

MASTER_DTYPE = torch.float32


class ProjectionDict(BufferDict):
    """A persistent `BufferDict` whose floating-point buffers always stay float32 (see the module doc)."""

    def __init__(self) -> None:
        super().__init__({}, persistent=True)
        self._copies: dict[tuple[str, torch.dtype, torch.device], tuple[Any, int, torch.Tensor]] = {}

    def __setitem__(self, key: str, buffer: torch.Tensor) -> None:
        super().__setitem__(key, _as_master(buffer))
        self.drop_copies()

    def __delitem__(self, key: str) -> None:
        super().__delitem__(key)
        self.drop_copies()

    def drop_copies(self) -> None:
        """Forget every compute copy (after a write the version counter might not see)."""
        self._copies.clear()

    def compute(self, key: str, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """Master `key` in `dtype` on `device`: the master itself when it already is, else the cached copy."""
        master = self._buffers[key]
        device = torch.device(device)
        if master.dtype == dtype and master.device == device:
            return master
        if master.is_inference():  # loaded under inference_mode: no version counter to check a copy by
            return master.to(device=device, dtype=dtype)
        slot = (key, dtype, device)
        cached = self._copies.get(slot)
        if cached is not None and cached[0]() is master and cached[1] == master._version:
            return cached[2]
        with torch.inference_mode(False):  # made during generation, still usable by a training step
            copy = master.detach().to(device=device, dtype=dtype, copy=True)
        self._copies[slot] = (weakref.ref(master), master._version, copy)
        return copy

    def _apply(self, fn: Any, recurse: bool = True) -> ProjectionDict:
        """Apply a module-wide conversion, except that a float32 master only follows the device.

        The conversion's target is found by applying it to an empty tensor of the buffer's dtype and
        device, so a master is never passed through a dtype change (never rounded, even transiently).
        """
        for key, buffer in self._buffers.items():
            if buffer is None:
                continue
            target = fn(torch.empty(0, dtype=buffer.dtype, device=buffer.device))
            if buffer.dtype == MASTER_DTYPE and target.dtype != MASTER_DTYPE:
                self._buffers[key] = buffer.to(device=target.device)
            else:
                self._buffers[key] = fn(buffer)
        self.drop_copies()
        return self

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any, **kw: Any) -> None:
        # load_state_dict hands modules a copy of the dict, so upcasting entries here is local to this load
        for key in self._buffers:
            if prefix + key in state_dict:
                state_dict[prefix + key] = _as_master(state_dict[prefix + key])
        super()._load_from_state_dict(state_dict, prefix, *args, **kw)
        self.drop_copies()

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_copies"] = {}  # weak references do not pickle; copies are remade on first use
        return state


def _as_master(tensor: torch.Tensor) -> torch.Tensor:
    if tensor.is_floating_point() and tensor.dtype != MASTER_DTYPE:
        return tensor.to(MASTER_DTYPE)
    return tensor
