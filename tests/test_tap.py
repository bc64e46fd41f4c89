"""TokenTap: the tokens it pops equal each model family's own intermediate outputs.

Every family is a randomly initialised, tiny model built from its config (no downloads). The
expected tokens come from the model's own routes to its last block, before the final norm:
timm's ``forward_intermediates(norm=False)``, transformers' ``hidden_states[-1]`` (checked to be
the input of the final layernorm), torchvision's encoder layers and ResNet stages called by
hand, and the DINO-style test ViT's blocks called by hand (for a list call as DINOv2's student
makes it, each element's tokens by a call of its own). FSDP is in ``test_distributed.py``.
"""

from __future__ import annotations

import copy
import re
import warnings

import pytest
import torch
from einops import rearrange
from torch import nn

from _tiny_models import BlockChunk, MultiCrop, TinyViT
from conftest import assert_close
from sere_loss import SERELoss, TokenTap

B = 2


def _images(h: int, w: int, n: int = B, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 3, h, w, generator=torch.Generator().manual_seed(seed))


def _grid_maps(tokens: torch.Tensor, prefix: int, h: int, w: int) -> torch.Tensor:
    """Tokens (B, prefix + h * w, C), row-major over the patch grid, as maps (B, C, h, w)."""
    return rearrange(tokens[:, prefix:], "b (h w) c -> b c h w", h=h, w=w)


def _no_hooks(module: nn.Module) -> bool:
    return all(not m._forward_hooks and not m._forward_pre_hooks for m in module.modules())


# -- timm ----------------------------------------------------------------------------------------


def _timm_vit(**kw: object) -> nn.Module:
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    options = dict(
        img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=4, num_classes=0,
        dynamic_img_size=True,
    )  # fmt: skip
    options.update(kw)
    return timm.models.vision_transformer.VisionTransformer(**options).eval()


@pytest.mark.parametrize(
    ("options", "prefix"),
    [
        ({}, 1),
        ({"reg_tokens": 3}, 4),
        ({"class_token": False, "reg_tokens": 2, "global_pool": "avg"}, 2),
    ],
    ids=["cls", "cls+registers", "registers only"],
)
def test_timm_vit_equals_forward_intermediates(options: dict[str, object], prefix: int) -> None:
    vit = _timm_vit(**options)
    assert vit.num_prefix_tokens == prefix
    x = _images(32, 48)  # a 4 x 6 grid
    plain = vit(x)
    with TokenTap(vit) as tap:
        out = vit(x)
        (maps,) = tap.pop()
        with tap.paused():
            expected = vit.forward_intermediates(
                x, indices=1, norm=False, output_fmt="NCHW", intermediates_only=True
            )[0]
    assert torch.equal(out, plain)  # the hooks change nothing
    assert maps.shape == (B, 32, 4, 6)
    assert torch.equal(maps, expected)
    assert (tap.num_prefix_tokens, tap.patch_size, tap.dim, tap.num_heads) == (
        prefix,
        (8, 8),
        32,
        4,
    )
    assert _no_hooks(vit)


def test_timm_gradients_reach_the_backbone_through_the_tokens() -> None:
    vit = _timm_vit().train()
    twin = copy.deepcopy(vit)
    x = _images(32, 32)
    with TokenTap(vit) as tap:
        vit(x)
        (maps,) = tap.pop()
    (maps.square().mean() + maps.mean()).backward()
    ref = twin.forward_intermediates(x, indices=1, norm=False, intermediates_only=True)[0]
    (ref.square().mean() + ref.mean()).backward()
    grads = {n: p.grad for n, p in twin.named_parameters() if p.grad is not None}
    assert "blocks.0.attn.qkv.weight" in grads
    for name, p in vit.named_parameters():
        if name in grads:
            assert_close(p.grad, grads[name])
        else:
            assert p.grad is None, name  # the final norm and the head: not on the tokens' path


def test_timm_under_autocast() -> None:
    vit = _timm_vit()
    x = _images(32, 32)
    with TokenTap(vit) as tap, torch.autocast("cpu", dtype=torch.bfloat16):
        vit(x)
        vit(x.flip(-1))
        maps = tap.pop()
        with tap.paused():
            expected = vit.forward_intermediates(x, indices=1, norm=False, intermediates_only=True)
        sere = SERELoss(tap.dim, num_heads=4)  # type: ignore[arg-type]
        boxes = torch.tensor([[0.0, 0.0, 0.8, 0.8], [0.2, 0.2, 1.0, 1.0]]).expand(B, 2, 4)
        loss = sere(maps, [m.detach() for m in maps], boxes, torch.zeros(B, 2, dtype=torch.bool))
    # The residual stream's dtype under autocast, whatever the model makes it (timm keeps it
    # float32: its blocks add bfloat16 branches to a float32 stream).
    assert maps[0].dtype == expected[0].dtype
    assert torch.equal(maps[0], expected[0])
    assert loss.dtype == torch.float32
    assert torch.isfinite(loss)


def test_timm_non_reentrant_checkpointing_captures_once() -> None:
    # The backward recomputes the checkpointed blocks and fires their hooks again: the tap
    # ignores those calls, and the gradients equal the run without checkpointing.
    vit, plain = _timm_vit().train(), _timm_vit().train()
    vit.set_grad_checkpointing(True)
    x = _images(32, 32)
    grads = []
    for model in (vit, plain):
        with TokenTap(model) as tap:
            model(x)
            (maps,) = tap.pop()
            maps.square().mean().backward()
            with pytest.raises(RuntimeError, match="nothing captured"):
                tap.pop()  # the recompute added nothing
        grads.append(model.blocks[0].attn.qkv.weight.grad)
    assert_close(grads[0], grads[1])


# -- transformers --------------------------------------------------------------------------------


def _hf(name: str) -> tuple[nn.Module, int]:
    transformers = pytest.importorskip("transformers")
    common = dict(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
        image_size=32, patch_size=8,
    )  # fmt: skip
    torch.manual_seed(0)
    if name == "ViTModel":
        config = transformers.ViTConfig(**common)
        return transformers.ViTModel(config, add_pooling_layer=False).eval(), 1
    if name == "Dinov2Model":
        return transformers.Dinov2Model(transformers.Dinov2Config(**common)).eval(), 1
    if name == "DINOv3ViTModel":  # RoPE instead of a position embedding; registers by default
        config = transformers.DINOv3ViTConfig(num_register_tokens=4, **common)
        return transformers.DINOv3ViTModel(config).eval(), 1 + 4
    config = transformers.Dinov2WithRegistersConfig(num_register_tokens=4, **common)
    return transformers.Dinov2WithRegistersModel(config).eval(), 1 + 4


@pytest.mark.parametrize(
    "name", ["ViTModel", "Dinov2Model", "Dinov2WithRegistersModel", "DINOv3ViTModel"]
)
def test_transformers_equals_last_hidden_state_before_the_norm(name: str) -> None:
    model, prefix = _hf(name)
    x = _images(32, 48)
    kwargs = {"interpolate_pos_encoding": True} if name == "ViTModel" else {}
    plain = model(pixel_values=x, **kwargs).last_hidden_state
    with TokenTap(model) as tap:
        out = model(pixel_values=x, output_hidden_states=True, **kwargs)
        (maps,) = tap.pop()
    hidden = out.hidden_states[-1]
    # hidden_states[-1] is the last layer's output before the final layernorm:
    norm = model.norm if name == "DINOv3ViTModel" else model.layernorm
    assert_close(norm(hidden), out.last_hidden_state)
    assert torch.equal(out.last_hidden_state, plain)
    assert torch.equal(maps, _grid_maps(hidden, prefix, 4, 6))
    assert (tap.num_prefix_tokens, tap.patch_size, tap.dim, tap.num_heads) == (
        prefix,
        (8, 8),
        32,
        4,
    )


# -- torchvision ---------------------------------------------------------------------------------


def test_torchvision_vit_equals_its_encoder_layers_by_hand() -> None:
    models = pytest.importorskip("torchvision.models")
    torch.manual_seed(0)
    vit = models.VisionTransformer(
        image_size=32, patch_size=8, num_layers=2, num_heads=4, hidden_dim=32, mlp_dim=64
    ).eval()
    x = _images(32, 32)
    plain = vit(x)
    with TokenTap(vit) as tap:
        out = vit(x)
        (maps,) = tap.pop()
        with tap.paused():
            tokens = vit.conv_proj(x).flatten(2).transpose(1, 2)
            tokens = torch.cat([vit.class_token.expand(B, -1, -1), tokens], 1)
            tokens = tokens + vit.encoder.pos_embedding
            for layer in vit.encoder.layers:
                tokens = layer(tokens)
    assert torch.equal(vit.heads(vit.encoder.ln(tokens)[:, 0]), plain)  # the route is the model's
    assert torch.equal(out, plain)
    assert torch.equal(maps, _grid_maps(tokens, 1, 4, 4))
    assert (tap.num_prefix_tokens, tap.dim, tap.num_heads) == (1, 32, 4)


def test_torchvision_resnet_layer4_maps_as_they_are() -> None:
    models = pytest.importorskip("torchvision.models")
    torch.manual_seed(0)
    net = models.ResNet(models.resnet.BasicBlock, [1, 1, 1, 1]).eval()
    x = _images(64, 96)
    plain = net(x)
    with TokenTap(net) as tap:
        out = net(x)
        (maps,) = tap.pop()
        with tap.paused():
            h = net.maxpool(net.relu(net.bn1(net.conv1(x))))
            h = net.layer4(net.layer3(net.layer2(net.layer1(h))))
    assert torch.equal(out, plain)
    assert torch.equal(maps, h)
    assert maps.shape == (B, 512, 2, 3)
    assert (tap.num_prefix_tokens, tap.dim) == (None, 512)


# -- DINO-style ViTs, the multi-crop wrapper, DDP-like wrappers ---------------------------------


def test_dino_style_vit_equals_its_blocks_by_hand() -> None:
    torch.manual_seed(0)
    vit = TinyViT().eval()
    x = _images(12, 20)  # a 3 x 5 grid of 4 px patches
    plain = vit(x)
    with TokenTap(vit) as tap:
        out = vit(x)
        (maps,) = tap.pop()
        with tap.paused():
            tokens = vit.tokens(x)
    assert torch.equal(out, plain)
    assert torch.equal(maps, _grid_maps(tokens, 1, 3, 5))
    assert (tap.num_prefix_tokens, tap.patch_size, tap.dim, tap.num_heads) == (1, (4, 4), 24, 3)


def test_each_map_position_holds_its_own_patch() -> None:
    # Without attention every token depends on its own patch only: map[:, :, i, j] must be the
    # model's output for the 4 x 4 crop of the image at row i, column j (a layout check that
    # does not reshape tokens the way the tap does).
    torch.manual_seed(0)
    vit = TinyViT(mix=False).eval()
    x = _images(12, 20)
    with TokenTap(vit) as tap:
        vit(x)
        (maps,) = tap.pop()
        for i in range(3):
            for j in range(5):
                vit(x[:, :, 4 * i : 4 * i + 4, 4 * j : 4 * j + 4])
                (patch,) = tap.pop()
                assert patch.shape == (B, 24, 1, 1)
                assert_close(maps[:, :, i, j], patch[:, :, 0, 0])


def test_multicrop_wrapper_gives_one_map_per_resolution_in_call_order() -> None:
    torch.manual_seed(0)
    student = MultiCrop(TinyViT(), nn.Linear(24, 5))
    crops = [_images(16, 16, seed=s) for s in (0, 1)] + [_images(8, 8, seed=s) for s in (2, 3, 4)]
    with TokenTap(student) as tap:  # finds student.backbone
        student(crops)
        maps = tap.pop()
        with tap.paused():
            globals_ = student.backbone.tokens(torch.cat(crops[:2]))
            locals_ = student.backbone.tokens(torch.cat(crops[2:]))
    assert [tuple(m.shape) for m in maps] == [(2 * B, 24, 4, 4), (3 * B, 24, 2, 2)]
    assert_close(maps[0], _grid_maps(globals_, 1, 4, 4))
    assert_close(maps[1], _grid_maps(locals_, 1, 2, 2))


def test_sere_step_with_taps_on_student_and_teacher() -> None:
    # A DINO + SERE step as a user writes it: taps on the wrapped student and teacher, maps
    # straight into SERELoss(dim=tap.dim); SERE's gradient reaches the student's blocks.
    torch.manual_seed(0)
    student = MultiCrop(TinyViT(), nn.Linear(24, 5))
    teacher = copy.deepcopy(student).requires_grad_(False)
    crops = [_images(16, 16, seed=s) for s in (0, 1)] + [_images(8, 8, seed=s) for s in (2, 3)]
    boxes = torch.tensor([[0.0, 0.0, 0.8, 0.8], [0.2, 0.1, 1.0, 1.0], [0.1, 0.1, 0.5, 0.5],
                          [0.5, 0.4, 0.9, 0.9]]).expand(B, 4, 4)  # fmt: skip
    flips = torch.tensor([False, True, False, True]).expand(B, 4)
    s_tap, t_tap = TokenTap(student), TokenTap(teacher)
    sere = SERELoss(s_tap.dim, num_heads=s_tap.num_heads)  # type: ignore[arg-type]
    out = student(crops)
    with torch.no_grad():
        teacher(crops[:2])
    s_maps, (t_maps,) = s_tap.pop(), t_tap.pop()
    loss = sere(s_maps[0], t_maps, boxes, flips, s_maps[1]) + 0.0 * out.sum()
    loss.backward()
    grad = student.backbone.blocks[-1].mlp[0].weight.grad
    assert grad is not None
    assert grad.abs().sum() > 0
    assert teacher.backbone.blocks[-1].mlp[0].weight.grad is None
    # The same loss from the tokens by hand (the model's own route).
    with torch.no_grad(), s_tap.paused():
        by_hand = [student.backbone.tokens(torch.cat(c)) for c in (crops[:2], crops[2:])]
        t_hand = teacher.backbone.tokens(torch.cat(crops[:2]))
    sere_twin = SERELoss(24, num_heads=3)
    sere_twin.load_state_dict(sere.state_dict())
    expected = sere_twin(
        _grid_maps(by_hand[0], 1, 4, 4), _grid_maps(t_hand, 1, 4, 4), boxes, flips,
        _grid_maps(by_hand[1], 1, 2, 2),
    )  # fmt: skip
    assert_close(loss.detach(), expected)
    s_tap.remove()
    t_tap.remove()
    assert _no_hooks(student)
    assert _no_hooks(teacher)


@pytest.mark.parametrize("mode", ["reentrant", "non_reentrant"])
def test_checkpointing_per_block_keeps_the_gradient(mode: str) -> None:
    # The backward recomputes the blocks and fires their hooks again: ignored. Reentrant
    # checkpointing runs the forward without autograd, but the tapped block ends its segment,
    # so autograd attaches the graph to the captured output: the gradients equal a plain run.
    torch.manual_seed(0)
    checkpointed = TinyViT(checkpoint=mode).train()
    plain = copy.deepcopy(checkpointed)
    plain.checkpoint = None
    x = _images(16, 16).requires_grad_()  # reentrant checkpointing needs an input with grad
    grads = []
    for model in (checkpointed, plain):
        with TokenTap(model) as tap, warnings.catch_warnings():
            warnings.simplefilter("error")
            model(x)
            (maps,) = tap.pop()
            maps.square().mean().backward()
            with pytest.raises(RuntimeError, match="nothing captured"):
                tap.pop()  # the recompute added nothing
        grads.append([p.grad for p in model.blocks.parameters()])
    for a, b in zip(*grads, strict=True):
        assert_close(a, b)


def test_a_layer_inside_a_reentrant_segment_warns_that_tokens_carry_no_gradient() -> None:
    torch.manual_seed(0)
    vit = TinyViT(checkpoint="reentrant_segment").train()
    x = _images(16, 16).requires_grad_()
    with TokenTap(vit, layer=vit.blocks[0]) as tap:
        vit(x)
        with pytest.warns(UserWarning, match="these tokens carry no gradient"):
            (maps,) = tap.pop()
        assert not maps.requires_grad
    with TokenTap(vit) as tap, warnings.catch_warnings():  # the last block ends the segment
        warnings.simplefilter("error")
        vit(x)
        assert tap.pop()[0].requires_grad


@pytest.mark.parametrize("chunks", [0, 2], ids=["blocks", "block chunks"])
def test_a_list_call_gives_one_map_per_element_on_its_own_grid(chunks: int) -> None:
    # DINOv2's student: the backbone takes [globals, locals], embeds each in turn, and every
    # block runs once on the list of their tokens. The maps must be each element's tokens as a
    # call of its own gives them, each on the grid of its own images, registers dropped.
    torch.manual_seed(0)
    vit = TinyViT(depth=4, registers=4, nested=True, chunks=chunks).eval()
    globals_, locals_ = _images(16, 24, n=2 * B), _images(8, 12, n=3 * B, seed=1)
    with TokenTap(vit) as tap:
        out = vit([globals_, locals_])
        vit(globals_)  # the teacher's kind of call, on the same tap: one map more
        maps = tap.pop()
        with tap.paused():
            expected = [vit.tokens(globals_), vit.tokens(locals_)]
    assert isinstance(tap.layer, BlockChunk if chunks else nn.Module)
    assert (tap.num_prefix_tokens, tap.dim, tap.num_heads) == (5, 24, 3)
    assert [tuple(m.shape) for m in maps] == [(2 * B, 24, 4, 6), (3 * B, 24, 2, 3)] * 1 + [
        (2 * B, 24, 4, 6)
    ]
    assert_close(maps[0], _grid_maps(expected[0], 5, 4, 6))
    assert_close(maps[1], _grid_maps(expected[1], 5, 2, 3))
    assert_close(maps[2], maps[0])
    assert_close(out[1], vit.norm(expected[1])[:, 0])  # the list route is the model's own


def test_tap_through_a_wrapper_with_module() -> None:
    # What DDP looks like to the tap: a wrapper whose .module is the model.
    class Wrapper(nn.Module):
        def __init__(self, module: nn.Module) -> None:
            super().__init__()
            self.module = module

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.module(x)  # type: ignore[no-any-return]

    torch.manual_seed(0)
    vit = TinyViT().eval()
    with TokenTap(Wrapper(vit)) as tap:
        Wrapper(vit)(_images(8, 8))
        (maps,) = tap.pop()
    assert maps.shape == (B, 24, 2, 2)
    assert tap.layer is vit.blocks[-1]


# -- layer= and errors ---------------------------------------------------------------------------


class _Plain(nn.Module):
    """No known family: a conv stem, then two token mixers, then a mean."""

    def __init__(self, prefix: int = 0) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 4, stride=4)
        self.prefix = prefix
        self.mixers = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = self.stem(x).flatten(2).transpose(1, 2)
        t = torch.cat([torch.zeros(t.shape[0], self.prefix, 8), t], 1)
        return self.mixers(t).mean(1)


def test_any_model_through_layer() -> None:
    torch.manual_seed(0)
    model = _Plain()
    x = _images(8, 16)
    with TokenTap(model, "mixers.1", num_prefix_tokens=0) as tap:  # patch size inferred: 4
        model(x)
        (maps,) = tap.pop()
        with tap.paused():
            tokens = model.mixers(model.stem(x).flatten(2).transpose(1, 2))
    assert torch.equal(maps, _grid_maps(tokens, 0, 2, 4))
    assert tap.patch_size is None  # nothing on the model says it
    other = _Plain(prefix=2)
    with TokenTap(other, other.mixers, num_prefix_tokens=2, patch_size=4) as tap:
        other(x)
        (maps,) = tap.pop()
    assert tap.patch_size == (4, 4)
    assert maps.shape == (B, 8, 2, 4)


def test_a_known_backbone_lends_its_settings_to_layer() -> None:
    torch.manual_seed(0)
    vit = TinyViT(depth=3).eval()
    x = _images(8, 12)
    with TokenTap(vit, layer=vit.blocks[1]) as tap:
        vit(x)
        (maps,) = tap.pop()
        with tap.paused():
            t = vit.patch_embed(x)
            t = torch.cat([vit.cls_token.expand(B, -1, -1), t], 1)
            t = vit.blocks[1](vit.blocks[0](t))
    assert torch.equal(maps, _grid_maps(t, 1, 2, 3))


ERRORS = [
    (
        "unknown model",
        ValueError,
        r"TokenTap found no backbone it knows in _Plain; it knows timm VisionTransformer.*Pass "
        r"layer=",
        lambda: TokenTap(_Plain()),
    ),
    (
        "two backbones",
        ValueError,
        r"TokenTap found several backbones in ModuleDict \('student', 'teacher'\): tap the one",
        lambda: TokenTap(nn.ModuleDict({"student": TinyViT(), "teacher": TinyViT()})),
    ),
    (
        "layer not in the model",
        ValueError,
        r"layer \(Linear\) is not a submodule of the model",
        lambda: TokenTap(TinyViT(), layer=nn.Linear(2, 2)),
    ),
    (
        "layer name",
        ValueError,
        r"layer 'blocks.7' is not a submodule of the model",
        lambda: TokenTap(TinyViT(), layer="blocks.7"),
    ),
    ("model type", TypeError, r"model must be a torch.nn.Module, got str", lambda: TokenTap("vit")),
    (
        "prefix negative",
        ValueError,
        r"num_prefix_tokens must be >= 0",
        lambda: TokenTap(TinyViT(), num_prefix_tokens=-1),
    ),
]


@pytest.mark.parametrize(
    ("exc", "pattern", "call"), [e[1:] for e in ERRORS], ids=[e[0] for e in ERRORS]
)
def test_bad_construction_raises_a_clear_error(exc: type[Exception], pattern: str, call) -> None:
    with pytest.raises(exc, match=pattern):
        call()


def test_pop_errors_say_what_is_missing() -> None:
    torch.manual_seed(0)
    vit = TinyViT()
    tap = TokenTap(vit)
    with pytest.raises(RuntimeError, match=r"nothing captured since the last pop\. Run the model"):
        tap.pop()
    tap.remove()
    vit(_images(8, 8))
    with pytest.raises(RuntimeError, match="and it was removed"):
        tap.pop()
    assert _no_hooks(vit)
    # The wrong prefix: 1 CLS + 4 patches read with 2 prefix tokens leaves 3, not a 2 x 2 grid.
    with TokenTap(vit, num_prefix_tokens=2) as tap:
        vit(_images(8, 8))
        with pytest.raises(ValueError, match=re.escape(
            "output 0 of the tapped Block has 3 patch tokens (5 minus 2 prefix), but images of "
            "(8, 8) with patches of (4, 4) make a 2 x 2 grid of 4. With num_prefix_tokens=1 they "
            "would fit"
        )):  # fmt: skip
            tap.pop()
    # No prefix count fits: a patch size that is not the model's.
    with TokenTap(vit, patch_size=2) as tap:
        vit(_images(8, 8))
        with pytest.raises(ValueError, match=re.escape(
            "has 4 patch tokens (5 minus 1 prefix), but images of (8, 8) with patches of (2, 2) "
            "make a 4 x 4 grid of 16: set num_prefix_tokens= and patch_size= to the model's"
        )):  # fmt: skip
            tap.pop()
    # Tokens without a prefix count the tap can read.
    with TokenTap(_Plain(prefix=1), layer="mixers.1") as tap:
        tap._backbone.model(_images(8, 8))
        with pytest.raises(
            ValueError, match=r"cannot tell how many prefix tokens.*pass num_prefix"
        ):
            tap.pop()


def test_paused_and_piling_up() -> None:
    torch.manual_seed(0)
    model = _Plain().eval()
    x = _images(4, 4, n=1)
    with TokenTap(model, "mixers.1", num_prefix_tokens=0) as tap, torch.no_grad():
        with tap.paused():
            model(x)
        with pytest.raises(RuntimeError, match="nothing captured"):
            tap.pop()
        for _ in range(63):
            model(x)
        with pytest.warns(UserWarning, match="TokenTap holds 64 captured outputs"):
            model(x)
        assert len(tap.pop()) == 64


def test_an_image_not_a_multiple_of_the_patch_warns_once() -> None:
    # 14 px rows with 4 px patches: the patch embedding keeps 3 rows of tokens (12 px), but a
    # crop box spans all 14 px, so the lattice would read up to 2/14 of the view off.
    vit = TinyViT().eval()
    with TokenTap(vit) as tap:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            vit(_images(12, 20))
            (exact,) = tap.pop()  # a multiple of the patch: silent
        vit(_images(14, 20))
        with pytest.warns(UserWarning, match=r"covers only 12 x 20 px .* up to 14% of the view"):
            (cut,) = tap.pop()
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            vit(_images(14, 20))
            tap.pop()  # once per image size
    assert exact.shape[-2:] == cut.shape[-2:] == (3, 5)


class _EmbedsAnother(TinyViT):
    """Embeds a second batch of images after its own and drops it: the tap sees both sizes."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        tokens = self.embed(x)
        self.patch_embed(x[..., :4, :4])  # a 1 x 1 grid, as a model's auxiliary input might be
        for block in self.blocks:
            tokens = block(tokens)
        return self.norm(tokens)[:, 0]


class _ListOut(nn.Module):
    """A layer that takes a list of token tensors: concatenates them, or splits one in two."""

    def __init__(self, split: bool) -> None:
        super().__init__()
        self.split = split
        self.mix = nn.Linear(24, 24)

    def forward(self, x: list[torch.Tensor]) -> object:
        if self.split:
            return list(self.mix(x[0]).chunk(2))
        return self.mix(torch.cat(x))


def test_list_call_errors_name_the_cause() -> None:
    torch.manual_seed(0)
    vit = TinyViT(nested=True).eval()
    layer = _ListOut(split=True)
    vit.add_module("extra", layer)  # a layer of the model, after the embedding
    with TokenTap(vit, layer=layer) as tap:
        tokens = vit.embed(_images(8, 8, n=2 * B))
        layer([tokens])  # one image tensor embedded, a list of one in, a list of two out
        with pytest.raises(ValueError, match=re.escape(
            "output 0 of the tapped _ListOut (element 0 of a list call of 2) took a list of 1 "
            "token tensors and returned 2 items; TokenTap pairs each element of the output with "
            "the element of the input at its place"
        )):  # fmt: skip
            tap.pop()
    with TokenTap(vit, layer=vit.blocks[-1]) as tap:
        tokens = vit.embed(_images(8, 8))
        vit.blocks[-1]([tokens, tokens.clone()])  # two elements, one image batch embedded
        with pytest.raises(ValueError, match=re.escape(
            "took a list of 2 token tensors, but 1 image tensor(s) entered the model since the "
            "previous output ((8, 8)): each element needs the image size of its own call"
        )):  # fmt: skip
            tap.pop()
    # A layer given a list that returns one tensor is read as one output, as before list calls
    layer.split = False
    with TokenTap(vit, layer=layer) as tap:
        tokens = vit.embed(_images(8, 8))
        out = layer([tokens])
        (maps,) = tap.pop()
    assert torch.equal(maps, _grid_maps(out, 1, 2, 2))


def test_tokens_paired_with_another_images_size_say_so() -> None:
    torch.manual_seed(0)
    vit = _EmbedsAnother().eval()
    with TokenTap(vit) as tap:
        vit(_images(8, 12))
        with pytest.raises(ValueError, match=re.escape(
            "has 6 patch tokens (7 minus 1 prefix), but images of (4, 4) with patches of (4, 4) "
            "make a 1 x 1 grid of 1. They fit the images of (8, 12), which also entered the "
            "model since the previous output"
        )):  # fmt: skip
            tap.pop()
