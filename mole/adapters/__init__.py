"""Expert kinds (adapters). Each is selected by a file in ``conf/adapter/`` naming it as ``_target_``.

Linear adapters (one expert set per adapted Linear): :class:`LoRAExperts`, :class:`HydraLoRAExperts`,
:class:`DoRAExpert`.
Block adapters (whole FFN / attention blocks, :mod:`mole.model.blocks`): :class:`ParallelAdapterExperts`,
:class:`PromptExperts`, :class:`FFNLoRAExperts` (MixLoRA). Whole-model baselines: :class:`FullFineTune`,
:class:`PromptTuning`. See :mod:`mole.adapters.kinds` for how they combine.
"""

from mole.adapters.baselines import FullFineTune, PromptTuning
from mole.adapters.dora import DoRAExpert
from mole.adapters.ffn import FFNLoRAExperts, MixLoRAFFN
from mole.adapters.hydra import HydraLoRAExperts
from mole.adapters.lora import LoRAExperts
from mole.adapters.parallel import ParallelAdapterExperts
from mole.adapters.prompt import PromptExperts

__all__ = [
    "DoRAExpert",
    "FFNLoRAExperts",
    "FullFineTune",
    "HydraLoRAExperts",
    "LoRAExperts",
    "MixLoRAFFN",
    "ParallelAdapterExperts",
    "PromptExperts",
    "PromptTuning",
]
