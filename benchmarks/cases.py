"""Benchmark settings, their seeded inputs, and one forward+backward step per implementation.

A *case* is (setting, implementation, term). Every case of a setting sees the same tensors and
the same head weights: the inputs come from a generator with a fixed seed, the heads from the
library's modules built under a fixed seed, and the authors' route borrows those very modules.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from authors_route import AuthorsChannel, AuthorsSERE, AuthorsSpatial, authors_grids
from torch import Tensor, nn

from sere_loss import ChannelSelfRelationLoss, SERELoss, SpatialSelfRelationLoss

__all__ = [
    "AUTHORS",
    "CORE",
    "LIBRARY",
    "SETTINGS",
    "Case",
    "Unavailable",
    "Inputs",
    "Setting",
    "backend_support",
    "build_case",
    "compare_probes",
    "fingerprint",
    "make_inputs",
    "probe",
]

AUTHORS = "authors"
LIBRARY = "library"
TERMS = ("spatial", "channel", "sere")
# The spatial term with identity heads: the route alone (relation, sampling, loss), without the
# BatchNorm and linear layers over every token that both routes share.
CORE = "spatial_core"
INPUT_SEED = 1234
WEIGHT_SEED = 0


@dataclass(frozen=True)
class Setting:
    """One benchmark configuration: ViT tokens of a multi-crop batch.

    Attributes:
        name: short id used on the command line and in the results.
        description: one line for the tables.
        batch: images per batch ``B``.
        global_side: token grid side of a global view (224 px / 16 = 14).
        num_local: local views ``L``.
        local_side: token grid side of a local view (96 px / 16 = 6).
        global_lattice: lattice side between the two globals (13; the side of ``S``).
        local_lattice: lattice side between a global and a local view (6).
        dim: channels ``C`` (ViT-S: 384).
        heads: relation heads ``M`` (6).
        terms: which of ``spatial``, ``channel``, ``sere`` and ``spatial_core`` (the spatial term
            with identity heads) to time.
        impls: implementations compared: ``authors``, ``library`` (default backend) or
            ``library:<backend>``.
        rounds: timed samples per case where one step takes so long that the default number of
            rounds would not fit the run's time (fewer repeats rather than fewer settings).
    """

    name: str
    description: str
    batch: int
    global_side: int
    num_local: int = 0
    local_side: int = 6
    global_lattice: int = 13
    local_lattice: int = 6
    dim: int = 384
    heads: int = 6
    terms: tuple[str, ...] = TERMS
    impls: tuple[str, ...] = (LIBRARY, AUTHORS)
    rounds: int | None = None

    def relation_bytes(self) -> int:
        """Bytes of one float32 ``(2B, M, N, N)`` full relation of the global views."""
        n = self.global_side**2
        return 4 * 2 * self.batch * self.heads * n * n


FUSED = "library:fused"  # resolved to the fused backend's name at run time
REFERENCE = "library:reference"

SETTINGS: dict[str, Setting] = {
    s.name: s
    for s in (
        Setting("dino_b32", "DINO: 2x224 + 4x96, batch 32", 32, 14, 4, terms=(*TERMS, CORE)),
        Setting("ibot_b32", "iBOT crops: 2x224 + 10x96, batch 32", 32, 14, 10),
        Setting("dino_b128", "DINO: 2x224 + 4x96, batch 128", 128, 14, 4),
        Setting("ibot_b128", "iBOT crops: 2x224 + 10x96, batch 128", 128, 14, 10, rounds=2),
        Setting(
            "g448_b32",
            "2x448 globals (28x28 tokens, S = 13x13), batch 32",
            32,
            28,
            terms=(*TERMS, CORE),
        ),
        Setting(
            "full518_b16",
            "full-token spatial relation: 2x518 px, patch 14 (N = S = 1369), batch 16",
            16,
            37,
            global_lattice=37,
            terms=("spatial",),
            impls=(FUSED, REFERENCE, AUTHORS),
            rounds=2,
        ),
        # Smoke settings for --quick: every code path, tiny sizes.
        Setting(
            "quick",
            "smoke: 2x7x7 + 2x3x3 tokens, C = 48, batch 4",
            4,
            7,
            2,
            3,
            5,
            3,
            48,
            terms=(*TERMS, CORE),
        ),
        Setting(
            "quick_full",
            "smoke: full-token spatial relation, 2x9x9 tokens, C = 48, batch 2",
            2,
            9,
            global_lattice=9,
            dim=48,
            terms=("spatial",),
            impls=(FUSED, REFERENCE, AUTHORS),
        ),
    )
}
QUICK = ("quick", "quick_full")
FULL = tuple(name for name in SETTINGS if name not in QUICK)


def backend_support(device: torch.device | None = None) -> tuple[bool, str | None]:
    """Whether the library's spatial loss takes ``backend=``, and its fused backend's name.

    The fused backend is ``"triton"`` on CUDA when Triton is there, else ``"chunked"`` (or,
    failing that, ``"auto"``), whichever the constructor accepts first.
    """
    if "backend" not in inspect.signature(SpatialSelfRelationLoss).parameters:
        return False, None
    names = ["chunked", "auto"]
    if device is not None and device.type == "cuda":
        try:
            from sere_loss._fused import triton_available

            if triton_available():
                names.insert(0, "triton")
        except ImportError:
            pass
    for name in names:
        try:
            SpatialSelfRelationLoss(12, 3, backend=name)  # type: ignore[call-arg]
        except (ValueError, TypeError, RuntimeError):
            continue
        return True, name
    return True, None


class Unavailable(LookupError):
    """The library in this checkout lacks what an implementation id asks for."""


def resolve_impl(impl: str, device: torch.device | None = None) -> tuple[str, str | None]:
    """Map an implementation id to ``(label, backend)``; the backend ``None`` = the default.

    Raises:
        Unavailable: the library has no ``backend=`` option (or no fused backend) yet.
    """
    if not impl.startswith(LIBRARY + ":"):
        return impl, None
    has_backend, fused = backend_support(device)
    wanted = impl.split(":", 1)[1]
    if not has_backend:
        raise Unavailable("SpatialSelfRelationLoss has no backend= option in this checkout")
    if wanted == "fused":
        if fused is None:
            raise Unavailable("no fused backend is accepted")
        wanted = fused
    return f"{LIBRARY}:{wanted}", wanted


@dataclass
class Inputs:
    """Tokens and crop geometry of one setting (student tokens require grad)."""

    student_global: Tensor
    teacher_global: Tensor
    student_local: Tensor | None
    boxes: Tensor
    flips: Tensor

    def leaves(self) -> list[Tensor]:
        """The student tensors that get gradients."""
        return [t for t in (self.student_global, self.student_local) if t is not None]


def _overlapping_boxes(gen: torch.Generator, batch: int, num_local: int) -> Tensor:
    """Boxes ``(B, 2 + L, 4)`` that all hold a central region, so every pair overlaps.

    Globals span a large part of the image (as scale 0.35 to 1 does), locals a small one.
    """
    views = 2 + num_local
    lo = torch.empty(batch, views, 2)
    hi = torch.empty(batch, views, 2)
    lo[:, :2] = 0.35 * torch.rand(batch, 2, 2, generator=gen)
    hi[:, :2] = 0.65 + 0.35 * torch.rand(batch, 2, 2, generator=gen)
    lo[:, 2:] = 0.25 + 0.2 * torch.rand(batch, num_local, 2, generator=gen)
    hi[:, 2:] = 0.55 + 0.2 * torch.rand(batch, num_local, 2, generator=gen)
    return torch.cat([lo, hi], dim=-1)


def make_inputs(setting: Setting, device: torch.device) -> Inputs:
    """The seeded inputs of a setting: random tokens, overlapping boxes, random flips."""
    gen = torch.Generator().manual_seed(INPUT_SEED)
    b, c = setting.batch, setting.dim
    n = setting.global_side**2
    student = torch.randn(2 * b, n, c, generator=gen)
    teacher = torch.randn(2 * b, n, c, generator=gen)
    local = None
    if setting.num_local:
        local = torch.randn(setting.num_local * b, setting.local_side**2, c, generator=gen)
    boxes = _overlapping_boxes(gen, b, setting.num_local)
    flips = torch.rand(b, 2 + setting.num_local, generator=gen) < 0.5

    def leaf(t: Tensor) -> Tensor:
        return t.to(device).requires_grad_(True)

    return Inputs(
        leaf(student),
        teacher.to(device),
        None if local is None else leaf(local),
        boxes.to(device),
        flips.to(device),
    )


def library_modules(
    setting: Setting, backend: str | None, identity_heads: bool = False
) -> tuple[SpatialSelfRelationLoss, ChannelSelfRelationLoss, SERELoss]:
    """The library's losses under a fixed seed, in the authors' lattice and padding."""
    torch.manual_seed(WEIGHT_SEED)
    extra: dict[str, object] = {} if backend is None else {"backend": backend}
    if identity_heads:
        extra.update(projection=nn.Identity(), prediction=nn.Identity())
    spatial = SpatialSelfRelationLoss(
        setting.dim,
        setting.heads,
        global_lattice=setting.global_lattice,
        local_lattice=setting.local_lattice,
        points="official",
        padding="zeros",
        **extra,  # type: ignore[arg-type]
    )
    channel = ChannelSelfRelationLoss(setting.dim, backend="auto" if backend is None else backend)
    return spatial, channel, SERELoss(setting.dim, spatial=spatial, channel=channel)


@dataclass
class Case:
    """One (setting, implementation, term): a loss closure and what gets gradients."""

    setting: Setting
    impl: str
    term: str
    loss: Callable[[], Tensor]
    grad_leaves: list[Tensor] = field(default_factory=list)

    def step(self) -> Tensor:
        """Forward and backward once, gradients cleared first (no accumulation); the loss."""
        for t in self.grad_leaves:
            t.grad = None
        loss = self.loss()
        loss.backward()
        return loss.detach()


def build_case(setting: Setting, impl: str, term: str, device: torch.device) -> Case:
    """Build the loss closure of one case on ``device``.

    Args:
        setting: the configuration.
        impl: ``authors``, ``library`` or ``library:<backend>`` (``library:fused`` for the fused
            backend, whatever its name).
        term: ``spatial``, ``channel``, ``sere`` or ``spatial_core``.
        device: where to run.

    Returns:
        The case; ``case.step()`` runs forward and backward.
    """
    label, backend = resolve_impl(impl, device)
    inputs = make_inputs(setting, device)
    modules = library_modules(setting, backend, identity_heads=term == CORE)
    spatial, channel, sere = (m.to(device) for m in modules)
    sg, tg, sl = inputs.student_global, inputs.teacher_global, inputs.student_local
    module: nn.Module
    if label == AUTHORS:
        grids = authors_grids(
            inputs.boxes,
            inputs.flips,
            setting.num_local,
            setting.global_lattice,
            setting.local_lattice,
        )
        if term in ("spatial", CORE):
            module = AuthorsSpatial(spatial)
            call: Callable[[], Tensor] = lambda: module(sg, tg, grids, sl)  # noqa: E731
        elif term == "channel":
            module = AuthorsChannel(channel)
            call = lambda: module(sg, tg, sl)  # noqa: E731
        else:
            module = AuthorsSERE(spatial, channel)
            call = lambda: module(sg, tg, grids, sl)  # noqa: E731
    else:
        boxes, flips = inputs.boxes, inputs.flips
        if term in ("spatial", CORE):
            module = spatial
            call = lambda: module(sg, tg, boxes, flips, sl)  # noqa: E731
        elif term == "channel":
            module = channel
            call = lambda: module(sg, tg, sl)  # noqa: E731
        else:
            module = sere
            call = lambda: module(sg, tg, boxes, flips, sl)  # noqa: E731
    params = [p for p in module.parameters() if p.requires_grad]
    return Case(setting, label, term, call, inputs.leaves() + params)


PROBE_POINTS = 64


def fingerprint(case: Case, loss: Tensor) -> dict[str, Any]:
    """The loss and a fingerprint of every gradient left by ``case.step()``; clears them.

    The fingerprint of a gradient is its norm and its values at ``PROBE_POINTS`` fixed positions
    spread over it: cheap to send between processes, and enough to tell two implementations
    apart.
    """
    grads = []
    for t in case.grad_leaves:
        g = torch.zeros_like(t) if t.grad is None else t.grad.detach()
        flat = g.flatten()
        count = min(PROBE_POINTS, flat.numel())
        idx = torch.arange(count, dtype=torch.int64) * (flat.numel() - 1) // max(count - 1, 1)
        points = flat[idx.to(flat.device)].double()
        norm = torch.linalg.vector_norm(flat, dtype=torch.float64)
        grads.append({"norm": float(norm), "points": points.tolist()})
        t.grad = None
    return {"loss": float(loss), "grads": grads}


def probe(case: Case) -> dict[str, Any]:
    """One forward+backward of ``case``, then :func:`fingerprint`."""
    return fingerprint(case, case.step())


def compare_probes(name: str, probes: dict[str, dict[str, Any]], rtol: float = 1e-4) -> None:
    """Require every implementation's probe to match the first one's.

    The loss must agree to ``rtol`` relative; each gradient's norm, and its values at the probe
    points (as a vector, in relative norm), to ``10 * rtol``.

    Raises:
        AssertionError: an implementation computes something else.
    """
    (first, ref), *others = probes.items()
    for impl, got in others:
        where = f"{name}: {impl} vs {first}"
        if not math.isclose(got["loss"], ref["loss"], rel_tol=rtol, abs_tol=1e-6):
            raise AssertionError(f"{where}: loss {got['loss']!r} vs {ref['loss']!r}")
        if len(got["grads"]) != len(ref["grads"]):
            raise AssertionError(f"{where}: other gradient leaves")
        for k, (g, r) in enumerate(zip(got["grads"], ref["grads"], strict=True)):
            norm_g, norm_r = g["norm"], r["norm"]
            if not math.isclose(norm_g, norm_r, rel_tol=10 * rtol, abs_tol=1e-9):
                raise AssertionError(f"{where}: gradient {k} norm {norm_g!r} vs {norm_r!r}")
            pairs = zip(g["points"], r["points"], strict=True)
            diff = math.sqrt(sum((a - b) ** 2 for a, b in pairs))
            scale = math.sqrt(sum(b**2 for b in r["points"]))
            if diff > 10 * rtol * max(scale, 1e-9) + 1e-9:
                raise AssertionError(
                    f"{where}: gradient {k} differs at the probe points by {diff:.3e} "
                    f"(their norm {scale:.3e})"
                )
