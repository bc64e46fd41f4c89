"""Evaluate checkpoints of the example trainers: a dense probe, k-NN, and relation invariance.

Any ``checkpoint.pth`` that ``dino_sere.py``, ``ibot_sere.py`` or ``mocov3_sere.py`` wrote (with
or without ``--no-sere``) works; the ViT is rebuilt from the preset saved in it and the
teacher's backbone is read (``--which student`` for the student's).

    python examples/evaluate.py probe runs/dino/checkpoint.pth runs/dino_sere/checkpoint.pth
    python examples/evaluate.py knn runs/*/checkpoint.pth --feature mean
    python examples/evaluate.py invariance runs/*/checkpoint.pth
    python examples/evaluate.py all runs/*/checkpoint.pth --data /path/to/VOC --size 224
    python examples/evaluate.py all runs/*/checkpoint.pth --data /usr/share/datasets/fashion-mnist

- ``probe``: a linear layer on the frozen patch tokens (after the final norm) predicts each
  token's class mix; its logits, upsampled bilinearly, give every pixel a class. Reported:
  mIoU (mean over classes of TP / (TP + FP + FN), over all val pixels) and pixel accuracy.
- ``knn``: the CLS token or the mean of the patch tokens, cosine similarity, the ``k`` nearest
  train images vote with weights ``exp(sim / 0.07)`` (DINO's k-NN). The label of an image is its
  largest object's class.
- ``invariance``: the paper's Fig. 6 measure (:mod:`sere_loss.diagnostics`) on two global crops
  of each held-out image, drawn as the trainer draws them and the same for every model, on the
  patch tokens before the final norm (the tokens SERE trains).

Every table carries its sanity bounds beside the models, so a reader sees whether the probe can
see anything: **random weights** (the same ViT, untrained: the floor, ``kind`` "floor") and a
**hand-made feature** (each patch's colour mean and spread and the magnitude spectrum of its gray
levels: a fixed feature that sees texture, ``kind`` "reference", what a model that has learnt
little should beat). Neither bounds every metric: on the invariance measure the hand-made
feature can sit above random weights, and on k-NN both can sit below the majority class
(``kind`` "chance").

Data: ``--data generated`` (the default; :class:`seg_data.ShapesSegmentation`, textured objects
of 4 classes, ``--images TRAIN,VAL``), a folder of Fashion-MNIST's four idx files
(:class:`seg_data.FashionScenes`, real items on plain backgrounds with exact masks, 10 classes,
``--images TRAIN,VAL``; Debian's ``dataset-fashion-mnist`` puts them in
``/usr/share/datasets/fashion-mnist``), or a folder in VOC's layout (``JPEGImages/``,
``SegmentationClass/``, ``ImageSets/Segmentation/train.txt`` and ``val.txt``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import types
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import seg_data
import torch
import torch.nn.functional as F
from timm.models.vision_transformer import VisionTransformer
from torch import Tensor, nn
from torch.utils.data import Dataset
from training import checkpoints, options
from training.options import POSITIVE_INT, SEED, Number

from sere_loss.diagnostics import RelationInvariance, relation_invariance
from sere_loss.transforms import IMAGENET_MEAN, IMAGENET_STD, dino_sere_transform

# Feature extractors ------------------------------------------------------------------------------


class Extractor:
    """What an evaluation reads from a model: dense maps, pooled vectors, relation maps.

    Images come in as ``(B, 3, H, W)`` floats normalised with ImageNet's mean and std.
    """

    name: str
    # "model", "floor" (random weights), "reference" (hand-made) or "ceiling" (supervised): the
    # floor and the reference are what a model that learnt nothing, or little, reaches; neither
    # bounds every metric (a hand-made feature can be less invariant than random weights).
    kind: str
    patch: int

    def features(self, images: Tensor) -> dict[str, Tensor]:
        """``dense`` ``(B, D, h, w)``, ``cls`` and ``mean`` ``(B, D)``."""
        raise NotImplementedError

    def relation_maps(self, images: Tensor) -> Tensor:
        """The maps whose self-relations the invariance measure compares ``(B, D, h, w)``."""
        raise NotImplementedError


class ViTExtractor(Extractor):
    """A timm ViT: final-norm tokens for the probes, the last block's tokens for relations."""

    def __init__(self, vit: VisionTransformer, name: str, kind: str = "model") -> None:
        self.vit, self.name, self.kind = vit.eval(), name, kind
        self.patch = int(vit.patch_embed.patch_size[0])

    @torch.no_grad()
    def features(self, images: Tensor) -> dict[str, Tensor]:
        """Final-norm patch tokens laid out on their grid, the CLS token, their mean."""
        tokens = self.vit.forward_features(images)  # (B, T, C) after the final norm
        h, w = images.shape[-2] // self.patch, images.shape[-1] // self.patch
        patches = tokens[:, self.vit.num_prefix_tokens :]
        dense = patches.transpose(1, 2).reshape(len(images), -1, h, w)
        return {"dense": dense, "cls": tokens[:, 0], "mean": patches.mean(dim=1)}

    @torch.no_grad()
    def relation_maps(self, images: Tensor) -> Tensor:
        """The last block's patch tokens before the final norm, as SERE reads them."""
        _, (maps,) = self.vit.forward_intermediates(
            images, indices=1, norm=False, output_fmt="NCHW"
        )
        return maps


class PatchSpectrum(Extractor):
    """A fixed, hand-made feature per patch: colour mean and spread, and a texture spectrum.

    For each ``p x p`` patch: the mean and the standard deviation of each colour channel, and
    ``log(1 + |FFT|)`` of its gray levels (the ``p x (p // 2 + 1)`` magnitudes of ``rfft2``, the
    DC term dropped). It sees orientation and period, which is what tells the generated classes
    apart, and nothing is learnt.
    """

    def __init__(self, patch: int, name: str = "hand-made patch spectrum") -> None:
        self.patch, self.name, self.kind = patch, name, "reference"

    def dense(self, images: Tensor) -> Tensor:
        """``(B, 6 + p * (p // 2 + 1) - 1, h, w)``."""
        p = self.patch
        b, _, height, width = images.shape
        h, w = height // p, width // p
        patches = images[:, :, : h * p, : w * p].reshape(b, 3, h, p, w, p).permute(0, 2, 4, 1, 3, 5)
        colour = torch.cat([patches.mean(dim=(-1, -2)), patches.std(dim=(-1, -2))], dim=-1)
        gray = patches.mean(dim=3)  # (B, h, w, p, p)
        spectrum = torch.fft.rfft2(gray).abs().flatten(-2)[..., 1:].log1p()
        return torch.cat([colour, spectrum], dim=-1).permute(0, 3, 1, 2).contiguous()

    def features(self, images: Tensor) -> dict[str, Tensor]:
        """The dense maps, and their mean for both pooled kinds."""
        dense = self.dense(images)
        pooled = dense.mean(dim=(-1, -2))
        return {"dense": dense, "cls": pooled, "mean": pooled}

    def relation_maps(self, images: Tensor) -> Tensor:
        """The same dense maps."""
        return self.dense(images)


def load_checkpoint(path: str | Path, which: str = "teacher") -> tuple[VisionTransformer, dict]:
    """The ViT of a trainer's checkpoint, and the checkpoint's ``preset`` and ``args``.

    The file is read as the trainers read it (:func:`training.checkpoints.load_checkpoint`):
    one that fails its checksum is refused, not evaluated. The architecture comes from the saved
    preset (MoCo v3's carries its head count); the weights are the ``backbone.`` entries of
    ``which`` (``"teacher"`` or ``"student"``).
    """
    state = checkpoints.load_checkpoint(Path(path))
    if "preset" not in state or which not in state:
        raise SystemExit(f"{path}: not a checkpoint of the example trainers (no preset/{which})")
    vit = build_backbone(state["preset"])
    prefix = "encoder.backbone." if any(k.startswith("encoder.") for k in state[which]) else ""
    prefix = prefix or "backbone."
    weights = {k[len(prefix) :]: v for k, v in state[which].items() if k.startswith(prefix)}
    vit.load_state_dict(weights)
    return vit, {"preset": state["preset"], "args": state.get("args", {}), "step": state["step"]}


def build_backbone(preset: dict[str, Any]) -> VisionTransformer:
    """The trainers' ViT for a saved preset, with timm's random initialisation."""
    extra = {"num_heads": preset["num_heads"]} if "num_heads" in preset else {}
    return options.build_vit(types.SimpleNamespace(**preset), 0.0, **extra)  # type: ignore[arg-type]


def random_extractor(preset: dict[str, Any], seed: int) -> ViTExtractor:
    """The lower bound: the same ViT with random weights (seeded)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return ViTExtractor(build_backbone(preset), "random weights", "floor")


def supervised_extractor(
    preset: dict[str, Any],
    data: EvalData,
    *,
    steps: int,
    seed: int = 0,
    batch: int = 32,
    lr: float = 1e-3,
    log: Callable[[str], None] = print,
) -> ViTExtractor:
    """The ceiling: the same ViT trained with the labels the probe is scored on.

    A linear layer on the final-norm patch tokens predicts each token's class mix (the probe's
    target, :func:`token_targets`) on the train split's images, flipped at random; AdamW,
    ``steps`` steps of ``batch`` images, linear warm-up over the first tenth then cosine, from
    the seed's random initial weights. Its features then go through the same frozen probe as
    every model: what this architecture reaches on this data when its features are learnt for
    the task, in about the compute the tier gives it.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        vit = build_backbone(preset)
        head = nn.Conv2d(vit.embed_dim, data.num_classes, 1)
    patch = int(vit.patch_embed.patch_size[0])
    grid = (data.train_images.shape[-2] // patch, data.train_images.shape[-1] // patch)
    targets = token_targets(data.train_masks, grid, data.num_classes)
    params = [*vit.parameters(), *head.parameters()]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.05)
    warm = max(1, steps // 10)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda k: min(1.0, (k + 1) / warm) * 0.5 * (1 + math.cos(math.pi * min(k, steps) / steps)),
    )
    gen = torch.Generator().manual_seed(seed)
    vit.train()
    for step in range(steps):
        idx = torch.randint(0, len(targets), (batch,), generator=gen)
        images, target = normalise(data.train_images[idx]), targets[idx]
        flip = torch.rand(batch, generator=gen) < 0.5
        images = torch.where(flip[:, None, None, None], images.flip(-1), images)
        target = torch.where(flip[:, None, None, None], target.flip(-1), target)
        tokens = vit.forward_features(images)[:, vit.num_prefix_tokens :]
        dense = tokens.transpose(1, 2).reshape(batch, -1, *grid)
        log_p = F.log_softmax(head(dense), dim=1)
        loss = -(target * log_p).sum(dim=1).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
        if (step + 1) % max(1, steps // 5) == 0:
            log(f"supervised ceiling: step {step + 1}/{steps}, loss {loss.item():.3f}")
    return ViTExtractor(vit, f"supervised ({steps} steps)", "ceiling")


# Data --------------------------------------------------------------------------------------------


def normalise(images: Tensor) -> Tensor:
    """uint8 ``(B, 3, H, W)`` -> floats normalised as the trainers normalise."""
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return (images.float() / 255 - mean) / std


class Resized(Dataset[tuple[Tensor, Tensor]]):
    """``(image, mask)`` resized to ``size x size``: bilinear for images, nearest for masks."""

    def __init__(self, dataset: Dataset[tuple[Tensor, Tensor]], size: int) -> None:
        self.dataset, self.size = dataset, size

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        image, mask = self.dataset[index]
        size = [self.size, self.size]
        image = F.interpolate(image[None].float(), size, mode="bilinear", antialias=True)[0]
        mask = F.interpolate(mask[None, None].float(), size, mode="nearest")[0, 0]
        return image.round().clamp(0, 255).to(torch.uint8), mask.long()


@dataclasses.dataclass(frozen=True)
class EvalData:
    """Both splits in memory: uint8 images ``(N, 3, H, W)`` and masks ``(N, H, W)``."""

    train_images: Tensor
    train_masks: Tensor
    val_images: Tensor
    val_masks: Tensor
    num_classes: int
    names: list[str]

    def with_val(self, count: int) -> EvalData:
        """The same, with only the first ``count`` held-out images."""
        return dataclasses.replace(
            self, val_images=self.val_images[:count], val_masks=self.val_masks[:count]
        )


def build_data(data: str, images: Sequence[int], size: int | None, seed: int) -> EvalData:
    """Train and val splits of ``(image, mask)``, loaded, with the class count and names.

    ``data`` is ``"generated"`` or a folder of Fashion-MNIST's idx files (scenes: ``images``
    = the train and val counts, ``seed`` the train split's seed, ``seed + 1`` the val
    split's), or a VOC-style folder (every image of its ``train`` and ``val`` lists, resized
    to ``size``, 224 by default).
    """
    if data == "generated":
        train: Dataset[Any] = seg_data.ShapesSegmentation(images[0], size or 96, seed=seed)
        val: Dataset[Any] = seg_data.ShapesSegmentation(images[1], size or 96, seed=seed + 1)
        names = list(seg_data.ShapesSegmentation.CLASSES)
    elif seg_data.is_idx_folder(data):
        train = seg_data.FashionScenes(data, "train", images[0], size or 96, seed=seed)
        val = seg_data.FashionScenes(data, "val", images[1], size or 96, seed=seed + 1)
        names = list(seg_data.FashionScenes.CLASSES)
    else:
        side = size or 224
        train = Resized(seg_data.VOCSegmentationFolder(data, "train"), side)
        val = Resized(seg_data.VOCSegmentationFolder(data, "val"), side)
        names = []
    train_images, train_masks = load_all(train)
    val_images, val_masks = load_all(val)
    if not names:
        labels = torch.cat([train_masks.flatten(), val_masks.flatten()])
        top = int(labels[labels != seg_data.IGNORE].max())
        names = [str(k) for k in range(top + 1)]
    return EvalData(train_images, train_masks, val_images, val_masks, len(names), names)


def load_all(dataset: Dataset[Any]) -> tuple[Tensor, Tensor]:
    """Every ``(image, mask)`` of a dataset, stacked: uint8 ``(N, 3, H, W)``, ``(N, H, W)``."""
    items = [dataset[i] for i in range(len(dataset))]  # type: ignore[arg-type]
    return torch.stack([i for i, _ in items]), torch.stack([m for _, m in items])


@torch.no_grad()
def extract(
    extractor: Extractor, images: Tensor, batch: int = 64, device: str = "cpu"
) -> dict[str, Tensor]:
    """:meth:`Extractor.features` over uint8 images ``(N, 3, H, W)``, in batches, on the CPU."""
    if isinstance(extractor, ViTExtractor):
        extractor.vit.to(device)
    parts: dict[str, list[Tensor]] = {}
    for start in range(0, len(images), batch):
        chunk = normalise(images[start : start + batch]).to(device)
        for key, value in extractor.features(chunk).items():
            parts.setdefault(key, []).append(value.float().cpu())
    return {key: torch.cat(values) for key, values in parts.items()}


# The dense linear probe --------------------------------------------------------------------------


def token_targets(masks: Tensor, grid: tuple[int, int], num_classes: int) -> Tensor:
    """Each token's class mix: the fraction of its pixels in each class (ignored pixels out).

    ``(N, H, W)`` masks -> ``(N, K, h, w)``; a token with only ignored pixels is all zero.
    """
    valid = masks != seg_data.IGNORE
    one_hot = F.one_hot(torch.where(valid, masks, 0), num_classes).permute(0, 3, 1, 2).float()
    one_hot = one_hot * valid[:, None].float()
    counts = F.adaptive_avg_pool2d(one_hot, grid)
    return counts / counts.sum(dim=1, keepdim=True).clamp(min=1e-12)


def confusion(pred: Tensor, target: Tensor, num_classes: int) -> Tensor:
    """``(K, K)`` pixel counts, rows the true class, columns the predicted; ignored left out."""
    keep = target != seg_data.IGNORE
    index = target[keep] * num_classes + pred[keep]
    return torch.bincount(index, minlength=num_classes**2).view(num_classes, num_classes)


def iou_from_confusion(matrix: Tensor) -> tuple[Tensor, float, float]:
    """Per-class IoU (NaN for a class absent from both truth and prediction), mIoU, accuracy."""
    m = matrix.double()
    tp = m.diag()
    union = m.sum(0) + m.sum(1) - tp
    iou = torch.where(union > 0, tp / union.clamp(min=1), torch.full_like(tp, math.nan))
    return iou, float(iou[union > 0].mean()), float(tp.sum() / m.sum().clamp(min=1))


@dataclasses.dataclass
class ProbeResult:
    """mIoU and pixel accuracy on the val split, in percent, and the IoU of each class."""

    miou: float
    accuracy: float
    iou: list[float]


def dense_probe(
    train_feats: Tensor,
    train_masks: Tensor,
    val_feats: Tensor,
    val_masks: Tensor,
    num_classes: int,
    *,
    steps: int = 500,
    lr: float = 0.01,
    batch: int = 64,
    seed: int = 0,
) -> ProbeResult:
    """Train a linear layer on frozen maps ``(N, D, h, w)`` to predict per-pixel classes.

    Features are standardised per channel with the train split's statistics. Targets are each
    token's class mix (:func:`token_targets`); the loss is the cross-entropy against it, over
    ``steps`` AdamW steps on batches of ``batch`` images (a fixed count, so a small train split
    is not under-trained) with a cosine learning rate. At evaluation the logits are upsampled
    bilinearly to the mask's size and each pixel takes the arg-max class.
    """
    gen = torch.Generator().manual_seed(seed)
    grid = (train_feats.shape[-2], train_feats.shape[-1])
    mean = train_feats.mean(dim=(0, 2, 3), keepdim=True)
    std = train_feats.std(dim=(0, 2, 3), keepdim=True).clamp(min=1e-6)
    x_train, x_val = (train_feats - mean) / std, (val_feats - mean) / std
    targets = token_targets(train_masks, grid, num_classes)
    weight = targets.sum(dim=1)  # 0 where a token holds only ignored pixels
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        probe = nn.Conv2d(x_train.shape[1], num_classes, 1)
    optimizer = torch.optim.AdamW(probe.parameters(), lr=lr, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps)
    order = torch.randperm(len(x_train), generator=gen)
    start = 0
    for _ in range(steps):
        if start >= len(order):
            order, start = torch.randperm(len(x_train), generator=gen), 0
        idx = order[start : start + batch]
        start += batch
        log_p = F.log_softmax(probe(x_train[idx]), dim=1)
        loss = -(targets[idx] * log_p).sum(dim=1).sum() / weight[idx].sum().clamp(min=1)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
    matrix = torch.zeros(num_classes, num_classes, dtype=torch.long)
    with torch.no_grad():
        for start in range(0, len(x_val), batch):
            logits = probe(x_val[start : start + batch])
            logits = F.interpolate(logits, val_masks.shape[-2:], mode="bilinear")
            matrix += confusion(logits.argmax(dim=1), val_masks[start : start + batch], num_classes)
    iou, miou, accuracy = iou_from_confusion(matrix)
    return ProbeResult(100 * miou, 100 * accuracy, [100 * v for v in iou.tolist()])


# k-NN --------------------------------------------------------------------------------------------


def knn_accuracy(
    train_feats: Tensor,
    train_labels: Tensor,
    val_feats: Tensor,
    val_labels: Tensor,
    num_classes: int,
    k: int = 20,
    temperature: float = 0.07,
) -> float:
    """Top-1 accuracy (percent) of DINO's weighted k-NN on cosine similarity."""
    bank = F.normalize(train_feats, dim=1)
    queries = F.normalize(val_feats, dim=1)
    k = min(k, len(bank))
    sims, idx = (queries @ bank.T).topk(k, dim=1)
    votes = torch.zeros(len(queries), num_classes)
    votes.scatter_add_(1, train_labels[idx], (sims / temperature).exp())
    return 100 * float((votes.argmax(dim=1) == val_labels).float().mean())


# Invariance --------------------------------------------------------------------------------------


def crop_pairs(images: Tensor, global_px: int, seed: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Two global views of each uint8 image, as DINO's recipe draws them, seeded per image.

    Returns views ``(N, 2, 3, s, s)`` (normalised), boxes ``(N, 2, 4)``, flips ``(N, 2)``, and
    the view size ``s``; the same for every model.
    """
    transform = dino_sere_transform(
        global_size=global_px, local_size=max(global_px // 2, 1), num_local=0
    )
    views, boxes, flips = [], [], []
    for index, image in enumerate(images):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed * 1_000_003 + index)
            crops = transform(image)
        views.append(torch.stack(crops.views))
        boxes.append(crops.boxes)
        flips.append(crops.flips)
    return torch.stack(views), torch.stack(boxes), torch.stack(flips), torch.tensor(global_px)


@torch.no_grad()
def invariance(
    extractor: Extractor,
    views: Tensor,
    boxes: Tensor,
    flips: Tensor,
    *,
    batch: int = 64,
    device: str = "cpu",
) -> dict[str, float]:
    """:func:`sere_loss.diagnostics.relation_invariance` of the two views, over all images."""
    if isinstance(extractor, ViTExtractor):
        extractor.vit.to(device)
    parts: list[RelationInvariance] = []
    for start in range(0, len(views), batch):
        chunk = slice(start, start + batch)
        if len(views[chunk]) < 2:
            break
        maps = [extractor.relation_maps(views[chunk, v].to(device)).cpu() for v in (0, 1)]
        b, f = boxes[chunk], flips[chunk]
        parts.append(relation_invariance(maps[0], maps[1], b[:, 0], f[:, 0], b[:, 1], f[:, 1]))
    return RelationInvariance.cat(parts).summary()


# Tables ------------------------------------------------------------------------------------------


def table(rows: list[dict[str, Any]], columns: Sequence[str]) -> str:
    """A Markdown table of ``rows`` (dicts), ``name`` and ``kind`` first."""
    head = ["name", "kind", *columns]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        cells = [row["name"], row["kind"]]
        cells += [f"{row[c]:.4g}" if isinstance(row[c], float) else str(row[c]) for c in columns]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def evaluate(
    extractors: list[Extractor],
    tasks: Sequence[str],
    data: EvalData,
    *,
    global_px: int,
    seed: int = 0,
    probe_steps: int = 500,
    knn_k: int = 20,
    feature: str = "cls",
    device: str = "cpu",
    log: Callable[[str], None] = print,
) -> dict[str, list[dict[str, Any]]]:
    """Run ``tasks`` (``probe``, ``knn``, ``invariance``) for every extractor; rows per task.

    Each task's rows follow ``extractors``' order; ``knn`` ends with the majority-class row.
    ``seed`` seeds the probe and the invariance crops.
    """
    k = data.num_classes
    out: dict[str, list[dict[str, Any]]] = {task: [] for task in tasks}
    if "invariance" in tasks:
        views, boxes, flips, _ = crop_pairs(data.val_images, global_px, seed)
    train_labels = torch.tensor([seg_data.image_label(m, k) for m in data.train_masks])
    val_labels = torch.tensor([seg_data.image_label(m, k) for m in data.val_masks])
    for extractor in extractors:
        base = {"name": extractor.name, "kind": extractor.kind}
        if "probe" in tasks or "knn" in tasks:
            tr = extract(extractor, data.train_images, device=device)
            va = extract(extractor, data.val_images, device=device)
        if "probe" in tasks:
            result = dense_probe(
                tr["dense"], data.train_masks, va["dense"], data.val_masks, k,
                steps=probe_steps, seed=seed,
            )  # fmt: skip
            row = base | {"miou": result.miou, "pixel_acc": result.accuracy}
            row |= {f"iou_{n}": v for n, v in zip(data.names, result.iou, strict=True)}
            out["probe"].append(row)
            log(f"probe {extractor.name}: mIoU {result.miou:.2f}")
        if "knn" in tasks:
            acc = knn_accuracy(tr[feature], train_labels, va[feature], val_labels, k, k=knn_k)
            out["knn"].append(base | {"top1": acc, "feature": feature})
            log(f"knn {extractor.name}: top-1 {acc:.2f}")
        if "invariance" in tasks:
            summary = invariance(extractor, views, boxes, flips, device=device)
            out["invariance"].append(base | summary)
            log(f"invariance {extractor.name}: spatial {summary['spatial_controlled']:.4f}")
    if "knn" in tasks:
        counts = torch.bincount(val_labels, minlength=k)
        chance = 100 * float(counts.max()) / len(val_labels)
        out["knn"].append({"name": "majority class", "kind": "chance", "top1": chance})
        out["knn"][-1]["feature"] = "-"
    return out


COLUMNS = {
    "probe": ["miou", "pixel_acc"],
    "knn": ["top1", "feature"],
    "invariance": [
        "spatial_controlled", "spatial_plain", "spatial_entropy",
        "channel_controlled", "channel_plain", "channel_entropy",
    ],
}  # fmt: skip


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command line: the task, the checkpoints, the data and the probes' settings."""
    p = argparse.ArgumentParser(
        description=__doc__.split("\n")[0],
        allow_abbrev=False,
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("task", choices=["probe", "knn", "invariance", "all"])
    p.add_argument("checkpoints", nargs="+", type=Path)
    p.add_argument(
        "--data", default="generated",
        help="'generated', a folder of Fashion-MNIST's idx files, or a VOC-style folder",
    )  # fmt: skip
    p.add_argument("--images", default="1024,256", help="generated TRAIN,VAL scene counts")
    p.add_argument(
        "--size", type=Number(16, integer=True), help="image side (generated: 96; a folder: 224)"
    )
    p.add_argument("--which", choices=["teacher", "student"], default="teacher")
    p.add_argument("--feature", choices=["cls", "mean"], default="cls", help="k-NN's vector")
    p.add_argument("--k", type=POSITIVE_INT, default=20, help="k-NN's neighbours")
    p.add_argument(
        "--probe-steps", type=POSITIVE_INT, default=500, help="AdamW steps, 64 images each"
    )
    p.add_argument("--no-bounds", action="store_true", help="leave the sanity bounds out")
    p.add_argument("--seed", type=SEED, default=0, help="data, crops, probe and random weights")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=POSITIVE_INT, help="torch CPU threads")
    p.add_argument("--json", type=Path, help="write the rows here")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, list[dict[str, Any]]]:
    """Evaluate; prints a table per task, returns the rows."""
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    extractors: list[Extractor] = []
    first: dict[str, Any] | None = None
    for path in args.checkpoints:
        vit, info = load_checkpoint(path, args.which)
        first = first or info
        name = f"{path.parent.name}/{path.name} (step {info['step']})"
        extractors.append(ViTExtractor(vit, name))
    if first is None:  # argparse asks for at least one; keep mypy and python -O honest
        raise SystemExit("give at least one checkpoint")
    preset = first["preset"]
    if not args.no_bounds:
        extractors = [
            random_extractor(preset, args.seed),
            PatchSpectrum(preset["patch"]),
            *extractors,
        ]
    tasks = ["probe", "knn", "invariance"] if args.task == "all" else [args.task]
    data = build_data(args.data, seg_data.split_sizes(args.images), args.size, args.seed)
    out = evaluate(
        extractors, tasks, data, global_px=preset["global_px"], seed=args.seed,
        probe_steps=args.probe_steps, knn_k=args.k, feature=args.feature, device=args.device,
        log=lambda line: print(line, file=sys.stderr, flush=True),
    )  # fmt: skip
    for task, rows in out.items():
        print(f"\n## {task}\n\n{table(rows, COLUMNS[task])}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(out, indent=1))
    return out


if __name__ == "__main__":
    main()
