"""SERE as one captured graph, and its compiled path.

On a GPU SERE is bound by launching hundreds of small kernels, not by its arithmetic; the way out
is one compiled graph replayed as a CUDA graph. That needs a forward and backward that never read
a device value on the host (a read breaks the graph and makes the host wait) and whose shapes do
not depend on data. These tests hold both on the CPU: ``torch._dynamo.explain`` finds one graph
and no break, and a forward and backward with every input on the meta device (which holds no
values, so any read raises) runs. The compiled path is held to the accuracy rule of the fused
kernels (``tests/test_fused.py``): its error against a float64 oracle at most twice the float32
eager reference's, plus a floor of one float32 ulp.
"""

from __future__ import annotations

import copy
import pickle
import warnings
from collections.abc import Iterator

import pytest
import torch
import torch._dynamo

import sere_loss
from sere_loss import ChannelSelfRelationLoss, SERELoss, SpatialSelfRelationLoss, set_value_checks

DIM, HEADS = 48, 4


@pytest.fixture(autouse=True)
def _fresh_dynamo() -> Iterator[None]:
    torch._dynamo.reset()
    previous = set_value_checks("auto")
    yield
    set_value_checks(previous)
    torch._dynamo.reset()


def _crops(
    batch: int = 2,
    device: str = "cpu",
    dtype: torch.dtype = torch.float32,
    seed: int = 3,
    int_flips: bool = False,
) -> tuple[torch.Tensor, ...]:
    """DINO-like crops at toy size: 2 global views of 7 x 7 tokens, 4 local views of 3 x 3."""
    gen = torch.Generator().manual_seed(seed)

    def tokens(views: int, n: int) -> torch.Tensor:
        return torch.randn(views * batch, n, DIM, generator=gen, dtype=torch.float64).to(dtype)

    student, teacher, local = tokens(2, 49), tokens(2, 49), tokens(4, 9)
    lo = 0.3 * torch.rand(batch, 6, 2, generator=gen)
    boxes = torch.cat([lo, lo + 0.6], dim=-1)
    flips = torch.rand(batch, 6, generator=gen) < 0.5
    if int_flips:
        flips = flips.long()
    moved = [t.to(device) for t in (student, teacher, local)]
    if device == "meta":
        boxes, flips = boxes.to(device), flips.to(device)
    return (*moved, boxes, flips)


def _explain(module: torch.nn.Module, *args: object, **kwargs: object) -> tuple[int, int, str]:
    out = torch._dynamo.explain(module)(*args, **kwargs)
    reasons = "; ".join(str(r.reason)[:200] for r in out.break_reasons)
    return out.graph_count, out.graph_break_count, reasons


@pytest.mark.parametrize("backend", ["reference", "dense", "chunked"])
def test_sere_traces_as_one_graph(backend: str) -> None:
    student, teacher, local, boxes, flips = _crops(int_flips=backend == "dense")
    sere = SERELoss(DIM, num_heads=HEADS, backend=backend)
    graphs, breaks, reasons = _explain(sere, student.requires_grad_(), teacher, boxes, flips, local)
    assert (graphs, breaks) == (1, 0), reasons


def test_each_term_and_autocast_trace_as_one_graph() -> None:
    student, teacher, local, boxes, flips = _crops()
    spatial = SpatialSelfRelationLoss(DIM, HEADS)
    assert _explain(spatial, student, teacher, boxes, flips, local)[:2] == (1, 0)
    channel = ChannelSelfRelationLoss(DIM)
    assert _explain(channel, student, teacher, local)[:2] == (1, 0)
    sere = SERELoss(DIM, num_heads=HEADS)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        graphs, breaks, reasons = _explain(sere, student, teacher, boxes, flips, local)
    assert (graphs, breaks) == (1, 0), reasons


@pytest.mark.parametrize("backend", ["reference", "dense", "chunked"])
@pytest.mark.parametrize("int_flips", [False, True])
def test_every_input_on_the_meta_device(backend: str, int_flips: bool) -> None:
    # The meta device holds shapes, no values: a host read of any value (a value check, an
    # index list read back, a mask counted on the host) raises here. Boxes and flips are on the
    # meta device too, so the crop geometry itself must be computed without one.
    student, teacher, local, boxes, flips = _crops(device="meta", int_flips=int_flips)
    sere = SERELoss(DIM, num_heads=HEADS, backend=backend).to("meta")
    student.requires_grad_()
    local.requires_grad_()
    loss, terms = sere(student, teacher, boxes, flips, local, return_terms=True)
    loss.backward()
    assert loss.device.type == "meta"
    assert set(terms) == {"spatial", "channel"}
    assert student.grad is not None
    assert student.grad.shape == student.shape
    assert local.grad is not None
    assert local.grad.shape == local.shape
    assert all(p.grad is not None for p in sere.parameters() if p.requires_grad)


def test_value_checks_are_device_asserts_inside_a_graph() -> None:
    student, teacher, local, boxes, flips = _crops()
    bad = boxes.clone()
    bad[1, 2] = torch.tensor([0.5, 0.1, 0.4, 0.9])  # x0 > x1
    sere = SERELoss(DIM, num_heads=HEADS)
    # Eager, boxes on the CPU: checked on the host, the row at fault named.
    with pytest.raises(ValueError, match=r"x0 < x1 and y0 < y1; row 8"):
        sere(student, teacher, bad, flips, local)
    # The whole module under torch.compile: the boxes are in the graph, checked by an assert.
    compiled = torch.compile(sere, fullgraph=True, backend="aot_eager")
    with pytest.raises(RuntimeError, match=r"finite, inside \[0, 1\], with x0 < x1"):
        compiled(student, teacher, bad, flips, local)
    assert torch.isfinite(compiled(student, teacher, boxes, flips, local))
    # Integer flips other than 0 and 1, likewise.
    wrong = flips.long()
    wrong[0, 1] = 2
    with pytest.raises(RuntimeError, match="only 0 and 1"):
        compiled(student, teacher, boxes, wrong, local)
    # "host" cannot be captured: a clear refusal, not a broken graph.
    set_value_checks("host")
    torch._dynamo.reset()
    with pytest.raises(Exception, match=r"set_value_checks\('host'\)"):
        compiled(student, teacher, boxes, flips, local)


def test_value_checks_off_never_reads_outside_the_maps() -> None:
    student, teacher, local, boxes, flips = _crops()
    nan_box = boxes.clone()
    nan_box[0, 3, 0] = float("nan")
    sere = SERELoss(DIM, num_heads=HEADS)
    assert set_value_checks("off") == "auto"
    # Unchecked, a NaN box fails the overlap test (NaN compares false), so its pairs are left
    # out of the mean as if the crops did not overlap: no error, a finite loss.
    assert torch.isfinite(sere(student, teacher, nan_box, flips, local))
    # A NaN point given to the sampling directly reads inside the map, and says NaN.
    grid = torch.zeros(2, 2, 2, 2)
    grid[1, 0, 1, 0] = float("nan")
    sampled = sere_loss.functional.sample_tokens(student[:2], (7, 7), grid)
    assert torch.isnan(sampled[1, 1]).all()
    assert torch.isfinite(sampled[0]).all()
    with pytest.raises(ValueError, match=r"mode must be one of \('auto', 'host', 'off'\)"):
        set_value_checks("device")


def test_compiled_loss_checks_cpu_boxes_on_the_host_before_its_graph() -> None:
    student, teacher, local, boxes, flips = _crops()
    bad = boxes.clone()
    bad[0, 0, 3] = 1.5
    sere = SERELoss(DIM, num_heads=HEADS)
    sere.compile(backend="aot_eager")
    with pytest.raises(ValueError, match=r"inside \[0, 1\]; got values in \[.*, 1\.5\]"):
        sere(student, teacher, bad, flips, local)


def test_compile_keeps_the_module_and_copies_compile_their_own() -> None:
    student, teacher, local, boxes, flips = _crops()
    sere = SERELoss(DIM, num_heads=HEADS)
    keys = list(sere.state_dict())
    sere.compile(backend="aot_eager")
    assert list(sere.state_dict()) == keys  # checkpoints do not change
    eager = copy.deepcopy(sere)
    eager._compile_options = None
    loss = sere(student, teacher, boxes, flips, local)
    twin = copy.deepcopy(sere)  # after its first call, with a compiled function inside
    assert "_compiled_loss" not in twin.__dict__
    assert twin._compile_options == sere._compile_options
    torch.testing.assert_close(twin(student, teacher, boxes, flips, local), loss)
    torch.testing.assert_close(eager(student, teacher, boxes, flips, local), loss)
    restored = pickle.loads(pickle.dumps(sere))
    assert "_compiled_loss" not in restored.__dict__


def _step(
    sere: SERELoss, crops: tuple[torch.Tensor, ...], dtype: torch.dtype
) -> dict[str, list[torch.Tensor]]:
    student, teacher, local, boxes, flips = crops
    sg = student.to(dtype).requires_grad_()
    sl = local.to(dtype).requires_grad_()
    loss, terms = sere(sg, teacher.to(dtype), boxes, flips, sl, return_terms=True)
    params = [p for p in sere.parameters() if p.requires_grad]
    grads = torch.autograd.grad(loss, [sg, sl, *params])
    buffers = [b.clone() for name, b in sere.named_buffers() if "running" in name]
    return {
        "value": [loss.detach(), terms["spatial"], terms["channel"]],
        "gradient": list(grads),
        "buffers": buffers,
    }


def test_compiled_sere_meets_the_accuracy_rule_over_two_steps() -> None:
    # Inductor on the CPU, at toy size: two steps with the teacher's EMA between them, so the
    # second call replays the graph with new parameter values (and must not compile again).
    torch.manual_seed(0)
    base = SERELoss(DIM, num_heads=HEADS)
    runs = {}
    for name, dtype, compiled in (
        ("oracle", torch.float64, False),
        ("reference", torch.float32, False),
        ("compiled", torch.float32, True),
    ):
        sere = copy.deepcopy(base).to(dtype)
        if compiled:
            sere.compile()
        steps = []
        for k in range(2):
            if k:
                sere.update_teacher(0.9)
                torch._dynamo.config.error_on_recompile = compiled
            try:
                crops = _crops(seed=10 + k, dtype=torch.float64)
                rounded = tuple(t.float().double() if t.is_floating_point() else t for t in crops)
                steps.append(_step(sere, rounded, dtype))
            finally:
                torch._dynamo.config.error_on_recompile = False
        runs[name] = steps
    for k in range(2):
        oracle, ref, got = (runs[n][k] for n in ("oracle", "reference", "compiled"))
        for what, expected in oracle.items():
            assert len(got[what]) == len(expected) > 0
            for i, (fast, slow, want) in enumerate(
                zip(got[what], ref[what], expected, strict=True)
            ):
                err_fast = float((fast.double() - want).abs().max())
                err_ref = float((slow.double() - want).abs().max())
                floor = max(torch.finfo(torch.float32).eps, 1e-6 * float(want.abs().max()))
                assert err_fast <= 2 * err_ref + floor, (
                    f"step {k}: {what} {i} error {err_fast:.3g} exceeds twice the float32 "
                    f"reference's {err_ref:.3g}"
                )


def test_set_value_checks_is_exported() -> None:
    assert sere_loss.set_value_checks is set_value_checks


def test_a_mistake_inside_the_compiled_graph_keeps_its_own_message() -> None:
    student, teacher, local, boxes, flips = _crops()
    sere = SERELoss(DIM * 2, num_heads=HEADS)  # built for 96 channels, given 48
    sere.compile(backend="aot_eager")
    with pytest.raises(ValueError, match="has 48 channels but the loss was built for 96"):
        sere(student, teacher, boxes, flips, local)


def test_a_compiler_failure_leaves_the_loss_eager_and_says_so() -> None:
    calls = []

    def broken(graph: torch.fx.GraphModule, inputs: object) -> None:
        calls.append(1)
        raise RuntimeError("the compiler broke")

    student, teacher, local, boxes, flips = _crops()
    torch.manual_seed(0)
    sere = SERELoss(DIM, num_heads=HEADS)
    eager = copy.deepcopy(sere)
    sere.compile(backend=broken)
    with pytest.warns(RuntimeWarning, match="compiling SERELoss failed .*the compiler broke"):
        loss = sere(student, teacher, boxes, flips, local)
    torch.testing.assert_close(loss, eager(student, teacher, boxes, flips, local), rtol=0, atol=0)
    # From then on it is eager: no second attempt, no second warning.
    torch.testing.assert_close(sere(student, teacher, boxes, flips, local), loss)
    assert calls == [1]
    assert sere._compile_options is None


def test_an_explicit_lattice_denser_than_the_tokens_stays_compiled() -> None:
    # Its warning used to be traced inside the graph, which broke it: the loss went eager
    # with a "compiling failed" warning.
    student, teacher, _, boxes, flips = _crops()
    boxes, flips = boxes[:, :2], flips[:, :2]  # the global views only
    torch.manual_seed(0)
    sere = SERELoss(DIM, num_heads=HEADS, global_lattice=9)  # 7 x 7 tokens
    eager = copy.deepcopy(sere)
    sere.compile(backend="aot_eager")
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        loss = sere(student, teacher, boxes, flips)
    assert sere._compile_options is not None  # still compiled
    with pytest.warns(UserWarning, match=r"global_lattice=\(9, 9\) is denser than"):
        expected = eager(student, teacher, boxes, flips)
    torch.testing.assert_close(loss, expected)


def test_the_recompile_limit_is_named_not_reported_as_a_compiler_bug() -> None:
    sere = ChannelSelfRelationLoss(DIM)
    sere.compile(backend="aot_eager")
    config = torch._dynamo.config
    name = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(config, name, 1)
        student, teacher, local, _, _ = _crops(batch=2)
        sere(student, teacher, local)
        student, teacher, local, _, _ = _crops(batch=3)  # a new shape: over the limit
        with pytest.warns(RuntimeWarning, match=r"met more shapes, dtypes or temperatures than "
                          r"torch's recompile limit \(1, "):  # fmt: skip
            sere(student, teacher, local)
    assert sere._compile_options is None


def test_compiled_under_autocast_matches_eager_under_autocast() -> None:
    # The graph is traced under bf16 autocast (the heads in bf16, the relations in float32):
    # AOTAutograd's graph gives eager's values and gradients, and the relations stay float32.
    student, teacher, local, boxes, flips = _crops()
    torch.manual_seed(0)
    sere = SERELoss(DIM, num_heads=HEADS)
    compiled = copy.deepcopy(sere)
    compiled.compile(backend="aot_eager")
    results = []
    for module in (sere, compiled):
        sg, sl = student.clone().requires_grad_(), local.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss, terms = module(sg, teacher, boxes, flips, sl, return_terms=True)
        loss.backward()
        assert loss.dtype == torch.float32
        results.append((loss.detach(), terms["channel"], sg.grad, sl.grad))
    for got, want in zip(results[1], results[0], strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
