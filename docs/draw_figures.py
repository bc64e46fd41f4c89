"""Draw the figures of the concepts page (``docs/concepts.md``) from real library calls.

    python docs/draw_figures.py              # writes docs/figures/*.png
    python docs/draw_figures.py --out DIR    # somewhere else

Nothing is drawn by hand. A generated image (no download) is cut into two views by
``sere_loss.transforms.MultiCropTransform``; ``sere_loss.functional.overlap_grids`` places the
lattice on their overlap; a random-weight ViT-Ti/16 gives the patch tokens through
``sere_loss.TokenTap``; ``sere_loss.RelationHeads`` projects them, and ``sere_loss.functional``
turns them into relations. Seeds are fixed, so every run draws the same figures, in a few
seconds on a CPU (after the imports). It needs matplotlib (the ``plot`` extra, part of
``docs``). ``tests/test_docs_figures.py`` runs this script and checks the points and matrices
it plots against statements of its own.

Figures (``FIGURES``):

* ``lattice.png``: the two crop boxes in the original image, their overlap, and the lattice
  points, in the original image and in each view's own frame (the second view flipped).
* ``relations.png``: the spatial relation (``S x S``, one head) and the channel relation
  (``C x C``) of the teacher and of the student, each after its softmax with its temperature.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import sere_loss
from sere_loss import functional
from sere_loss.transforms import Crops, CropSpec, MultiCropTransform

FIGURES = ("lattice.png", "relations.png")
OUT = Path(__file__).resolve().parent / "figures"
SEED = 0
IMAGE_HW = (288, 384)  # the original image, (height, width) in pixels
VIEW_PX = 224  # both views are global views of a ViT-S/16 or ViT-Ti/16 recipe
PATCH = 16  # 14 x 14 tokens per view, so the default global lattice is 13 x 13
GRID = VIEW_PX // PATCH
LATTICE = (GRID - 1, GRID - 1)  # SERELoss's default between two global views: grid minus one
DIM = 192  # ViT-Ti: 192 channels; SERE's default num_heads = 192 // 64 = 3
TEACHER_TEMPS = {"spatial": 0.5, "channel": 0.1}  # the library's defaults; students use 1.0


def make_image(seed: int = SEED) -> Tensor:
    """A generated scene: smooth colour gradients and a few soft blobs, ``(3, H, W)`` uint8.

    Smooth on purpose: a view's pixels then read almost the same colour as the original image
    at the same place, which the test uses to check that the lattice points correspond.
    """
    gen = torch.Generator().manual_seed(seed)
    height, width = IMAGE_HW
    y = torch.linspace(0, 1, height)[:, None].expand(height, width)
    x = torch.linspace(0, 1, width)[None, :].expand(height, width)
    image = torch.stack((0.25 + 0.5 * x, 0.3 + 0.4 * y, 0.7 - 0.4 * x * y))
    for _ in range(7):
        cx, cy = torch.rand(2, generator=gen)
        radius = 0.06 + 0.1 * torch.rand((), generator=gen)
        colour = torch.rand(3, 1, 1, generator=gen)
        weight = torch.exp(-(((x - cx) * width / height) ** 2 + (y - cy) ** 2) / (2 * radius**2))
        image = image * (1 - weight) + colour * weight
    return (image.clamp(0, 1) * 255).round().to(torch.uint8)


def draw_views(image: Tensor, seed: int = SEED) -> Crops:
    """Two global views drawn by ``MultiCropTransform``: the first unflipped, the second flipped."""
    transform = MultiCropTransform(
        [
            CropSpec(VIEW_PX, scale=(0.35, 1.0), flip_p=0.0),
            CropSpec(VIEW_PX, scale=(0.35, 1.0), flip_p=1.0),
        ],
        min_overlap=0.4,  # a clear overlap for the figure
    )
    torch.manual_seed(seed)
    return transform(image)


def lattice_points(crops: Crops, lattice: tuple[int, int] = LATTICE) -> dict[str, Tensor]:
    """The lattice over the two views' overlap, as the figure plots it.

    Returns:
        ``boxes`` ``(2, 4)`` and ``flips`` ``(2,)`` of the views; ``grids`` ``(2, Hs, Ws, 2)``,
        ``overlap_grids``'s output (``grid_sample`` convention); ``view_xy`` ``(2, Hs, Ws, 2)``,
        the points in each view's pixels (``x, y``, pixel centres at integers, as ``imshow``
        draws them); ``image_xy`` ``(Hs, Ws, 2)``, the points in the original image's pixels,
        mapped back from the first view's grid.
    """
    boxes, flips = crops.boxes.double(), crops.flips
    grid1, grid2, valid = functional.overlap_grids(
        boxes[0:1], flips[0:1], boxes[1:2], flips[1:2], lattice=lattice
    )
    if not bool(valid.all()):
        raise RuntimeError("the two views do not overlap; choose another seed")
    grids = torch.cat((grid1, grid2))
    # grid_sample with align_corners=False: -1 and 1 are the outer edges of the border pixels.
    view_xy = ((grids + 1) * VIEW_PX - 1) / 2
    # Back to the original image through view 1: unflip, then scale into its box.
    u = (grid1[0, ..., 0] + 1) / 2
    v = (grid1[0, ..., 1] + 1) / 2
    if bool(flips[0]):
        u = 1 - u
    x0, y0, x1, y1 = boxes[0]
    height, width = IMAGE_HW
    image_xy = torch.stack(((x0 + u * (x1 - x0)) * width, (y0 + v * (y1 - y0)) * height), -1)
    return {
        "boxes": boxes,
        "flips": flips,
        "grids": grids,
        "view_xy": view_xy,
        "image_xy": image_xy - 0.5,  # pixel coordinates of imshow: pixel centres at integers
    }


class TinyViT(nn.Module):
    """A ViT-Ti/16 of ``torch.nn`` blocks, random weights: a DINO-style backbone for the figure.

    ``patch_embed``, ``cls_token``, ``blocks``, ``norm``: the layout ``TokenTap`` recognises
    (DINO's and iBOT's ViTs). Built here rather than taken from timm, so that the script needs
    nothing beyond the ``plot`` extra.
    """

    def __init__(self, dim: int = DIM, depth: int = 4, heads: int = 3) -> None:
        super().__init__()
        self.patch_embed = nn.Conv2d(3, dim, PATCH, stride=PATCH)
        self.patch_embed.patch_size = PATCH  # type: ignore[assignment]
        self.cls_token = nn.Parameter(0.02 * torch.randn(1, 1, dim))
        self.pos_embed = nn.Parameter(0.02 * torch.randn(1, 1 + GRID * GRID, dim))
        self.blocks = nn.ModuleList(
            nn.TransformerEncoderLayer(
                dim,
                heads,
                4 * dim,
                dropout=0.0,
                activation="gelu",
                batch_first=True,
                norm_first=True,
            )
            for _ in range(depth)
        )
        self.norm = nn.LayerNorm(dim)

    def forward(self, images: Tensor) -> Tensor:
        """``(B, 3, 224, 224)`` images -> ``(B, C)`` class tokens."""
        x = self.patch_embed(images).flatten(2).transpose(1, 2)
        x = torch.cat((self.cls_token.expand(len(x), -1, -1), x), dim=1) + self.pos_embed
        for block in self.blocks:
            x = block(x)
        return self.norm(x)[:, 0]  # type: ignore[no-any-return]


def relation_data(crops: Crops) -> dict[str, Any]:
    """The relations the figure draws, from the two views through the library's own calls.

    The teacher reads view 1 and the student view 2, as in one (teacher, student) pair of SERE
    at initialisation (the teacher a copy of the student). Patch tokens come from ``TokenTap``,
    heads from ``RelationHeads`` (teacher: projection; student: projection and prediction), the
    spatial features from ``sample_region`` on the lattice of ``overlap_grids``.

    Returns:
        ``spatial_features``: ``{"teacher", "student"}`` ``(1, S, C)``; ``channel_features``:
        ``{"teacher", "student"}`` ``(1, N, C)``; ``spatial`` and ``channel``: the row-wise
        softmax of head 0's ``(S, S)`` logits and of the ``(C, C)`` logits, each at its
        branch's temperature; ``losses``: the row cross-entropy of each term for this pair.
    """
    torch.manual_seed(SEED)
    model = TinyViT().eval()
    mean = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)
    views = torch.stack([(v.float() / 255 - mean) / std for v in crops.views])
    torch.manual_seed(SEED)
    heads = sere_loss.RelationHeads(DIM)  # training mode: BatchNorm on the batch's tokens
    with sere_loss.TokenTap(model) as tap, torch.no_grad():
        model(views)
        (maps,) = tap.pop()  # (2, C, 14, 14): the patch tokens of both views on their grid
        tokens = maps.flatten(2).transpose(1, 2)  # (2, N, C)
        teacher = heads.teacher(tokens[0:1])
        student = heads.student(tokens[1:2])
        points = lattice_points(crops)
        grids = points["grids"].float()

        def as_map(t: Tensor) -> Tensor:
            return t.transpose(1, 2).reshape(1, DIM, GRID, GRID)

        spatial = {
            "teacher": functional.sample_region(as_map(teacher), grids[0:1]),
            "student": functional.sample_region(as_map(student), grids[1:2]),
        }
        channel = {"teacher": teacher, "student": student}
        heads_m = DIM // 64
        logits_s = {k: functional.spatial_relation(v, heads_m) for k, v in spatial.items()}
        logits_c = {k: functional.channel_relation(v) for k, v in channel.items()}
        temps = {"spatial": TEACHER_TEMPS["spatial"], "channel": TEACHER_TEMPS["channel"]}
        losses = {
            "spatial": functional.relation_cross_entropy(
                logits_s["student"], logits_s["teacher"], 1.0, temps["spatial"]
            ),
            "channel": functional.relation_cross_entropy(
                logits_c["student"], logits_c["teacher"], 1.0, temps["channel"]
            ),
        }
    return {
        "spatial_features": spatial,
        "channel_features": channel,
        "num_heads": heads_m,
        "spatial": {
            "teacher": F.softmax(logits_s["teacher"][0, 0] / temps["spatial"], dim=-1),
            "student": F.softmax(logits_s["student"][0, 0], dim=-1),
        },
        "channel": {
            "teacher": F.softmax(logits_c["teacher"][0] / temps["channel"], dim=-1),
            "student": F.softmax(logits_c["student"][0], dim=-1),
        },
        "losses": {k: float(v) for k, v in losses.items()},
    }


def _point_colours(hs: int, ws: int) -> Any:
    """One colour per lattice point: hue along the columns, lightness along the rows."""
    from matplotlib import colormaps

    cols = torch.linspace(0, 1, ws)[None, :].expand(hs, ws)
    rows = torch.linspace(0.6, 1, hs)[:, None].expand(hs, ws)
    rgba = colormaps["turbo"](cols.flatten().numpy())
    rgba[:, :3] *= rows.flatten().numpy()[:, None]
    return rgba


def draw_lattice(path: Path, image: Tensor, crops: Crops) -> None:
    """``lattice.png``: the boxes and the overlap in the image, the lattice in all three frames."""
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    points = lattice_points(crops)
    hs, ws = LATTICE
    colours = _point_colours(hs, ws)
    height, width = IMAGE_HW
    fig, axes = plt.subplots(
        1, 3, figsize=(12.6, 3.9), gridspec_kw={"width_ratios": [width / height, 1, 1]}
    )
    ax = axes[0]
    ax.imshow(image.permute(1, 2, 0).numpy())
    edge = ("tab:blue", "tab:orange")
    boxes = points["boxes"]
    for k in range(2):
        x0, y0, x1, y1 = (boxes[k] * torch.tensor([width, height, width, height])).tolist()
        ax.add_patch(
            Rectangle(
                (x0 - 0.5, y0 - 0.5),
                x1 - x0,
                y1 - y0,
                fill=False,
                lw=2,
                ec=edge[k],
                label=f"view {k + 1}",
            )
        )
    lo = torch.maximum(boxes[0, :2], boxes[1, :2]) * torch.tensor([width, height])
    hi = torch.minimum(boxes[0, 2:], boxes[1, 2:]) * torch.tensor([width, height])
    ax.add_patch(
        Rectangle(
            (lo[0] - 0.5, lo[1] - 0.5),
            *(hi - lo).tolist(),
            fill=True,
            lw=0,
            fc="white",
            alpha=0.3,
            label="overlap",
        )
    )
    xy = points["image_xy"].reshape(-1, 2)
    ax.scatter(xy[:, 0], xy[:, 1], s=14, c=colours, ec="white", lw=0.3)
    ax.scatter(*xy[0].tolist(), s=90, marker="*", c="white", ec="black", lw=0.8)
    ax.set_title(f"original image {width} x {height} px: two crops, their overlap", fontsize=10)
    ax.legend(loc="lower left", fontsize=8, framealpha=0.8)
    for k in range(2):
        ax = axes[k + 1]
        ax.imshow(crops.views[k].permute(1, 2, 0).numpy())
        for t in range(1, GRID):  # the token grid: 14 x 14 patches of 16 px
            ax.axhline(t * PATCH - 0.5, c="white", lw=0.3, alpha=0.5)
            ax.axvline(t * PATCH - 0.5, c="white", lw=0.3, alpha=0.5)
        xy = points["view_xy"][k].reshape(-1, 2)
        ax.scatter(xy[:, 0], xy[:, 1], s=14, c=colours, ec="white", lw=0.3)
        ax.scatter(*xy[0].tolist(), s=90, marker="*", c="white", ec="black", lw=0.8)
        flipped = "flipped" if bool(points["flips"][k]) else "not flipped"
        ax.set_title(f"view {k + 1}, {VIEW_PX} px, {flipped}", fontsize=10, color=edge[k])
    for ax in axes:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(
        f"The {hs} x {ws} lattice over the overlap (overlap_grids): the same points of the image, "
        f"read in each view's own frame; {GRID} x {GRID} tokens per view",
        fontsize=10,
    )
    fig.tight_layout()
    _save(fig, path, dpi=80)


def draw_relations(path: Path, data: dict[str, Any]) -> None:
    """``relations.png``: spatial and channel relations, teacher and student, after softmax."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(9.4, 9.0))
    spatial_size = data["spatial"]["teacher"].shape[0]
    rows = [
        ("spatial", f"S x S = {spatial_size} x {spatial_size}, head 1 of {data['num_heads']}"),
        ("channel", f"C x C = {DIM} x {DIM}"),
    ]
    for r, (term, size) in enumerate(rows):
        for c, side in enumerate(("teacher", "student")):
            probs = data[term][side]
            temp = TEACHER_TEMPS[term] if side == "teacher" else 1.0
            ax = axes[r, c]
            shown = ax.imshow(
                probs.log10().numpy(), cmap="magma", vmin=-4, vmax=0, interpolation="nearest"
            )
            fig.colorbar(shown, ax=ax, fraction=0.046, pad=0.03)
            view = "view 1" if side == "teacher" else "view 2"
            ax.set_title(f"{term}, {side} ({view}), t = {temp}\n{size}", fontsize=10)
            ax.set_xticks([])
            ax.set_yticks([])
        axes[r, 0].set_ylabel(f"row i, softmax over column j; row CE {data['losses'][term]:.2f}")
    fig.suptitle(
        "log10 of the row-softmaxed relations of one (teacher, student) pair, random-weight "
        "ViT-Ti/16",
        fontsize=11,
    )
    fig.tight_layout()
    _save(fig, path, dpi=72)


def _save(fig: Any, path: Path, dpi: int) -> None:
    """Save ``fig`` as a 256-colour PNG: a third of the bytes of matplotlib's RGBA file."""
    import matplotlib.pyplot as plt
    import numpy as np
    from PIL import Image

    fig.set_dpi(dpi)
    fig.canvas.draw()
    rgb = Image.fromarray(np.asarray(fig.canvas.buffer_rgba())).convert("RGB")
    rgb.quantize(colors=256, method=Image.Quantize.MEDIANCUT).save(path, optimize=True)
    plt.close(fig)


def draw(out: Path = OUT) -> list[Path]:
    """Draw every figure into ``out``; return their paths."""
    import matplotlib

    matplotlib.use("Agg")
    out.mkdir(parents=True, exist_ok=True)
    image = make_image()
    crops = draw_views(image)
    paths = [out / name for name in FIGURES]
    draw_lattice(paths[0], image, crops)
    draw_relations(paths[1], relation_data(crops))
    return paths


def main(argv: list[str] | None = None) -> int:
    """Command line: ``--out DIR`` (default ``docs/figures``)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=OUT, help="folder for the PNG files")
    args = parser.parse_args(argv)
    for path in draw(args.out):
        print(f"wrote {path} ({path.stat().st_size // 1024} KiB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
