r"""Diagnostics: how much a backbone's self-relations change between two views (paper Fig. 5, 6).

SERE's claim (paper Sec. 4.4) is that it makes self-relations *invariant* to augmentation: two
views of one image relate their patches (spatial) and their channels (channel) the same way.
This module measures that on any backbone's tokens or feature maps (a ViT's pre-norm patch
tokens from ``sere_loss.TokenTap``, say), given the views' crop boxes and flips. The maths
of a relation is not restated here: the spatial relation is
``spatial_relation`` of the features that
``overlap_grids`` and ``sample_region`` read
at the same points of the two views' overlap, and the channel relation is
``channel_relation`` of each whole view.

Two readings of "how different":

- **plain**: the total-variation distance ``TV(p, q) = 1/2 sum_j |p_j - q_j|`` between the two
  views' softmax rows (the relation of one point, or one channel, to all others), averaged over
  rows and heads. In ``[0, 1]``. It mixes invariance with *sharpness*: a model whose rows are
  flat scores low whatever it has learnt, and one that sharpens its relations (SERE does: its
  loss has a teacher temperature of 0.5 / 0.1) scores high even when it ranks the same points
  first in both views.
- **controlled** (recommended): every row of both views is first brought to the same entropy,
  ``entropy * log K`` for ``K`` entries per row (default half the maximum: the row spreads over
  about ``sqrt(K)`` entries), by a per-row temperature found by bisection
  (``match_entropy``). The distance between the views of the same image is then divided by
  the same distance between a view of this image and a view of *another* image (at the same
  lattice points, or the same channels). 0 means the two views relate the same way; 1 means no
  more alike than two different images. Scaling the features, or any per-row temperature,
  leaves it unchanged, and structure that every image shares (the position embedding, say)
  counts as much in the denominator as in the numerator.

Examples:
    >>> feats = torch.randn(4, 16, 6, 6)
    >>> boxes = torch.tensor([[0.0, 0.0, 1.0, 1.0]]).expand(4, 4)
    >>> flips = torch.zeros(4, dtype=torch.bool)
    >>> same = relation_invariance(feats, feats, boxes, flips, boxes, flips)
    >>> summary = same.summary()
    >>> summary["spatial_plain"], summary["spatial_controlled"]
    (0.0, 0.0)
"""

from __future__ import annotations

import dataclasses
import math
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor

from ._checks import (
    check_boxes,
    check_choice,
    check_flips,
    check_int,
    check_positive,
    check_positive_int,
    check_size,
    check_tensor,
)
from ._views import to_maps, to_tokens
from .functional import (
    _check_lattice,
    channel_relation,
    overlap_grids,
    sample_region,
    spatial_relation,
)

if TYPE_CHECKING:  # pragma: no cover
    from matplotlib.figure import Figure

__all__ = [
    "RelationInvariance",
    "RelationMaps",
    "match_entropy",
    "plot_relation_maps",
    "relation_invariance",
    "relation_maps",
]

_PLOT_EXTRA = 'plotting needs matplotlib: pip install "sere-loss[plot]"'
# match_entropy: the bracket of log(inverse temperature) for rows rescaled to a range of 1, the
# relative tolerance on the entropy, and a bound on the iterations (Newton takes about 10; the
# bisection that guards it halves the bracket each time, so 26 / 2**100 is far below rounding).
_LOG_BETA_RANGE = (-10.0, 16.0)
_ENTROPY_TOL = 1e-12
_MAX_STEPS = 100


def match_entropy(logits: Tensor, entropy: float = 0.5) -> Tensor:
    r"""Rescale each row of ``logits`` so that its softmax has a given entropy.

    Row ``l`` of ``K`` entries becomes ``beta * l``, with ``beta > 0`` chosen so that
    ``H(softmax(beta * l)) = entropy * log K`` (in nats). The softmax entropy falls
    monotonically from ``log K`` at ``beta = 0`` to ``log t`` as ``beta`` grows, ``t`` the
    number of entries tied at the row's maximum, so the root is unique; it is found by Newton's
    method on ``log beta`` (``dH / d log beta = -beta^2 Var_p(l)``), kept inside a bisection
    bracket. Each row is divided by its range (max - min) first, so scaling the logits by any
    factor gives the same result (up to rounding). Two kinds of row cannot reach the target and
    are returned at their limit: a constant row stays constant (uniform softmax), and a row whose
    maximum is shared by at least ``K ** entropy`` entries is returned at its sharpest (uniform
    over its ties).

    Args:
        logits: ``(..., K)`` with ``K >= 2``; computed in float64.
        entropy: the target as a fraction of ``log K``, in ``(0, 1)``.

    Returns:
        The rescaled logits ``(..., K)``, float64.

    Examples:
        >>> rows = match_entropy(torch.randn(3, 10) * 50.0, entropy=0.5)
        >>> h = -(rows.softmax(-1) * rows.log_softmax(-1)).sum(-1)
        >>> torch.allclose(h, torch.full((3,), 0.5 * math.log(10), dtype=torch.float64))
        True
    """
    logits = check_tensor(logits, "logits")
    if not logits.is_floating_point() or logits.ndim < 1 or logits.shape[-1] < 2:
        raise ValueError(
            f"logits must be a floating-point tensor (..., K) with K >= 2, got dtype "
            f"{logits.dtype} and shape {tuple(logits.shape)}"
        )
    fraction = _check_fraction(entropy, "entropy")
    x = logits.detach().double()
    if not bool(torch.isfinite(x).all()):
        raise ValueError("logits must be finite, got NaN or inf")
    x = x - x.amax(dim=-1, keepdim=True)
    spread = -x.amin(dim=-1, keepdim=True)  # max - min >= 0
    unit = x / torch.where(spread == 0, torch.ones_like(spread), spread)  # each row in [-1, 0]
    target = fraction * math.log(logits.shape[-1])
    ties = (unit == 0).sum(dim=-1, keepdim=True).double()
    lo = torch.full_like(spread, _LOG_BETA_RANGE[0])
    hi = torch.full_like(spread, _LOG_BETA_RANGE[1])
    # Rows that cannot get as sharp as asked (constant rows among them) stop at their sharpest.
    stuck = ties.log() >= target
    t = torch.where(stuck, hi, torch.zeros_like(spread))  # log beta
    done = stuck.clone()
    for _ in range(_MAX_STEPS):
        beta = t.exp()
        log_p = F.log_softmax(unit * beta, dim=-1)
        p = log_p.exp()
        gap = -(p * log_p).sum(dim=-1, keepdim=True) - target  # > 0: too flat, beta must grow
        done |= gap.abs() <= _ENTROPY_TOL * target
        if bool(done.all()):
            break
        lo = torch.where(gap > 0, t, lo)
        hi = torch.where(gap > 0, hi, t)
        mean = (p * unit).sum(dim=-1, keepdim=True)
        var = (p * unit.square()).sum(dim=-1, keepdim=True) - mean.square()
        newton = t + gap / (beta.square() * var)
        inside = torch.isfinite(newton) & (newton > lo) & (newton < hi)
        t = torch.where(done, t, torch.where(inside, newton, 0.5 * (lo + hi)))
    return unit * t.exp()


def _entropy(logits: Tensor) -> Tensor:
    """Entropy (nats) of ``softmax(logits)`` over the last dim."""
    log_p = F.log_softmax(logits, dim=-1)
    return -(log_p.exp() * log_p).sum(dim=-1)


def _total_variation(logits1: Tensor, logits2: Tensor) -> Tensor:
    """``1/2 sum_j |softmax(l1)_j - softmax(l2)_j|`` per row: ``(..., K) -> (...)``."""
    return 0.5 * (F.softmax(logits1, dim=-1) - F.softmax(logits2, dim=-1)).abs().sum(dim=-1)


def _check_fraction(value: object, name: str) -> float:
    number = check_positive(value, name)
    if number >= 1.0:
        raise ValueError(f"{name} must be a fraction of the maximum entropy in (0, 1), got {value}")
    return number


@dataclasses.dataclass(frozen=True)
class RelationInvariance:
    """Per-image distances between two views' self-relations, from ``relation_invariance``.

    Every field is ``(B,)`` float64, one value per image (per pair of views). Distances are
    total-variation distances between softmax rows, averaged over rows (and heads): in
    ``[0, 1]``. Spatial fields are NaN where the two views do not overlap (``valid`` False);
    ``summary`` leaves those images out.

    Attributes:
        valid: ``(B,)`` bool, the views overlap (the spatial fields are defined).
        spatial_plain: plain distance of the spatial relations on the overlap lattice.
        spatial_entropy: mean row entropy of the plain spatial relations (both views), in nats:
            their sharpness.
        spatial_same: distance after both views' rows are brought to the same entropy.
        spatial_other: the same, between this image's first view and another image's second.
        channel_plain: plain distance of the channel relations of the whole views.
        channel_entropy: mean row entropy of the plain channel relations.
        channel_same: distance after entropy matching.
        channel_other: the same, against another image.

    Examples:
        ViT-S/16 maps (384 channels) of the two global views of 8 images, 224 px each:

        >>> f1, f2 = torch.randn(8, 384, 14, 14), torch.randn(8, 384, 14, 14)
        >>> boxes1 = torch.tensor([[0.0, 0.0, 0.8, 0.9]]).expand(8, 4)
        >>> boxes2 = torch.tensor([[0.2, 0.1, 1.0, 1.0]]).expand(8, 4)
        >>> flips = torch.zeros(8, dtype=torch.bool)
        >>> out = relation_invariance(f1, f2, boxes1, flips, boxes2, flips, num_heads=6)
        >>> out.spatial_same.shape, out.valid.all().item()
        (torch.Size([8]), True)
    """

    valid: Tensor
    spatial_plain: Tensor
    spatial_entropy: Tensor
    spatial_same: Tensor
    spatial_other: Tensor
    channel_plain: Tensor
    channel_entropy: Tensor
    channel_same: Tensor
    channel_other: Tensor

    @classmethod
    def cat(cls, parts: list[RelationInvariance]) -> RelationInvariance:
        """Join the images of several batches (each batch paired its images among themselves).

        Args:
            parts: the measures of several batches.

        Returns:
            One ``RelationInvariance`` whose fields hold every batch's images, in order.
        """
        if not parts or not all(isinstance(p, RelationInvariance) for p in parts):
            raise TypeError("parts must be a non-empty list of RelationInvariance")
        fields = [f.name for f in dataclasses.fields(cls)]
        return cls(**{name: torch.cat([getattr(p, name) for p in parts]) for name in fields})

    def summary(self) -> dict[str, float]:
        """Means over the images, and the controlled measures.

        ``*_controlled`` is ``sum(same) / sum(other)`` over the images (a ratio of means, so a
        few images with a tiny denominator do not dominate). ``*_plain`` and ``*_entropy`` are
        means. Spatial entries use the overlapping pairs only; ``pairs`` counts them.

        Returns:
            A dict of floats: ``pairs`` (the overlapping pairs counted), and for ``spatial`` and
            ``channel`` each: ``*_plain``, ``*_entropy`` and ``*_controlled`` (0: the two views
            relate alike; 1: no more alike than two different images).

        Raises:
            ValueError: when no pair overlaps, or when another image's relations are as far as
                nothing from this image's (a model that gives every image the same relations):
                the controlled measure is undefined then.
        """
        valid = self.valid
        if not bool(valid.any()):
            raise ValueError("no pair of views overlaps: the spatial measures are undefined")
        out = {"pairs": float(valid.sum())}
        for term, keep in (("spatial", valid), ("channel", torch.ones_like(valid))):
            other = getattr(self, f"{term}_other")[keep].sum()
            if float(other) <= 0.0:
                raise ValueError(
                    f"the {term} relations of different images are identical after entropy "
                    "matching: the controlled measure is undefined (a collapsed model?)"
                )
            out[f"{term}_plain"] = float(getattr(self, f"{term}_plain")[keep].mean())
            out[f"{term}_entropy"] = float(getattr(self, f"{term}_entropy")[keep].mean())
            out[f"{term}_controlled"] = float(getattr(self, f"{term}_same")[keep].sum() / other)
        return out


def _maps_of(
    x: object, num_prefix_tokens: int, grid: int | tuple[int, int] | None, name: str
) -> Tensor:
    """Feature maps ``(B, C, H, W)`` from tokens ``(B, T, C)`` or maps."""
    tokens, hw = to_tokens(check_tensor(x, name), num_prefix_tokens, grid, name)
    return to_maps(tokens, hw)


def _two_views(
    features1: Tensor,
    features2: Tensor,
    num_prefix_tokens: int,
    grid1: int | tuple[int, int] | None,
    grid2: int | tuple[int, int] | None,
) -> tuple[Tensor, Tensor]:
    """Both views as maps ``(B, C, H, W)``, checked to agree in ``B`` and ``C``."""
    maps1 = _maps_of(features1, num_prefix_tokens, grid1, "features1")
    maps2 = _maps_of(features2, num_prefix_tokens, grid2, "features2")
    if maps1.shape[:2] != maps2.shape[:2]:
        raise ValueError(
            "features1 and features2 must agree in the batch B and channels C, got maps "
            f"{tuple(maps1.shape)} and {tuple(maps2.shape)}"
        )
    return maps1, maps2


def _default_lattice(hw1: tuple[int, int], hw2: tuple[int, int]) -> tuple[int, int]:
    """The losses' default lattice for two views of token grids ``hw1`` and ``hw2``.

    One less than the grid per side when both views have the same grid, else the smaller
    view's grid (a global and a local view).
    """
    if hw1 == hw2:
        return max(hw1[0] - 1, 1), max(hw1[1] - 1, 1)
    return min(hw1, hw2, key=lambda hw: hw[0] * hw[1])


def _geometry(
    boxes1: object, flips1: object, boxes2: object, flips2: object, batch: int
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    b1, b2 = check_boxes(boxes1, "boxes1"), check_boxes(boxes2, "boxes2")
    for name, boxes in (("boxes1", b1), ("boxes2", b2)):
        if boxes.shape[0] != batch:
            raise ValueError(
                f"{name} must have shape ({batch}, 4), one box per image of the features; got "
                f"{tuple(boxes.shape)}"
            )
    return b1, check_flips(flips1, batch, "flips1"), b2, check_flips(flips2, batch, "flips2")


def relation_invariance(
    features1: Tensor,
    features2: Tensor,
    boxes1: Tensor,
    flips1: Tensor,
    boxes2: Tensor,
    flips2: Tensor,
    *,
    lattice: int | tuple[int, int] | None = None,
    num_heads: int = 1,
    temperature: float = 1.0,
    entropy: float = 0.5,
    points: str = "center",
    padding: str = "border",
    num_prefix_tokens: int = 0,
    grid1: int | tuple[int, int] | None = None,
    grid2: int | tuple[int, int] | None = None,
) -> RelationInvariance:
    r"""How differently two views of each image relate their patches and their channels (Fig. 6).

    Spatial: both views' features are read at the same ``Hs x Ws`` lattice of their overlap
    (``overlap_grids``, ``sample_region``),
    related per head (``spatial_relation``) and divided by
    ``temperature``; channel: ``channel_relation`` of each whole view,
    divided by ``temperature``. Each row's softmax in view 1 is compared with the same row in
    view 2 (total variation), plainly and after ``match_entropy``; for the controlled
    measure, view 1 of image ``b`` is also compared with view 2 of the next image (the next
    overlapping one, for the spatial term), cyclically. See the module's docstring for which
    reading to trust.

    Args:
        features1: view 1, feature maps ``(B, C, H1, W1)`` or tokens ``(B, T1, C)``.
        features2: view 2, ``(B, C, H2, W2)`` or ``(B, T2, C)``; the same ``B`` and ``C``.
        boxes1: ``(B, 4)`` view 1's crop box in the original image, normalised
            ``(x0, y0, x1, y1)``.
        flips1: ``(B,)`` bool, view 1 flipped horizontally after cropping.
        boxes2: ``(B, 4)``.
        flips2: ``(B,)``.
        lattice: ``(Hs, Ws)`` or an int. ``None``: one less than the token grid per side when
            both views have the same grid (13 x 13 for ViT-S/16 at 224 px), else the smaller
            grid (6 x 6 with a 96 px view), as the losses choose.
        num_heads: channel groups of the spatial relation (``C`` must divide by it); 1 relates
            whole tokens. Pass the backbone's head count to measure per head as the loss does.
        temperature: divides the logits of the plain measure, ``> 0``.
        entropy: the controlled measure's row entropy, a fraction of ``log K`` in ``(0, 1)``.
        points: ``"center"`` or ``"official"`` lattice points.
        padding: ``"border"`` or ``"zeros"``.
        num_prefix_tokens: CLS/register tokens to drop from tokens ``(B, T, C)``.
        grid1: view 1's token grid ``(H, W)``, for tokens of a non-square grid.
        grid2: view 2's token grid.

    Returns:
        Per-image distances; ``RelationInvariance.summary`` gives the means and the
        controlled measures.

    Raises:
        ValueError: bad shapes or options, a batch of fewer than 2 images, or fewer than 2
            overlapping pairs (the controlled measure needs another image to compare with).

    Examples:
        >>> f1, f2 = torch.randn(8, 32, 8, 8), torch.randn(8, 32, 8, 8)
        >>> boxes1 = torch.tensor([[0.0, 0.0, 0.7, 0.7]]).expand(8, 4)
        >>> boxes2 = torch.tensor([[0.2, 0.3, 1.0, 1.0]]).expand(8, 4)
        >>> flips = torch.zeros(8, dtype=torch.bool)
        >>> out = relation_invariance(f1, f2, boxes1, flips, boxes2, flips, num_heads=4)
        >>> out.spatial_plain.shape, sorted(out.summary())[:3]
        (torch.Size([8]), ['channel_controlled', 'channel_entropy', 'channel_plain'])
    """
    maps1, maps2 = _two_views(features1, features2, num_prefix_tokens, grid1, grid2)
    batch = maps1.shape[0]
    if batch < 2:
        raise ValueError(
            f"need a batch of at least 2 images (the controlled measure compares each image "
            f"with another), got {batch}"
        )
    b1, f1, b2, f2 = _geometry(boxes1, flips1, boxes2, flips2, batch)
    hw1, hw2 = (maps1.shape[2], maps1.shape[3]), (maps2.shape[2], maps2.shape[3])
    size = _default_lattice(hw1, hw2) if lattice is None else check_size(lattice, "lattice")
    size, points = _check_lattice(size, points)
    padding = check_choice(padding, "padding", ("border", "zeros"))
    heads = check_positive_int(num_heads, "num_heads")
    temp = check_positive(temperature, "temperature")
    fraction = _check_fraction(entropy, "entropy")

    with torch.no_grad():
        maps1, maps2 = maps1.detach().double(), maps2.detach().double()
        grid_1, grid_2, valid = overlap_grids(b1, f1, b2, f2, size, points)
        valid = valid.to(maps1.device)
        if int(valid.sum()) < 2:
            raise ValueError(
                f"need at least 2 pairs of views that overlap, got {int(valid.sum())} of {batch}: "
                "the controlled measure compares each pair with another image's"
            )
        x1 = sample_region(maps1, grid_1, padding)  # (B, S, C)
        x2 = sample_region(maps2, grid_2, padding)
        spatial1 = spatial_relation(x1, heads) / temp  # (B, M, S, S)
        spatial2 = spatial_relation(x2, heads) / temp
        channel1 = channel_relation(maps1.flatten(2).transpose(1, 2)) / temp  # (B, C, C)
        channel2 = channel_relation(maps2.flatten(2).transpose(1, 2)) / temp

        kept = valid.nonzero().squeeze(1)
        nan = torch.full((batch,), math.nan, dtype=torch.float64, device=maps1.device)

        def spatial_field(values: Tensor) -> Tensor:  # (B, M, S) -> (B,), NaN where not valid
            return torch.where(valid, values.flatten(1).mean(dim=1), nan)

        spatial = _distances(spatial1[kept], spatial2[kept], fraction)
        channel = _distances(channel1, channel2, fraction)
        fields: dict[str, Tensor] = {"valid": valid}
        for name, value in spatial.items():
            full = torch.zeros(batch, *value.shape[1:], dtype=value.dtype, device=value.device)
            fields[f"spatial_{name}"] = spatial_field(full.index_copy(0, kept, value))
        for name, value in channel.items():
            fields[f"channel_{name}"] = value.flatten(1).mean(dim=1)
    return RelationInvariance(**fields)


def _distances(logits1: Tensor, logits2: Tensor, fraction: float) -> dict[str, Tensor]:
    """Per-row distances of two views' relations ``(B, ..., K)``, plain and entropy-matched.

    ``other`` pairs view 1 of item ``b`` with view 2 of item ``b + 1`` (cyclically).
    """
    matched1, matched2 = match_entropy(logits1, fraction), match_entropy(logits2, fraction)
    return {
        "plain": _total_variation(logits1, logits2),
        "entropy": 0.5 * (_entropy(logits1) + _entropy(logits2)),
        "same": _total_variation(matched1, matched2),
        "other": _total_variation(matched1, matched2.roll(-1, dims=0)),
    }


@dataclasses.dataclass(frozen=True)
class RelationMaps:
    """One point's spatial relation in two views, and its change (paper Fig. 5), as arrays.

    Relations are softmax rows (they sum to 1), averaged over heads unless one head was asked.

    Attributes:
        view1: ``(H1, W1)`` the point's relation to every token of view 1, in view 1's own
            layout (as the view was cropped and flipped).
        view2: ``(H2, W2)`` the same in view 2.
        overlap1: ``(Hs, Ws)`` the point's relation to the overlap lattice in view 1, laid out
            as the original image (not flipped).
        overlap2: ``(Hs, Ws)`` the same in view 2.
        difference: ``overlap1 - overlap2``, the change the Fig. 6 measure averages.
        point: ``(row, col)`` of the chosen lattice point.
        point1: ``(u, v)`` the point in view 1's normalised coordinates, in ``[0, 1]``.
        point2: ``(u, v)`` in view 2.
        overlap_box1: the overlap in view 1's normalised coordinates ``(u0, v0, u1, v1)``
            (``u0 > u1`` when the view was flipped).
        overlap_box2: the same in view 2.

    Examples:
        One point of a ViT-S/16's relation in two 224 px views of an image (14 x 14 tokens):

        >>> feats = torch.randn(1, 384, 14, 14)
        >>> box1, box2 = torch.tensor([[0.0, 0.0, 0.8, 0.9]]), torch.tensor([[0.2, 0.1, 1.0, 1.0]])
        >>> flip = torch.tensor([False])
        >>> maps = relation_maps(feats, feats, box1, flip, box2, flip, (6, 6), num_heads=6)
        >>> maps.view1.shape, maps.overlap1.shape
        (torch.Size([14, 14]), torch.Size([13, 13]))
    """

    view1: Tensor
    view2: Tensor
    overlap1: Tensor
    overlap2: Tensor
    difference: Tensor
    point: tuple[int, int]
    point1: tuple[float, float]
    point2: tuple[float, float]
    overlap_box1: tuple[float, float, float, float]
    overlap_box2: tuple[float, float, float, float]


def relation_maps(
    features1: Tensor,
    features2: Tensor,
    boxes1: Tensor,
    flips1: Tensor,
    boxes2: Tensor,
    flips2: Tensor,
    point: tuple[int, int],
    *,
    item: int = 0,
    lattice: int | tuple[int, int] | None = None,
    num_heads: int = 1,
    head: int | None = None,
    temperature: float = 1.0,
    points: str = "center",
    padding: str = "border",
    num_prefix_tokens: int = 0,
    grid1: int | tuple[int, int] | None = None,
    grid2: int | tuple[int, int] | None = None,
) -> RelationMaps:
    r"""The relation of one overlap point to the rest, in each of two views (paper Fig. 5).

    The point is lattice point ``point = (row, col)`` of the overlap of image ``item``'s views,
    read in each view as ``relation_invariance`` reads it. Its relation to the view's own
    tokens (``spatial_relation`` of the point's feature with every
    token) gives the full maps; its row of the overlap's relation gives the maps on the
    lattice, and their difference.

    Args:
        features1: view 1, ``(B, C, H1, W1)`` or tokens ``(B, T1, C)``.
        features2: view 2.
        boxes1: ``(B, 4)`` crop boxes, normalised ``(x0, y0, x1, y1)``.
        flips1: ``(B,)`` bool.
        boxes2: ``(B, 4)``.
        flips2: ``(B,)``.
        point: ``(row, col)`` inside the lattice.
        item: which image of the batch.
        lattice: as in ``relation_invariance``.
        num_heads: channel groups of the relation.
        head: one head's relation, or ``None`` for the mean over heads.
        temperature: divides the logits, ``> 0``.
        points: ``"center"`` or ``"official"``.
        padding: ``"border"`` or ``"zeros"``.
        num_prefix_tokens: prefix tokens to drop from tokens.
        grid1: view 1's token grid, for tokens of a non-square grid.
        grid2: view 2's token grid.

    Returns:
        The maps, float64 on the features' device.

    Raises:
        ValueError: bad shapes or options, or views of image ``item`` that do not overlap.

    Examples:
        >>> feats = torch.randn(1, 8, 5, 5)
        >>> box = torch.tensor([[0.0, 0.0, 1.0, 1.0]])
        >>> flip = torch.tensor([False])
        >>> maps = relation_maps(feats, feats, box, flip, box, flip.logical_not(), (1, 2))
        >>> maps.view1.shape, maps.overlap1.shape, round(float(maps.view1.sum()), 6)
        (torch.Size([5, 5]), torch.Size([4, 4]), 1.0)
    """
    maps1, maps2 = _two_views(features1, features2, num_prefix_tokens, grid1, grid2)
    batch = maps1.shape[0]
    index = check_int(item, "item", 0)
    if index >= batch:
        raise ValueError(f"item must be < B = {batch}, got {item}")
    b1, f1, b2, f2 = _geometry(boxes1, flips1, boxes2, flips2, batch)
    hw1, hw2 = (maps1.shape[2], maps1.shape[3]), (maps2.shape[2], maps2.shape[3])
    size = _default_lattice(hw1, hw2) if lattice is None else check_size(lattice, "lattice")
    size, points = _check_lattice(size, points)
    if (
        not isinstance(point, (tuple, list))
        or len(point) != 2
        or not all(isinstance(k, int) and not isinstance(k, bool) for k in point)
        or not (0 <= point[0] < size[0] and 0 <= point[1] < size[1])
    ):
        raise ValueError(f"point must be (row, col) inside the lattice {size}, got {point!r}")
    padding = check_choice(padding, "padding", ("border", "zeros"))
    heads = check_positive_int(num_heads, "num_heads")
    if head is not None and not (isinstance(head, int) and 0 <= head < heads):
        raise ValueError(f"head must be None or an int in [0, {heads}), got {head!r}")
    temp = check_positive(temperature, "temperature")

    sl = slice(index, index + 1)
    with torch.no_grad():
        one1, one2 = maps1[sl].detach().double(), maps2[sl].detach().double()
        grid_1, grid_2, valid = overlap_grids(b1[sl], f1[sl], b2[sl], f2[sl], size, points)
        if not bool(valid.all()):
            raise ValueError(f"the views of item {index} do not overlap: nothing to map")
        s = point[0] * size[1] + point[1]
        x1, x2 = sample_region(one1, grid_1, padding), sample_region(one2, grid_2, padding)

        def row(query: Tensor, keys: Tensor) -> Tensor:
            # The query's row of spatial_relation over [query; keys]: (M, K) softmax rows.
            logits = spatial_relation(torch.cat([query, keys], dim=1), heads)[0, :, 0, 1:]
            rows = F.softmax(logits / temp, dim=-1)
            return rows.mean(dim=0) if head is None else rows[head]

        def tokens(maps: Tensor) -> Tensor:
            return maps.flatten(2).transpose(1, 2)  # (1, N, C)

        query1, query2 = x1[:, s : s + 1], x2[:, s : s + 1]
        view1 = row(query1, tokens(one1)).view(hw1)
        view2 = row(query2, tokens(one2)).view(hw2)
        overlap1 = row(query1, x1).view(size)
        overlap2 = row(query2, x2).view(size)
        # The overlap's corners in each view: the edge-to-edge lattice of 2 x 2 points.
        corners1, corners2, _ = overlap_grids(b1[sl], f1[sl], b2[sl], f2[sl], 2, "official")

    def box(corners: Tensor) -> tuple[float, float, float, float]:
        c = (corners[0].double() + 1) / 2
        return (float(c[0, 0, 0]), float(c[0, 0, 1]), float(c[1, 1, 0]), float(c[1, 1, 1]))

    def where(grid: Tensor) -> tuple[float, float]:
        g = (grid[0, point[0], point[1]].double() + 1) / 2
        return float(g[0]), float(g[1])

    return RelationMaps(
        view1=view1,
        view2=view2,
        overlap1=overlap1,
        overlap2=overlap2,
        difference=overlap1 - overlap2,
        point=(point[0], point[1]),
        point1=where(grid_1),
        point2=where(grid_2),
        overlap_box1=box(corners1),
        overlap_box2=box(corners2),
    )


def plot_relation_maps(
    maps: RelationMaps,
    images: tuple[Any, Any] | None = None,
    *,
    title: str | None = None,
) -> Figure:
    """Draw ``relation_maps`` as the paper's Fig. 5 does: views, relations, difference.

    Needs matplotlib (``pip install "sere-loss[plot]"``). Panels: each view (when ``images``
    are given) with the overlap boxed and the point marked, each view's relation map with the
    same marks, and the difference on the overlap lattice (a diverging colour map centred at 0).

    Args:
        maps: from ``relation_maps``.
        images: optional pair of images of the two views, each ``(3, H, W)`` or ``(H, W, 3)``
            (tensor or array, values in [0, 1] or uint8).
        title: figure title.

    Returns:
        A matplotlib ``Figure``; save it with ``fig.savefig(path)``.

    Raises:
        ImportError: matplotlib is not installed.

    Examples:
        >>> import matplotlib
        >>> matplotlib.use("Agg")  # no display needed
        >>> feats = torch.randn(1, 384, 14, 14)  # ViT-S/16, a 224 px view
        >>> box, flip = torch.tensor([[0.1, 0.0, 0.9, 0.8]]), torch.tensor([False])
        >>> maps = relation_maps(feats, feats, box, flip, box, ~flip, (6, 6), num_heads=6)
        >>> fig = plot_relation_maps(maps, title="one point, two views")
        >>> len(fig.axes) >= 3
        True
    """
    try:
        from matplotlib.figure import Figure
        from matplotlib.patches import Rectangle
    except ImportError as error:  # pragma: no cover - the dev environment has matplotlib
        raise ImportError(_PLOT_EXTRA) from error
    if not isinstance(maps, RelationMaps):
        raise TypeError(f"maps must be a RelationMaps, got {type(maps).__name__}")
    if images is not None and (not isinstance(images, (tuple, list)) or len(images) != 2):
        raise ValueError("images must be None or a pair (image of view 1, image of view 2)")

    panels: list[tuple[str, Any, int]] = []
    if images is not None:
        panels += [("view 1", _as_image(images[0], "images[0]"), 1)]
        panels += [("view 2", _as_image(images[1], "images[1]"), 2)]
    panels += [("relation, view 1", maps.view1.cpu().numpy(), 1)]
    panels += [("relation, view 2", maps.view2.cpu().numpy(), 2)]
    fig = Figure(figsize=(2.6 * (len(panels) + 1), 2.9), layout="constrained")
    axes = fig.subplots(1, len(panels) + 1)
    for ax, (name, array, view) in zip(axes, panels, strict=False):
        height, width = array.shape[:2]
        ax.imshow(array, extent=(0, 1, 1, 0), cmap=None if array.ndim == 3 else "viridis")
        u0, v0, u1, v1 = maps.overlap_box1 if view == 1 else maps.overlap_box2
        ax.add_patch(
            Rectangle((min(u0, u1), v0), abs(u1 - u0), v1 - v0, fill=False, ec="red", lw=1.5)
        )
        u, v = maps.point1 if view == 1 else maps.point2
        ax.plot([u], [v], marker="x", color="red", markersize=8)
        ax.set_title(f"{name} ({height}x{width})", fontsize=9)
        ax.set_axis_off()
    diff = maps.difference.cpu().numpy()
    bound = float(abs(diff).max()) or 1.0
    shown = axes[-1].imshow(diff, cmap="RdBu_r", vmin=-bound, vmax=bound)
    axes[-1].set_title("difference on the overlap", fontsize=9)
    axes[-1].plot([maps.point[1]], [maps.point[0]], marker="x", color="black", markersize=8)
    axes[-1].set_axis_off()
    fig.colorbar(shown, ax=axes[-1], shrink=0.8)
    if title:
        fig.suptitle(title, fontsize=10)
    return fig


def _as_image(image: Any, name: str) -> Any:
    """An ``(H, W, 3)`` float array in [0, 1] from a tensor or array, CHW or HWC."""
    import numpy as np

    array = image.detach().cpu().numpy() if isinstance(image, Tensor) else np.asarray(image)
    if array.ndim != 3 or 3 not in (array.shape[0], array.shape[-1]):
        raise ValueError(f"{name} must be an image (3, H, W) or (H, W, 3), got {array.shape}")
    if array.shape[-1] != 3:
        array = array.transpose(1, 2, 0)
    if array.dtype == np.uint8:
        return array.astype(np.float64) / 255.0
    return np.clip(array.astype(np.float64), 0.0, 1.0)
