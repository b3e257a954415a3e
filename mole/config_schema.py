"""Types and ranges of the config's scalar keys, checked in one place before anything is built.

:data:`RULES` is a declarative table ``key -> Rule`` (type, range or choices, whether ``null`` is allowed);
:func:`validate_config` checks every key of it that the composed config has, in the table's order, and
raises a :class:`~mole.utils.errors.MoleConfigError` naming the key, what was expected and what it got.
Keys a group does not have (``router.q`` outside the Tsallis routers) are skipped. Relations between keys
(a top-k above the experts of a layer, a layout longer than the model) stay with the code that knows
both sides.

A table rather than OmegaConf structured configs: the ``router``, ``adapter`` and ``loss`` groups are
``_target_`` nodes whose keys depend on the class chosen, and the method presets override keys across
groups, so one dataclass per group would have to be a union of every option's keys. The table checks
the same types and ranges at the same time (right after composition, before any file or model is
touched) without changing how the YAML tree composes.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf, open_dict

from mole.config import CONF_DIR
from mole.utils.errors import MoleConfigError

_ABSENT = object()


@dataclass(frozen=True)
class Rule:
    """What one key may hold.

    ``kind``: ``int``, ``number`` (int or float, finite), ``bool``, ``choice`` (one of ``choices``) or
    ``int_list`` (a list of integers, each within the range). ``lo``/``hi`` bound the value (open when
    ``lo_open``/``hi_open``); ``nullable``: ``null`` is allowed; ``expected`` replaces the generated wording.
    ``default``: what the code does when a config lacks the key (one written before the key existed), so
    that such a config and one that sets this value describe the same run (:func:`absent_defaults`).
    """

    kind: str
    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False
    hi_open: bool = False
    choices: tuple[Any, ...] = ()
    nullable: bool = False
    expected: str = ""
    default: Any = _ABSENT

    def describe(self) -> str:
        if self.expected:
            text = self.expected
        elif self.kind == "bool":
            text = "true or false"
        elif self.kind == "choice":
            text = f"one of {list(self.choices)}"
        else:
            noun = {"int": "integer", "number": "number", "int_list": "list of integers"}[self.kind]
            text = f"{'an' if noun[0] in 'aeiou' else 'a'} {noun}"
            if self.lo == 0 and self.lo_open and self.hi is None:
                text = f"a positive {noun}" if self.kind != "int_list" else "a list of positive integers"
            elif self.lo == 1 and self.hi is None and self.kind != "number":
                text = f"a positive {noun}" if self.kind == "int" else "a list of positive integers"
            elif self.lo == 0 and self.hi is None:
                text = f"a non-negative {noun}"
            elif self.lo is not None or self.hi is not None:
                left = ("(" if self.lo_open else "[") + ("-inf" if self.lo is None else _num(self.lo))
                right = ("inf" if self.hi is None else _num(self.hi)) + (")" if self.hi_open else "]")
                text += f" in {left}, {right}"
        return f"null or {text}" if self.nullable else text

    def accepts(self, value: Any) -> bool:
        if value is None:
            return self.nullable
        if self.kind == "bool":
            return isinstance(value, bool)
        if self.kind == "choice":
            return value in self.choices
        if self.kind == "int_list":
            return isinstance(value, (list, tuple)) and bool(value) and all(self._in_range(v, True) for v in value)
        return self._in_range(value, self.kind == "int")

    def _in_range(self, value: Any, integer: bool) -> bool:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return False
        if integer and not isinstance(value, int):
            return False
        if not math.isfinite(value):
            return False
        if self.lo is not None and (value <= self.lo if self.lo_open else value < self.lo):
            return False
        return not (self.hi is not None and (value >= self.hi if self.hi_open else value > self.hi))


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else str(x)


POSITIVE_INT = Rule("int", lo=1)
NON_NEGATIVE_INT = Rule("int", lo=0)
POSITIVE = Rule("number", lo=0, lo_open=True)
NON_NEGATIVE = Rule("number", lo=0)
UNIT_OPEN_CLOSED = Rule("number", lo=0, hi=1, lo_open=True)  # (0, 1]
PROBABILITY_BELOW_ONE = Rule("number", lo=0, hi=1, hi_open=True)  # [0, 1)
EXPERT_COUNTS = Rule("int_list", lo=1, nullable=True,
                     expected="a list of positive integers (experts per group or per layer, e.g. [2,4,6,8])")

#: The table, in checking order: a key that others follow (``router.q``, which ``loss.tsallis.q`` interpolates)
#: comes before them, so an error names the key the user set.
RULES: dict[str, Rule] = {
    "seed": Rule("int", lo=0, hi=2**32 - 1),
    "force": Rule("bool"),
    # which method
    "experts.num_experts": Rule("int", lo=1, nullable=True),
    "experts.groups": EXPERT_COUNTS,
    "experts.per_layer": EXPERT_COUNTS,
    "adapter.rank": POSITIVE_INT,
    "adapter.alpha": POSITIVE,
    "adapter.dropout": PROBABILITY_BELOW_ONE,
    "router.top_k": Rule("int", lo=1, nullable=True),
    "router.main_top_k": Rule("int", lo=1, nullable=True),
    "router.n_routers": POSITIVE_INT,
    "router.top_p": UNIT_OPEN_CLOSED,
    "router.tau_max": Rule("number", lo=0, hi=1, lo_open=True, nullable=True),
    "router.q": Rule("number", lo=0, lo_open=True, expected="a positive number (the Tsallis entropic index)"),
    "router.selection.top_k": POSITIVE_INT,
    "router.selection.top_p": UNIT_OPEN_CLOSED,
    "router.selection.keep_top_k": POSITIVE_INT,
    "router.selection.q": Rule("number", lo=0, lo_open=True, expected="a positive number (the Tsallis entropic index)"),
    "router.selection.threshold": NON_NEGATIVE,
    "loss.balance.weight": NON_NEGATIVE,
    "loss.tsallis.q": Rule("number", lo=0, lo_open=True, expected="a positive number (the Tsallis entropic index)"),
    # what text
    "data.cutoff_len": Rule("int", lo=1, expected="a positive integer (tokens per example)"),
    "data.truncation": Rule("choice", choices=("prompt_left", "right", "drop"), default="prompt_left"),
    "data.val_size": Rule("number", lo=0, nullable=True,
                          expected="a fraction in [0, 1) or a whole number of records"),
    "data.max_records": Rule("int", lo=1, nullable=True),
    "data.split_seed": Rule("int", lo=0, hi=2**32 - 1, nullable=True),
    # how to optimise
    "trainer.max_steps": Rule("int", lo=0, nullable=True),
    "trainer.epochs": POSITIVE,
    "trainer.lr": POSITIVE,
    "trainer.batch_size": POSITIVE_INT,
    "trainer.grad_accum": POSITIVE_INT,
    "trainer.eval_batch_size": POSITIVE_INT,
    "trainer.eval_every": NON_NEGATIVE_INT,
    "trainer.log_every": POSITIVE_INT,
    "trainer.warmup_steps": NON_NEGATIVE_INT,
    "trainer.weight_decay": NON_NEGATIVE,
    "trainer.max_grad_norm": NON_NEGATIVE,
    "trainer.save_every": NON_NEGATIVE_INT,
    "trainer.keep_checkpoints": POSITIVE_INT,
    "trainer.resume": Rule("bool"),
    "trainer.label_smoothing": PROBABILITY_BELOW_ONE,
    "trainer.compile": Rule("choice", choices=("auto", True, False), expected="auto, true or false"),
    "trainer.compile_backend": Rule("choice", choices=("inductor", "aot_eager", "eager")),
}


#: Keys that moved to where they are read: ``old -> new``. The injector reads the router's placement and
#: level, so they sit with the experts layout; MoR/CRW's selection is a node of its own (conf/router/selection/).
MOVED_KEYS: dict[str, str] = {
    "router.placement": "experts.placement",
    "router.level": "experts.level",
    "router.select": "router/selection",
}
#: MoR/CRW's former flat selection keys, now under ``router.selection`` (other routers keep theirs flat).
SELECTION_KEYS = ("top_k", "renorm", "top_p", "keep_top_k", "q", "threshold", "normalized_entropy")
MOR_TARGETS = ("mole.routers.MoRRouter", "mole.routers.CRWRouter", "mole.routers.mor.MoRRouter",
               "mole.routers.mor.CRWRouter")


def moved_key_line(key: str, value: str | None) -> str | None:
    """The error line for an override of a key the config no longer has because it moved, else ``None``."""
    shown = "VALUE" if value is None else value
    if key == "router.select":
        return (f"router.select is now the config group router/selection (topk, soft, topp or dynamic): "
                f"use router/selection={shown}")
    if key in MOVED_KEYS:
        return f"{key} moved to {MOVED_KEYS[key]} (read by the injector, not the router): use {MOVED_KEYS[key]}={shown}"
    name = key.removeprefix("router.")
    if key.startswith("router.") and name in SELECTION_KEYS:
        return (f"{key}: the chosen router has no such key; router=mor and router=crw take their selection's keys "
                f"under router.selection (use router.selection.{name}={shown}, with router/selection=topk, soft, "
                "topp or dynamic)")
    return None


def upgrade_config(cfg: DictConfig) -> DictConfig:
    """A run config written before the moves of :data:`MOVED_KEYS`, in the current layout (in place).

    ``router.placement`` / ``router.level`` move to ``experts``; a MoR/CRW router's ``select`` and flat
    selection keys become its ``selection`` node with the values the old constructor used (``top_k: null``
    was soft routing; ``keep_top_k: null`` was 1 for top-p and 2 for the entropy-switched selection);
    ``model.source: smollm2`` is the GGUF source (:func:`current_model_node`).
    """
    if isinstance(cfg.get("model"), DictConfig) and cfg.model.get("source") == "smollm2":
        model = current_model_node(cfg.model)
        with open_dict(cfg):
            cfg.model = model
    router, experts = cfg.get("router"), cfg.get("experts")
    if not isinstance(router, DictConfig):
        return cfg
    with open_dict(cfg):
        for key in ("placement", "level"):
            if key in router:
                value = router.pop(key)
                if isinstance(experts, DictConfig) and key not in experts:
                    experts[key] = value
        if router.get("_target_") in MOR_TARGETS and "selection" not in router:
            old = {k: router.pop(k) for k in (*SELECTION_KEYS, "select") if k in router}
            select = old.get("select", "topk")
            if select == "topk" and old.get("top_k", 2) is None:
                select = "soft"
            node: dict[str, Any] = {"_target_": f"mole.routers.select.{_SELECTION_CLASSES.get(select, select)}",
                                    "_partial_": True}
            if select == "topk":
                node.update(top_k=old.get("top_k", 2), renorm=old.get("renorm", "sum"))
            elif select in ("topp", "dynamic"):
                keep = old.get("keep_top_k")
                node.update(top_p=old.get("top_p", 0.75), keep_top_k=(1 if select == "topp" else 2) if keep is None else keep)
                if select == "dynamic":
                    node.update(q=old.get("q", 1.1), threshold=old.get("threshold", 0.9),
                                normalized_entropy=old.get("normalized_entropy", True))
            router.selection = node
    return cfg


_SELECTION_CLASSES = {"topk": "TopK", "soft": "Soft", "topp": "TopP", "dynamic": "Dynamic"}


def absent_defaults() -> dict[str, Any]:
    """``{key: value}`` for the keys whose absence from a config means that value (:attr:`Rule.default`)."""
    return {key: rule.default for key, rule in RULES.items() if rule.default is not _ABSENT}


def _value(cfg: DictConfig, key: str) -> Any:
    try:
        value = OmegaConf.select(cfg, key, default=_ABSENT, throw_on_missing=False, throw_on_resolution_failure=False)
    except Exception:  # noqa: BLE001 - a key the config cannot resolve is reported where it is used
        return _ABSENT
    if isinstance(value, (DictConfig, ListConfig)):
        return OmegaConf.to_container(value, resolve=True)
    return value


def validate_config(cfg: DictConfig, rules: dict[str, Rule] | None = None) -> None:
    """Check the keys of :data:`RULES` that ``cfg`` has; the first bad one raises a MoleConfigError."""
    for old in MOVED_KEYS:  # set with a leading + on the command line
        if _value(cfg, old) is not _ABSENT:
            raise MoleConfigError(moved_key_line(old, None))
    for key, rule in (RULES if rules is None else rules).items():
        value = _value(cfg, key)
        if value is _ABSENT or (value == "???" and isinstance(value, str)):
            continue
        if not rule.accepts(value):
            raise MoleConfigError(f"{key} must be {rule.describe()}, got {value!r}")


#: The groups a run's ``config.yaml`` must hold for a command to rebuild its model.
RUN_CONFIG_KEYS = ("model", "adapter", "experts", "router", "data", "trainer", "eval")


def check_run_config(cfg: Any, path: Any) -> None:
    """A stored run config (``config.yaml``) is complete and its keys are in range; names the file otherwise."""
    if not isinstance(cfg, DictConfig):
        raise MoleConfigError(f"checkpoint: {path} is not a mole run config (expected a mapping of config groups)")
    missing = [k for k in RUN_CONFIG_KEYS if k not in cfg]
    if missing:
        raise MoleConfigError(f"checkpoint: {path} is incomplete (no {', '.join(missing)}): the file was cut short "
                              "or edited; restore it from the run's checkpoints/ or train the run again")
    try:
        validate_config(cfg)
    except MoleConfigError as err:
        raise MoleConfigError(f"checkpoint: {path}: {err}") from None


# ---------------------------------------------------------------------------------------------------
# run configs written by earlier layouts of the config tree


def current_model_node(model_cfg: DictConfig) -> DictConfig:
    """A ``model`` node in the current layout: ``source: smollm2`` (SmolLM2's own converter) is the general
    GGUF source with ``conf/model/smollm2_135m.yaml``'s file and cache."""
    if not isinstance(model_cfg, DictConfig) or model_cfg.get("source") != "smollm2":
        return model_cfg
    preset = OmegaConf.load(Path(CONF_DIR) / "model" / "smollm2_135m.yaml")
    node = model_cfg.copy()
    with open_dict(node):  # a composed config is in struct mode: these keys are new to it
        node.source, node.gguf, node.cache_name = "gguf", preset.gguf, preset.cache_name
    return node


def current_layout(cfg: DictConfig) -> DictConfig:
    """A copy of a stored run config in the current layout of the config tree (:func:`upgrade_config`), so
    that a run written before a key moved is still the same run: re-running, resuming and evaluating compare
    and build from this."""
    if not isinstance(cfg, DictConfig):
        return cfg
    return upgrade_config(copy.deepcopy(cfg))  # upgrade_config edits nested nodes, which copy() shares
