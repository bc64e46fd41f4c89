"""Baseline: the SERE terms computed along the authors' route (SPEC 4 and 5).

The library samples each view's features on the lattice over the overlap first and only then
forms the ``S x S`` relations of all pairs in one batch. The authors' code goes the other way:

- every view's full ``N x N`` relation is formed for every head, once per view (the views of one
  resolution go through the heads together, so their BatchNorm sees them all at once);
- that matrix is read with ``grid_sample`` (bilinear, ``align_corners=False``, zero padding) on
  its columns and then on its rows, at the edge-to-edge lattice over the pair's overlap;
- a Python loop runs over the (teacher view, student view) pairs and averages the terms.

With two global views each global view has exactly one global partner, so, as in the authors'
code, the two global relations are sampled once, both views in one batched call, and the loop
over global pairs only compares them. For a global-local pair the teacher's full global
relation and the local view's full relation are sampled inside the loop, once per pair. The
teacher's full relation is divided by its temperature before it is sampled, and the teacher's
softmax and the student's log-softmax are taken inside the loop, once per pair, as the authors
do. The grids are computed outside the loss, where the authors' data loader computes them.

This file is written from the spec; no line comes from the authors' code. It reuses the heads of
the library's loss modules (``module.heads``), so both routes project with the same weights, and
with ``points="official"``, ``padding="zeros"`` and every pair overlapping it computes the same
loss as the library (the harness checks this before it times anything). Relations the authors
form but never use (the teacher's predicted relation, the student's unpredicted one) are left
out, which only makes this baseline faster.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sere_loss import ChannelSelfRelationLoss, SpatialSelfRelationLoss
from sere_loss.functional import overlap_grids

__all__ = ["AuthorsChannel", "AuthorsGrids", "AuthorsSERE", "AuthorsSpatial", "authors_grids"]


@dataclass
class AuthorsGrids:
    """Sampling grids of one batch, as the authors' data loader hands them to the loss.

    Attributes:
        global_pair: the grids of the global pair (view 0, view 1), ``(2 * B, Hs, Ws, 2)``: view
            0's grid for its batch, then view 1's.
        local_pairs: for teacher global ``i`` and local ``v``, ``local_pairs[i][v]`` holds the
            grids ``(global view's, local view's)``, each ``(B, hs, ws, 2)``.
    """

    global_pair: Tensor
    local_pairs: list[list[tuple[Tensor, Tensor]]]


def authors_grids(
    boxes: Tensor,
    flips: Tensor,
    num_local: int,
    global_lattice: int = 13,
    local_lattice: int = 6,
) -> AuthorsGrids:
    """Precompute every pair's grids on the authors' edge-to-edge lattice.

    Args:
        boxes: ``(B, 2 + L, 4)`` crop boxes in the original image, globals first.
        flips: ``(B, 2 + L)`` bool horizontal flips.
        num_local: ``L``.
        global_lattice: lattice side between the two globals.
        local_lattice: lattice side between a global and a local view.

    Returns:
        The grids of every pair.
    """
    g0, g1, valid = overlap_grids(
        boxes[:, 0], flips[:, 0], boxes[:, 1], flips[:, 1], global_lattice, "official"
    )
    checks = [valid]
    local_pairs: list[list[tuple[Tensor, Tensor]]] = []
    for i in range(2):
        row = []
        for v in range(2, 2 + num_local):
            gi, gv, valid = overlap_grids(
                boxes[:, i], flips[:, i], boxes[:, v], flips[:, v], local_lattice, "official"
            )
            checks.append(valid)
            row.append((gi, gv))
        local_pairs.append(row)
    if not bool(torch.cat(checks).all()):
        raise ValueError(
            "the authors' route adds log(S) for pairs that do not overlap where the library masks "
            "them; benchmark geometry must make every pair overlap"
        )
    return AuthorsGrids(torch.cat([g0, g1]), local_pairs)


def full_relation(x: Tensor, num_heads: int) -> Tensor:
    """Full multi-head spatial relation logits of whole views.

    Args:
        x: projected tokens ``(B, N, C)``.
        num_heads: ``M``.

    Returns:
        ``(B, M, N, N)`` logits, scaled by ``(C / M) ** -0.5``.
    """
    b, n, c = x.shape
    d = c // num_heads
    per_head = x.reshape(b, n, num_heads, d).transpose(1, 2)
    return (per_head @ per_head.transpose(-1, -2)) * d**-0.5


def sample_relation(rel: Tensor, grid: Tensor) -> Tensor:
    """Read a full relation at a lattice, columns first, then rows (bilinear, zero padding).

    Args:
        rel: ``(B, M, N, N)`` relation of views with a square ``sqrt(N) x sqrt(N)`` token grid.
        grid: ``(B, Hs, Ws, 2)`` points in the view, ``grid_sample`` convention.

    Returns:
        ``(B, M, S, S)`` with ``S = Hs * Ws``, rows and columns at the lattice.
    """
    b, m, n, _ = rel.shape
    side = math.isqrt(n)
    s = grid.shape[1] * grid.shape[2]

    def columns(r: Tensor, rows: int) -> Tensor:
        out = F.grid_sample(
            r.reshape(b, m * rows, side, side),
            grid,
            mode="bilinear",
            padding_mode="zeros",
            align_corners=False,
        )
        return out.reshape(b, m, rows, s)

    by_columns = columns(rel, n)  # (B, M, N, S): every row, columns at the lattice
    both = columns(by_columns.transpose(2, 3), s)  # (B, M, S_col, S_row)
    return both.transpose(2, 3)


def _cross_entropy(student: Tensor, teacher: Tensor) -> Tensor:
    """Row-wise CE, both already divided by their temperatures; mean over all rows."""
    return torch.sum(-F.softmax(teacher, dim=-1) * F.log_softmax(student, dim=-1), dim=-1).mean()


class AuthorsSpatial(nn.Module):
    """Spatial term ``L_p`` along the authors' route, with the heads of a library module.

    Args:
        library: the library's spatial loss; its heads, head count and temperatures are used.
    """

    def __init__(self, library: SpatialSelfRelationLoss) -> None:
        super().__init__()
        if library.num_global_views != 2:
            raise ValueError("the authors' route handles two global views")
        self.heads = library.heads
        self.num_heads = library.num_heads
        self.teacher_temp = library.teacher_temp
        self.student_temp = library.student_temp

    def forward(
        self,
        student_global: Tensor,
        teacher_global: Tensor,
        grids: AuthorsGrids,
        student_local: Tensor | None = None,
    ) -> Tensor:
        """Compute ``L_p``.

        Args:
            student_global: student tokens of the two globals ``(2 * B, N, C)``.
            teacher_global: teacher tokens of the same views ``(2 * B, N, C)``.
            grids: from :func:`authors_grids`.
            student_local: student tokens of the locals ``(L * B, n, C)``, or ``None``.

        Returns:
            The loss, a scalar.
        """
        with torch.no_grad():
            t_full = full_relation(self.heads.teacher(teacher_global), self.num_heads)
            t_pair = sample_relation(t_full, grids.global_pair) / self.teacher_temp
        s_full = full_relation(self.heads.student(student_global), self.num_heads)
        s_pair = sample_relation(s_full, grids.global_pair) / self.student_temp
        teacher, student = t_pair.chunk(2), s_pair.chunk(2)

        total = student_global.new_zeros(())
        terms = 0
        for i in range(2):
            for v in range(2):
                if v != i:
                    total = total + _cross_entropy(student[v], teacher[i])
                    terms += 1
        if student_local is not None:
            with torch.no_grad():
                t_sharp = (t_full / self.teacher_temp).chunk(2)
            local = self.heads.student(student_local, local=True)
            l_full = full_relation(local, self.num_heads).chunk(len(grids.local_pairs[0]))
            for i in range(2):
                for v, (grid_t, grid_l) in enumerate(grids.local_pairs[i]):
                    s_rel = sample_relation(l_full[v], grid_l) / self.student_temp
                    t_rel = sample_relation(t_sharp[i], grid_t)
                    total = total + _cross_entropy(s_rel, t_rel)
                    terms += 1
        return total / terms


class AuthorsChannel(nn.Module):
    """Channel term ``L_c`` along the authors' route, with the heads of a library module.

    Each view's ``C x C`` relation is formed once; the teacher's softmax once per teacher view,
    the student's log-softmax once per pair.

    Args:
        library: the library's channel loss; its heads and temperatures are used.
    """

    def __init__(self, library: ChannelSelfRelationLoss) -> None:
        super().__init__()
        if library.num_global_views != 2:
            raise ValueError("the authors' route handles two global views")
        self.heads = library.heads
        self.teacher_temp = library.teacher_temp
        self.student_temp = library.student_temp

    @staticmethod
    def _relation(x: Tensor) -> Tensor:
        z = x.transpose(1, 2) / math.sqrt(x.shape[1])  # (B, C, N)
        return z @ z.transpose(1, 2)

    def forward(
        self,
        student_global: Tensor,
        teacher_global: Tensor,
        student_local: Tensor | None = None,
    ) -> Tensor:
        """Compute ``L_c``; tensors as :meth:`AuthorsSpatial.forward`."""
        with torch.no_grad():
            t_rel = self._relation(self.heads.teacher(teacher_global))
            teacher = F.softmax(t_rel / self.teacher_temp, dim=-1).chunk(2)
        student = (self._relation(self.heads.student(student_global)) / self.student_temp).chunk(2)
        local: tuple[Tensor, ...] = ()
        if student_local is not None:
            l_rel = self._relation(self.heads.student(student_local, local=True))
            local = (l_rel / self.student_temp).chunk(student_local.shape[0] // student[0].shape[0])

        total = student_global.new_zeros(())
        terms = 0
        for i, q in enumerate(teacher):
            for v in range(2):
                if v != i:
                    total = total + torch.sum(-q * F.log_softmax(student[v], dim=-1), -1).mean()
                    terms += 1
            for s in local:
                total = total + torch.sum(-q * F.log_softmax(s, dim=-1), -1).mean()
                terms += 1
        return total / terms


class AuthorsSERE(nn.Module):
    """``alpha * L_p + beta * L_c`` along the authors' route.

    Args:
        spatial: the library's spatial loss (heads shared).
        channel: the library's channel loss (heads shared).
        alpha: weight of ``L_p``.
        beta: weight of ``L_c``.
    """

    def __init__(
        self,
        spatial: SpatialSelfRelationLoss,
        channel: ChannelSelfRelationLoss,
        alpha: float = 1.0,
        beta: float = 1.0,
    ) -> None:
        super().__init__()
        self.spatial = AuthorsSpatial(spatial)
        self.channel = AuthorsChannel(channel)
        self.alpha, self.beta = alpha, beta

    def forward(
        self,
        student_global: Tensor,
        teacher_global: Tensor,
        grids: AuthorsGrids,
        student_local: Tensor | None = None,
    ) -> Tensor:
        """Compute the whole loss; tensors as :meth:`AuthorsSpatial.forward`."""
        spatial = self.spatial(student_global, teacher_global, grids, student_local)
        channel = self.channel(student_global, teacher_global, student_local)
        return self.alpha * spatial + self.beta * channel
