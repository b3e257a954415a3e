"""Expert kinds (adapters). Each is selected by a file in ``conf/adapter/`` naming it as ``_target_``."""

from mole.adapters.lora import LoRAExperts, reference_forward

__all__ = ["LoRAExperts", "reference_forward"]
