"""Where SERE's time goes inside the DINO step measure, by kind of work, against the matmul peak.

    python benchmarks/sere_profile.py --threads 1 --out benchmarks/results/sere-profile-cpu.json

It runs ``dino_step.py``'s "SERE alone" (SERE's forward and backward on the tokens of a DINO
ViT-S/16 step, batch 8, 2 x 224 + 4 x 96 px) under ``torch.profiler`` and sums the self time of
every ATen operation into kinds of work:

- ``heads: linear``: the prediction heads' matrix products (``mm``), forward and backward;
- ``heads: BatchNorm and ReLU``: their normalisation and ReLU, forward and backward;
- ``relations: batched products``: the Gram and channel relations and their backward products
  (``baddbmm``, ``bmm``, ``dot``);
- ``relations: softmax and elementwise``: everything else inside the fused relation kernels;
- ``sampling``: the bilinear gather of the lattice (``embedding_bag``, its sort and indexing);
- ``other``: the rest (views, small index arithmetic, gradient accumulation).

The matrix products' floating-point work is counted from the recorded shapes and divided by
their time; the same process times a plain ``mm`` of the heads' largest shape
(``(B * N, C) x (C, C)``) for the machine's rate. When the products run near that rate and the
rest is memory-bound elementwise work, an exact speed-up must cut passes over memory, which
eager PyTorch offers no way to fuse.

``profile_sere(batch=..., rounds=...)`` returns the record as a dict; the command line writes
it as JSON.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
import traceback
import warnings
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import dino_step
import record
import torch
from torch import Tensor
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

ROOT = Path(__file__).resolve().parent.parent
SYNC_WARNING = "called a synchronizing CUDA operation"  # PyTorch's sync debug mode, per wait

KINDS = (
    "heads: linear",
    "heads: BatchNorm and ReLU",
    "relations: batched products",
    "relations: softmax and elementwise",
    "sampling",
    "other",
)
_RELATION_FUNCTIONS = ("_PairedChannelCE", "_BlockedGramCE", "_TritonGramCE")
_PRODUCTS = ("aten::baddbmm", "aten::baddbmm_", "aten::bmm", "aten::dot")
_NORMS = (
    "aten::native_batch_norm",
    "aten::native_batch_norm_backward",
    "aten::threshold_backward",
    "aten::clamp_min_",
    "aten::relu_",
)
_SAMPLING = ("embedding_bag", "aten::sort")


def _kind(name: str, owner: str) -> str:
    """The kind of work of ATen op ``name``, called from autograd node or Function ``owner``."""
    if name == "aten::mm":
        return "heads: linear"
    if name in _NORMS:
        return "heads: BatchNorm and ReLU"
    if any(owner.startswith(f) for f in _RELATION_FUNCTIONS):
        return (
            "relations: batched products"
            if name in _PRODUCTS
            else "relations: softmax and elementwise"
        )
    if any(s in name or s in owner for s in _SAMPLING):
        return "sampling"
    return "other"


def _flops(name: str, shapes: list[list[int]]) -> float:
    """Multiply-adds x 2 of a matrix product from its recorded input shapes (0 if not one)."""
    try:
        if name == "aten::mm":
            (m, k), (_, n) = shapes[0], shapes[1]
            return 2.0 * m * k * n
        if name == "aten::bmm":
            (b, m, k), (_, _, n) = shapes[0], shapes[1]
            return 2.0 * b * m * k * n
        if name in ("aten::baddbmm", "aten::baddbmm_"):
            (b, m, k), (_, _, n) = shapes[1], shapes[2]
            return 2.0 * b * m * k * n
        if name == "aten::dot":
            return 2.0 * shapes[0][0]
    except (IndexError, ValueError):
        return 0.0
    return 0.0


def _median_ms(fn: Any, repeats: int = 20, sync: Callable[[], None] | None = None) -> float:
    """Median milliseconds of ``repeats`` calls of ``fn``, after 3 calls of warm-up.

    ``sync`` (``torch.cuda.synchronize`` on a GPU) runs before the clock starts and before it
    stops, so each time covers the device's work, not only its launch.
    """
    sync = sync or (lambda: None)
    for _ in range(3):
        fn()
    times = []
    for _ in range(repeats):
        sync()
        tic = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - tic)
    return 1e3 * statistics.median(times)


def _mm_rate(rows: int, dim: int) -> float:
    """GFLOP/s of a plain ``(rows, dim) x (dim, dim)`` product in this process (median)."""
    a, w = torch.randn(rows, dim), torch.randn(dim, dim)
    out = torch.empty(rows, dim)
    return 2.0 * rows * dim * dim / _median_ms(lambda: torch.mm(a, w, out=out)) / 1e6


def _batch_norm_relu(rows: int, dim: int) -> dict[str, float]:
    """Training BatchNorm + ReLU over ``(rows, dim)``: PyTorch's kernels against eager ops, in ms.

    The eager version is the fewest passes we found for the same maths. It computes the
    statistics with a sum and a dot per channel, the output with one ``addcmul`` and an in-place
    clamp, and the backward with two sums and two ``addcmul``; its gradient is checked against
    autograd's before anything is timed.
    """
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(rows, dim, generator=gen)
    weight = 1.0 + 0.1 * torch.randn(dim, generator=gen)
    bias = 0.1 * torch.randn(dim, generator=gen)
    dy = torch.randn(rows, dim, generator=gen)
    eps = 1e-5

    def native(backward: bool) -> tuple[Tensor, Tensor | None]:
        leaf = x.detach().requires_grad_(backward)
        y = torch.nn.functional.batch_norm(leaf, None, None, weight, bias, True, 0.1, eps)
        y = y.relu_()
        if not backward:
            return y, None
        (dx,) = torch.autograd.grad(y, leaf, dy)
        return y, dx

    def written_out(backward: bool) -> tuple[Tensor, Tensor | None]:
        mean = x.sum(0).div_(rows)
        var = torch.linalg.vecdot(x, x, dim=0).div_(rows).sub_(mean * mean)
        invstd = torch.rsqrt(var + eps)
        scale = weight * invstd
        y = torch.addcmul(bias - mean * scale, x, scale).clamp_min_(0)
        if not backward:
            return y, None
        g = dy * (y > 0)
        sum_g = g.sum(0)
        sum_gxhat = (torch.linalg.vecdot(g, x, dim=0) - mean * sum_g) * invstd
        k = -scale * invstd * sum_gxhat / rows
        dx = torch.addcmul(-scale * sum_g / rows - k * mean, x, k).addcmul_(g, scale)
        return y, dx

    _, want = native(True)
    _, got = written_out(True)
    assert want is not None
    assert got is not None
    torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-4)
    return {
        "native_forward_ms": _median_ms(lambda: native(False)),
        "written_out_forward_ms": _median_ms(lambda: written_out(False)),
        "native_step_ms": _median_ms(lambda: native(True)),
        "written_out_step_ms": _median_ms(lambda: written_out(True)),
    }


# Operations that only make a view or an uninitialised tensor: no kernel runs for them.
_NO_KERNEL = frozenset(
    ("view", "_unsafe_view", "as_strided", "slice", "select", "transpose", "t", "expand",
     "unsqueeze", "squeeze", "permute", "alias", "detach", "unbind", "split", "split_with_sizes",
     "narrow", "empty", "empty_strided", "empty_like", "new_empty", "new_empty_strided",
     "_reshape_alias", "lift_fresh", "unflatten", "flatten", "reshape")
)  # fmt: skip


class _DeviceOps(TorchDispatchMode):
    """Counts the operations that reach tensors on the meta device, by name."""

    def __init__(self) -> None:
        super().__init__()
        self.counts: dict[str, int] = defaultdict(int)

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        name = func.overloadpacket.__name__
        leaves = tree_leaves((args, kwargs or {}))
        on_meta = any(isinstance(x, Tensor) and x.device.type == "meta" for x in leaves)
        if on_meta and name not in _NO_KERNEL:
            self.counts[name] += 1
        return func(*args, **(kwargs or {}))


def count_device_ops(
    batch: int = 64,
    dim: int = 384,
    heads: int = 6,
    grids: tuple[int, int] = (14, 6),
    locals_: int = 4,
) -> dict[str, Any]:
    """How many operations SERE sends to the tokens' device per call, forward and backward.

    On a GPU each is at least one kernel launch, and SERE there is bound by launching them
    (the CUDA check's profile). Counted on the meta device, where an operation computes
    nothing, with the crop geometry on the CPU as the trainers pass it: a number that any
    machine reproduces exactly (for one torch version), and the one to cut.

    Args:
        batch: images per step.
        dim: token width (ViT-S: 384).
        heads: spatial heads (ViT-S: 6).
        grids: token grid side of the global and the local views (224 and 96 px at patch 16).
        locals_: local views (2 globals always).

    Returns:
        ``total`` and ``by_op`` (counts by operation name, largest first).
    """
    from sere_loss import SERELoss

    sere = SERELoss(dim, num_heads=heads).to("meta")
    g, n = grids
    student = torch.empty(2 * batch, g * g, dim, device="meta", requires_grad=True)
    teacher = torch.empty(2 * batch, g * g, dim, device="meta")
    local = torch.empty(locals_ * batch, n * n, dim, device="meta", requires_grad=True)
    gen = torch.Generator().manual_seed(0)
    lo = 0.3 * torch.rand(batch, 2 + locals_, 2, generator=gen)
    boxes = torch.cat([lo, lo + 0.6], dim=-1)
    flips = torch.rand(batch, 2 + locals_, generator=gen) < 0.5
    with _DeviceOps() as ops:
        sere(student, teacher, boxes, flips, local).backward()
    by_op = dict(sorted(ops.counts.items(), key=lambda kv: -kv[1]))
    return {
        "total": sum(by_op.values()),
        "by_op": by_op,
        "batch": batch,
        "torch": torch.__version__,
    }


def profile_sere(batch: int = 8, rounds: int = 10, preset: str = "vit_small") -> dict[str, Any]:
    """Profile "SERE alone" ``rounds`` times on the CPU and sum the time by kind of work.

    Returns:
        ``wall_ms`` (median per call, without the profiler), ``kinds`` (milliseconds per call
        and share of the profiled ATen self time), ``products`` (GFLOP per call, achieved
        GFLOP/s of ``mm`` and of the batched products) and ``mm_rate_gflops`` (the plain
        product's rate, the machine's reference).
    """
    device = torch.device("cpu")
    trainer = dino_step._load_trainer()
    sere_alone = dino_step.build_steps(trainer, preset, batch, device)["sere_alone"]
    wall_ms = _median_ms(sere_alone, repeats=rounds)
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        for _ in range(rounds):
            sere_alone()
    per_kind: dict[str, float] = defaultdict(float)
    flops: dict[str, float] = defaultdict(float)
    product_us: dict[str, float] = defaultdict(float)
    largest = (0.0, 0, 0)
    for event in prof.events():
        if not event.name.startswith("aten::"):
            continue
        owner = event.cpu_parent
        while owner is not None and owner.name.startswith("aten::"):
            owner = owner.cpu_parent
        kind = _kind(event.name, owner.name if owner is not None else "")
        per_kind[kind] += event.self_cpu_time_total
        shapes = [list(s) for s in event.input_shapes]
        work = _flops(event.name, shapes)
        if work:
            group = "mm" if event.name == "aten::mm" else "batched"
            flops[group] += work
            product_us[group] += event.self_cpu_time_total
            if event.name == "aten::mm" and work > largest[0]:
                largest = (work, shapes[0][0], shapes[0][1])
    # The profiler's own per-op totals: the kinds above must add up to them.
    total_us = sum(a.self_cpu_time_total for a in prof.key_averages() if a.key.startswith("aten::"))
    rows, dim = largest[1], largest[2]  # the heads' widest product: (B * N, C) x (C, C)
    rate = _mm_rate(rows, dim) if rows else math.nan
    return {
        "batch": batch,
        "preset": preset,
        "rounds": rounds,
        "wall_ms": wall_ms,
        "profiled_aten_ms": total_us / rounds / 1e3,
        "kinds": {
            kind: {
                "ms": per_kind[kind] / rounds / 1e3,
                "share": per_kind[kind] / total_us if total_us else math.nan,
            }
            for kind in KINDS
        },
        "products": {
            group: {
                "gflop": flops[group] / rounds / 1e9,
                "ms": product_us[group] / rounds / 1e3,
                "gflops": flops[group] / (product_us[group] * 1e-6) / 1e9
                if product_us[group]
                else math.nan,
            }
            for group in ("mm", "batched")
        },
        "mm_rate_gflops": rate,
        "mm_rate_shape": [rows, dim, dim],
        "batch_norm_relu": _batch_norm_relu(rows, dim) if rows else {},
    }


def _sync_sites(fn: Callable[[], None]) -> dict[str, int]:
    """Where ``fn`` makes the host wait for a CUDA device: ``{"file:line": count}``.

    PyTorch's sync debug mode warns at each synchronising operation; each warning is traced to
    the innermost frame of this project (``src/`` or ``examples/``). Empty on a CPU.
    """
    if not torch.cuda.is_available():
        return {}
    sites: dict[str, int] = defaultdict(int)
    ours = (str(ROOT / "src"), str(ROOT / "examples"))

    def hook(message: Any, *_args: Any, **_kwargs: Any) -> None:
        if SYNC_WARNING not in str(message):  # setting the mode warns too: not a wait
            return
        stack = traceback.extract_stack()
        frames = [f for f in stack if f.filename.startswith(ours)] or stack[-3:-2]
        name = frames[-1].filename
        if name.startswith(str(ROOT)):
            name = str(Path(name).relative_to(ROOT))
        sites[f"{name}:{frames[-1].lineno}"] += 1

    previous = torch.cuda.get_sync_debug_mode()
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = hook
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode(previous)
    torch.cuda.synchronize()
    return dict(sites)


def profile_sere_device(
    device: torch.device,
    batch: int = 64,
    rounds: int = 10,
    preset: str = "vit_small",
    backends: tuple[str, ...] = ("auto", "dense", "chunked", "triton"),
    compiled: bool = True,
    compile_options: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """SERE alone on a GPU: kernel time against wall time, launches, host waits, backends.

    On a GPU an eager loss is bound by one of three things: the kernels' own time, the host
    launching them (many small kernels), or the host waiting for the device (a value read
    back, such as an input check's ``bool(...)``). This profile tells them apart. The crop
    geometry is on the CPU, as the trainers pass it.

    Returns:
        ``wall_ms`` (median per call, synchronised), ``kernel_ms`` (the device's busy time per
        call), ``kernels`` (launches per call), ``sync_sites`` (where the host waits, with
        counts per call), ``geometry_on_device`` (``wall_ms`` and ``sync_sites`` with the boxes
        and flips on the device instead), ``top_device`` and ``top_host`` (the operations with
        the most device and host self time per call) and ``backends`` (wall ms per call for each
        ``SERELoss(backend=...)`` that runs here; an error message for one that does not); with
        ``compiled``, ``compiled`` holds ``wall_ms``, ``kernel_ms``, ``kernels``,
        ``sync_sites`` and ``first_call_s`` of SERE compiled (``SERELoss.compile()``).
    """
    trainer = dino_step._load_trainer()
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def timed(fn: Callable[[], None]) -> float:
        return _median_ms(fn, rounds, sync)

    on_device = dino_step.build_steps(trainer, preset, batch, device, geometry_device=device)
    geometry_on_device = {
        "wall_ms": timed(on_device["sere_alone"]),
        "sync_sites": _sync_sites(on_device["sere_alone"]),
    }
    del on_device
    sere_alone = dino_step.build_steps(trainer, preset, batch, device)["sere_alone"]
    wall_ms = timed(sere_alone)
    sites = _sync_sites(sere_alone)
    activities = [ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(ProfilerActivity.CUDA)

    def profiled(fn: Callable[[], None]) -> tuple[Any, list[Any]]:
        with profile(activities=activities) as prof:
            for _ in range(rounds):
                fn()
            sync()
        return prof, [e for e in prof.events() if e.device_type == DeviceType.CUDA]

    prof, kernels = profiled(sere_alone)
    averages = prof.key_averages()

    def top(key: str) -> list[dict[str, Any]]:
        rows = sorted(averages, key=lambda a: getattr(a, key), reverse=True)[:15]
        return [
            {"name": a.key[:80], "ms": getattr(a, key) / rounds / 1e3, "calls": a.count / rounds}
            for a in rows
            if getattr(a, key) > 0
        ]

    result: dict[str, Any] = {
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "batch": batch,
        "preset": preset,
        "rounds": rounds,
        "wall_ms": wall_ms,
        "kernel_ms": sum(e.device_time_total for e in kernels) / rounds / 1e3,
        "kernels": len(kernels) / rounds,
        "sync_sites": sites,
        "geometry_on_device": geometry_on_device,
        "top_device": top("self_device_time_total"),
        "top_host": top("self_cpu_time_total"),
        "backends": {},
    }
    del sere_alone
    if compiled:
        fast = dino_step.build_steps(
            trainer, preset, batch, device, compiled=True, compile_options=compile_options
        )
        fast_alone = fast["sere_alone_compiled"]
        sync()
        tic = time.perf_counter()
        fast_alone()  # compiles
        sync()
        first_call = time.perf_counter() - tic
        fast_wall = timed(fast_alone)
        fast_sites = _sync_sites(fast_alone)
        _, fast_kernels = profiled(fast_alone)
        result["compiled"] = {
            "wall_ms": fast_wall,
            "kernel_ms": sum(e.device_time_total for e in fast_kernels) / rounds / 1e3,
            "kernels": len(fast_kernels) / rounds,
            "sync_sites": fast_sites,
            "first_call_s": first_call,
        }
        del fast, fast_alone
    for backend in backends:
        try:
            steps = dino_step.build_steps(
                trainer, preset, batch, device, sere_options={"backend": backend}
            )
            result["backends"][backend] = timed(steps["sere_alone"])
        except Exception as error:  # a backend this machine cannot run (triton on a CPU)
            result["backends"][backend] = f"{type(error).__name__}: {error}"[:200]
    return result


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Command line: profile, print a table, write the record with ``--out``."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--preset", default="vit_small", help="the trainer's preset (vit_small, tiny)")
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    p.add_argument("--out", type=Path, help="write the record here as JSON")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    result = {
        **record.environment(torch.device("cpu")),
        "load_average": {"start": record.load()},
        **profile_sere(args.batch, args.rounds, args.preset),
        "device_ops": count_device_ops(),
    }
    result["load_average"]["end"] = record.load()
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(
        f"SERE alone: {result['wall_ms']:.1f} ms per call (profiled ATen self time "
        f"{result['profiled_aten_ms']:.1f} ms)"
    )
    ops = result["device_ops"]
    print(
        f"  operations on the tokens' device per call at batch {ops['batch']} (each a kernel "
        f"launch on a GPU, counted on the meta device): {ops['total']}"
    )
    for kind, row in result["kinds"].items():
        print(f"  {kind:<36} {row['ms']:7.1f} ms  {100 * row['share']:5.1f} %")
    for group, row in result["products"].items():
        print(
            f"  products {group:<8} {row['gflop']:6.2f} GFLOP in {row['ms']:6.1f} ms: "
            f"{row['gflops']:5.0f} GFLOP/s"
        )
    print(f"  plain mm {tuple(result['mm_rate_shape'])}: {result['mm_rate_gflops']:.0f} GFLOP/s")
    bn = result["batch_norm_relu"]
    if bn:
        print(
            f"  BatchNorm + ReLU {tuple(result['mm_rate_shape'][:2])}: forward native "
            f"{bn['native_forward_ms']:.2f} ms, written out {bn['written_out_forward_ms']:.2f} ms; "
            f"forward + backward native {bn['native_step_ms']:.2f} ms, written out "
            f"{bn['written_out_step_ms']:.2f} ms"
        )
    return result


if __name__ == "__main__":
    main()
