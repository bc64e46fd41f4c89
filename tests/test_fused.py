"""The fused relation cross-entropy against the reference kernels (issue 5, part 2).

The oracle is always the materialised reference path (``spatial_relation`` / ``channel_relation``
then ``relation_cross_entropy``) run in float64 on the very inputs the fused path sees. Rule for
low precision: the fused result's error against that oracle is at most twice the error of the
reference kernels run in the same precision, plus a tiny absolute floor.

The Triton kernels run on the CPU through Triton's interpreter. ``triton.language`` wraps its own
library functions (``tl.zeros``, ``tl.sum``...) when it is imported, so ``TRITON_INTERPRET=1``
must be in the environment before triton is first imported: a fixture cannot switch it on. The
checks of ``_TritonInterpretedChecks`` therefore run in a child pytest started with the variable
set (``test_triton_kernels_in_the_interpreter``), where the class is collected as
``TestTritonInterpreted``.
"""

from __future__ import annotations

import copy
import importlib
import math
import os
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

from conftest import assert_close
from sere_loss import (
    ChannelSelfRelationLoss,
    SERELoss,
    SpatialSelfRelationLoss,
    _fused,
    channel_relation_cross_entropy,
    spatial_relation_cross_entropy,
)
from sere_loss import functional as SF

HAS_TRITON = _fused.triton_available()
needs_triton = pytest.mark.skipif(
    not HAS_TRITON, reason="the optional package triton is not installed"
)
# Triton's interpreter must be on before triton is first imported: this process has it only when
# it was started with TRITON_INTERPRET=1 (the child that test_triton_kernels_in_the_interpreter
# starts).
INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"

# (B, M, R, D): R not a multiple of any block (16 interpreted, 64 on a GPU), D odd, D = 64, and
# D wider than one feature block.
SHAPES = [(2, 3, 37, 13), (1, 2, 40, 64), (2, 1, 20, 100)]
TEMPS = (0.7, 0.3)  # (t_s, t_t), neither 1


def _rows(
    shape: tuple[int, ...], gen: torch.Generator, dtype: torch.dtype = torch.float64
) -> torch.Tensor:
    return torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype)


def _value_and_grad(
    fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, weights: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-item values and the gradient of ``sum(weights * values)`` wrt ``x``."""
    leaf = x.detach().clone().requires_grad_()
    out = fn(leaf)
    (grad,) = torch.autograd.grad(out, leaf, weights.to(out.dtype))
    return out.detach(), grad


def _oracle(
    x: torch.Tensor, y: torch.Tensor, weights: torch.Tensor, **kw: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """The reference path in float64 on the same (possibly rounded) inputs."""
    y64 = y.double()
    return _value_and_grad(
        lambda a: SF.gram_relation_cross_entropy(a, y64, backend="reference", **kw),
        x.double(),
        weights.double(),
    )


def _max_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return float((actual.double() - expected).abs().max())


def _check_rule(
    backend: str,
    x: torch.Tensor,
    y: torch.Tensor,
    weights: torch.Tensor,
    **kw: float,
) -> None:
    """Tolerance rule: err(fused) <= 2 err(reference in the same precision) + a tiny floor."""
    value64, grad64 = _oracle(x, y, weights, **kw)
    errors = {}
    for name in ("reference", backend):
        value, grad = _value_and_grad(
            lambda a, b=name: SF.gram_relation_cross_entropy(a, y, backend=b, **kw), x, weights
        )
        assert value.dtype == torch.float32
        assert grad.dtype == x.dtype
        errors[name] = (_max_err(value, value64), _max_err(grad, grad64))
    # The floor: one float32 ulp at 1 (a row's loss is a difference of log-normalisers of order
    # 1, whatever its size), and a millionth of the largest gradient.
    floor = (torch.finfo(torch.float32).eps, 1e-6 * float(grad64.abs().max()))
    for k, what in enumerate(("value", "gradient")):
        fused, ref = errors[backend][k], errors["reference"][k]
        assert fused <= 2 * ref + floor[k], (
            f"{backend} {what} error {fused:.3g} exceeds twice the {x.dtype} reference's "
            f"{ref:.3g} (+ floor {floor[k]:.1g})"
        )


# --------------------------------------------------------------------------------------------
# The oracle itself
# --------------------------------------------------------------------------------------------


def test_reference_backend_is_the_functional_reference(gen: torch.Generator) -> None:
    s, t = _rows((3, 11, 12), gen), _rows((3, 11, 12), gen)
    rows = "b s (m d) -> b m s d"
    from einops import rearrange

    got = SF.gram_relation_cross_entropy(
        rearrange(s, rows, m=4), rearrange(t, rows, m=4), 3**-0.5, *TEMPS, backend="reference"
    )
    want = SF.relation_cross_entropy(
        SF.spatial_relation(s, 4), SF.spatial_relation(t, 4), *TEMPS, reduction="none"
    )
    assert_close(got, want)


# --------------------------------------------------------------------------------------------
# Chunked backend
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize(
    ("backend", "chunk_size"), [("chunked", None), ("chunked", 1), ("chunked", 7), ("dense", None)]
)
def test_blocked_backends_match_reference_in_float64(
    gen: torch.Generator, shape: tuple[int, int, int, int], backend: str, chunk_size: int | None
) -> None:
    x, y, w = _rows(shape, gen), _rows(shape, gen), _rows(shape[:1], gen)
    scale = shape[-1] ** -0.5
    value64, grad64 = _oracle(x, y, w, scale=scale, student_temp=0.7, teacher_temp=0.3)
    value, grad = _value_and_grad(
        lambda a: SF.gram_relation_cross_entropy(
            a, y, scale, *TEMPS, backend=backend, chunk_size=chunk_size
        ),
        x,
        w,
    )
    assert value.dtype == torch.float64
    assert_close(value, value64)
    assert_close(grad, grad64)


def test_blocks_sized_from_the_budget(
    gen: torch.Generator, monkeypatch: pytest.MonkeyPatch
) -> None:
    cpu = torch.device("cpu")
    # Whole items while they fit: 37 x 37 float64 logits are 10,952 bytes, 3 items a block.
    monkeypatch.setattr(_fused, "CPU_BLOCK_BYTES", 3 * 37 * 37 * 8)
    assert _fused._block_plan(6, 37, 8, cpu, None, whole=False) == (3, 37)
    # Rows in chunks when one item exceeds the block: 5 rows of 37, one item at a time.
    monkeypatch.setattr(_fused, "CPU_BLOCK_BYTES", 5 * 37 * 8)
    assert _fused._block_plan(6, 37, 8, cpu, None, whole=False) == (1, 5)
    assert _fused._block_plan(6, 37, 8, cpu, None, whole=True) == (1, 37)  # dense: whole items
    assert _fused._block_plan(6, 37, 8, cpu, 2, whole=False) == (2, 2)  # chunk_size wins
    assert _fused._block_plan(6, 37, 8, torch.device("meta"), None, whole=False) == (6, 37)
    shape = (2, 3, 37, 13)
    x, y, w = _rows(shape, gen), _rows(shape, gen), _rows(shape[:1], gen)
    value64, grad64 = _oracle(x, y, w, scale=0.3, student_temp=0.7, teacher_temp=0.3)
    for backend in ("chunked", "dense"):
        value, grad = _value_and_grad(
            lambda a, b=backend: SF.gram_relation_cross_entropy(a, y, 0.3, *TEMPS, backend=b),
            x,
            w,
        )
        assert_close(value, value64)
        assert_close(grad, grad64)


@pytest.mark.parametrize("backend", ["chunked", "dense"])
def test_teacher_of_other_width(gen: torch.Generator, backend: str) -> None:
    # The channel term of a local view: the teacher's rows have more features (tokens).
    x, y, w = _rows((2, 1, 9, 16), gen), _rows((2, 1, 9, 49), gen), _rows((2,), gen)
    kw = dict(scale=1 / 16, teacher_scale=1 / 49, student_temp=1.0, teacher_temp=0.1)
    value64, grad64 = _oracle(x, y, w, **kw)
    value, grad = _value_and_grad(
        lambda a: SF.gram_relation_cross_entropy(a, y, backend=backend, chunk_size=4, **kw),
        x,
        w,
    )
    assert_close(value, value64)
    assert_close(grad, grad64)


@pytest.mark.parametrize("backend", ["chunked", "dense"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_blocked_tolerance_rule(gen: torch.Generator, dtype: torch.dtype, backend: str) -> None:
    shape = (2, 3, 37, 64)
    x, y, w = _rows(shape, gen, dtype), _rows(shape, gen, dtype), _rows(shape[:1], gen)
    _check_rule(backend, x, y, w, scale=0.125, student_temp=0.7, teacher_temp=0.3)


@pytest.mark.gradcheck
def test_chunked_gradcheck(gen: torch.Generator) -> None:
    x = _rows((2, 2, 6, 3), gen).requires_grad_()
    y = _rows((2, 2, 6, 3), gen)
    assert torch.autograd.gradcheck(
        lambda a: SF.gram_relation_cross_entropy(
            a, y, 0.6, *TEMPS, backend="chunked", chunk_size=4
        ),
        (x,),
    )


# --------------------------------------------------------------------------------------------
# Memory: what the chunked path keeps does not grow with R^2
# --------------------------------------------------------------------------------------------


def _saved_bytes(fn: Callable[[], torch.Tensor]) -> int:
    """Bytes of every tensor autograd saves for the backward while ``fn`` runs."""
    total = 0

    def pack(t: torch.Tensor) -> torch.Tensor:
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return total


class _LargestTensor(TorchDispatchMode):
    """Records the largest tensor any operator returns."""

    def __init__(self) -> None:
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        out = func(*args, **(kwargs or {}))
        for leaf in pytree.tree_leaves(out):
            if isinstance(leaf, torch.Tensor):
                self.largest = max(self.largest, leaf.numel())
        return out


def test_chunked_saves_linear_in_rows_not_quadratic(gen: torch.Generator) -> None:
    saved = {}
    for rows in (64, 256):
        x = _rows((1, 2, rows, 16), gen, torch.float32).requires_grad_()
        y = _rows((1, 2, rows, 16), gen, torch.float32)
        for backend in ("reference", "chunked"):
            saved[backend, rows] = _saved_bytes(
                lambda b=backend, x=x, y=y: SF.gram_relation_cross_entropy(x, y, 0.25, backend=b)
            )
    # The inputs and four per-row statistics: exactly linear in R.
    assert saved["chunked", 256] == 4 * saved["chunked", 64]
    assert saved["chunked", 256] == 2 * (2 * 256 * 16 * 4) + 4 * (2 * 256 * 4)
    # The reference keeps (R, R) tensors.
    assert saved["reference", 256] > 12 * saved["reference", 64]
    assert saved["chunked", 256] * 10 < saved["reference", 256]


def test_dense_saves_the_inputs_and_one_factor(gen: torch.Generator) -> None:
    rows = 50
    x = _rows((2, 3, rows, 16), gen, torch.float32).requires_grad_()
    y = _rows((2, 3, rows, 16), gen, torch.float32)
    saved = _saved_bytes(lambda: SF.gram_relation_cross_entropy(x, y, 0.25, backend="dense"))
    # The student (R x 16 per item and head) and G + G^T (R x R), nothing else.
    assert saved == 2 * 3 * (rows * 16 + rows * rows) * 4


def test_chunked_never_builds_an_r_by_r_tensor(gen: torch.Generator) -> None:
    batch, heads, rows, dim, chunk = 2, 3, 200, 8, 8
    x = _rows((batch, heads, rows, dim), gen, torch.float32).requires_grad_()
    y = _rows((batch, heads, rows, dim), gen, torch.float32)
    with _LargestTensor() as mode:
        out = SF.gram_relation_cross_entropy(x, y, 0.3, backend="chunked", chunk_size=chunk)
        out.sum().backward()
    assert mode.largest <= batch * heads * chunk * rows
    with _LargestTensor() as ref_mode:
        SF.gram_relation_cross_entropy(x, y, 0.3, backend="reference").sum().backward()
    assert ref_mode.largest >= batch * heads * rows * rows


# --------------------------------------------------------------------------------------------
# Functional entries: spatial and channel
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["reference", "dense", "chunked", "auto"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_spatial_entry_equals_the_reference_kernels(
    gen: torch.Generator, backend: str, reduction: str
) -> None:
    s, t = _rows((4, 23, 12), gen).requires_grad_(), _rows((4, 23, 12), gen)
    mask = torch.tensor([True, False, True, True])
    got = spatial_relation_cross_entropy(
        s, t, 3, *TEMPS, mask, reduction=reduction, backend=backend
    )
    want = SF.relation_cross_entropy(
        SF.spatial_relation(s, 3), SF.spatial_relation(t, 3), *TEMPS, mask, reduction=reduction
    )
    assert_close(got, want)
    (g_got,) = torch.autograd.grad(got.sum(), s)
    (g_want,) = torch.autograd.grad(want.sum(), s)
    assert_close(g_got, g_want)
    assert g_got[1].abs().max() == 0  # the masked item gets no gradient


@pytest.mark.parametrize("backend", ["reference", "dense", "chunked", "auto"])
def test_channel_entry_equals_the_reference_kernels(gen: torch.Generator, backend: str) -> None:
    s, t = _rows((3, 16, 10), gen).requires_grad_(), _rows((3, 49, 10), gen)
    mask = torch.tensor([True, True, False])
    got = channel_relation_cross_entropy(s, t, 0.9, 0.1, mask, backend=backend)
    want = SF.relation_cross_entropy(SF.channel_relation(s), SF.channel_relation(t), 0.9, 0.1, mask)
    assert_close(got, want)
    (g_got,) = torch.autograd.grad(got, s)
    (g_want,) = torch.autograd.grad(want, s)
    assert_close(g_got, g_want)


@pytest.mark.parametrize("backend", ["reference", "dense", "chunked"])
def test_nothing_kept_is_a_connected_zero(gen: torch.Generator, backend: str) -> None:
    s, t = _rows((2, 9, 6), gen).requires_grad_(), _rows((2, 9, 6), gen)
    loss = spatial_relation_cross_entropy(
        s, t, 2, mask=torch.tensor([False, False]), backend=backend
    )
    assert loss.item() == 0.0
    (grad,) = torch.autograd.grad(loss, s)
    assert grad.abs().max() == 0


@pytest.mark.parametrize("backend", ["reference", "dense", "chunked"])
def test_teacher_gets_no_gradient(gen: torch.Generator, backend: str) -> None:
    s = _rows((2, 9, 6), gen).requires_grad_()
    t = _rows((2, 9, 6), gen).requires_grad_()
    spatial_relation_cross_entropy(s, t, 2, backend=backend).backward()
    channel_relation_cross_entropy(s, t, backend=backend).backward()
    assert s.grad is not None
    assert t.grad is None


def test_float32_under_autocast(gen: torch.Generator) -> None:
    s, t = _rows((2, 30, 12), gen, torch.float32), _rows((2, 30, 12), gen, torch.float32)
    want = spatial_relation_cross_entropy(s, t, 3, backend="reference")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = spatial_relation_cross_entropy(s, t, 3, backend="chunked")
        got_c = channel_relation_cross_entropy(s, t, backend="chunked")
    assert got.dtype == got_c.dtype == torch.float32
    assert_close(got, want)


def test_auto_rule() -> None:
    small = torch.empty(512, 6, 169, 64, device="meta")  # 13 x 13 lattice, any batch
    assert _fused.resolve_backend("auto", small) == "dense"
    channel = torch.empty(512, 1, 384, 196, device="meta")  # ViT-S channel relation
    assert _fused.resolve_backend("auto", channel) == "dense"
    assert _fused.resolve_backend("auto", torch.empty(1, 1, 1024, 1, device="meta")) == "dense"
    full = torch.empty(2, 6, 1369, 64, device="meta")  # every token of 518 px views
    assert _fused.resolve_backend("auto", full) == "chunked"
    rows = math.isqrt(_fused.DENSE_BUDGET_BYTES // 4)  # one item at the budget's edge
    assert _fused.resolve_backend("auto", torch.empty(3, 1, rows, 8, device="meta")) == "dense"
    edge64 = torch.empty(3, 1, rows, 8, device="meta", dtype=torch.float64)
    assert _fused.resolve_backend("auto", edge64) == "chunked"  # float64 counts double
    for name in ("reference", "dense", "chunked"):
        assert _fused.resolve_backend(name, small) == name


# --------------------------------------------------------------------------------------------
# Losses pick the path by themselves; every backend gives the same loss
# --------------------------------------------------------------------------------------------

DIM, HEADS, B = 12, 3, 2


def _loss_inputs(gen: torch.Generator, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
    """Two global views of 4 x 4 tokens (student, teacher) and one local view of 3 x 3."""
    student = torch.randn(2 * B, 16, DIM, generator=gen, dtype=dtype)
    teacher = torch.randn(2 * B, 16, DIM, generator=gen, dtype=dtype)
    local = torch.randn(B, 9, DIM, generator=gen, dtype=dtype)
    return student, teacher, local


_BOXES = torch.tensor(
    [[0.0, 0.0, 0.8, 0.9], [0.2, 0.1, 1.0, 1.0], [0.3, 0.3, 0.6, 0.7]], dtype=torch.float64
).expand(B, 3, 4)


def _build(
    cls: type[torch.nn.Module], backend: str, dtype: torch.dtype, **kw: object
) -> torch.nn.Module:
    torch.manual_seed(0)  # the same heads for every backend
    return cls(DIM, backend=backend, **kw).to(dtype)


@pytest.mark.parametrize("backend", ["chunked", "auto"])
def test_modules_agree_across_backends(gen: torch.Generator, backend: str) -> None:
    tokens = _loss_inputs(gen, torch.float64)
    for cls, kw in (
        (SpatialSelfRelationLoss, {"num_heads": HEADS, "global_lattice": 3, "local_lattice": 2}),
        (ChannelSelfRelationLoss, {}),
        (SERELoss, {"num_heads": HEADS, "global_lattice": 3, "local_lattice": 2}),
    ):
        loss_r, grads_r = _sere_call(_build(cls, "reference", torch.float64, **kw), tokens)
        loss_b, grads_b = _sere_call(_build(cls, backend, torch.float64, **kw), tokens)
        assert_close(loss_b, loss_r)
        assert len(grads_b) == len(grads_r)
        for a, b in zip(grads_b, grads_r, strict=True):
            assert_close(a, b)


def _sere_call(
    module: torch.nn.Module, tokens: tuple[torch.Tensor, ...]
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    student, teacher, local = (t.clone() for t in tokens)
    student.requires_grad_()
    local.requires_grad_()
    if isinstance(module, ChannelSelfRelationLoss):
        loss = module(student, teacher, local)
    else:
        flips = torch.zeros(B, 3, dtype=torch.bool)
        loss = module(student, teacher, _BOXES.to(student.dtype), flips, local)
    params = [p for p in module.parameters() if p.requires_grad]
    grads = torch.autograd.grad(loss, [student, local, *params], allow_unused=True)
    return loss.detach(), [g for g in grads if g is not None]


def test_sere_loss_passes_backend_on() -> None:
    sere = SERELoss(DIM, num_heads=HEADS, backend="chunked")
    assert sere.spatial is not None
    assert sere.channel is not None
    assert sere.spatial.backend == sere.channel.backend == "chunked"
    assert "backend='chunked'" in repr(sere)
    assert SpatialSelfRelationLoss(DIM, HEADS).backend == "auto"


# --------------------------------------------------------------------------------------------
# Bad input
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "call",
    [
        lambda: SF.gram_relation_cross_entropy(
            torch.randn(1, 1, 3, 2), torch.randn(1, 1, 3, 2), 1.0, backend="fast"
        ),
        lambda: spatial_relation_cross_entropy(
            torch.randn(1, 3, 4), torch.randn(1, 3, 4), 2, backend="fast"
        ),
        lambda: channel_relation_cross_entropy(
            torch.randn(1, 3, 4), torch.randn(1, 3, 4), backend="fast"
        ),
        lambda: SpatialSelfRelationLoss(DIM, HEADS, backend="fast"),
        lambda: ChannelSelfRelationLoss(DIM, backend="fast"),
        lambda: SERELoss(DIM, num_heads=HEADS, backend="fast"),
    ],
    ids=["gram", "spatial", "channel", "spatial-loss", "channel-loss", "sere"],
)
def test_unknown_backend(call: Callable[[], object]) -> None:
    with pytest.raises(ValueError, match=r"backend must be one of \('auto', .*got 'fast'"):
        call()


def test_triton_missing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_fused, "triton_available", lambda: False)
    x = torch.randn(1, 4, 6)
    with pytest.raises(RuntimeError, match="needs the optional package triton"):
        spatial_relation_cross_entropy(x, x, 2, backend="triton")
    # "auto" never needs it.
    spatial_relation_cross_entropy(x, x, 2, backend="auto")


@needs_triton
def test_triton_needs_cuda_or_the_interpreter(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    x = torch.randn(1, 4, 6)
    with pytest.raises(RuntimeError, match="needs CUDA tensors, got tensors on cpu"):
        spatial_relation_cross_entropy(x, x, 2, backend="triton")
    with pytest.raises(TypeError, match=r"float32, float16 or bfloat16 .* got torch.float64"):
        spatial_relation_cross_entropy(x.double(), x.double(), 2, backend="triton")


def test_shape_errors() -> None:
    with pytest.raises(ValueError, match=r"agree in \(B, M, R\)"):
        SF.gram_relation_cross_entropy(torch.randn(1, 1, 3, 2), torch.randn(1, 1, 4, 2), 1.0)
    with pytest.raises(ValueError, match=r"same shape \(B, S, C\)"):
        spatial_relation_cross_entropy(torch.randn(1, 3, 4), torch.randn(1, 5, 4), 2)
    with pytest.raises(ValueError, match="must divide by num_heads"):
        spatial_relation_cross_entropy(torch.randn(1, 3, 4), torch.randn(1, 3, 4), 3)
    with pytest.raises(ValueError, match="agree in B and C"):
        channel_relation_cross_entropy(torch.randn(1, 3, 4), torch.randn(1, 3, 5))
    with pytest.raises(ValueError, match=r"mask must have shape \(2,\)"):
        spatial_relation_cross_entropy(
            torch.randn(2, 3, 4), torch.randn(2, 3, 4), 2, mask=torch.ones(3, dtype=torch.bool)
        )


def test_package_imports_and_runs_without_triton() -> None:
    code = (
        "import sys; sys.modules['triton'] = None; sys.modules['triton.language'] = None\n"
        "import torch, sere_loss\n"
        "x = torch.randn(2, 9, 6)\n"
        "print(float(sere_loss.spatial_relation_cross_entropy(x, x, 2)) > 0)\n"
        "try:\n"
        "    sere_loss.spatial_relation_cross_entropy(x, x, 2, backend='triton')\n"
        "except RuntimeError as e:\n"
        "    print('optional package triton' in str(e))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["True", "True"]


# --------------------------------------------------------------------------------------------
# Triton backend, through the interpreter (in a child process) and on CUDA
# --------------------------------------------------------------------------------------------


class _TritonInterpretedChecks:
    """Triton kernels on CPU tensors; collected only in a process started in interpreter mode."""

    @pytest.mark.parametrize(
        "shape",
        [(1, 2, 37, 13), (1, 1, 40, 64), (1, 1, 20, 100)],
        ids=["odd-d", "d64", "wide-d"],
    )
    def test_float32_tolerance_rule(self, gen: torch.Generator, shape: tuple[int, ...]) -> None:
        x, y = _rows(shape, gen, torch.float32), _rows(shape, gen, torch.float32)
        w = _rows(shape[:1], gen)
        _check_rule("triton", x, y, w, scale=shape[-1] ** -0.5, student_temp=0.7, teacher_temp=0.3)

    def test_teacher_of_other_width(self, gen: torch.Generator) -> None:
        x, y = _rows((2, 1, 18, 9), gen, torch.float32), _rows((2, 1, 18, 30), gen, torch.float32)
        w = _rows((2,), gen)
        _check_rule("triton", x, y, w, scale=1 / 9, teacher_scale=1 / 30, teacher_temp=0.1)

    @pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
    def test_low_precision_tolerance_rule(self, gen: torch.Generator, dtype: torch.dtype) -> None:
        shape = (1, 2, 33, 64)
        x, y, w = _rows(shape, gen, dtype), _rows(shape, gen, dtype), _rows(shape[:1], gen)
        _check_rule("triton", x, y, w, scale=0.125, student_temp=0.7, teacher_temp=0.3)

    def test_losses_match_reference(self, gen: torch.Generator) -> None:
        tokens = _loss_inputs(gen, torch.float32)
        kw = {"num_heads": HEADS, "global_lattice": 3, "local_lattice": 2}
        loss_r, grads_r = _sere_call(_build(SERELoss, "reference", torch.float32, **kw), tokens)
        loss_t, grads_t = _sere_call(_build(SERELoss, "triton", torch.float32, **kw), tokens)
        torch.testing.assert_close(loss_t, loss_r, atol=1e-5, rtol=1e-5)
        assert len(grads_t) == len(grads_r)
        for a, b in zip(grads_t, grads_r, strict=True):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)

    def test_no_second_derivative(self, gen: torch.Generator) -> None:
        x = _rows((1, 1, 20, 16), gen, torch.float32).requires_grad_()
        y = _rows((1, 1, 20, 16), gen, torch.float32)
        out = SF.gram_relation_cross_entropy(x, y, 0.25, backend="triton").sum()
        with pytest.raises(RuntimeError, match="'triton' relation kernels have no second"):
            torch.autograd.grad(out, x, create_graph=True)


if INTERPRETED and HAS_TRITON:

    class TestTritonInterpreted(_TritonInterpretedChecks):
        pass


_NUM_INTERPRETED = 8  # the tests of _TritonInterpretedChecks, parametrisations included


@needs_triton
def test_triton_kernels_in_the_interpreter() -> None:
    if INTERPRETED:
        pytest.skip("this process runs TestTritonInterpreted itself")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    target = f"{Path(__file__).resolve()}::TestTritonInterpreted"
    args = [sys.executable, "-m", "pytest", target, "-q", "-p", "no:cacheprovider", "-rfEs"]
    out = subprocess.run(
        args,
        env=env,
        cwd=Path(__file__).resolve().parents[1],
        capture_output=True,
        text=True,
        timeout=600,
    )
    report = out.stdout + out.stderr
    assert out.returncode == 0, report
    assert re.search(rf"\b{_NUM_INTERPRETED} passed\b", report), report
    assert "skipped" not in report, report


@needs_triton
def test_interpreter_switched_on_too_late(monkeypatch: pytest.MonkeyPatch) -> None:
    if INTERPRETED:
        pytest.skip("this process started in interpreter mode")
    importlib.import_module("triton.language")  # imported in compiled mode
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    x = torch.randn(1, 4, 6)
    with pytest.raises(RuntimeError, match="before the first import of triton"):
        spatial_relation_cross_entropy(x, x, 2, backend="triton")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_on_cuda(gen: torch.Generator, dtype: torch.dtype) -> None:
    # A 27 x 27 lattice: 6 x 729^2 float32 logits (12.8 MB) are over the dense budget, so
    # "auto" picks Triton on CUDA (a 13 x 13 lattice stays dense: its factor fits).
    shape = (2, 6, 729, 64)
    x = _rows(shape, gen, dtype).cuda()
    y = _rows(shape, gen, dtype).cuda()
    w = _rows(shape[:1], gen).cuda()
    assert _fused.resolve_backend("auto", x) == "triton"
    _check_rule("triton", x, y, w, scale=0.125, student_temp=1.0, teacher_temp=0.5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_sere_on_cuda_makes_the_host_wait_once_at_most() -> None:
    # Each host wait stalls the CPU until the GPU has run everything queued (the backbone's
    # forward). With boxes and flips on the CPU, SERE waits for nothing; with them on the GPU,
    # their checks read one small tensor back. Both give the same loss and gradients.
    import warnings

    gen = torch.Generator().manual_seed(0)
    batch = 4
    student = torch.randn(2 * batch, 196, 96, generator=gen).cuda()
    teacher = torch.randn(2 * batch, 196, 96, generator=gen).cuda()
    local = torch.randn(4 * batch, 36, 96, generator=gen).cuda()
    lo = 0.3 * torch.rand(batch, 6, 2, generator=gen)
    boxes, flips = torch.cat([lo, lo + 0.6], dim=-1), torch.rand(batch, 6, generator=gen) < 0.5
    sere = SERELoss(96, num_heads=6).cuda()

    def run(geometry: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, ...]:
        s, x = student.clone().requires_grad_(), local.clone().requires_grad_()
        loss = sere(s, teacher, *geometry, x)
        loss.backward()
        return loss.detach(), s.grad, x.grad

    run((boxes, flips))  # warm-up: the caching allocator's first allocations
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        on_cpu = run((boxes, flips))
    finally:
        torch.cuda.set_sync_debug_mode(0)
    geometry = boxes.cuda(), flips.cuda()
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            on_gpu = run(geometry)
        finally:
            torch.cuda.set_sync_debug_mode(0)
    waits = [w for w in caught if "called a synchronizing CUDA operation" in str(w.message)]
    assert len(waits) == 1, [f"{w.filename}:{w.lineno}" for w in waits]
    mixed = run((boxes, flips.cuda()))  # flips follow the boxes to where the grids are made
    for a, b, c in zip(on_cpu, on_gpu, mixed, strict=True):
        assert_close(a, b, rtol=1e-5, atol=1e-6)
        assert_close(a, c, rtol=1e-5, atol=1e-6)
    # The other way round, tokens on the CPU and the geometry on the GPU: the grids come back
    # to the CPU with a blocking copy, so a long kernel queued first cannot race the read.
    on_host = copy.deepcopy(sere).cpu()
    s, x = student.cpu().requires_grad_(), local.cpu().requires_grad_()
    busy = torch.randn(4096, 4096, device="cuda")
    for _ in range(20):
        busy = busy @ busy / 64  # queued GPU work ahead of the geometry's kernels
    loss = on_host(s, teacher.cpu(), *geometry, x)
    loss.backward()
    assert_close(loss, on_cpu[0].cpu(), rtol=1e-5, atol=1e-6)
    assert_close(s.grad, on_cpu[1].cpu(), rtol=1e-5, atol=1e-5)
