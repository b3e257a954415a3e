#!/usr/bin/env python
"""Measure, on random router logits in float64, how far each paper rule is from the released code's rule.

    python scripts/reference_differences.py            # the figures of docs/reference-differences.md
    python scripts/reference_differences.py --tokens 512 --draws 50   # quicker, noisier
    python scripts/reference_differences.py --data /path/to/llm-adapters   # also the task-encoder input row

Every figure compares two settings of the same mole function (the released code's rule is a mole option,
tested against hand-computed values in tests/unit/routers/test_reference_options.py), on logits drawn i.i.d. from
N(0, s^2) with the scale s stated. Where the released code does something mole has no option for (the
1e-5 added inside DynMoLE's entropy), the script writes that rule out in a line. Deterministic: seed 0,
CPU, float64. Prints a Markdown table: difference, setting, figure.

``--data DIR`` (a folder of LLM-Adapters benchmark files, ``<name>/test.json``) adds the task encoder's input
(HMoRA: the templated prompt against the raw question), measured with the SmolLM2 tokenizer and embeddings
(the converted model under ``$MOLE_CACHE_DIR``, ``mole-train`` creates it) on real records.
"""

from __future__ import annotations

import argparse

import torch

from mole.losses import BalanceLoss, TsallisLoss, cgjs_loss
from mole.losses.routing import balance_losses
from mole.routers.base import BalanceStats, RouterOutput, keep_top_k
from mole.routers.context import RoutingContext
from mole.routers.hybrid import TaskEncoder
from mole.routers.select import dynamic_select, max_tsallis_entropy, tsallis_entropy

Row = tuple[str, str, str]


def _probs(gen: torch.Generator, rows: int, experts: int, scale: float) -> torch.Tensor:
    return torch.softmax(scale * torch.randn(rows, experts, generator=gen, dtype=torch.float64), dim=-1)


def _experts_per_row(gates: torch.Tensor) -> float:
    return float((gates > 0).sum(-1).double().mean())


def hmora_topk_placement(gen, tokens: int) -> list[Row]:
    """Top-2 per router then mixing (paper, eq. 7 + 15) against top-2 of the mixture (released code)."""
    rows = []
    seqs, e = 16, 8
    per_seq = max(tokens // seqs, 1)
    for a in (0.25, 0.5, 0.75):
        tok = _probs(gen, seqs * per_seq, e, 1.0)
        task = _probs(gen, seqs, e, 1.0).repeat_interleave(per_seq, dim=0)
        paper = a * keep_top_k(task, 2, "softmax")[0] + (1 - a) * keep_top_k(tok, 2, "softmax")[0]
        code = keep_top_k(a * task + (1 - a) * tok, 2, "softmax")[0]
        l1 = float((paper - code).abs().sum(-1).mean())
        rows.append(("HMoRA top-k placement", f"a_l={a}, E=8, k=2, s=1",
                     f"experts/token {_experts_per_row(paper):.2f} vs {_experts_per_row(code):.2f}; "
                     f"mean L1(gates) {l1:.3f}"))
    return rows


def hmora_cgjs_floor(gen, tokens: int) -> list[Row]:
    """CGJS with the mean entropy floored (eq. 11) against each row's entropy floored (released code)."""
    rows = []
    for gamma_b, gamma_c in ((1.0, 0.4), (0.98, 0.5)):
        worst, where = 0.0, None
        for s in (0.5, 1.0, 2.0, 3.0, 4.0, 6.0):
            p = _probs(gen, tokens, 8, s)
            d = float(cgjs_loss(p, gamma_b, gamma_c, "per_row") - cgjs_loss(p, gamma_b, gamma_c, "mean"))
            if abs(d) > abs(worst):
                worst, where = d, s
        rows.append(("HMoRA CGJS floor", f"gamma_b={gamma_b}, gamma_c={gamma_c}, E=8, s in 0.5..6",
                     f"largest per_row - mean: {worst:+.3f} (at s={where})"))
    return rows


def hmora_task_loss_per_step(gen, draws: int) -> list[Row]:
    """CGJS of the task router over 16 sequences at once (released code, ``loss.cgjs.task_scope=optimizer_step``,
    batch 8 x accumulation 2) against the mean of two 8-sequence micro-batch terms (``micro_batch``)."""
    diffs = []
    for _ in range(draws):
        p = _probs(gen, 16, 8, 1.0)
        once = cgjs_loss(p, 0.98, 0.5, "per_row")
        halves = (cgjs_loss(p[:8], 0.98, 0.5, "per_row") + cgjs_loss(p[8:], 0.98, 0.5, "per_row")) / 2
        diffs.append(float(once - halves))
    mean = sum(diffs) / len(diffs)
    return [("HMoRA task-router loss once per step", "16 sequences vs 2 x 8, E=8, s=1",
             f"mean difference of the term {mean:+.4f}; its weight relative to the LM loss x1/2 (accumulation 2)")]


def hmora_bias(gen, tokens: int) -> list[Row]:
    """Router with nn.Linear's default bias (released code) against no bias, at initialisation."""
    d, e = 1536, 8  # Qwen2-1.5B width
    lin = torch.nn.Linear(d, e, dtype=torch.float64)
    x = torch.randn(tokens, d, generator=gen, dtype=torch.float64)
    with torch.no_grad():
        with_b = torch.softmax(lin(x), -1)
        without = torch.softmax(x @ lin.weight.T, -1)
    l1 = float((with_b - without).abs().sum(-1).mean())
    return [("HMoRA router bias", "d=1536, E=8, default nn.Linear init, x ~ N(0, 1)",
             f"mean L1(probs) at initialisation {l1:.4f}")]


def hmora_positional(gen) -> list[Row]:
    """Task representation with and without the right-aligned sinusoidal encoding (same encoder weights)."""
    rows = []
    d, t = 256, 32
    for emb_std in (0.02, 1.0):
        torch.manual_seed(0)
        emb = torch.nn.Embedding(100, d, dtype=torch.float64)
        with torch.no_grad():
            emb.weight.normal_(0, emb_std, generator=gen)
        plain = TaskEncoder(emb, RoutingContext(), heads=16, dropout=0.0).double().eval()
        pos = TaskEncoder(emb, RoutingContext(), heads=16, dropout=0.0, positional="right_aligned").double().eval()
        pos.load_state_dict(plain.state_dict())
        ids = torch.randint(0, 100, (64, t), generator=gen)
        prompt = torch.ones(64, t, dtype=torch.bool)
        with torch.no_grad():
            a, b = plain.encode(ids, prompt), pos.encode(ids, prompt)
        rel = float(((a - b).norm(dim=-1) / a.norm(dim=-1)).mean())
        rows.append(("HMoRA task-encoder positions", f"d={d}, 32 prompt tokens, embeddings ~ N(0, {emb_std}^2)",
                     f"mean relative change of H_task {rel:.3f}"))
    return rows


def hmora_task_input(data_dir: str, per_set: int = 64) -> list[Row]:
    """The task encoder's input: the Alpaca-templated prompt (``router.task_encoder.input=templated``) against
    the raw question (``raw``, released code), on ``per_set`` test records of each benchmark in ``data_dir``.

    Token counts with the SmolLM2 tokenizer; and, for one freshly initialised task encoder (seed 0, no dropout)
    over SmolLM2's embeddings, the relative change of H_task and the mean cosine similarity of H_task between
    records of different benchmarks (how much the shared template makes different tasks look alike).
    """
    from pathlib import Path

    from safetensors import safe_open
    from transformers import AutoTokenizer

    from mole.config import compose_config
    from mole.data.collate import question_ids
    from mole.data.prompts import record_prompt
    from mole.data.sources import read_records
    from mole.model.gguf_file import cache_path

    cache = cache_path(compose_config(["model=smollm2_135m"]).model)
    tok = AutoTokenizer.from_pretrained(cache, local_files_only=True)
    with safe_open(str(cache / "model.safetensors"), "pt") as f:
        weight = f.get_tensor("model.embed_tokens.weight").double()
    emb = torch.nn.Embedding.from_pretrained(weight)
    torch.manual_seed(0)
    enc = TaskEncoder(emb, RoutingContext(), heads=16, dropout=0.0).double().eval()
    sets = sorted(p.parent.name for p in Path(data_dir).glob("*/test.json"))
    templated, raw, labels = [], [], []
    for k, name in enumerate(sets):
        for rec in read_records(str(Path(data_dir) / name / "test.json"), "data")[:per_set]:
            templated.append(tok(record_prompt(rec), add_special_tokens=True)["input_ids"])
            raw.append(question_ids(rec, tok, 10**6))
            labels.append(k)

    def encode(seqs: list[list[int]]) -> torch.Tensor:
        width = max(len(s) for s in seqs)
        ids = torch.zeros(len(seqs), width, dtype=torch.long)
        mask = torch.zeros(len(seqs), width, dtype=torch.bool)
        for i, s in enumerate(seqs):
            ids[i, : len(s)], mask[i, : len(s)] = torch.tensor(s), True
        with torch.no_grad():
            return torch.cat([enc.encode(ids[i:i + 64], mask[i:i + 64]) for i in range(0, len(seqs), 64)])

    h_t, h_r = encode(templated), encode(raw)
    lab = torch.tensor(labels)
    other = lab[:, None] != lab[None, :]

    def cross_cosine(h: torch.Tensor) -> float:
        u = torch.nn.functional.normalize(h, dim=-1)
        return float((u @ u.T)[other].mean())

    rel = float(((h_t - h_r).norm(dim=-1) / h_t.norm(dim=-1)).mean())
    n_t = sum(map(len, templated)) / len(templated)
    n_r = sum(map(len, raw)) / len(raw)
    setting = f"{len(sets)} benchmarks x {per_set} test records, SmolLM2 tokenizer and embeddings, d=576"
    return [("HMoRA task-encoder input", setting,
             f"tokens per input {n_t:.1f} templated vs {n_r:.1f} raw; mean relative change of H_task {rel:.3f}; "
             f"mean cosine of H_task across benchmarks {cross_cosine(h_t):.3f} templated vs {cross_cosine(h_r):.3f} raw")]


def dynmole_threshold(gen, tokens: int) -> list[Row]:
    """Share of tokens routed softly with the threshold on the raw (eq. 17) or the normalised entropy."""
    rows = []
    for q in (1.1, 2.0):
        for s in (0.5, 1.0, 2.0):
            p = _probs(gen, tokens, 6, s)
            raw = float((tsallis_entropy(p, q) > 0.9).double().mean())
            norm = float((tsallis_entropy(p, q) / max_tsallis_entropy(6, q) > 0.9).double().mean())
            rows.append(("DynMoLE entropy threshold", f"E=6, q={q}, threshold 0.9, s={s}",
                         f"soft tokens: raw {100 * raw:.0f}% vs normalised {100 * norm:.0f}%"))
    return rows


def dynmole_top_p(gen, tokens: int) -> list[Row]:
    """Top-p branch: keep or drop the crossing expert, renormalise or not (normalised threshold)."""
    rows = []
    for s in (1.0, 2.0):
        p = _probs(gen, tokens, 6, s)
        args = dict(q=1.1, threshold=0.9, top_p=0.75, keep_top_k=2, normalized=True)
        paper, _ = dynamic_select(p, **args)
        code, _ = dynamic_select(p, **args, keep_crossing=False, renormalize=False)
        dropped, _ = dynamic_select(p, **args, keep_crossing=False)
        rows.append(("DynMoLE top-p crossing expert", f"E=6, q=1.1, p=0.75, keep 2, s={s}",
                     f"experts/token {_experts_per_row(paper):.2f} (keep) vs {_experts_per_row(code):.2f} (drop)"))
        rows.append(("DynMoLE gate renormalisation", f"same, crossing expert dropped, s={s}",
                     f"mean L1(gates) renormalised vs not {float((dropped - code).abs().sum(-1).mean()):.3f}"))
    return rows


def dynmole_entropy_eps(gen, tokens: int) -> list[Row]:
    """The released entropy adds 1e-5 to each probability before S_q; mole does not."""
    p = _probs(gen, tokens, 6, 1.0)
    top = max_tsallis_entropy(6, 1.1)
    exact = tsallis_entropy(p, 1.1) / top
    shifted = ((1 - (p + 1e-5).pow(1.1).sum(-1)) / 0.1) / top
    flips = float(((exact > 0.9) != (shifted > 0.9)).double().mean())
    return [("DynMoLE entropy epsilon", "E=6, q=1.1, s=1",
             f"largest |normalised S_q difference| {float((exact - shifted).abs().max()):.1e}; "
             f"soft decisions changed {100 * flips:.2f}%")]


def _dynamic_outputs(gen, routers: int, tokens: int, keep_crossing: bool, renormalize: bool) -> list[RouterOutput]:
    outs = []
    for _ in range(routers):
        p = _probs(gen, tokens, 6, 1.0)
        g, sel = dynamic_select(p, 1.1, 0.9, 0.75, 2, True, keep_crossing, renormalize)
        outs.append(RouterOutput(gates=g, probs=p, selected=sel, balance=[BalanceStats(p, sel, None)]))
    return outs


def dynmole_losses(gen, tokens: int) -> list[Row]:
    """The auxiliary loss on 96 routers (Llama-2-7B: 32 layers x gate/up/down): mole's sums against the
    released code's pooled, normalised form with its coefficients."""
    outs = _dynamic_outputs(gen, 96, tokens, keep_crossing=False, renormalize=False)
    raw_sum = float(TsallisLoss(q=1.1)(outs))
    pooled = float(TsallisLoss(q=1.1, normalized=True, reduce="pooled")(outs))
    mole_bal = float(BalanceLoss(weight=0.01)(outs))
    code_bal = float(BalanceLoss(weight=0.001, reduce="pooled", load="mass")(outs))
    return [
        ("DynMoLE Tsallis loss aggregation", "R=96, E=6, q=1.1, s=1",
         f"raw sum {raw_sum:.1f} vs normalised pooled {pooled:.3f}: x{raw_sum / pooled:.0f} for the same beta"),
        ("DynMoLE balance loss", "R=96, E=6, s=1",
         f"weighted: mole 0.01 x sum (slots) {0.01 * mole_bal:.3f} vs code 0.001 x pooled (mass) {0.001 * code_bal:.5f}"),
    ]


def mola_balance(gen, tokens: int) -> list[Row]:
    """MoLA on Llama-2-7B (32 layers x 7 routers, 2-4-6-8, top-2): mole's balance term against the released
    code's per-layer pooled term (off by default in its fine-tuning script)."""
    layout = [2] * 8 + [4] * 8 + [6] * 8 + [8] * 8
    summed, per_layer = 0.0, 0.0
    for e in layout:
        probs = torch.stack([_probs(gen, tokens, e, 1.0) for _ in range(7)])  # (7, N, E)
        sel = keep_top_k(probs.reshape(-1, e), 2, "sum")[1].reshape(probs.shape)
        summed += float(balance_losses(probs, sel, 2).sum())
        per_layer += float(balance_losses(probs.reshape(-1, e), sel.reshape(-1, e), 2))
    return [("MoLA balance loss", "224 routers, 2-4-6-8, top-2, s=1",
             f"weighted: mole 0.01 x sum over routers {0.01 * summed:.3f} vs code 0.001 x sum over layers of "
             f"the layer's pooled term {0.001 * per_layer:.4f} (0 in its default script)")]


def measure(tokens: int = 4096, draws: int = 200, seed: int = 0) -> list[Row]:
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    return [
        *hmora_topk_placement(gen, tokens),
        *hmora_cgjs_floor(gen, tokens),
        *hmora_task_loss_per_step(gen, draws),
        *hmora_bias(gen, tokens),
        *hmora_positional(gen),
        *dynmole_threshold(gen, tokens),
        *dynmole_top_p(gen, tokens),
        *dynmole_entropy_eps(gen, tokens),
        *dynmole_losses(gen, max(tokens // 8, 1)),
        *mola_balance(gen, max(tokens // 8, 1)),
    ]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, default=4096, help="token rows per measurement (default 4096)")
    parser.add_argument("--draws", type=int, default=200, help="random draws for averaged figures (default 200)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--data", help="a folder of LLM-Adapters benchmarks (<name>/test.json): adds the task-encoder input row")
    args = parser.parse_args(argv)
    print("| difference | setting | measured |")
    print("|---|---|---|")
    rows = measure(args.tokens, args.draws, args.seed) + (hmora_task_input(args.data) if args.data else [])
    for name, setting, figure in rows:
        print(f"| {name} | {setting} | {figure} |")


if __name__ == "__main__":
    main()
