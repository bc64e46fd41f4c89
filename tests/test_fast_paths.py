"""The fast paths of the losses held to their references (issue 14).

- The paired channel kernel against a loop over pairs, items and rows written here from SPEC 3
  and 5, in float64, and against the reference in low precision by the team's rule: the fast
  path's error against float64 is at most twice the reference's in the same precision.
- The whole ``SERELoss`` step (loss, gradients of the tokens and of every head parameter, and
  every BatchNorm running buffer) under the same rule, for each fused backend.
- ``retain_graph=True`` gives the same gradient twice; a double backward raises a clear error
  in the fused backends and works in the reference one.
- The default heads (flattened tokens, in-place ReLU) against BatchNorm and ReLU written out.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from conftest import assert_close
from sere_loss import PredictionHead, ProjectionHead, SERELoss, _fused
from sere_loss import functional as SF

FUSED = ("dense", "chunked")
C, B = 10, 3
TOKENS = (16, 16, 9, 9)  # two global views of 4 x 4 tokens, two local views of 3 x 3


def _channel_pairs_loop(
    student: list[torch.Tensor], teacher: list[torch.Tensor], pairs: list, ts: float, tt: float
) -> torch.Tensor:
    """``(P, B)``: for each pair and item, the mean over rows r of
    ``-sum_j softmax(T_r / tt)_j log softmax(A_r / ts)_j`` with ``A = x^T x / N``."""
    out = torch.zeros(len(pairs), student[0].shape[0], dtype=torch.float64)
    for k, (i, v) in enumerate(pairs):
        for b in range(student[0].shape[0]):
            x, y = student[v][b].double(), teacher[i][b].double()
            a = x.T @ x / x.shape[0]
            t = y.T @ y / y.shape[0]
            rows = [
                -(torch.softmax(t[r] / tt, 0) * torch.log_softmax(a[r] / ts, 0)).sum()
                for r in range(a.shape[0])
            ]
            out = out.index_put((torch.tensor(k), torch.tensor(b)), torch.stack(rows).mean())
    return out


def _views(gen: torch.Generator, dtype: torch.dtype = torch.float64) -> list[torch.Tensor]:
    return [
        torch.randn(B, n, C, generator=gen, dtype=torch.float64).relu().to(dtype) for n in TOKENS
    ]


def _paired_value_and_grads(
    backend: str, student: list[torch.Tensor], teacher: list[torch.Tensor], weights: torch.Tensor
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    leaves = [x.detach().clone().requires_grad_() for x in student]
    out = SF.paired_channel_relation_cross_entropy(
        leaves, teacher, SF.view_pairs(2, 2), 1.0, 0.1, backend=backend
    )
    grads = torch.autograd.grad(out, leaves, weights.to(out.dtype))
    return out.detach(), list(grads)


@pytest.mark.parametrize("backend", ["reference", *FUSED])
@pytest.mark.parametrize("products", [0, 100], ids=["sum-then-product", "two-products"])
def test_paired_channel_matches_the_loop_in_float64(
    gen: torch.Generator, backend: str, products: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(_fused, "CPU_BLOCK_BYTES", 2 * C * C * 8)  # blocks of 2 items, B = 3
    monkeypatch.setattr(_fused, "_TWO_PRODUCTS_BELOW_TOKENS", products)
    student, teacher = _views(gen), _views(gen)[:2]
    pairs = SF.view_pairs(2, 2)
    # Upstream weights of either sign; for item 0 the two pairs of local view 2 cancel.
    weights = 2 * torch.rand(len(pairs), B, generator=gen, dtype=torch.float64) - 1
    weights[pairs.index((1, 2)), 0] = -weights[pairs.index((0, 2)), 0]
    leaves = [x.clone().requires_grad_() for x in student]
    want = _channel_pairs_loop(leaves, teacher, pairs, 1.0, 0.1)
    want_grads = torch.autograd.grad(want, leaves, weights)
    got, grads = _paired_value_and_grads(backend, student, teacher, weights)
    assert got.dtype == torch.float64
    assert_close(got, want)
    for g, w in zip(grads, want_grads, strict=True):
        assert_close(g, w)


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_paired_channel_tolerance_rule(
    gen: torch.Generator, backend: str, dtype: torch.dtype
) -> None:
    student, teacher = _views(gen, dtype), _views(gen, dtype)[:2]
    weights = torch.rand(len(SF.view_pairs(2, 2)), B, generator=gen, dtype=torch.float64)
    oracle, oracle_grads = _paired_value_and_grads(
        "reference", [x.double() for x in student], [y.double() for y in teacher], weights
    )
    errors = {}
    for name in ("reference", backend):
        value, grads = _paired_value_and_grads(name, student, teacher, weights)
        assert value.dtype == torch.float32
        grad_err = max(
            float((g.double() - o).abs().max()) for g, o in zip(grads, oracle_grads, strict=True)
        )
        errors[name] = (float((value.double() - oracle).abs().max()), grad_err)
    floor = (torch.finfo(torch.float32).eps, 1e-6 * max(float(g.abs().max()) for g in oracle_grads))
    for k, what in enumerate(("value", "gradient")):
        assert errors[backend][k] <= 2 * errors["reference"][k] + floor[k], (
            f"{backend} {what} error {errors[backend][k]:.3g} exceeds twice the {dtype} "
            f"reference's {errors['reference'][k]:.3g}"
        )


@pytest.mark.parametrize("backend", ["reference", *FUSED])
def test_paired_channel_unpaired_view_and_teacher_get_no_gradient(
    gen: torch.Generator, backend: str
) -> None:
    student = [x.requires_grad_() for x in _views(gen)]
    teacher = [y.requires_grad_() for y in _views(gen)[:2]]
    out = SF.paired_channel_relation_cross_entropy(
        student, teacher, [(0, 1), (1, 2)], backend=backend
    )
    out.sum().backward()
    assert student[0].grad is None or float(student[0].grad.abs().max()) == 0.0
    assert student[3].grad is None or float(student[3].grad.abs().max()) == 0.0
    assert student[1].grad is not None
    assert student[2].grad is not None
    assert teacher[0].grad is None
    assert teacher[1].grad is None


def test_paired_channel_bad_input() -> None:
    views = [torch.randn(2, 4, 3), torch.randn(2, 4, 3)]
    with pytest.raises(ValueError, match=r"pairs must be a non-empty list of \(i, v\)"):
        SF.paired_channel_relation_cross_entropy(views, views, [(0, 2)])
    with pytest.raises(ValueError, match=r"got student\[1\] of shape \(2, 4, 5\)"):
        SF.paired_channel_relation_cross_entropy([views[0], torch.randn(2, 4, 5)], views, [(0, 1)])
    with pytest.raises(TypeError, match="student must be a non-empty list of"):
        SF.paired_channel_relation_cross_entropy(views[0], views, [(0, 1)])
    with pytest.raises(ValueError, match="backend must be one of"):
        SF.paired_channel_relation_cross_entropy(views, views, [(0, 1)], backend="fast")


# --------------------------------------------------------------------------------------------
# Sampling: token rows gathered by their bilinear taps against grid_sample
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("padding", ["border", "zeros"])
@pytest.mark.parametrize("hw", [(5, 5), (3, 7)])
def test_sample_tokens_is_sample_region(
    gen: torch.Generator, padding: str, hw: tuple[int, int]
) -> None:
    h, w = hw
    tokens = torch.randn(3, h * w, 4, generator=gen, dtype=torch.float64, requires_grad=True)
    # Points inside, on the border band and outside the view (grids of -2 mark empty pairs).
    grid = 2.6 * torch.rand(3, 4, 6, 2, generator=gen, dtype=torch.float64) - 1.3
    grid[0, 0, 0] = -2.0
    grid[1, 0, :2] = torch.tensor([[-1.0, 1.0], [1.0, -1.0]], dtype=torch.float64)  # corners
    maps = tokens.transpose(1, 2).reshape(3, 4, h, w)  # the tokens on their grid, (B, C, H, W)
    want = SF.sample_region(maps, grid, padding)
    got = SF.sample_tokens(tokens, hw, grid, padding)
    assert_close(got, want)
    weights = torch.randn(want.shape, generator=gen, dtype=torch.float64)
    (want_grad,) = torch.autograd.grad(want, tokens, weights)
    (got_grad,) = torch.autograd.grad(got, tokens, weights)
    assert_close(got_grad, want_grad)


def test_bilinear_taps_weights_sum_to_one_inside() -> None:
    grid = torch.tensor([[[0.3, -0.2], [-0.5, 0.6], [1.0, 1.0]]], dtype=torch.float64)
    index, weight = SF.bilinear_taps(grid, (4, 6), "zeros")
    assert index.shape == weight.shape == (1, 3, 4)
    assert int(index.min()) >= 0
    assert int(index.max()) < 24
    # Between pixel centres (u = 3.4, v = 1.1; u = 1.0, v = 2.7) all four taps are in the map.
    # At (1, 1), u = 5.5 and v = 3.5: only pixel (5, 3) is, with weight 0.5 * 0.5.
    assert_close(weight[0, :2].sum(-1), torch.ones(2, dtype=torch.float64))
    assert float(weight[0, 2].sum()) == pytest.approx(0.25)
    with pytest.raises(ValueError, match="tokens must hold the H \\* W = 6 tokens"):
        SF.sample_tokens(torch.randn(1, 5, 2), (2, 3), torch.zeros(1, 1, 1, 2))


# --------------------------------------------------------------------------------------------
# The whole loss: values, gradients and BatchNorm buffers under the tolerance rule
# --------------------------------------------------------------------------------------------

DIM, HEADS = 24, 3


def _step(
    module: SERELoss, tokens: tuple[torch.Tensor, ...], boxes: torch.Tensor, flips: torch.Tensor
) -> dict[str, list[torch.Tensor]]:
    """One training step; the loss, the gradients and the BatchNorm buffers it leaves."""
    dtype = next(module.parameters()).dtype
    sg, tg, sl = (t.detach().to(dtype, copy=True) for t in tokens)
    sg.requires_grad_()
    sl.requires_grad_()
    loss = module(sg, tg, boxes.to(dtype), flips, sl)
    params = [p for p in module.parameters() if p.requires_grad]
    grads = torch.autograd.grad(loss, [sg, sl, *params])
    buffers = [b for name, b in module.named_buffers() if "running" in name]
    return {
        "value": [loss.detach()],
        "gradient": list(grads),
        "buffers": [b.clone() for b in buffers],
    }


def _sere_inputs(
    gen: torch.Generator,
) -> tuple[tuple[torch.Tensor, ...], torch.Tensor, torch.Tensor]:
    tokens = (
        torch.randn(2 * B, 36, DIM, generator=gen, dtype=torch.float64),  # 2 globals, 6 x 6
        torch.randn(2 * B, 36, DIM, generator=gen, dtype=torch.float64),
        torch.randn(2 * B, 9, DIM, generator=gen, dtype=torch.float64),  # 2 locals, 3 x 3
    )
    lo = 0.4 * torch.rand(B, 4, 2, generator=gen, dtype=torch.float64)
    hi = 0.6 + 0.4 * torch.rand(B, 4, 2, generator=gen, dtype=torch.float64)
    flips = torch.rand(B, 4, generator=gen) < 0.5
    return tokens, torch.cat([lo, hi], -1), flips


def _sere(backend: str, dtype: torch.dtype) -> SERELoss:
    torch.manual_seed(0)  # the same heads for every backend and dtype
    return SERELoss(DIM, num_heads=HEADS, backend=backend).to(dtype)


@pytest.mark.parametrize("backend", FUSED)
def test_sere_step_tolerance_rule(gen: torch.Generator, backend: str) -> None:
    tokens, boxes, flips = _sere_inputs(gen)
    rounded = tuple(t.float().double() for t in tokens)  # the oracle sees the float32 inputs
    oracle = _step(_sere("reference", torch.float64), rounded, boxes, flips)
    ref32 = _step(_sere("reference", torch.float32), tokens, boxes.float(), flips)
    fast32 = _step(_sere(backend, torch.float32), tokens, boxes.float(), flips)
    for what, expected in oracle.items():
        assert len(fast32[what]) == len(expected) > 0
        for k, (fast, ref, want) in enumerate(
            zip(fast32[what], ref32[what], expected, strict=True)
        ):
            err_fast = float((fast.double() - want).abs().max())
            err_ref = float((ref.double() - want).abs().max())
            floor = max(torch.finfo(torch.float32).eps, 1e-6 * float(want.abs().max()))
            assert err_fast <= 2 * err_ref + floor, (
                f"{backend}: {what} {k} error {err_fast:.3g} exceeds twice the float32 "
                f"reference's {err_ref:.3g}"
            )
    # The heads run the same code on every backend: their buffers agree exactly.
    for fast, ref in zip(fast32["buffers"], ref32["buffers"], strict=True):
        assert torch.equal(fast, ref)


@pytest.mark.parametrize("backend", ["reference", *FUSED])
def test_retain_graph_gives_the_same_gradient_twice(gen: torch.Generator, backend: str) -> None:
    tokens, boxes, flips = _sere_inputs(gen)
    module = _sere(backend, torch.float64)
    sg, tg, sl = (t.clone() for t in tokens)
    sg.requires_grad_()
    sl.requires_grad_()
    loss = module(sg, tg, boxes, flips, sl)
    leaves = [sg, sl, *(p for p in module.parameters() if p.requires_grad)]
    first = torch.autograd.grad(loss, leaves, retain_graph=True)
    second = torch.autograd.grad(loss, leaves)
    for a, b in zip(first, second, strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("backend", FUSED)
def test_double_backward_raises_a_clear_error(gen: torch.Generator, backend: str) -> None:
    tokens, boxes, flips = _sere_inputs(gen)
    sg = tokens[0].clone().requires_grad_()
    loss = _sere(backend, torch.float64)(sg, tokens[1], boxes, flips, tokens[2])
    with pytest.raises(RuntimeError, match=f"the '{backend}' relation kernels have no second"):
        torch.autograd.grad(loss, sg, create_graph=True)


def test_reference_backend_differentiates_twice(gen: torch.Generator) -> None:
    s, t = torch.randn(2, 5, 4, generator=gen, dtype=torch.float64), torch.randn(2, 5, 4)
    assert torch.autograd.gradgradcheck(
        lambda x: SF.spatial_relation_cross_entropy(
            x, t.double(), 2, 0.7, 0.3, backend="reference"
        ),
        (s.requires_grad_(),),
    )
    views = [torch.randn(2, n, 3, generator=gen, dtype=torch.float64) for n in (4, 4, 2)]
    assert torch.autograd.gradgradcheck(
        lambda *xs: SF.paired_channel_relation_cross_entropy(
            list(xs), views[:2], SF.view_pairs(2, 1), 0.7, 0.3, backend="reference"
        ),
        tuple(v.clone().requires_grad_() for v in views),
    )
    # The module: a gradient penalty differentiates through the loss.
    tokens, boxes, flips = _sere_inputs(gen)
    sg = tokens[0].clone().requires_grad_()
    loss = _sere("reference", torch.float64)(sg, tokens[1], boxes, flips, tokens[2])
    (grad,) = torch.autograd.grad(loss, sg, create_graph=True)
    (second,) = torch.autograd.grad(grad.square().sum(), sg)
    assert float(second.abs().max()) > 0


def test_both_terms_share_one_dense_copy_of_strided_tokens(gen: torch.Generator) -> None:
    """A ViT's patch tokens come sliced off its class token (strided): SERELoss makes them
    contiguous once, and both terms' heads read that copy; nothing else changes."""
    tokens, boxes, flips = _sere_inputs(gen)

    def step(module: SERELoss, views: list, leaves: list) -> list[torch.Tensor]:
        loss = module(views[0], views[1], boxes, flips, views[2])
        params = [p for p in module.parameters() if p.requires_grad]
        return [loss.detach(), *torch.autograd.grad(loss, [*params, *leaves])]

    # The same values as strided views: each (V * B, N, C) slice skips a leading "class token".
    wide = [torch.cat([t[:, :1], t], dim=1) for t in tokens]
    for t in (wide[0], wide[2]):
        t.requires_grad_()
    strided = [t[:, 1:] for t in wide]
    assert not any(t.is_contiguous() for t in strided)
    module = _sere("dense", torch.float64)
    seen: dict[str, list[torch.Tensor]] = {"spatial": [], "channel": []}
    for name in seen:
        heads = getattr(module, name).heads
        for part in (heads.projection, heads.local_projection, heads.teacher_projection):
            part.register_forward_pre_hook(lambda _, args, name=name: seen[name].append(args[0]))
    got = step(module, strided, [wide[0], wide[2]])
    assert len(seen["spatial"]) == len(seen["channel"]) == 3
    for a, b in zip(seen["spatial"], seen["channel"], strict=True):
        assert a.is_contiguous()
        assert a.data_ptr() == b.data_ptr()  # one copy, read by both terms
    # The same module on contiguous tokens: the same loss, parameter and token gradients.
    dense = [t.detach().clone() for t in tokens]
    for t in (dense[0], dense[2]):
        t.requires_grad_()
    want = step(_sere("dense", torch.float64), dense, [dense[0], dense[2]])
    for a, b in zip(got[:-2], want[:-2], strict=True):
        assert_close(a, b)
    for g, w in zip(got[-2:], want[-2:], strict=True):
        assert not g[:, 0].any()  # the class token gets no gradient
        assert_close(g[:, 1:], w)
    # Lists of views are joined once too, with the terms' own checks and messages.
    listed = [list(t.detach().view(-1, B, *t.shape[1:])) for t in strided]
    assert_close(step(_sere("dense", torch.float64), listed, [])[0], want[0])
    with pytest.raises(ValueError, match=r"teacher_global must be a list of 2 views, got 1"):
        _sere("dense", torch.float64)(listed[0], listed[1][:1], boxes, flips, listed[2])


# --------------------------------------------------------------------------------------------
# The default heads
# --------------------------------------------------------------------------------------------


def _bn_relu(
    x: torch.Tensor, bn: nn.BatchNorm1d
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """BatchNorm over every token in training, then ReLU; and the running buffers it leaves."""
    flat = x.reshape(-1, x.shape[-1])
    mean, var = flat.mean(0), flat.var(0, unbiased=False)
    out = torch.relu((flat - mean) / torch.sqrt(var + bn.eps) * bn.weight + bn.bias)
    m = bn.momentum
    running_mean = (1 - m) * torch.zeros_like(mean) + m * mean.detach()
    running_var = (1 - m) * torch.ones_like(var) + m * flat.var(0, unbiased=True).detach()
    return out.reshape(x.shape), running_mean, running_var


def test_default_heads_against_batchnorm_and_relu_written_out(gen: torch.Generator) -> None:
    x = (2 + 3 * torch.randn(3, 20, 6, generator=gen, dtype=torch.float64)).requires_grad_()
    kept = x.detach().clone()
    torch.manual_seed(0)
    projection, prediction = ProjectionHead(6).double(), PredictionHead(6).double()
    with torch.no_grad():
        for bn in (projection[0].bn, prediction[1].bn):
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.uniform_(-0.5, 0.5)
    out = prediction(projection(x))
    h, mean_h, var_h = _bn_relu(x, projection[0].bn)
    want, mean_g, var_g = _bn_relu(h @ prediction[0].weight.T, prediction[1].bn)
    assert_close(out, want)
    weights = torch.randn(out.shape, generator=gen, dtype=torch.float64)
    params = [x, prediction[0].weight, projection[0].bn.weight, prediction[1].bn.bias]
    for got, expected in zip(
        torch.autograd.grad(out, params, weights),
        torch.autograd.grad(want, params, weights),
        strict=True,
    ):
        assert_close(got, expected)
    for bn, mean, var in ((projection[0].bn, mean_h, var_h), (prediction[1].bn, mean_g, var_g)):
        assert_close(bn.running_mean, mean)
        assert_close(bn.running_var, var)
    assert torch.equal(x.detach(), kept)  # the in-place ReLU never touches the input


def _multicrop(batch: int, device: str | torch.device) -> tuple[torch.Tensor, ...]:
    gen = torch.Generator().manual_seed(3)
    student = torch.randn(2 * batch, 49, 48, generator=gen).to(device).requires_grad_()
    teacher = torch.randn(2 * batch, 49, 48, generator=gen).to(device)
    local = torch.randn(4 * batch, 9, 48, generator=gen).to(device).requires_grad_()
    lo = 0.3 * torch.rand(batch, 6, 2, generator=gen)
    boxes = torch.cat([lo, lo + 0.6], dim=-1)
    flips = torch.rand(batch, 6, generator=gen) < 0.5
    return student, teacher, local, boxes, flips


def test_boxes_on_the_cpu_read_nothing_back_from_the_tokens_device() -> None:
    # Tokens on the meta device hold no values: any read of one (a check's bool(), .item(), a
    # list of indices made on the device and read back) raises. With the crop geometry on the
    # CPU, as a loader gives it, SERE must run forward and backward without one, so on a GPU
    # it never makes the host wait.
    student, teacher, local, boxes, flips = _multicrop(3, "meta")
    sere = SERELoss(48, num_heads=4).to("meta")
    loss = sere(student, teacher, boxes, flips, local)
    loss.backward()
    assert loss.device.type == "meta"
    assert student.grad is not None
    assert local.grad is not None
    assert student.grad.shape == student.shape


def test_copies_block_only_where_the_host_reads_them() -> None:
    # Grids and masks made on the CPU go to the tokens' device without a wait (staged before
    # the call returns); from a GPU to the CPU the copy must block, as its values are read next.
    class Fake:
        def __init__(self, kind: str) -> None:
            self.device = torch.device(kind)

        def to(self, device: torch.device, non_blocking: bool) -> bool:
            return non_blocking

    assert SF._moved(Fake("cpu"), torch.device("cuda")) is True  # type: ignore[arg-type]
    assert SF._moved(Fake("cuda"), torch.device("cpu")) is False  # type: ignore[arg-type]
    assert (
        SF._moved(
            Fake(
                "cuda",
            ),
            torch.device("cuda"),
        )
        is False
    )  # type: ignore[arg-type]
