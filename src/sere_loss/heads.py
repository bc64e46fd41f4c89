"""Projection and prediction heads of SERE, and the student/teacher set that a term owns.

A head maps tokens ``(B, N, C)`` to tokens ``(B, N, C')`` (``C' = C`` for the default heads).
Batch normalisation treats every token of every image as a sample (statistics over ``B * N``),
as the authors' ``BatchNorm2d`` over ``(B, C, H, W)`` maps does. Any ``nn.Module`` with that
contract can replace a default head, ``nn.Identity()`` included.
"""

from __future__ import annotations

import copy

import torch
from torch import Tensor, nn

from ._checks import check_ndim, check_positive_int, check_unit_interval

__all__ = ["PredictionHead", "ProjectionHead", "RelationHeads"]


class _TokenBatchNorm(nn.Module):
    """BatchNorm over the channels of tokens ``(B, N, C)``, statistics over ``B * N``.

    It wraps a plain ``nn.BatchNorm1d`` fed with ``(B * N, C)`` rather than subclassing it, so
    ``nn.SyncBatchNorm.convert_sync_batchnorm`` swaps the inner layer and still sees 2-D input.
    """

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.bn = nn.BatchNorm1d(dim)

    def forward(self, x: Tensor) -> Tensor:
        if x.ndim == 2:  # tokens already flattened to (B * N, C) by a _TokenHead
            return self.bn(x)  # type: ignore[no-any-return]
        batch, tokens, channels = x.shape
        _check_batch_statistics(self, batch, tokens)
        return self.bn(x.reshape(batch * tokens, channels)).reshape(batch, tokens, channels)  # type: ignore[no-any-return]


def _check_batch_statistics(module: nn.Module, batch: int, tokens: int) -> None:
    """Refuse a single token in training: BatchNorm cannot take statistics over one sample."""
    norms = [m for m in module.modules() if isinstance(m, _TokenBatchNorm)]
    plain = any(not isinstance(m.bn, nn.SyncBatchNorm) for m in norms)
    if module.training and batch * tokens < 2 and plain:
        raise ValueError(
            "the heads' BatchNorm takes its statistics over all B * N tokens and needs more "
            f"than one in training, got {batch} view(s) of {tokens} token(s): pass more "
            "images or larger views, or heads without BatchNorm"
        )


class _TokenHead(nn.Sequential):
    """A head over tokens ``(B, N, C)`` whose layers run on the flattened ``(B * N, C)``.

    Every token is a sample of the BatchNorm either way; flattening once up front means that
    each layer's output is a tensor of its own, not a reshaped view of one, so the in-place
    ReLU that follows each BatchNorm (as in the authors' heads) is a plain in-place op, and
    autograd needs no copy of the whole tensor to undo a view in the backward.
    """

    def forward(self, x: Tensor) -> Tensor:
        x = check_ndim(x, 3, "tokens", "(B, N, C)")
        batch, tokens, channels = x.shape
        _check_batch_statistics(self, batch, tokens)
        out = x.reshape(batch * tokens, channels)
        for layer in self:
            out = layer(out)
        return out.view(batch, tokens, out.shape[-1])


class ProjectionHead(_TokenHead):
    """SERE projection ``h`` (paper Sec. 3.2): BatchNorm over channels, then ReLU.

    BatchNorm takes its statistics over all ``B * N`` tokens of the views it sees.

    Args:
        dim: channel count ``C``.

    Shape:
        - Input: ``(B, N, C)``.
        - Output: ``(B, N, C)``.

    Examples:
        >>> h = ProjectionHead(384)  # ViT-S
        >>> h(torch.randn(2, 14 * 14, 384)).shape  # 2 views of 14 x 14 tokens
        torch.Size([2, 196, 384])
    """

    def __init__(self, dim: int) -> None:
        dim = check_positive_int(dim, "dim")
        super().__init__(_TokenBatchNorm(dim), nn.ReLU(inplace=True))


class PredictionHead(_TokenHead):
    """SERE prediction ``g`` (student only): bias-free linear ``C -> C``, BatchNorm, ReLU.

    The linear layer is the authors' 1x1 convolution and keeps PyTorch's default initialisation,
    as theirs does (their ``_init_weights`` is never applied to it): uniform in
    ``(-1/sqrt(C), 1/sqrt(C))``, a standard deviation of ``1/sqrt(3 C)``, 0.029 at ``C = 384``.

    Args:
        dim: channel count ``C``.

    Shape:
        - Input: ``(B, N, C)``.
        - Output: ``(B, N, C)``.

    Examples:
        >>> g = PredictionHead(384)  # ViT-S
        >>> g(torch.randn(2, 14 * 14, 384)).shape
        torch.Size([2, 196, 384])
    """

    def __init__(self, dim: int) -> None:
        dim = check_positive_int(dim, "dim")
        super().__init__(
            nn.Linear(dim, dim, bias=False), _TokenBatchNorm(dim), nn.ReLU(inplace=True)
        )


def _fresh_copy(module: nn.Module) -> nn.Module:
    """A copy of ``module`` with its own, newly drawn parameters (``reset_parameters``).

    Submodules without ``reset_parameters`` keep the copied values.
    """
    twin = copy.deepcopy(module)
    for sub in twin.modules():
        reset = getattr(sub, "reset_parameters", None)
        if callable(reset):
            reset()
    return twin


def _frozen_copy(module: nn.Module) -> nn.Module:
    twin = copy.deepcopy(module)
    for p in twin.parameters():
        p.requires_grad_(False)
    return twin


class RelationHeads(nn.Module):
    """The heads one SERE term owns: student projection and prediction, and the teacher's.

    - ``projection`` / ``prediction``: the student's heads for global views.
    - ``local_projection`` / ``local_prediction``: the student's heads for local views (their
      own BatchNorm statistics, as in the authors' code), or the global ones when
      ``local_heads=False``. They are drawn independently, as the authors' separate local
      modules are: copies of the global heads with their parameters re-initialised
      (``reset_parameters`` of every submodule that has one).
    - ``teacher_projection``: a frozen copy of ``projection`` that follows it by exponential
      moving average through ``update_teacher``. The teacher has no prediction head and sees
      global views only. Its BatchNorm runs in the same mode as this module (batch statistics
      in training) and keeps its own running buffers; they are not averaged.

    Args:
        dim: channel count ``C`` of the backbone's tokens.
        projection: the student's projection; ``None`` for ``ProjectionHead``.
        prediction: the student's prediction; ``None`` for ``PredictionHead``
            (``nn.Identity()`` when ``symmetric``).
        local_heads: give local views their own pair of heads (of the same structure as the
            global ones, independently initialised).
        symmetric: no prediction head on the student (paper Table 15, "symmetry").

    Attributes:
        projection (nn.Module): the student's projection ``h`` for global views.
        prediction (nn.Module): the student's prediction ``g`` (``nn.Identity`` when
            ``symmetric``).
        local_projection (nn.Module): the student's projection for local views (only with
            ``local_heads``).
        local_prediction (nn.Module): the student's prediction for local views (only with
            ``local_heads``).
        teacher_projection (nn.Module): the teacher's projection, frozen, moved by
            ``update_teacher``.
        local_heads (bool): whether local views have their own heads.

    Examples:
        >>> heads = RelationHeads(384)  # ViT-S
        >>> tokens = torch.randn(4, 14 * 14, 384)  # 4 global views of 14 x 14 tokens
        >>> heads.student(tokens).shape, heads.teacher(tokens).requires_grad
        (torch.Size([4, 196, 384]), False)
        >>> heads.student(torch.randn(8, 36, 384), local=True).shape  # 96 px views: 6 x 6
        torch.Size([8, 36, 384])
    """

    def __init__(
        self,
        dim: int,
        projection: nn.Module | None = None,
        prediction: nn.Module | None = None,
        *,
        local_heads: bool = True,
        symmetric: bool = False,
    ) -> None:
        super().__init__()
        dim = check_positive_int(dim, "dim")
        if symmetric and prediction is not None:
            raise ValueError(
                "symmetric=True means the student has no prediction head; got a prediction "
                f"module {type(prediction).__name__} as well"
            )
        self.projection = projection if projection is not None else ProjectionHead(dim)
        if symmetric:
            self.prediction: nn.Module = nn.Identity()
        else:
            self.prediction = prediction if prediction is not None else PredictionHead(dim)
        self.local_heads = bool(local_heads)
        if self.local_heads:
            self.local_projection: nn.Module = _fresh_copy(self.projection)
            self.local_prediction: nn.Module = _fresh_copy(self.prediction)
        self.teacher_projection = _frozen_copy(self.projection)

    def student(self, tokens: Tensor, local: bool = False) -> Tensor:
        """Student branch ``g(h(tokens))``.

        Args:
            tokens: ``(B, N, C)`` patch tokens of the student's views.
            local: use the local views' heads (when the module has them).

        Returns:
            The projected and predicted tokens, ``(B, N, C')`` (``C' = C`` for the default
            heads).
        """
        tokens = check_ndim(tokens, 3, "tokens", "(B, N, C)")
        if local and self.local_heads:
            return self.local_prediction(self.local_projection(tokens))  # type: ignore[no-any-return]
        return self.prediction(self.projection(tokens))  # type: ignore[no-any-return]

    def teacher(self, tokens: Tensor) -> Tensor:
        """Teacher branch ``h_teacher(tokens)``, without gradient.

        Args:
            tokens: ``(B, N, C)`` patch tokens of the teacher's (global) views; detached.

        Returns:
            The projected tokens, ``(B, N, C')``, with no autograd graph.
        """
        tokens = check_ndim(tokens, 3, "tokens", "(B, N, C)")
        with torch.no_grad():
            return self.teacher_projection(tokens.detach())  # type: ignore[no-any-return]

    def student_parameters_unused(self, used_local: bool) -> list[nn.Parameter]:
        """Trainable parameters that a forward without local views leaves untouched.

        The losses connect them to their output with a zero, so that DDP without
        ``find_unused_parameters`` gets a gradient for every parameter.

        Args:
            used_local: whether the forward had local views.

        Returns:
            The local heads' trainable parameters when they went unused, else an empty list.
        """
        if used_local or not self.local_heads:
            return []
        modules = (self.local_projection, self.local_prediction)
        return [p for m in modules for p in m.parameters() if p.requires_grad]

    @torch.no_grad()
    def update_teacher(self, momentum: float) -> None:
        """EMA step ``teacher = m * teacher + (1 - m) * student`` on the projection's parameters.

        Call it right after the backbone's own EMA step, with the same momentum.

        Args:
            momentum: ``m``, in [0, 1] (0.996 -> 1 in DINO).
        """
        momentum = check_unit_interval(momentum, "momentum")
        student: list[Tensor] = [p.detach() for p in self.projection.parameters()]
        teacher: list[Tensor] = list(self.teacher_projection.parameters())
        if len(student) != len(teacher):  # pragma: no cover - the teacher is a deep copy
            raise RuntimeError("teacher and student projections no longer have the same parameters")
        if student:
            torch._foreach_mul_(teacher, momentum)
            torch._foreach_add_(teacher, student, alpha=1.0 - momentum)
