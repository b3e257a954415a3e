"""``mole-generate``: complete prompts with a trained run.

    mole-generate RUN_DIR prompt="What is 2 + 3?" prompt="Name a planet."
    mole-generate RUN_DIR 'prompts=["first, with a comma", second]'
    mole-generate RUN_DIR input=records.jsonl output=generations.jsonl
    mole-generate RUN_DIR chat=true
    mole-generate RUN_DIR prompt="..." sample=true temperature=0.7 top_p=0.9 top_k=50 seed=1 max_new_tokens=64
    mole-generate RUN_DIR prompt="..." 'stop=["\\n\\n", "###"]'

RUN_DIR (or checkpoint=RUN_DIR) is a run directory written by mole-train; its model is rebuilt as
mole-eval does. Each ``prompt=TEXT`` argument is one prompt, taken verbatim (no Hydra parsing: commas,
colons, quotes and brackets are part of the text); repeat it for several. ``prompts=[...]`` is the same
as a Hydra list. The other keys (conf/generate.yaml) use Hydra's syntax. Prompts are wrapped in the
run's own template (``template=none``: as typed); completions go to stdout, or with ``output=FILE.jsonl``
into that file (written whole, atomically; nothing else is written). ``input=FILE`` (.json or .jsonl:
LLM-Adapters records or {"prompt": ...}) needs ``output=``; a progress bar shows on stderr.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from omegaconf import OmegaConf
from omegaconf.errors import MissingMandatoryValue

from mole.cli.common import compose_from_argv, report_user_errors, run_main
from mole.run_dir import load_run_config
from mole.utils.errors import MoleConfigError

PROG = "mole-generate"
VERBATIM = "prompt="


def split_args(args: list[str]) -> tuple[list[str], list[str], str | None]:
    """``(Hydra overrides, verbatim prompts, positional run directory)``."""
    overrides, prompts, run_dir = [], [], None
    for i, arg in enumerate(args):
        if arg.startswith(VERBATIM):
            prompts.append(arg[len(VERBATIM):])
        elif i == 0 and "=" not in arg:
            run_dir = arg
        else:
            overrides.append(arg)
    return overrides, prompts, run_dir


@report_user_errors(PROG)
def run(args: list[str]) -> list[str] | None:


    from mole.generate import (
        GenerationSettings,
        generate_texts,
        load_run,
        read_prompt_records,
        record_prompt,
        render,
        resolve_device,
        run_template,
    )

    overrides, prompts, positional = split_args(args)
    cfg = compose_from_argv(overrides, "generate")
    if positional is not None:
        cfg.checkpoint = positional
    try:
        checkpoint = Path(cfg.checkpoint)
    except MissingMandatoryValue:
        raise MoleConfigError("a run directory is required: mole-generate RUN_DIR ... (or checkpoint=RUN_DIR)") from None
    listed = cfg.prompts
    listed = [listed] if isinstance(listed, str) else list(OmegaConf.to_container(listed) if listed is not None else [])
    if not all(isinstance(p, str) for p in listed):
        raise MoleConfigError(f"prompts must be a list of strings, got {listed!r}")
    prompts = [*prompts, *listed]
    chat = cfg.chat
    if not isinstance(chat, bool):
        raise MoleConfigError(f"chat must be true or false, got {chat!r}")
    sources = [name for name, used in (("prompt", prompts), ("input", cfg.input is not None), ("chat=true", chat)) if used]
    if len(sources) != 1:
        raise MoleConfigError("give exactly one of prompt=TEXT (repeatable) / prompts=[...], input=FILE, chat=true"
                              + (f"; got {' and '.join(sources)}" if sources else ""))
    output = None if cfg.output is None else Path(str(cfg.output)).expanduser()
    if cfg.input is not None and output is None:
        raise MoleConfigError("input=FILE needs output=FILE.jsonl (where the generations go)")
    if output is not None:
        if chat:
            raise MoleConfigError("output: chat=true answers on the terminal; drop output= or give prompts or input=")
        if output.suffix != ".jsonl":
            raise MoleConfigError(f"output={str(output)!r} must be a .jsonl file (one JSON record a line)")
        if output.is_dir() or not output.parent.is_dir():
            raise MoleConfigError(f"output={str(output)!r}: " + ("is a directory" if output.is_dir() else
                                  f"its folder {str(output.parent)!r} does not exist"))
        if cfg.input is not None and output.resolve() == Path(str(cfg.input)).expanduser().resolve():
            raise MoleConfigError(f"output={str(output)!r} is the input file; name another file")
    settings = GenerationSettings.from_config(cfg)
    resolve_device(str(cfg.device))
    # every check that needs no model comes first: a typo costs no model load
    run_cfg = load_run_config(checkpoint)
    template = run_template(run_cfg, cfg.template)
    records = read_prompt_records(cfg.input) if cfg.input is not None else None
    model, tokenizer, _ = load_run(checkpoint, str(cfg.device))

    if chat:
        return _chat(model, tokenizer, settings, template)
    if records is None:
        records = [{"prompt": render(p, "", template)} for p in prompts]
        shown = prompts
    else:
        shown = None
    texts = [record_prompt(r, template) for r in records]
    completions = generate_texts(model, tokenizer, texts, settings, progress=cfg.input is not None)
    if output is not None:
        lines = [json.dumps({**rec, "prompt": text, "generation": gen}, ensure_ascii=False)
                 for rec, text, gen in zip(records, texts, completions, strict=True)]
        tmp = output.with_name(output.name + ".tmp")
        tmp.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
        os.replace(tmp, output)
        print(f"{PROG}: {len(lines)} generations written to {output}", file=sys.stderr)
    else:
        for i, (prompt, gen) in enumerate(zip(shown, completions, strict=True)):
            if len(shown) > 1:
                print(f"### prompt {i + 1}: {prompt}")
            print(gen)
    return completions


def _chat(model, tokenizer, settings, template: str) -> list[str]:
    """One prompt a line from stdin, each answered on its own (the run was trained on single turns);
    an empty line is skipped, ``/quit`` or end of input ends the loop."""
    from mole.generate import generate_texts, render

    interactive = sys.stdin.isatty()
    if interactive:
        print("mole-generate chat: one prompt a line; /quit or Ctrl-D ends", file=sys.stderr)
    answers = []
    while True:
        try:
            line = input("> " if interactive else "")
        except EOFError:
            break
        if line.strip() == "/quit":
            break
        if not line.strip():
            continue
        answer = generate_texts(model, tokenizer, [render(line, "", template)], settings)[0]
        print(answer, flush=True)
        answers.append(answer)
    return answers


def main(argv: list[str] | None = None) -> None:
    run_main(__doc__, run, argv)


if __name__ == "__main__":
    main()
