"""Patch tokens out of a backbone without editing it: forward hooks on its last block.

SERE reads the patch tokens of the backbone's last block, before the final norm, as the
authors' code does. Most models return only the pooled or CLS output, so ``TokenTap`` hooks the
last block of the model and hands its output over as feature maps ``(B, C, H, W)``, which the
losses take as they are. Families are recognised by their structure, without importing their
libraries.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from types import TracebackType
from typing import Any, TypeGuard

import torch
from einops import rearrange
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from ._checks import check_int, check_size

__all__ = ["TokenTap"]

# A tap that nobody pops grows without bound; say so once it holds this many outputs.
_PILE_UP = 64

Grid = Callable[[tuple[int, int]], tuple[int, int]]
Size = tuple[int, int]


@dataclass(frozen=True)
class _Output:
    """One output of the tapped layer as captured: its tokens and the image size they belong to.

    A list call (DINOv2's ``NestedTensorBlock`` given ``[globals, locals]``) gives one ``_Output``
    per element, ``part`` ``(j, n)``: element ``j`` of ``n``.
    """

    tokens: object
    hw: Size | None  # None when no image size can be paired with it (``problem`` says why)
    suspect: bool  # a training layer run without autograd: pop() checks the tokens' graph
    seen: tuple[Size, ...]  # the image sizes that entered the model since the previous output
    part: tuple[int, int] | None = None
    problem: str | None = None


@dataclass(frozen=True)
class _Backbone:
    """What TokenTap needs to know of a model: where to hook and how to read the output."""

    family: str
    model: nn.Module  # the backbone
    layer: nn.Module  # its last block: the output captured
    entry: nn.Module  # the module that takes the images (its input gives the image size)
    num_prefix_tokens: int | None  # None for CNN feature maps
    patch_size: tuple[int, int] | None
    dim: int | None
    num_heads: int | None
    grid: Grid | None = None  # image size -> token grid, where the model says it


def _pair(value: object) -> tuple[int, int] | None:
    if isinstance(value, int) and not isinstance(value, bool):
        return value, value
    if (
        isinstance(value, (tuple, list))
        and len(value) == 2
        and all(isinstance(v, int) for v in value)
    ):
        return int(value[0]), int(value[1])
    return None


def _get(module: nn.Module, path: str) -> Any:
    """``module.a.b`` for ``path="a.b"``, or ``None``."""
    obj: Any = module
    for name in path.split("."):
        obj = getattr(obj, name, None)
        if obj is None:
            return None
    return obj


def _blocks(module: nn.Module, *paths: str) -> nn.Module | None:
    """The last module of the first non-empty ``ModuleList``/``Sequential`` among ``paths``.

    A block that FSDP wrapped on its own is taken out of its wrapper: the same output.
    """
    for path in paths:
        blocks = _get(module, path)
        if isinstance(blocks, (nn.ModuleList, nn.Sequential)) and len(blocks) > 0:
            block: nn.Module = blocks[-1]
            while _is_wrapper(block):
                block = block.get_submodule("_fsdp_wrapped_module")
            return block
    return None


def _int(value: object) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _class_name(m: nn.Module) -> str:
    """The model's class name; under ``fully_shard`` (``FSDPName``) that of the class it shards."""
    cls = type(m)
    for base in cls.__bases__:
        if cls.__name__ == f"FSDP{base.__name__}":
            return base.__name__
    return cls.__name__


def _is_wrapper(m: nn.Module) -> bool:
    """The classic ``FullyShardedDataParallel`` wrapper, which forwards attribute reads inward."""
    return "_fsdp_wrapped_module" in m._modules


def _heads_of(block: nn.Module) -> int | None:
    return _int(_get(block, "attn.num_heads")) or _int(getattr(block, "num_heads", None))


def _hf(m: nn.Module) -> _Backbone | None:
    """HF transformers ViT-like models: ViTModel, Dinov2Model (registers too), DINOv3ViTModel.

    DINOv3 puts CLS then the registers before the patches, as Dinov2WithRegisters does, and
    its RoPE keeps the patches row-major over the grid ``image size // patch size``.
    """
    config = getattr(m, "config", None)
    embeddings = getattr(m, "embeddings", None)
    patch = _pair(getattr(config, "patch_size", None))
    # transformers 5 keeps ViTModel's blocks in .layers, 4.x and Dinov2 in .encoder.layer,
    # DINOv3ViTModel in .model.layer.
    layer = _blocks(m, "encoder.layer", "encoder.layers", "model.layer", "layers", "layer")
    if config is None or not isinstance(embeddings, nn.Module) or patch is None or layer is None:
        return None
    has_cls = getattr(embeddings, "cls_token", None) is not None
    registers = _int(getattr(config, "num_register_tokens", 0)) or 0
    return _Backbone(
        family=f"transformers {_class_name(m)}",
        model=m,
        layer=layer,
        entry=embeddings,
        num_prefix_tokens=int(has_cls) + registers,
        patch_size=patch,
        dim=_int(getattr(config, "hidden_size", None)),
        num_heads=_int(getattr(config, "num_attention_heads", None)),
    )


def _timm(m: nn.Module) -> _Backbone | None:
    """ViTs of timm: ``blocks``, ``patch_embed`` and ``num_prefix_tokens`` (CLS and registers)."""
    embed = getattr(m, "patch_embed", None)
    prefix = _int(getattr(m, "num_prefix_tokens", None))
    layer = _blocks(m, "blocks")
    patch = _pair(getattr(embed, "patch_size", None))
    if not isinstance(embed, nn.Module) or prefix is None or layer is None or patch is None:
        return None
    feat_size = getattr(embed, "dynamic_feat_size", None)  # honours timm's dynamic_img_pad

    def grid(hw: tuple[int, int]) -> tuple[int, int]:
        if callable(feat_size):
            h, w = feat_size(hw)
            return int(h), int(w)
        return hw[0] // patch[0], hw[1] // patch[1]

    return _Backbone(
        family=f"timm {_class_name(m)}",
        model=m,
        layer=layer,
        entry=embed,
        num_prefix_tokens=prefix,
        patch_size=patch,
        dim=_int(getattr(m, "embed_dim", None)),
        num_heads=_heads_of(layer),
        grid=grid,
    )


def _dino(m: nn.Module) -> _Backbone | None:
    """DINO/iBOT-style ViTs: ``blocks``, ``patch_embed.patch_size`` and a ``cls_token``."""
    embed = getattr(m, "patch_embed", None)
    layer = _blocks(m, "blocks")
    patch = _pair(getattr(embed, "patch_size", None))
    if not isinstance(embed, nn.Module) or layer is None or patch is None:
        return None
    if not isinstance(getattr(m, "cls_token", None), Tensor):
        return None
    registers = _int(getattr(m, "num_register_tokens", 0)) or 0  # DINOv2's own ViT has them
    return _Backbone(
        family=f"DINO-style {_class_name(m)}",
        model=m,
        layer=layer,
        entry=embed,
        num_prefix_tokens=1 + registers,
        patch_size=patch,
        dim=_int(getattr(m, "embed_dim", None)),
        # DINOv2's last block may be a chunk of blocks (a ModuleList): the model says its heads.
        num_heads=_heads_of(layer) or _int(getattr(m, "num_heads", None)),
    )


def _torchvision_vit(m: nn.Module) -> _Backbone | None:
    """The ``VisionTransformer`` of torchvision: ``encoder.layers``, ``conv_proj``, class token."""
    layer = _blocks(m, "encoder.layers")
    entry = getattr(m, "conv_proj", None)
    patch = _pair(getattr(m, "patch_size", None))
    if layer is None or not isinstance(entry, nn.Module) or patch is None:
        return None
    if not isinstance(getattr(m, "class_token", None), Tensor):
        return None
    return _Backbone(
        family=f"torchvision {_class_name(m)}",
        model=m,
        layer=layer,
        entry=entry,
        num_prefix_tokens=1,
        patch_size=patch,
        dim=_int(getattr(m, "hidden_dim", None)),
        num_heads=_heads_of(layer),
    )


def _resnet(m: nn.Module) -> _Backbone | None:
    """ResNets of torchvision: the maps of ``layer4`` (``conv1`` ... ``layer4``, ``fc``)."""
    layer = getattr(m, "layer4", None)
    entry = getattr(m, "conv1", None)
    if not isinstance(layer, nn.Module) or not isinstance(entry, nn.Module):
        return None
    if not isinstance(getattr(m, "fc", None), nn.Module):
        return None
    norms = [n for n in layer.modules() if isinstance(n, nn.BatchNorm2d)]
    return _Backbone(
        family=f"torchvision {_class_name(m)}",
        model=m,
        layer=layer,
        entry=entry,
        num_prefix_tokens=None,
        patch_size=None,
        dim=norms[-1].num_features if norms else None,
        num_heads=None,
    )


_FAMILIES = (_hf, _timm, _dino, _torchvision_vit, _resnet)
_KNOWN = (
    "timm VisionTransformer (registers too), transformers ViTModel / Dinov2Model / "
    "Dinov2WithRegistersModel / DINOv3ViTModel, torchvision VisionTransformer and ResNet, "
    "DINO/iBOT/DINOv2-style ViTs (.blocks, .patch_embed, .cls_token)"
)


def _backbones(model: nn.Module) -> list[tuple[str, _Backbone]]:
    """Every known backbone in ``model``, outermost first, none inside another."""
    found: list[tuple[str, _Backbone]] = []
    inside: list[str] = []  # name prefixes of the modules inside a backbone found
    for name, module in model.named_modules():
        if any(name.startswith(prefix) for prefix in inside) or _is_wrapper(module):
            continue
        for family in _FAMILIES:
            backbone = family(module)
            if backbone is not None:
                found.append((name, backbone))
                inside.append(f"{name}." if name else "")
                break
    return found


def _infer_prefix(model: nn.Module) -> int | None:
    """Prefix tokens as the model declares them, for a ``layer=`` outside known families."""
    for m in (model, getattr(model, "module", None)):
        if m is None:
            continue
        prefix = _int(getattr(m, "num_prefix_tokens", None))
        if prefix is not None:
            return prefix
        config = getattr(m, "config", None)
        if (
            config is not None
            and getattr(getattr(m, "embeddings", None), "cls_token", None) is not None
        ):
            return 1 + (_int(getattr(config, "num_register_tokens", 0)) or 0)
        if isinstance(getattr(m, "cls_token", None), Tensor) or isinstance(
            getattr(m, "class_token", None), Tensor
        ):
            return 1 + (_int(getattr(m, "num_register_tokens", 0)) or 0)
    return None


def _infer_patch(model: nn.Module) -> tuple[int, int] | None:
    for path in ("patch_embed.patch_size", "config.patch_size", "patch_size"):
        patch = _pair(_get(model, path))
        if patch is not None:
            return patch
    return None


def _image_size(args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[int, int] | None:
    """``(H, W)`` of the images a forward gets: ``pixel_values=``, or its first tensor."""
    images = kwargs.get("pixel_values")
    if not isinstance(images, Tensor):
        images = next((a for a in args if isinstance(a, Tensor)), None)
    if not isinstance(images, Tensor):
        images = next((v for v in kwargs.values() if isinstance(v, Tensor)), None)
    if isinstance(images, Tensor) and images.ndim >= 3:
        return int(images.shape[-2]), int(images.shape[-1])
    return None


def _is_token_list(value: object) -> TypeGuard[list[Tensor] | tuple[Tensor, ...]]:
    """A list or tuple of token tensors ``(B, T, C)``: the input of a list call."""
    return (
        isinstance(value, (list, tuple))
        and len(value) > 0
        and all(isinstance(v, Tensor) and v.ndim == 3 for v in value)
    )


def _split_list_call(
    count: int, output: list[Any] | tuple[Any, ...], seen: list[Size | None], suspect: bool
) -> list[_Output]:
    """The outputs of a layer called with a list of ``count`` token tensors, one per element.

    DINOv2's ``NestedTensorBlock`` takes ``[globals, locals]`` and returns a list in the same
    order; the model embedded each element's images in that order before, so element ``j`` gets
    the ``j``-th of the last ``count`` image sizes seen. What cannot be paired is kept with its
    reason, for ``pop`` to raise.
    """
    sizes = tuple(hw for hw in seen if hw is not None)
    elements = list(output)
    problem = None
    if len(elements) != count:
        problem = (
            f"took a list of {count} token tensors and returned {len(elements)} items; TokenTap "
            "pairs each element of the output with the element of the input at its place. Tap "
            "a layer that returns one tensor per input element (layer=)"
        )
    elif len(seen) < count or any(hw is None for hw in seen[-count:]):
        problem = (
            f"took a list of {count} token tensors, but {len(sizes)} image tensor(s) entered the "
            f"model since the previous output ({', '.join(map(str, sizes)) or 'none'}): each "
            "element needs the image size of its own call of the module that takes the images"
        )
    hws = [None] * len(elements) if problem else seen[-count:]
    return [
        _Output(tokens, hw, suspect, sizes, (j, len(elements)), problem)
        for j, (tokens, hw) in enumerate(zip(elements, hws, strict=True))
    ]


def _in_backward() -> bool:
    """Whether autograd is running a backward pass: a forward now is a checkpoint's recompute."""
    return bool(torch._C._current_graph_task_id() != -1)


class TokenTap:
    """Capture a backbone's patch tokens on every forward, without editing the model.

    Registers a forward hook on the last transformer block (its output: the patch tokens before
    the final norm, as SERE uses them) and a forward pre-hook on the module that takes the
    images (its input gives each forward's token grid). ``pop`` returns the outputs of every
    forward since the last pop, in call order, each as a feature map ``(B, C, H, W)``: prefix
    tokens (CLS, registers) dropped by reading the model's own settings, the rest laid out on
    the grid ``image size // patch size``. CNN maps (a ResNet's ``layer4``) come as they are.
    The maps go straight into the losses, which take ``(B, C, H, W)``.

    Found automatically (the model may also be a DDP or FSDP wrapper, a model under
    ``fully_shard``, or any module that holds exactly one of them, such as DINO's
    ``MultiCropWrapper``):

    - timm ``VisionTransformer`` and variants with register tokens: ``blocks[-1]``, prefix
      ``num_prefix_tokens``;
    - transformers ``ViTModel``, ``Dinov2Model``, ``Dinov2WithRegistersModel``,
      ``DINOv3ViTModel``: the last encoder layer (``hidden_states[-1]``), prefix
      ``1 + config.num_register_tokens``;
    - torchvision ``VisionTransformer``: ``encoder.layers[-1]``, prefix 1 (the class token);
    - DINO/iBOT-style ViTs (``blocks``, ``patch_embed.patch_size``, ``cls_token``):
      ``blocks[-1]``, prefix 1 (plus ``num_register_tokens`` where the model has it, as
      DINOv2's own ``DinoVisionTransformer`` does);
    - torchvision ResNets: ``layer4``, maps as they are;
    - anything else through ``layer=``, with ``num_prefix_tokens`` and ``patch_size`` given or
      read off the model (``num_prefix_tokens``, ``cls_token``, ``patch_embed.patch_size``,
      ``config``); without a patch size the grid follows from the token count and image size.

    List calls: a layer called with a list of token tensors (DINOv2's ``NestedTensorBlock``,
    which its student runs on ``[globals, locals]`` at once) gives one map per element, in the
    list's order, each on the grid of its own images: the model embeds the images of each
    element in that order before the blocks run, and the tap pairs them so.

    The hooks do not change the model's outputs, and the captured tokens keep their autograd
    graph: SERE's gradients reach the backbone through them. Under autocast they come in the
    dtype the block gives (timm keeps its residual stream in float32, for one); the losses
    compute in float32 either way. Outside autocast they come in the parameters' dtype: FSDP's
    ``MixedPrecision(param_dtype=torch.float16)`` gives float16 tokens, which the losses take
    only under autocast (cast them with ``.float()``). With DDP or FSDP, tap the wrapper or its
    module, before or after wrapping.

    Activation checkpointing: the backward's recompute runs the blocks again; the tap ignores
    those calls (it captures in the forward only). Non-reentrant checkpointing
    (``use_reentrant=False``, timm's default) works. Reentrant checkpointing runs the forward
    without autograd; it works when the tapped layer ends a checkpointed segment (checkpointing
    per block, as timm and transformers do), because autograd then attaches the graph to the
    layer's output. A layer inside a longer segment gives tokens without gradient, and
    ``pop`` warns once (as it does for a training block with trainable parameters run under
    ``torch.no_grad``).

    Pop every step: captured outputs are held until then (a warning comes when 64 pile up). In
    loops that need no tokens (evaluation), use ``with tap.paused():`` or ``remove``.

    Args:
        model: the backbone, or a module (DDP, a wrapper) holding one.
        layer: the module whose output to capture, or its name in ``model``
            (``model.get_submodule``); ``None`` to find the last block.
        num_prefix_tokens: leading tokens to drop from ViT tokens; ``None`` to read it off the
            model.
        patch_size: the patch size, an int or ``(h, w)``; ``None`` to read it off the model.

    Attributes:
        dim (int | None): the channel count of the tokens where the model says it
            (``SERELoss(tap.dim)``): 384 for a ViT-S, 2048 for a ResNet-50; ``None`` otherwise.
        num_heads (int | None): the attention heads of the tapped block where the model says
            them (6 for a ViT-S); ``None`` for CNNs.
        num_prefix_tokens (int | None): the prefix tokens dropped (1 for CLS, 5 with 4
            registers), ``None`` for CNN maps.
        patch_size (tuple[int, int] | None): ``(h, w)``, or ``None`` where unknown.
        layer (nn.Module): the hooked module.
        family (str): what the model was recognised as (``"timm VisionTransformer"``, ...).

    Examples:
        >>> import torch.nn as nn
        >>> class ViT(nn.Module):  # the DINO style: patch_embed, cls_token, blocks, norm
        ...     def __init__(self) -> None:
        ...         super().__init__()
        ...         self.patch_embed = nn.Conv2d(3, 8, 4, stride=4)
        ...         self.patch_embed.patch_size = 4
        ...         self.cls_token = nn.Parameter(torch.zeros(1, 1, 8))
        ...         self.blocks = nn.ModuleList([nn.Linear(8, 8), nn.Linear(8, 8)])
        ...         self.norm = nn.LayerNorm(8)
        ...     def forward(self, x: torch.Tensor) -> torch.Tensor:
        ...         x = self.patch_embed(x).flatten(2).transpose(1, 2)
        ...         x = torch.cat([self.cls_token.expand(len(x), -1, -1), x], 1)
        ...         for block in self.blocks:
        ...             x = block(x)
        ...         return self.norm(x)[:, 0]
        >>> vit = ViT()
        >>> with TokenTap(vit) as tap:
        ...     cls = vit(torch.randn(2, 3, 16, 24)), vit(torch.randn(2, 3, 8, 8))
        ...     [tuple(m.shape) for m in tap.pop()]
        [(2, 8, 4, 6), (2, 8, 2, 2)]
    """

    def __init__(
        self,
        model: nn.Module,
        layer: nn.Module | str | None = None,
        *,
        num_prefix_tokens: int | None = None,
        patch_size: int | tuple[int, int] | None = None,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        prefix = (
            None
            if num_prefix_tokens is None
            else check_int(num_prefix_tokens, "num_prefix_tokens", 0)
        )
        patch = None if patch_size is None else check_size(patch_size, "patch_size")
        backbone = self._resolve(model, layer)
        if prefix is not None:
            backbone = replace(backbone, num_prefix_tokens=prefix)
        if patch is not None:
            backbone = replace(backbone, patch_size=patch, grid=None)
        self._backbone = backbone
        self.family = backbone.family
        self.layer = backbone.layer
        self.dim = backbone.dim
        self.num_heads = backbone.num_heads
        self.num_prefix_tokens = backbone.num_prefix_tokens
        self.patch_size = backbone.patch_size
        self._captured: list[_Output] = []
        self._seen: list[Size | None] = []  # image sizes entering the model since the last output
        self._last_hw: Size | None = None  # for a layer called again with no new image
        self._enabled = True
        self._warned: set[str] = set()
        self._handles: list[RemovableHandle] = [
            backbone.entry.register_forward_pre_hook(self._see_images, with_kwargs=True),
            backbone.layer.register_forward_hook(self._capture, with_kwargs=True),
        ]

    @staticmethod
    def _resolve(model: nn.Module, layer: nn.Module | str | None) -> _Backbone:
        found = _backbones(model)
        if layer is None:
            if not found:
                raise ValueError(
                    f"TokenTap found no backbone it knows in {type(model).__name__}; it knows "
                    f"{_KNOWN}. Pass layer= (the module whose output are the tokens)"
                )
            if len(found) > 1:
                names = ", ".join(repr(name) for name, _ in found)
                raise ValueError(
                    f"TokenTap found several backbones in {type(model).__name__} ({names}): tap "
                    "the one whose tokens you want, e.g. TokenTap(model.student)"
                )
            return found[0][1]
        if isinstance(layer, str):
            try:
                layer = model.get_submodule(layer)
            except AttributeError as error:
                raise ValueError(
                    f"layer {layer!r} is not a submodule of the model: {error}"
                ) from None
        if not isinstance(layer, nn.Module):
            raise TypeError(f"layer must be a module, its name or None, got {type(layer).__name__}")
        if not any(m is layer for m in model.modules()):
            raise ValueError(f"layer ({type(layer).__name__}) is not a submodule of the model")
        for _, backbone in found:  # a known backbone holding the layer lends it its settings
            if any(m is layer for m in backbone.model.modules()):
                cnn = backbone.num_prefix_tokens is None  # another stage: another width
                return replace(
                    backbone,
                    layer=layer,
                    family=f"{backbone.family}, layer=",
                    dim=None if cnn else backbone.dim,
                    num_heads=None if cnn else _heads_of(layer) or backbone.num_heads,
                )
        return _Backbone(
            family=f"{type(model).__name__}, layer=",
            model=model,
            layer=layer,
            entry=model,
            num_prefix_tokens=_infer_prefix(model),
            patch_size=_infer_patch(model),
            dim=None,
            num_heads=None,
        )

    # -- hooks ---------------------------------------------------------------------------------

    def _see_images(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        if self._enabled and not _in_backward():
            self._seen.append(_image_size(args, kwargs))

    def _capture(
        self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any
    ) -> None:
        if not self._enabled or _in_backward():  # a checkpoint's recompute: seen in the forward
            return
        # A training block whose parameters want gradients, run without autograd: a student
        # under torch.no_grad, or reentrant checkpointing. If the block ends the checkpointed
        # segment, autograd attaches the graph to this very tensor once the segment returns;
        # pop() looks again and warns only if it never got one.
        suspect = (
            module.training
            and not torch.is_grad_enabled()
            and any(p.requires_grad for p in module.parameters())
        )
        seen, self._seen = self._seen, []
        first = args[0] if args else next(iter(kwargs.values()), None)
        if _is_token_list(first) and isinstance(output, (list, tuple)):
            self._captured += _split_list_call(len(first), output, seen, suspect)
        else:  # one tensor of tokens, or a tuple that starts with them (HF's layers in 4.x)
            tokens = output[0] if isinstance(output, (tuple, list)) and output else output
            if seen:
                self._last_hw = seen[-1]
            sizes = tuple(hw for hw in seen if hw is not None)
            self._captured.append(_Output(tokens, self._last_hw, suspect, sizes))
        if len(self._captured) >= _PILE_UP:
            self._warn_once(
                "pile",
                f"TokenTap holds {_PILE_UP} captured outputs that were never popped: call "
                "tap.pop() every step, and wrap forwards that need no tokens in "
                "`with tap.paused():`",
            )

    def _warn_once(self, key: str, message: str, stacklevel: int = 3) -> None:
        if key not in self._warned:
            self._warned.add(key)
            warnings.warn(message, UserWarning, stacklevel=stacklevel + 1)

    # -- public --------------------------------------------------------------------------------

    def pop(self) -> list[Tensor]:
        """The tokens of every forward since the last pop, in call order, and forget them.

        Returns:
            A list of feature maps ``(B, C, H, W)``, one per forward of the tapped layer and
            per element of a list call, in call order: for DINO's multi-crop wrapper, which
            calls a ViT-S/16 once per resolution, ``[(2B, 384, 14, 14), (4B, 384, 6, 6)]``.

        Raises:
            RuntimeError: nothing was captured since the last pop.
            ValueError: an output that cannot be laid out on its token grid (the message says
                why: the prefix or patch it would need, or the images it was paired with).
        """
        if not self._captured:
            raise RuntimeError(
                f"TokenTap.pop(): nothing captured since the last pop. Run the model's forward "
                f"first; the tap listens to {type(self.layer).__name__} of {self.family}"
                + ("" if self._handles else ", and it was removed")
            )
        captured, self._captured = self._captured, []
        if any(o.suspect and not getattr(o.tokens, "requires_grad", True) for o in captured):
            self._warn_once(
                "no_grad",
                f"TokenTap: the tapped {type(self.layer).__name__} ran without autograd although "
                "its parameters require gradients, so these tokens carry no gradient to the "
                "backbone: a forward under torch.no_grad (fine for a teacher: give its "
                "parameters requires_grad=False), or reentrant activation checkpointing of a "
                "segment that the tapped layer does not end (use use_reentrant=False)",
                stacklevel=2,
            )
        return [self._layout(output, k) for k, output in enumerate(captured)]

    def _layout(self, output: _Output, k: int) -> Tensor:
        tokens, hw = output.tokens, output.hw
        what = f"output {k} of the tapped {type(self.layer).__name__}"
        if output.part is not None:
            what += f" (element {output.part[0]} of a list call of {output.part[1]})"
        if output.problem is not None:
            raise ValueError(f"{what} {output.problem}")
        if not isinstance(tokens, Tensor):
            raise ValueError(f"{what} returned {type(tokens).__name__}, not a tensor of tokens")
        if tokens.ndim == 4:
            return tokens  # CNN feature maps (B, C, H, W)
        if tokens.ndim != 3:
            raise ValueError(
                f"{what} returned shape {tuple(tokens.shape)}: expected tokens (B, T, C) or maps "
                "(B, C, H, W)"
            )
        prefix = self.num_prefix_tokens
        if prefix is None:
            raise ValueError(
                f"{what} returned tokens {tuple(tokens.shape)} but TokenTap cannot tell how many "
                "prefix tokens (CLS, registers) lead them: pass num_prefix_tokens="
            )
        patches = tokens[:, prefix:]
        count = patches.shape[1]
        if hw is None:
            raise ValueError(
                f"{what}: TokenTap did not see the image size of this forward (the input of "
                f"{type(self._backbone.entry).__name__} was not an image tensor), so it cannot "
                "lay the tokens on their grid; tap the module that takes the images"
            )
        grid = self._grid(hw, count, what)
        self._check_cover(hw, grid)
        if grid[0] * grid[1] != count:
            raise ValueError(
                f"{what} has {count} patch tokens ({tokens.shape[1]} minus {prefix} prefix), but "
                f"images of {hw} with patches of {self.patch_size} make a {grid[0]} x {grid[1]} "
                f"grid of {grid[0] * grid[1]}" + self._mismatch(output, tokens.shape[1], hw, what)
            )
        return rearrange(patches, "b (h w) c -> b c h w", h=grid[0], w=grid[1])

    def _mismatch(self, output: _Output, total: int, hw: Size, what: str) -> str:
        """Why the tokens do not fit their grid, from what the tap saw: the end of the message."""
        for other in output.seen:
            if other == hw:
                continue
            try:
                grid = self._grid(other, total - (self.num_prefix_tokens or 0), what)
            except ValueError:
                continue
            if grid[0] * grid[1] == total - (self.num_prefix_tokens or 0):
                return (
                    f". They fit the images of {other}, which also entered the model since the "
                    f"previous output: the model embedded images other than those of these "
                    "tokens in between, so the tap paired them with the wrong size. Call the "
                    "model once per batch of images, or tap a layer that takes them (layer=)"
                )
        own = self._grid(hw, 0, what) if self._backbone.grid or self.patch_size else None
        if own is not None and 0 <= total - own[0] * own[1] < total:
            return (
                f". With num_prefix_tokens={total - own[0] * own[1]} they would fit: pass the "
                "number of tokens (CLS, registers) the model puts before its patches, and "
                "patch_size= if the patch is not the model's"
            )
        return ": set num_prefix_tokens= and patch_size= to the model's"

    def _check_cover(self, hw: tuple[int, int], grid: tuple[int, int]) -> None:
        """Warn once per image size when the tokens do not cover the whole image.

        A size that is not a multiple of the patch leaves pixels without a token, while the crop
        boxes cover the whole view, so the lattice would be misplaced.
        """
        if self.patch_size is None:
            return
        covered = (grid[0] * self.patch_size[0], grid[1] * self.patch_size[1])
        if covered == hw:
            return
        worst = max(1 - c / n for c, n in zip(covered, hw, strict=True))
        self._warn_once(
            f"cover{hw}",
            f"TokenTap: images of {hw[0]} x {hw[1]} px with patches of {self.patch_size[0]} x "
            f"{self.patch_size[1]} px make a {grid[0]} x {grid[1]} grid that covers only "
            f"{covered[0]} x {covered[1]} px (the patch embedding drops the rest), while the crop "
            f"boxes cover the whole view: the spatial term reads points up to {worst:.0%} of the "
            "view off. Use view sizes that are multiples of the patch (98 or 112 px for patch 14)",
            stacklevel=3,
        )

    def _grid(self, hw: tuple[int, int], count: int, what: str) -> tuple[int, int]:
        if self._backbone.grid is not None:
            return self._backbone.grid(hw)
        if self.patch_size is not None:
            return hw[0] // self.patch_size[0], hw[1] // self.patch_size[1]
        # No patch size known: the one square patch that makes `count` tokens of this image.
        sizes = [p for p in range(1, min(hw) + 1) if (hw[0] // p) * (hw[1] // p) == count]
        exact = [p for p in sizes if hw[0] % p == 0 and hw[1] % p == 0]
        if len(exact) == 1 or (not exact and len(sizes) == 1):
            p = (exact or sizes)[0]
            return hw[0] // p, hw[1] // p
        raise ValueError(
            f"{what} has {count} patch tokens of an image of {hw}, and TokenTap cannot tell the "
            "patch size: pass patch_size="
        )

    @contextmanager
    def paused(self) -> Iterator[TokenTap]:
        """Capture nothing inside the block (evaluation loops, say).

        Returns:
            A context manager that yields this tap, paused until the block ends.
        """
        enabled, self._enabled = self._enabled, False
        try:
            yield self
        finally:
            self._enabled = enabled

    def remove(self) -> None:
        """Remove the hooks and forget what was captured; the model is as before."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self._captured = []

    def __enter__(self) -> TokenTap:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.remove()

    def __repr__(self) -> str:
        return (
            f"TokenTap({self.family}: {type(self.layer).__name__}, "
            f"num_prefix_tokens={self.num_prefix_tokens}, patch_size={self.patch_size}, "
            f"dim={self.dim}, num_heads={self.num_heads}, captured={len(self._captured)})"
        )
