"""Input checks that say what was expected and what came.

Every public function and module of ``sere_loss`` validates user input through these helpers, so
that a wrong call fails with a ``ValueError`` or ``TypeError`` naming the argument, the expected
layout and the shape that actually arrived. No bare ``assert`` is used for user input: it would
vanish under ``python -O``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import Tensor


def check_tensor(x: object, name: str) -> Tensor:
    """Return ``x`` if it is a tensor, else raise a ``TypeError``."""
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    return x


def check_ndim(x: object, ndim: int, name: str, layout: str) -> Tensor:
    """Check that ``x`` is a tensor with ``ndim`` dimensions laid out as ``layout``."""
    t = check_tensor(x, name)
    if t.ndim != ndim:
        raise ValueError(
            f"{name} must have shape {layout} ({ndim} dims), got shape {tuple(t.shape)} "
            f"({t.ndim} dims)"
        )
    return t


def check_floating(x: Tensor, name: str) -> Tensor:
    """Check that ``x`` holds floating-point numbers."""
    if not x.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {x.dtype}")
    return x


def check_choice(value: object, name: str, choices: Iterable[str]) -> str:
    """Check that an option string is one of ``choices``."""
    options = tuple(choices)
    if not isinstance(value, str) or value not in options:
        raise ValueError(f"{name} must be one of {options}, got {value!r}")
    return value


def check_positive(value: object, name: str) -> float:
    """Check that a temperature or scale is a finite number greater than zero."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a positive number, got {type(value).__name__}")
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a finite number > 0, got {value}")
    return float(value)


def check_int(value: object, name: str, minimum: int = 1) -> int:
    """Check that ``value`` is an int (not a bool) of at least ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


def check_positive_int(value: object, name: str) -> int:
    """Check that ``value`` is an int of at least one."""
    return check_int(value, name, 1)


def check_size(value: object, name: str) -> tuple[int, int]:
    """Normalise a lattice or grid size given as ``n`` or ``(h, w)`` to ``(h, w)``."""
    if isinstance(value, int) and not isinstance(value, bool):
        pair: tuple[object, ...] = (value, value)
    elif isinstance(value, (tuple, list)) and len(value) == 2:
        pair = tuple(value)
    else:
        raise ValueError(f"{name} must be an int or a pair (height, width), got {value!r}")
    h = check_positive_int(pair[0], f"{name}[0]")
    w = check_positive_int(pair[1], f"{name}[1]")
    return h, w


def check_unit_interval(value: object, name: str) -> float:
    """Check that ``value`` is a number in [0, 1] (a momentum, say)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number in [0, 1], got {type(value).__name__}")
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must lie in [0, 1], got {value}")
    return float(value)


# How the values of crop boxes and flips are checked (``set_value_checks``).
_VALUE_CHECK_MODES = ("auto", "host", "off")
_value_checks = "auto"


def set_value_checks(mode: str) -> str:
    """Choose how SERE checks the values of crop boxes and flips; returns the previous mode.

    Shapes and dtypes are always checked (they cost nothing). Values, that boxes are finite,
    inside ``[0, 1]`` with ``x0 < x1`` and ``y0 < y1``, and that integer flips are 0 or 1, are
    checked where they are:

    - ``"auto"`` (default): on the host, with a message that names the bad row, when they are
      on the CPU (as a ``DataLoader`` gives them; no wait for a GPU); by a device-side assert
      when they are on an accelerator or inside ``torch.compile``, so that the host never
      waits for the device and a compiled SERE stays one graph. A failed device-side assert
      stops a CUDA process ("device-side assert triggered"); rerun with the boxes on the CPU
      for the full message.
    - ``"host"``: always on the host with the full message; boxes on a GPU then cost one wait
      per call, and ``torch.compile`` refuses it (a read of a device value breaks the graph).
    - ``"off"``: no value checks; for boxes checked where they were made (the transforms of
      ``sere_loss.transforms`` and ``CropTracker`` check their own). A NaN box then fails the
      overlap test, so its pairs are left out as if its crop overlapped nothing.

    Args:
        mode: ``"auto"``, ``"host"`` or ``"off"``.

    Returns:
        The mode that was in force, to restore it later.

    Examples:
        >>> previous = set_value_checks("off")
        >>> set_value_checks(previous)
        'off'
    """
    global _value_checks
    mode = check_choice(mode, "mode", _VALUE_CHECK_MODES)
    previous, _value_checks = _value_checks, mode
    return previous


def _on_host(x: Tensor) -> bool | None:
    """Where to check the values of ``x``: on the host (``True``) or its device (``False``).

    ``None``: not at all (checks off, or a meta tensor, which has no values).
    """
    mode = _value_checks
    if mode == "off" or x.device.type == "meta":
        return None
    compiling = torch.compiler.is_compiling()
    if mode == "host":
        if compiling:
            raise RuntimeError(
                "set_value_checks('host') reads boxes and flips on the host, which torch.compile "
                "cannot capture in its graph; use set_value_checks('auto') (device-side "
                "asserts) or 'off' with a compiled SERE"
            )
        return True
    return not compiling and x.device.type == "cpu"


def check_boxes(boxes: object, name: str) -> Tensor:
    """Check crop boxes ``(B, 4)`` as normalised ``(x0, y0, x1, y1)`` inside [0, 1].

    Values are checked as ``set_value_checks`` says: on the host for boxes on the CPU, by a
    device-side assert for boxes on an accelerator or under ``torch.compile``.
    """
    b = check_ndim(boxes, 2, name, "(B, 4)")
    if b.shape[1] != 4:
        raise ValueError(f"{name} must have shape (B, 4) as (x0, y0, x1, y1), got {tuple(b.shape)}")
    check_floating(b, name)
    on_host = _on_host(b)
    if b.numel() == 0 or on_host is None:
        return b
    bad = (b[:, 0] >= b[:, 2]) | (b[:, 1] >= b[:, 3])
    if not on_host:
        ok = torch.isfinite(b).all() & (b >= 0).all() & (b <= 1).all() & ~bad.any()
        torch._assert_async(
            ok,
            f"{name} must be finite, inside [0, 1], with x0 < x1 and y0 < y1 in every row "
            "(checked on the device; pass the boxes on the CPU for the row at fault)",
        )
        return b
    # Every verdict in one read (boxes on an accelerator, mode "host": one host wait, not four).
    verdicts = torch.stack(
        [torch.isfinite(b).all().to(b.dtype), b.min(), b.max(), bad.any().to(b.dtype)]
    )
    finite, lo, hi, any_bad = verdicts.tolist()
    if not finite:
        raise ValueError(f"{name} must be finite, got non-finite values")
    if lo < 0.0 or hi > 1.0:
        raise ValueError(
            f"{name} must be normalised to the original image, inside [0, 1]; got values in "
            f"[{lo:.4g}, {hi:.4g}]"
        )
    if any_bad:
        k = int(bad.nonzero()[0, 0])
        raise ValueError(
            f"{name} rows must satisfy x0 < x1 and y0 < y1; row {k} is "
            f"{[round(v, 4) for v in b[k].tolist()]}"
        )
    return b


def check_flips(flips: object, batch: int, name: str) -> Tensor:
    """Check flip flags ``(B,)``, bool or 0/1 integers, and return them as bool.

    Integer values are checked as ``set_value_checks`` says (see ``check_boxes``).
    """
    f = check_ndim(flips, 1, name, "(B,)")
    if f.shape[0] != batch:
        raise ValueError(
            f"{name} must have shape ({batch},) to match the boxes, got {tuple(f.shape)}"
        )
    if f.dtype == torch.bool:
        return f
    if f.is_floating_point() or f.is_complex():
        raise TypeError(f"{name} must be bool (or 0/1 integers), got dtype {f.dtype}")
    on_host = _on_host(f)
    if f.numel() and on_host is not None:
        ok = ((f == 0) | (f == 1)).all()
        if on_host:
            if not bool(ok):
                raise ValueError(f"{name} given as integers must hold only 0 and 1")
        else:
            torch._assert_async(ok, f"{name} given as integers must hold only 0 and 1")
    return f != 0
