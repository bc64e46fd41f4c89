"""The public surface: exports, version, typing marker, light import."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from torch import nn

import sere_loss


def test_public_modules_are_nn_modules() -> None:
    for name in ("SpatialSelfRelationLoss", "ChannelSelfRelationLoss", "RegionAlignedSampler"):
        assert issubclass(getattr(sere_loss, name), nn.Module)
    assert issubclass(sere_loss.SERELoss, nn.Module)


def test_all_is_sorted_and_importable() -> None:
    assert list(sere_loss.__all__) == sorted(sere_loss.__all__)
    for name in sere_loss.__all__:
        assert hasattr(sere_loss, name), name


def test_version_and_typing_marker() -> None:
    parts = sere_loss.__version__.split(".")
    assert len(parts) == 3
    assert all(p.isdigit() for p in parts)
    assert (Path(sere_loss.__file__).parent / "py.typed").is_file()


def test_import_stays_light() -> None:
    # Only the transforms modules (transforms, batch_transforms) may import torchvision;
    # `import sere_loss` must not, and TokenTap
    # knows timm and transformers models without importing either.
    code = (
        "import sys, sere_loss; "
        "print([m for m in ('torchvision', 'timm', 'transformers') if m in sys.modules])"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
