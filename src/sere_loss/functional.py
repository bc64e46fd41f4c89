"""Reference kernels of SERE: the maths of every term, in one place.

The modules in ``sere_loss.losses`` only arrange views and heads around these functions. Each
function states its semantics in its docstring with the shapes of every tensor, and follows the
paper where it is right and the authors' code where the paper's numbers came from it (the
documentation's page "The paper and the authors' code" lists each choice). Notation: ``B``
batch, ``N = H * W`` tokens of a view, ``C`` channels, ``M`` heads, ``S = Hs * Ws`` sampled
points.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor

from . import _fused
from ._checks import (
    check_boxes,
    check_choice,
    check_flips,
    check_floating,
    check_int,
    check_ndim,
    check_positive,
    check_positive_int,
    check_size,
    check_tensor,
)

__all__ = [
    "channel_relation",
    "channel_relation_cross_entropy",
    "overlap_grids",
    "paired_channel_relation_cross_entropy",
    "paired_relation_cross_entropy",
    "relation_cross_entropy",
    "bilinear_taps",
    "sample_region",
    "sample_tokens",
    "spatial_relation",
    "spatial_relation_cross_entropy",
    "view_pairs",
]

_POINTS = ("center", "official")
_PADDINGS = ("border", "zeros")
_REDUCTIONS = ("mean", "sum", "none")
_LOW_PRECISION = (torch.float16, torch.bfloat16)


def spatial_relation(x: Tensor, num_heads: int) -> Tensor:
    r"""Multi-head spatial self-relation logits (paper Eq. 2, before the softmax).

    The channels are split into ``M = num_heads`` groups of ``D = C / M``; per group
    ``A_m = X_m X_m^T / sqrt(D)``. The scale is ``sqrt(C / M)`` as in the authors' code (the
    paper writes ``sqrt(C)``).

    Args:
        x: sampled features ``(B, S, C)``.
        num_heads: ``M``, must divide ``C``.

    Returns:
        Logits ``(B, M, S, S)``.

    Examples:
        >>> x = torch.randn(2, 9, 12)
        >>> spatial_relation(x, num_heads=3).shape
        torch.Size([2, 3, 9, 9])
    """
    x = check_ndim(x, 3, "x", "(B, S, C)")
    num_heads = _check_heads(x, num_heads, "x")
    channels = x.shape[-1]
    heads: Tensor = rearrange(x, "b s (m d) -> b m s d", m=num_heads)
    logits: Tensor = (heads @ heads.transpose(-1, -2)) * (channels // num_heads) ** -0.5
    return logits


def _check_heads(x: Tensor, num_heads: object, name: str) -> int:
    """Check that ``num_heads`` is a positive int that divides the channels of ``x``."""
    heads = check_positive_int(num_heads, "num_heads")
    if x.shape[-1] % heads:
        raise ValueError(
            f"the channel count C must divide by num_heads M; got C={x.shape[-1]} from {name} of "
            f"shape {tuple(x.shape)} and M={heads}"
        )
    return heads


def channel_relation(x: Tensor) -> Tensor:
    r"""Channel self-relation logits (paper Eq. 4, before the softmax): ``x^T x / N``.

    Args:
        x: projected tokens of a whole view ``(B, N, C)``.

    Returns:
        Logits ``(B, C, C)``.

    Examples:
        >>> channel_relation(torch.randn(2, 49, 8)).shape
        torch.Size([2, 8, 8])
    """
    x = check_ndim(x, 3, "x", "(B, N, C)")
    if x.shape[1] == 0:
        raise ValueError(f"x must have at least one token, got shape {tuple(x.shape)}")
    # x^T x with the 1 / N folded into the product: no second pass over the (B, C, C) result.
    batch, tokens, channels = x.shape
    out = x.new_empty(batch, channels, channels)
    return torch.baddbmm(out, x.transpose(1, 2), x, beta=0.0, alpha=1.0 / tokens)


def _no_autocast(device: torch.device) -> AbstractContextManager[object]:
    """Disable autocast on ``device`` where autocast exists for it."""
    if device.type in ("cpu", "cuda", "xpu", "mps"):
        return torch.autocast(device_type=device.type, enabled=False)
    return nullcontext()


def _upcast(t: Tensor) -> Tensor:
    return t.float() if t.dtype in _LOW_PRECISION else t


def relation_cross_entropy(
    student_logits: Tensor,
    teacher_logits: Tensor,
    student_temp: float = 1.0,
    teacher_temp: float = 1.0,
    mask: Tensor | None = None,
    *,
    reduction: str = "mean",
) -> Tensor:
    r"""Row-wise cross-entropy between teacher and student relations (paper Eq. 3 and 5).

    ``CE = -sum_j softmax(teacher / t_t)_ij * log_softmax(student / t_s)_ij`` for every row
    ``i``, averaged over the rows and every leading dimension but the batch (heads, say), then
    over the batch items that ``mask`` keeps. The teacher is detached here: no gradient ever
    reaches it. The maths runs in float32 even under autocast (float64 stays float64).

    Args:
        student_logits: ``(B, ..., R, K)`` relation logits of the student.
        teacher_logits: same shape as ``student_logits``.
        student_temp: ``t_s > 0``.
        teacher_temp: ``t_t > 0``.
        mask: optional ``(B,)`` bool, the batch items to keep. With nothing kept, the result is a
            zero that is still connected to ``student_logits`` (zero gradient), so distributed
            training never waits on a missing gradient.
        reduction: ``"mean"`` over kept items (default), ``"sum"`` over kept items, or
            ``"none"`` for the per-item losses ``(B,)`` with dropped items set to zero.

    Returns:
        A scalar, or ``(B,)`` for ``reduction="none"``; float32 (or float64).

    Examples:
        >>> s, t = torch.randn(4, 3, 5, 5), torch.randn(4, 3, 5, 5)
        >>> relation_cross_entropy(s, t, teacher_temp=0.5).shape
        torch.Size([])
    """
    student_logits = check_tensor(student_logits, "student_logits")
    teacher_logits = check_tensor(teacher_logits, "teacher_logits")
    check_floating(student_logits, "student_logits")
    check_floating(teacher_logits, "teacher_logits")
    if student_logits.ndim < 2:
        raise ValueError(
            "student_logits must have shape (B, ..., R, K) with at least 2 dims, got "
            f"{tuple(student_logits.shape)}"
        )
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            "student_logits and teacher_logits must have the same shape, got "
            f"{tuple(student_logits.shape)} and {tuple(teacher_logits.shape)}"
        )
    student_temp = check_positive(student_temp, "student_temp")
    teacher_temp = check_positive(teacher_temp, "teacher_temp")
    reduction = check_choice(reduction, "reduction", _REDUCTIONS)
    batch = student_logits.shape[0]
    mask = _check_mask(mask, batch, "the logits")

    with _no_autocast(student_logits.device):
        target = F.softmax(_upcast(teacher_logits.detach()) / teacher_temp, dim=-1)
        log_pred = F.log_softmax(_upcast(student_logits) / student_temp, dim=-1)
        per_row = -(target * log_pred).sum(dim=-1)
        per_item = per_row.reshape(batch, -1).mean(dim=1)
        return _reduce(per_item, mask, reduction)


def paired_relation_cross_entropy(
    student_logits: Tensor,
    teacher_logits: Tensor,
    pairs: list[tuple[int, int]],
    student_temp: float = 1.0,
    teacher_temp: float = 1.0,
) -> Tensor:
    r"""``relation_cross_entropy`` of many (teacher view, student view) pairs at once.

    For pair ``(i, v)`` and item ``b`` the value is ``relation_cross_entropy(student_logits[v],
    teacher_logits[i], reduction="none")[b]``. Each view's softmax is taken once, however many
    pairs it is in, and a pair's row cross-entropies come from one batched dot product
    ``-sum_{r,k} p[i, b, r, k] * log q[v, b, r, k] / R`` (``R`` rows over all leading
    dimensions), so no pair's logits are copied: the channel term's multi-crop pairing at the
    cost of its views.

    Args:
        student_logits: ``(V, B, ..., R, K)`` the student's relation logits, view-major.
        teacher_logits: ``(G, B, ..., R, K)`` the teacher's; detached here.
        pairs: ``(i, v)`` index pairs, as ``view_pairs`` gives them.
        student_temp: ``t_s > 0``.
        teacher_temp: ``t_t > 0``.

    Returns:
        ``(P, B)`` per pair and item; float32 (or float64), also under autocast.

    Examples:
        >>> s, t = torch.randn(3, 2, 4, 4), torch.randn(2, 2, 4, 4)
        >>> paired_relation_cross_entropy(s, t, view_pairs(2, 1)).shape
        torch.Size([4, 2])
    """
    student_logits = check_tensor(student_logits, "student_logits")
    teacher_logits = check_tensor(teacher_logits, "teacher_logits")
    check_floating(student_logits, "student_logits")
    check_floating(teacher_logits, "teacher_logits")
    if student_logits.ndim < 4 or student_logits.shape[1:] != teacher_logits.shape[1:]:
        raise ValueError(
            "student_logits (V, B, ..., R, K) and teacher_logits (G, B, ..., R, K) must agree "
            f"but in the first dim, got {tuple(student_logits.shape)} and "
            f"{tuple(teacher_logits.shape)}"
        )
    views = student_logits.shape[0]
    if not pairs or not all(0 <= i < teacher_logits.shape[0] and 0 <= v < views for i, v in pairs):
        raise ValueError(
            f"pairs must be a non-empty list of (i, v) with i < {teacher_logits.shape[0]} and "
            f"v < {views}, got {pairs!r}"
        )
    student_temp = check_positive(student_temp, "student_temp")
    teacher_temp = check_positive(teacher_temp, "teacher_temp")
    rows = student_logits[0, 0, ..., 0].numel()
    with _no_autocast(student_logits.device):
        target = F.softmax(_scaled(_upcast(teacher_logits.detach()), teacher_temp), dim=-1)
        log_pred = F.log_softmax(_scaled(_upcast(student_logits), student_temp), dim=-1)
        # Each view's softmax once; each pair's rows from one batched dot product, so no
        # (B, ..., R, K) temporary per pair. The views come from unbind, whose backward stacks
        # their gradients once (indexing a view would fill a zero tensor of all V views per view).
        targets = target.flatten(2).unbind(0)  # G x (B, R * K)
        preds = log_pred.flatten(2).unbind(0)  # V x (B, R * K)
        out = [-torch.einsum("bx,bx->b", targets[i], preds[v]) / rows for i, v in pairs]
        return torch.stack(out)


def paired_channel_relation_cross_entropy(
    student: Sequence[Tensor],
    teacher: Sequence[Tensor],
    pairs: list[tuple[int, int]],
    student_temp: float = 1.0,
    teacher_temp: float = 1.0,
    *,
    backend: str = "auto",
) -> Tensor:
    r"""Channel self-relation cross-entropy of many (teacher view, student view) pairs (Eq. 4-5).

    For pair ``(i, v)`` and item ``b`` the value is ``channel_relation_cross_entropy(student[v],
    teacher[i], student_temp, teacher_temp, reduction="none")[b]``: logits ``x^T x / N`` per
    view, row cross-entropy over the ``C`` rows, averaged. Views may have different token counts
    (globals and locals); the relation ``(C, C)`` does not depend on it. Each view's relation and
    softmax are formed once, however many pairs it is in: the channel term's multi-crop pairing
    (``view_pairs``) at the cost of its views.

    Backends: ``"reference"`` (``channel_relation`` of every view, then
    ``paired_relation_cross_entropy``, under autograd), ``"dense"`` (the same values from one
    pass over each view's relation, keeping each view's softmax for a backward of one batched
    matmul per view), ``"chunked"`` (the same, keeping two numbers per row and recomputing the
    relations in the backward: the memory-saving mode), ``"triton"`` (the Triton kernel of
    ``channel_relation_cross_entropy``, pair by pair), or ``"auto"``: the size rule of
    ``channel_relation_cross_entropy`` (dense while one item's ``C x C`` float32 logits fit
    in 8 MiB).

    Args:
        student: ``V`` tensors ``(B, N_v, C)``, the student's projected tokens of each view.
        teacher: ``G`` tensors ``(B, N_i, C)``, the teacher's; detached, no gradient reaches them.
        pairs: ``(i, v)`` index pairs into ``teacher`` and ``student``, as ``view_pairs``
            gives them.
        student_temp: ``t_s > 0``.
        teacher_temp: ``t_t > 0``.
        backend: ``"auto"``, ``"reference"``, ``"dense"``, ``"chunked"`` or ``"triton"``.

    Returns:
        ``(P, B)`` per pair and item; float32 (or float64), also under autocast.

    Examples:
        >>> views = [torch.randn(2, 49, 8), torch.randn(2, 49, 8), torch.randn(2, 9, 8)]
        >>> pairs = view_pairs(2, 1)
        >>> out = paired_channel_relation_cross_entropy(views, views[:2], pairs, 1.0, 0.1)
        >>> one = channel_relation_cross_entropy(views[2], views[1], 1.0, 0.1, reduction="none")
        >>> out.shape, bool(torch.allclose(out[3], one, atol=1e-6))
        (torch.Size([4, 2]), True)
    """
    students = _check_views(student, "student")
    teachers = _check_views(teacher, "teacher")
    batch, channels = students[0].shape[0], students[0].shape[2]
    for name, views in (("student", students), ("teacher", teachers)):
        for k, x in enumerate(views):
            if x.shape[0] != batch or x.shape[2] != channels or x.shape[1] == 0:
                raise ValueError(
                    f"every view must be (B, N, C) with B={batch}, C={channels} and N >= 1 as "
                    f"student[0]; got {name}[{k}] of shape {tuple(x.shape)}"
                )
            if x.device != students[0].device:
                raise ValueError(
                    f"every view must be on {students[0].device} as student[0], got {name}[{k}] "
                    f"on {x.device}"
                )
    if (
        not pairs
        or not all(isinstance(pair, tuple) and len(pair) == 2 for pair in pairs)
        or not all(0 <= i < len(teachers) and 0 <= v < len(students) for i, v in pairs)
    ):
        raise ValueError(
            f"pairs must be a non-empty list of (i, v) with i < {len(teachers)} and "
            f"v < {len(students)}, got {pairs!r}"
        )
    student_temp = check_positive(student_temp, "student_temp")
    teacher_temp = check_positive(teacher_temp, "teacher_temp")
    widest = max(students + teachers, key=lambda x: x.shape[1])
    backend = _fused.resolve_backend(backend, widest.transpose(1, 2).unsqueeze(1))
    if backend == "reference":
        with _no_autocast(students[0].device):  # the relations in float32, as above
            student_logits = torch.stack([channel_relation(_upcast(x)) for x in students])
            teacher_logits = torch.stack([channel_relation(_upcast(y)) for y in teachers])
        return paired_relation_cross_entropy(
            student_logits,
            teacher_logits,
            pairs,
            student_temp,
            teacher_temp,
        )
    if backend in ("dense", "chunked"):
        return _fused.paired_channel_cross_entropy(
            students, teachers, pairs, student_temp, teacher_temp, save=backend == "dense"
        )
    return torch.stack(
        [
            channel_relation_cross_entropy(
                students[v],
                teachers[i],
                student_temp,
                teacher_temp,
                reduction="none",
                backend=backend,
            )
            for i, v in pairs
        ]
    )


def _check_views(views: object, name: str) -> list[Tensor]:
    """Check a non-empty sequence of floating ``(B, N, C)`` tensors."""
    if isinstance(views, Tensor) or not isinstance(views, Sequence) or not views:
        raise TypeError(
            f"{name} must be a non-empty list of (B, N, C) tensors, one per view, got "
            f"{type(views).__name__}"
        )
    out = []
    for k, x in enumerate(views):
        checked = check_ndim(x, 3, f"{name}[{k}]", "(B, N, C)")
        check_floating(checked, f"{name}[{k}]")
        out.append(checked)
    return out


def _scaled(logits: Tensor, temp: float) -> Tensor:
    """``logits / temp``, without a pass over the logits when ``temp`` is 1."""
    return logits if temp == 1.0 else logits / temp


def _check_mask(mask: object, batch: int, what: str) -> Tensor | None:
    """Check an optional ``(B,)`` bool mask over a batch of ``batch`` items of ``what``."""
    if mask is None:
        return None
    checked = check_ndim(mask, 1, "mask", "(B,)")
    if checked.dtype != torch.bool:
        raise TypeError(f"mask must be a bool tensor, got dtype {checked.dtype}")
    if checked.shape[0] != batch:
        raise ValueError(
            f"mask must have shape ({batch},) to match {what}, got {tuple(checked.shape)}"
        )
    return checked


def _reduce(per_item: Tensor, mask: Tensor | None, reduction: str) -> Tensor:
    """Masked reduction of per-item losses ``(B,)``, as ``relation_cross_entropy`` states."""
    with _no_autocast(per_item.device):
        if mask is None:
            kept = per_item
            count = per_item.new_tensor(float(per_item.shape[0]))
        else:
            kept = torch.where(mask.to(per_item.device), per_item, per_item.new_zeros(()))
            count = mask.sum().to(per_item)
        if reduction == "none":
            return kept
        total = kept.sum()
        if reduction == "sum":
            return total
        return total / count.clamp(min=1.0)


def _check_pair(student: object, teacher: object, layout: str) -> tuple[Tensor, Tensor]:
    """Check student and teacher features ``(B, *, C)`` laid out as ``layout``."""
    s = check_ndim(student, 3, "student", layout)
    t = check_ndim(teacher, 3, "teacher", layout)
    check_floating(s, "student")
    check_floating(t, "teacher")
    return s, t


def spatial_relation_cross_entropy(
    student: Tensor,
    teacher: Tensor,
    num_heads: int,
    student_temp: float = 1.0,
    teacher_temp: float = 1.0,
    mask: Tensor | None = None,
    *,
    reduction: str = "mean",
    backend: str = "auto",
) -> Tensor:
    r"""Spatial self-relation cross-entropy of sampled features (paper Eq. 2-3), fused.

    The value of ``relation_cross_entropy(spatial_relation(student, M),
    spatial_relation(teacher, M), student_temp, teacher_temp, mask, reduction=reduction)``: per
    head ``m`` the logits ``A_m = X_m X_m^T / sqrt(D)``, ``D = C / M``, and per row ``i``
    ``CE_i = -sum_j softmax(T_i / t_t)_j * log_softmax(A_i / t_s)_j``, averaged over heads and
    rows, then over the kept items. The chunked and Triton backends never hold the
    ``(B, M, S, S)`` logits: they stream them in blocks and recompute them in the backward, so
    memory grows with ``S``, not ``S^2`` (``sere_loss._fused`` has the maths of the gradient).

    Backends: ``"reference"`` (the materialised kernels above, under autograd), ``"dense"``
    (PyTorch, any device: the logits in cache-sized blocks of items, keeping ``G + G^T``,
    ``G = q - p``, for a backward of one batched matmul), ``"chunked"`` (PyTorch, any device:
    the same blocks, keeping ``O(S)`` per row and recomputing the logits in the backward, the
    memory-saving mode), ``"triton"`` (CUDA, optional ``triton`` package), or ``"auto"``: dense
    while one item's ``M * S * S`` float32 logits fit in 8 MiB, beyond that Triton on CUDA when
    it imports, else chunked. The fused backends (all but the reference) have no second
    derivative: ``create_graph=True`` raises there.

    Args:
        student: sampled student features ``(B, S, C)``.
        teacher: sampled teacher features ``(B, S, C)``; detached, no gradient reaches it.
        num_heads: ``M``, must divide ``C``.
        student_temp: ``t_s > 0``.
        teacher_temp: ``t_t > 0``.
        mask: optional ``(B,)`` bool, the items to keep, as in ``relation_cross_entropy``.
        reduction: ``"mean"``, ``"sum"`` or ``"none"``, as in ``relation_cross_entropy``.
        backend: ``"auto"``, ``"reference"``, ``"dense"``, ``"chunked"`` or ``"triton"``.

    Returns:
        A scalar, or ``(B,)`` for ``reduction="none"``; float32 (or float64), also under
        autocast.

    Examples:
        >>> s, t = torch.randn(2, 20, 12), torch.randn(2, 20, 12)
        >>> fused = spatial_relation_cross_entropy(s, t, 3, backend="chunked")
        >>> ref = relation_cross_entropy(spatial_relation(s, 3), spatial_relation(t, 3))
        >>> bool(torch.allclose(fused, ref, atol=1e-5))
        True
    """
    student, teacher = _check_pair(student, teacher, "(B, S, C)")
    if student.shape != teacher.shape:
        raise ValueError(
            "student and teacher must have the same shape (B, S, C), got "
            f"{tuple(student.shape)} and {tuple(teacher.shape)}"
        )
    num_heads = _check_heads(student, num_heads, "student")
    student_temp = check_positive(student_temp, "student_temp")
    teacher_temp = check_positive(teacher_temp, "teacher_temp")
    reduction = check_choice(reduction, "reduction", _REDUCTIONS)
    mask = _check_mask(mask, student.shape[0], "the features")
    pattern = "b s (m d) -> b m s d"
    student_rows: Tensor = rearrange(student, pattern, m=num_heads)
    backend = _fused.resolve_backend(backend, student_rows)
    if backend == "reference":
        # The relations in float32 too: float16 logits overflow at feature scales of ~30.
        with _no_autocast(student.device):
            student_logits = spatial_relation(_upcast(student), num_heads)
            teacher_logits = spatial_relation(_upcast(teacher), num_heads)
        return relation_cross_entropy(
            student_logits,
            teacher_logits,
            student_temp,
            teacher_temp,
            mask,
            reduction=reduction,
        )
    per_item = gram_relation_cross_entropy(
        student_rows,
        rearrange(teacher.detach(), pattern, m=num_heads),
        student_rows.shape[-1] ** -0.5,
        student_temp,
        teacher_temp,
        backend=backend,
    )
    return _reduce(per_item, mask, reduction)


def gram_relation_cross_entropy(
    student: Tensor,
    teacher: Tensor,
    scale: float,
    student_temp: float = 1.0,
    teacher_temp: float = 1.0,
    *,
    teacher_scale: float | None = None,
    backend: str = "auto",
    chunk_size: int | None = None,
) -> Tensor:
    r"""Per-item relation cross-entropy between the Gram relations of two row features.

    Logits ``A = scale * X X^T`` (student) and ``T = teacher_scale * Y Y^T`` (teacher, detached)
    per item and head; per row ``CE_i = -sum_j softmax(T_i / t_t)_j * log_softmax(A_i / t_s)_j``;
    the result is the mean over heads and rows. The ``"reference"`` backend materialises the
    ``R x R`` logits of the whole batch under autograd, ``"dense"`` keeps one ``R x R`` factor
    per item and head for its backward, the others keep ``O(R)``.

    Args:
        student: ``(B, M, R, D)`` row features of the student.
        teacher: ``(B, M, R, D_t)``, the teacher's (``D_t = D`` but for the channel term of a
            local view); no gradient reaches it.
        scale: ``> 0``, the factor of the student's Gram logits.
        student_temp: ``t_s > 0``.
        teacher_temp: ``t_t > 0``.
        teacher_scale: the factor of the teacher's logits; ``None`` for ``scale``.
        backend: ``"auto"``, ``"reference"``, ``"dense"``, ``"chunked"`` or ``"triton"``
            (``sere_loss._fused.resolve_backend``).
        chunk_size: rows per chunk of the chunked backend; ``None`` sizes chunks from the block
            budget (``CPU_BLOCK_BYTES`` on the CPU, ``CHUNK_BUDGET_BYTES`` elsewhere).

    Returns:
        Per-item losses ``(B,)``, float32 (float64 for float64 input), also under autocast.

    Examples:
        >>> x, y = torch.randn(2, 3, 7, 4), torch.randn(2, 3, 7, 4)
        >>> ref = gram_relation_cross_entropy(x, y, 0.5, backend="reference")
        >>> fused = gram_relation_cross_entropy(x, y, 0.5, backend="chunked", chunk_size=3)
        >>> ref.shape, bool(torch.allclose(ref, fused, atol=1e-5))
        (torch.Size([2]), True)
    """
    student = check_ndim(student, 4, "student", "(B, M, R, D)")
    teacher = check_ndim(teacher, 4, "teacher", "(B, M, R, D_t)")
    check_floating(student, "student")
    check_floating(teacher, "teacher")
    if student.shape[:3] != teacher.shape[:3]:
        raise ValueError(
            "student and teacher row features must agree in (B, M, R), got shapes "
            f"{tuple(student.shape)} and {tuple(teacher.shape)}"
        )
    if student.shape[2] == 0:
        raise ValueError(f"the row features need at least one row R, got {tuple(student.shape)}")
    scale = check_positive(scale, "scale")
    t_scale = scale if teacher_scale is None else check_positive(teacher_scale, "teacher_scale")
    student_temp = check_positive(student_temp, "student_temp")
    teacher_temp = check_positive(teacher_temp, "teacher_temp")
    if chunk_size is not None:
        chunk_size = check_positive_int(chunk_size, "chunk_size")
    backend = _fused.resolve_backend(backend, student, teacher)
    teacher = teacher.detach()
    if backend == "reference":  # the materialised logits, then the reference cross-entropy
        student_logits = (student @ student.transpose(-1, -2)) * scale
        teacher_logits = (teacher @ teacher.transpose(-1, -2)) * t_scale
        return relation_cross_entropy(
            student_logits, teacher_logits, student_temp, teacher_temp, reduction="none"
        )
    return _fused.fused_gram_cross_entropy(
        student, teacher, scale / student_temp, t_scale / teacher_temp, backend, chunk_size
    )


def channel_relation_cross_entropy(
    student: Tensor,
    teacher: Tensor,
    student_temp: float = 1.0,
    teacher_temp: float = 1.0,
    mask: Tensor | None = None,
    *,
    reduction: str = "mean",
    backend: str = "auto",
) -> Tensor:
    r"""Channel self-relation cross-entropy of projected tokens (paper Eq. 4-5), fused.

    The value of ``relation_cross_entropy(channel_relation(student), channel_relation(teacher),
    student_temp, teacher_temp, mask, reduction=reduction)``: logits ``x^T x / N`` ``(C, C)`` per
    view, the row cross-entropy over the ``C`` rows, averaged, then over the kept items. The
    student and the teacher may have different token counts (a local view against a global
    one). It is the Gram form of ``spatial_relation_cross_entropy`` with one head, rows the
    ``C`` channels and features the ``N`` tokens, scaled by ``1 / N``; the backends are the same.

    Args:
        student: projected student tokens ``(B, N_s, C)``.
        teacher: projected teacher tokens ``(B, N_t, C)``; detached.
        student_temp: ``t_s > 0``.
        teacher_temp: ``t_t > 0``.
        mask: optional ``(B,)`` bool, the items to keep.
        reduction: ``"mean"``, ``"sum"`` or ``"none"``.
        backend: ``"auto"``, ``"reference"``, ``"dense"``, ``"chunked"`` or ``"triton"``.

    Returns:
        A scalar, or ``(B,)`` for ``reduction="none"``; float32 (or float64).

    Examples:
        >>> s, t = torch.randn(2, 36, 8), torch.randn(2, 49, 8)
        >>> fused = channel_relation_cross_entropy(s, t, teacher_temp=0.1, backend="chunked")
        >>> ref = relation_cross_entropy(channel_relation(s), channel_relation(t), 1.0, 0.1)
        >>> bool(torch.allclose(fused, ref, atol=1e-5))
        True
    """
    student, teacher = _check_pair(student, teacher, "(B, N, C)")
    if student.shape[0] != teacher.shape[0] or student.shape[2] != teacher.shape[2]:
        raise ValueError(
            "student (B, N_s, C) and teacher (B, N_t, C) must agree in B and C, got "
            f"{tuple(student.shape)} and {tuple(teacher.shape)}"
        )
    if student.shape[1] == 0 or teacher.shape[1] == 0:
        raise ValueError(
            f"the views need at least one token, got {tuple(student.shape)} and "
            f"{tuple(teacher.shape)}"
        )
    student_temp = check_positive(student_temp, "student_temp")
    teacher_temp = check_positive(teacher_temp, "teacher_temp")
    reduction = check_choice(reduction, "reduction", _REDUCTIONS)
    mask = _check_mask(mask, student.shape[0], "the features")
    student_rows = student.transpose(1, 2).unsqueeze(1)  # (B, 1, C, N_s): rows are channels
    teacher_rows = teacher.detach().transpose(1, 2).unsqueeze(1)
    backend = _fused.resolve_backend(backend, student_rows, teacher_rows)
    if backend == "reference":
        with _no_autocast(student.device):  # the relations in float32 too, as above
            student_logits = channel_relation(_upcast(student))
            teacher_logits = channel_relation(_upcast(teacher))
        return relation_cross_entropy(
            student_logits,
            teacher_logits,
            student_temp,
            teacher_temp,
            mask,
            reduction=reduction,
        )
    per_item = gram_relation_cross_entropy(
        student_rows,
        teacher_rows,
        1.0 / student.shape[1],
        student_temp,
        teacher_temp,
        teacher_scale=1.0 / teacher.shape[1],
        backend=backend,
    )
    return _reduce(per_item, mask, reduction)


def overlap_grids(
    boxes1: Tensor,
    flips1: Tensor,
    boxes2: Tensor,
    flips2: Tensor,
    lattice: int | tuple[int, int],
    points: str = "center",
) -> tuple[Tensor, Tensor, Tensor]:
    r"""Sampling grids over the overlap of two views (the region-aligned sampling ``O``).

    Each view is described by its crop box in the ORIGINAL image, normalised to [0, 1] as
    ``(x0, y0, x1, y1)``, and whether it was flipped horizontally after cropping. The overlap is
    the intersection of the two boxes; an ``Hs x Ws`` lattice of points over it is mapped into
    each view's own coordinates (``u = (x - x0) / (x1 - x0)``, ``u -> 1 - u`` when flipped) and
    written in ``grid_sample``'s convention for ``align_corners=False`` (x then y, ``2u - 1``).

    ``points="center"`` (default, the paper) puts a point at the centre of each of the
    ``Hs x Ws`` cells of the overlap. ``points="official"`` reproduces the authors' lattice,
    spaced edge to edge with both ends included (needs ``Hs, Ws >= 2``). Pairs whose boxes do
    not overlap get ``valid = False`` and grids filled with ``-2`` (outside every view), as the
    authors' code does; mask them out of any loss.

    Args:
        boxes1: ``(B, 4)`` crop boxes of the first views.
        flips1: ``(B,)`` bool, horizontal flip of the first views.
        boxes2: ``(B, 4)`` crop boxes of the second views.
        flips2: ``(B,)`` bool.
        lattice: ``(Hs, Ws)`` points, or an int for a square lattice.
        points: ``"center"`` or ``"official"``.

    Returns:
        ``(grid1, grid2, valid)``: grids ``(B, Hs, Ws, 2)`` in the boxes' dtype, and ``valid``
        ``(B,)`` bool.

    Examples:
        >>> b1 = torch.tensor([[0.0, 0.0, 0.5, 1.0]])
        >>> b2 = torch.tensor([[0.25, 0.0, 1.0, 1.0]])
        >>> f = torch.tensor([False])
        >>> g1, g2, valid = overlap_grids(b1, f, b2, f, lattice=2)
        >>> g1[0, 0, :, 0].tolist()  # x of the two columns, in view 1: u = 0.625, 0.875
        [0.25, 0.75]
        >>> valid.tolist()
        [True]
    """
    boxes1 = check_boxes(boxes1, "boxes1")
    boxes2 = check_boxes(boxes2, "boxes2")
    if boxes1.shape != boxes2.shape:
        raise ValueError(
            f"boxes1 and boxes2 must have the same shape (B, 4), got {tuple(boxes1.shape)} and "
            f"{tuple(boxes2.shape)}"
        )
    batch = boxes1.shape[0]
    flips1 = check_flips(flips1, batch, "flips1")
    flips2 = check_flips(flips2, batch, "flips2")
    hw, points = _check_lattice(lattice, points)
    return _overlap_grids_unchecked(boxes1, flips1, boxes2, flips2, hw, points)


def _check_lattice(
    lattice: object, points: object, name: str = "lattice"
) -> tuple[tuple[int, int], str]:
    """Check a ``lattice`` (named ``name``) and ``points``; return ``((Hs, Ws), points)``."""
    hs, ws = check_size(lattice, name)
    points = check_choice(points, "points", _POINTS)
    if points == "official" and (hs < 2 or ws < 2):
        raise ValueError(
            f"points='official' spaces points edge to edge and needs {name} >= (2, 2), got "
            f"{(hs, ws)}"
        )
    return (hs, ws), points


def _overlap_grids_unchecked(
    boxes1: Tensor,
    flips1: Tensor,
    boxes2: Tensor,
    flips2: Tensor,
    lattice: tuple[int, int],
    points: str,
) -> tuple[Tensor, Tensor, Tensor]:
    """``overlap_grids`` without its input checks, for callers that checked already.

    Boxes ``(B, 4)`` valid and flips ``(B,)`` bool are assumed, and ``lattice``/``points`` as
    ``_check_lattice`` returns them. Checking boxes costs a host sync on an accelerator, so
    the losses check once per step and call this.
    """
    hs, ws = lattice
    boxes2 = boxes2.to(boxes1)
    flips1 = flips1.to(boxes1.device)
    flips2 = flips2.to(boxes1.device)

    lo = torch.maximum(boxes1[:, :2], boxes2[:, :2])  # (B, 2): overlap x0, y0
    hi = torch.minimum(boxes1[:, 2:], boxes2[:, 2:])  # (B, 2): overlap x1, y1
    valid = (lo < hi).all(dim=1)

    def offsets(n: int) -> Tensor:  # where the points sit in the overlap, in [0, 1]
        def make() -> Tensor:
            k = torch.arange(n, dtype=boxes1.dtype)
            return _moved((k + 0.5) / n if points == "center" else k / (n - 1), boxes1.device)

        return _constant(("offsets", n, points, boxes1.dtype, boxes1.device), make)

    # Lattice points in original-image coordinates: xs (B, Ws), ys (B, Hs).
    xs = lo[:, :1] + offsets(ws) * (hi[:, :1] - lo[:, :1])
    ys = lo[:, 1:] + offsets(hs) * (hi[:, 1:] - lo[:, 1:])

    def to_view(boxes: Tensor, flips: Tensor) -> Tensor:
        u = (xs - boxes[:, 0:1]) / (boxes[:, 2:3] - boxes[:, 0:1])
        u = torch.where(flips[:, None], 1.0 - u, u)
        v = (ys - boxes[:, 1:2]) / (boxes[:, 3:4] - boxes[:, 1:2])
        grid = torch.stack(
            (u[:, None, :].expand(-1, hs, -1), v[:, :, None].expand(-1, -1, ws)), dim=-1
        )
        grid = 2.0 * grid - 1.0
        return torch.where(valid[:, None, None, None], grid, grid.new_full((), -2.0))

    return to_view(boxes1, flips1), to_view(boxes2, flips2), valid


def sample_region(features: Tensor, grid: Tensor, padding: str = "border") -> Tensor:
    r"""Read features at grid points by bilinear interpolation (``align_corners=False``).

    ``padding="border"`` (default) replicates the edge pixels for points between a view's
    border and its first pixel centre, so every point reads a feature of the view.
    ``padding="zeros"`` reproduces the authors' code, where such points blend with zeros.

    Args:
        features: feature maps ``(B, C, H, W)``.
        grid: ``(B, Hs, Ws, 2)`` from ``overlap_grids``.
        padding: ``"border"`` or ``"zeros"``.

    Returns:
        Sampled features ``(B, Hs * Ws, C)``, row-major over the lattice.

    Examples:
        >>> feats = torch.arange(4.0).view(1, 1, 2, 2)
        >>> sample_region(feats, torch.zeros(1, 1, 1, 2)).tolist()  # the centre
        [[[1.5]]]
    """
    features = check_ndim(features, 4, "features", "(B, C, H, W)")
    check_floating(features, "features")
    grid = check_ndim(grid, 4, "grid", "(B, Hs, Ws, 2)")
    if grid.shape[-1] != 2 or grid.shape[0] != features.shape[0]:
        raise ValueError(
            f"grid must have shape (B, Hs, Ws, 2) with B={features.shape[0]} as in features "
            f"{tuple(features.shape)}, got {tuple(grid.shape)}"
        )
    padding = check_choice(padding, "padding", _PADDINGS)
    sampled = F.grid_sample(
        features,
        grid.to(dtype=features.dtype, device=features.device),
        mode="bilinear",
        padding_mode=padding,
        align_corners=False,
    )
    return rearrange(sampled, "b c h w -> b (h w) c")


def bilinear_taps(
    grid: Tensor, hw: tuple[int, int], padding: str = "border"
) -> tuple[Tensor, Tensor]:
    r"""The four taps of ``sample_region``'s bilinear interpolation, as indices and weights.

    ``grid_sample`` with ``align_corners=False`` reads a point ``(x, y)`` of the grid at pixel
    coordinates ``u = ((x + 1) W - 1) / 2`` and ``v = ((y + 1) H - 1) / 2`` (``padding="border"``
    first clamps them to ``[0, W - 1]`` and ``[0, H - 1]``), and blends the four pixels around
    them: ``(u0, v0)`` with weight ``(1 - a)(1 - b)``, ``(u0 + 1, v0)`` with ``a (1 - b)``,
    ``(u0, v0 + 1)`` with ``(1 - a) b`` and ``(u0 + 1, v0 + 1)`` with ``a b``, where
    ``u0 = floor(u)``, ``a = u - u0`` and likewise for ``v``. A pixel outside the map weighs 0
    (with ``"border"`` only a tap of weight 0 can fall outside). The pixels are numbered
    row-major, ``v * W + u``: the order of the patch tokens of a ``(H, W)`` grid.

    Args:
        grid: ``(..., 2)`` points in ``grid_sample``'s convention (x, then y, in ``[-1, 1]``
            inside the map).
        hw: ``(H, W)`` of the map.
        padding: ``"border"`` or ``"zeros"``.

    Returns:
        ``(index, weight)``: ``(..., 4)`` int64 pixel indices, always inside the map, and
        ``(..., 4)`` weights in the grid's dtype (NaN for a NaN point).

    Examples:
        >>> index, weight = bilinear_taps(torch.tensor([[0.0, 0.0]]), (2, 2))
        >>> index.tolist(), weight.tolist()  # the centre: all four pixels, a quarter each
        ([[0, 1, 2, 3]], [[0.25, 0.25, 0.25, 0.25]])
    """
    height, width = hw
    padding = check_choice(padding, "padding", _PADDINGS)
    # Each step is one operation for every point (on a GPU, one kernel launch), for both axes
    # at once where the map is square, and for the four taps at once below.
    if height == width:
        uv = ((grid + 1) * width - 1) / 2
        if padding == "border":
            uv = uv.clamp(0, width - 1)
        uv0 = uv.floor()
        frac = uv - uv0
        (u0, v0), (a, b) = uv0.unbind(-1), frac.unbind(-1)
        (u1, v1), (not_a, not_b) = (uv0 + 1).unbind(-1), (1 - frac).unbind(-1)
    else:
        u = ((grid[..., 0] + 1) * width - 1) / 2
        v = ((grid[..., 1] + 1) * height - 1) / 2
        if padding == "border":
            u = u.clamp(0, width - 1)
            v = v.clamp(0, height - 1)
        u0, v0 = u.floor(), v.floor()
        a, b = u - u0, v - v0
        u1, v1, not_a, not_b = u0 + 1, v0 + 1, 1 - a, 1 - b
    # The taps side by side in a last dimension: (u0, v0), (u0 + 1, v0), (u0, v0 + 1),
    # (u0 + 1, v0 + 1).
    uu, vv = torch.stack([u0, u1, u0, u1], dim=-1), torch.stack([v0, v0, v1, v1], dim=-1)
    weight = torch.stack([not_a, a, not_a, a], dim=-1) * torch.stack([not_b, not_b, b, b], dim=-1)
    index = (vv.clamp(0, height - 1) * width + uu.clamp(0, width - 1)).long()
    # A NaN coordinate (boxes left unchecked, set_value_checks("off")) converts to an arbitrary
    # integer: clamped, it reads a pixel of the map (its weight is NaN, so the loss says so)
    # instead of memory outside it.
    index = index.clamp_(0, height * width - 1)
    if padding == "zeros":  # with "border" a tap outside the map already weighs exactly 0
        inside = (uu >= 0) & (uu <= width - 1) & (vv >= 0) & (vv <= height - 1)
        weight = torch.where(inside, weight, 0.0)
    return index, weight


def sample_tokens(
    tokens: Tensor, hw: tuple[int, int], grid: Tensor, padding: str = "border"
) -> Tensor:
    r"""``sample_region`` of patch tokens laid on their grid, as a weighted gather of tokens.

    The value of ``sample_region(tokens viewed as (B, C, H, W) maps, grid, padding)``: each
    point is the ``bilinear_taps`` blend of four tokens. Reading token rows ``(B * N, C)``
    directly (``embedding_bag`` with the taps' weights) takes no layout change of the tokens and
    returns ``(B, S, C)`` rows; its gradient reaches the tokens in their own layout.

    Args:
        tokens: ``(B, H * W, C)`` patch tokens, row-major on the grid.
        hw: ``(H, W)``.
        grid: ``(B, Hs, Ws, 2)`` from ``overlap_grids``.
        padding: ``"border"`` or ``"zeros"``.

    Returns:
        Sampled features ``(B, Hs * Ws, C)``, row-major over the lattice.

    Examples:
        >>> tokens = torch.arange(4.0).view(1, 4, 1)  # a 2 x 2 grid of one channel
        >>> sample_tokens(tokens, (2, 2), torch.zeros(1, 1, 1, 2)).tolist()  # the centre
        [[[1.5]]]
    """
    tokens = check_ndim(tokens, 3, "tokens", "(B, N, C)")
    check_floating(tokens, "tokens")
    height, width = check_size(hw, "hw")
    if tokens.shape[1] != height * width:
        raise ValueError(
            f"tokens must hold the H * W = {height * width} tokens of the grid {(height, width)}, "
            f"got shape {tuple(tokens.shape)}"
        )
    grid = check_ndim(grid, 4, "grid", "(B, Hs, Ws, 2)")
    if grid.shape[-1] != 2 or grid.shape[0] != tokens.shape[0]:
        raise ValueError(
            f"grid must have shape (B, Hs, Ws, 2) with B={tokens.shape[0]} as in tokens "
            f"{tuple(tokens.shape)}, got {tuple(grid.shape)}"
        )
    padding = check_choice(padding, "padding", _PADDINGS)
    maps = range(tokens.shape[0])
    first = _index(tuple(m * height * width for m in maps), tokens.device)
    grid = _moved(grid, tokens.device)
    return _gather_taps(tokens.flatten(0, 1), first, (height, width), grid, padding)


def _moved(x: Tensor, device: torch.device) -> Tensor:
    """``x`` on ``device``; from the CPU (boxes as a loader gives them) without a wait.

    A copy from host memory to a GPU is staged before the call returns, so it need not block
    the host; a copy the other way must, since the host reads its values next.
    """
    return x.to(device, non_blocking=x.device.type == "cpu")


# Tensors that depend on shapes only (index lists, lattice offsets), made once per device.
_CONSTANTS: dict[tuple[object, ...], Tensor] = {}
_MAX_CONSTANTS = 4096


def _constant(key: tuple[object, ...], make: Callable[[], Tensor]) -> Tensor:
    """``make()``, cached under ``key`` outside ``torch.compile`` (which folds it into its graph).

    Built on the CPU and copied once, such a tensor costs a GPU no kernel launch per call.
    """
    if torch.compiler.is_compiling():
        return make()
    value = _CONSTANTS.get(key)
    if value is None:
        if len(_CONSTANTS) >= _MAX_CONSTANTS:  # a bound for pathological streams of shapes
            _CONSTANTS.clear()
        value = _CONSTANTS[key] = make()
    return value


def _index(values: tuple[int, ...], device: torch.device) -> Tensor:
    """The int64 tensor of ``values`` on ``device``, made once (``_constant``)."""
    return _constant(("index", values, device), lambda: _moved(torch.tensor(values), device))


def _gather_taps(
    table: Tensor, first: Tensor, hw: tuple[int, int], grid: Tensor, padding: str
) -> Tensor:
    """Bilinear reads of many maps stored as token rows, without checks.

    ``table`` ``(R, C)`` holds maps of ``H * W`` tokens one after the other; grid ``k``
    ``(K, Hs, Ws, 2)``, on the table's device, reads the map whose first row is ``first[k]``
    (int64, ``(K,)``). Returns ``(K, Hs * Ws, C)``.
    """
    index, weight = bilinear_taps(grid, hw, padding)
    rows = F.embedding_bag(
        (index + first.view(-1, 1, 1, 1)).view(-1, 4),
        table,
        per_sample_weights=weight.view(-1, 4).to(table.dtype),
        mode="sum",
    )
    return rows.view(grid.shape[0], grid.shape[1] * grid.shape[2], table.shape[-1])


def view_pairs(num_global: int, num_local: int = 0) -> list[tuple[int, int]]:
    """The (teacher view, student view) pairs of multi-crop SERE (paper Sec. 3.4).

    The teacher sees the global views ``0 .. G-1`` only; the student sees all views, globals
    first, then locals ``G .. G+L-1``. Pairs: teacher global ``i`` with every student global
    ``j != i``, then teacher global ``i`` with every student local. No local-local and no
    same-view pairs; every pair weighs the same.

    Args:
        num_global: ``G >= 1``.
        num_local: ``L >= 0``.

    Returns:
        Global-global pairs first (teacher-major), then global-local pairs (teacher-major).

    Examples:
        >>> view_pairs(2, 2)
        [(0, 1), (1, 0), (0, 2), (0, 3), (1, 2), (1, 3)]
    """
    num_global = check_positive_int(num_global, "num_global")
    num_local = check_int(num_local, "num_local", 0)
    total = num_global + num_local
    global_pairs = [(i, j) for i in range(num_global) for j in range(num_global) if j != i]
    local_pairs = [(i, v) for i in range(num_global) for v in range(num_global, total)]
    return global_pairs + local_pairs
