"""The public surface: exports, version, typing marker, light import; release metadata."""

from __future__ import annotations

import re
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest
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


ROOT = Path(__file__).resolve().parents[1]


def test_installed_metadata_carries_the_package_version() -> None:
    # The wheel's metadata takes its version from sere_loss/__init__.py at build time (.ci/run
    # runs this file against the installed wheel).
    try:
        installed = metadata.version("sere-loss")
    except metadata.PackageNotFoundError:
        pytest.skip("sere-loss is on the path but not installed")
    assert installed == sere_loss.__version__


def test_version_is_written_once() -> None:
    """``__init__.py`` holds the version; pyproject reads it, the release files do not repeat it."""
    pyproject = (ROOT / "pyproject.toml").read_text()
    project = pyproject.split("\n[project]\n", 1)[1].split("\n[", 1)[0]
    assert 'dynamic = ["version"]' in project
    assert not re.search(r"^version\s*=", project, flags=re.MULTILINE), "a static version"
    assert '[tool.hatch.version]\npath = "src/sere_loss/__init__.py"' in pyproject
    citation = (ROOT / "CITATION.cff").read_text()
    assert not re.search(r"^version:", citation, flags=re.MULTILINE), "CITATION.cff repeats it"
    # The changelog has a section for the version (dated when released; see release.yml).
    changelog = (ROOT / "CHANGELOG.md").read_text()
    heading = rf"^## \[{re.escape(sere_loss.__version__)}\] - (Unreleased|\d{{4}}-\d{{2}}-\d{{2}})$"
    assert re.search(heading, changelog, flags=re.MULTILINE), "no CHANGELOG section for it"


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
