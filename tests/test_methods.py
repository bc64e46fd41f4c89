"""The example trainers' method pieces (DINO, iBOT, MoCo v3) against independent statements."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

pytest.importorskip("timm", reason="the examples need the 'examples' extra (timm, tqdm)")


def _tiny_preset(examples: Any) -> Any:
    return examples.ibot_sere.PRESETS["tiny"]


# DINO --------------------------------------------------------------------------------------------


def test_dino_loss_matches_lightly(examples: Any) -> None:
    """Our DINO loss and lightly's (an independent implementation) agree, centre included."""
    lightly_loss = pytest.importorskip("lightly.loss")
    gen = torch.Generator().manual_seed(0)
    batch, dim, views = 5, 32, 6
    ours = examples.dino_sere.DINOLoss(dim, views, student_temp=0.1, center_momentum=0.9)
    theirs = lightly_loss.DINOLoss(output_dim=dim, student_temp=0.1, center_momentum=0.9)
    for _ in range(3):  # the centres must evolve alike too
        student = torch.randn(views * batch, dim, generator=gen)
        teacher = torch.randn(2 * batch, dim, generator=gen)
        expected = theirs(list(teacher.chunk(2)), list(student.chunk(views)), teacher_temp=0.05)
        torch.testing.assert_close(ours(student, teacher, 0.05), expected, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(ours.center.reshape(-1), theirs.center.reshape(-1))


def test_update_center(examples: Any) -> None:
    center, teacher = torch.ones(1, 3), torch.tensor([[1.0, 2.0, 3.0], [3.0, 4.0, 5.0]])
    examples.dino_sere.update_center(center, teacher, 0.9)
    torch.testing.assert_close(center, 0.9 + 0.1 * torch.tensor([[2.0, 3.0, 4.0]]))


# iBOT: masks -------------------------------------------------------------------------------------


@pytest.mark.parametrize("grid", [(14, 14), (8, 8), (14, 10), (5, 7)])
@pytest.mark.parametrize("ratio", [0.1, 0.3, 0.5])
def test_block_mask_stays_within_its_budget(
    examples: Any, grid: tuple[int, int], ratio: float
) -> None:
    torch.manual_seed(0)
    h, w = grid
    counts = []
    for _ in range(50):
        mask = examples.ibot_sere.block_mask(h, w, ratio)
        assert mask.shape == (h, w)
        assert mask.dtype == torch.bool
        counts.append(int(mask.sum()))
        assert counts[-1] <= ratio * h * w  # never over the budget
    # ... and close to it: a block is only refused when it would overshoot.
    assert sum(counts) / len(counts) >= 0.75 * ratio * h * w


def test_block_mask_masks_blocks_not_scattered_patches(examples: Any) -> None:
    torch.manual_seed(0)
    with_neighbour, masked = 0, 0
    for _ in range(100):
        m = examples.ibot_sere.block_mask(14, 14, 0.3)
        padded = F.pad(m.float(), (1, 1, 1, 1))
        near = padded[:-2, 1:-1] + padded[2:, 1:-1] + padded[1:-1, :-2] + padded[1:-1, 2:]
        with_neighbour += int(((near > 0) & m).sum())
        masked += int(m.sum())
    # Independent patches at 30 % would have a masked 4-neighbour 1 - 0.7**4 = 76 % of the time.
    assert with_neighbour / masked > 0.95


def test_block_mask_ratio_zero_and_seeding(examples: Any) -> None:
    assert not examples.ibot_sere.block_mask(14, 14, 0.0).any()
    torch.manual_seed(3)
    first = examples.ibot_sere.block_mask(14, 14, 0.4)
    torch.manual_seed(3)
    assert torch.equal(first, examples.ibot_sere.block_mask(14, 14, 0.4))


def test_masked_multicrop(examples: Any) -> None:
    from sere_loss.transforms import ibot_sere_transform

    image = torch.randint(0, 256, (3, 80, 96), dtype=torch.uint8)
    multicrop = ibot_sere_transform(global_size=64, local_size=32, num_local=3)
    torch.manual_seed(0)
    crops, masks = examples.ibot_sere.MaskedMultiCrop(multicrop, 8, [(0.0, 0.0)])(image)
    assert len(crops.views) == 5
    assert masks.shape == (2, 8, 8)
    assert not masks.any()
    fractions = []
    for _ in range(20):
        _, masks = examples.ibot_sere.MaskedMultiCrop(multicrop, 8, [(0.0, 0.0), (0.3, 0.3)])(image)
        fractions += masks.float().mean(dim=(1, 2)).tolist()
    assert 0.0 in fractions  # half of the views are left whole...
    assert any(0.2 < f <= 0.3 for f in fractions)  # ... the others masked at about 30 %
    assert all(f == 0.0 or 0.2 < f <= 0.3 for f in fractions)


# iBOT: model and loss ----------------------------------------------------------------------------


def _ibot_model(examples: Any) -> Any:
    torch.manual_seed(0)
    preset = _tiny_preset(examples)
    backbone = examples.options.build_vit(preset, 0.0)
    head = examples.dino_sere.DINOHead(backbone.embed_dim, 32, 16, 8)
    model = examples.ibot_sere.MultiCropModel(backbone, head).eval()
    with torch.no_grad():
        model.mask_token.normal_()
    return model


def test_ibot_tokens_without_mask_are_timms(examples: Any) -> None:
    model = _ibot_model(examples)
    images = torch.randn(3, 3, 64, 48)  # not square: the grid must be kept
    final, patches = model.tokens(images)
    ref_final, (ref_patches,) = model.backbone.forward_intermediates(
        images, indices=1, norm=False, output_fmt="NLC"
    )
    torch.testing.assert_close(final, ref_final)
    torch.testing.assert_close(patches, ref_patches)
    assert patches.shape == (3, 8 * 6, 96)


def test_ibot_mask_token_replaces_the_masked_patch_embeddings(examples: Any) -> None:
    """Against timm's own forward with the patch embeddings edited by a hook."""
    model = _ibot_model(examples)
    images = torch.randn(2, 3, 64, 64)
    mask = torch.rand(2, 8, 8, generator=torch.Generator().manual_seed(1)) < 0.4

    def replace(_module: nn.Module, _inputs: Any, output: torch.Tensor) -> torch.Tensor:
        edited = output.clone()  # (B, h, w, C)
        edited[mask] = model.mask_token
        return edited

    handle = model.backbone.patch_embed.register_forward_hook(replace)
    try:
        ref_final, (ref_patches,) = model.backbone.forward_intermediates(
            images, indices=1, norm=False, output_fmt="NLC"
        )
    finally:
        handle.remove()
    final, patches = model.tokens(images, mask)
    torch.testing.assert_close(final, ref_final)
    torch.testing.assert_close(patches, ref_patches)
    assert not torch.allclose(patches, model.tokens(images)[1])  # the mask did change something


def test_ibot_forward_layout(examples: Any) -> None:
    model = _ibot_model(examples)
    globals_, locals_ = torch.randn(2 * 3, 3, 64, 64), torch.randn(4 * 3, 3, 32, 32)
    cls, patches, g_tokens, l_tokens = model(globals_, None, locals_)
    assert cls.shape == (6 * 3, 32)
    assert patches.shape == (2 * 3, 64, 32)
    assert g_tokens.shape == (6, 64, 96)
    assert l_tokens is not None
    assert l_tokens.shape == (12, 16, 96)
    # The head is shared: [CLS] of the globals and their patches use the same prototypes.
    final, _ = model.tokens(globals_)
    torch.testing.assert_close(cls[:6], model.head(final[:, 0]))
    torch.testing.assert_close(patches, model.head(final[:, 1:]))


def test_ibot_patch_loss_against_its_definition(examples: Any) -> None:
    gen = torch.Generator().manual_seed(0)
    batch, tokens, dim, views = 3, 6, 10, 4
    loss = examples.ibot_sere.IBOTLoss(dim, views, student_temp=0.1, center_momentum=0.9).double()
    loss.center2.normal_(generator=gen)
    center = loss.center2.clone()
    s_cls, t_cls = torch.randn(views * batch, dim, dtype=torch.float64), torch.randn(2 * batch, dim)
    s_patch = torch.randn(2 * batch, tokens, dim, generator=gen, dtype=torch.float64)
    t_patch = torch.randn(2 * batch, tokens, dim, generator=gen, dtype=torch.float64)
    masks = torch.rand(2 * batch, tokens, generator=gen) < 0.5
    masks[1] = False  # an image with no masked patch adds a zero to its view's mean
    _, patch = loss((s_cls, s_patch), (t_cls.double(), t_patch), masks, 0.04, 0.07)

    per_view = []
    for v in range(2):
        per_image = []
        for b in range(batch):
            i = v * batch + b
            terms = []
            for n in range(tokens):
                if masks[i, n]:
                    q = torch.softmax((t_patch[i, n] - center[0, 0]) / 0.07, dim=0)
                    log_p = torch.log_softmax(s_patch[i, n] / 0.1, dim=0)
                    terms.append(-(q * log_p).sum())
            per_image.append(
                torch.stack(terms).mean() if terms else torch.zeros((), dtype=torch.float64)
            )
        per_view.append(torch.stack(per_image).mean())
    # The loss computes in float32 whatever comes in, as under autocast.
    torch.testing.assert_close(patch.double(), torch.stack(per_view).mean(), rtol=1e-5, atol=1e-6)
    # The patch centre moved towards the teacher's mean patch output.
    expected = 0.9 * center + 0.1 * t_patch.mean(dim=(0, 1))
    torch.testing.assert_close(loss.center2, expected, rtol=1e-6, atol=1e-7)


# MoCo v3 -----------------------------------------------------------------------------------------


def test_contrastive_loss_against_its_definition(examples: Any) -> None:
    gen = torch.Generator().manual_seed(0)
    q, k = torch.randn(5, 8, generator=gen), torch.randn(5, 8, generator=gen)
    t = 0.2
    qn, kn = (
        q.double() / q.double().norm(dim=1, keepdim=True),
        k.double() / k.double().norm(dim=1, keepdim=True),
    )
    terms = []
    for i in range(5):
        sims = torch.stack([qn[i] @ kn[j] / t for j in range(5)])
        terms.append(-(sims[i] - torch.logsumexp(sims, dim=0)))
    expected = torch.stack(terms).mean() * 2 * t
    actual = examples.mocov3_sere.contrastive_loss(q, k, t, rank=0)
    torch.testing.assert_close(actual.double(), expected, rtol=1e-5, atol=1e-6)


def test_sincos_position_embedding(examples: Any) -> None:
    emb = examples.mocov3_sere.sincos_position_embedding(3, 4, 8)
    assert emb.shape == (1, 1 + 12, 8)
    assert not emb[0, 0].any()  # [CLS] gets none
    for r in range(3):
        for c in range(4):
            token = emb[0, 1 + r * 4 + c]
            for k in range(2):
                omega = 1 / 10000 ** (k / 2)
                expected = [math.sin(r * omega), math.cos(r * omega)]
                expected += [math.sin(c * omega), math.cos(c * omega)]
                got = [token[k], token[2 + k], token[4 + k], token[6 + k]]
                assert [float(x) for x in got] == pytest.approx(expected, abs=1e-6)


def test_sincos_width_errors_name_the_preset(
    examples: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    from timm.models.vision_transformer import VisionTransformer

    with pytest.raises(ValueError, match=r"dim: .* divisible by 4, got 6"):
        examples.mocov3_sere.sincos_position_embedding(2, 2, 6)

    def narrow(*args: Any, **kwargs: Any) -> VisionTransformer:
        return VisionTransformer(img_size=32, patch_size=8, embed_dim=90, depth=1, num_heads=3)

    monkeypatch.setattr(examples.options, "build_vit", narrow)
    preset = examples.mocov3_sere.PRESETS["tiny"]
    with pytest.raises(SystemExit, match=r"preset arch 'tiny' is 90 channels wide.*divisible by 4"):
        examples.mocov3_sere.mocov3_vit(preset)


def test_mocov3_vit_and_heads(examples: Any) -> None:
    preset = examples.mocov3_sere.PRESETS["tiny"]
    vit = examples.mocov3_sere.mocov3_vit(preset)
    assert not vit.pos_embed.requires_grad
    assert not any(p.requires_grad for p in vit.patch_embed.parameters())
    torch.testing.assert_close(
        vit.pos_embed.data, examples.mocov3_sere.sincos_position_embedding(8, 8, 96)
    )
    assert vit.blocks[0].attn.num_heads == preset.num_heads
    qkv = vit.blocks[0].attn.qkv.weight
    assert qkv.abs().max() <= math.sqrt(6 / (96 + 96))  # each of Q, K, V as a 96 x 96 matrix
    projector = examples.mocov3_sere.mlp(3, 96, 32, 16)
    linears = [m for m in projector if isinstance(m, nn.Linear)]
    norms = [m for m in projector if isinstance(m, nn.BatchNorm1d)]
    assert [(m.in_features, m.out_features) for m in linears] == [(96, 32), (32, 32), (32, 16)]
    assert all(m.bias is None for m in linears)
    assert [m.affine for m in norms] == [True, True, False]
    assert isinstance(projector[-1], nn.BatchNorm1d)
