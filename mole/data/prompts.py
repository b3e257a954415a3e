"""Prompt templates.

``alpaca`` is the template LLM-Adapters (Hu et al., 2023) trains and evaluates with; its JSON files
(fields ``instruction``, ``input``, ``output``, ``answer``) are the format mole reads. This module holds
its only copy: the lm-eval tasks that mole renders (the shipped tasks and the paper benchmarks) get its
Jinja form from :func:`alpaca_jinja`, so the model is evaluated on the prompt it was trained on.

``chat`` is the tokenizer's own chat template (``tokenizer.apply_chat_template``): a record becomes one
user turn (instruction, then the input after a blank line) answered by one assistant turn; ``messages``
records (:func:`mole.data.sources.read_message_records`) are rendered as they are. Evaluation renders the
same user turn with the generation prompt, so the model is scored on the prompt it was trained on.
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
TEMPLATES = ("alpaca", "plain", "chat")
#: Where a generated Alpaca response ends: the model starts the next instruction block.
ALPACA_STOP = ("### Instruction:", "Below is an instruction")


def alpaca_jinja() -> str:
    """The Alpaca template as one Jinja template over a record (lm-eval's ``doc_to_text``).

    It renders what :func:`format_prompt` returns: the with-input form when the record has a non-empty
    ``input``, else the no-input form.
    """
    def jinja(template: str) -> str:
        return template.replace("{instruction}", "{{instruction}}").replace("{input}", "{{input}}")

    return (f"{{% if input is defined and input %}}{jinja(ALPACA_WITH_INPUT)}{{% else %}}{jinja(ALPACA_NO_INPUT)}"
            "{% endif %}")


def format_prompt(instruction: str, input: str = "", template: str = "alpaca") -> str:  # noqa: A002
    """The prompt part of a record (everything the model is conditioned on, not trained to produce)."""
    if template == "alpaca":
        if input:
            return ALPACA_WITH_INPUT.format(instruction=instruction, input=input)
        return ALPACA_NO_INPUT.format(instruction=instruction)
    if template == "plain":
        return f"{instruction}\n{input}\n" if input else f"{instruction}\n"
    if template == "chat":
        raise MoleConfigError("data.template=chat renders with the model's tokenizer (record_prompt), not format_prompt")
    raise MoleConfigError(f"data.template must be one of {list(TEMPLATES)}, got {template!r}")


def record_messages(record: dict[str, str]) -> list[dict[str, str]]:
    """An LLM-Adapters record as a chat: one user turn (instruction, input) and one assistant turn (output)."""
    user = f"{record['instruction']}\n\n{record['input']}" if record.get("input") else record["instruction"]
    return [{"role": "user", "content": user}, {"role": "assistant", "content": record.get("output", "")}]


def check_chat_template(tokenizer, key: str = "data.template") -> None:
    """``template=chat`` needs a tokenizer with a chat template: one line naming ``key`` otherwise."""
    if not getattr(tokenizer, "chat_template", None):
        raise MoleConfigError(f"{key}=chat: the model's tokenizer has no chat template; use alpaca or plain")


def chat_prompt(tokenizer, messages: list[dict[str, str]]) -> str:
    """The chat template's rendering of ``messages`` followed by the generation prompt (the assistant's cue)."""
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def record_prompt(record: dict[str, str], template: str = "alpaca", tokenizer=None) -> str:
    """The prompt of an LLM-Adapters record under ``template``, as training conditions on it."""
    if template == "chat":
        check_chat_template(tokenizer)
        return chat_prompt(tokenizer, record_messages(record)[:1])
    return format_prompt(record["instruction"], record.get("input", ""), template)


def record_question(record: dict) -> str:
    """The raw question of a record, without template or system prompt: an LLM-Adapters record's
    instruction (then its input after a blank line, as :func:`record_messages` writes the user turn); a
    ``messages`` record's first user turn. HMoRA's released code feeds this text alone to its task encoder
    (``router.task_encoder.input=raw``)."""
    if "messages" in record:
        return next((str(m.get("content", "")) for m in record["messages"] if m.get("role") == "user"), "")
    return record_messages(record)[0]["content"]
