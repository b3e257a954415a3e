"""A tokenizer made in-process, for the tiny test models (no download, no shipped tokenizer files).

A byte-level BPE: the 256-byte alphabet (so any text round-trips losslessly) plus merges learned, in a
fraction of a second, from the text of mole's shipped fixtures and its prompt template, and three special
tokens. Training is deterministic for a fixed corpus, so every process builds the same vocabulary.
"""

from __future__ import annotations

import json
from functools import lru_cache

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from mole.data.prompts import ALPACA_NO_INPUT, ALPACA_WITH_INPUT
from mole.data.sources import FIXTURES_DIR

SPECIAL_TOKENS = {"pad_token": "<|pad|>", "bos_token": "<|bos|>", "eos_token": "<|eos|>"}
VOCAB_SIZE = 1024
#: A ChatML-style chat template over the special tokens, so that ``data.template=chat`` runs on the tiny models.
CHAT_TEMPLATE = (
    "{% for m in messages %}{{ '<|bos|>' + m['role'] + '\\n' + m['content'] + '<|eos|>' + '\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|bos|>assistant\\n' }}{% endif %}"
)


def _corpus() -> list[str]:
    texts = [ALPACA_NO_INPUT, ALPACA_WITH_INPUT]
    for path in sorted(FIXTURES_DIR.glob("*.json")):
        for rec in json.loads(path.read_text(encoding="utf-8")):
            texts.extend(str(rec.get(k, "")) for k in ("instruction", "input", "output"))
    return texts


@lru_cache(maxsize=1)
def _tokenizer_json() -> str:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=list(SPECIAL_TOKENS.values()),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(), trainer=trainer)
    return tok.to_str()


def byte_tokenizer() -> PreTrainedTokenizerFast:
    """A fresh copy of the in-process byte-level BPE tokenizer (at most 1024 tokens)."""
    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(_tokenizer_json()), **SPECIAL_TOKENS)
    tok.padding_side = "right"
    tok.chat_template = CHAT_TEMPLATE
    return tok
