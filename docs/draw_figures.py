"""Draw the figures of the site (``docs/figures/``) from real library calls and committed logs.

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
* ``method.png``: the whole spatial term on one (teacher, student) pair: the two views, their
  patch tokens, the tokens after the heads, the features read at the lattice over the overlap,
  the relations, and the row-wise cross-entropy at every lattice point.
* ``healthy.png``: the loss terms of a 400-step run of the ``tiny`` preset, from the committed
  log ``benchmarks/results/healthy-tiny/log.csv``, beside the values a flat student scores.

The lattice and the padding are the library's defaults, the authors' recipe
(``sere_loss.losses.RECIPES["authors"]``): points spaced edge to edge over the overlap, zeros
beyond a view's edge.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import sere_loss
from sere_loss import functional
from sere_loss.losses import RECIPES
from sere_loss.transforms import Crops, CropSpec, MultiCropTransform

FIGURES = ("lattice.png", "relations.png", "method.png", "healthy.png")
OUT = Path(__file__).resolve().parent / "figures"
ROOT = Path(__file__).resolve().parent.parent
HEALTHY_LOG = ROOT / "benchmarks" / "results" / "healthy-tiny" / "log.csv"
POINTS = RECIPES["authors"]["points"]  # the default recipe's lattice: edge to edge
PADDING = RECIPES["authors"]["padding"]  # and its padding: zeros beyond a view's edge
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
        boxes[0:1], flips[0:1], boxes[1:2], flips[1:2], lattice=lattice, points=POINTS
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
        ``tokens``: ``(2, N, C)``, the patch tokens of both views before the heads;
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
            "teacher": functional.sample_region(as_map(teacher), grids[0:1], PADDING),
            "student": functional.sample_region(as_map(student), grids[1:2], PADDING),
        }
        channel = {"teacher": teacher, "student": student}
        heads_m = DIM // 64
        logits_s = {k: functional.spatial_relation(v, heads_m) for k, v in spatial.items()}
        logits_c = {k: functional.channel_relation(v) for k, v in channel.items()}
        temps = {"spatial": TEACHER_TEMPS["spatial"], "channel": TEACHER_TEMPS["channel"]}
        log_student = F.log_softmax(logits_s["student"][0], dim=-1)  # (M, S, S)
        target = F.softmax(logits_s["teacher"][0] / temps["spatial"], dim=-1)
        row_losses = -(target * log_student).sum(-1).mean(0).reshape(LATTICE)
        losses = {
            "spatial": functional.relation_cross_entropy(
                logits_s["student"], logits_s["teacher"], 1.0, temps["spatial"]
            ),
            "channel": functional.relation_cross_entropy(
                logits_c["student"], logits_c["teacher"], 1.0, temps["channel"]
            ),
        }
    return {
        "tokens": tokens,
        "row_losses": row_losses,
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
    ax.set_title(f"original image {width} x {height} px: two crops, their overlap", fontsize=12)
    ax.legend(loc="lower left", fontsize=12, framealpha=0.85)
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
        ax.set_title(f"view {k + 1}, {VIEW_PX} px, {flipped}", fontsize=13, color=edge[k])
    for ax in axes:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(
        f"The {hs} x {ws} lattice over the overlap (overlap_grids, edge to edge): the same points "
        f"of the image in each view's frame; {GRID} x {GRID} tokens per view",
        fontsize=13,
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
            ax.set_title(f"{term}, {side} ({view}), t = {temp}\n{size}", fontsize=12)
            ax.set_xticks([])
            ax.set_yticks([])
        axes[r, 0].set_ylabel(
            f"row i, softmax over column j; row CE {data['losses'][term]:.2f}", fontsize=11
        )
    fig.suptitle(
        "log10 of the row-softmaxed relations of one (teacher, student) pair, random-weight "
        "ViT-Ti/16",
        fontsize=12,
    )
    fig.tight_layout()
    _save(fig, path, dpi=72)


def _rgb(features: Tensor, basis: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Features ``(..., C)`` as colours: their first three principal components, in [0, 1].

    Returns the colours ``(..., 3)`` and the basis ``(C, 3)``, so that other features can be
    shown in the same colours (``basis=``).
    """
    flat = features.reshape(-1, features.shape[-1]).double()
    centred = flat - flat.mean(0)
    if basis is None:
        basis = torch.linalg.svd(centred, full_matrices=False)[2][:3].T
    projected = centred @ basis
    lo, hi = projected.quantile(0.02, dim=0), projected.quantile(0.98, dim=0)
    colours = ((projected - lo) / (hi - lo).clamp(min=1e-12)).clamp(0, 1)
    return colours.reshape(*features.shape[:-1], 3).float(), basis


def draw_method(path: Path, crops: Crops, data: dict[str, Any]) -> None:
    """``method.png``: the spatial term on one pair, from the views to the cross-entropy."""
    import matplotlib.pyplot as plt

    points = lattice_points(crops)
    hs, ws = LATTICE
    fig = plt.figure(figsize=(14, 7.4))
    grid = fig.add_gridspec(2, 6, width_ratios=[1, 1, 1, 1, 1, 1.15], hspace=0.32, wspace=0.12)
    sides = ("teacher", "student")
    edge = ("tab:blue", "tab:orange")
    tokens = data["tokens"].reshape(2, GRID, GRID, DIM)
    token_rgb, _ = _rgb(tokens)  # one colour basis for both views' tokens
    head_maps = {k: data["channel_features"][k][0].reshape(GRID, GRID, DIM) for k in sides}
    titles = (
        "1. views\n(MultiCrop-\nTransform)",
        "2. tokens\n(TokenTap)\n",
        "3. heads\n(Relation-\nHeads)",
        f"4. {hs} x {ws} lattice\n(overlap_grids,\nsample_region)",
        "5. relation,\nhead 1 (row\nsoftmax)",
    )
    for r, side in enumerate(sides):
        axes = [fig.add_subplot(grid[r, c]) for c in range(5)]
        axes[0].imshow(crops.views[r].permute(1, 2, 0).numpy())
        xy = points["view_xy"][r].reshape(-1, 2)
        axes[0].scatter(xy[:, 0], xy[:, 1], s=5, c="white", ec="black", lw=0.3)
        axes[1].imshow(token_rgb[r].numpy(), interpolation="nearest")
        head_rgb, basis = _rgb(head_maps[side])
        axes[2].imshow(head_rgb.numpy(), interpolation="nearest")
        lattice_rgb, _ = _rgb(data["spatial_features"][side][0].reshape(hs, ws, DIM), basis)
        axes[3].imshow(lattice_rgb.numpy(), interpolation="nearest")
        relation = data["spatial"][side]
        axes[4].imshow(relation.log10().numpy(), cmap="magma", vmin=-4, vmax=0)
        flipped = ", flipped" if bool(points["flips"][r]) else ""
        role = "teacher: view 1" if side == "teacher" else f"student: view 2{flipped}"
        axes[0].set_ylabel(role, fontsize=16, color=edge[r])
        for c, ax in enumerate(axes):
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(titles[c], fontsize=16)
        branch = "h" if side == "teacher" else "g(h(.))"
        axes[2].set_xlabel(f"{branch}", fontsize=15)
        axes[3].set_xlabel("image order", fontsize=15)
        temp = TEACHER_TEMPS["spatial"] if side == "teacher" else 1.0
        axes[4].set_xlabel(f"log10, t = {temp}", fontsize=15)
    ax = fig.add_subplot(grid[:, 5])
    shown = ax.imshow(data["row_losses"].numpy(), cmap="viridis")
    fig.colorbar(shown, ax=ax, fraction=0.046, pad=0.04)
    ax.set_title(
        "6. row-wise cross-\nentropy per point\n"
        f"mean {data['losses']['spatial']:.2f}\n"
        f"(flat: ln {hs * ws} = {math.log(hs * ws):.2f})",
        fontsize=16,
    )
    ax.set_xticks([])
    ax.set_yticks([])
    fig.suptitle(
        "The spatial term on one (teacher, student) pair, random-weight ViT-Ti/16 "
        "(colours 2-4: first 3 principal components)",
        fontsize=16,
    )
    fig.subplots_adjust(left=0.03, right=0.98, top=0.78, bottom=0.06)
    _save(fig, path, dpi=80)


def read_log(path: Path = HEALTHY_LOG) -> dict[str, list[float]]:
    """The columns of a trainer's ``log.csv`` as lists of floats (empty cells as NaN)."""
    import csv

    with path.open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    return {k: [float(r[k]) if r[k] else math.nan for r in rows] for k in rows[0]}


def smooth(values: list[float], window: int = 25) -> list[float]:
    """The running mean over the last ``window`` values (fewer at the start)."""
    out = []
    for i in range(len(values)):
        part = values[max(0, i - window + 1) : i + 1]
        out.append(sum(part) / len(part))
    return out


def draw_healthy(path: Path, log: dict[str, list[float]]) -> None:
    """``healthy.png``: the three loss terms of the committed run, with their flat references."""
    import matplotlib.pyplot as plt

    # The tiny preset: 7 x 7 lattice for the 2 global-global pairs, 4 x 4 for the 8 with a local
    # view; 96 channels; DINO's 1024 prototypes.
    flat = {
        "spatial": (2 * math.log(49) + 8 * math.log(16)) / 10,
        "channel": math.log(96),
        "dino": math.log(1024),
    }
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.4))
    steps = log["step"]
    for ax, term in zip(axes, ("spatial", "channel", "dino"), strict=True):
        ax.plot(steps, log[term], color="tab:blue", lw=0.6, alpha=0.45, label="each step")
        ax.plot(steps, smooth(log[term]), color="tab:blue", lw=2, label="mean of 25 steps")
        ax.axhline(
            flat[term], color="black", ls="--", lw=1, label=f"flat student: {flat[term]:.2f}"
        )
        ax.set_title(term, fontsize=14)
        ax.set_xlabel("step", fontsize=12)
        ax.tick_params(labelsize=11)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=11, loc="best")
    fig.suptitle(
        f"DINO + SERE, --preset tiny, {len(steps)} steps (lr 0.004 per 256), seed 0, "
        "the authors' recipe: benchmarks/results/healthy-tiny/log.csv",
        fontsize=13,
    )
    fig.tight_layout()
    _save(fig, path, dpi=80)


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
    data = relation_data(crops)
    draw_lattice(paths[0], image, crops)
    draw_relations(paths[1], data)
    draw_method(paths[2], crops, data)
    draw_healthy(paths[3], read_log())
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
