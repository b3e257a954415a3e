"""Training-step speed of every MoLE method against a ``peft`` LoRA r=8 step on the same model.

    make bench ARGS=--quick               # CPU, small Llama, < 5 min on 2 cores
    python -m mole.bench --threads 1      # single-threaded (steadier on a shared machine)
    python -m mole.bench --device cuda    # GPU: 1B-class Llama shape, bf16 autocast, torch.compile, CUDA events

What it does (docs/speed.md):

* builds ONE random base model (CPU: a small Llama from ``conf/model/tiny_llama.yaml`` widened; GPU: the
  shape of ``conf/model/llama3_2_1b.yaml``, random weights, bf16), and makes each variant from a copy of
  it (the module tree copied, the frozen weights shared) through mole's own config composition and
  :func:`mole.build.inject_from_config` — the presets of ``conf/method/`` exactly as
  ``mole-train method=...`` builds them, aux losses included;
* times full training steps (forward, LM loss + auxiliary routing losses, backward, AdamW step; every
  variant, the peft baseline included, with the AdamW that mole's trainer builds: fused where possible)
  round-robin — every round runs one step of every variant, in a shuffled order — after warm-up, and
  reports the median over rounds of the per-round ratio ``t(variant) / t(peft LoRA r=8)``, so slow drifts
  of a shared machine cancel out;
* the per-expert Python-loop references (:mod:`mole.bench.loops`; ``loop_soft``: every expert over every
  token; ``loop_topk``: each expert over the tokens routed to it, gathered, as published MoLE code does) are the
  soft / top-2 MoLE models with their experts' forward swapped for the loop; both draw one dropout mask
  per layer, as mole does. ``loop_soft_loramoe`` is ``loop_soft`` in the form of LoRAMoE's released code,
  where every expert draws its own mask with torch's dropout (CPU default; on a GPU only when named in
  ``--variants``: eight saved dropped-out inputs per Linear instead of one add tens of GB to ``loop_soft``'s
  61 GB at the GPU batch);
* peak memory per variant: on CUDA ``torch.cuda.max_memory_allocated`` over one step; on the CPU an
  account of one step: parameters and buffers + gradients and two AdamW moments of the trainable
  parameters + every tensor autograd saves for backward (unique storages, parameters excluded);
* ``mole-eval`` log-likelihood throughput (:func:`mole.eval.harness.evaluate_model`, what ``mole-eval``
  and ``mole-train`` call) against plain lm-eval (``HFLM`` + ``simple_evaluate``) on the bare base model,
  same shipped fixture tasks, alternating runs.

Writes ``<out>/latest.json`` and ``<out>/latest.md`` (default ``outputs/bench/``).

Modules: :mod:`~mole.bench.variants` (what is timed), :mod:`~mole.bench.loops` (the per-expert loops),
:mod:`~mole.bench.compiling`, :mod:`~mole.bench.measure` (time, memory, op counts),
:mod:`~mole.bench.eval_speed`, :mod:`~mole.bench.report`, :mod:`~mole.bench.cli` (the command line);
:mod:`~mole.bench.gpu_check` runs the benchmark and the GPU tests on one GPU in a time box.
"""
