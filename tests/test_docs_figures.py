"""The figures of the docs are drawn by ``docs/draw_figures.py``, and draw what they claim.

* The script runs (its command line, into a folder of its own) and writes every figure that a page
  of the site shows; each of those is committed under ``docs/figures/`` and small.
* The lattice it plots is the same set of original-image points seen from both views: mapped
  back through each view's box and flip (restated here), both give the points the authors'
  recipe (the library's default) places, spaced edge to edge over the boxes' intersection,
  computed here from the boxes alone. The views' own pixels, read at those
  points, agree with the original image; read without the flip, they do not.
* The relation matrices it plots are the softmaxed ``x_i . x_j / sqrt(D)`` (spatial, per head)
  and ``c^T c / N`` (channel) of the features it returns, restated in NumPy, and the losses it
  prints are their row cross-entropies.
"""

from __future__ import annotations

import importlib.util
import re
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("matplotlib", reason="the plot extra: pip install -e '.[plot]'")

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
SCRIPT = DOCS / "draw_figures.py"
IMAGE_LINK = re.compile(r"!\[[^\]]*\]\((?:\./)?(figures/[\w.-]+\.png)\)")


def page_figures() -> dict[str, list[str]]:
    """``figures/x.png`` image links of each page, by page."""
    found: dict[str, list[str]] = {}
    for page in sorted(DOCS.rglob("*.md")):
        links = IMAGE_LINK.findall(page.read_text())
        if links:
            assert page.parent == DOCS, f"{page}: figures are linked from pages in docs/ only"
            found[page.relative_to(DOCS).as_posix()] = links
    return found


@pytest.fixture(scope="module")
def script() -> ModuleType:
    spec = importlib.util.spec_from_file_location("draw_figures", SCRIPT)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["draw_figures"] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def drawn(script: ModuleType) -> dict[str, Any]:
    image = script.make_image()
    crops = script.draw_views(image)
    return {"image": image, "crops": crops, "points": script.lattice_points(crops)}


def test_script_writes_every_figure_the_pages_show(
    script: ModuleType, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    used = page_figures()
    assert "concepts.md" in used, "the concepts page shows the figures"
    names = {Path(link).name for links in used.values() for link in links}
    # The script's command line, in this process: its imports are paid once for the module.
    assert script.main(["--out", str(tmp_path)]) == 0
    assert capsys.readouterr().out.count("wrote ") == len(script.FIGURES)
    written = {p.name for p in tmp_path.glob("*.png")}
    assert names <= written, f"pages show figures the script does not draw: {names - written}"
    assert written <= names, f"the script draws figures no page shows: {written - names}"
    for name in names:
        committed = DOCS / "figures" / name
        assert committed.is_file(), f"docs/figures/{name} is not committed: run {SCRIPT.name}"
        assert committed.stat().st_size < 200_000, f"docs/figures/{name} is over 200 KB"
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _to_image(grid: torch.Tensor, box: torch.Tensor, flipped: bool) -> torch.Tensor:
    """A view's grid_sample points back to normalised original-image coordinates (x, y)."""
    u = (grid[..., 0] + 1) / 2  # align_corners=False: -1 and 1 are the view's outer edges
    v = (grid[..., 1] + 1) / 2
    if flipped:
        u = 1 - u
    return torch.stack((box[0] + u * (box[2] - box[0]), box[1] + v * (box[3] - box[1])), -1)


def test_lattice_is_the_same_image_points_in_both_views(
    script: ModuleType, drawn: dict[str, Any]
) -> None:
    points = drawn["points"]
    boxes, flips = drawn["crops"].boxes.double(), drawn["crops"].flips
    assert flips.tolist() == [False, True], "the figure shows one view flipped, one not"
    hs, ws = script.LATTICE
    assert (hs, ws) == (13, 13), "14 x 14 tokens: the default global lattice is 13 x 13"
    assert points["grids"].shape == (2, hs, ws, 2)

    # Edge to edge over the boxes' intersection, both ends included, from the boxes alone.
    x0, y0 = max(boxes[0, 0], boxes[1, 0]), max(boxes[0, 1], boxes[1, 1])
    x1, y1 = min(boxes[0, 2], boxes[1, 2]), min(boxes[0, 3], boxes[1, 3])
    assert x0 < x1, "the views overlap"
    assert y0 < y1, "the views overlap"
    expected = torch.empty(hs, ws, 2, dtype=torch.float64)
    for i in range(hs):
        for j in range(ws):
            expected[i, j, 0] = x0 + j / (ws - 1) * (x1 - x0)
            expected[i, j, 1] = y0 + i / (hs - 1) * (y1 - y0)
    for k in range(2):
        seen = _to_image(points["grids"][k], boxes[k], bool(flips[k]))
        torch.testing.assert_close(seen, expected, rtol=0, atol=1e-12)

    # What the figure plots: the same points in the image's pixels and in each view's pixels.
    height, width = script.IMAGE_HW
    scale = torch.tensor([width, height], dtype=torch.float64)
    torch.testing.assert_close(points["image_xy"], expected * scale - 0.5, rtol=0, atol=1e-9)
    for k in range(2):
        box = boxes[k]
        u = (expected[..., 0] - box[0]) / (box[2] - box[0])
        v = (expected[..., 1] - box[1]) / (box[3] - box[1])
        if flips[k]:
            u = 1 - u
        in_view = torch.stack((u, v), -1) * script.VIEW_PX - 0.5
        torch.testing.assert_close(points["view_xy"][k], in_view, rtol=0, atol=1e-9)


def _read(image: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
    """Colours of a (3, H, W) uint8 image at grid_sample points (Hs, Ws, 2): (Hs * Ws, 3)."""
    pixels = image.double()[None] / 255
    # Border padding: the edge-to-edge lattice puts points on a view's outer edge, where the
    # view's edge pixel, not a blend with zeros, is the image's colour.
    read = F.grid_sample(pixels, grid[None], align_corners=False, padding_mode="border")
    return read[0].flatten(1).T


def test_views_read_the_same_colours_at_the_lattice(
    script: ModuleType, drawn: dict[str, Any]
) -> None:
    """The recorded boxes and flips describe the pixels the transform produced."""
    points, crops = drawn["points"], drawn["crops"]
    height, width = script.IMAGE_HW
    xy = (points["image_xy"] + 0.5) / torch.tensor([width, height], dtype=torch.float64)
    original = _read(drawn["image"], 2 * xy - 1)
    views = [_read(crops.views[k], points["grids"][k]) for k in range(2)]
    unflipped = points["grids"][1].clone()
    unflipped[..., 0] = -unflipped[..., 0]  # view 2 read as if it had not been flipped
    wrong = _read(crops.views[1], unflipped)
    for view in views:
        assert (view - original).abs().mean() < 0.01  # resampling blur only
    assert (wrong - original).abs().mean() > 5 * (views[1] - original).abs().mean()


def _softmax(logits: np.ndarray, temp: float) -> np.ndarray:
    z = logits / temp
    z = np.exp(z - z.max(axis=-1, keepdims=True))
    return z / z.sum(axis=-1, keepdims=True)


def _bilinear(tokens: np.ndarray, grid: np.ndarray, side: int) -> np.ndarray:
    """Tokens (side * side, C), row-major, read at grid_sample points (Hs, Ws, 2), zero padding.

    A point at ``g`` in [-1, 1] sits at pixel ``((g + 1) * side - 1) / 2`` (pixel centres at
    integers) and blends its four neighbours by distance; a neighbour outside the map reads
    zero (the authors' padding, the library's default).
    """
    rows = []
    for gx, gy in grid.reshape(-1, 2):
        px, py = ((gx + 1) * side - 1) / 2, ((gy + 1) * side - 1) / 2
        x0, y0 = int(np.floor(px)), int(np.floor(py))
        a, b = px - x0, py - y0

        def at(x: int, y: int) -> np.ndarray:
            inside = 0 <= x < side and 0 <= y < side
            return tokens[y * side + x] if inside else np.zeros(tokens.shape[1])

        rows.append(
            (1 - a) * (1 - b) * at(x0, y0)
            + a * (1 - b) * at(x0 + 1, y0)
            + (1 - a) * b * at(x0, y0 + 1)
            + a * b * at(x0 + 1, y0 + 1)
        )
    return np.stack(rows)


def test_relations_are_what_the_page_says(script: ModuleType, drawn: dict[str, Any]) -> None:
    data = script.relation_data(drawn["crops"])
    heads = data["num_heads"]
    # The spatial features are each view's projected tokens read at its own lattice grid:
    # the teacher's (view 1) at grid 1, the student's (view 2, flipped) at grid 2.
    grids = drawn["points"]["grids"].numpy()
    for k, side in enumerate(("teacher", "student")):
        tokens = data["channel_features"][side][0].double().numpy()
        read = _bilinear(tokens, grids[k], script.GRID)
        np.testing.assert_allclose(
            data["spatial_features"][side][0].double().numpy(), read, rtol=1e-4, atol=1e-5
        )
    assert heads == script.DIM // 64 == 3
    temps = {"teacher": {"spatial": 0.5, "channel": 0.1}, "student": {"spatial": 1, "channel": 1}}
    spatial, channel = {}, {}
    for side in ("teacher", "student"):
        x = data["spatial_features"][side][0].double().numpy()  # (S, C)
        assert x.shape == (13 * 13, script.DIM)
        d = x.shape[1] // heads
        spatial[side] = [
            _softmax(
                x[:, m * d : (m + 1) * d] @ x[:, m * d : (m + 1) * d].T / np.sqrt(d),
                temps[side]["spatial"],
            )
            for m in range(heads)
        ]
        c = data["channel_features"][side][0].double().numpy()  # (N, C)
        assert c.shape == (14 * 14, script.DIM)
        channel[side] = _softmax(c.T @ c / c.shape[0], temps[side]["channel"])
        drawn_s = data["spatial"][side].double().numpy()
        drawn_c = data["channel"][side].double().numpy()
        np.testing.assert_allclose(drawn_s, spatial[side][0], rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(drawn_c, channel[side], rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(drawn_s.sum(1), 1, atol=1e-5)
    # The cross-entropy each panel row states: teacher rows against the student's log-rows,
    # averaged over rows (and the spatial term's heads).
    ce_s = np.mean(
        [
            -(spatial["teacher"][m] * np.log(spatial["student"][m])).sum(1).mean()
            for m in range(heads)
        ]
    )
    ce_c = -(channel["teacher"] * np.log(channel["student"])).sum(1).mean()
    assert data["losses"]["spatial"] == pytest.approx(ce_s, rel=1e-4)
    assert data["losses"]["channel"] == pytest.approx(ce_c, rel=1e-4)


def test_method_figure_shows_the_rows_of_the_loss(
    script: ModuleType, drawn: dict[str, Any]
) -> None:
    """Panel 6 of ``method.png``: each lattice point's row cross-entropy, averaged over heads,
    whose mean is the pair's spatial loss; panel 2 the tokens the tap gave, before the heads."""
    data = script.relation_data(drawn["crops"])
    rows = data["row_losses"]
    assert rows.shape == script.LATTICE
    assert float(rows.mean()) == pytest.approx(data["losses"]["spatial"], rel=1e-5)
    assert data["tokens"].shape == (2, script.GRID**2, script.DIM)
    # A flat student scores ln S on every row; this one, at initialisation, is below it on
    # average but not everywhere far from it.
    assert float(rows.mean()) < np.log(rows.numel())


def test_healthy_values_on_the_page_are_the_committed_logs(script: ModuleType) -> None:
    """Getting started's table of window means: recomputed from ``healthy-tiny/log.csv``."""
    log = script.read_log()
    assert log["step"] == [float(k) for k in range(1, 401)], "400 steps, one row each"
    page = (DOCS / "getting-started.md").read_text()
    for first, last in ((1, 25), (26, 50), (76, 100), (176, 200), (376, 400)):
        means = [
            sum(log[term][first - 1 : last]) / (last - first + 1)
            for term in ("spatial", "channel", "dino")
        ]
        row = f"| {first}-{last} | " + " | ".join(f"{m:.3f}" for m in means) + " |"
        assert row in page, f"the page lacks the log's row {row}"
