"""mole against the published code, side by side: each method's training step as a ratio to a peft LoRA
r=8 step, and its peak memory, for mole and for MoE-PEFT 2.0.2 and the ``mixlora`` package 0.2.3.

    make peers                                   # builds .venv-peers once, then runs this with ARGS
    python scripts/peers_bench.py --quick --rounds 10

mole runs in this process (the benchmark's CPU model and batch, ``mole/bench/variants.py``); the peers run
in ``scripts/peers_worker.py`` under ``.venv-peers/bin/python``, on the same random weights and batch
(handed over as safetensors). Both processes are single-threaded, time each step by their own CPU time,
keep freed heap memory (glibc, as ``mole.bench`` on the CPU), and give every variant torch's fused
AdamW. Rounds interleave the two processes (which goes first alternates); in a round each process steps
each of its variants once, in a shuffled order, its own peft LoRA r=8 baseline included. A ratio is the
median over rounds of (variant step / the same process's peft step in that round). Peak memory is one
account for all: ``peers_worker.step_memory``. See docs/speed.md, "Against the published code".
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parent))
from peers_worker import NAMES as PEER_NAMES  # noqa: E402
from peers_worker import step_memory  # noqa: E402

from mole.bench.measure import keep_freed_memory  # noqa: E402
from mole.bench.variants import BASELINE, E8, build_variant, compose, make_batch, make_setup  # noqa: E402
from mole.model.base import build_model  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
# LoRAMoE as MoE-PEFT builds it: the FFN's three linears routed over 8 soft experts, plain LoRA on attention
MOLE_EXTRA = {"loramoe_ffn_e8": ["method=lora", *E8, "router=soft", "loss=none",
                                 "experts.targets=[gate_proj,up_proj,down_proj]",
                                 "experts.single_targets=[q_proj,k_proj,v_proj,o_proj]"]}
MOLE_NAMES = [BASELINE, "lora_r8", "topk_e8", "soft_e8", "loramoe_ffn_e8", "mixlora"]
# (method, mole variant, MoE-PEFT variant, mixlora package variant)
PAIRS = [
    ("LoRA r=8, 7 linears (framework overhead)", "lora_r8", "moe_peft_lora", None),
    ("MoLA-style top-2 of 8, router on all 7 linears", "topk_e8", "moe_peft_mola", None),
    ("LoRAMoE soft 8, FFN routed, attention LoRA", "loramoe_ffn_e8", "moe_peft_loramoe", None),
    ("MixLoRA top-2 of 8 (FFN experts, attention LoRA)", "mixlora", "moe_peft_mixlora", "mixlora_package"),
]
# glibc's environment form of keep_freed_memory()'s mallopt settings, for the peers' process
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": str(32 << 20), "MALLOC_TRIM_THRESHOLD_": str(1 << 30)}


def dump_base(base, batch: dict, workdir: Path) -> None:
    """The base model's shape, weights and the batch, for the peers' process (its transformers is older)."""
    c = base.config
    rope = getattr(c, "rope_parameters", None) or {}
    shape = {"vocab_size": c.vocab_size, "hidden_size": c.hidden_size, "intermediate_size": c.intermediate_size,
             "num_hidden_layers": c.num_hidden_layers, "num_attention_heads": c.num_attention_heads,
             "num_key_value_heads": c.num_key_value_heads, "head_dim": getattr(c, "head_dim", None),
             "max_position_embeddings": c.max_position_embeddings, "rms_norm_eps": c.rms_norm_eps,
             "rope_theta": rope.get("rope_theta", getattr(c, "rope_theta", 10000.0)), "hidden_act": c.hidden_act,
             "tie_word_embeddings": bool(c.tie_word_embeddings), "attention_bias": bool(c.attention_bias),
             "mlp_bias": bool(getattr(c, "mlp_bias", False)), "pad_token_id": c.pad_token_id,
             "bos_token_id": c.bos_token_id, "eos_token_id": c.eos_token_id}
    if rope.get("rope_type", "default") != "default":
        raise SystemExit(f"peers_bench: rope_type {rope['rope_type']!r} is not handed to the peers")
    (workdir / "shape.json").write_text(json.dumps({k: v for k, v in shape.items() if v is not None}))
    state = {k: v.contiguous() for k, v in base.state_dict().items()
             if not (c.tie_word_embeddings and k == "lm_head.weight")}
    save_file(state, str(workdir / "weights.safetensors"))
    save_file({k: v.contiguous() for k, v in batch.items()}, str(workdir / "batch.safetensors"))


class Peers:
    """The peers' process: one JSON line each way per command."""

    def __init__(self, python: str, workdir: Path):
        env = {**os.environ, **MALLOC_ENV, "OMP_NUM_THREADS": "1", "PYTHONPATH": ""}
        self.proc = subprocess.Popen([python, str(ROOT / "scripts" / "peers_worker.py"), str(workdir)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)

    def ask(self, **msg) -> dict:
        self.proc.stdin.write(json.dumps(msg) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise SystemExit(f"peers_bench: the peers' process ended (status {self.proc.wait()}); its error is above")
        return json.loads(line)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.ask(cmd="quit")
        self.proc.wait(timeout=60)


def mole_round(variants: list, batch: dict, rng: random.Random) -> dict[str, float]:
    order = list(variants)
    rng.shuffle(order)
    times = {}
    for v in order:
        t0 = time.process_time()
        v.step(batch)
        times[v.name] = time.process_time() - t0
    return times


def median_ratios(rounds: list[dict[str, float]]) -> dict[str, float]:
    return {k: statistics.median(r[k] / r[BASELINE] for r in rounds) for k in rounds[0] if k != BASELINE}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(prog="python scripts/peers_bench.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="the benchmark's --quick shape: batch 2 x 128 (else 4 x 256)")
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2, help="steps per variant before timing")
    p.add_argument("--peers-python", default=str(ROOT / ".venv-peers" / "bin" / "python"),
                   help="the interpreter of the peers' venv (make peers builds .venv-peers)")
    p.add_argument("--no-peers", action="store_true", help="mole's side only (no peers' venv needed)")
    p.add_argument("--model-override", action="append", default=[], help="extra model.* override (tests: a tiny shape)")
    p.add_argument("--batch", type=int, default=None)
    p.add_argument("--seq", type=int, default=None)
    p.add_argument("--out", default="outputs/bench/peers.json")
    args = p.parse_args(argv)
    if args.rounds < 1 or args.warmup < 1:
        p.error("--rounds and --warmup must be at least 1")
    if not args.no_peers and not Path(args.peers_python).exists():
        p.error(f"--peers-python {args.peers_python} does not exist: run `make peers` first, or pass --no-peers")
    torch.set_num_threads(1)
    malloc = keep_freed_memory()
    setup = make_setup(argparse.Namespace(
        device="cpu", quick=args.quick, rounds=args.rounds, warmup=args.warmup, clock="cpu", compile=False,
        no_compile=True, compile_scope="layer", compile_backend="inductor", model_override=args.model_override,
        batch=args.batch, seq=args.seq))
    t_start = time.perf_counter()

    def log(msg: str) -> None:
        print(f"[{time.perf_counter() - t_start:6.1f}s] {msg}", file=sys.stderr, flush=True)

    cfg = compose(setup, ["method=lora"])
    torch.manual_seed(0)
    base, tokenizer = build_model(cfg.model, seed=0)
    base.requires_grad_(False)
    batch = make_batch(setup, base.config.vocab_size)
    frozen = [*base.parameters(), *base.buffers()]
    result: dict = {"command": "python scripts/peers_bench.py " + " ".join(argv if argv is not None else sys.argv[1:]),
                    "model": " ".join(setup.model_overrides), "batch": setup.batch, "seq": setup.seq,
                    "rounds": args.rounds, "warmup": args.warmup, "threads": 1, "clock": "process CPU time",
                    "allocator": malloc or "default", "loadavg": os.getloadavg()[0],
                    "versions": {"mole": {"torch": torch.__version__}}, "trainable": {}, "peak_memory_mb": {},
                    "warmup_losses": {}}
    mole_variants = []
    for name in MOLE_NAMES:
        v = build_variant(name, setup, base, tokenizer, MOLE_EXTRA.get(name))
        losses = [float(v.step(batch)) for _ in range(args.warmup)]
        trainable = [q for q in v.model.parameters() if q.requires_grad]
        peak = step_memory(frozen, trainable, lambda v=v: v.forward_loss(batch),
                           lambda v=v: v.optimizer.zero_grad(set_to_none=True))
        result["trainable"][name], result["peak_memory_mb"][name] = v.trainable, round(peak / 2**20, 1)
        result["warmup_losses"][name] = losses
        mole_variants.append(v)
        log(f"mole {name}: {v.trainable:,} trainable, {peak / 2**20:.0f} MB")
    peers = None
    with tempfile.TemporaryDirectory(prefix="mole-peers-") as tmp:
        if not args.no_peers:
            dump_base(base, batch, Path(tmp))
            peers = Peers(args.peers_python, Path(tmp))
            built = peers.ask(cmd="build", variants=PEER_NAMES, warmup=args.warmup)
            result["versions"]["peers"] = built["versions"]
            for name, info in built["variants"].items():
                key = name if name != BASELINE else "peers:" + BASELINE
                result["trainable"][key] = info["trainable"]
                result["peak_memory_mb"][key] = round(info["peak_bytes"] / 2**20, 1)
                result["warmup_losses"][key] = info["warmup_losses"]
                log(f"peers {name}: {info['trainable']:,} trainable, {info['peak_bytes'] / 2**20:.0f} MB")
        rng = random.Random(0)
        mole_rounds, peer_rounds = [], []
        try:
            for r in range(args.rounds):
                first_mole = r % 2 == 0
                if first_mole:
                    mole_rounds.append(mole_round(mole_variants, batch, rng))
                if peers is not None:
                    peer_rounds.append(peers.ask(cmd="round", seed=r)["times"])
                if not first_mole:
                    mole_rounds.append(mole_round(mole_variants, batch, rng))
                log(f"round {r + 1}/{args.rounds}: mole peft {mole_rounds[-1][BASELINE] * 1e3:.0f} ms"
                    + (f", peers' peft {peer_rounds[-1][BASELINE] * 1e3:.0f} ms" if peer_rounds else ""))
        finally:
            if peers is not None:
                peers.close()
    ratios = median_ratios(mole_rounds)
    step_ms = {k: round(statistics.median(r[k] for r in mole_rounds) * 1e3, 1) for k in mole_rounds[0]}
    if peer_rounds:
        ratios.update(median_ratios(peer_rounds))
        step_ms.update({("peers:" + k if k == BASELINE else k): round(statistics.median(r[k] for r in peer_rounds) * 1e3, 1)
                        for k in peer_rounds[0]})
    result["ratios_vs_peft_lora_r8"] = {k: round(v, 3) for k, v in ratios.items()}
    result["step_ms_median"] = step_ms
    result["pairs"] = [{"method": m, "mole": a, "moe_peft": b, "mixlora_package": c} for m, a, b, c in PAIRS]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print(markdown(result))
    return result


def markdown(result: dict) -> str:
    """The side-by-side table: per method, each framework's ratio to its peft step and its peak memory."""
    ratio, mem = result["ratios_vs_peft_lora_r8"], result["peak_memory_mb"]

    def cell(name: str | None) -> str:
        if name is None or name not in ratio:
            return " | "
        return f"{ratio[name]:.3f} | {mem[name]:.0f}"

    lines = ["| method | mole ratio | mole MB | MoE-PEFT ratio | MoE-PEFT MB | mixlora ratio | mixlora MB |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for pair in result["pairs"]:
        lines.append(f"| {pair['method']} | {cell(pair['mole'])} | {cell(pair['moe_peft'])} | "
                     f"{cell(pair['mixlora_package'])} |")
    peft_mb = [f"mole's process {mem[BASELINE]:.0f} MB, {result['step_ms_median'][BASELINE]:.0f} ms"]
    if "peers:" + BASELINE in mem:
        peft_mb.append(f"the peers' {mem['peers:' + BASELINE]:.0f} MB, {result['step_ms_median']['peers:' + BASELINE]:.0f} ms")
    lines.append(f"\npeft LoRA r=8 step (ratio 1): {'; '.join(peft_mb)}. soft_e8 (router on all 7 linears): "
                 f"{ratio['soft_e8']:.3f}, {mem['soft_e8']:.0f} MB.")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
