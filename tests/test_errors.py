"""Bad input fails with a ValueError or TypeError that says what was expected and what came."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch import nn

from sere_loss import (
    ChannelSelfRelationLoss,
    RegionAlignedSampler,
    SERELoss,
    SpatialSelfRelationLoss,
    update_teacher,
)
from sere_loss import functional as SF

B = 2
BOX = torch.tensor([[0.0, 0.0, 0.8, 0.8], [0.2, 0.2, 1.0, 1.0]])
NO = torch.zeros(B, dtype=torch.bool)
NO2 = torch.zeros(B, 2, dtype=torch.bool)
BOX4 = BOX[:, None].expand(B, 4, 4)  # 2 global and 2 local views
NO4 = torch.zeros(B, 4, dtype=torch.bool)


def _tokens(dtype: torch.dtype = torch.float32, c: int = 12) -> torch.Tensor:
    """Two global views of a batch of B, 4 x 4 tokens of ``c`` channels."""
    return torch.randn(2 * B, 16, c, dtype=dtype)


def _autocast(call: Callable[[], object]) -> Callable[[], object]:
    def run() -> object:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return call()

    return run


def _sere_call(**override: object) -> Callable[[], object]:
    args: dict[str, object] = {
        "student_global": torch.randn(2 * B, 16, 12),
        "teacher_global": torch.randn(2 * B, 16, 12),
        "boxes": BOX.expand(B, 2, 4).clone(),
        "flips": torch.zeros(B, 2, dtype=torch.bool),
    }
    args.update(override)
    sere = SERELoss(12, num_heads=3)
    return lambda: sere(**args)


# fmt: off
CASES: list[tuple[str, type[Exception], str, Callable[[], object]]] = [
    # kernels: wrong ndim, divisibility, shapes
    (
        "spatial ndim",
        ValueError,
        r"\(B, S, C\).*got shape \(4, 12\)",
        lambda: SF.spatial_relation(torch.randn(4, 12), 3),
    ),
    (
        "C not divisible by M",
        ValueError,
        r"C=10.*M=3",
        lambda: SF.spatial_relation(torch.randn(1, 4, 10), 3),
    ),
    (
        "heads not positive",
        ValueError,
        r"num_heads must be >= 1",
        lambda: SF.spatial_relation(torch.randn(1, 4, 6), 0),
    ),
    ("channel ndim", ValueError, r"\(B, N, C\)", lambda: SF.channel_relation(torch.randn(3, 4))),
    (
        "not a tensor",
        TypeError,
        r"x must be a torch.Tensor, got list",
        lambda: SF.channel_relation([1.0]),
    ),
    (
        "ce shapes differ",
        ValueError,
        r"same shape.*\(2, 3, 3\) and \(2, 3, 4\)",
        lambda: SF.relation_cross_entropy(torch.randn(2, 3, 3), torch.randn(2, 3, 4)),
    ),
    (
        "ce temperature zero",
        ValueError,
        r"teacher_temp must be a finite number > 0, got 0",
        lambda: SF.relation_cross_entropy(
            torch.randn(2, 3, 3), torch.randn(2, 3, 3), teacher_temp=0.0
        ),
    ),
    (
        "ce temperature negative",
        ValueError,
        r"student_temp .* got -1",
        lambda: SF.relation_cross_entropy(
            torch.randn(2, 3, 3), torch.randn(2, 3, 3), student_temp=-1.0
        ),
    ),
    (
        "ce temperature nan",
        ValueError,
        r"teacher_temp",
        lambda: SF.relation_cross_entropy(
            torch.randn(2, 3, 3), torch.randn(2, 3, 3), teacher_temp=float("nan")
        ),
    ),
    (
        "ce mask shape",
        ValueError,
        r"mask must have shape \(2,\).*\(3,\)",
        lambda: SF.relation_cross_entropy(
            torch.randn(2, 3, 3), torch.randn(2, 3, 3), mask=torch.ones(3, dtype=torch.bool)
        ),
    ),
    (
        "ce mask dtype",
        TypeError,
        r"mask must be a bool tensor",
        lambda: SF.relation_cross_entropy(
            torch.randn(2, 3, 3), torch.randn(2, 3, 3), mask=torch.ones(2)
        ),
    ),
    (
        "ce reduction",
        ValueError,
        r"reduction must be one of \('mean', 'sum', 'none'\), got 'avg'",
        lambda: SF.relation_cross_entropy(
            torch.randn(2, 3, 3), torch.randn(2, 3, 3), reduction="avg"
        ),
    ),
    (
        "ce integer logits",
        TypeError,
        r"floating-point",
        lambda: SF.relation_cross_entropy(
            torch.ones(2, 3, 3, dtype=torch.long), torch.ones(2, 3, 3, dtype=torch.long)
        ),
    ),
    # geometry
    (
        "boxes outside",
        ValueError,
        r"inside \[0, 1\].*\[-0.1, 0.8\]",
        lambda: SF.overlap_grids(torch.tensor([[-0.1, 0.0, 0.8, 0.8]]), NO[:1], BOX[:1], NO[:1], 3),
    ),
    (
        "boxes not finite",
        ValueError,
        r"boxes1 must be finite",
        lambda: SF.overlap_grids(
            torch.tensor([[0.0, 0.0, float("nan"), 0.8]]), NO[:1], BOX[:1], NO[:1], 3
        ),
    ),
    (
        "boxes above one",
        ValueError,
        r"inside \[0, 1\]",
        lambda: SF.overlap_grids(torch.tensor([[0.0, 0.0, 1.5, 0.8]]), NO[:1], BOX[:1], NO[:1], 3),
    ),
    (
        "x0 >= x1",
        ValueError,
        r"x0 < x1 and y0 < y1; row 1",
        lambda: SF.overlap_grids(
            torch.tensor([[0.0, 0.0, 0.5, 0.5], [0.6, 0.0, 0.6, 0.5]]), NO, BOX, NO, 3
        ),
    ),
    (
        "boxes shape",
        ValueError,
        r"\(B, 4\).*\(2, 3\)",
        lambda: SF.overlap_grids(torch.rand(2, 3), NO, BOX, NO, 3),
    ),
    (
        "boxes batch mismatch",
        ValueError,
        r"same shape.*\(1, 4\) and \(2, 4\)",
        lambda: SF.overlap_grids(BOX[:1], NO[:1], BOX, NO, 3),
    ),
    (
        "flips shape",
        ValueError,
        r"flips1 must have shape \(2,\).*\(3,\)",
        lambda: SF.overlap_grids(BOX, torch.zeros(3, dtype=torch.bool), BOX, NO, 3),
    ),
    (
        "flips float",
        TypeError,
        r"flips2 must be bool",
        lambda: SF.overlap_grids(BOX, NO, BOX, torch.zeros(2), 3),
    ),
    (
        "flips values",
        ValueError,
        r"only 0 and 1",
        lambda: SF.overlap_grids(BOX, NO, BOX, torch.tensor([0, 2]), 3),
    ),
    (
        "unknown points",
        ValueError,
        r"points must be one of \('center', 'official'\), got 'corner'",
        lambda: SF.overlap_grids(BOX, NO, BOX, NO, 3, points="corner"),
    ),
    (
        "bad lattice",
        ValueError,
        r"lattice must be an int or a pair",
        lambda: SF.overlap_grids(BOX, NO, BOX, NO, (3, 3, 3)),
    ),
    (
        "lattice zero",
        ValueError,
        r"lattice\[0\] must be >= 1",
        lambda: SF.overlap_grids(BOX, NO, BOX, NO, 0),
    ),
    (
        "unknown padding",
        ValueError,
        r"padding must be one of \('border', 'zeros'\), got 'reflect'",
        lambda: SF.sample_region(torch.randn(1, 2, 3, 3), torch.zeros(1, 2, 2, 2), "reflect"),
    ),
    (
        "grid batch",
        ValueError,
        r"B=1.*got \(2, 2, 2, 2\)",
        lambda: SF.sample_region(torch.randn(1, 2, 3, 3), torch.zeros(2, 2, 2, 2)),
    ),
    (
        "sampler features",
        ValueError,
        r"agree on \(B, C\)",
        lambda: RegionAlignedSampler(3)(
            torch.randn(2, 4, 5, 5), torch.randn(2, 3, 5, 5), BOX, NO, BOX, NO
        ),
    ),
    (
        "official lattice in sampler",
        ValueError,
        r"lattice >= \(2, 2\), got \(1, 1\)",
        lambda: RegionAlignedSampler(1, points="official"),
    ),
    (
        "official lattice in loss",
        ValueError,
        r"local_lattice >= \(2, 2\), got \(1, 3\)",
        lambda: SpatialSelfRelationLoss(12, 3, points="official", local_lattice=(1, 3)),
    ),
    (
        "default lattice on a 1 x 1 grid",
        ValueError,
        r"global_lattice=None derives the lattice from the global token grid \(1, 1\): the grid "
        r"minus one, \(0, 0\), but points='official' needs at least 2 point\(s\) per side",
        _sere_call(student_global=torch.randn(2 * B, 1, 12), teacher_global=torch.randn(2 * B, 1, 12)),
    ),
    (
        "official lattice on a small global grid",
        ValueError,
        r"global token grid \(2, 2\): the grid minus one, \(1, 1\), but points='official' needs "
        r"at least 2 point\(s\) per side; use larger global views or pass global_lattice",
        lambda: SpatialSelfRelationLoss(12, 3, points="official")(
            torch.randn(2 * B, 4, 12), torch.randn(2 * B, 4, 12), BOX.expand(B, 2, 4).clone(), NO2
        ),
    ),
    (
        "official lattice on a small local grid",
        ValueError,
        r"local_lattice=None derives the lattice from the local token grid \(1, 3\): the grid, "
        r"\(1, 3\), but points='official' needs at least 2",
        lambda: SpatialSelfRelationLoss(12, 3, points="official")(
            torch.randn(2 * B, 16, 12), torch.randn(2 * B, 16, 12), BOX[:, None].expand(B, 3, 4),
            torch.zeros(B, 3, dtype=torch.bool), torch.randn(B, 3, 12), local_grid=(1, 3),
        ),
    ),
    (
        "sampler option",
        ValueError,
        r"padding must be one of",
        lambda: RegionAlignedSampler(3, padding="edge"),
    ),
    # modules
    ("dim vs heads", ValueError, r"dim=10 and num_heads=3; divisors of 10: \[1, 2, 5, 10\]", lambda: SpatialSelfRelationLoss(10, 3)),
    ("default heads of a width not a multiple of 64", ValueError, r"num_heads=None takes one head per 64 channels .* dim=96 is not a multiple of 64: pass num_heads.* one of \[1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 96\]", lambda: SpatialSelfRelationLoss(96)),
    ("default heads through SERELoss", ValueError, r"dim=100 is not a multiple of 64", lambda: SERELoss(100)),
    ("heads not an int", TypeError, r"num_heads must be an int", lambda: SERELoss(128, num_heads=2.0)),
    (
        "module temperature",
        ValueError,
        r"teacher_temp must be a finite number > 0",
        lambda: ChannelSelfRelationLoss(8, teacher_temp=0.0),
    ),
    (
        "negative alpha",
        ValueError,
        r"alpha must be a number >= 0, got -1",
        lambda: SERELoss(12, alpha=-1.0),
    ),
    (
        "alpha as a string",
        TypeError,
        r"beta must be a number >= 0, got str '1'",
        lambda: SERELoss(12, beta="1"),
    ),
    ("alpha NaN", ValueError, r"alpha must be a number >= 0, got nan", lambda: SERELoss(12, alpha=float("nan"))),
    (
        "prefix tokens",
        ValueError,
        r"num_prefix_tokens must be >= 0",
        lambda: SERELoss(12, num_heads=3, num_prefix_tokens=-1),
    ),
    (
        "momentum",
        ValueError,
        r"momentum must lie in \[0, 1\], got 1.5",
        lambda: SERELoss(12, num_heads=3).update_teacher(1.5),
    ),
    (
        "update_teacher on a module without SERE",
        ValueError,
        r"update_teacher found no SERE heads in Linear: pass the module that holds the SERE loss",
        lambda: update_teacher(nn.Linear(2, 2), 0.9),
    ),
    (
        "update_teacher momentum",
        ValueError,
        r"momentum must lie in \[0, 1\], got -0.1",
        lambda: update_teacher(SERELoss(12, num_heads=3), -0.1),
    ),
    (
        "tokens ndim",
        ValueError,
        r"ViT tokens \(B, T, C\) or CNN feature maps \(B, C, H, W\), got shape \(4, 12\)",
        _sere_call(student_global=torch.randn(4, 12)),
    ),
    (
        "view count",
        ValueError,
        r"student_global must have 2 views of batch 2.*\(6, 16, 12\)",
        _sere_call(student_global=torch.randn(6, 16, 12)),
    ),
    (
        "teacher rows odd",
        ValueError,
        r"teacher_global must hold its views.*V=2 views.*\(5, 16, 12\)",
        _sere_call(teacher_global=torch.randn(5, 16, 12)),
    ),
    (
        "list length",
        ValueError,
        r"student_global must be a list of 2 views, got 3",
        _sere_call(student_global=[torch.randn(B, 16, 12)] * 3),
    ),
    (
        "local batch",
        ValueError,
        r"student_local.*B=2.*\(5, 9, 12\)",
        _sere_call(student_local=torch.randn(5, 9, 12)),
    ),
    (
        "boxes views",
        ValueError,
        r"\(B, V, 4\) with V=4 views.*\(2, 2, 4\)",
        _sere_call(student_local=torch.randn(2 * B, 9, 12)),
    ),
    (
        "boxes batch",
        ValueError,
        r"batch of 3 images, the views a batch of 2",
        _sere_call(
            boxes=BOX[:1].expand(3, 2, 4).clone(), flips=torch.zeros(3, 2, dtype=torch.bool)
        ),
    ),
    (
        "flips layout",
        ValueError,
        r"flips must have shape \(B, V\) = \(2, 2\).*\(2, 3\)",
        _sere_call(flips=torch.zeros(B, 3, dtype=torch.bool)),
    ),
    (
        "boxes values",
        ValueError,
        r"x0 < x1",
        _sere_call(boxes=torch.tensor([[0.5, 0.0, 0.4, 1.0]]).expand(B, 2, 4).clone()),
    ),
    (
        "boxes last dim",
        ValueError,
        r"boxes must have shape \(B, V, 4\) as \(x0, y0, x1, y1\) per view, got \(2, 2, 3\)",
        _sere_call(boxes=torch.rand(B, 2, 3)),
    ),
    (
        "student and teacher swapped",
        ValueError,
        r"teacher_global requires grad but student_global does not: the two look swapped",
        _sere_call(teacher_global=torch.randn(2 * B, 16, 12, requires_grad=True)),
    ),
    (
        "spatial term swapped",
        ValueError,
        r"look swapped",
        lambda: SpatialSelfRelationLoss(12, 3)(
            [torch.randn(B, 16, 12)] * 2, torch.randn(2 * B, 16, 12, requires_grad=True),
            BOX.expand(B, 2, 4), NO2,
        ),
    ),
    (
        "channel term swapped",
        ValueError,
        r"look swapped",
        lambda: ChannelSelfRelationLoss(12)(
            torch.randn(2 * B, 16, 12), [torch.randn(B, 16, 12, requires_grad=True)] * 2
        ),
    ),
    (
        "reference logits beyond memory",
        MemoryError,
        r"backend='reference' would hold at least .* GiB of relation logits \(4 items x 3 heads x "
        r"102400 x 102400 rows, 5 copies\), more than the .* GiB of cpu: use backend='auto'",
        lambda: SpatialSelfRelationLoss(12, 3, backend="reference", global_lattice=320)(
            torch.randn(2 * B, 16, 12), torch.randn(2 * B, 16, 12), BOX.expand(B, 2, 4), NO2
        ),
    ),
    (
        "dense logits beyond memory",
        MemoryError,
        r"backend='dense' would hold at least",
        lambda: SF.spatial_relation_cross_entropy(
            torch.randn(1, 102400, 3).expand(64, -1, -1), torch.randn(1, 102400, 3).expand(64, -1, -1),
            3, backend="dense",
        ),
    ),
    (
        "not square",
        ValueError,
        r"15 patch tokens \(15 minus 0 prefix\), not a square grid.*num_prefix_tokens",
        _sere_call(
            student_global=torch.randn(2 * B, 15, 12), teacher_global=torch.randn(2 * B, 15, 12)
        ),
    ),
    (
        "grid mismatch",
        ValueError,
        r"16 patch tokens.*not the grid \(3, 5\)",
        lambda: SpatialSelfRelationLoss(12, 3)(
            torch.randn(2 * B, 16, 12),
            torch.randn(2 * B, 16, 12),
            BOX.expand(B, 2, 4).clone(),
            torch.zeros(B, 2, dtype=torch.bool),
            global_grid=(3, 5),
        ),
    ),
    (
        "one view",
        ValueError,
        r"at least two views",
        lambda: ChannelSelfRelationLoss(12, num_global_views=1)(
            torch.randn(B, 16, 12), torch.randn(B, 16, 12)
        ),
    ),
    (
        "one token for BatchNorm",
        ValueError,
        r"BatchNorm .* needs more than one in training, got 1 view\(s\) of 1 token\(s\)",
        lambda: SERELoss(12, num_heads=3, recipe="paper")(  # a 1 x 1 local lattice
            torch.randn(2, 16, 12),
            torch.randn(2, 16, 12),
            torch.cat([BOX, BOX[:1]]).expand(1, 3, 4).clone(),
            torch.zeros(1, 3, dtype=torch.bool),
            torch.randn(1, 1, 12),
        ),
    ),
    # what the views share: channels, dtypes, grids; checked before the heads run
    (
        "dim vs token channels",
        ValueError,
        r"student_global has 12 channels but the loss was built for 24 \(dim=24\): build it "
        r"with dim=12",
        lambda: SERELoss(24, num_heads=3)(_tokens(), _tokens(), BOX.expand(B, 2, 4).clone(), NO2),
    ),
    (
        "channels vs a custom projection",
        ValueError,
        r"student_global has 12 channels but the loss was built for 8 \(the first layer of its "
        r"heads\): give it heads that take 12, the backbone's width",
        lambda: SpatialSelfRelationLoss(12, 3, projection=nn.Linear(8, 12))(
            _tokens(), _tokens(), BOX.expand(B, 2, 4).clone(), NO2
        ),
    ),
    (
        "channels vs the prediction behind no projection",
        ValueError,
        r"student_global has 6 channels but the loss was built for 12",
        lambda: ChannelSelfRelationLoss(12, projection=nn.Identity())(_tokens(c=6), _tokens(c=6)),
    ),
    (
        "channels of the local views",
        ValueError,
        r"student_local has 8 channels but the loss was built for 12 \(dim=12\)",
        _sere_call(student_local=torch.randn(2 * B, 9, 8), boxes=BOX4, flips=NO4),
    ),
    (
        "student and teacher dtypes",
        TypeError,
        r"student_global is torch.bfloat16 but teacher_global is torch.float32 \(outside "
        r"torch.autocast\): run the forwards that made them, and this loss, under one "
        r"torch.autocast, or cast them to one dtype",
        _sere_call(student_global=_tokens(torch.bfloat16)),
    ),
    (
        "local dtype",
        TypeError,
        r"student_global is torch.float32 but student_local is torch.float64",
        _sere_call(student_local=torch.randn(2 * B, 9, 12, dtype=torch.float64), boxes=BOX4,
                   flips=NO4),
    ),
    (
        "half tokens outside autocast",
        TypeError,
        r"student_global and teacher_global are torch.float16 but the SERE heads' parameters are "
        r"torch.float32 \(outside torch.autocast\): compute this loss under torch.autocast, as "
        r"the forward that made them, or cast them to torch.float32",
        _sere_call(student_global=_tokens(torch.float16), teacher_global=_tokens(torch.float16)),
    ),
    (
        "float64 tokens under autocast",
        TypeError,
        r"student_global and teacher_global are torch.float64 but the SERE heads' parameters are "
        r"torch.float32 \(autocast casts only float16, bfloat16 and float32\)",
        _autocast(_sere_call(student_global=_tokens(torch.float64), teacher_global=_tokens(torch.float64))),
    ),
    (
        "channel term dtypes",
        TypeError,
        r"student_global is torch.bfloat16 but teacher_global is torch.float32",
        lambda: ChannelSelfRelationLoss(12)(_tokens(torch.bfloat16), _tokens()),
    ),
    (
        "student and teacher grids",
        ValueError,
        r"student_global has a token grid \(3, 3\) \(9 tokens\) but teacher_global has a token "
        r"grid \(4, 4\) \(16 tokens\): both must be the same global views",
        _sere_call(student_global=torch.randn(2 * B, 9, 12)),
    ),
    (
        "channel term token counts",
        ValueError,
        r"student_global has 9 patch tokens but teacher_global has 16 patch tokens",
        lambda: ChannelSelfRelationLoss(12)(torch.randn(2 * B, 9, 12), _tokens()),
    ),
    (
        "globals passed as locals",
        ValueError,
        r"student_local has a token grid \(4, 4\) \(16 tokens\), as many as the global views "
        r"\(a token grid \(4, 4\) \(16 tokens\)\): local views are the smaller crops",
        _sere_call(student_local=_tokens(), boxes=BOX4, flips=NO4),
    ),
    (
        "views swapped",
        ValueError,
        r"student_local has 16 patch tokens, more than the global views \(9 patch tokens\).*look "
        r"swapped",
        lambda: ChannelSelfRelationLoss(12)(
            torch.randn(2 * B, 9, 12), torch.randn(2 * B, 9, 12), _tokens()
        ),
    ),
    (
        "maps channels last",
        ValueError,
        r"student_global has 4 channels but the loss was built for 12 \(dim=12\): build it with "
        r"dim=4, the backbone's width; or, if these are feature maps, give them channels first "
        r"\(B, C, H, W\): channels last \(B, H, W, 12\) read as 4 channels",
        _sere_call(student_global=torch.randn(2 * B, 4, 4, 12),
                   teacher_global=torch.randn(2 * B, 4, 4, 12)),
    ),
    (
        "views stacked, not concatenated",
        ValueError,
        r"student_global must hold its views concatenated along dim 0, \(V \* B, T, C\) tokens "
        r"or \(V \* B, C, H, W\) maps; got shape \(2, 2, 12, 4, 4\), a stack \(V, B, \.\.\.\): "
        r"give x\.flatten\(0, 1\)",
        _sere_call(student_global=torch.randn(2, B, 12, 4, 4)),
    ),
    (
        "string views",
        TypeError,
        r"tensor \(views concatenated along dim 0\) or a list of tensors, got str",
        _sere_call(student_global="tokens"),
    ),
]
# fmt: on


@pytest.mark.parametrize(
    ("exc", "pattern", "call"), [c[1:] for c in CASES], ids=[c[0] for c in CASES]
)
def test_bad_input_raises_a_clear_error(
    exc: type[Exception], pattern: str, call: Callable[[], object]
) -> None:
    with pytest.raises(exc, match=pattern):
        call()


def test_checks_survive_python_optimise_mode() -> None:
    # No check relies on `assert`, which `python -O` strips.
    import subprocess
    import sys

    code = (
        "import torch, sere_loss.functional as SF\n"
        "try:\n"
        "    SF.spatial_relation(torch.randn(1, 4, 10), 3)\n"
        "except ValueError:\n"
        "    print('raised')\n"
    )
    out = subprocess.run(
        [sys.executable, "-O", "-c", code], capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == "raised"
