"""``--recipe authors|paper`` (issue 11): the authors' losses, restated here, and the wiring.

The authors' route is written out below from SPEC 4 and 8, independently of the library: each
view's full ``N x N`` relation per head, read with ``grid_sample`` (bilinear, zero padding) on
its columns and then its rows at an edge-to-edge lattice (``linspace`` over the overlap, both
ends included, in each view's coordinates, mirrored when flipped), ``-2`` everywhere for a pair
that does not overlap; the channel relation ``z z^T / N``; a plain mean over the
(teacher view, student view) pairs. The heads are the module's own: the route is what is
restated, not the heads.
"""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from sere_loss import SERELoss, SpatialSelfRelationLoss

pytest.importorskip("timm", reason="the examples need the 'examples' extra (timm, tqdm)")

G, L, B = 2, 2, 3  # global views, local views, images
C = 96  # the tiny preset's width; its ViT has 3 attention heads
GLOBAL_GRID, LOCAL_GRID = 8, 4  # tokens per side: 64 px and 32 px views, patch 8


def _edge_to_edge_grid(box: list[float], flip: bool, overlap: list[float], side: int) -> list:
    """One view's ``(side, side, 2)`` grid: the authors' lattice, written point by point."""
    x0, y0, x1, y1 = box
    width, height = x1 - x0, y1 - y0
    u0, u1 = (overlap[0] - x0) / width, (overlap[2] - x0) / width
    v0, v1 = (overlap[1] - y0) / height, (overlap[3] - y0) / height
    grid = []
    for i in range(side):  # rows: y
        row = []
        for j in range(side):  # columns: x
            u = u0 + j * (u1 - u0) / (side - 1)
            v = v0 + i * (v1 - v0) / (side - 1)
            if flip:
                u = 1 - u
            row.append([2 * u - 1, 2 * v - 1])
        grid.append(row)
    return grid


def _pair_grids(boxes: torch.Tensor, flips: torch.Tensor, a: int, b: int, side: int) -> tuple:
    """Grids ``(B, side, side, 2)`` of views ``a`` and ``b`` for their overlap, per image."""
    grids_a, grids_b = [], []
    for k in range(boxes.shape[0]):
        box_a, box_b = boxes[k, a].tolist(), boxes[k, b].tolist()
        overlap = [
            max(box_a[0], box_b[0]),
            max(box_a[1], box_b[1]),
            min(box_a[2], box_b[2]),
            min(box_a[3], box_b[3]),
        ]
        if overlap[0] < overlap[2] and overlap[1] < overlap[3]:
            grids_a.append(_edge_to_edge_grid(box_a, bool(flips[k, a]), overlap, side))
            grids_b.append(_edge_to_edge_grid(box_b, bool(flips[k, b]), overlap, side))
        else:  # outside every view: zero padding reads zeros
            grids_a.append([[[-2.0, -2.0]] * side] * side)
            grids_b.append([[[-2.0, -2.0]] * side] * side)
    as_tensor = {"dtype": torch.float64}
    return torch.tensor(grids_a, **as_tensor), torch.tensor(grids_b, **as_tensor)


def _full_relation(z: torch.Tensor, heads: int) -> torch.Tensor:
    """``(B, M, N, N)``: per head, ``z_m z_m^T / sqrt(C / M)``."""
    b, n, c = z.shape
    per_head = z.reshape(b, n, heads, c // heads).permute(0, 2, 1, 3)
    return per_head @ per_head.transpose(-1, -2) / math.sqrt(c // heads)


def _read(relation: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
    """The relation at the lattice: columns first, then rows, bilinear, zero padding."""
    b, m, n, _ = relation.shape
    side, s = math.isqrt(n), grid.shape[1] * grid.shape[2]
    sample = {"mode": "bilinear", "padding_mode": "zeros", "align_corners": False}
    cols = F.grid_sample(relation.reshape(b, m * n, side, side), grid, **sample)
    cols = cols.reshape(b, m, n, s).transpose(2, 3)  # (B, M, S, N)
    both = F.grid_sample(cols.reshape(b, m * s, side, side), grid, **sample)
    return both.reshape(b, m, s, s).transpose(2, 3)  # rows and columns at the lattice


def _cross_entropy(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Row-wise CE of already-tempered logits, mean over everything but the last axis."""
    return -(F.softmax(teacher, -1) * F.log_softmax(student, -1)).sum(-1).mean()


def _authors_losses(
    sere: SERELoss,
    globals_: torch.Tensor,
    teacher: torch.Tensor,
    locals_: torch.Tensor,
    boxes: torch.Tensor,
    flips: torch.Tensor,
    heads: int,
) -> tuple[float, float]:
    """The authors' L_p and L_c for one batch, the module's heads on the tokens."""
    out: list[float] = []
    for term, t_temp, route in ((sere.spatial, 0.5, "spatial"), (sere.channel, 0.1, "channel")):
        assert term is not None
        h = term.heads
        with torch.no_grad():
            s_global = h.prediction(h.projection(globals_)).double().chunk(G)
            s_local = h.local_prediction(h.local_projection(locals_)).double().chunk(L)
            t_global = h.teacher_projection(teacher).double().chunk(G)
        losses = []
        for i in range(G):
            for v in range(G + L):
                if v == i:
                    continue
                student = s_global[v] if v < G else s_local[v - G]
                if route == "channel":
                    t_rel = t_global[i].transpose(1, 2) @ t_global[i] / t_global[i].shape[1]
                    s_rel = student.transpose(1, 2) @ student / student.shape[1]
                    losses.append(_cross_entropy(s_rel, t_rel / t_temp))
                    continue
                side = GLOBAL_GRID - 1 if v < G else LOCAL_GRID
                grid_t, grid_s = _pair_grids(boxes, flips, i, v, side)
                t_rel = _read(_full_relation(t_global[i], heads), grid_t)
                s_rel = _read(_full_relation(student, heads), grid_s)
                losses.append(_cross_entropy(s_rel, t_rel / t_temp))
        out.append(float(torch.stack(losses).mean()))
    return out[0], out[1]


def _batch(gen: torch.Generator) -> tuple[torch.Tensor, ...]:
    """Tokens of every view, and boxes and flips with one global-local pair that is empty."""
    globals_ = torch.randn(G * B, GLOBAL_GRID**2, C, generator=gen)
    teacher = globals_ + 0.3 * torch.randn(G * B, GLOBAL_GRID**2, C, generator=gen)
    locals_ = torch.randn(L * B, LOCAL_GRID**2, C, generator=gen)
    size = 0.3 + 0.7 * torch.rand(B, G + L, 2, generator=gen, dtype=torch.float64)
    start = (1 - size) * torch.rand(B, G + L, 2, generator=gen, dtype=torch.float64)
    boxes = torch.cat([start, start + size], -1)
    boxes[0, 0] = torch.tensor([0.0, 0.0, 0.45, 0.5], dtype=torch.float64)
    boxes[0, 2] = torch.tensor([0.6, 0.55, 0.9, 0.95], dtype=torch.float64)  # off global view 0
    flips = torch.rand(B, G + L, generator=gen) < 0.5
    return globals_, teacher, locals_, boxes.float(), flips


def test_authors_recipe_reproduces_the_authors_losses(examples: Any) -> None:
    torch.manual_seed(0)
    vit = examples.options.build_vit(examples.dino_sere.PRESETS["tiny"], 0.0)
    options = examples.options.RECIPES["authors"].sere_options(vit)
    assert options["num_heads"] == 3  # the tiny ViT's own head count
    sere = SERELoss(C, **options)
    globals_, teacher, locals_, boxes, flips = _batch(torch.Generator().manual_seed(5))
    _, terms = sere(globals_, teacher, boxes, flips, locals_, return_terms=True)
    spatial, channel = _authors_losses(sere, globals_, teacher, locals_, boxes, flips, heads=3)
    assert float(terms["spatial"]) == pytest.approx(spatial, rel=2e-6)
    assert float(terms["channel"]) == pytest.approx(channel, rel=2e-6)
    # The paper's recipe (cell centres, border padding, empty pairs masked, 6 heads) is another
    # loss: the comparison above can tell them apart.
    paper = SERELoss(C, **examples.options.RECIPES["paper"].sere_options(vit))
    paper.load_state_dict(sere.state_dict())
    _, other = paper(globals_, teacher, boxes, flips, locals_, return_terms=True)
    assert abs(float(other["spatial"]) - spatial) > 1e-2 * spatial


def test_uniform_empty_pairs_count_log_s_each() -> None:
    """The authors' empty pairs against the masked mean, by hand: ``(sum + n_0 log S) / n``."""
    gen = torch.Generator().manual_seed(2)
    boxes = torch.tensor([[[0.0, 0.0, 0.5, 0.5], [0.6, 0.6, 1.0, 1.0]]] * 2)  # never overlap
    boxes[1, 1] = torch.tensor([0.2, 0.1, 0.9, 0.8])  # image 1 overlaps
    flips = torch.zeros(2, 2, dtype=torch.bool)
    tokens = torch.randn(4, 25, 12, generator=gen)
    masked = SpatialSelfRelationLoss(12, 3, points="official", padding="zeros", empty_pairs="mask")
    uniform = SpatialSelfRelationLoss(12, 3)  # the authors' recipe: their empty pairs
    uniform.load_state_dict(masked.state_dict())
    kept = masked(tokens, tokens + 0.1, boxes, flips)  # the mean over image 1's 2 pairs
    both = uniform(tokens, tokens + 0.1, boxes, flips)  # image 0's 2 pairs add log(4 * 4)
    assert float(both.detach()) == pytest.approx(
        (2 * float(kept.detach()) + 2 * math.log(16)) / 4, rel=1e-6
    )
    none_overlap = uniform(tokens, tokens, boxes[:1].expand(2, 2, 4), flips)
    assert float(none_overlap.detach()) == pytest.approx(math.log(16), rel=1e-6)


@pytest.mark.parametrize("name", ["dino_sere", "ibot_sere", "mocov3_sere"])
@pytest.mark.parametrize("recipe", ["authors", "paper"])
def test_each_trainer_builds_its_recipe(
    examples: Any, name: str, recipe: str, tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The SERE options and the parameter groups each trainer asks for under ``--recipe``."""
    module, seen = getattr(examples, name), {}

    class Stop(Exception):
        pass

    def spy_loss(*args: Any, **kwargs: Any) -> SERELoss:
        seen["sere"] = kwargs
        return SERELoss(*args, **kwargs)

    def spy_groups(*args: Any, **kwargs: Any) -> Any:
        seen["groups"] = kwargs
        raise Stop

    monkeypatch.setattr(module, "SERELoss", spy_loss)
    monkeypatch.setattr(examples.optim, "param_groups", spy_groups)
    argv = ["--preset", "tiny", "--recipe", recipe, "--output-dir", str(tmp_path)]
    with pytest.raises(Stop):
        module.main([*argv, "--check-images", "0"])
    expected = {
        "authors": {"points": "official", "padding": "zeros", "empty_pairs": "uniform"},
        "paper": {"points": "center", "padding": "border", "empty_pairs": "mask"},
    }[recipe]
    assert seen["sere"].items() >= expected.items()
    assert seen["sere"]["num_heads"] == (3 if recipe == "authors" else 6)  # tiny ViTs: 3 heads
    if name == "mocov3_sere":
        assert seen["groups"] == {"decay_all": True}  # MoCo v3 decays everything, either way
    else:
        assert seen["groups"] == {"decay_biases": recipe == "authors"}


def test_parameter_groups_follow_the_authors_and_dino(examples: Any) -> None:
    """Which ViT-S and SERE parameters each rule decays, by name (SPEC 8; DINO's rule)."""
    with torch.device("meta"):
        vit = examples.options.build_vit(examples.dino_sere.PRESETS["vit_small"], 0.1)
        sere = SERELoss(384, **examples.options.RECIPES["authors"].sere_options(vit))

    def decayed(**rule: bool) -> dict[str, bool]:
        groups = examples.optim.param_groups([vit, sere], **rule)
        return {
            name.split(".", 1)[1]: index == 0
            for index, group in enumerate(groups)
            for name in group["names"]
        }

    authors, dino = decayed(decay_biases=True), decayed()
    facts = {  # name: (authors, dino)
        "cls_token": (True, True),
        "pos_embed": (True, True),
        "blocks.0.attn.qkv.weight": (True, True),
        "blocks.0.attn.qkv.bias": (True, False),
        "blocks.0.norm1.weight": (False, False),
        "blocks.0.norm1.bias": (True, False),
        "norm.bias": (True, False),
        "spatial.heads.prediction.0.weight": (True, True),
        "spatial.heads.projection.0.bn.weight": (False, False),
        "spatial.heads.projection.0.bn.bias": (True, False),
        "channel.heads.local_prediction.1.bn.bias": (True, False),
    }
    for name, (by_authors, by_dino) in facts.items():
        assert authors[name] is by_authors, name
        assert dino[name] is by_dino, name
    assert all(decayed(decay_all=True).values())


def test_authors_recipe_autocasts_in_fp16_on_cuda(examples: Any) -> None:
    assert examples.options.RECIPES["authors"].half == "fp16"  # their --use_fp16 True
    assert examples.options.resolve_precision("auto", torch.device("cuda"), "fp16") == "fp16"
    assert examples.options.resolve_precision("auto", torch.device("cpu"), "fp16") == "fp32"


def test_ibot_vit_base_is_the_authors_command(examples: Any) -> None:
    """Table 1's ViT-B/16 row, from the authors' published iBOT + SERE command for ViT-B/16."""
    preset = examples.ibot_sere.PRESETS["vit_base"]
    command = {
        "arch": "vit_base_patch16_224", "patch": 16, "num_local": 10, "out_dim": 8192,
        "global_scale": (0.32, 1.0), "local_scale": (0.05, 0.32), "norm_last_layer": True,
        "batch_size": 128, "epochs": 100, "warmup_epochs": 10, "teacher_temp_warmup_epochs": 50,
        "lr": 0.00075, "min_lr": 2e-6, "freeze_last_layer": 3, "drop_path": 0.1,
    }  # fmt: skip
    for field, value in command.items():
        assert getattr(preset, field) == value, field
    args = examples.ibot_sere.parse_args(["--preset", "vit_base"])
    assert (args.clip_grad, args.alpha, args.beta) == (0.3, 0.2, 0.5)
    assert tuple(args.teacher_temp) == tuple(args.teacher_patch_temp) == (0.04, 0.07)
    with torch.device("meta"):
        vit = examples.options.build_vit(preset, 0.1)
    assert vit.embed_dim == 768
    assert examples.options.RECIPES["authors"].sere_options(vit)["num_heads"] == 12
    assert examples.options.RECIPES["paper"].sere_options(vit)["num_heads"] == 6


def test_the_library_defaults_to_the_authors_recipe_and_the_paper_is_one_argument_away() -> None:
    from sere_loss.losses import RECIPES

    settings = ("points", "padding", "empty_pairs")
    default = SERELoss(48, num_heads=4).spatial
    paper = SERELoss(48, num_heads=4, recipe="paper").spatial
    assert default is not None
    assert paper is not None
    assert {k: getattr(default, k) for k in settings} == RECIPES["authors"]
    assert RECIPES["authors"] == {
        "points": "official",
        "padding": "zeros",
        "empty_pairs": "uniform",
    }
    assert {k: getattr(paper, k) for k in settings} == RECIPES["paper"]
    assert RECIPES["paper"] == {"points": "center", "padding": "border", "empty_pairs": "mask"}
    # An explicit setting overrides its recipe's, the others stay.
    mixed = SpatialSelfRelationLoss(48, 4, recipe="paper", padding="zeros")
    assert (mixed.points, mixed.padding, mixed.empty_pairs) == ("center", "zeros", "mask")
    assert "recipe='paper'" in repr(mixed)
    # The recipe is the same loss as its three settings given one by one.
    gen = torch.Generator().manual_seed(5)
    tokens = torch.randn(4, 25, 48, generator=gen)
    boxes = torch.tensor(
        [[[0.0, 0.0, 0.5, 0.5], [0.6, 0.6, 1.0, 1.0]], [[0.0, 0.0, 0.8, 0.8], [0.2, 0.1, 0.9, 1.0]]]
    )
    flips = torch.tensor([[False, True], [True, False]])
    for recipe, values in RECIPES.items():
        torch.manual_seed(0)
        by_name = SERELoss(48, num_heads=4, recipe=recipe)
        torch.manual_seed(0)
        by_hand = SERELoss(48, num_heads=4, **values)
        assert torch.equal(
            by_name(tokens, tokens + 0.1, boxes, flips), by_hand(tokens, tokens + 0.1, boxes, flips)
        )
    with pytest.raises(
        ValueError, match=r"recipe must be one of \('authors', 'paper'\), got 'code'"
    ):
        SERELoss(48, num_heads=4, recipe="code")
