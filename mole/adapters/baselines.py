"""Whole-model baselines of the MoR tables (SPEC §1): full fine-tuning and prompt tuning.

Both are "model" adapter kinds: built once for the whole model (``model=...``), not per Linear or block.

* :class:`FullFineTune` — every base parameter trains. The checkpoint (``adapter.safetensors``) then holds
  the whole model: each parameter once, so tied input/output embeddings are saved under one name (the
  input embedding) and restored into the shared tensor (safetensors refuses two names for one storage).
  Size: 4 bytes x parameters in fp32 (tiny_llama: about 0.2 MB; Llama-2-7B in bf16: about 13.5 GB).
* :class:`PromptTuning` (Lester et al. 2021, arXiv:2104.08691): P learnable virtual-token embeddings are
  prepended to the embedded input; only they train. The model keeps the contract
  ``model(input_ids, attention_mask).logits`` of shape ``(B, T, V)`` — the logits of the virtual
  positions are dropped — so the loss code and lm-eval see the input's length. A fresh prompt-tuned
  model does NOT equal the base model: the real tokens attend to the virtual ones from the start.

Own implementation rather than peft's ``PromptTuningConfig``: peft's model returns logits of length
``P + T`` and wraps the model in its own class, which breaks the ``(B, T, V)`` contract of the loss,
the training loop and the lm-eval wrapper.
"""

from __future__ import annotations

import inspect

import torch
from torch import Tensor, nn

from mole.model.inject import mark_trainable
from mole.model.state import FULL_FINETUNE_ATTR
from mole.routers.context import is_incremental
from mole.utils.errors import MoleConfigError

INITS = ("vocab", "normal")


class FullFineTune:
    """Full fine-tuning: mark every parameter of ``model`` trainable (and saved)."""

    adapter_kind = "model"  # the contract: mole.adapters.kinds.ModelAdapter
    reads_base_weights = True  # it trains them
    saves_everything = True

    def __init__(self, model: nn.Module):
        for p in model.parameters():
            p.requires_grad_(True)


def mark_saves_everything(model: nn.Module) -> None:
    """Record on ``model`` that its checkpoint holds every parameter (a model adapter's ``saves_everything``)."""
    object.__setattr__(model, FULL_FINETUNE_ATTR, True)


class PromptTuning(nn.Module):
    """P virtual-token embeddings prepended to the input of a causal LM (registered as ``model.mole_prompt_tuning``).

    Args:
        model: a Hugging Face causal LM (modified in place: two forward hooks).
        num_virtual_tokens: P (Lester et al. sweep 1-150; MoR does not state its value).
        init: ``vocab`` (embeddings of P random vocabulary tokens, Lester et al.'s "sampled vocab") or
            ``normal`` (N(0, std of the embedding table)).

    With a cache (generation), the virtual tokens are prepended on the first forward only; later steps
    get the attention mask (and explicit position ids) extended by P so they line up with the cache.
    """

    adapter_kind = "model"  # the contract: mole.adapters.kinds.ModelAdapter
    reads_base_weights = False
    saves_everything = False

    def __init__(self, model: nn.Module, num_virtual_tokens: int = 20, init: str = "vocab"):
        super().__init__()
        if not isinstance(num_virtual_tokens, int) or isinstance(num_virtual_tokens, bool) or num_virtual_tokens < 1:
            raise MoleConfigError(f"adapter.num_virtual_tokens must be a positive integer, got {num_virtual_tokens!r}")
        if init not in INITS:
            raise MoleConfigError(f"adapter.init must be one of {list(INITS)}, got {init!r}")
        table = model.get_input_embeddings().weight  # (V, d)
        self.num_virtual_tokens = num_virtual_tokens
        with torch.no_grad():
            if init == "vocab":
                ids = torch.randint(0, table.shape[0], (num_virtual_tokens,), device=table.device)
                start = table[ids].clone()
            else:
                start = torch.randn(num_virtual_tokens, table.shape[1], device=table.device, dtype=table.dtype) * table.std()
        self.embedding = nn.Parameter(start)  # (P, d)
        self._names = list(inspect.signature(model.forward).parameters)
        self._prepended = False
        self._real_length = 0
        model.mole_prompt_tuning = self

        mark_trainable(model)  # only the virtual tokens (a ``mole_`` parameter) train
        model.register_forward_pre_hook(self._prepend, with_kwargs=True, prepend=True)
        model.register_forward_hook(self._drop_virtual, with_kwargs=True)

    def _prepend(self, model: nn.Module, args: tuple, kwargs: dict):
        kwargs = {**dict(zip(self._names, args, strict=False)), **kwargs}  # positional arguments by name
        p = self.num_virtual_tokens
        embeds = kwargs.get("inputs_embeds")
        if embeds is None:
            embeds = model.get_input_embeddings()(kwargs["input_ids"])  # (B, T, d)
        b = embeds.shape[0]
        incremental = is_incremental(kwargs)
        if not incremental:
            embeds = torch.cat([self.embedding.to(embeds.dtype).unsqueeze(0).expand(b, -1, -1), embeds], dim=1)
        mask = kwargs.get("attention_mask")
        if isinstance(mask, Tensor) and mask.dim() == 2:
            kwargs["attention_mask"] = torch.cat([mask.new_ones(b, p), mask], dim=1)  # (B, P + T)
        pos = kwargs.get("position_ids")
        if isinstance(pos, Tensor):
            shifted = pos + p
            if not incremental:
                virtual = torch.arange(p, device=pos.device, dtype=pos.dtype).expand(pos.shape[0], p)
                shifted = torch.cat([virtual, shifted], dim=1)
            kwargs["position_ids"] = shifted
        labels = kwargs.get("labels")
        if isinstance(labels, Tensor) and not incremental:
            kwargs["labels"] = torch.cat([labels.new_full((b, p), -100), labels], dim=1)
        # the real tokens' count: the logits keep at most that many positions (the last ones)
        self._real_length = embeds.shape[1] - (0 if incremental else p)
        kwargs["input_ids"], kwargs["inputs_embeds"] = None, embeds
        self._prepended = not incremental
        return (), kwargs

    def _drop_virtual(self, model: nn.Module, args: tuple, kwargs: dict, output):
        logits = getattr(output, "logits", None)
        if self._prepended and logits is not None and logits.shape[1] > self._real_length:
            # (B, T, V): the input's length. With logits_to_keep (generation) fewer positions come back,
            # all of them real tokens, and nothing is dropped.
            output.logits = logits[:, -self._real_length :]
        self._prepended = False
        return output

    def extra_repr(self) -> str:
        return f"virtual_tokens={self.num_virtual_tokens}, d={self.embedding.shape[1]}"
