"""HMoRA's Constrained Generalized Jensen-Shannon auxiliary loss (HMoRA Sec. 3.3, eq. 9-13).

For one router's N gate distributions ``g^(1..N)`` over e experts, with H the Shannon entropy (eq. 9):

    balance   = H(mean_n g^(n))                                   (near log e: balanced selection)
    certainty = mean_n H(g^(n))                                   (near 0: decisive routing)
    CGJS      = min(balance, gamma_b log e) - max(certainty, gamma_c log e)          eq. 11
    L_aux     = max((gamma_b - gamma_c) log e - CGJS, 0) / log e                     eq. 12

applied separately to every token router and every task router, summed over routers and weighted by
lambda (eq. 13). Defaults gamma_b = 1, gamma_c = 0.4, lambda = 0.003 (HMoRA Sec. 4.1).

NOTE(deviation): with top-k routing the loss acts on each router's dense softmax distribution before
top-k (:meth:`RouterOutput.distributions`). The renormalised top-2 gates have entropy at most log 2,
below gamma_c log 8 for gamma_c >= 0.34, which would leave the certainty term without gradient; HMoRA
Table 9 and Fig. 5 show gamma_c changing top-2 routing's certainty, which only the dense form can do.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from mole.losses.routing import AuxTerm, check_reduce, reduce_over_routers, row_weights, sum_over_groups
from mole.routers.base import GateDist, RouterOutput
from mole.routers.hybrid import task_router_probs
from mole.routers.select import _TINY, shannon_entropy
from mole.utils.errors import MoleConfigError

FLOORS = ("mean", "per_row")
TASK_SCOPES = ("micro_batch", "optimizer_step")


def cgjs_loss(probs: Tensor, gamma_b: float = 1.0, gamma_c: float = 0.4, floor: str = "mean") -> Tensor:
    """``L_aux`` of one router's gate distributions (HMoRA eq. 10-12).

    Args:
        probs: ``(N, E)`` gate distributions, rows summing to 1 (padding rows already removed).
        gamma_b: balance cap, in [0, 1].
        gamma_c: certainty floor, in [0, 1].
        floor: ``"mean"``: floor the mean entropy, ``max(mean_n H(g_n), gamma_c log E)`` (eq. 11);
            ``"per_row"``: floor each row's entropy, then average, ``mean_n max(H(g_n), gamma_c log E)``
            (HMoRA's released code).

    Returns:
        A scalar in ``[0, 1]``; 0 for fewer than two experts or no rows.
    """
    return cgjs_losses(probs.unsqueeze(0), None, gamma_b, gamma_c, floor)[0]


def cgjs_losses(
    probs: Tensor, row_weight: Tensor | None = None, gamma_b: float = 1.0, gamma_c: float = 0.4, floor: str = "mean"
) -> Tensor:
    """:func:`cgjs_loss` of R routers at once, padding rows weighted out instead of removed.

    The same values and gradients as ``[cgjs_loss(p[row_weight.bool()], ...) for p in probs]``, in one
    set of operations for all R routers, and without boolean indexing (which waits for the host to learn
    how many rows are real).

    Args:
        probs: ``(R, N, E)`` R routers' gate distributions over the same N rows.
        row_weight: ``(N,)`` 1 for real rows, 0 for padding; ``None``: every row is real.
        gamma_b, gamma_c, floor: as :func:`cgjs_loss`.

    Returns:
        ``(R,)`` losses; 0 for fewer than two experts or no real row.
    """
    r, n, e = probs.shape
    p = probs.float()
    if n == 0 or e < 2:
        return p.sum(dim=(1, 2)) * 0.0
    if torch.compiler.is_compiling() or not p.requires_grad:
        return cgjs_losses_reference(p, row_weight, gamma_b, gamma_c, floor)
    # eager: one autograd function whose backward is a handful of operations (the reference's is ~50)
    return _CGJS.apply(p, row_weight, float(gamma_b), float(gamma_c), floor == "per_row")


def cgjs_losses_reference(
    probs: Tensor, row_weight: Tensor | None = None, gamma_b: float = 1.0, gamma_c: float = 0.4, floor: str = "mean"
) -> Tensor:
    """:func:`cgjs_losses` written with autograd's operations (compiled code, no gradient, and the reference
    of the eager path :class:`_CGJS`); ``probs`` ``(R, N, E)`` with ``N > 0`` and ``E >= 2``."""
    p = probs.float()
    log_e = math.log(p.shape[-1])
    entropy = shannon_entropy(p)  # (R, N)
    if floor == "per_row":  # released code: each row's entropy floored before the mean
        entropy = torch.clamp(entropy, min=gamma_c * log_e)
    if row_weight is None:
        mean_g, certainty = p.mean(dim=1), entropy.mean(dim=1)  # (R, E), (R,)
        real = None
    else:
        w = row_weight.to(device=p.device, dtype=p.dtype)  # (N,)
        count = w.sum()
        real = count > 0
        denom = count.clamp_min(1.0)
        mean_g = (p * w[:, None]).sum(dim=1) / denom  # (R, E): mean over real rows
        certainty = (entropy * w).sum(dim=1) / denom  # (R,)
    balance = shannon_entropy(mean_g)  # (R,): H(mean g) and `certainty` mean H(g) are eq. 10's two terms
    cgjs = torch.clamp(balance, max=gamma_b * log_e) - torch.clamp(certainty, min=gamma_c * log_e)  # eq. 11
    loss = torch.clamp((gamma_b - gamma_c) * log_e - cgjs, min=0.0) / log_e  # eq. 12
    return loss if real is None else loss * real.to(loss.dtype)


class _CGJS(torch.autograd.Function):
    """:func:`cgjs_losses_reference`'s ``(R,)`` losses (HMoRA eq. 9-12) with the gradient written out.

    With ``w_n`` the row weights over their sum (``1/N`` without weights), ``m = sum_n w_n p_n``, the balance
    ``B = H(m)``, the certainty ``C = sum_n w_n H(p_n)`` (``H(p_n)`` floored per row under ``per_row``), and
    ``L = max(s, 0) / log E``, ``s = (gamma_b - gamma_c) log E - min(B, gamma_b log E) + max(C, gamma_c log E)``:

        dL/dp_ne = w_n (k_b (log m_e + 1) - k_c (log p_ne + 1)),   dH(p)/dp = -(log p + 1)

    with ``k_b = 1[s >= 0] 1[B <= gamma_b log E] / log E`` and ``k_c = 1[s >= 0] 1[C >= gamma_c log E] / log E``
    (times ``1[H(p_n) >= gamma_c log E]`` per row under ``per_row``): the subgradients ``torch.clamp`` takes at
    its bounds, so the gradient equals autograd's through the reference. ``log`` of ``p`` clamped at 1e-30 as
    :func:`mole.routers.select.shannon_entropy` does. Seven operations backward instead of about fifty.
    """

    @staticmethod
    def forward(ctx, p: Tensor, row_weight: Tensor | None, gamma_b: float, gamma_c: float, per_row: bool):
        r, n, e = p.shape
        log_e = math.log(e)
        floor_c, cap_b = gamma_c * log_e, gamma_b * log_e
        logp = p.clamp_min(_TINY).log()  # (R, N, E)
        entropy = torch.bmm(p.reshape(r * n, 1, e), logp.view(r * n, e, 1)).view(r, n).neg()  # (R, N) H(p_n)
        row_active = None
        if per_row:  # released code: each row's entropy floored before the mean
            row_active = entropy >= floor_c
            entropy = entropy.clamp(min=floor_c)
        if row_weight is None:
            wn, real = None, None
            mean_g, certainty = p.mean(dim=1), entropy.mean(dim=1)  # (R, E), (R,)
        else:
            w = row_weight.to(device=p.device, dtype=p.dtype)  # (N,)
            count = w.sum()
            real = (count > 0).to(p.dtype)
            wn = w / count.clamp_min(1.0)  # (N,) the weights of the means over real rows
            mean_g = torch.matmul(p.transpose(1, 2), wn)  # (R, E)
            certainty = torch.mv(entropy, wn)  # (R,)
        logm = mean_g.clamp_min(_TINY).log()  # (R, E)
        balance = torch.bmm(mean_g.unsqueeze(1), logm.unsqueeze(-1)).view(r).neg()  # (R,) H(mean g)
        cgjs = balance.clamp(max=cap_b) - certainty.clamp(min=floor_c)  # eq. 11
        slack = (gamma_b - gamma_c) * log_e - cgjs
        loss = slack.clamp(min=0.0) / log_e  # eq. 12
        scale = (slack >= 0).to(p.dtype) / log_e  # (R,) dL/ds
        if real is not None:
            loss, scale = loss * real, scale * real
        k_b = scale * (balance <= cap_b)  # (R,)
        k_c = scale * (certainty >= floor_c)
        ctx.n = n
        ctx.save_for_backward(logp, logm, wn, k_b, k_c, row_active)
        return loss

    @staticmethod
    def backward(ctx, grad: Tensor):
        logp, logm, wn, k_b, k_c, row_active = ctx.saved_tensors
        gb, gc = grad * k_b, grad * k_c  # (R,)
        if wn is None:
            gb, gc = gb / ctx.n, gc / ctx.n  # the mean's 1/N
        a = torch.addcmul(gb.unsqueeze(-1), logm, gb.unsqueeze(-1))  # (R, E) gb (log m + 1)
        c = gc.unsqueeze(-1) if wn is None else torch.outer(gc, wn)  # (R, 1) or (R, N)
        if row_active is not None:
            c = c * row_active
        a = a.unsqueeze(1) if wn is None else a.unsqueeze(1) * wn.view(1, -1, 1)  # (R, 1 or N, E)
        return torch.addcmul(a, c.unsqueeze(-1), logp + 1.0, value=-1.0), None, None, None, None


class CGJSLoss(AuxTerm):
    """The ``loss.cgjs`` term: :func:`cgjs_loss` of every router, reduced over routers (``sum``: HMoRA eq. 13),
    times ``weight``.

    Args:
        weight: lambda (0.003 in HMoRA).
        gamma_b: balance cap (1).
        gamma_c: certainty floor (0.4; HMoRA Table 9 sweeps 0 .. 0.8).
        task_routers: also apply it to task routers (HMoRA Table 4 switches this off).
        floor: ``mean`` (eq. 11) or ``per_row`` (released code); see :func:`cgjs_loss`.
        reduce: ``sum`` (eq. 13) | ``mean`` | ``pooled`` over routers (:mod:`mole.losses.routing`);
            ``pooled`` takes the rows of every router with the same number of experts as one router's.
        task_scope: the sequences a task router's loss is computed over. ``micro_batch``: each micro-batch's
            (the paper does not say). ``optimizer_step``: all the sequences accumulated for one optimizer
            step, from one fresh pass of the task encoder over them (HMoRA's released code;
            :meth:`step_loss`); the per-micro-batch call then covers the token routers only. Needs
            ``reduce: sum``.
    """

    name = "cgjs"

    def __init__(self, weight: float = 0.003, gamma_b: float = 1.0, gamma_c: float = 0.4, task_routers: bool = True,
                 floor: str = "mean", reduce: str = "sum", task_scope: str = "micro_batch"):
        for key, value in (("weight", weight), ("gamma_b", gamma_b), ("gamma_c", gamma_c)):
            if not isinstance(value, (int, float)) or isinstance(value, bool) or value < 0:
                raise MoleConfigError(f"loss.cgjs.{key} must be a non-negative number, got {value!r}")
        for key, value in (("gamma_b", gamma_b), ("gamma_c", gamma_c)):
            if value > 1:
                raise MoleConfigError(f"loss.cgjs.{key} must be in [0, 1], got {value!r}")
        if not isinstance(task_routers, bool):
            raise MoleConfigError(f"loss.cgjs.task_routers must be true or false, got {task_routers!r}")
        if floor not in FLOORS:
            raise MoleConfigError(f"loss.cgjs.floor must be one of {list(FLOORS)}, got {floor!r}")
        check_reduce(reduce, "loss.cgjs.reduce")
        if task_scope not in TASK_SCOPES:
            raise MoleConfigError(f"loss.cgjs.task_scope must be one of {list(TASK_SCOPES)}, got {task_scope!r}")
        if task_scope == "optimizer_step" and reduce != "sum":
            raise MoleConfigError(f"loss.cgjs.task_scope=optimizer_step needs loss.cgjs.reduce=sum, got reduce={reduce!r}")
        self.weight, self.gamma_b, self.gamma_c = float(weight), float(gamma_b), float(gamma_c)
        self.task_routers, self.floor, self.reduce = task_routers, floor, reduce
        self.task_scope = task_scope

    def __call__(self, outputs: Sequence[RouterOutput], token_mask: Tensor | None = None) -> Tensor:
        """Every router distribution in ``outputs``, reduced; token rows exclude padding (``token_mask``).

        Distributions of the same shape and level (a model's token routers of equal expert count, its task
        routers) are stacked and go through :func:`cgjs_losses` together.
        """
        per_micro_batch = self.task_routers and self.task_scope == "micro_batch"
        dists = [d for out in outputs for d in out.distributions() if per_micro_batch or d.kind != "task"]
        args = (self.gamma_b, self.gamma_c, self.floor)

        def term(key: tuple, group: list[GateDist]) -> Tensor:
            weight = token_mask if key[0] == "token" else None
            probs = torch.stack([d.probs for d in group])  # (R, N, E)
            return cgjs_losses(probs, weight, *args).sum()

        def pooled(key: tuple, group: list[GateDist]) -> Tensor:
            probs = torch.cat([d.probs.float() for d in group]).unsqueeze(0)  # (1, sum N, E)
            weight = torch.cat([row_weights(d.probs.shape[0], d.level, token_mask, d.probs.device) for d in group])
            return cgjs_losses(probs, weight, *args)[0]

        if self.reduce == "pooled":
            total = sum_over_groups(dists, lambda d: (d.probs.shape[-1], d.probs.device), pooled)
        else:
            total = sum_over_groups(dists, lambda d: (d.level, tuple(d.probs.shape), d.probs.device), term)
            total = reduce_over_routers(total, len(dists), self.reduce)
        if total is None:
            return torch.zeros(())
        self.report_once(len(dists))
        return total

    @property
    def per_step(self) -> bool:
        """Whether :meth:`step_loss` contributes (the training loop then keeps the step's encoder inputs)."""
        return self.task_routers and self.task_scope == "optimizer_step"

    def step_loss(self, model, batches) -> Tensor | None:
        """The task routers' term once per optimizer step (``task_scope: optimizer_step``): :func:`cgjs_losses`
        of each task router's distribution over every sequence of the step's micro-batches, summed over task
        routers; ``None`` when the term is per micro-batch or the model has no task router.

        Args:
            model: the (possibly wrapped) model.
            batches: per micro-batch ``(input_ids, prompt mask, raw-question inputs or None)``
                (:func:`mole.routers.hybrid.task_router_probs`).
        """
        if not self.per_step:
            return None
        probs = task_router_probs(model, batches)
        if not probs:
            return None
        return cgjs_losses(torch.stack(probs), None, self.gamma_b, self.gamma_c, self.floor).sum()
