"""Prompt templates.

``alpaca`` is the template LLM-Adapters (Hu et al., 2023) trains and evaluates with; its JSON files
(fields ``instruction``, ``input``, ``output``, ``answer``) are the format mole reads. The shipped
lm-eval tasks (``mole/eval/tasks/``) use the same text, so the model is evaluated on the prompt it was
trained on.
"""

from __future__ import annotations

from mole.utils.errors import MoleConfigError

ALPACA_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the "
    "request.\n\n### Instruction:\n{instruction}\n\n### Response:\n"
)
ALPACA_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n### Instruction:\n{instruction}\n\n"
    "### Input:\n{input}\n\n### Response:\n"
)
TEMPLATES = ("alpaca", "plain")


def format_prompt(instruction: str, input: str = "", template: str = "alpaca") -> str:  # noqa: A002
    """The prompt part of a record (everything the model is conditioned on, not trained to produce)."""
    if template == "alpaca":
        if input:
            return ALPACA_WITH_INPUT.format(instruction=instruction, input=input)
        return ALPACA_NO_INPUT.format(instruction=instruction)
    if template == "plain":
        return f"{instruction}\n{input}\n" if input else f"{instruction}\n"
    raise MoleConfigError(f"data.template must be one of {list(TEMPLATES)}, got {template!r}")
