r"""Fused relation cross-entropy: Gram logits, both softmaxes and the cross-entropy in one pass.

Both SERE terms compare two "Gram relations". Given row features ``X`` of shape
``(B, M, R, D)`` (``B`` items, ``M`` heads, ``R`` rows of ``D`` features each), the logits of
a head are ``A = scale * X X^T``, ``(R, R)``, and the teacher's ``T = scale_t * Y Y^T`` likewise
(``Y`` may have another ``D``). Per row ``i``, with ``q = softmax(A_i / t_s)`` and
``p = softmax(T_i / t_t)``::

    CE_i = -sum_j p_ij * log q_ij = log z_i - sum_j p_ij * (A_ij / t_s - m_i),
    m_i = max_j A_ij / t_s,    z_i = sum_j exp(A_ij / t_s - m_i),

and the loss of an item is the mean of ``CE_i`` over heads and rows. The spatial term uses the
sampled features split into heads (``R = S`` points, ``D = C / M``, ``scale = D^-1/2``), the
channel term the transposed tokens (``M = 1``, ``R = C`` channels, ``D = N`` tokens,
``scale = 1 / N``).

Gradient (the teacher gets none). With ``g`` the item's upstream gradient,
``G = q - p`` and ``c = g / (M R) * scale / t_s``::

    dX = c * (G + G^T) X.

Memory: the chunked and Triton paths keep only the inputs and four ``O(R)`` statistics per row
(the maxima ``m`` and log-sums ``log z`` of both sides), and recompute the logits block by block
in the backward, so memory grows with ``R``, not ``R^2``. The dense path keeps ``G + G^T``
instead, ``R^2`` per item and head, and its backward is one batched matmul. The maxima and
log-sums are kept apart, not summed into a ``logsumexp``: the backward forms
``q = exp((A / t_s - m) - log z)``, whose largest terms, near 1, then carry no rounding of ``m``
(which grows with the logits), and ``q - p`` stays as accurate as the reference's. ``A`` and
``T`` are symmetric, so the ``G^T`` part of any block follows from the same block of logits and
the statistics of its columns' rows: the chunked path scatters ``G^T X`` chunk by chunk, the
Triton backward reads both terms off each block and needs no atomics.

Backends:

- ``"reference"``: materialises the logits and calls
  ``sere_loss.functional.relation_cross_entropy``, the oracle of the tests.
- ``"dense"``: PyTorch on any device. Items go in blocks of about ``CPU_BLOCK_BYTES`` of logits
  (cache-sized on the CPU, so each elementwise pass reads the cache, not memory), every row of
  an item at once; the forward keeps ``G + G^T`` for a backward of one batched matmul.
- ``"chunked"``: the same blocks, rows also in chunks when one item's logits exceed a block, and
  only the ``O(R)`` statistics kept: the backward recomputes the logits (the memory-saving
  mode).
- ``"triton"``: Triton kernels (optional dependency) with an online softmax over column blocks,
  the flash-attention idea; CUDA tensors, or CPU tensors under Triton's interpreter
  (``TRITON_INTERPRET=1`` set before triton is first imported; slow, for tests).
- ``"auto"``: see ``resolve_backend``.

Neither fused path has a second derivative: a backward with ``create_graph=True`` raises
(``refuse_second_derivative``) rather than return a gradient whose graph lacks it.
``"reference"`` is plain autograd and differentiates twice. ``retain_graph=True`` works on all:
no backward changes what the forward saved.
"""

from __future__ import annotations

import importlib
import math
import os
from contextlib import AbstractContextManager, nullcontext
from functools import cache
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from ._checks import check_choice

__all__ = [
    "BACKENDS",
    "fused_gram_cross_entropy",
    "paired_channel_cross_entropy",
    "refuse_second_derivative",
    "resolve_backend",
    "triton_available",
]

BACKENDS = ("auto", "reference", "dense", "chunked", "triton")

# "auto" keeps the logits (the dense path) while one item's take at most this many bytes in
# float32: the fastest path while each relation is small (the 13 x 13 lattice: 0.7 MB per item
# with 6 heads; ViT-S's 384 x 384 channel relation: 0.6 MB), and the recomputing paths bound
# memory beyond (every token of a 518 px view: 45 MB per item). The budget is per item, not per
# batch: every route grows linearly with the batch, only the recomputing ones escape the R^2.
DENSE_BUDGET_BYTES = 8 * 2**20
# Logits of one block of the dense and chunked paths on the CPU: a block and its temporaries stay
# in a core's cache (2 MiB of L2 per core on the machine the benchmarks ran on).
CPU_BLOCK_BYTES = 2**20
# Logits of one block on other devices, where each launch should carry enough work.
CHUNK_BUDGET_BYTES = 64 * 2**20
# "auto" sends row features of at most this many features D to Triton (the spatial term: D = 64
# for ViT-S); wider rows (the channel term, D = N tokens) go to the size rule, since the Triton
# backward recomputes the logits once per block of D_OUT_BLOCK output features.
TRITON_AUTO_MAX_D = 256
_TRITON_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _no_autocast(device: torch.device) -> AbstractContextManager[object]:
    if device.type in ("cpu", "cuda", "xpu", "mps"):
        return torch.autocast(device_type=device.type, enabled=False)
    return nullcontext()


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 stays float64; everything else is computed in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


# --------------------------------------------------------------------------------------------
# Backend choice
# --------------------------------------------------------------------------------------------


@cache
def triton_available() -> bool:
    """Whether the optional package ``triton`` imports."""
    try:
        importlib.import_module("triton.language")
    except ImportError:
        return False
    return True


def _interpreting() -> bool:
    """Whether Triton runs kernels in its CPU interpreter (``TRITON_INTERPRET=1``)."""
    triton = importlib.import_module("triton")
    knobs = getattr(triton, "knobs", None)
    if knobs is not None:
        return bool(knobs.runtime.interpret)
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def _check_triton(x: Tensor) -> None:
    """Raise a clear error when the Triton backend cannot run on ``x``."""
    if not triton_available():
        raise RuntimeError(
            "backend='triton' needs the optional package triton, which is not installed "
            "(pip install triton); use backend='auto' or 'chunked' instead"
        )
    if x.dtype not in _TRITON_DTYPES:
        raise TypeError(
            f"backend='triton' takes float32, float16 or bfloat16 features, got {x.dtype}; "
            "use backend='chunked' (float64 is computed in float64 there)"
        )
    if x.device.type != "cuda" and not _interpreting():
        raise RuntimeError(
            f"backend='triton' needs CUDA tensors, got tensors on {x.device}; use "
            "backend='auto' or 'chunked', or run Triton's (slow) CPU interpreter by setting "
            "TRITON_INTERPRET=1 before triton is first imported"
        )


def resolve_backend(backend: str, student: Tensor, teacher: Tensor | None = None) -> str:
    """Pick the backend for row features ``(B, M, R, D)``.

    ``"auto"`` resolves as follows:

    1. ``"dense"`` when one item's ``M * R * R`` logits fit in ``DENSE_BUDGET_BYTES`` (8 MiB) as
       float32 (float64 counts double), on any device: keeping the gradient factor is fastest
       while the relations are small (the 13 x 13 lattice, ``R = 169``; the channel relation of
       ViT-S to ViT-L);
    2. otherwise ``"triton"`` when the student is on a CUDA device, Triton imports, the student
       is float32, float16 or bfloat16, and ``D <= TRITON_AUTO_MAX_D`` (256) on both sides;
    3. otherwise ``"chunked"``.

    An explicit ``"triton"`` is checked: it raises when Triton is missing, when the dtype is not
    one the kernels take, or when the student is not on CUDA (unless Triton's interpreter is
    on).

    Args:
        backend: one of ``BACKENDS``.
        student: the student's row features ``(B, M, R, D)``; only shape, dtype and device are
            read.
        teacher: the teacher's, ``(B, M, R, D_t)``, when its ``D_t`` differs.

    Returns:
        ``"reference"``, ``"dense"``, ``"chunked"`` or ``"triton"``.
    """
    backend = check_choice(backend, "backend", BACKENDS)
    if backend == "triton":
        _check_triton(student)
        return backend
    if backend != "auto":
        if backend in ("reference", "dense"):
            _check_logits_fit(backend, student)
        return backend
    _, heads, rows, dim = student.shape
    if teacher is not None:
        dim = max(dim, teacher.shape[-1])
    itemsize = 8 if student.dtype == torch.float64 else 4
    if heads * rows * rows * itemsize <= DENSE_BUDGET_BYTES:
        return "dense"
    if (
        student.device.type == "cuda"
        and student.dtype in _TRITON_DTYPES
        and dim <= TRITON_AUTO_MAX_D
        and triton_available()
    ):
        return "triton"
    return "chunked"


# The reference path holds at least this many (B, M, R, R) float32 tensors at once under
# autograd (both sides' logits, the target, the log-probabilities and their product); the dense
# path keeps one and makes about as many in its blocks.
_LOGIT_COPIES = {"reference": 5, "dense": 2}


def _memory_of(device: torch.device) -> int | None:
    """Bytes of memory on ``device`` (the host's physical memory for the CPU); ``None``: unknown."""
    if device.type == "cuda":
        return int(torch.cuda.get_device_properties(device).total_memory)
    if device.type == "cpu" and hasattr(os, "sysconf"):
        try:
            return int(os.sysconf("SC_PAGE_SIZE")) * int(os.sysconf("SC_PHYS_PAGES"))
        except (ValueError, OSError):
            return None
    return None


def _check_logits_fit(backend: str, student: Tensor) -> None:
    """Refuse, before allocating, a materialising backend whose logits cannot fit the device.

    ``"reference"`` and ``"dense"`` hold every ``R x R`` relation of the batch; at a lattice far
    denser than ``auto`` would choose for them, that is more memory than the machine has, and
    the process would be killed with no word. The estimate is a lower bound.
    """
    if torch.compiler.is_compiling() or student.device.type == "meta":
        return
    batch, heads, rows, _ = student.shape
    itemsize = 8 if student.dtype == torch.float64 else 4
    need = _LOGIT_COPIES[backend] * batch * heads * rows * rows * itemsize
    have = _memory_of(student.device)
    if have is not None and need > have:
        raise MemoryError(
            f"backend={backend!r} would hold at least {need / 2**30:.1f} GiB of relation logits "
            f"({batch} items x {heads} heads x {rows} x {rows} rows, {_LOGIT_COPIES[backend]} "
            f"copies), more than the {have / 2**30:.1f} GiB of {student.device}: use "
            "backend='auto' or 'chunked', whose memory grows with the rows, not their square, or "
            "a coarser lattice (global_lattice= / local_lattice=)"
        )


# --------------------------------------------------------------------------------------------
# Public entry
# --------------------------------------------------------------------------------------------


def fused_gram_cross_entropy(
    student: Tensor,
    teacher: Tensor,
    student_factor: float,
    teacher_factor: float,
    backend: str,
    chunk_size: int | None = None,
) -> Tensor:
    """The fused paths of ``functional.gram_relation_cross_entropy``, inputs checked there.

    ``student_factor = scale / t_s`` and ``teacher_factor = teacher_scale / t_t`` multiply the
    Gram products; ``backend`` is ``"dense"``, ``"chunked"`` or ``"triton"``.
    """
    teacher = teacher.detach()
    if teacher.dtype != student.dtype or teacher.device != student.device:
        teacher = teacher.to(dtype=student.dtype, device=student.device)
    if backend in ("dense", "chunked"):
        out: Tensor = _BlockedGramCE.apply(
            student, teacher, student_factor, teacher_factor, chunk_size, backend == "dense"
        )
        return out
    out = _TritonGramCE.apply(student, teacher, student_factor, teacher_factor)
    return out


def _item_coefficients(grad: Tensor, heads: int, rows: int, student_scale: float) -> Tensor:
    """``c = g / (M R) * scale / t_s`` per (item, head), shape ``(B * M,)``."""
    return (grad * (student_scale / (heads * rows))).repeat_interleave(heads)


# --------------------------------------------------------------------------------------------
# Blocked PyTorch paths: "dense" keeps the gradient factor, "chunked" recomputes the logits
# --------------------------------------------------------------------------------------------


def refuse_second_derivative(backend: str) -> None:
    """Raise when a fused backward runs under ``create_graph=True``.

    The fused backends write their gradient by hand from tensors saved without history, so the
    graph of that gradient would be missing the kernel's own second derivative; rather than give
    a silently wrong Hessian, they refuse. ``backend="reference"`` is plain autograd and
    differentiates twice.
    """
    if torch.is_grad_enabled():
        raise RuntimeError(
            f"the {backend!r} relation kernels have no second derivative (backward was called "
            "with create_graph=True, for a double backward or a gradient penalty); use "
            "backend='reference', which autograd differentiates twice"
        )


def _block_plan(
    items: int, rows: int, itemsize: int, device: torch.device, chunk_size: int | None, whole: bool
) -> tuple[int, int]:
    """``(items per block, rows per chunk)`` for ``(items, rows, rows)`` logits.

    A block holds ``items x chunk x rows`` logits in about ``_block_budget`` bytes: cache
    sized on the CPU, where every elementwise pass then stays in cache, and larger on a GPU,
    where each launch should carry enough work. ``whole`` keeps every row of an item in one
    chunk (the dense path's ``G + G^T`` needs the whole item).
    """
    budget = _block_budget(device)
    if whole:
        chunk = rows
    elif chunk_size is not None:
        chunk = min(chunk_size, rows)
    else:
        chunk = max(1, min(rows, budget // (rows * itemsize)))
    return max(1, min(items, budget // (chunk * rows * itemsize))), chunk


def _block_budget(device: torch.device) -> int:
    # Under torch.compile the blocks are unrolled into the graph, and the compiler fuses the
    # passes that cache-sized blocks save on the CPU: large blocks there, on every device.
    if device.type == "cpu" and not torch.compiler.is_compiling():
        return CPU_BLOCK_BYTES
    return CHUNK_BUDGET_BYTES


def _gram(x: Tensor, factor: float, rows: slice | None = None) -> Tensor:
    """``factor * x[:, rows] x^T`` for row features ``x`` ``(n, R, D)``: ``(n, r, R)`` logits."""
    left = x if rows is None else x[:, rows]
    out = x.new_empty(x.shape[0], left.shape[1], x.shape[1])
    return torch.baddbmm(out, left, x.transpose(1, 2), beta=0.0, alpha=factor)


class _BlockedGramCE(torch.autograd.Function):
    """Gram relation cross-entropy over blocks of items and rows, with a hand-written backward.

    ``save=True`` ("dense"): each item's logits are formed whole, and the backward's factor
    ``H = G + G^T`` (``G = q - p``) is kept, so the backward is one batched matmul
    ``dX = c H X``; memory ``R^2`` per item and head. ``save=False`` ("chunked"): only the inputs
    and four statistics per row are kept (the maxima and log-sums of both sides) and the
    backward recomputes the logits block by block; memory linear in ``R``.
    """

    @staticmethod
    def forward(
        ctx: Any,
        student: Tensor,
        teacher: Tensor,
        student_scale: float,
        teacher_scale: float,
        chunk_size: int | None,
        save: bool,
    ) -> Tensor:
        batch, heads, rows, dim = student.shape
        dtype = _compute_dtype(student.dtype)
        n = batch * heads
        with _no_autocast(student.device):
            x = student.reshape(n, rows, dim).to(dtype)
            y = teacher.reshape(n, rows, teacher.shape[-1]).to(dtype)
            block, chunk = _block_plan(n, rows, x.element_size(), x.device, chunk_size, whole=save)
            ce = x.new_empty(n, rows)
            if save:
                factor = x.new_empty(n, rows, rows)
            else:
                stats = x.new_empty(4, n, rows)
            for i in range(0, n, block):
                items = slice(i, min(i + block, n))
                xi, yi = x[items], y[items]
                if save:  # whole items: the reference's own formula, fused softmaxes
                    p = torch.softmax(_gram(yi, teacher_scale), dim=-1)
                    log_q = torch.log_softmax(_gram(xi, student_scale), dim=-1)
                    # CE_i = -sum_j p_ij log q_ij
                    torch.sum(p * log_q, dim=-1, out=ce[items]).neg_()
                    g = log_q.exp_().sub_(p)  # q - p
                    torch.add(g, g.transpose(1, 2), out=factor[items])
                    continue
                for r in range(0, rows, chunk):
                    part = slice(r, min(r + chunk, rows))
                    a = _gram(xi, student_scale, part)  # A / t_s of these rows, (n_i, r, R)
                    t = _gram(yi, teacher_scale, part)
                    a_max = a.amax(dim=-1, keepdim=True)
                    z_s = a.sub_(a_max).exp().sum(dim=-1, keepdim=True)  # a: A / t_s - m
                    t_max = t.amax(dim=-1, keepdim=True)
                    e_t = t.sub_(t_max).exp_()  # unnormalised teacher softmax
                    z_t = e_t.sum(dim=-1, keepdim=True)
                    # CE_i = log z_i - sum_j p_ij (A_ij / t_s - m_i)
                    log_z = z_s.log_()
                    ce[items, part] = log_z.squeeze(-1) - e_t.mul_(a).sum(dim=-1).div_(
                        z_t.squeeze(-1)
                    )
                    stats[0, items, part] = a_max.squeeze(-1)
                    stats[1, items, part] = log_z.squeeze(-1)
                    stats[2, items, part] = t_max.squeeze(-1)
                    stats[3, items, part] = z_t.log_().squeeze(-1)
            per_item = ce.view(batch, heads * rows).mean(dim=1)
        if save:
            ctx.save_for_backward(student, factor)
        else:
            ctx.save_for_backward(student, teacher, stats)
        ctx.scales = (student_scale, teacher_scale)
        ctx.plan = (block, chunk, save)
        return per_item

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, None, None, None, None, None]:
        block, chunk, save = ctx.plan
        refuse_second_derivative("dense" if save else "chunked")
        if not ctx.needs_input_grad[0]:
            return None, None, None, None, None, None
        student_scale, teacher_scale = ctx.scales
        if save:
            student, factor = ctx.saved_tensors
        else:
            student, teacher, stats = ctx.saved_tensors
        batch, heads, rows, dim = student.shape
        n = batch * heads
        with _no_autocast(student.device):
            dtype = _compute_dtype(student.dtype)
            x = student.reshape(n, rows, dim).to(dtype)
            coef = _item_coefficients(grad.to(dtype), heads, rows, student_scale)
            if save:
                dx = torch.bmm(factor, x)
            else:
                y = teacher.reshape(n, rows, teacher.shape[-1]).to(dtype)
                dx = torch.empty_like(x) if chunk == rows else torch.zeros_like(x)
                for i in range(0, n, block):
                    items = slice(i, min(i + block, n))
                    xi, yi = x[items], y[items]
                    for r in range(0, rows, chunk):
                        part = slice(r, min(r + chunk, rows))
                        a = _gram(xi, student_scale, part)
                        t = _gram(yi, teacher_scale, part)
                        m_s, log_z_s, m_t, log_z_t = stats[:, items, part, None]
                        g = a.sub_(m_s).sub_(log_z_s).exp_()  # q - p on these rows
                        g.sub_(t.sub_(m_t).sub_(log_z_t).exp_())
                        if chunk == rows:  # dX = (G + G^T) X, one product
                            torch.bmm(g + g.transpose(1, 2), xi, out=dx[items])
                        else:  # the G^T part of other rows, scattered chunk by chunk
                            dx[items, part] += torch.bmm(g, xi)
                            dx[items].baddbmm_(g.transpose(1, 2), xi[:, part])
            dx.mul_(coef[:, None, None])
        return dx.view(batch, heads, rows, dim).to(student.dtype), None, None, None, None, None


# --------------------------------------------------------------------------------------------
# Paired channel relations: every (teacher view, student view) pair from one relation per view
# --------------------------------------------------------------------------------------------


def paired_channel_cross_entropy(
    students: list[Tensor],
    teachers: list[Tensor],
    pairs: list[tuple[int, int]],
    student_temp: float,
    teacher_temp: float,
    save: bool,
) -> Tensor:
    r"""Channel relation cross-entropy of many pairs of views, each view's relation formed once.

    For pair ``k = (i, v)`` and item ``b`` the value is the channel term of student view ``v``
    against teacher view ``i``: with ``A_v = X_v^T X_v / N_v`` and ``T_i = Y_i^T Y_i / N_i``
    (``(C, C)``), ``q = softmax(A_v / t_s)``, ``p = softmax(T_i / t_t)`` row by row,
    ``CE = -1/C sum_{r,j} p_rj log q_rj``. Gradient: with ``w_k`` the upstream gradient of pair
    ``k`` and item ``b``, ``D_v = sum_{k = (i, v)} w_k (q_v - p_i) / C`` and
    ``dX_v = X_v (D_v + D_v^T) / (N_v t_s)``: one batched matmul per view, whatever the number
    of its pairs.

    Items go in blocks of about ``CPU_BLOCK_BYTES`` of logits per view on the CPU.
    ``save=True`` ("dense") keeps every view's softmax ``(B, C, C)`` for the backward;
    ``save=False`` ("chunked") keeps two statistics per row and recomputes the relations there.

    Args:
        students: ``V`` tensors ``(B, N_v, C)``, the student's projected tokens per view.
        teachers: ``G`` tensors ``(B, N_i, C)``, the teacher's; no gradient reaches them.
        pairs: ``(i, v)`` index pairs into ``teachers`` and ``students``, checked by the caller.
        student_temp: ``t_s > 0``.
        teacher_temp: ``t_t > 0``.
        save: keep the softmaxes (dense) or recompute them (chunked).

    Returns:
        ``(P, B)`` per pair and item; float32 (float64 for float64 input).
    """
    meta = (list(pairs), student_temp, teacher_temp, save, len(students))
    out: Tensor = _PairedChannelCE.apply(meta, *students, *(t.detach() for t in teachers))
    return out


# Views of fewer tokens than this take dX = X D + X D^T as two products in the channel backward:
# the second product costs less than forming D + D^T, whose transposed read misses the cache
# (measured at C = 384: 36 tokens, 2 products 157 us against 257 us; 196 tokens, 754 against
# 595 us, on the 2-core benchmark machine).
_TWO_PRODUCTS_BELOW_TOKENS = 64


def _channel_logits(x: Tensor, factor: float, out: Tensor | None = None) -> Tensor:
    """``factor * x^T x`` for tokens ``x`` ``(n, N, C)``: ``(n, C, C)``, in ``out`` if given."""
    if out is None:
        out = x.new_empty(x.shape[0], x.shape[2], x.shape[2])
    return torch.baddbmm(out, x.transpose(1, 2), x, beta=0.0, alpha=factor, out=out)


def _inner(a: Tensor, b: Tensor, out: Tensor) -> Tensor:
    """``out[n] = sum_rj a_nrj b_nrj`` for ``(n, C, C)`` blocks ``a`` and ``b``.

    On the CPU one BLAS dot per item reads both operands once and writes nothing else, where
    ``(a * b).sum()`` writes and rereads a product of the operands' size.
    """
    if a.device.type != "cpu" or torch.compiler.is_compiling():  # one fused reduction there
        return torch.sum(a * b, dim=(-2, -1), out=out)
    for j in range(a.shape[0]):
        torch.dot(a[j].view(-1), b[j].view(-1), out=out[j])
    return out


class _PairedChannelCE(torch.autograd.Function):
    """``paired_channel_cross_entropy``; inputs ``(meta, *students, *teachers)``."""

    @staticmethod
    def forward(ctx: Any, meta: Any, *tensors: Tensor) -> Tensor:
        pairs, ts, tt, save, num_students = meta
        students, teachers = tensors[:num_students], tensors[num_students:]
        dtype = _compute_dtype(students[0].dtype)
        batch, channels = students[0].shape[0], students[0].shape[2]
        device = students[0].device
        with _no_autocast(device):
            xs = [x.to(dtype) for x in students]
            ys = [y.to(dtype=dtype, device=device) for y in teachers]
            itemsize = torch.finfo(dtype).bits // 8
            block = max(1, _block_budget(device) // (channels * channels * itemsize))
            ce = xs[0].new_empty(len(pairs), batch)  # sum over the rows r of CE_r
            by_view = [[(k, i) for k, (i, v) in enumerate(pairs) if v == w] for w in range(len(xs))]
            if save:
                q_saved = [x.new_empty(batch, channels, channels) for x in xs]
                p_saved = [y.new_empty(batch, channels, channels) for y in ys]
            else:  # per view and row: max and log-sum, students then teachers
                stats = xs[0].new_empty(len(xs) + len(ys), 2, batch, channels)
            for b in range(0, batch, block):
                items = slice(b, min(b + block, batch))
                ps = []
                if save:  # the reference's formula, fused softmaxes written where they are kept
                    for i, y in enumerate(ys):
                        t = _channel_logits(y[items], 1.0 / (y.shape[1] * tt))
                        ps.append(torch.softmax(t, dim=-1, out=p_saved[i][items]))
                    for v, x in enumerate(xs):
                        if not by_view[v]:
                            continue
                        a = _channel_logits(x[items], 1.0 / (x.shape[1] * ts))
                        log_q = torch.log_softmax(a, dim=-1, out=q_saved[v][items])
                        for k, i in by_view[v]:  # sum_r CE_r = -sum_rj p_rj log q_rj
                            _inner(ps[i], log_q, out=ce[k, items]).neg_()
                        log_q.exp_()  # q, in q_saved[v]
                    continue
                for i, y in enumerate(ys):
                    t = _channel_logits(y[items], 1.0 / (y.shape[1] * tt))
                    t_max = t.amax(dim=-1, keepdim=True)
                    e_t = t.sub_(t_max).exp_()
                    z_t = e_t.sum(dim=-1, keepdim=True)
                    ps.append(e_t.div_(z_t))
                    stats[len(xs) + i, 0, items] = t_max.squeeze(-1)
                    stats[len(xs) + i, 1, items] = z_t.log_().squeeze(-1)
                for v, x in enumerate(xs):
                    if not by_view[v]:
                        continue
                    a = _channel_logits(x[items], 1.0 / (x.shape[1] * ts))
                    a_max = a.amax(dim=-1, keepdim=True)
                    a.sub_(a_max)  # A / t_s - m
                    log_z = a.exp().sum(dim=-1, keepdim=True).log_()
                    total_log_z = log_z.sum(dim=(-2, -1))
                    for k, i in by_view[v]:  # CE_r = log z_r - sum_j p_rj (A_rj / t_s - m_r)
                        _inner(ps[i], a, out=ce[k, items]).neg_().add_(total_log_z)
                    stats[v, 0, items] = a_max.squeeze(-1)
                    stats[v, 1, items] = log_z.squeeze(-1)
            # Not in place: compiled under torch 2.11, an output written in place by its own
            # forward lost its gradient (zero for every view, with the right value).
            per_pair = ce / channels
        if save:
            ctx.save_for_backward(*students, *q_saved, *p_saved)
        else:
            ctx.save_for_backward(*students, *teachers, stats)
        ctx.meta = meta
        ctx.plan = (block, by_view, len(ys))
        return per_pair

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        _, ts, tt, save, num_students = ctx.meta
        block, by_view, num_teachers = ctx.plan
        refuse_second_derivative("dense" if save else "chunked")
        saved = ctx.saved_tensors
        students = saved[:num_students]
        grads: list[Tensor | None] = [None] * (num_students + num_teachers)
        dtype = _compute_dtype(students[0].dtype)
        batch, channels = students[0].shape[0], students[0].shape[2]
        with _no_autocast(students[0].device):
            xs = [x.to(dtype) for x in students]
            w = grad.to(dtype)
            if save:
                q_saved = saved[num_students : 2 * num_students]
                p_saved = saved[2 * num_students :]
            else:
                ys = [y.to(dtype=dtype, device=xs[0].device) for y in saved[num_students:-1]]
                stats = saved[-1]
            dxs = [
                torch.empty_like(x) if ctx.needs_input_grad[1 + v] and by_view[v] else None
                for v, x in enumerate(xs)
            ]
            for b in range(0, batch, block):
                items = slice(b, min(b + block, batch))
                if save:
                    ps = [p[items] for p in p_saved]
                else:
                    ps = []
                    for i, y in enumerate(ys):
                        t = _channel_logits(y[items], 1.0 / (y.shape[1] * tt))
                        m_t, log_z_t = stats[num_students + i, :, items, :, None]
                        ps.append(t.sub_(m_t).sub_(log_z_t).exp_())
                for v, x in enumerate(xs):
                    dx = dxs[v]
                    if dx is None:
                        continue
                    # D = sum_k w_k (q - p_k). A view in one pair: D = w (q - p), one pass, and w
                    # scales dX (N x C) rather than D (C x C). Several: W q - sum_k w_k p_k.
                    weights = [w[k, items, None, None] for k, _ in by_view[v]]
                    if save:
                        q = q_saved[v][items]
                    else:
                        a = _channel_logits(x[items], 1.0 / (x.shape[1] * ts))
                        m_s, log_z_s = stats[v, :, items, :, None]
                        q = a.sub_(m_s).sub_(log_z_s).exp_()
                    targets = [ps[i] for _, i in by_view[v]]
                    scale = None
                    if len(targets) == 1:
                        d = torch.sub(q, targets[0]) if save else q.sub_(targets[0])
                        scale = weights[0]
                    else:
                        total = sum(weights[1:], weights[0])
                        d = q * total if save else q.mul_(total)
                        for p_k, w_k in zip(targets, weights, strict=True):
                            d.addcmul_(p_k, w_k, value=-1.0)
                    alpha = 1.0 / (x.shape[1] * ts * channels)
                    out, xi = dx[items], x[items]
                    if x.shape[1] < _TWO_PRODUCTS_BELOW_TOKENS:  # X D + X D^T: no D^T copy
                        torch.baddbmm(out, xi, d, beta=0.0, alpha=alpha, out=out)
                        out.baddbmm_(xi, d.transpose(1, 2), alpha=alpha)
                    else:  # X (D + D^T): one product, the sum's strided read cheaper here
                        torch.baddbmm(
                            out, xi, d + d.transpose(1, 2), beta=0.0, alpha=alpha, out=out
                        )
                    if scale is not None:
                        out.mul_(scale)
            for v, dx in enumerate(dxs):
                if dx is not None:
                    grads[v] = dx.to(students[v].dtype)
        return (None, *grads)


# --------------------------------------------------------------------------------------------
# Triton path
# --------------------------------------------------------------------------------------------

# Set to ``triton.language`` when the kernels are first built; the kernels read it as a global.
tl: Any = None
if TYPE_CHECKING:
    constexpr = int  # the kernels' compile-time parameters, as the type checker sees them
else:
    constexpr = "constexpr"  # the annotation Triton reads; rebound when the kernels are built

_ROW_BLOCK = 64
_COL_BLOCK = 64
_D_BLOCK = 64
_D_OUT_BLOCK = 64
# Smaller blocks under the interpreter: same code paths, far less numpy work per program.
_INTERPRET_BLOCK = 16


def _gram_tile_source(  # type: ignore[no-untyped-def]  # Triton device function
    base,
    i,
    i_ok,
    j,
    j_ok,
    dim,
    ROW_BLOCK: constexpr,
    COL_BLOCK: constexpr,
    D_BLOCK: constexpr,
    PRECISION: constexpr,
):
    # The (rows i, rows j) block of F F^T for one (item * head)'s features F (R, dim) at base,
    # in float32; rows outside the matrix load as 0. Both kernels build A and T with it.
    acc = tl.zeros([ROW_BLOCK, COL_BLOCK], tl.float32)
    for d0 in range(0, dim, D_BLOCK):
        d = d0 + tl.arange(0, D_BLOCK)
        d_ok = d < dim
        fi = tl.load(
            base + i[:, None] * dim + d[None, :], mask=i_ok[:, None] & d_ok[None, :], other=0.0
        ).to(tl.float32)
        fj = tl.load(
            base + j[:, None] * dim + d[None, :], mask=j_ok[:, None] & d_ok[None, :], other=0.0
        ).to(tl.float32)
        acc = tl.dot(fi, tl.trans(fj), acc, input_precision=PRECISION)
    return acc


# The kernels call the device function through this global, bound (once per interpreter mode,
# always to the same object: Triton rejects globals that change after compilation) in _kernels.
_gram_tile: Any = None


def _forward_kernel(  # type: ignore[no-untyped-def]  # Triton kernel
    x_ptr,
    y_ptr,
    ce_ptr,
    stats_ptr,
    rows,
    dim_x,
    dim_y,
    student_scale,
    teacher_scale,
    ROW_BLOCK: constexpr,
    COL_BLOCK: constexpr,
    D_BLOCK: constexpr,
    PRECISION: constexpr,
) -> None:
    # One program per (item * head, block of rows); online softmax over the column blocks.
    bm = tl.program_id(0).to(tl.int64)
    i = tl.program_id(1) * ROW_BLOCK + tl.arange(0, ROW_BLOCK)
    i_ok = i < rows
    x_base = x_ptr + bm * rows * dim_x
    y_base = y_ptr + bm * rows * dim_y
    m_s = tl.full([ROW_BLOCK], float("-inf"), tl.float32)  # running max of A / t_s
    l_s = tl.zeros([ROW_BLOCK], tl.float32)  # running sum of exp(A / t_s - m_s)
    m_t = tl.full([ROW_BLOCK], float("-inf"), tl.float32)  # the same for T / t_t
    l_t = tl.zeros([ROW_BLOCK], tl.float32)
    # Running sum of exp(T / t_t - m_t) * (A / t_s - m_s): relative to the student's running max,
    # so that CE = log z_s - w / z_t subtracts no two large numbers at the end.
    w = tl.zeros([ROW_BLOCK], tl.float32)
    for j0 in range(0, rows, COL_BLOCK):
        j = j0 + tl.arange(0, COL_BLOCK)
        j_ok = j < rows
        a = _gram_tile(x_base, i, i_ok, j, j_ok, dim_x, ROW_BLOCK, COL_BLOCK, D_BLOCK, PRECISION)
        t = _gram_tile(y_base, i, i_ok, j, j_ok, dim_y, ROW_BLOCK, COL_BLOCK, D_BLOCK, PRECISION)
        a = a * student_scale  # 0 in the padding columns, where x_j loads as 0
        a_max = tl.where(j_ok[None, :], a, float("-inf"))
        t = tl.where(j_ok[None, :], t * teacher_scale, float("-inf"))
        m_s_new = tl.maximum(m_s, tl.max(a_max, 1))
        l_s = l_s * tl.exp(m_s - m_s_new) + tl.sum(tl.exp(a_max - m_s_new[:, None]), 1)
        shift = tl.where(l_t > 0.0, m_s_new - m_s, 0.0)  # no earlier columns on the first block
        m_s = m_s_new
        m_t_new = tl.maximum(m_t, tl.max(t, 1))
        rescale = tl.exp(m_t - m_t_new)
        e_t = tl.exp(t - m_t_new[:, None])  # 0 in the padding columns
        w = (w - shift * l_t) * rescale + tl.sum(e_t * (a - m_s[:, None]), 1)
        l_t = l_t * rescale + tl.sum(e_t, 1)
        m_t = m_t_new
    log_z_s = tl.log(l_s)
    out = bm * rows + i
    plane = tl.num_programs(0).to(tl.int64) * rows  # the stats are (4, B * M, R)
    tl.store(ce_ptr + out, log_z_s - w / l_t, mask=i_ok)
    tl.store(stats_ptr + out, m_s, mask=i_ok)
    tl.store(stats_ptr + plane + out, log_z_s, mask=i_ok)
    tl.store(stats_ptr + 2 * plane + out, m_t, mask=i_ok)
    tl.store(stats_ptr + 3 * plane + out, tl.log(l_t), mask=i_ok)


def _backward_kernel(  # type: ignore[no-untyped-def]  # Triton kernel
    x_ptr,
    y_ptr,
    stats_ptr,
    coef_ptr,
    dx_ptr,
    rows,
    dim_x,
    dim_y,
    student_scale,
    teacher_scale,
    ROW_BLOCK: constexpr,
    COL_BLOCK: constexpr,
    D_BLOCK: constexpr,
    D_OUT_BLOCK: constexpr,
    PRECISION: constexpr,
    OUT_PRECISION: constexpr,
) -> None:
    # One program per (item * head, block of rows, block of output features):
    # dX_I = c * sum_J H_IJ X_J, H_IJ recomputed from the logits and the saved row stats.
    bm = tl.program_id(0).to(tl.int64)
    i = tl.program_id(1) * ROW_BLOCK + tl.arange(0, ROW_BLOCK)
    i_ok = i < rows
    e = tl.program_id(2) * D_OUT_BLOCK + tl.arange(0, D_OUT_BLOCK)
    e_ok = e < dim_x
    x_base = x_ptr + bm * rows * dim_x
    y_base = y_ptr + bm * rows * dim_y
    plane = tl.num_programs(0).to(tl.int64) * rows  # the stats are (4, B * M, R)
    m_s_ptr = stats_ptr + bm * rows
    log_z_s_ptr = m_s_ptr + plane
    m_t_ptr = m_s_ptr + 2 * plane
    log_z_t_ptr = m_s_ptr + 3 * plane
    m_s_i = tl.load(m_s_ptr + i, mask=i_ok, other=0.0)
    log_z_s_i = tl.load(log_z_s_ptr + i, mask=i_ok, other=0.0)
    m_t_i = tl.load(m_t_ptr + i, mask=i_ok, other=0.0)
    log_z_t_i = tl.load(log_z_t_ptr + i, mask=i_ok, other=0.0)
    acc = tl.zeros([ROW_BLOCK, D_OUT_BLOCK], tl.float32)
    for j0 in range(0, rows, COL_BLOCK):
        j = j0 + tl.arange(0, COL_BLOCK)
        j_ok = j < rows
        a = _gram_tile(x_base, i, i_ok, j, j_ok, dim_x, ROW_BLOCK, COL_BLOCK, D_BLOCK, PRECISION)
        t = _gram_tile(y_base, i, i_ok, j, j_ok, dim_y, ROW_BLOCK, COL_BLOCK, D_BLOCK, PRECISION)
        a = a * student_scale
        t = t * teacher_scale
        m_s_j = tl.load(m_s_ptr + j, mask=j_ok, other=0.0)
        log_z_s_j = tl.load(log_z_s_ptr + j, mask=j_ok, other=0.0)
        m_t_j = tl.load(m_t_ptr + j, mask=j_ok, other=0.0)
        log_z_t_j = tl.load(log_z_t_ptr + j, mask=j_ok, other=0.0)
        # (q - p) of rows I plus (q - p)^T of rows J, both read from this symmetric block.
        h = (
            tl.exp((a - m_s_i[:, None]) - log_z_s_i[:, None])
            - tl.exp((t - m_t_i[:, None]) - log_z_t_i[:, None])
            + tl.exp((a - m_s_j[None, :]) - log_z_s_j[None, :])
            - tl.exp((t - m_t_j[None, :]) - log_z_t_j[None, :])
        )
        h = tl.where(i_ok[:, None] & j_ok[None, :], h, 0.0)
        xe = tl.load(
            x_base + j[:, None] * dim_x + e[None, :],
            mask=j_ok[:, None] & e_ok[None, :],
            other=0.0,
        ).to(tl.float32)
        acc = tl.dot(h, xe, acc, input_precision=OUT_PRECISION)
    coef = tl.load(coef_ptr + bm)
    out = dx_ptr + bm * rows * dim_x + i[:, None] * dim_x + e[None, :]
    tl.store(out, acc * coef, mask=i_ok[:, None] & e_ok[None, :])


_KERNELS: dict[bool, tuple[Any, Any, Any]] = {}


def _kernels() -> tuple[Any, Any, bool]:
    """Build (once per interpreter mode) and return ``(forward, backward, interpreting)``.

    ``triton.jit`` reads ``TRITON_INTERPRET`` when it wraps a function, so the kernels are
    wrapped here, on first use, and cached per mode. Triton's own library functions are wrapped
    when ``triton.language`` is imported, though: the interpreter needs the variable set before
    that import (``_check_interpreter_mode`` says so when it was not).
    """
    global tl
    triton = importlib.import_module("triton")
    tl = importlib.import_module("triton.language")
    globals()["constexpr"] = tl.constexpr
    interpreting = _interpreting()
    if interpreting:
        _check_interpreter_mode(tl)
    global _gram_tile
    if interpreting not in _KERNELS:
        _KERNELS[interpreting] = (
            triton.jit(_gram_tile_source),
            triton.jit(_forward_kernel),
            triton.jit(_backward_kernel),
        )
    _gram_tile, fwd, bwd = _KERNELS[interpreting]
    return fwd, bwd, interpreting


def _check_interpreter_mode(language: Any) -> None:
    """Fail clearly when ``TRITON_INTERPRET=1`` came after ``triton.language`` was imported.

    Triton wraps its own library functions (``tl.zeros``, ``tl.sum``...) when ``triton.language``
    is imported; the interpreter can run them only if they were wrapped in interpreter mode.
    """
    jit = importlib.import_module("triton.runtime.jit")
    jit_function = getattr(jit, "JITFunction", None)
    if jit_function is not None and isinstance(getattr(language, "zeros", None), jit_function):
        raise RuntimeError(
            "TRITON_INTERPRET=1 was set after triton was imported; Triton's interpreter needs "
            "it in the environment before the first import of triton (start the process with it)"
        )


def _pow2_block(n: int, cap: int) -> int:
    """A power of two in ``[16, cap]`` that covers ``n`` where it can (``tl.dot`` needs 16)."""
    return max(16, min(cap, 1 << max(0, math.ceil(math.log2(max(n, 1))))))


def _blocks(dim_x: int, dim_y: int, interpreting: bool) -> tuple[int, int, int, int]:
    """``(ROW_BLOCK, COL_BLOCK, D_BLOCK, D_OUT_BLOCK)`` for features of ``dim_x``, ``dim_y``."""
    if interpreting:
        b = _INTERPRET_BLOCK
        return b, b, _pow2_block(max(dim_x, dim_y), b), _pow2_block(dim_x, b)
    d_block = _pow2_block(max(dim_x, dim_y), _D_BLOCK)
    return _ROW_BLOCK, _COL_BLOCK, d_block, _pow2_block(dim_x, _D_OUT_BLOCK)


class _TritonGramCE(torch.autograd.Function):
    """Triton forward (online softmax) and recomputing backward; saves inputs and stats."""

    @staticmethod
    def forward(
        ctx: Any,
        student: Tensor,
        teacher: Tensor,
        student_scale: float,
        teacher_scale: float,
    ) -> Tensor:
        fwd, _, interpreting = _kernels()
        batch, heads, rows, dim = student.shape
        x = student.reshape(batch * heads, rows, dim).contiguous()
        y = teacher.reshape(batch * heads, rows, teacher.shape[-1]).contiguous()
        ce = torch.empty(batch * heads, rows, dtype=torch.float32, device=x.device)
        stats = torch.empty(4, batch * heads, rows, dtype=torch.float32, device=x.device)
        row_block, col_block, d_block, _ = _blocks(dim, y.shape[-1], interpreting)
        precision = "ieee" if x.dtype == torch.float32 else "tf32"
        grid = (batch * heads, _cdiv(rows, row_block))
        with _device_guard(x):
            fwd[grid](
                x,
                y,
                ce,
                stats,
                rows,
                dim,
                y.shape[-1],
                student_scale,
                teacher_scale,
                ROW_BLOCK=row_block,
                COL_BLOCK=col_block,
                D_BLOCK=d_block,
                PRECISION=precision,
            )
        per_item = ce.view(batch, heads * rows).mean(dim=1)
        ctx.save_for_backward(student, teacher, stats)
        ctx.scales = (student_scale, teacher_scale)
        return per_item

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, None, None, None]:
        refuse_second_derivative("triton")
        if not ctx.needs_input_grad[0]:
            return None, None, None, None
        _, bwd, interpreting = _kernels()
        student, teacher, stats = ctx.saved_tensors
        student_scale, teacher_scale = ctx.scales
        batch, heads, rows, dim = student.shape
        x = student.reshape(batch * heads, rows, dim).contiguous()
        y = teacher.reshape(batch * heads, rows, teacher.shape[-1]).contiguous()
        coef = _item_coefficients(grad.float(), heads, rows, student_scale).contiguous()
        dx = torch.empty(batch * heads, rows, dim, dtype=torch.float32, device=x.device)
        row_block, col_block, d_block, d_out_block = _blocks(dim, y.shape[-1], interpreting)
        precision = "ieee" if x.dtype == torch.float32 else "tf32"
        grid = (batch * heads, _cdiv(rows, row_block), _cdiv(dim, d_out_block))
        with _device_guard(x):
            bwd[grid](
                x,
                y,
                stats,
                coef,
                dx,
                rows,
                dim,
                y.shape[-1],
                student_scale,
                teacher_scale,
                ROW_BLOCK=row_block,
                COL_BLOCK=col_block,
                D_BLOCK=d_block,
                D_OUT_BLOCK=d_out_block,
                PRECISION=precision,
                OUT_PRECISION=precision,
            )
        return dx.view(batch, heads, rows, dim).to(student.dtype), None, None, None


def _cdiv(n: int, block: int) -> int:
    """``ceil(n / block)`` for launch grids."""
    return -(-n // block)


def _device_guard(x: Tensor) -> AbstractContextManager[object]:
    """Launch on ``x``'s GPU (Triton launches on the current device)."""
    if x.device.type == "cuda":
        return torch.cuda.device(x.device)
    return nullcontext()
