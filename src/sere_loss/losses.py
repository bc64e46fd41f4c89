"""SERE losses as modules: views, heads and pairing around the kernels of ``functional``.

The maths of each term is in ``sere_loss.functional``; these modules own the heads, split the
multi-crop batch into (teacher view, student view) pairs (``functional.view_pairs``) and call
the kernels.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Literal, overload

import torch
from torch import Tensor, nn
from torch.utils._pytree import tree_leaves, tree_map

from ._checks import (
    check_boxes,
    check_choice,
    check_flips,
    check_int,
    check_ndim,
    check_positive,
    check_positive_int,
    check_unit_interval,
)
from ._fused import BACKENDS
from ._views import Views, join_views, patch_tokens, to_maps, to_tokens
from .functional import (
    _check_lattice,
    _gather_taps,
    _index,
    _moved,
    _overlap_grids_unchecked,
    paired_channel_relation_cross_entropy,
    sample_region,
    spatial_relation_cross_entropy,
    view_pairs,
)
from .heads import ProjectionHead, RelationHeads, _TokenBatchNorm

__all__ = [
    "RECIPES",
    "ChannelSelfRelationLoss",
    "SERELoss",
    "SpatialSelfRelationLoss",
    "update_teacher",
]


def _zero_touch(params: Iterable[nn.Parameter], like: Tensor) -> Tensor:
    """A zero connected to ``params``, so each of them gets a (zero) gradient.

    DistributedDataParallel without ``find_unused_parameters`` waits for a gradient of every
    trainable parameter; heads that a step did not use (local heads with no local views) must
    still get one.
    """
    zero = like.new_zeros(())
    for p in params:
        zero = zero + p.sum() * 0.0
    return zero


def _geometry(boxes: object, flips: object) -> tuple[Tensor, Tensor]:
    """Boxes ``(B, V, 4)`` and flips ``(B, V)`` checked, the flips as bool.

    Values are checked where they are (``set_value_checks``): on the host when they come on the
    CPU, as a loader gives them. The geometry is then computed where they are, and only its
    results reach the tokens' device, in copies that do not wait for it. A compiled loss
    (``compile()``) moves them to the tokens' device first, and computes the geometry inside its
    graph: no value ever returns to the host.
    """
    boxes_t = check_ndim(boxes, 3, "boxes", "(B, V, 4)")
    if boxes_t.shape[2] != 4:
        raise ValueError(
            f"boxes must have shape (B, V, 4) as (x0, y0, x1, y1) per view, got "
            f"{tuple(boxes_t.shape)}"
        )
    check_boxes(boxes_t.reshape(-1, 4), "boxes (flattened to (B * V, 4))")
    flips_t = check_ndim(flips, 2, "flips", "(B, V)")
    if tuple(flips_t.shape) != tuple(boxes_t.shape[:2]):
        raise ValueError(
            f"flips must have shape (B, V) = {tuple(boxes_t.shape[:2])} like boxes, got "
            f"{tuple(flips_t.shape)}"
        )
    flips_t = check_flips(flips_t.reshape(-1), flips_t.numel(), "flips").view(flips_t.shape)
    return boxes_t, flips_t.to(boxes_t.device)


def _first_tensor(views: object) -> Tensor | None:
    if isinstance(views, Tensor):
        return views
    if isinstance(views, Sequence) and views and isinstance(views[0], Tensor):
        return views[0]
    return None


def _check_roles(student_global: object, teacher_global: object) -> None:
    """Refuse a teacher that carries a gradient beside a student that does not.

    The teacher's tokens are detached inside the loss; were the two swapped, the loss would
    still come back, but no gradient would reach the student's backbone, without a word.
    """
    student, teacher = _first_tensor(student_global), _first_tensor(teacher_global)
    if student is None or teacher is None:
        return  # their own checks name the argument
    if teacher.requires_grad and not student.requires_grad:
        raise ValueError(
            "teacher_global requires grad but student_global does not: the two look swapped. "
            "The student's tokens come first (the backbone being trained, whose gradient SERE "
            "gives), the teacher's second (the EMA copy, run under torch.no_grad())"
        )


def _check_geometry(boxes: Tensor, views: int, batch: int) -> None:
    """Boxes ``(B, V, 4)`` (checked by ``_geometry``) must describe ``views`` views of ``batch``."""
    if boxes.shape[1] != views:
        raise ValueError(
            f"boxes must have shape (B, V, 4) with V={views} views (globals first, then locals), "
            f"got {tuple(boxes.shape)}"
        )
    if boxes.shape[0] != batch:
        raise ValueError(
            f"boxes describe a batch of {boxes.shape[0]} images, the views a batch of {batch}"
        )


def _sample_pairs(
    teacher: Tensor,
    teacher_hw: tuple[int, int],
    student: Tensor,
    student_hw: tuple[int, int],
    first: int,
    pairs: list[tuple[int, int]],
    boxes: Tensor,
    flips: Tensor,
    lattice: tuple[int, int],
    points: str,
    padding: str,
    gather: bool = True,
) -> tuple[Tensor, Tensor, Tensor]:
    """Both sides' features of a group of pairs at their lattices: one gather per side.

    Every pair ``(i, v)`` of the group reads teacher view ``i`` and student view ``v`` (numbered
    from ``first`` in ``student``) at the ``Hs x Ws`` lattice over their overlap: what
    ``sample_region`` gives pair by pair, read straight from the
    token rows (``sample_tokens``) in the pairs' order, with no call,
    layout change or full-size gradient buffer per pair.

    Args:
        teacher: ``(G * B, N, C)`` teacher features of the global views, on grid ``teacher_hw``.
        teacher_hw: ``(H, W)`` of the teacher's tokens.
        student: ``(V_k * B, n, C)`` student features of the group's views.
        student_hw: ``(h, w)`` of the student's tokens.
        first: index of ``student``'s first view among all views.
        pairs: the group's ``(i, v)`` pairs.
        boxes: ``(B, V, 4)`` crop boxes of all views (checked).
        flips: ``(B, V)`` flips of all views.
        lattice: ``(Hs, Ws)``.
        points: ``"center"`` or ``"official"``.
        padding: ``"border"`` or ``"zeros"``.
        gather: read token rows (the fast path); ``False`` reads each pair's maps with
            ``sample_region`` (``grid_sample``), the reference, which
            autograd differentiates twice (``embedding_bag`` has no second derivative).

    Returns:
        ``(teacher, student, valid)``: features ``(P * B, Hs * Ws, C)`` twice and ``(P * B,)``,
        pair-major in the order of ``pairs``.
    """
    batch, num_views = boxes.shape[0], boxes.shape[1]
    device = boxes.device
    t_idx, s_idx = [i for i, _ in pairs], [v for _, v in pairs]

    # The group's geometry stacked pair-major, (P * B, ...): one indexed read per side, of
    # index lists made once per shape.
    def pick(values: Tensor, views: list[int]) -> Tensor:
        rows = _index(tuple(b * num_views + v for v in views for b in range(batch)), device)
        return values.flatten(0, 1).index_select(0, rows)

    grid_t, grid_s, valid = _overlap_grids_unchecked(
        pick(boxes, t_idx), pick(flips, t_idx), pick(boxes, s_idx), pick(flips, s_idx),
        lattice, points,
    )  # fmt: skip
    # Made where the boxes are (the host, as a loader gives them), the grids reach the tokens'
    # device in one copy each that does not wait.
    grid_t, grid_s = _moved(grid_t, teacher.device), _moved(grid_s, student.device)
    valid = _moved(valid, teacher.device)
    if not gather:
        t_maps = torch.split(to_maps(teacher, teacher_hw), batch)
        s_maps = torch.split(to_maps(student, student_hw), batch)
        t_grids, s_grids = torch.split(grid_t, batch), torch.split(grid_s, batch)
        t_feats = torch.cat(
            [sample_region(t_maps[i], g, padding) for i, g in zip(t_idx, t_grids, strict=True)]
        )
        s_feats = torch.cat(
            [
                sample_region(s_maps[v - first], g, padding)
                for v, g in zip(s_idx, s_grids, strict=True)
            ]
        )
        return t_feats, s_feats, valid

    # Pair p, image b reads the teacher map i_p * B + b and the student map (v_p - first) * B + b:
    # their first token rows, made once per shape.
    def starts(views: list[int], offset: int, hw: tuple[int, int]) -> Tensor:
        n = hw[0] * hw[1]
        rows = tuple(((v - offset) * batch + b) * n for v in views for b in range(batch))
        return _index(rows, teacher.device)

    with torch.no_grad():
        t_feats = _gather_taps(
            teacher.flatten(0, 1), starts(t_idx, 0, teacher_hw), teacher_hw, grid_t, padding
        )
    s_feats = _gather_taps(
        student.flatten(0, 1), starts(s_idx, first, student_hw), student_hw, grid_s, padding
    )
    return t_feats, s_feats, valid


# One spatial head per this many channels by default: the head width of every standard ViT.
HEAD_WIDTH = 64


def _heads(dim: int, num_heads: object) -> int:
    """``num_heads`` checked, or ``dim // 64`` for ``None`` (a clear error if not whole)."""
    if num_heads is not None:
        return check_positive_int(num_heads, "num_heads")
    if dim % HEAD_WIDTH:
        raise ValueError(
            f"num_heads=None takes one head per {HEAD_WIDTH} channels (dim // {HEAD_WIDTH}, the "
            f"head count of ViT-S, B and L), but dim={dim} is not a multiple of {HEAD_WIDTH}: "
            f"pass num_heads, for instance the backbone's own head count; it must divide "
            f"{dim}: one of {_divisors(dim)}"
        )
    return dim // HEAD_WIDTH


def _divisors(n: int) -> list[int]:
    return [k for k in range(1, n + 1) if n % k == 0]


_AUTOCAST_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _autocast_on(device: torch.device) -> bool:
    """Whether autocast is enabled for ``device``'s type (``False`` where it has none)."""
    try:
        return bool(torch.is_autocast_enabled(device.type))
    except RuntimeError:  # a device type that autocast does not know
        return False


def _input_width(module: nn.Module) -> int | None:
    """The channel count the first layer of ``module`` takes, where the layer says it."""
    while isinstance(module, nn.Sequential) and len(module) > 0:
        module = module[0]
    if isinstance(module, _TokenBatchNorm):
        module = module.bn
    if isinstance(module, nn.Linear):
        return module.in_features
    if isinstance(module, (nn.BatchNorm1d, nn.SyncBatchNorm)):
        return module.num_features
    if isinstance(module, nn.LayerNorm) and len(module.normalized_shape) == 1:
        return module.normalized_shape[0]
    return None


def _dense_tokens(x: Tensor) -> Tensor:
    """Tokens ``(B, N, C)`` in one block of memory: the heads then flatten them without a copy."""
    return x if x.ndim != 3 or x.is_contiguous() else x.contiguous()


def _names(names: Sequence[str]) -> str:
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]


def _check_views(
    heads: RelationHeads, views: Sequence[tuple[str, Tensor, tuple[int, int] | None]]
) -> None:
    """Check what a term's views share before its heads run, and name the arguments.

    ``views`` holds ``(argument, patch tokens (B, N, C), token grid or None)`` for
    ``student_global``, ``teacher_global`` and, if given, ``student_local``, in this order.

    - dtypes: under autocast any of float16, bfloat16 and float32 is fine (the heads run under
      it, the relations in float32). Outside it, the views must share one dtype, the heads'.
    - channels: the width the heads take, where the first layer says it (default heads: dim).
    - grids: the student's global views must have the teacher's grid; local views fewer tokens
      than global ones (equal or more means global and local views are mixed up).
    """
    param = next((p for p in heads.parameters() if p.is_floating_point()), None)
    heads_dtype = None if param is None else param.dtype
    dtypes = {t.dtype for _, t, _ in views} | ({heads_dtype} if heads_dtype else set())
    autocast = _autocast_on(views[0][1].device)
    if not (autocast and dtypes <= set(_AUTOCAST_DTYPES)):
        # Outside autocast, or a dtype that autocast leaves alone (float64).
        where = (
            "autocast casts only float16, bfloat16 and float32"
            if autocast
            else "outside torch.autocast"
        )
        first, first_tokens, _ = views[0]
        for name, tokens, _ in views[1:]:
            if tokens.dtype != first_tokens.dtype:
                raise TypeError(
                    f"{first} is {first_tokens.dtype} but {name} is {tokens.dtype} ({where}): "
                    "run the forwards that made them, and this loss, under one torch.autocast, "
                    "or cast them to one dtype (e.g. .float())"
                )
        dtype = first_tokens.dtype
        if heads_dtype is not None and dtype != heads_dtype:
            names = _names([name for name, _, _ in views])
            how = (
                f"cast them to {heads_dtype}"
                if autocast
                else "compute this loss under torch.autocast, as the forward that made them, or "
                f"cast them to {heads_dtype}"
            )
            raise TypeError(
                f"{names} are {dtype} but the SERE heads' parameters are {heads_dtype} "
                f"({where}): {how} (or the loss module to {dtype} with .to())"
            )
    width = _input_width(heads.projection)
    if width is None and isinstance(heads.projection, nn.Identity):
        width = _input_width(heads.prediction)
    if width is not None:
        default = isinstance(heads.projection, ProjectionHead)
        source = f"dim={width}" if default else "the first layer of its heads"
        for name, tokens, _ in views:
            channels = tokens.shape[-1]
            if channels != width:
                fix = (
                    f"build it with dim={channels}"
                    if default
                    else f"give it heads that take {channels}"
                )
                hint = (
                    f"; or, if these are feature maps, give them channels first (B, C, H, W): "
                    f"channels last (B, H, W, {width}) read as {channels} channels, "
                    f"x.permute(0, 3, 1, 2) turns them"
                    if tokens.shape[1] % width == 0
                    else ""
                )
                raise ValueError(
                    f"{name} has {channels} channels but the loss was built for {width} "
                    f"({source}): {fix}, the backbone's width{hint}"
                )

    def layout(tokens: Tensor, hw: tuple[int, int] | None) -> str:
        n = tokens.shape[1]
        return f"{n} patch tokens" if hw is None else f"a token grid {hw} ({n} tokens)"

    (s_name, s_tokens, s_hw), (t_name, t_tokens, t_hw) = views[0], views[1]
    if s_tokens.shape[1] != t_tokens.shape[1] or s_hw != t_hw:
        raise ValueError(
            f"{s_name} has {layout(s_tokens, s_hw)} but {t_name} has {layout(t_tokens, t_hw)}: "
            "both must be the same global views, at one resolution (the student's local views go "
            "in student_local)"
        )
    if len(views) > 2:
        l_name, l_tokens, l_hw = views[2]
        if l_tokens.shape[1] >= t_tokens.shape[1]:
            what = "as many as" if l_tokens.shape[1] == t_tokens.shape[1] else "more than"
            raise ValueError(
                f"{l_name} has {layout(l_tokens, l_hw)}, {what} the global views "
                f"({layout(t_tokens, t_hw)}): local views are the smaller crops (96 px against "
                "224 px in DINO), so global and local views look swapped or mixed up; global "
                "views go in student_global and teacher_global, local ones in student_local"
            )


def _temps(
    teacher_temp: float | None, student_temp: float | None, default: tuple[float, float]
) -> tuple[float, float]:
    tt = default[0] if teacher_temp is None else check_positive(teacher_temp, "teacher_temp")
    ts = default[1] if student_temp is None else check_positive(student_temp, "student_temp")
    return tt, ts


# Where the paper's text and the authors' code differ inside the spatial term. "authors" (the
# default) is the code that produced the paper's numbers; "paper" is the text, with the library's
# choices where the text is silent (border padding). The documentation's page "The paper and the
# authors' code" gives each setting's measured effect.
RECIPES: dict[str, dict[str, str]] = {
    "authors": {"points": "official", "padding": "zeros", "empty_pairs": "uniform"},
    "paper": {"points": "center", "padding": "border", "empty_pairs": "mask"},
}


def _recipe(recipe: object, points: object, padding: object, empty_pairs: object) -> dict[str, str]:
    """The recipe's settings, each overridden by an explicit argument; checked."""
    chosen = dict(RECIPES[check_choice(recipe, "recipe", tuple(RECIPES))])
    for name, value, choices in (
        ("points", points, ("center", "official")),
        ("padding", padding, ("border", "zeros")),
        ("empty_pairs", empty_pairs, ("mask", "uniform")),
    ):
        if value is not None:
            chosen[name] = check_choice(value, name, choices)
    return chosen


# torch.compile modes that replay the compiled kernels as CUDA graphs.
_GRAPH_MODES = ("reduce-overhead", "max-autotune")


class _Compilable(nn.Module):
    """``compile()`` for the SERE losses: their computation as one graph, the boxes' copy outside.

    A loss's ``forward`` checks its arguments, moves the crop geometry to the tokens' device and
    calls ``_loss``, the computation; ``compile()`` makes that call a ``torch.compile`` of
    ``_loss``. The state dict, the module tree and the maths stay those of the eager module.
    """

    _compile_options: dict[str, Any] | None = None

    def compile(
        self, *, mode: str | None = None, dynamic: bool | None = False, **options: Any
    ) -> None:
        """Compile this loss's forward and backward into one graph, from its next call on.

        One line, after the loss is built (and moved, wrapped or converted to SyncBatchNorm as
        your trainer does): ``sere.compile()``. The computation (heads, crop geometry, sampling
        and both relation cross-entropies, forward and backward) becomes one ``torch.compile``
        graph (``fullgraph=True``: it never breaks into pieces), and on CUDA it is replayed as
        a CUDA graph (``mode="reduce-overhead"``), so that SERE costs its arithmetic, not the
        launch of hundreds of small kernels. The boxes' copy to the device and their value
        checks stay outside the graph (``set_value_checks``).

        The maths is the eager module's, within the rounding of a fused kernel (the tests hold
        values, gradients and BatchNorm buffers to the rule of the fused paths). What compiling
        costs:

        - the first call compiles (tens of seconds on a GPU, minutes on a small CPU);
        - every new shape compiles again (``dynamic=False``: shapes are specialised, which
          keeps the graph whole): keep the batch size fixed (``drop_last=True`` in the
          ``DataLoader``) and the crop sizes fixed; a run with a different last batch, or an
          evaluation at another size, compiles once more for each;
        - a new autocast state (on or off, another dtype) compiles again, and so does a new
          value of a term's per-call ``teacher_temp=`` or ``student_temp=`` (a constant of the
          graph): pass schedules as the module's attributes only if they change rarely;
        - after torch's recompile limit (``torch._dynamo.config.recompile_limit``, 8 graphs)
          the loss runs eager from there on, and says so;
        - a warning that depends on shapes only (an explicit lattice denser than the token
          grid) is not given inside the graph: call the loss once before ``compile()`` to see
          it;
        - under ``mode="reduce-overhead"`` the graph's outputs live in memory that the next
          replay reuses; this module returns copies of them, so a loss or a logged term kept
          from an earlier step stays valid.

        On the CPU compiling is for tests: eager is as fast there.

        Args:
            mode: ``torch.compile``'s mode; ``None`` (default) for ``"reduce-overhead"`` (CUDA
                graphs) on CUDA and the compiler's default elsewhere, chosen at the first call.
                ``"default"`` compiles without CUDA graphs.
            dynamic: ``torch.compile``'s ``dynamic`` (``False``: one graph per shape).
            **options: passed on to ``torch.compile`` (``backend``, ``options``).

        Examples:
            >>> sere = SERELoss(dim=384)
            >>> sere.compile()  # compiles at the first call
        """
        self._compile_options = {"fullgraph": True, "dynamic": dynamic, "mode": mode, **options}
        self.__dict__.pop("_compiled_loss", None)

    def _computed(self, fn: Callable[..., Any], *args: Any) -> Any:
        """``fn(*args)``, compiled when ``compile()`` asked for it."""
        options = self._compile_options
        if options is None or torch.compiler.is_compiling():
            return fn(*args)
        compiled = self.__dict__.get("_compiled_loss")
        device = next((a.device for a in tree_leaves(args) if isinstance(a, Tensor)), None)
        on_cuda = device is not None and device.type == "cuda"
        # Every input on the tokens' device (the boxes, given on the CPU): the graph then
        # holds no copy from the host, and a CUDA graph can replay it with new values.
        if device is not None:
            args = tree_map(lambda t: _moved(t, device) if isinstance(t, Tensor) else t, args)
        if compiled is None:
            if options["mode"] is None:
                options = {**options, "mode": "reduce-overhead" if on_cuda else None}
            compiled = torch.compile(fn, **options)
            self.__dict__["_compiled_loss"] = compiled
            self.__dict__["_compiled_mode"] = options["mode"]
        try:
            out = compiled(*args)
        except Exception as error:
            # Inside the graph an error of the caller's (a wrong shape, say) comes out as the
            # compiler's; eager raises it with its own message. Where eager runs, the compiler
            # itself failed: the loss stays eager, and says so.
            out = fn(*args)
            self._compile_options = None
            self.__dict__.pop("_compiled_loss", None)
            lines = [line.strip() for line in str(error).splitlines() if line.strip()]
            said = " ".join(lines[:2])[:300]
            if "recompile" in type(error).__name__.lower() or "recompile_limit" in str(error):
                config = torch._dynamo.config
                limit = getattr(config, "recompile_limit", getattr(config, "cache_size_limit", "?"))
                warnings.warn(
                    f"compiled {type(self).__name__} met more shapes, dtypes or temperatures "
                    f"than torch's recompile limit ({limit}, "
                    "torch._dynamo.config.recompile_limit); it runs eager from here on, with "
                    "the same maths and its usual cost. Keep the batch and crop sizes fixed "
                    "(drop_last=True) and the temperatures constant; call compile() again to "
                    "start over",
                    RuntimeWarning,
                    stacklevel=3,
                )
            else:
                warnings.warn(
                    f"compiling {type(self).__name__} failed ({type(error).__name__}: {said});"
                    " it runs eager from here on, with the same maths and its usual cost. "
                    "Report the error with your torch version; call compile() again to retry",
                    RuntimeWarning,
                    stacklevel=3,
                )
            return out
        if on_cuda and self.__dict__.get("_compiled_mode") in _GRAPH_MODES:
            # CUDA graphs reuse their output memory at the next replay: hand back copies.
            out = tree_map(lambda t: t.clone() if isinstance(t, Tensor) else t, out)
        return out

    def __getstate__(self) -> dict[str, Any]:
        # A copy (deepcopy, pickling) compiles its own graph: the compiled function is bound to
        # this module.
        state = dict(self.__dict__)
        state.pop("_compiled_loss", None)
        state.pop("_compiled_mode", None)
        return state


class SpatialSelfRelationLoss(_Compilable):
    r"""Spatial self-relation loss ``L_p`` over a multi-crop batch (paper Eq. 2-3).

    Both branches project every token of a view (``h``: BatchNorm + ReLU), the student then
    predicts (``g``: linear, BatchNorm, ReLU). For each (teacher global ``i``, student view ``v``)
    pair the two views' features are sampled at the same ``Hs x Ws`` points of their overlap in
    the original image (the lattice, below), turned into ``M``-head relation logits, and compared
    by row-wise cross-entropy, teacher sharpened by ``teacher_temp``.

    Recipe: the default, ``recipe="authors"``, is the authors' code, which produced the paper's
    numbers: the lattice spaced edge to edge over the overlap (``points="official"``), points on
    a view's border blended with zeros (``padding="zeros"``), and a pair whose crops do not
    overlap counted as the constant ``log(Hs * Ws)`` in the mean (``empty_pairs="uniform"``: in
    their code such a pair reads zeros at every point, so both relations are uniform).
    ``recipe="paper"`` is the paper's text: a point at the centre of each cell
    (``points="center"``), border padding (``padding="border"``, where the text is silent), and
    non-overlapping pairs left out of the mean (``empty_pairs="mask"``, footnote 1). The two
    move the spatial gradient's direction (cosine 0.47 on ViT-S/16 tokens at initialisation;
    the documentation's page "The paper and the authors' code" has the measurements). An
    explicit ``points``, ``padding`` or ``empty_pairs`` overrides the recipe's. Either way the
    mean stays connected to every head parameter when nothing overlaps (a zero gradient).

    Lattices: by default each one follows the token grid it reads. Between two global views of
    grid ``(H, W)`` it is ``(H - 1, W - 1)``; between a global and a local view of grid
    ``(h, w)`` it is ``(h, w)``. These are the authors' values, 13 x 13 and 6 x 6 for ViT-S/16 at
    224 and 96 px (14 x 14 and 6 x 6 tokens), stated for any grid. The lattice reads features by
    bilinear interpolation, so one denser than the tokens it reads only blends the same tokens
    again: it adds cost (``S^2`` relations) and no information. An explicit lattice denser than
    its token grid therefore warns. ``points="official"`` spaces points edge to edge and needs
    at least 2 per side: a global grid of 3 x 3 or more, a local grid of 2 x 2 or more, or an
    explicit lattice.

    Temperatures: the defaults (teacher 0.5, student 1.0) are the authors' code, which produced
    the paper's numbers; the paper's text states them the other way round.

    Inputs are checked before the heads run, and a mistake names the argument: channels other
    than ``dim``; student and teacher global views of different grids; local views with as many
    tokens as the global ones or more (views swapped); dtypes. Under ``torch.autocast`` the
    views may be float16, bfloat16 or float32, mixed; outside it they must share one dtype, the
    heads' (float16 tokens with float32 heads mean a forward under autocast and a loss outside).

    Args:
        dim: channel count ``C`` of the backbone's tokens.
        num_heads: ``M``, the heads of the relation; ``None`` (default) for one head per 64
            channels, ``dim // 64``: 6, 12 and 16 for ViT-S, B and L, the backbone's own head
            count for every standard ViT, which is what the authors use. A ``dim`` that is not a
            multiple of 64 needs ``num_heads`` given, a divisor of the heads' output width.
        teacher_temp: ``t_t`` (0.5).
        student_temp: ``t_s`` (1.0).
        global_lattice: ``(Hs, Ws)`` or an int, the lattice between two global views; ``None``
            (default) for the global token grid minus one per side (13 at 14 x 14 tokens).
        local_lattice: the lattice between a global and a local view; ``None`` (default) for
            the local token grid (6 at 6 x 6 tokens).
        recipe: ``"authors"`` (default) or ``"paper"``, the settings below as a set.
        points: ``"official"`` (the authors', edge to edge) or ``"center"`` (the paper's);
            ``None`` for the recipe's.
        padding: ``"zeros"`` (the authors') or ``"border"``; ``None`` for the recipe's.
        num_global_views: ``G``, the views the teacher sees (2).
        num_prefix_tokens: leading tokens to drop from ViT tokens (1 for a CLS token, more with
            registers); ignored for CNN maps.
        projection: the student's projection ``h``; ``None`` for the default, ``nn.Identity()``
            for none. The teacher's is a frozen copy that follows by EMA (``update_teacher``).
        prediction: the student's prediction ``g``; ``None`` for the default, which takes ``dim``
            channels: with a projection of another width, pass a prediction that takes it.
        local_heads: separate heads for local views (the authors' default).
        symmetric: no prediction head (paper Table 15).
        empty_pairs: ``"uniform"`` counts each non-overlapping (image, pair) term as
            ``log(Hs * Ws)``, as the authors' code does (the spatial gradient then scales by
            ``n_valid / (P * B)``); ``"mask"`` leaves them out of the mean; ``None`` for the
            recipe's.
        backend: how the relation cross-entropy runs, ``"auto"`` (default), ``"reference"``,
            ``"dense"``, ``"chunked"`` or ``"triton"``: see ``spatial_relation_cross_entropy``.
            All give the same loss up to rounding; the chunked and Triton ones keep memory
            linear in the lattice size.

    Shape:
        - student_global, teacher_global: ``(G * B, T, C)`` tokens, ``(G * B, C, H, W)`` maps, or
          a list of ``G`` tensors of batch ``B``.
        - student_local: ``(L * B, ...)`` or a list of ``L``; optional.
        - boxes: ``(B, G + L, 4)`` crop boxes, normalised ``(x0, y0, x1, y1)`` in the original
          image, in the order of the views (globals, then locals). On any device: on the CPU,
          as a loader gives them, the loss never waits for a GPU holding the tokens; on the
          GPU their checks read one small tensor back.
        - flips: ``(B, G + L)`` bool, horizontal flip of each view, on the boxes' device.
        - Output: scalar.

    Examples:
        ViT-S/16 maps (384 channels, 6 heads) of 2 global views of 224 px (14 x 14 tokens) and
        4 local views of 96 px (6 x 6), a batch of 2 images:

        >>> spatial = SpatialSelfRelationLoss(384)  # 13 x 13 and 6 x 6 lattices from the grids
        >>> student = torch.randn(2 * 2, 384, 14, 14)
        >>> local = torch.randn(4 * 2, 384, 6, 6)
        >>> boxes = torch.tensor([[0.0, 0.0, 0.8, 0.9], [0.2, 0.1, 1.0, 1.0]]
        ...                      + [[0.3, 0.3, 0.6, 0.6]] * 4).expand(2, 6, 4)
        >>> flips = torch.zeros(2, 6, dtype=torch.bool)
        >>> loss = spatial(student, torch.randn(2 * 2, 384, 14, 14), boxes, flips, local)
        >>> spatial.num_heads, loss.shape
        (6, torch.Size([]))
    """

    def __init__(
        self,
        dim: int,
        num_heads: int | None = None,
        *,
        teacher_temp: float = 0.5,
        student_temp: float = 1.0,
        global_lattice: int | tuple[int, int] | None = None,
        local_lattice: int | tuple[int, int] | None = None,
        recipe: str = "authors",
        points: str | None = None,
        padding: str | None = None,
        num_global_views: int = 2,
        num_prefix_tokens: int = 0,
        projection: nn.Module | None = None,
        prediction: nn.Module | None = None,
        local_heads: bool = True,
        symmetric: bool = False,
        empty_pairs: str | None = None,
        backend: str = "auto",
    ) -> None:
        super().__init__()
        dim = check_positive_int(dim, "dim")
        self.num_heads = _heads(dim, num_heads)
        settings = _recipe(recipe, points, padding, empty_pairs)
        self.recipe = recipe
        self.empty_pairs = settings["empty_pairs"]
        if projection is None and prediction is None and dim % self.num_heads:
            raise ValueError(
                f"dim must divide by num_heads, got dim={dim} and num_heads={num_heads}; "
                f"divisors of {dim}: {_divisors(dim)}"
            )
        self.teacher_temp = check_positive(teacher_temp, "teacher_temp")
        self.student_temp = check_positive(student_temp, "student_temp")
        self.points = settings["points"]
        self.padding = settings["padding"]
        self.global_lattice: tuple[int, int] | None = None
        self.local_lattice: tuple[int, int] | None = None
        if global_lattice is not None:
            self.global_lattice = _check_lattice(global_lattice, self.points, "global_lattice")[0]
        if local_lattice is not None:
            self.local_lattice = _check_lattice(local_lattice, self.points, "local_lattice")[0]
        self._warned: set[tuple[str, tuple[int, int], tuple[int, int]]] = set()
        self.num_global_views = check_positive_int(num_global_views, "num_global_views")
        self.num_prefix_tokens = check_int(num_prefix_tokens, "num_prefix_tokens", 0)
        self.heads = RelationHeads(
            dim, projection, prediction, local_heads=local_heads, symmetric=symmetric
        )
        self.backend = check_choice(backend, "backend", BACKENDS)

    def forward(
        self,
        student_global: Views,
        teacher_global: Views,
        boxes: Tensor,
        flips: Tensor,
        student_local: Views | None = None,
        *,
        global_grid: int | tuple[int, int] | None = None,
        local_grid: int | tuple[int, int] | None = None,
        teacher_temp: float | None = None,
        student_temp: float | None = None,
    ) -> Tensor:
        """Compute ``L_p``.

        Args:
            student_global: the student backbone's output for the ``G`` global views: tokens
                ``(G * B, T, C)``, maps ``(G * B, C, H, W)`` or a list of ``G`` (``Views``).
            teacher_global: the teacher backbone's output for the same global views.
            boxes: ``(B, V, 4)`` crop boxes of all views, globals first.
            flips: ``(B, V)`` flip flags of all views.
            student_local: the student's output for the local views, if any.
            global_grid: ``(H, W)`` token grid of global views when it is not square.
            local_grid: ``(H, W)`` token grid of local views when it is not square.
            teacher_temp: overrides the stored teacher temperature for this call (schedules).
            student_temp: overrides the stored student temperature for this call.

        Returns:
            The loss, a float32 scalar.
        """
        tt, ts = _temps(teacher_temp, student_temp, (self.teacher_temp, self.student_temp))
        _check_roles(student_global, teacher_global)
        boxes, flips = _geometry(boxes, flips)
        args = (student_global, teacher_global, boxes, flips, student_local)
        out: Tensor = self._computed(self._loss, *args, global_grid, local_grid, tt, ts)
        return out

    def _loss(
        self,
        student_global: Views,
        teacher_global: Views,
        boxes: Tensor,
        flips: Tensor,
        student_local: Views | None,
        global_grid: int | tuple[int, int] | None,
        local_grid: int | tuple[int, int] | None,
        tt: float,
        ts: float,
    ) -> Tensor:
        """``L_p`` from checked geometry on the tokens' device: what ``compile()`` compiles."""
        g = self.num_global_views
        teacher, _, batch = join_views(teacher_global, g, None, "teacher_global")
        student, _, _ = join_views(student_global, g, batch, "student_global")
        local, num_local = None, 0
        if student_local is not None:
            local, num_local, _ = join_views(student_local, None, batch, "student_local")
        _check_geometry(boxes, g + num_local, batch)
        pairs = view_pairs(g, num_local)
        if not pairs:
            raise ValueError(
                "the spatial term needs at least two views: got one global view and no local"
            )

        t_tokens, t_hw = to_tokens(teacher, self.num_prefix_tokens, global_grid, "teacher_global")
        s_tokens, s_hw = to_tokens(student, self.num_prefix_tokens, global_grid, "student_global")
        inputs = [("student_global", s_tokens, s_hw), ("teacher_global", t_tokens, t_hw)]
        if local is not None:
            l_tokens, l_hw = to_tokens(local, self.num_prefix_tokens, local_grid, "student_local")
            inputs.append(("student_local", l_tokens, l_hw))
        _check_views(self.heads, inputs)
        global_lattice = self._lattice("global_lattice", self.global_lattice, t_hw, 1)
        local_lattice = global_lattice  # unused without local views
        if local is not None:
            local_lattice = self._lattice("local_lattice", self.local_lattice, l_hw, 0)
        t_feats_all = self.heads.teacher(t_tokens)
        views = [(self.heads.student(s_tokens), s_hw)]
        if local is not None:
            views.append((self.heads.student(l_tokens, local=True), l_hw))

        total = t_feats_all.new_zeros((), dtype=torch.float32)
        count = t_feats_all.new_zeros((), dtype=torch.float32)
        groups = (
            ([p for p in pairs if p[1] < g], global_lattice, 0),
            ([p for p in pairs if p[1] >= g], local_lattice, g),
        )
        for group, lattice, first in groups:
            if not group:
                continue
            feats, hw = views[0 if first == 0 else 1]
            t_feats, s_feats, mask = _sample_pairs(
                t_feats_all,
                t_hw,
                feats,
                hw,
                first,
                group,
                boxes,
                flips,
                lattice,
                self.points,
                self.padding,
                gather=self.backend != "reference",
            )
            total = total + spatial_relation_cross_entropy(
                s_feats,
                t_feats,
                self.num_heads,
                ts,
                tt,
                mask,
                reduction="sum",
                backend=self.backend,
            )
            count = count + mask.sum()
            if self.empty_pairs == "uniform":  # the authors' constant log(S) per empty term
                empty = mask.numel() - mask.sum()
                total = total + empty * math.log(lattice[0] * lattice[1])
                count = count + empty
        loss = total / count.clamp(min=1.0)
        return loss + _zero_touch(self.heads.student_parameters_unused(local is not None), loss)

    def _lattice(
        self,
        name: str,
        explicit: tuple[int, int] | None,
        grid: tuple[int, int],
        minus: int,
    ) -> tuple[int, int]:
        """The lattice ``name`` for views of token ``grid``: ``explicit``, or ``grid - minus``.

        An explicit lattice denser than the grid warns once per (option, lattice, grid); a
        derived one too small for ``points`` raises.
        """
        kind = "global" if minus else "local"
        if explicit is None:
            hw = (grid[0] - minus, grid[1] - minus)
            least = 2 if self.points == "official" else 1
            if min(hw) < least:
                derived = f"the grid minus one, {hw}" if minus else f"the grid, {hw}"
                raise ValueError(
                    f"{name}=None derives the lattice from the {kind} token grid {grid}: "
                    f"{derived}, but points={self.points!r} needs at least {least} point(s) per "
                    f"side; use larger {kind} views or pass {name} explicitly"
                )
            return hw
        denser = explicit[0] > grid[0] or explicit[1] > grid[1]
        key = (name, explicit, grid)
        # Not inside a compiled graph, where a warning cannot be traced (compile() says so).
        if denser and key not in self._warned and not torch.compiler.is_compiling():
            self._warned.add(key)
            warnings.warn(
                f"{name}={explicit} is denser than the {kind} token grid {grid} it reads: the "
                "lattice reads the features by bilinear interpolation, so points beyond the "
                f"tokens add cost and no information; {name}=None derives it from the grid",
                UserWarning,
                stacklevel=2,
            )
        return explicit

    @torch.no_grad()
    def update_teacher(self, momentum: float) -> None:
        """EMA step of the teacher's projection; call it beside the backbone's EMA step.

        Args:
            momentum: the teacher momentum ``m`` of this iteration, in [0, 1]:
                ``teacher = m * teacher + (1 - m) * student``.
        """
        self.heads.update_teacher(momentum)

    def extra_repr(self) -> str:
        """Settings shown by ``print(module)``."""
        return (
            f"num_heads={self.num_heads}, teacher_temp={self.teacher_temp}, "
            f"student_temp={self.student_temp}, global_lattice={self.global_lattice}, "
            f"local_lattice={self.local_lattice}, recipe={self.recipe!r}, points={self.points!r}, "
            f"padding={self.padding!r}, num_global_views={self.num_global_views}, "
            f"num_prefix_tokens={self.num_prefix_tokens}, empty_pairs={self.empty_pairs!r}, "
            f"backend={self.backend!r}"
        )


class ChannelSelfRelationLoss(_Compilable):
    r"""Channel self-relation loss ``L_c`` over a multi-crop batch (paper Eq. 4-5).

    Each view's tokens are projected (and, on the student, predicted) as in the spatial term,
    then turned into ``C x C`` logits ``c^T c / N`` over the whole view (no sampling, no heads),
    so views of different resolutions compare directly. Pairs as in ``functional.view_pairs``;
    the result is the mean over every (image, pair) term.

    The paper (Sec. 4.3) finds that ``L_c`` without an image-level loss ``L_I`` can collapse
    (every channel encoding the same feature): add it to a DINO, iBOT or MoCo v3 objective.
    Inputs are checked as in ``SpatialSelfRelationLoss``, by token counts.

    Temperatures: teacher 0.1 and student 1.0 are the authors' code (the paper's text swaps
    them).

    Args:
        dim: channel count ``C``.
        teacher_temp: ``t_t`` (0.1).
        student_temp: ``t_s`` (1.0).
        num_global_views: ``G`` (2).
        num_prefix_tokens: leading tokens to drop (1 for a CLS token).
        projection: the student's projection; ``None`` for the default.
        prediction: the student's prediction; ``None`` for the default.
        local_heads: separate heads for local views.
        symmetric: no prediction head.
        backend: ``"auto"`` (default), ``"reference"``, ``"dense"``, ``"chunked"`` or ``"triton"``:
            see ``channel_relation_cross_entropy``.

    Shape:
        - student_global, teacher_global: ``(G * B, T, C)``, ``(G * B, C, H, W)`` or a list of
          ``G`` tensors.
        - student_local: ``(L * B, ...)`` or a list of ``L``; optional.
        - Output: scalar.

    Examples:
        ViT-S/16 tokens (384 channels) of 2 global views of 14 x 14 and 4 local views of 6 x 6,
        a batch of 2 images; the channel term takes no boxes:

        >>> channel = ChannelSelfRelationLoss(384)
        >>> student = torch.randn(2 * 2, 14 * 14, 384)
        >>> local = torch.randn(4 * 2, 6 * 6, 384)
        >>> channel(student, torch.randn(2 * 2, 14 * 14, 384), local).shape
        torch.Size([])
    """

    def __init__(
        self,
        dim: int,
        *,
        teacher_temp: float = 0.1,
        student_temp: float = 1.0,
        num_global_views: int = 2,
        num_prefix_tokens: int = 0,
        projection: nn.Module | None = None,
        prediction: nn.Module | None = None,
        local_heads: bool = True,
        symmetric: bool = False,
        backend: str = "auto",
    ) -> None:
        super().__init__()
        dim = check_positive_int(dim, "dim")
        self.teacher_temp = check_positive(teacher_temp, "teacher_temp")
        self.student_temp = check_positive(student_temp, "student_temp")
        self.num_global_views = check_positive_int(num_global_views, "num_global_views")
        self.num_prefix_tokens = check_int(num_prefix_tokens, "num_prefix_tokens", 0)
        self.heads = RelationHeads(
            dim, projection, prediction, local_heads=local_heads, symmetric=symmetric
        )
        self.backend = check_choice(backend, "backend", BACKENDS)

    def forward(
        self,
        student_global: Views,
        teacher_global: Views,
        student_local: Views | None = None,
        *,
        teacher_temp: float | None = None,
        student_temp: float | None = None,
    ) -> Tensor:
        """Compute ``L_c``.

        Args:
            student_global: the student backbone's output for the ``G`` global views: tokens
                ``(G * B, T, C)``, maps ``(G * B, C, H, W)`` or a list of ``G`` (``Views``).
            teacher_global: the teacher backbone's output for the same global views.
            student_local: the student's output for the local views, if any.
            teacher_temp: overrides the stored teacher temperature for this call.
            student_temp: overrides the stored student temperature for this call.

        Returns:
            The loss, a float32 scalar.
        """
        tt, ts = _temps(teacher_temp, student_temp, (self.teacher_temp, self.student_temp))
        _check_roles(student_global, teacher_global)
        out: Tensor = self._computed(
            self._loss, student_global, teacher_global, student_local, tt, ts
        )
        return out

    def _loss(
        self,
        student_global: Views,
        teacher_global: Views,
        student_local: Views | None,
        tt: float,
        ts: float,
    ) -> Tensor:
        """``L_c``: what ``compile()`` compiles."""
        g = self.num_global_views
        teacher, _, batch = join_views(teacher_global, g, None, "teacher_global")
        student, _, _ = join_views(student_global, g, batch, "student_global")
        num_local = 0
        prefix = self.num_prefix_tokens
        t_tokens = patch_tokens(teacher, prefix, "teacher_global")
        s_tokens = patch_tokens(student, prefix, "student_global")
        inputs: list[tuple[str, Tensor, tuple[int, int] | None]] = [
            ("student_global", s_tokens, None),
            ("teacher_global", t_tokens, None),
        ]
        if student_local is not None:
            local, num_local, _ = join_views(student_local, None, batch, "student_local")
            l_tokens = patch_tokens(local, prefix, "student_local")
            inputs.append(("student_local", l_tokens, None))
        _check_views(self.heads, inputs)
        t_feats = self.heads.teacher(t_tokens)
        s_feats = [self.heads.student(s_tokens)]
        if student_local is not None:
            s_feats.append(self.heads.student(l_tokens, local=True))
        pairs = view_pairs(g, num_local)
        if not pairs:
            raise ValueError(
                "the channel term needs at least two views: got one global view and no local"
            )
        # Every view's C x C relation once, every pair from it: one call for all pairs.
        students = [v for feats in s_feats for v in feats.view(-1, batch, *feats.shape[1:])]
        teachers = list(t_feats.view(g, batch, *t_feats.shape[1:]))
        per_pair = paired_channel_relation_cross_entropy(
            students, teachers, pairs, ts, tt, backend=self.backend
        )
        loss = per_pair.sum() / (len(pairs) * batch)
        return loss + _zero_touch(self.heads.student_parameters_unused(num_local > 0), loss)

    @torch.no_grad()
    def update_teacher(self, momentum: float) -> None:
        """EMA step of the teacher's projection; call it beside the backbone's EMA step.

        Args:
            momentum: the teacher momentum ``m`` of this iteration, in [0, 1]:
                ``teacher = m * teacher + (1 - m) * student``.
        """
        self.heads.update_teacher(momentum)

    def extra_repr(self) -> str:
        """Settings shown by ``print(module)``."""
        return (
            f"teacher_temp={self.teacher_temp}, student_temp={self.student_temp}, "
            f"num_global_views={self.num_global_views}, num_prefix_tokens={self.num_prefix_tokens}"
            f", backend={self.backend!r}"
        )


class SERELoss(_Compilable):
    r"""Both SERE terms for a multi-crop batch: ``alpha * L_p + beta * L_c`` (paper Eq. 6).

    Add it to the method's own loss ``L_I``: ``loss = dino_loss + sere(...)``. The paper's
    weights: DINO ``alpha = beta = 1``; iBOT ``alpha = 0.2, beta = 0.5`` (the authors' iBOT code
    also scales ``L_I`` by ``(4 - alpha - beta) / 2``, which is the trainer's business). A term
    with weight 0 is not built, so it owns no idle parameters.

    Args:
        dim: channel count ``C`` of the backbone's tokens.
        alpha: weight of the spatial term (1.0).
        beta: weight of the channel term (1.0).
        num_heads: heads of the spatial relation; ``None`` (default) for ``dim // 64`` (6 for
            ViT-S), see ``SpatialSelfRelationLoss``.
        num_global_views: ``G`` (2).
        num_prefix_tokens: leading tokens to drop (1 for a CLS token).
        local_heads: separate heads for local views.
        symmetric: no prediction heads.
        recipe: ``"authors"`` (default: the authors' code, which produced the paper's numbers)
            or ``"paper"`` (the paper's text), see ``SpatialSelfRelationLoss``.
        points: lattice points of the spatial term, ``"official"`` or ``"center"``; ``None``
            for the recipe's.
        padding: ``"zeros"`` or ``"border"``; ``None`` for the recipe's.
        global_lattice: spatial lattice between global views; ``None`` (default) for the global
            token grid minus one per side, 13 x 13 at 224 px for ViT-S/16 (see
            ``SpatialSelfRelationLoss`` for why).
        local_lattice: spatial lattice between a global and a local view; ``None`` (default)
            for the local token grid, 6 x 6 at 96 px.
        empty_pairs: ``"uniform"`` (the authors') or ``"mask"``; ``None`` for the recipe's,
            see ``SpatialSelfRelationLoss``.
        spatial: a configured ``SpatialSelfRelationLoss`` to use instead (the options above
            then do not apply to it).
        channel: a configured ``ChannelSelfRelationLoss`` to use instead.
        backend: how both terms run their relation cross-entropy, ``"auto"`` (default),
            ``"reference"``, ``"dense"``, ``"chunked"`` or ``"triton"`` (not applied to
            ``spatial`` or ``channel`` given ready-made).

    Shape:
        - student_global, teacher_global: ``(G * B, T, C)`` ViT tokens, ``(G * B, C, H, W)``
          maps, or a list of ``G`` tensors of batch ``B`` (``Views``).
        - student_local: ``(L * B, ...)`` or a list of ``L`` tensors; optional.
        - boxes: ``(B, G + L, 4)``; flips: ``(B, G + L)``.
        - Output: a scalar, or ``(loss, terms)`` with ``return_terms=True``.

    Examples:
        A ViT-S/16 with DINO's crops: 384 channels, 6 heads, 2 global views of 14 x 14 tokens
        (224 px) and 4 local views of 6 x 6 (96 px), a batch of 2 images.

        >>> student = torch.randn(2 * 2, 1 + 14 * 14, 384, requires_grad=True)  # CLS + tokens
        >>> teacher = torch.randn(2 * 2, 1 + 14 * 14, 384)
        >>> local = torch.randn(4 * 2, 1 + 6 * 6, 384, requires_grad=True)
        >>> sere = SERELoss(dim=384, num_prefix_tokens=1)  # authors' recipe; drops the CLS
        >>> boxes = torch.tensor([[0.0, 0.0, 0.8, 0.9], [0.2, 0.1, 1.0, 1.0]]
        ...                      + [[0.3, 0.3, 0.6, 0.6]] * 4).expand(2, 6, 4)
        >>> flips = torch.tensor([False, True, False, True, False, True]).expand(2, 6)
        >>> loss, terms = sere(student, teacher, boxes, flips, local, return_terms=True)
        >>> loss.backward()
        >>> sorted(terms), sere.spatial.num_heads, student.grad.shape
        (['channel', 'spatial'], 6, torch.Size([4, 197, 384]))
    """

    def __init__(
        self,
        dim: int,
        *,
        alpha: float = 1.0,
        beta: float = 1.0,
        num_heads: int | None = None,
        num_global_views: int = 2,
        num_prefix_tokens: int = 0,
        local_heads: bool = True,
        symmetric: bool = False,
        recipe: str = "authors",
        points: str | None = None,
        padding: str | None = None,
        global_lattice: int | tuple[int, int] | None = None,
        local_lattice: int | tuple[int, int] | None = None,
        empty_pairs: str | None = None,
        spatial: SpatialSelfRelationLoss | None = None,
        channel: ChannelSelfRelationLoss | None = None,
        backend: str = "auto",
    ) -> None:
        super().__init__()
        for name, value in (("alpha", alpha), ("beta", beta)):
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise TypeError(
                    f"{name} must be a number >= 0, got {type(value).__name__} {value!r}"
                )
            if not value >= 0:  # also refuses NaN
                raise ValueError(f"{name} must be a number >= 0, got {value!r}")
        if alpha == 0 and beta == 0:
            raise ValueError("alpha and beta are both 0: SERE would add nothing")
        if alpha == 0:
            warnings.warn(
                "SERELoss with alpha=0 uses the channel self-relation alone; the paper (Sec. 4.3) "
                "finds it can collapse without an image-level loss, so add it to one (DINO, iBOT, "
                "MoCo v3)",
                UserWarning,
                stacklevel=2,
            )
        self.alpha = float(alpha)
        self.beta = float(beta)
        common = dict(
            num_global_views=num_global_views,
            num_prefix_tokens=num_prefix_tokens,
            local_heads=local_heads,
            symmetric=symmetric,
            backend=check_choice(backend, "backend", BACKENDS),
        )
        self.spatial: SpatialSelfRelationLoss | None = None
        self.channel: ChannelSelfRelationLoss | None = None
        if alpha > 0:
            self.spatial = (
                spatial
                if spatial is not None
                else SpatialSelfRelationLoss(
                    dim,
                    num_heads,
                    recipe=recipe,
                    points=points,
                    padding=padding,
                    global_lattice=global_lattice,
                    local_lattice=local_lattice,
                    empty_pairs=empty_pairs,
                    **common,  # type: ignore[arg-type]
                )
            )
        if beta > 0:
            self.channel = (
                channel
                if channel is not None
                else ChannelSelfRelationLoss(
                    dim,
                    **common,  # type: ignore[arg-type]
                )
            )

    @overload
    def forward(
        self,
        student_global: Views,
        teacher_global: Views,
        boxes: Tensor,
        flips: Tensor,
        student_local: Views | None = None,
        *,
        global_grid: int | tuple[int, int] | None = None,
        local_grid: int | tuple[int, int] | None = None,
        return_terms: Literal[False] = False,
    ) -> Tensor: ...

    @overload
    def forward(
        self,
        student_global: Views,
        teacher_global: Views,
        boxes: Tensor,
        flips: Tensor,
        student_local: Views | None = None,
        *,
        global_grid: int | tuple[int, int] | None = None,
        local_grid: int | tuple[int, int] | None = None,
        return_terms: Literal[True],
    ) -> tuple[Tensor, dict[str, Tensor]]: ...

    def forward(
        self,
        student_global: Views,
        teacher_global: Views,
        boxes: Tensor,
        flips: Tensor,
        student_local: Views | None = None,
        *,
        global_grid: int | tuple[int, int] | None = None,
        local_grid: int | tuple[int, int] | None = None,
        return_terms: bool = False,
    ) -> Tensor | tuple[Tensor, dict[str, Tensor]]:
        """Compute ``alpha * L_p + beta * L_c`` for one multi-crop batch.

        Args:
            student_global: the student backbone's output for the ``G`` global views: ViT
                tokens ``(G * B, T, C)``, maps ``(G * B, C, H, W)``, or a list of ``G`` tensors
                of batch ``B`` (``Views``).
            teacher_global: the teacher backbone's output for the same global views, in any of
                those layouts; detached inside.
            boxes: ``(B, V, 4)`` crop boxes of all ``V = G + L`` views, normalised
                ``(x0, y0, x1, y1)`` in the original image, globals first (unused without the
                spatial term).
            flips: ``(B, V)`` bool, whether each view was flipped horizontally.
            student_local: the student's output for the ``L`` local views, or ``None``.
            global_grid: the ``(H, W)`` token grid of the global views, for tokens of a
                non-square grid; ``None`` for a square grid or maps.
            local_grid: the same for the local views.
            return_terms: also return each term, unweighted and detached, for logging.

        Returns:
            The loss, a float32 scalar; with ``return_terms=True``, the pair ``(loss, terms)``
            where ``terms`` maps ``"spatial"`` and ``"channel"`` (the terms built) to detached
            scalars.
        """
        _check_roles(student_global, teacher_global)
        if self.spatial is not None:
            boxes, flips = _geometry(boxes, flips)
        args = (student_global, teacher_global, boxes, flips, student_local)
        out: Tensor | tuple[Tensor, dict[str, Tensor]] = self._computed(
            self._loss, *args, global_grid, local_grid, return_terms
        )
        return out

    def _loss(
        self,
        student_global: Views,
        teacher_global: Views,
        boxes: Tensor,
        flips: Tensor,
        student_local: Views | None,
        global_grid: int | tuple[int, int] | None,
        local_grid: int | tuple[int, int] | None,
        return_terms: bool,
    ) -> Tensor | tuple[Tensor, dict[str, Tensor]]:
        """Both terms from checked geometry on the tokens' device: what ``compile()`` compiles."""
        student_global, teacher_global, student_local = self._joined(
            student_global, teacher_global, student_local
        )
        terms: dict[str, Tensor] = {}
        loss: Tensor | None = None
        if self.spatial is not None:
            spatial = self.spatial._loss(
                student_global,
                teacher_global,
                boxes,
                flips,
                student_local,
                global_grid,
                local_grid,
                self.spatial.teacher_temp,
                self.spatial.student_temp,
            )
            terms["spatial"] = spatial.detach()
            loss = self.alpha * spatial
        if self.channel is not None:
            channel = self.channel._loss(
                student_global,
                teacher_global,
                student_local,
                self.channel.teacher_temp,
                self.channel.student_temp,
            )
            terms["channel"] = channel.detach()
            loss = self.beta * channel if loss is None else loss + self.beta * channel
        if loss is None:  # pragma: no cover - the constructor forbids it
            raise RuntimeError("SERELoss has no term")
        return (loss, terms) if return_terms else loss

    def _joined(
        self, student_global: Views, teacher_global: Views, student_local: Views | None
    ) -> tuple[Views, Views, Views | None]:
        """The views joined once for both terms, with the checks and messages of the terms'.

        Each term would otherwise concatenate a list of views on its own, and its heads copy
        strided tokens (a ViT's patch tokens sliced off its class token) on their own.
        """
        spatial, channel = self.spatial, self.channel
        if spatial is None or channel is None:
            return student_global, teacher_global, student_local
        g = spatial.num_global_views
        if channel.num_global_views != g:
            return student_global, teacher_global, student_local
        teacher, _, batch = join_views(teacher_global, g, None, "teacher_global")
        student, _, _ = join_views(student_global, g, batch, "student_global")
        local = None
        if student_local is not None:
            local, _, _ = join_views(student_local, None, batch, "student_local")
        if spatial.num_prefix_tokens == 0 and channel.num_prefix_tokens == 0:
            teacher, student = _dense_tokens(teacher), _dense_tokens(student)
            local = None if local is None else _dense_tokens(local)
        return student, teacher, local

    @torch.no_grad()
    def update_teacher(self, momentum: float) -> None:
        """EMA step of every teacher head; call it right after the backbone's EMA step.

        Args:
            momentum: the teacher momentum of this iteration (0.996 -> 1 cosine in DINO).
        """
        for term in (self.spatial, self.channel):
            if term is not None:
                term.update_teacher(momentum)

    def extra_repr(self) -> str:
        """Settings shown by ``print(module)``."""
        return f"alpha={self.alpha}, beta={self.beta}"


@torch.no_grad()
def update_teacher(module: nn.Module, momentum: float) -> int:
    """EMA step of every SERE teacher head in ``module``, wherever it sits.

    Looks through ``module.modules()`` for the heads of every SERE term (a ``SERELoss``, a
    ``SpatialSelfRelationLoss`` or ``ChannelSelfRelationLoss``, or bare
    ``RelationHeads``) and moves each teacher projection one step,
    ``teacher = m * teacher + (1 - m) * student``. So it reaches through
    ``DistributedDataParallel`` (no ``.module``), a LightningModule or any model that holds the
    loss. Call it right after the backbone's EMA step, with the same momentum.

    Args:
        module: a SERE loss, or any module that holds one (DDP wrappers included).
        momentum: the teacher momentum of this iteration, in [0, 1].

    Returns:
        How many sets of heads moved (2 for a ``SERELoss`` with both terms).

    Raises:
        ValueError: ``module`` holds no SERE heads (a wrong module would otherwise leave the
            teachers frozen without a word).

    Examples:
        >>> model = nn.ModuleDict({"backbone": nn.Linear(4, 8), "sere": SERELoss(48, num_heads=6)})
        >>> update_teacher(model, 0.996)
        2
    """
    momentum = check_unit_interval(momentum, "momentum")
    heads = [m for m in module.modules() if isinstance(m, RelationHeads)]
    if not heads:
        raise ValueError(
            f"update_teacher found no SERE heads in {type(module).__name__}: pass the module "
            "that holds the SERE loss (or the loss itself)"
        )
    for h in heads:
        h.update_teacher(momentum)
    return len(heads)
