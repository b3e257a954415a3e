"""Expert kinds (adapters). Each is selected by a file in ``conf/adapter/`` naming it as ``_target_``."""

from mole.adapters.hydra import HydraLoRAExperts, hydra_reference_forward
from mole.adapters.lora import LoRAExperts, reference_forward

__all__ = ["HydraLoRAExperts", "LoRAExperts", "hydra_reference_forward", "reference_forward"]
