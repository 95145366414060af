"""UORA (Uniform Orthogonal Reinitialization Adaptation) as a PEFT method.

`import uora` registers the method with PEFT (adding `PeftType.UORA`), after which `UoraConfig` works
with `get_peft_model`, `PeftModel.from_pretrained`, `AutoPeftModel*.from_pretrained` and the rest of
PEFT's API. Re-initialisation runs through `UoraReinitCallback` (HF Trainer) or `reinit_step(model)`
(custom loops, after each optimizer step).
"""

from ._registry import UORA_PEFT_TYPE, register
from .callbacks import UoraReinitCallback
from .config import UoraConfig
from .layer import Linear, UoraLayer
from .model import UoraModel
from .reinit import reinit_step, sync_projections_from_rank0, total_reinit_events

register(UoraConfig, UoraModel)

__all__ = [
    "UORA_PEFT_TYPE",
    "Linear",
    "UoraConfig",
    "UoraLayer",
    "UoraModel",
    "UoraReinitCallback",
    "reinit_step",
    "sync_projections_from_rank0",
    "total_reinit_events",
]
