"""SERE inside code we did not write: the Lightning and Hugging Face examples, 2 steps on a CPU.

The Hugging Face loop runs on DINOv2 (``hf_dinov2_sere.py``) and on DINOv3
(``hf_dinov3_sere.py``, the same loop on ``DINOv3ViTModel``).

Each runs its ``main`` in this process on the tiny settings, as its command line would, and the
test checks what the example promises: every term finite and in the total, SERE's teacher heads
moved by the EMA step with the example's own momentum, SERE's state in the checkpoint, and (for
Hugging Face) the ``--pretrained`` path loading a saved model.
"""

from __future__ import annotations

import importlib
import math
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import torch

import sere_loss

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def _example(name: str) -> ModuleType:
    sys.path.insert(0, str(EXAMPLES))
    try:
        return importlib.import_module(name)
    finally:
        sys.path.remove(str(EXAMPLES))


def _teacher_heads(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {
        name: p.detach().clone()
        for name, p in module.named_parameters()
        if "teacher" in name and name.split(".")[0] != "teacher"
    }


@pytest.fixture
def ema_calls(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, Any]]:
    """Every call of ``sere_loss.update_teacher``: momentum, and whether the heads moved."""
    calls: list[dict[str, Any]] = []
    real = sere_loss.update_teacher

    def spy(module: torch.nn.Module, momentum: float) -> None:
        before = _teacher_heads(module)
        real(module, momentum)
        after = _teacher_heads(module)
        assert before
        assert before.keys() == after.keys()
        moved = any(not torch.equal(before[k], after[k]) for k in before)
        calls.append({"momentum": momentum, "moved": moved, "heads": len(before)})

    monkeypatch.setattr(sere_loss, "update_teacher", spy)
    return calls


def test_lightning_module_trains(tmp_path: Path, ema_calls: list[dict[str, Any]]) -> None:
    pytest.importorskip("lightning", reason="the Lightning example needs the 'lightning' extra")
    example = _example("lightning_dino_sere")
    argv = ["--max-steps", "2", "--batch-size", "4", "--num-local", "2", "--workers", "0"]
    argv += ["--accelerator", "cpu", "--devices", "1", "--output-dir", str(tmp_path)]
    logged = example.main(argv)
    for term in ("loss", "dino", "sere"):
        assert math.isfinite(logged[term]), term
    assert logged["sere"] > 0
    assert logged["loss"] == pytest.approx(logged["dino"] + logged["sere"], rel=1e-5)
    # The callback's EMA: cosine from 0.996 to 1 over the 2 steps, after each optimizer step
    # (global_step 1 of 2, then 2 of 2); SERE's teacher heads (global and local) moved with it.
    assert [c["momentum"] for c in ema_calls] == pytest.approx([0.998, 1.0])
    assert ema_calls[0]["moved"]
    assert not ema_calls[1]["moved"]  # momentum 1 leaves the teacher as it is
    state = torch.load(tmp_path / "last.ckpt", weights_only=False)["state_dict"]
    assert any(k.startswith("sere.") and "teacher" in k for k in state)
    assert any(k.startswith("student.backbone.") for k in state)


# example, model class, config class, the patch embedding's weight (the attribute path)
HF_EXAMPLES = {
    "dinov2": ("hf_dinov2_sere", "Dinov2Model", "Dinov2Config", "patch_embeddings.projection"),
    "dinov3": ("hf_dinov3_sere", "DINOv3ViTModel", "DINOv3ViTConfig", "patch_embeddings"),
}


@pytest.mark.parametrize("name", list(HF_EXAMPLES))
def test_hugging_face_example_trains_and_saves(
    tmp_path: Path, ema_calls: list[dict[str, Any]], monkeypatch: pytest.MonkeyPatch, name: str
) -> None:
    transformers = pytest.importorskip("transformers", reason="the HF example needs the 'hf' extra")
    module, model_class, _, _ = HF_EXAMPLES[name]
    example = _example(module)
    taps: list[sere_loss.TokenTap] = []
    real = sere_loss.TokenTap

    def spy(*args: Any, **kwargs: Any) -> sere_loss.TokenTap:
        taps.append(real(*args, **kwargs))
        return taps[-1]

    monkeypatch.setattr(sere_loss, "TokenTap", spy)
    small = ["--batch-size", "4", "--num-local", "2"]
    history = example.main(["--steps", "2", *small, "--output-dir", str(tmp_path / "run")])
    assert len(history) == 2
    for step in history:
        assert math.isfinite(step["loss"])
        assert step["loss"] > step["dino"] > 0  # SERE's terms are positive
    assert len(ema_calls) == 2
    assert all(c["moved"] and 0.996 <= c["momentum"] < 1 for c in ema_calls)
    # The tap found the model by itself: CLS and, for DINOv3, its 4 registers before the patches
    assert [tap.family for tap in taps] == [f"transformers {model_class}"] * 2
    assert taps[0].num_prefix_tokens == (1 + 4 if name == "dinov3" else 1)
    state = torch.load(tmp_path / "run" / "checkpoint.pth", weights_only=False)
    assert any("teacher" in k for k in state["sere"])
    saved = getattr(transformers, model_class).from_pretrained(tmp_path / "run" / "student")
    assert saved.config.hidden_size == 192


@pytest.mark.parametrize("name", list(HF_EXAMPLES))
def test_hugging_face_pretrained_weights_are_loaded(tmp_path: Path, name: str) -> None:
    # --pretrained takes what from_pretrained takes: here a local directory (no download). The
    # continued run must start from those weights: after one small step the patch embedding is
    # still almost the saved one, and far from a fresh random one.
    transformers = pytest.importorskip("transformers", reason="the HF example needs the 'hf' extra")
    module, model_class, config_class, embedding = HF_EXAMPLES[name]
    example = _example(module)
    model_type = getattr(transformers, model_class)
    torch.manual_seed(123)
    config = getattr(transformers, config_class)(
        hidden_size=192, num_hidden_layers=2, num_attention_heads=3, patch_size=8, image_size=64
    )
    model_type(config).save_pretrained(tmp_path / "pretrained")
    argv = ["--steps", "1", "--pretrained", str(tmp_path / "pretrained"), "--lr", "1e-5"]
    argv += ["--batch-size", "4", "--num-local", "2"]
    example.main([*argv, "--output-dir", str(tmp_path / "run")])

    def patch_embedding(model: torch.nn.Module) -> torch.Tensor:
        weight = model.embeddings.get_submodule(embedding).weight
        return weight.detach().flatten()  # type: ignore[no-any-return]

    before = patch_embedding(model_type.from_pretrained(tmp_path / "pretrained"))
    after = patch_embedding(model_type.from_pretrained(tmp_path / "run" / "student"))
    fresh = patch_embedding(model_type(config))
    cosine = torch.nn.functional.cosine_similarity
    assert float(cosine(before, after, dim=0)) > 0.99
    assert float(cosine(fresh, after, dim=0)) < 0.5
