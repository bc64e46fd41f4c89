"""Benchmark settings, their seeded inputs, and one forward+backward step per implementation.

A *case* is (setting, implementation, term). Every case of a setting sees the same tensors and
the same head weights: the inputs come from a generator with a fixed seed, the heads from the
library's modules built under a fixed seed, and the authors' route borrows those very modules.

Implementations:

- ``authors``: the route of the authors' code (``authors_route.py``), the baseline.
- ``library``: ``sere_loss`` with its default backend (``"auto"``).
- ``library:<backend>``: another backend, ``library:chunked`` (the memory-saving mode) or
  ``library:reference`` (the materialised relations under autograd).
- ``library@<n>``: the default backend on an ``n x n`` lattice between the global views instead
  of the setting's: the lattice sweeps compare densities of one setting, round by round.
"""

from __future__ import annotations

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
    "FULL",
    "LIBRARY",
    "QUICK",
    "SETTINGS",
    "Case",
    "Inputs",
    "Setting",
    "build_case",
    "compare_probes",
    "fingerprint",
    "make_inputs",
    "probe",
    "resolve_impl",
]

AUTHORS = "authors"
LIBRARY = "library"
CHUNKED = "library:chunked"
REFERENCE = "library:reference"
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
        global_lattice: lattice side between the two globals; ``None`` for the library's default,
            the global grid minus one (13 at 14 x 14 tokens).
        dim: channels ``C`` (ViT-S 384, ViT-B 768, ViT-L 1024).
        terms: which of ``spatial``, ``channel``, ``sere`` and ``spatial_core`` (the spatial term
            with identity heads) to time.
        impls: implementations compared; the last one is the baseline of the ratios.
        group: the table of the docs it belongs to (``targets``, ``sizes``, ``lattice``).
    """

    name: str
    description: str
    batch: int
    global_side: int
    num_local: int = 0
    local_side: int = 6
    global_lattice: int | None = None
    dim: int = 384
    terms: tuple[str, ...] = TERMS
    impls: tuple[str, ...] = (LIBRARY, CHUNKED, AUTHORS)
    group: str = "sizes"

    @property
    def heads(self) -> int:
        """Spatial heads ``M``: the library's default, one per 64 channels (6 for ViT-S)."""
        return self.dim // 64

    @property
    def lattice(self) -> int:
        """The lattice side between the two globals (the setting's, or the grid minus one)."""
        return self.global_side - 1 if self.global_lattice is None else self.global_lattice

    @property
    def local_lattice(self) -> int:
        """The lattice between a global and a local view: the local grid (6 at 96 px)."""
        return self.local_side

    @property
    def baseline(self) -> str:
        """The implementation the ratios are taken against."""
        return self.impls[-1]

    def relation_bytes(self) -> int:
        """Bytes of one float32 ``(2B, M, N, N)`` full relation of the global views."""
        n = self.global_side**2
        return 4 * 2 * self.batch * self.heads * n * n


def _s(name: str, description: str, batch: int, global_side: int, **kw: Any) -> Setting:
    return Setting(name, description, batch, global_side, **kw)


DINO = dict(num_local=4, local_side=6)  # 2 x 224 px + 4 x 96 px, patch 16
SWEEP = dict(terms=("spatial",), group="lattice")

SETTINGS: dict[str, Setting] = {
    s.name: s
    for s in (
        # The targets: DINO's crops at batch 32, ViT-S.
        _s(
            "dino_b32",
            "ViT-S, DINO crops 2x224 + 4x96 px, batch 32",
            32,
            14,
            **DINO,
            terms=(*TERMS, CORE),
            group="targets",
        ),
        _s("ibot_b32", "ViT-S, iBOT crops 2x224 + 10x96 px, batch 32", 32, 14, num_local=10),
        _s("dino_b128", "ViT-S, DINO crops, batch 128", 128, 14, **DINO, terms=("sere",)),
        # Widths: ViT-B and ViT-L on DINO's crops.
        _s(
            "vitb_dino_b32",
            "ViT-B (768 channels, 12 heads), DINO crops, batch 32",
            32,
            14,
            **DINO,
            dim=768,
            terms=("sere",),
        ),
        _s(
            "vitl_dino_b32",
            "ViT-L (1024 channels, 16 heads), DINO crops, batch 32",
            32,
            14,
            **DINO,
            dim=1024,
            terms=("sere",),
        ),
        # High resolution, against the authors' route.
        _s(
            "g448_l13_b8",
            "ViT-S, 2x448 px (28x28 tokens), lattice 13x13, batch 8",
            8,
            28,
            global_lattice=13,
            terms=("spatial", "sere", CORE),
        ),
        _s(
            "g448_b8",
            "ViT-S, 2x448 px (28x28 tokens), default lattice 27x27, batch 8",
            8,
            28,
            terms=("spatial", "sere"),
            # backend="auto" runs the chunked kernels at this lattice: one library column.
            impls=(LIBRARY, AUTHORS),
        ),
        _s(
            "g518_b4",
            "ViT-S/14, 2x518 px (37x37 tokens), default lattice 36x36, batch 4",
            4,
            37,
            terms=("spatial",),
            impls=(LIBRARY, REFERENCE, AUTHORS),
        ),
        # Lattice density at high resolution: cost against the 13 x 13 lattice, the library only.
        _s(
            "lattice448_b8",
            "ViT-S, 2x448 px (28x28 tokens), lattices 13, 20, 27, batch 8",
            8,
            28,
            impls=("library@20", "library@27", "library@13"),
            **SWEEP,
        ),
        _s(
            "lattice518_b4",
            "ViT-S/14, 2x518 px (37x37 tokens), lattices 13, 24, 36, batch 4",
            4,
            37,
            impls=("library@24", "library@36", "library@13"),
            **SWEEP,
        ),
        _s(
            "lattice518_vitl_b4",
            "ViT-L/14 (1024 channels, 16 heads), 2x518 px, lattices 13, 24, 36, batch 4",
            4,
            37,
            dim=1024,
            impls=("library@24", "library@36", "library@13"),
            **SWEEP,
        ),
        # The settings table of the docs: backbones with no row above, the library alone.
        _s(
            "vitl14_dino_b32",
            "ViT-L/14 (1024 channels, 16 heads), 2x224 + 4x98 px (16x16, 7x7 tokens), batch 32",
            32,
            16,
            num_local=4,
            local_side=7,
            dim=1024,
            terms=("sere",),
            impls=(CHUNKED, LIBRARY),
        ),
        _s(
            "resnet50_dino_b32",
            "ResNet-50 layer4 (2048 channels, 32 heads), 2x224 + 4x96 px (7x7, 3x3 maps), batch 32",
            32,
            7,
            num_local=4,
            local_side=3,
            dim=2048,
            terms=("sere",),
            impls=(CHUNKED, LIBRARY),
        ),
        _s(
            "lattice518_vitb_b4",
            "ViT-B/14 (768 channels, 12 heads), 2x518 px, lattices 13, 24, 36, batch 4",
            4,
            37,
            dim=768,
            impls=("library@24", "library@36", "library@13"),
            terms=("spatial", "sere"),
            group="lattice",
        ),
        # Smoke settings for --quick: every code path, tiny sizes.
        _s(
            "quick",
            "smoke: 2x7x7 + 2x3x3 tokens, C = 64, batch 4",
            4,
            7,
            num_local=2,
            local_side=3,
            dim=64,
            terms=(*TERMS, CORE),
        ),
        _s(
            "quick_sweep",
            "smoke: lattices 3 and 6 on 2x7x7 tokens, C = 64, batch 2",
            2,
            7,
            dim=64,
            impls=("library@6", "library@3"),
            **SWEEP,
        ),
    )
}
QUICK = ("quick", "quick_sweep")
FULL = tuple(name for name in SETTINGS if name not in QUICK)


class Unavailable(LookupError):
    """The library in this checkout lacks what an implementation id asks for."""


def resolve_impl(impl: str) -> tuple[str, str | None, int | None]:
    """Map an implementation id to ``(kind, backend, lattice)``.

    ``kind`` is ``authors`` or ``library``; ``backend`` ``None`` means the default; ``lattice``
    ``None`` means the setting's.
    """
    if impl == AUTHORS:
        return AUTHORS, None, None
    base, _, lattice = impl.partition("@")
    kind, _, backend = base.partition(":")
    if kind != LIBRARY:
        raise Unavailable(f"unknown implementation {impl!r}")
    return LIBRARY, backend or None, int(lattice) if lattice else None


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
    setting: Setting,
    backend: str | None,
    lattice: int | None = None,
    identity_heads: bool = False,
    official: bool = True,
) -> tuple[SpatialSelfRelationLoss, ChannelSelfRelationLoss, SERELoss]:
    """The library's losses under a fixed seed.

    ``official`` puts the spatial term on the authors' lattice and padding, so that it computes
    the authors' loss; the lattice sweeps use the library's defaults (cell centres, border).
    """
    torch.manual_seed(WEIGHT_SEED)
    options: dict[str, Any] = {"backend": "auto" if backend is None else backend}
    heads: dict[str, Any] = {}
    if identity_heads:
        heads = {"projection": nn.Identity(), "prediction": nn.Identity()}
    if official:
        options_spatial = {**options, "points": "official", "padding": "zeros"}
    else:
        options_spatial = dict(options)
    spatial = SpatialSelfRelationLoss(
        setting.dim,
        global_lattice=setting.lattice if lattice is None else lattice,
        local_lattice=setting.local_lattice,
        **options_spatial,
        **heads,
    )
    channel = ChannelSelfRelationLoss(setting.dim, **options)
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
        impl: ``authors``, ``library``, ``library:<backend>`` or ``library@<lattice>``.
        term: ``spatial``, ``channel``, ``sere`` or ``spatial_core``.
        device: where to run.

    Returns:
        The case; ``case.step()`` runs forward and backward.
    """
    kind, backend, lattice = resolve_impl(impl)
    inputs = make_inputs(setting, device)
    official = not any("@" in i for i in setting.impls)
    modules = library_modules(setting, backend, lattice, term == CORE, official)
    spatial, channel, sere = (m.to(device) for m in modules)
    sg, tg, sl = inputs.student_global, inputs.teacher_global, inputs.student_local
    module: nn.Module
    if kind == AUTHORS:
        grids = authors_grids(
            inputs.boxes, inputs.flips, setting.num_local, setting.lattice, setting.local_lattice
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
    return Case(setting, impl, term, call, inputs.leaves() + params)


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


def comparable(impls: list[str]) -> list[list[str]]:
    """Groups of implementations that compute the same loss (same lattice): guard each group."""
    groups: dict[int | None, list[str]] = {}
    for impl in impls:
        groups.setdefault(resolve_impl(impl)[2], []).append(impl)
    return [group for group in groups.values() if len(group) > 1]


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
