"""Fit an encoded example into ``data.cutoff_len`` tokens without silently losing the answer.

Every data format encodes a record into ``input_ids`` and ``labels`` (``-100`` on the tokens the model is
conditioned on, the token id on those it learns); :func:`truncate` is the one place an over-long example
is cut, whatever the format. ``data.truncation`` says how:

* ``prompt_left`` (default): cut the prompt from its left, after the first ``keep`` tokens (a BOS token).
  The learned tokens are never cut: an example whose learned part does not fit is dropped.
* ``right``: cut the end of the sequence, as LLM-Adapters (Hu et al., 2023) does; the answer may be cut
  short, and an example with no learned token left is dropped.
* ``drop``: drop every example longer than the cutoff.

:class:`TruncationStats` counts what happened, so the run can report it (log line and ``metrics.json``).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from mole.utils.errors import MoleConfigError

IGNORE_INDEX = -100
TRUNCATIONS = ("prompt_left", "right", "drop")
FIT, TRUNCATED, DROPPED = "fit", "truncated", "dropped"


def check_truncation(mode: object) -> str:
    if mode not in TRUNCATIONS:
        raise MoleConfigError(f"data.truncation must be one of {list(TRUNCATIONS)}, got {mode!r}")
    return str(mode)


def truncate(input_ids: list[int], labels: list[int], cutoff_len: int, mode: str = "prompt_left",
             keep: int = 0) -> tuple[list[int] | None, list[int] | None, str]:
    """``(input_ids, labels, status)`` of an example fitted into ``cutoff_len`` tokens.

    ``status`` is ``fit`` (unchanged), ``truncated`` or ``dropped`` (then the ids and labels are ``None``).
    ``keep``: leading tokens ``prompt_left`` never cuts (the tokenizer's BOS).
    """
    n = len(input_ids)
    if n <= cutoff_len:
        return input_ids, labels, FIT
    if mode == "drop":
        return None, None, DROPPED
    if mode == "right":
        ids, labs = input_ids[:cutoff_len], labels[:cutoff_len]
        if all(lab == IGNORE_INDEX for lab in labs):
            return None, None, DROPPED
        return ids, labs, TRUNCATED
    if mode != "prompt_left":
        check_truncation(mode)
    excess = n - cutoff_len
    first_learned = next((i for i, lab in enumerate(labels) if lab != IGNORE_INDEX), n)
    if first_learned - keep < excess:  # the learned part (with the kept tokens) is longer than the cutoff
        return None, None, DROPPED
    return (input_ids[:keep] + input_ids[keep + excess:], labels[:keep] + labels[keep + excess:], TRUNCATED)


@dataclass
class TruncationStats:
    """What fitting one split into the cutoff did to its records."""

    records: int = 0  # records encoded
    kept: int = 0  # examples trained / validated on
    truncated: int = 0  # kept, but cut to the cutoff
    dropped: int = 0  # longer than the cutoff and not cut (response too long, or data.truncation=drop)
    empty_output: int = 0  # kept, but the output is empty: only the end-of-sequence token is learned

    def add(self, status: str, empty_output: bool = False) -> None:
        self.records += 1
        if status == DROPPED:
            self.dropped += 1
            return
        self.kept += 1
        self.truncated += status == TRUNCATED
        self.empty_output += bool(empty_output)

    def as_dict(self) -> dict[str, int]:
        return asdict(self)

    def summary(self) -> str:
        parts = [f"{self.kept} of {self.records} kept"]
        if self.truncated:
            parts.append(f"{self.truncated} truncated")
        if self.dropped:
            parts.append(f"{self.dropped} dropped")
        if self.empty_output:
            parts.append(f"{self.empty_output} with an empty output")
        return ", ".join(parts)
