"""The region-aligned sampling operation ``O`` (paper Sec. 3.2, Fig. 3) as a module."""

from __future__ import annotations

from torch import Tensor, nn

from ._checks import check_choice, check_ndim
from .functional import _check_lattice, overlap_grids, sample_region

__all__ = ["RegionAlignedSampler"]


class RegionAlignedSampler(nn.Module):
    """Sample two views' features at the same points of their overlap in the original image.

    A thin wrapper over ``overlap_grids`` and ``sample_region``, for use outside the losses
    (the losses sample on their own); it has no parameters. Its defaults are the functions'
    own, the paper's text: pass ``points="official", padding="zeros"`` for the authors' recipe,
    which the losses use by default.

    Args:
        lattice: ``(Hs, Ws)`` points, or an int (13 between two 224 px views, 6 with a 96 px
            view).
        points: ``"center"`` (cell centres, the paper) or ``"official"`` (the authors' lattice).
        padding: ``"border"`` or ``"zeros"`` (the authors' code).

    Shape:
        - features1, features2: ``(B, C, H1, W1)`` and ``(B, C, H2, W2)``; the two views may
          have different resolutions.
        - boxes1, boxes2: ``(B, 4)`` normalised ``(x0, y0, x1, y1)`` in the original image.
        - flips1, flips2: ``(B,)`` bool.
        - Output: ``(sampled1, sampled2, valid)``, ``(B, Hs * Ws, C)`` twice and ``(B,)`` bool.

    Examples:
        >>> sampler = RegionAlignedSampler(lattice=6, points="official", padding="zeros")
        >>> f1, f2 = torch.randn(2, 384, 14, 14), torch.randn(2, 384, 6, 6)  # ViT-S, 224 / 96 px
        >>> boxes = torch.tensor([[0.0, 0.0, 0.8, 0.8], [0.1, 0.1, 0.9, 0.7]])
        >>> flips = torch.tensor([False, True])
        >>> s1, s2, valid = sampler(f1, f2, boxes, flips, boxes.flip(0), flips)
        >>> s1.shape, s2.shape, valid.tolist()
        (torch.Size([2, 36, 384]), torch.Size([2, 36, 384]), [True, True])
    """

    def __init__(
        self, lattice: int | tuple[int, int] = 13, points: str = "center", padding: str = "border"
    ) -> None:
        super().__init__()
        self.lattice, self.points = _check_lattice(lattice, points)
        self.padding = check_choice(padding, "padding", ("border", "zeros"))

    def forward(
        self,
        features1: Tensor,
        features2: Tensor,
        boxes1: Tensor,
        flips1: Tensor,
        boxes2: Tensor,
        flips2: Tensor,
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Return both views' features at the lattice over their overlap, and ``valid``.

        Args:
            features1: ``(B, C, H1, W1)`` maps of the first views.
            features2: ``(B, C, H2, W2)`` maps of the second views (another resolution is fine).
            boxes1: ``(B, 4)`` crop boxes of the first views, normalised ``(x0, y0, x1, y1)``.
            flips1: ``(B,)`` bool, horizontal flips of the first views.
            boxes2: ``(B, 4)`` crop boxes of the second views.
            flips2: ``(B,)`` bool.

        Returns:
            ``(sampled1, sampled2, valid)``: each view's features at the same ``Hs * Ws`` points
            of the image, ``(B, Hs * Ws, C)`` twice, and ``(B,)`` bool, ``False`` where the two
            boxes do not overlap.
        """
        features1 = check_ndim(features1, 4, "features1", "(B, C, H, W)")
        features2 = check_ndim(features2, 4, "features2", "(B, C, H, W)")
        if features1.shape[:2] != features2.shape[:2]:
            raise ValueError(
                "features1 and features2 must agree on (B, C), got "
                f"{tuple(features1.shape)} and {tuple(features2.shape)}"
            )
        grid1, grid2, valid = overlap_grids(
            boxes1, flips1, boxes2, flips2, self.lattice, self.points
        )
        if grid1.shape[0] != features1.shape[0]:
            raise ValueError(
                f"boxes describe {grid1.shape[0]} images but the features hold "
                f"{features1.shape[0]} ({tuple(features1.shape)})"
            )
        return (
            sample_region(features1, grid1, self.padding),
            sample_region(features2, grid2, self.padding),
            valid.to(features1.device),
        )

    def extra_repr(self) -> str:
        """Settings shown by ``print(module)``."""
        return f"lattice={self.lattice}, points={self.points!r}, padding={self.padding!r}"
