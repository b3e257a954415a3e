"""HMoRA's hierarchical hybrid routing: a token router and a task router mixed per layer.

Source: Liao et al., "HMoRA: Making LLMs More Effective with Hierarchical Mixture of LoRA Experts"
(ICLR 2025), Sec. 3.2 eq. 6-8, Appendix A (eq. 14-16), Appendix B, Appendix E.3.

* Task representation (eq. 6): ``H_task = TaskEncoder(Embed(T^in) : e_task)`` at ``e_task``'s position.
  :class:`TaskEncoder` is a 1-layer ``torch.nn.TransformerEncoderLayer`` (width = the LLM's hidden
  size, 16 heads, FFN width 2x, Appendix E.3) over the frozen embeddings of the prompt tokens with a
  trainable ``e_task`` appended (initialised from the embedding of "?"). One encoder per model
  (``model.mole_task_encoder``); ``H_task`` is computed once per forward and shared by every task router.
* Hybrid gates (eq. 7): ``g = a_l g_task + (1 - a_l) g_token`` with
  ``a_l = sigmoid(-eps + 2 eps l / L + mu)`` (eq. 8). Where ``a_l < beta_low`` the layer has only a
  token router (``g = g_token``); where ``a_l > beta_high`` only a task router (``g = g_task``;
  Appendix B). The router that is not used is not built: it costs neither parameters nor time.

Decisions, marked NOTE(deviation) where the paper is silent or we differ:

* Layer index: ``l`` runs over ``0 .. L`` with ``L = num_layers - 1``. Appendix B: "as l increases from
  0 to L, a_l transitions from sigma(-eps + mu) to sigma(eps + mu)", and Table 5 lists six values
  ``a^(0) .. a^(5)`` for ``L = 5``. The trainable-parameter percentages of HMoRA Table 10 (every
  hierarchical row) and Table 12 (HMoRA w/o LW on Llama-3.2-1B, 6.61%) are reproduced only with this
  reading (0-based with ``L = num_layers`` or 1-based give other router counts).
* Top-k placement: each router is an ``f_R`` of Appendix A, so top-k with the second softmax (eq. 15)
  is applied to each router's distribution *before* mixing (eq. 7 mixes the routers' gate values);
  a layer with both routers may therefore activate up to ``2k`` experts per token. The authors' released
  code mixes the two dense distributions first and keeps the top k of the mixture (every token uses
  exactly k experts): ``topk_after_mix=True``.
* Reference-code options (defaults: the paper's): ``learn_a_l`` makes ``a_l``'s logit a trainable
  parameter initialised at eq. 8's value (released code; only where both routers exist), ``bias`` gives
  both routers a bias (released code: ``nn.Linear``'s default), ``task_encoder.positional: right_aligned``
  adds a sinusoidal positional encoding to the prompt tokens (below).
* The entropy losses (CGJS) see each router's dense softmax distribution (before top-k), exposed as
  ``GateDist(token probs, "token", "token")`` and ``GateDist(task probs, "task", "sequence")``.
* The task encoder has no positional encoding by default (a plain ``TransformerEncoderLayer``, as the
  paper's "as implemented in PyTorch"): its output at ``e_task`` depends on the set of prompt tokens.
  ``positional: right_aligned`` adds the Transformer's sinusoidal encoding (Vaswani et al. 2017, Sec. 3.5)
  to the prompt embeddings with positions counted back from the end of a table of
  ``MAX_POSITIONS`` = 5000: a sequence's last prompt token has position 4999, the one before 4998, ...;
  ``e_task`` gets none. This is the released code's encoding for left-padded input; NOTE(deviation): the
  released code aligns to the end of the padded batch, so under right padding its positions also shift
  with the padding; mole aligns each sequence on its own, so a sequence's representation does not depend
  on the batch it is in.
* Prompt tokens come from the model's :class:`~mole.routers.context.RoutingContext`: the training loop
  sets the prompt mask (tokens whose label is ignored). NOTE(deviation): without it (lm-eval's
  log-likelihood requests, where context and continuation arrive as one sequence) every real token
  counts as prompt, so the task router also reads the scored continuation.
* KV-cache generation: an incremental step (``context.incremental``) sees only the new tokens, so it
  reuses the task representation of the last full forward (kept detached on the encoder, ``(B, d)``).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mole.routers.base import (
    LAYER_INPUTS,
    BalanceStats,
    GateDist,
    ModelModule,
    RouterNeeds,
    RouterOutput,
    check_renorm,
    check_top_k,
    chosen_mask,
    keep_top_k,
    softmax_top_k,
)
from mole.routers.context import RoutingContext, install_context
from mole.routers.select import check_flag
from mole.utils.dropout import ExpertDropout
from mole.utils.errors import MoleConfigError

log = logging.getLogger(__name__)

TASK_ENCODER_ATTR = "mole_task_encoder"
POSITIONALS = ("none", "right_aligned")
INPUTS = ("templated", "raw")
MAX_POSITIONS = 5000  # the released code's positional table length; right-aligned positions end at 4999


def right_aligned_positions(mask: Tensor, max_len: int = MAX_POSITIONS) -> Tensor:
    """``(B, T)`` positions of the True entries of ``mask`` counted back from ``max_len - 1``.

    Every entry gets ``max_len - 1`` minus the number of True entries after it: the last True entry of a row
    gets ``max_len - 1``, the previous one ``max_len - 2``, and so on (False entries are never attended).
    """
    m = mask.long()
    after = m.flip(-1).cumsum(-1).flip(-1) - m  # (B, T) True entries strictly after each column
    return max_len - 1 - after


def sinusoidal_encoding(positions: Tensor, width: int) -> Tensor:
    """``(..., width)`` sinusoidal encoding of integer ``positions`` (Vaswani et al. 2017, Sec. 3.5), fp32.

    ``PE[pos, 2i] = sin(pos / 10000^(2i/d))``, ``PE[pos, 2i+1] = cos(pos / 10000^(2i/d))``, computed in
    fp32 in the same order of operations as the usual table (``exp(2i * -ln(10000) / d)``).
    """
    div = torch.exp(torch.arange(0, width, 2, device=positions.device).float() * (-math.log(10000.0) / width))
    angle = positions.float().unsqueeze(-1) * div  # (..., ceil(d/2))
    pe = torch.stack([angle.sin(), angle.cos()], dim=-1).flatten(-2)  # (..., 2 ceil(d/2)) interleaved
    return pe[..., :width]


def layer_logit(layer_idx: int, num_layers: int, eps: float, mu: float) -> float:
    """``-eps + 2 eps l / L + mu``, the argument of eq. 8's sigmoid; ``l`` in ``0 .. L = num_layers - 1``.

    A one-layer model (``L = 0``) takes ``l / L = 0``.
    """
    frac = layer_idx / (num_layers - 1) if num_layers > 1 else 0.0
    return -eps + 2.0 * eps * frac + mu


def layer_alpha(layer_idx: int, num_layers: int, eps: float, mu: float) -> float:
    """``a_l = sigmoid(-eps + 2 eps l / L + mu)`` (HMoRA eq. 8), ``l`` in ``0 .. L = num_layers - 1``."""
    return 1.0 / (1.0 + math.exp(-layer_logit(layer_idx, num_layers, eps, mu)))


class TaskEncoder(nn.Module):
    """``H_task = TaskEncoder(Embed(T^in) : e_task)`` at ``e_task``'s position (HMoRA eq. 6).

    Args:
        embedding: the LLM's (frozen) input embedding; held by reference, not as a submodule.
        context: the model's routing context (input ids, attention and prompt masks, per-forward cache).
        heads: attention heads (16 in HMoRA Appendix E.3); must divide the embedding width.
        ffn_mult: FFN width as a multiple of the model width (2 in HMoRA).
        dropout: dropout inside the encoder layer (PyTorch's default, 0.1, as the paper's setting).
        init_token_id: the token whose embedding initialises ``e_task`` ("?" in HMoRA).
        positional: ``"none"`` (the paper) or ``"right_aligned"`` (the released code; see the module notes).
        input: ``"templated"``: the prompt's tokens as the model reads them, template included (eq. 6's
            ``T^in``); ``"raw"``: the raw question alone, tokenised on its own (the released code; see the
            module notes).
    """

    def __init__(self, embedding: nn.Embedding, context: RoutingContext, *, heads: int = 16,
                 ffn_mult: float = 2, dropout: float = 0.1, init_token_id: int = 0, positional: str = "none",
                 input: str = "templated"):  # noqa: A002 - the config key's name
        super().__init__()
        width = int(embedding.weight.shape[1])
        if not isinstance(heads, int) or isinstance(heads, bool) or heads < 1 or width % heads:
            divisors = [h for h in range(1, min(width, 64) + 1) if width % h == 0]
            raise MoleConfigError(
                f"router.task_encoder.heads={heads!r} must be a positive integer dividing the model width "
                f"{width}; e.g. one of {divisors[-6:]}"
            )
        if not (isinstance(ffn_mult, (int, float)) and ffn_mult > 0):
            raise MoleConfigError(f"router.task_encoder.ffn_mult must be a positive number, got {ffn_mult!r}")
        if not (isinstance(dropout, (int, float)) and 0.0 <= dropout < 1.0):
            raise MoleConfigError(f"router.task_encoder.dropout must be in [0, 1), got {dropout!r}")
        if positional not in POSITIONALS:
            raise MoleConfigError(f"router.task_encoder.positional must be one of {list(POSITIONALS)}, got {positional!r}")
        if input not in INPUTS:
            raise MoleConfigError(f"router.task_encoder.input must be one of {list(INPUTS)}, got {input!r}")
        self.positional, self.input = positional, input
        self._warned_raw = False
        vocab = int(embedding.weight.shape[0])
        if not (0 <= init_token_id < vocab):
            raise MoleConfigError(f"router.task_encoder.init_token: token id {init_token_id} is outside the vocabulary ({vocab})")
        self.width, self.heads = width, heads
        self.layer = nn.TransformerEncoderLayer(
            width, heads, dim_feedforward=int(ffn_mult * width), dropout=dropout, batch_first=True
        )
        self.e_task = nn.Parameter(embedding.weight[init_token_id].detach().clone())  # (d,)
        object.__setattr__(self, "_embedding", embedding)  # frozen, owned by the LLM
        object.__setattr__(self, "_context", context)
        self._last: Tensor | None = None  # (B, d) detached, the last full forward's H_task (generation)
        self.users = 0  # task routers reading H_task (set while the model is built)
        object.__setattr__(self, "_routers", [])  # those routers (held by reference, not as submodules)
        # H_task is computed when the model's forward starts, before the first decoder layer: every task
        # router reads it, and it stays outside the layers' activation checkpoints (gradient checkpointing)
        # and so are the task routers' gates (task_outputs), computed together from it
        context.producers.append(lambda _ctx: self.task_outputs() if self.users else None)

    def select_inputs(self, input_ids: Tensor, prompt: Tensor,
                      task_inputs: tuple[Tensor, Tensor] | None) -> tuple[Tensor, Tensor]:
        """The ``(ids, mask)`` this encoder reads for a batch: the prompt's tokens (``templated``), or under
        ``raw`` each sequence's raw question (``task_inputs``). NOTE(deviation): a batch that carries no raw
        questions (interactive generation, a user task without LLM-Adapters fields) falls back to the prompt's
        tokens; this is logged once.

        Args:
            input_ids: ``(B, T)`` the model's input.
            prompt: ``(B, T)`` bool, the prompt's real tokens.
            task_inputs: ``(B, Q)`` question token ids and ``(B, Q)`` bool mask, or ``None``.
        """
        if self.input == "raw":
            if task_inputs is not None and task_inputs[0].shape[0] == input_ids.shape[0]:
                ids, mask = task_inputs
                return ids.to(input_ids.device), mask.to(input_ids.device).bool()
            if not self._warned_raw:
                self._warned_raw = True
                log.warning("router.task_encoder.input=raw: a batch without raw questions; the task encoder reads "
                            "the prompt's tokens instead (template included)")
        return input_ids, prompt

    def encode(self, input_ids: Tensor, prompt: Tensor) -> Tensor:
        """``H_task`` for a batch.

        Args:
            input_ids: ``(B, T)`` token ids.
            prompt: ``(B, T)`` bool, the prompt's real tokens.

        Returns:
            ``(B, d)``: the encoder's output at ``e_task``'s position.
        """
        prompt = prompt.bool()
        emb = self._embedding(input_ids).to(self.e_task.dtype)  # (B, T, d), frozen
        if self.positional == "right_aligned":
            pe = sinusoidal_encoding(right_aligned_positions(prompt), self.width)  # (B, T, d) fp32
            emb = emb + pe.to(emb.dtype)
        b = input_ids.shape[0]
        seq = torch.cat([emb, self.e_task.expand(b, 1, -1)], dim=1)  # (B, T+1, d): Embed(T^in) : e_task
        ignore = torch.cat([~prompt, prompt.new_zeros(b, 1)], dim=1)  # (B, T+1), True = not attended
        return self._last_position(seq, ignore)  # (B, d)

    def _last_position(self, seq: Tensor, ignore: Tensor) -> Tensor:
        """``self.layer(seq, src_key_padding_mask=ignore)[:, -1]``, computing only that position.

        A position's output in a Transformer encoder layer depends on its own query and on every
        attended key and value, so ``e_task``'s output needs the keys/values of all positions but the
        query, attention output, residuals, norms and FFN of ``e_task`` alone: the other positions'
        (discarded) outputs are never computed. Same parameters and the same operations as
        ``nn.TransformerEncoderLayer`` (post-norm by default, pre-norm if ``norm_first``); no host
        synchronisation (the prompt's span is not trimmed: masked keys weigh exactly 0).

        Args:
            seq: ``(B, T+1, d)``, ``e_task`` last.
            ignore: ``(B, T+1)`` bool, True for keys that are not attended.

        Returns:
            ``(B, d)``.
        """
        layer = self.layer
        q = seq[:, -1:]  # (B, 1, d)

        def ffn(z: Tensor) -> Tensor:
            return _dropout(layer.dropout2, layer.linear2(_dropout(layer.dropout, layer.activation(layer.linear1(z)))))

        if layer.norm_first:
            kv = layer.norm1(seq)
            att = self._attend_last(kv[:, -1:], kv, ignore)
            z = q + _dropout(layer.dropout1, att)
            z = z + ffn(layer.norm2(z))
        else:
            att = self._attend_last(q, seq, ignore)  # (B, 1, d)
            z = layer.norm1(q + _dropout(layer.dropout1, att))
            z = layer.norm2(z + ffn(z))
        return z[:, 0]

    def _attend_last(self, query: Tensor, kv: Tensor, ignore: Tensor) -> Tensor:
        """``self.layer.self_attn(query, kv, kv, key_padding_mask=ignore)`` for one query per sequence, with
        the key and value projections folded into the query side.

        ``nn.MultiheadAttention`` projects every position: ``k_j = W_k x_j + b_k``, ``v_j = W_v x_j + b_v``
        (two ``d x d`` products per token). For a single query per sequence both are linear maps that
        commute with the attention sums, so per head h (``q_h`` already scaled by ``1/sqrt(d_h)``):

            q_h . k_hj       = (W_kh^T q_h) . x_j + q_h . b_kh
            sum_j a_hj v_hj  = W_vh (sum_j a_hj x_j) + (sum_j a_hj) b_vh

        with ``a_h`` the (dropped-out, in training) attention weights. ``q_h . b_kh`` is the same for every
        key and cancels in the softmax, so it is left out (its gradient is 0 in ``nn.MultiheadAttention`` too). The same function of the same
        parameters — exact up to float rounding — at ``2 H d`` instead of ``2 d^2`` multiply-adds per
        prompt token (H = 16 heads: 72x fewer at d = 576). Gradients reach ``W_k`` and ``W_v`` through
        the folded products.

        Args:
            query: ``(B, 1, d)``, ``e_task``'s features.
            kv: ``(B, S, d)``, every position's features (``e_task`` last).
            ignore: ``(B, S)`` bool, True for keys that are not attended.

        Returns:
            ``(B, 1, d)``, the attention block's output (after ``out_proj``).
        """
        attn = self.layer.self_attn
        b, d, h = kv.shape[0], self.width, attn.num_heads
        hd = d // h
        w_q, w_k, w_v = attn.in_proj_weight.split(d)  # (d, d) each
        b_q, _b_k, b_v = (None, None, None) if attn.in_proj_bias is None else attn.in_proj_bias.split(d)
        q = F.linear(query[:, 0], w_q, b_q).view(b, h, hd) * hd**-0.5  # (B, H, d_h)
        q_x = torch.einsum("bhe,hed->bhd", q, w_k.view(h, hd, d))  # (B, H, d): W_kh^T q_h
        scores = torch.einsum("bhd,bsd->bhs", q_x, kv)  # (B, H, S)
        scores = scores.masked_fill(ignore[:, None, :], float("-inf"))
        a = _dropout_p(torch.softmax(scores, dim=-1), attn.dropout, attn.training)  # (B, H, S)
        ctx_x = torch.einsum("bhs,bsd->bhd", a, kv)  # (B, H, d): sum_j a_hj x_j
        out = torch.einsum("bhd,hed->bhe", ctx_x, w_v.view(h, hd, d))  # (B, H, d_h)
        if b_v is not None:
            out = out + a.sum(-1, keepdim=True) * b_v.view(h, hd)
        return attn.out_proj(out.reshape(b, 1, d))

    def representation(self) -> Tensor:
        """This forward's ``H_task`` ``(B, d)``: computed once, then served from the context's cache."""
        ctx = self._context
        key = (TASK_ENCODER_ATTR, id(self))
        hit = ctx.cache.get(key)
        if hit is not None:
            return hit
        if ctx.incremental:
            shape = ctx.batch_shape
            if self._last is None or shape is None or self._last.shape[0] != shape[0]:
                raise RuntimeError("hybrid routing: a cached generation step without the prompt's task representation")
            h = self._last
        else:
            if ctx.input_ids is None:
                raise RuntimeError("hybrid routing needs the model to be called with input_ids (task encoder input)")
            h = self.encode(*self.select_inputs(ctx.input_ids, ctx.prompt_tokens(), ctx.task_inputs))
            self._last = h.detach()
        ctx.cache[key] = h
        return h

    def add_router(self, router: HybridRouter) -> None:
        """Count ``router`` among the task routers reading ``H_task`` (its gates are computed with theirs)."""
        self.users += 1
        self._routers.append(router)

    def task_outputs(self, router: HybridRouter | None = None):
        """This forward's ``(p_task, g_task, s_task)`` of ``router`` (``(B, E)`` each; ``s_task`` ``None``
        without top-k), or of every task router (``router=None``: the producer run when the forward starts).

        Every task router reads the same ``H_task``, so the routers of one kind (same expert count, top-k,
        renormalisation, dropout, bias, dtype and device) are computed together in one set of operations
        (:func:`batched_task_gates`) instead of one per router; served from the context's cache afterwards.
        """
        ctx = self._context
        key = (TASK_ENCODER_ATTR, id(self), "gates")
        outs = ctx.cache.get(key)
        if outs is None:
            h = self.representation()
            groups: dict[tuple, list[HybridRouter]] = {}
            for r in self._routers:
                groups.setdefault(r.task_batch_key(), []).append(r)
            outs = {}
            for members in groups.values():
                outs.update(zip((id(r) for r in members), batched_task_gates(members, h), strict=True))
            ctx.cache[key] = outs
        return None if router is None else outs[id(router)]

    def extra_repr(self) -> str:
        return f"width={self.width}, heads={self.heads}"


def batched_task_gates(routers: Sequence[HybridRouter], h: Tensor) -> list[tuple[Tensor, Tensor, Tensor | None]]:
    """``(p_task, g_task, s_task)`` of R task routers of one kind (:meth:`HybridRouter.task_batch_key`) on
    ``H_task`` ``(B, d)``, computed together.

    Per router ``p = softmax(W_r dropout_r(H_task))`` (HMoRA eq. 14 on the task representation) and its
    top-k gates (eq. 15-16): the same functions as :meth:`HybridRouter.task_probs` and
    :meth:`HybridRouter._select` router by router, with the R weights stacked ``(R, E, d)``, one ``(R, B, d)``
    dropout draw (each router still gets a mask of its own), one ``bmm``, one softmax and one top-k over
    every router's rows. The outputs are ``unbind`` views: their backward is a single ``stack``.
    """
    first = routers[0]
    gate = first.task_gate
    r = len(routers)
    h = h.to(device=gate.weight.device, dtype=gate.weight.dtype)
    weight = gate.weight.unsqueeze(0) if r == 1 else torch.stack([m.task_gate.weight for m in routers])  # (R, E, d)
    x = h.unsqueeze(0).expand(r, -1, -1)  # (R, B, d)
    mask = first.dropout.mask(x) if isinstance(first.dropout, ExpertDropout) else None
    if mask is not None:
        x = x * mask  # an independent dropout mask for every router
    # W x^T (R, E, B), read transposed: the weights' gradient (grad z^T x) comes out (R, E, d) contiguous, so
    # each router's slice is its gradient as it is (x W^T would give transposed slices that autograd copies)
    if gate.bias is None:
        z = torch.bmm(weight, x.transpose(1, 2)).transpose(1, 2)  # (R, B, E)
    else:
        bias = gate.bias.view(1, -1, 1) if r == 1 else torch.stack([m.task_gate.bias for m in routers]).unsqueeze(-1)
        z = torch.baddbmm(bias, weight, x.transpose(1, 2)).transpose(1, 2)
    probs = torch.softmax(z.float(), dim=-1)  # (R, B, E)
    if first.task_selects:
        b, e = probs.shape[1:]
        gates, selected = keep_top_k(probs.view(r * b, e), first.top_k, first.renorm)  # eq. 15-16
        return list(zip(probs.unbind(0), gates.view(r, b, e).unbind(0), selected.view(r, b, e).unbind(0), strict=True))
    return [(p, p, None) for p in probs.unbind(0)]


def _dropout_p(x: Tensor, p: float, training: bool) -> Tensor:
    """``F.dropout(x, p, training)``; in eager mode on the CPU as ``torch.native_dropout``: the same distribution
    (a Bernoulli(1 - p) keep mask, kept values scaled by ``1 / (1 - p)``; the random draws differ) in one
    dispatched operation forward and one backward instead of ``F.dropout``'s three forward (the encoder's
    tensors are ``(B, 1, d)`` and ``(B, H, S)``: the draw's speed does not matter)."""
    if not training or p == 0.0 or x.device.type != "cpu" or torch.compiler.is_compiling():
        return F.dropout(x, p, training)
    return torch.native_dropout(x, p, True)[0]


def _dropout(module: nn.Dropout, x: Tensor) -> Tensor:
    """``module(x)`` for one of the encoder layer's ``nn.Dropout`` modules (:func:`_dropout_p`)."""
    return _dropout_p(x, module.p, module.training)


def task_token_id(tokenizer, token: str) -> int:
    """The id of ``token`` in ``tokenizer`` (a single token), for ``e_task``'s initialisation."""
    ids = tokenizer.encode(token, add_special_tokens=False)
    if len(ids) == 1:
        return int(ids[0])
    tid = tokenizer.convert_tokens_to_ids(token)
    if tid is None or (tokenizer.unk_token_id is not None and tid == tokenizer.unk_token_id):
        raise MoleConfigError(
            f"router.task_encoder.init_token={token!r} is not a single token of the tokenizer (encodes to {ids})"
        )
    return int(tid)


def build_task_encoder(model: nn.Module, node, tokenizer=None, dtype: torch.dtype | None = None) -> TaskEncoder:
    """The model's task encoder from ``router.task_encoder`` (registered by the builder as ``model.mole_task_encoder``).

    Args:
        model: the base model (its input embedding gives the width and ``e_task``'s initialisation).
        node: ``{heads, ffn_mult, dropout, init_token, positional, input}``.
        tokenizer: looks up ``init_token``'s id; ``None`` (meta-device counting) uses id 0.
        dtype: the encoder's dtype (``model.adapter_dtype``); ``None``: the embedding's.
    """
    node = dict(node or {})
    known = {"heads", "ffn_mult", "dropout", "init_token", "positional", "input"}
    unknown = sorted(set(node) - known)
    if unknown:
        raise MoleConfigError(f"router.task_encoder: unknown keys {unknown}; known keys are {sorted(known)}")
    token = node.pop("init_token", "?")
    token_id = 0 if tokenizer is None else task_token_id(tokenizer, str(token))
    embedding = model.get_input_embeddings()
    encoder = TaskEncoder(embedding, install_context(model), init_token_id=token_id, **node)
    encoder.to(device=embedding.weight.device, dtype=dtype or embedding.weight.dtype)
    return encoder


# one encoder per model, read by every task router; HMoRA Table 10's row eps=0, mu=-2 (a = 0.12 everywhere:
# token routing only) counts 5.04%, the trainable parameters without it: the builder drops it when unused
TASK_ENCODER = ModelModule(key="task_encoder", attr=TASK_ENCODER_ATTR, build=build_task_encoder)


def reads_raw_question(router_cfg) -> bool:
    """Whether the ``router`` config's task encoder reads the raw question (``task_encoder.input: raw``): the
    data then carries each example's question token ids."""
    encoder = (router_cfg or {}).get("task_encoder") or {}
    return encoder.get("input", "templated") == "raw"


class _DeferredOutput(RouterOutput):
    """A :class:`RouterOutput` whose ``probs`` and ``selected`` are computed on first read.

    A layer that mixes routers (eq. 7) or broadcasts task gates over tokens builds ``(N, E)`` mixed
    probabilities and kept masks that training never reads (the losses read ``balance`` and ``dists``, the
    layer only ``gates``); the routing analyses read them, and then get the same values.
    """

    def __init__(self, gates: Tensor, probs, selected, balance: list, dists: list):
        self.__dict__["_thunks"] = {"probs": probs, "selected": selected}
        super().__init__(gates=gates, probs=None, selected=None, balance=balance, dists=dists)

    def _read(self, name: str):
        value = self.__dict__.get("_" + name)
        thunk = self.__dict__["_thunks"].get(name)
        if value is None and thunk is not None:
            value = self.__dict__["_" + name] = thunk()
            self.__dict__["_thunks"][name] = None
        return value

    def _write(self, name: str, value) -> None:
        self.__dict__["_" + name] = value
        if value is not None:
            self.__dict__["_thunks"][name] = None

    probs = property(lambda self: self._read("probs"), lambda self, v: self._write("probs", v))
    selected = property(lambda self: self._read("selected"), lambda self, v: self._write("selected", v))


class HybridRouter(nn.Module):
    """Token router on ``x`` plus task router on ``H_task``, mixed by ``a_l`` (HMoRA eq. 7-8).

    Args:
        in_features: width of the token features the token router reads.
        num_experts: number of experts E.
        layer_idx: 0-based index of the decoder layer.
        num_layers: decoder layers of the model (``L = num_layers - 1``).
        context: the model's routing context (batch shape for broadcasting the task gates).
        task_encoder: the model's :class:`TaskEncoder` (held by reference); needed where a task router is built.
        eps, mu: eq. 8's hyperparameters (HMoRA Sec. 4.2: 4 and -2).
        beta_low, beta_high: below / above, only the token / the task router exists (0.2 / 0.8).
        top_k: experts kept per router (``None``: soft routing, eq. 14); top-2 in HMoRA Sec. 4.2.
        renorm: renormalisation of the kept probabilities, ``"softmax"`` (eq. 15) or ``"sum"``.
        dropout: dropout on both routers' inputs (HMoRA Appendix E.3).
        topk_after_mix: where both routers exist, mix their dense distributions first and keep the top k of
            the mixture (released code) instead of mixing each router's top-k gates (eq. 7 with eq. 15).
        learn_a_l: where both routers exist, ``a_l = sigmoid(theta_l)`` with ``theta_l`` a trainable
            parameter initialised at eq. 8's ``-eps + 2 eps l / L + mu`` (released code).
        bias: give both routers' Linears a bias (released code).
    """

    # a_l depends on the layer; the task router reads the model's one task encoder (router.task_encoder)
    needs = RouterNeeds(layer_inputs=LAYER_INPUTS, model_modules=(TASK_ENCODER,))

    def __init__(
        self,
        in_features: int,
        num_experts: int,
        layer_idx: int = 0,
        num_layers: int = 1,
        context: RoutingContext | None = None,
        task_encoder: TaskEncoder | None = None,
        eps: float = 4.0,
        mu: float = -2.0,
        beta_low: float = 0.2,
        beta_high: float = 0.8,
        top_k: int | None = 2,
        renorm: str = "softmax",
        dropout: float = 0.0,
        topk_after_mix: bool = False,
        learn_a_l: bool = False,
        bias: bool = False,
    ):
        super().__init__()
        for key, value in (("topk_after_mix", topk_after_mix), ("learn_a_l", learn_a_l), ("bias", bias)):
            check_flag(value, f"router.{key}")
        for key, value in (("eps", eps), ("mu", mu), ("beta_low", beta_low), ("beta_high", beta_high)):
            if not isinstance(value, (int, float)) or isinstance(value, bool):
                raise MoleConfigError(f"router.{key} must be a number, got {value!r}")
        if not 0.0 <= beta_low <= beta_high <= 1.0:
            raise MoleConfigError(f"router: need 0 <= beta_low <= beta_high <= 1, got beta_low={beta_low}, beta_high={beta_high}")
        check_top_k(top_k, num_experts)
        check_renorm(renorm)
        self.num_experts, self.top_k, self.renorm = num_experts, top_k, renorm
        self.layer_idx, self.topk_after_mix = layer_idx, topk_after_mix
        self.alpha = layer_alpha(layer_idx, num_layers, eps, mu)
        # a_l and 1 - a_l as tensors for the forward: a Python float would make torch.compile specialise each
        # layer's graph on its value (one graph per layer instead of one for all)
        self.register_buffer("mix", torch.tensor([self.alpha, 1.0 - self.alpha], dtype=torch.float32), persistent=False)
        self.dropout = ExpertDropout(dropout) if dropout > 0 else nn.Identity()
        use_token, use_task = self.alpha <= beta_high, self.alpha >= beta_low
        # a_l's logit, trained where both routers exist (the released code's nn.Parameter); None: fixed a_l
        self.a_logit = None
        if learn_a_l and use_token and use_task:
            self.a_logit = nn.Parameter(torch.tensor(layer_logit(layer_idx, num_layers, eps, mu), dtype=torch.float32))
        self.token_gate = nn.Linear(in_features, num_experts, bias=bias) if use_token else None
        self.task_gate = None
        if use_task:
            if task_encoder is None:
                raise MoleConfigError(
                    "router=hybrid: a layer with a task router needs the model's task encoder "
                    "(router.task_encoder must be set: it builds model.mole_task_encoder)"
                )
            self.task_gate = nn.Linear(task_encoder.width, num_experts, bias=bias)
            if hasattr(task_encoder, "add_router"):
                task_encoder.add_router(self)
            else:  # an encoder that only serves H_task (tests' stand-ins): the gates are computed here
                task_encoder.users += 1
        object.__setattr__(self, "_task_encoder", task_encoder)
        object.__setattr__(self, "_context", context)

    @property
    def kinds(self) -> list[str]:
        """Which routers this layer has: ``token``, ``task`` or both."""
        return [k for k, m in (("token", self.token_gate), ("task", self.task_gate)) if m is not None]

    def layer_info(self) -> dict:
        """For ``mole-params``: the layer's mixing weight (its current value when trained; eq. 8's on the meta
        device, where a parameter has no value) and routers."""
        learned = self.a_logit is not None and not self.a_logit.is_meta
        a = float(torch.sigmoid(self.a_logit.detach().float())) if learned else self.alpha
        return {"a_l": round(a, 4), "router_kinds": self.kinds}

    def _select(self, probs: Tensor) -> tuple[Tensor, Tensor | None]:
        if self.top_k is None:
            return probs, None
        return keep_top_k(probs, self.top_k, self.renorm)  # eq. 15-16

    def _per_token(self, n: int, rows: int) -> int:
        """How many token rows each sequence's task gates cover (``T``; 1 for pooled instance rows)."""
        if n == rows:
            return 1
        shape = None if self._context is None else self._context.batch_shape
        if shape is None or shape[0] != rows or shape[0] * shape[1] != n:
            raise RuntimeError(f"hybrid routing: {n} token rows do not match the batch of {rows} sequences")
        return shape[1]

    @property
    def task_selects(self) -> bool:
        """Whether the task router keeps its top k before mixing (eq. 15); not under ``topk_after_mix`` where
        both routers exist (the mixture's top k is kept), nor under soft routing."""
        mixed_topk = self.topk_after_mix and self.token_gate is not None and self.task_gate is not None
        return self.top_k is not None and not mixed_topk

    def task_batch_key(self) -> tuple:
        """Task routers with equal keys compute their gates together (:func:`batched_task_gates`)."""
        w = self.task_gate.weight
        return (w.device, w.dtype, tuple(w.shape), self.task_gate.bias is not None, self.task_selects,
                self.top_k, self.renorm, type(self.dropout), getattr(self.dropout, "p", 0.0), self.training)

    def _task_outputs(self, device: torch.device) -> tuple[Tensor, Tensor, Tensor | None]:
        """``(p_task, g_task, s_task)``: the task router's distribution, gates and kept mask (``None`` without
        top-k), computed with the model's other task routers by the task encoder where it does that."""
        encoder = self._task_encoder
        if hasattr(encoder, "task_outputs"):
            return encoder.task_outputs(self)
        p_task = self.task_probs(encoder.representation().to(device))
        if not self.task_selects:
            return p_task, p_task, None
        return (p_task, *self._select(p_task))

    def task_probs(self, h: Tensor) -> Tensor:
        """``(B, E)`` the task router's dense distribution for task representations ``h`` ``(B, d)``."""
        h = h.to(dtype=self.task_gate.weight.dtype)
        return torch.softmax(self.task_gate(self.dropout(h)).float(), dim=-1)

    def forward(self, x: Tensor) -> RouterOutput:
        n = x.shape[0]  # N = B * T tokens
        gates = probs = selected = index = None
        balance: list[BalanceStats] = []
        dists: list[GateDist] = []
        mixed_topk = self.topk_after_mix and self.top_k is not None and self.token_gate is not None and self.task_gate is not None
        # eager: the mixed probabilities and kept mask that only analyses read are computed when read
        deferred = not torch.compiler.is_compiling()
        lazy_probs = lazy_selected = None
        if self.token_gate is not None:
            z_tok = self.token_gate(self.dropout(x)).float()  # (N, E)
            if mixed_topk or self.top_k is None:
                p_tok = g_tok = torch.softmax(z_tok, dim=-1)  # (N, E), eq. 14
            else:  # eq. 14-16 in one function; the kept experts as an index (N, k), their mask built where read
                p_tok, g_tok, index = softmax_top_k(z_tok, self.top_k, self.renorm)
                balance.append(BalanceStats(p_tok, None, self.top_k, "token", index=index))
            dists.append(GateDist(p_tok, "token", "token"))
            gates, probs = g_tok, p_tok
        if self.task_gate is not None:
            p_task, g_task, s_task = self._task_outputs(x.device)  # (B, E) each; eq. 14-16
            dists.append(GateDist(p_task, "task", "sequence"))
            if s_task is not None:
                balance.append(BalanceStats(p_task, s_task, self.top_k, "sequence"))
            rows = p_task.shape[0]
            t = self._per_token(n, rows)
            if gates is None:  # a_l > beta_high: task routing only
                gates = g_task.repeat_interleave(t, dim=0)  # (N, E)
                if deferred:
                    lazy_probs = lambda: p_task.repeat_interleave(t, dim=0)  # noqa: E731
                    lazy_selected = None if s_task is None else (lambda: s_task.repeat_interleave(t, dim=0))
                else:
                    probs = p_task.repeat_interleave(t, dim=0)
                    selected = None if s_task is None else s_task.repeat_interleave(t, dim=0)
            else:  # eq. 7, each sequence's task row broadcast over its T token rows (no (N, E) copy of it)
                per_seq = lambda m: m.view(rows, t, -1)  # noqa: E731 - (N, E) -> (B, T, E)
                gates = self._mix(g_task.unsqueeze(1), per_seq(gates)).view(n, -1)
                tok_probs, tok_index = probs, index
                mix_probs = lambda: self._mix(p_task.unsqueeze(1), per_seq(tok_probs)).view(n, -1)  # noqa: E731
                mix_selected = None
                if tok_index is not None and s_task is not None:
                    mix_selected = lambda: (per_seq(chosen_mask(tok_index, p_tok)) | s_task.unsqueeze(1)).view(n, -1)  # noqa: E731
                if deferred and not mixed_topk:
                    lazy_probs, lazy_selected = mix_probs, mix_selected
                else:
                    probs = mix_probs()
                    selected = None if mix_selected is None else mix_selected()
                index = None
        if mixed_topk:
            # released code: top-k of the mixed distribution, kept values renormalised (softmax or sum); its
            # balance loss counts the mixture's choices against the token router's probabilities
            gates, selected = keep_top_k(probs, self.top_k, self.renorm)  # (N, E), (N, E)
            balance.append(BalanceStats(p_tok, selected, self.top_k, "token"))
        if lazy_probs is not None:
            return _DeferredOutput(gates, lazy_probs, lazy_selected, balance=balance, dists=dists)
        return RouterOutput(gates=gates, probs=probs, selected=selected, balance=balance, dists=dists, index=index)

    def _mix(self, task: Tensor, token: Tensor) -> Tensor:
        """``a_l task + (1 - a_l) token`` (eq. 7) as one ``lerp`` (``token + a_l (task - token)``)."""
        if self.a_logit is not None:
            return torch.lerp(token, task, torch.sigmoid(self.a_logit.float()))
        if torch.compiler.is_compiling():  # a tensor: one graph for every layer's a_l
            return torch.lerp(token, task, self.mix[0])
        return torch.lerp(token, task, self.alpha)  # eager: a Python weight, one operation in the backward fewer

    def extra_repr(self) -> str:
        extra = ", topk_after_mix" * self.topk_after_mix + ", learned a_l" * (self.a_logit is not None)
        return f"layer={self.layer_idx}, a_l={self.alpha:.4f}, routers={self.kinds}, top_k={self.top_k}{extra}"


def task_router_probs(model: nn.Module, batches: Sequence[tuple[Tensor, Tensor, tuple[Tensor, Tensor] | None]]) -> list[Tensor]:
    """Every task router's dense distribution over the sequences of several batches at once, from a fresh
    pass of the task encoder over all of them (the task-router loss once per optimizer step).

    HMoRA's released code computes the task routers' CGJS once per optimizer step: after the micro-batches'
    backward passes it encodes the questions of every accumulated sequence in one batch, runs each task
    router on them and backpropagates the loss of that pass into the task encoder and the task routers.
    This is that pass: the batches' encoder inputs (:meth:`TaskEncoder.select_inputs`) right-padded to one
    width and encoded together (a sequence's representation does not depend on its padding).

    Args:
        model: the model (possibly wrapped: DDP, ``torch.compile``); its task encoder and hybrid routers are
            found among its modules.
        batches: per micro-batch ``(input_ids (B, T), prompt (B, T) bool, raw-question inputs or None)``.

    Returns:
        One ``(sum B, E)`` distribution per task router (each router module once, shared routers included);
        empty without a task encoder or task routers.
    """
    modules = list(model.modules())
    encoder = next((m for m in modules if isinstance(m, TaskEncoder)), None)
    routers = [m for m in modules if isinstance(m, HybridRouter) and m.task_gate is not None]
    if encoder is None or not routers or not batches:
        return []
    inputs = [encoder.select_inputs(ids, prompt.bool(), task) for ids, prompt, task in batches]
    width = max(ids.shape[1] for ids, _ in inputs)
    ids = torch.cat([F.pad(i, (0, width - i.shape[1])) for i, _ in inputs])  # (sum B, width)
    mask = torch.cat([F.pad(m, (0, width - m.shape[1]), value=False) for _, m in inputs])  # (sum B, width)
    h = encoder.encode(ids, mask)  # (sum B, d)
    return [router.task_probs(h.to(router.task_gate.weight.device)) for router in routers]
