"""The evaluation commands and the reproduction experiment (examples/evaluate.py, seg_data.py,
benchmarks/reproduce.py), and the trainer options they rely on."""

from __future__ import annotations

import csv
import dataclasses
import gzip
import importlib
import json
import math
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import torch

pytest.importorskip("timm", reason="the examples need the 'examples' extra (timm, tqdm)")

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True, scope="module")
def one_thread() -> Any:
    """One torch thread: on a shared 2-core machine, two threads that wait on each other make
    these small computations 10 to 30 times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def ev(examples: SimpleNamespace) -> SimpleNamespace:
    """examples/evaluate.py and examples/seg_data.py, imported as the scripts see them."""
    sys.path.insert(0, str(ROOT / "examples"))
    try:
        return SimpleNamespace(
            evaluate=importlib.import_module("evaluate"),
            seg=importlib.import_module("seg_data"),
            runs=examples.runs,
            rundir=examples.rundir,
            dino=examples.dino_sere,
            ibot=examples.ibot_sere,
            moco=examples.mocov3_sere,
        )
    finally:
        sys.path.remove(str(ROOT / "examples"))


@pytest.fixture(scope="module")
def shapes_folder(ev: SimpleNamespace, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """16 generated images as an ImageFolder, the trainers' input."""
    root = tmp_path_factory.mktemp("shapes")
    data = ev.seg.ShapesSegmentation(16, 64, seed=3)
    return ev.seg.write_image_folder(root, data, data.num_classes)


# Generated data ----------------------------------------------------------------------------------


def test_generated_images_are_textured_by_class(ev: SimpleNamespace) -> None:
    """Each class's pixels carry its texture: stripes vary across them, checks both ways."""
    data = ev.seg.ShapesSegmentation(24, 96, seed=0)
    assert len(data) == 24
    image, mask = data[5]
    again, mask_again = data[5]
    assert image.dtype == torch.uint8
    assert image.shape == (3, 96, 96)
    assert torch.equal(image, again)
    assert torch.equal(mask, mask_again)
    assert not torch.equal(image, ev.seg.ShapesSegmentation(24, 96, seed=1)[5][0])
    ratios: dict[int, list[float]] = {1: [], 2: [], 3: []}
    for i in range(len(data)):
        image, mask = data[i]
        gray = image.float().mean(0)
        assert mask.min() >= 0
        assert mask.max() < data.num_classes
        for cls in ratios:
            inside = mask == cls
            # Neighbouring pixels that both lie in the class: change along y against along x.
            dy = (gray[1:] - gray[:-1]).abs()[inside[1:] & inside[:-1]]
            dx = (gray[:, 1:] - gray[:, :-1]).abs()[inside[:, 1:] & inside[:, :-1]]
            if dy.numel() > 200 and dx.numel() > 200:
                ratios[cls].append(float(dy.mean() / dx.mean().clamp(min=1e-6)))
    assert min(ratios[1]) > 2.0  # horizontal stripes change along y
    assert max(ratios[2]) < 0.5  # vertical ones along x
    assert all(0.5 < r < 2.0 for r in ratios[3])  # checks both ways
    labels = [ev.seg.image_label(data[i][1], data.num_classes) for i in range(len(data))]
    assert set(labels) <= {1, 2, 3, 4}
    assert len(set(labels)) >= 3


def write_idx(path: Path, array: np.ndarray) -> Path:
    """An idx file written from the format's statement: 0, 0, type 0x08, dims, sizes, bytes."""
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(
        int(n).to_bytes(4, "big") for n in array.shape
    )
    data = header + array.astype(np.uint8).tobytes()
    path.write_bytes(gzip.compress(data) if path.suffix == ".gz" else data)
    return path


def tiny_fashion(root: Path, train: int = 12, test: int = 6) -> Path:
    """Fashion-MNIST's four idx files, tiny: train items of labels 0-4, test items of 5-9
    (so a scene's classes tell which file its items came from); train gzipped, test not."""
    root.mkdir(parents=True, exist_ok=True)
    gen = np.random.default_rng(0)
    for name, count, labels, ext in (
        ("train", train, range(5), ".gz"),
        ("t10k", test, range(5, 10), ""),
    ):
        items = np.zeros((count, 28, 28), dtype=np.uint8)
        for k in range(count):
            top, left = gen.integers(2, 8, size=2)
            items[k, top : top + 16, left : left + 14] = gen.integers(60, 256)
        write_idx(root / f"{name}-images-idx3-ubyte{ext}", items)
        write_idx(root / f"{name}-labels-idx1-ubyte{ext}", gen.choice(list(labels), size=count))
    return root


def test_idx_files_are_read_as_written(ev: SimpleNamespace, tmp_path: Path) -> None:
    array = np.arange(2 * 3 * 5, dtype=np.uint8).reshape(2, 3, 5)
    for name in ("a.idx", "a.idx.gz"):
        np.testing.assert_array_equal(ev.seg.read_idx(write_idx(tmp_path / name, array)), array)
    (tmp_path / "bad").write_bytes(b"\x00\x00\x0d\x01\x00\x00\x00\x01\x00\x00\x00\x00")
    with pytest.raises(ValueError, match=r"bad: not an idx file of unsigned bytes .*00 00 0d 01"):
        ev.seg.read_idx(tmp_path / "bad")
    (tmp_path / "short").write_bytes(write_idx(tmp_path / "ok", array).read_bytes()[:-1])
    with pytest.raises(ValueError, match=r"announces 2 x 3 x 5 = 30 values, the file holds 29"):
        ev.seg.read_idx(tmp_path / "short")


def test_fashion_scenes_from_any_idx_folder(ev: SimpleNamespace, tmp_path: Path) -> None:
    """Scenes of the train file's items for "train", the test file's for "val"; a plain
    background wherever the mask says background; a function of (seed, index)."""
    root = tiny_fashion(tmp_path / "fm")
    assert ev.seg.is_idx_folder(root)
    train = ev.seg.FashionScenes(root, "train", 24, 64, seed=0)
    val = ev.seg.FashionScenes(root, "val", 24, 64, seed=1)
    assert train.num_classes == 11
    seen: dict[str, set[int]] = {"train": set(), "val": set()}
    for split, data in (("train", train), ("val", val)):
        for i in range(len(data)):
            image, mask = data[i]
            assert image.dtype == torch.uint8
            assert image.shape == (3, 64, 64)
            assert mask.shape == (64, 64)
            background = image[:, mask == 0]
            assert background.shape[1] > 0
            assert (background == background[:, :1]).all(), "the background is one colour"
            assert float(background.max()) <= 0.25 * 255 + 0.5
            assert (mask > 0).any(), "every scene holds an item"
            seen[split] |= set(mask.unique().tolist()) - {0}
    assert seen["train"] <= {1, 2, 3, 4, 5}
    assert seen["val"] <= {6, 7, 8, 9, 10}
    assert len(seen["train"]) >= 3
    image, mask = train[3]
    assert torch.equal(image, train[3][0])
    assert torch.equal(mask, train[3][1])
    assert not torch.equal(image, ev.seg.FashionScenes(root, "train", 24, 64, seed=5)[3][0])
    loaded = ev.evaluate.build_data(str(root), (8, 4), 64, seed=0)
    assert loaded.train_images.shape == (8, 3, 64, 64)
    assert loaded.val_masks.shape == (4, 64, 64)
    assert loaded.names == list(ev.seg.FashionScenes.CLASSES)
    assert torch.equal(loaded.train_images[2], train[2][0])


def test_fashion_folder_errors(ev: SimpleNamespace, tmp_path: Path) -> None:
    root = tiny_fashion(tmp_path / "fm")
    with pytest.raises(ValueError, match="split must be one of"):
        ev.seg.FashionScenes(root, "test", 4)
    with pytest.raises(ValueError, match="size >= 56"):
        ev.seg.FashionScenes(root, "train", 4, 48)
    write_idx(root / "t10k-labels-idx1-ubyte", np.array([3, 12, 4, 4, 4, 4]))
    with pytest.raises(ValueError, match=r"labels must be 0-9, got up to 12"):
        ev.seg.FashionScenes(root, "val", 4)
    (root / "train-images-idx3-ubyte.gz").unlink()
    assert not ev.seg.is_idx_folder(root)
    with pytest.raises(
        FileNotFoundError, match=r"train-images-idx3-ubyte\[\.gz\].*dataset-fashion"
    ):
        ev.seg.FashionScenes(root, "train", 4)


def test_image_label_is_the_largest_object(ev: SimpleNamespace) -> None:
    mask = torch.zeros(6, 6, dtype=torch.long)
    mask[:2, :2] = 1  # 4 pixels
    mask[3:, 3:] = 3  # 9 pixels
    mask[0, 5] = ev.seg.IGNORE
    assert ev.seg.image_label(mask, 5) == 3
    assert ev.seg.image_label(torch.zeros(3, 3, dtype=torch.long), 5) == 0


def test_voc_layout_round_trip(ev: SimpleNamespace, tmp_path: Path) -> None:
    data = ev.seg.ShapesSegmentation(3, 32, seed=2)
    root = ev.seg.write_voc(tmp_path, {"train": data, "val": data})
    assert (root / "ImageSets/Segmentation/val.txt").read_text().split() == [
        "val_000000", "val_000001", "val_000002",
    ]  # fmt: skip
    from PIL import Image

    with Image.open(root / "SegmentationClass/train_000001.png") as png:
        assert png.mode == "P"  # a palette PNG, as VOC's
        assert png.getpalette()[3:6] == [128, 0, 0]  # VOC's colour of class 1
    split = ev.seg.VOCSegmentationFolder(root, "train")
    for i in range(3):
        image, mask = split[i]
        assert torch.equal(image, data[i][0])
        assert torch.equal(mask, data[i][1])
    # VOC's "ignore" border survives, and a missing split says what a VOC folder holds.
    masked = data[0][1].clone().to(torch.uint8)
    masked[0] = ev.seg.IGNORE
    seg = Image.fromarray(masked.numpy(), mode="P")
    seg.putpalette(ev.seg.voc_palette())
    seg.save(root / "SegmentationClass/train_000000.png")
    assert (split[0][1][0] == ev.seg.IGNORE).all()
    with pytest.raises(FileNotFoundError, match=r"ImageSets/Segmentation/<split>\.txt"):
        ev.seg.VOCSegmentationFolder(root, "test")
    loaded = ev.evaluate.build_data(str(root), (0, 0), 48, seed=0)
    assert loaded.train_images.shape == (3, 3, 48, 48)
    assert loaded.num_classes == int(data[0][1].max().clamp(min=1)) + 1 or loaded.num_classes >= 2


# The probe's pieces ------------------------------------------------------------------------------


def test_iou_matches_per_class_pixel_sets(ev: SimpleNamespace) -> None:
    gen = torch.Generator().manual_seed(0)
    target = torch.randint(0, 4, (3, 10, 10), generator=gen)
    target[0, 0] = ev.seg.IGNORE
    pred = torch.where(torch.rand(3, 10, 10, generator=gen) < 0.6, target, 2)
    pred = torch.where(target == ev.seg.IGNORE, 1, pred)
    matrix = sum(ev.evaluate.confusion(p, t, 5) for p, t in zip(pred, target, strict=True))
    iou, miou, accuracy = ev.evaluate.iou_from_confusion(matrix)
    keep = target != ev.seg.IGNORE
    expected = []
    for c in range(5):
        inter = int(((pred == c) & (target == c) & keep).sum())
        union = int((((pred == c) | (target == c)) & keep).sum())
        if union:
            expected.append(inter / union)
            assert float(iou[c]) == pytest.approx(inter / union)
        else:
            assert math.isnan(float(iou[c]))  # class 4 is in neither
    assert miou == pytest.approx(sum(expected) / len(expected))
    assert accuracy == pytest.approx(float(((pred == target) & keep).sum() / keep.sum()))


def test_token_targets_are_each_tokens_class_fractions(ev: SimpleNamespace) -> None:
    gen = torch.Generator().manual_seed(1)
    masks = torch.randint(0, 3, (2, 8, 12), generator=gen)
    masks[0, :4, :4] = ev.seg.IGNORE  # token (0, 0) of image 0 holds only ignored pixels
    out = ev.evaluate.token_targets(masks, (2, 3), 3)
    for b in range(2):
        for i in range(2):
            for j in range(3):
                cell = masks[b, 4 * i : 4 * i + 4, 4 * j : 4 * j + 4].flatten().tolist()
                kept = [v for v in cell if v != ev.seg.IGNORE]
                for c in range(3):
                    want = kept.count(c) / len(kept) if kept else 0.0
                    assert float(out[b, c, i, j]) == pytest.approx(want, abs=1e-6)


def test_the_probe_sees_what_its_features_hold(ev: SimpleNamespace) -> None:
    """Features holding each token's class give a high mIoU; noise gives the floor."""
    data = ev.seg.ShapesSegmentation(48, 64, seed=4)
    masks = torch.stack([data[i][1] for i in range(48)])
    mix = ev.evaluate.token_targets(masks, (8, 8), 5)
    noise = torch.randn(48, 5, 8, 8, generator=torch.Generator().manual_seed(0))
    good = ev.evaluate.dense_probe(mix[:32], masks[:32], mix[32:], masks[32:], 5, steps=300)
    bad = ev.evaluate.dense_probe(noise[:32], masks[:32], noise[32:], masks[32:], 5, steps=300)
    assert good.miou > 75
    assert bad.miou < 25
    assert len(good.iou) == 5


def test_knn_matches_a_loop_level_vote(ev: SimpleNamespace) -> None:
    gen = torch.Generator().manual_seed(2)
    bank, queries = torch.randn(30, 6, generator=gen), torch.randn(12, 6, generator=gen)
    bank_labels = torch.randint(0, 3, (30,), generator=gen)
    query_labels = torch.randint(0, 3, (12,), generator=gen)
    acc = ev.evaluate.knn_accuracy(bank, bank_labels, queries, query_labels, 3, k=5)
    hits = 0
    for q, label in zip(queries.tolist(), query_labels.tolist(), strict=True):
        sims = []
        for b, bl in zip(bank.tolist(), bank_labels.tolist(), strict=True):
            cos = sum(x * y for x, y in zip(q, b, strict=True))
            cos /= math.sqrt(sum(x * x for x in q)) * math.sqrt(sum(y * y for y in b))
            sims.append((cos, bl))
        votes = [0.0, 0.0, 0.0]
        for cos, bl in sorted(sims, reverse=True)[:5]:
            votes[bl] += math.exp(cos / 0.07)
        hits += votes.index(max(votes)) == label
    assert acc == pytest.approx(100 * hits / 12, abs=1e-4)
    # The weights decide: one near neighbour of class 0 outvotes four farther ones of class 1
    # (exp(0.99 / 0.07) against 4 exp(0.5 / 0.07)), where a plain count or sum would not.
    near = [0.99, math.sqrt(1 - 0.99**2)]
    far = [0.5, math.sqrt(1 - 0.25)]
    bank = torch.tensor([near, far, far, far, far])
    labels = torch.tensor([0, 1, 1, 1, 1])
    query = torch.tensor([[1.0, 0.0]])
    assert ev.evaluate.knn_accuracy(bank, labels, query, torch.tensor([0]), 2, k=5) == 100.0


def test_patch_spectrum_against_numpy(ev: SimpleNamespace) -> None:
    gen = torch.Generator().manual_seed(3)
    images = torch.randn(2, 3, 16, 24, generator=gen)
    out = ev.evaluate.PatchSpectrum(8).dense(images)
    assert out.shape == (2, 6 + 8 * 5 - 1, 2, 3)
    patch = images[1, :, 8:16, 16:24].numpy().astype(np.float64)
    spectrum = np.log1p(np.abs(np.fft.rfft2(patch.mean(axis=0)))).flatten()[1:]
    want = np.concatenate([patch.mean(axis=(1, 2)), patch.std(axis=(1, 2), ddof=1), spectrum])
    np.testing.assert_allclose(out[1, :, 1, 2].numpy(), want, rtol=1e-4, atol=1e-5)


# Checkpoints of every trainer --------------------------------------------------------------------


def _train(module: Any, data: Path, out: Path, *extra: str) -> dict[str, Any]:
    argv = ["--data", str(data), "--preset", "tiny", "--batch-size", "4", "--workers", "0"]
    return module.main([*argv, "--no-progress", "--output-dir", str(out), *extra])


@pytest.mark.parametrize("name", ["dino", "ibot", "moco"])
def test_any_trainers_checkpoint_loads(
    ev: SimpleNamespace, name: str, shapes_folder: Path, tmp_path: Path
) -> None:
    _train(getattr(ev, name), shapes_folder, tmp_path, "--max-steps", "1")
    vit, info = ev.evaluate.load_checkpoint(tmp_path / "checkpoint.pth")
    state = torch.load(tmp_path / "checkpoint.pth", weights_only=False)
    for key, value in vit.state_dict().items():
        torch.testing.assert_close(value, state["teacher"][f"backbone.{key}"], rtol=0, atol=0)
    assert info["step"] == 1
    extractor = ev.evaluate.ViTExtractor(vit, name)
    images = torch.randn(2, 3, 64, 64)
    features = extractor.features(images)
    assert features["dense"].shape == (2, 96, 8, 8)
    assert features["cls"].shape == features["mean"].shape == (2, 96)
    assert extractor.relation_maps(images).shape == (2, 96, 8, 8)
    student, _ = ev.evaluate.load_checkpoint(tmp_path / "checkpoint.pth", "student")
    assert any(
        not torch.equal(a, b)
        for a, b in zip(student.state_dict().values(), vit.state_dict().values(), strict=True)
    )


def test_a_damaged_checkpoint_is_refused_not_evaluated(
    ev: SimpleNamespace, shapes_folder: Path, tmp_path: Path
) -> None:
    # One weight of 0.032 read as 1.1e37 used to be evaluated, exit status 0.
    from _trainer_runs import flip_a_tensor_byte

    _train(ev.dino, shapes_folder, tmp_path, "--max-steps", "1", "--check-images", "1")
    damaged = tmp_path / "checkpoint.pth"
    flip_a_tensor_byte(damaged)
    with pytest.raises(SystemExit, match=rf"the checkpoint {damaged} fails its checksum"):
        ev.evaluate.main(["knn", str(damaged), "--images", "8,8", "--no-bounds"])


def test_no_sere_starts_from_the_same_weights_and_crops(
    ev: SimpleNamespace, shapes_folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The two arms of a seed differ only by SERE: same initial student, same crops; and the
    random-weights bound of the evaluation is that initial backbone."""
    seen: dict[str, dict[str, Any]] = {}
    original = ev.runs.Run

    class Recording(original):  # type: ignore[misc, valid-type]
        def __init__(self, process: Any, args: Any, state: dict[str, Any], **kw: Any) -> None:
            super().__init__(process, args, state, **kw)
            arm = "plain" if args.no_sere else "sere"
            student = state["student"].state_dict()
            seen[arm] = {"student": {k: v.clone() for k, v in student.items()}, "batches": []}
            self._arm = arm

        def iterations(self, loader: Any, sampler: Any, start: int) -> Any:
            for step, epoch, batch in super().iterations(loader, sampler, start):
                crops = batch[0]
                seen[self._arm]["batches"].append((crops.views, crops.boxes, crops.flips))
                yield step, epoch, batch

    monkeypatch.setattr(ev.runs, "Run", Recording)
    _train(ev.dino, shapes_folder, tmp_path / "a", "--max-steps", "2", "--seed", "7")
    _train(ev.dino, shapes_folder, tmp_path / "b", "--max-steps", "2", "--seed", "7", "--no-sere")
    plain, sere = seen["plain"], seen["sere"]
    assert plain["student"].keys() == sere["student"].keys()
    for key in plain["student"]:
        assert torch.equal(plain["student"][key], sere["student"][key]), key
    assert len(plain["batches"]) == len(sere["batches"]) == 2
    for (v1, b1, f1), (v2, b2, f2) in zip(plain["batches"], sere["batches"], strict=True):
        assert torch.equal(b1, b2)
        assert torch.equal(f1, f2)
        assert all(torch.equal(x, y) for x, y in zip(v1, v2, strict=True))
    # Another seed draws other weights, so the check above can fail.
    _train(ev.dino, shapes_folder, tmp_path / "c", "--max-steps", "1", "--seed", "8")
    assert not torch.equal(seen["sere"]["student"]["backbone.cls_token"],
                           plain["student"]["backbone.cls_token"])  # fmt: skip
    # The evaluation's lower bound is the runs' own starting point.
    preset = torch.load(tmp_path / "a" / "checkpoint.pth", weights_only=False)["preset"]
    random = ev.evaluate.random_extractor(preset, 7)
    for key, value in random.vit.state_dict().items():
        assert torch.equal(value, plain["student"][f"backbone.{key}"]), key


def test_device_crops_are_a_function_of_seed_and_step(
    ev: SimpleNamespace, shapes_folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """--device-crops: both arms see the same views and geometry at each step, a resumed run
    sees what an uninterrupted one saw, and another seed sees others."""
    from sere_loss.batch_transforms import BatchMultiCrop

    seen: list[tuple[Any, ...]] = []
    original = BatchMultiCrop.__call__

    def recording(self: Any, images: Any, **kw: Any) -> Any:
        crops = original(self, images, **kw)
        seen.append((crops.views, crops.boxes, crops.flips))
        return crops

    monkeypatch.setattr(BatchMultiCrop, "__call__", recording)

    def train(out: str, *extra: str) -> list[tuple[Any, ...]]:
        seen.clear()
        _train(ev.dino, shapes_folder, tmp_path / out, "--device-crops", *extra)
        return list(seen)

    sere = train("a", "--max-steps", "3", "--seed", "7")
    plain = train("b", "--max-steps", "3", "--seed", "7", "--no-sere")
    first = train("c", "--max-steps", "1", "--seed", "7")
    resumed = train("c", "--max-steps", "3", "--seed", "7", "--resume")
    other = train("d", "--max-steps", "1", "--seed", "8")
    assert len(sere) == len(plain) == 3
    for runs in (plain, first + resumed):
        for (v1, b1, f1), (v2, b2, f2) in zip(sere, runs, strict=True):
            assert torch.equal(b1, b2)
            assert torch.equal(f1, f2)
            assert all(torch.equal(x, y) for x, y in zip(v1, v2, strict=True))
    assert not torch.equal(other[0][1], sere[0][1])
    assert not torch.equal(sere[1][1], sere[0][1])  # each step its own crops
    # The geometry reached SERE: its views are those of the images' crops, 6 of them.
    assert sere[0][1].shape == (4, 6, 4)


def test_trainer_options_of_the_experiment(
    ev: SimpleNamespace, shapes_folder: Path, tmp_path: Path
) -> None:
    """--keep-checkpoints, --save-every, the warm-up lengths and --diagnostics-every."""
    _train(
        ev.dino, shapes_folder, tmp_path, "--epochs", "3", "--max-steps", "9", "--save-every",
        "3", "--keep-checkpoints", "--warmup-epochs", "2", "--teacher-temp-warmup-epochs", "0.5",
        "--diagnostics-every", "4",
    )  # fmt: skip
    kept = sorted(p.name for p in tmp_path.glob("checkpoint-*.pth"))
    # 16 images at batch 4: 4 steps an epoch; epoch ends 4 and 8, every 3 steps 3, 6, 9.
    assert kept == [f"checkpoint-{s:07d}.pth" for s in (3, 4, 6, 8, 9)]
    assert torch.load(tmp_path / kept[1], weights_only=False)["step"] == 4
    with (tmp_path / "log.csv").open() as f:
        rows = list(csv.DictReader(f))
    lr = [float(r["lr"]) for r in rows]
    peak = 0.0005 * 4 / 256
    for i in range(8):  # warm-up over 2 epochs = 8 steps, linear from 0
        assert lr[i] == pytest.approx(peak * i / 8, rel=1e-4, abs=1e-12)
    assert lr[8] == pytest.approx(peak, rel=1e-3)
    temps = [float(r["teacher_temp"]) for r in rows]
    assert temps[:3] == pytest.approx([0.04, 0.055, 0.07])  # 0.5 epochs = 2 steps
    diagnosed = [int(r["step"]) for r in rows if r["inv_spatial"]]
    assert diagnosed == [1, 5, 9]
    for row in rows:
        if row["inv_spatial"]:
            assert 0 < float(row["inv_spatial"]) < 2
            assert 0 < float(row["inv_spatial_entropy"]) < math.log(49)


def test_relation_diagnostics_reads_the_two_global_views(ev: SimpleNamespace) -> None:
    gen = torch.Generator().manual_seed(0)
    first = torch.randn(4, 36, 16, generator=gen)
    boxes = torch.tensor([[0.0, 0.0, 1.0, 1.0], [0.1, 0.1, 0.5, 0.5]]).expand(4, 2, 4)
    flips = torch.tensor([[False, True]] * 4)
    # View 2 is view 1 mirrored, with the same box: its relations are view 1's.
    mirrored = first.view(4, 6, 6, 16).flip(2).reshape(4, 36, 16)
    same_box = boxes.clone()
    same_box[:, 1] = same_box[:, 0]
    out = ev.runs.relation_diagnostics(torch.cat([first, mirrored]), same_box, flips)
    assert out["inv_spatial"] == pytest.approx(0.0, abs=1e-6)
    assert out["inv_channel"] == pytest.approx(0.0, abs=1e-6)
    noisy = mirrored + torch.randn(4, 36, 16, generator=gen)
    assert (
        ev.runs.relation_diagnostics(torch.cat([first, noisy]), same_box, flips)["inv_spatial"]
        > 0.1
    )
    apart = torch.tensor([[0.0, 0.0, 0.4, 1.0], [0.6, 0.0, 1.0, 1.0]]).expand(4, 2, 4)
    assert ev.runs.relation_diagnostics(torch.cat([first, mirrored]), apart, flips) == {}


# The experiment ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def reproduce() -> Any:
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        yield importlib.import_module("reproduce")
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))


def test_paired_statistics(reproduce: Any) -> None:
    out = reproduce.paired([0.5, 0.4, 0.6], [0.45, 0.41, 0.5], "lower")
    diffs = [-0.05, 0.01, -0.1]
    mean = sum(diffs) / 3
    sd = math.sqrt(sum((d - mean) ** 2 for d in diffs) / 2)
    assert out["mean"] == pytest.approx(mean)
    assert out["sd"] == pytest.approx(sd)
    half = 4.303 * sd / math.sqrt(3)  # t(0.975, 2 degrees of freedom)
    assert out["ci"] == pytest.approx([mean - half, mean + half])
    assert out["wins"] == 2
    assert reproduce.paired([1.0, 2.0], [2.0, 3.0], "higher")["wins"] == 2


def test_gpu_tier_refuses_without_a_gpu(reproduce: Any) -> None:
    if torch.cuda.is_available():
        pytest.skip("a GPU is here")
    with pytest.raises(SystemExit, match="--dry-run runs its plan on the CPU"):
        reproduce.main(["--tier", "gpu"])


def test_data_that_is_not_an_idx_folder_is_refused(reproduce: Any, tmp_path: Path) -> None:
    with pytest.raises(SystemExit, match=r"--data .*not a folder of Fashion-MNIST's four idx"):
        reproduce.main(["--tier", "cpu", "--dry-run", "--data", str(tmp_path)])


def _rows(
    reproduce: Any, random: float, spectrum: float, dino: list[float], sere: list[float]
) -> list[dict]:
    """The summary rows of a probe result with these bounds and per-seed arms."""

    def probe(values: list[float]) -> dict[str, Any]:
        return {"probe": {k: {"miou": v, "pixel_acc": 0.0} for k, v in enumerate(values)}}

    results = {
        "bounds": {"random": probe([random, random]), "spectrum": probe([spectrum])},
        "final": {"dino": probe(dino), "dino_sere": probe(sere)},
        "final_student": {},
    }
    return [r for r in reproduce.summarise(results, [0, 1]) if r["metric"] == "miou"]


def test_the_statistic_is_read_only_past_the_gate(reproduce: Any) -> None:
    """Read only when the better arm's mean beats the higher bound by 2 mIoU or more."""
    # The higher bound is the random weights' (20) here, not the hand-made feature's (15).
    below = _rows(reproduce, 20.0, 15.0, [21.0, 21.5], [21.8, 22.0])  # best arm 21.9 < 22
    passed, text = reproduce.probe_gate(below)
    assert not passed
    assert "random weights, 20.00" in text
    assert reproduce.verdict(below).startswith("**Verdict: not read.**")
    above = _rows(reproduce, 20.0, 15.0, [21.0, 21.5], [22.0, 22.2])  # best arm 22.1 >= 22
    assert reproduce.probe_gate(above)[0]
    text = reproduce.verdict(above)
    # Differences +1.0 and +0.7: mean +0.85, sd 0.212, t(1) 12.706: interval [-1.06, +2.76].
    assert "+0.85 [-1.06, +2.76]" in text
    assert "higher in 2 of 2" in text
    assert "no difference shown" in text
    clear = _rows(reproduce, 10.0, 15.0, [20.0, 21.0], [23.0, 24.1])  # +3.0, +3.1: above zero
    assert "SERE helps" in reproduce.verdict(clear)
    worse = _rows(reproduce, 10.0, 15.0, [23.0, 24.1], [20.0, 21.0])
    assert "SERE hurts" in reproduce.verdict(worse)


def test_epochs_are_planned_to_end_on_time(reproduce: Any) -> None:
    tier = dataclasses.replace(reproduce.TIERS["gpu"], budget_s=450, jobs=8)
    cal = {"startup_s": 20.0, "step_s": 0.1}
    epochs, plan = reproduce.plan_epochs(tier, cal, spent_s=100.0, reserve_s=30.0,
                                         steps_per_epoch=128)  # fmt: skip
    # 450 - 100 - 30 = 320 s; one wave of 8 runs: 300 s after the start-up, 0.9 of it in
    # steps of 0.1 s = 2700 steps.
    assert plan["steps_fit"] == 2700
    assert epochs == 2700 // 128
    two_waves = dataclasses.replace(tier, jobs=4)
    epochs, plan = reproduce.plan_epochs(two_waves, cal, 100.0, 30.0, 128)
    assert plan["waves"] == 2
    assert plan["steps_fit"] == 1260  # 0.9 (320 / 2 - 20) / 0.1
    assert reproduce.pack_points(list(range(1, 13))) == [3, 6, 9, 12]
    assert reproduce.pack_points([4, 8]) == [4, 8]


def test_the_gpu_plan_dry_run(reproduce: Any, tmp_path: Path) -> None:
    """The GPU tier's plan, tiny, on the CPU, from a folder of tiny idx files: scenes,
    crop rates, calibration, epochs from it, training, packs under 16 MiB, the evaluation from
    the packs (as ``--evaluate`` reads what a GPU run hands back), the results; a rerun trains
    nothing."""
    data = tiny_fashion(tmp_path / "fm")
    work, out = tmp_path / "w", tmp_path / "out"
    argv = ["--tier", "gpu", "--dry-run", "--data", str(data), "--work", str(work)]
    record = reproduce.main([*argv, "--out", str(out)])
    for name in ("results.json", "results.md", "fig6_bars.png", "probe.png"):
        assert (out / name).is_file(), name
    assert (out / "invariance_over_training.png").stat().st_size > 10_000
    training = json.loads((work / "packed" / "train.json").read_text())
    assert training["calibration"]["runs_at_once"] == 2
    assert training["calibration"]["step_s"] > 0
    assert training["plan"]["epochs_dry_run"] == training["schedule"]["epochs"] == 2
    assert set(training["estimate"]["phases_s"]) >= {"scenes", "training start-up"}
    assert training["crop_rates"]["device_crops"] > 0
    assert sorted(training["runs"]) == ["dino_s0", "dino_s1", "dino_sere_s0", "dino_sere_s1"]
    assert len(training["runs"]["dino_s0"]["log"]["loss"]) == training["schedule"]["steps"]
    packs = sorted((work / "packed").glob("backbones-*.pt"))
    assert [p.name for p in packs] == ["backbones-0000004.pt", "backbones-0000008.pt"]
    assert all(p.stat().st_size < reproduce.PACK_LIMIT for p in packs)
    packed = torch.load(packs[-1], weights_only=True)
    teacher = packed["runs"]["dino_sere_s1"]["teacher"]
    assert all(v.dtype == torch.float16 for v in teacher.values())
    saved = torch.load(work / "runs" / "dino_sere_s1" / "checkpoint.pth", weights_only=False)
    torch.testing.assert_close(teacher["cls_token"], saved["teacher"]["backbone.cls_token"].half())
    table = {row["metric"]: row for row in record["table"]}
    for metric in ("miou", "spatial_controlled", "student_spatial_controlled", "top1"):
        row = table[metric]
        assert len(row["dino"]["values"]) == len(row["dino_sere"]["values"]) == 2
        for bound in ("random", "spectrum", "ceiling"):
            assert not math.isnan(row[bound]["mean"]), (metric, bound)
    curve = record["results"]["curve"]["student"]["dino_sere"][1]
    assert [p["epoch"] for p in curve] == [0.0, 1.0, 2.0]  # random init, then each pack
    text = (out / "results.md").read_text()
    assert text.splitlines()[2].startswith("**Verdict:")
    assert "| **dense linear probe mIoU (%), teacher** | higher |" in text
    # Rerunning trains nothing: the runs are finished, the epochs kept from the calibration.
    lines: list[str] = []
    tier = reproduce.dry_run_tier(reproduce.TIERS["gpu"])
    steps = training["schedule"]["steps"]
    assert (
        reproduce.train_all(tier, work / "data" / "train", work / "runs", 2, steps, lines.append)
        == []
    )
    assert lines == []


def test_an_interrupted_run_is_resumed_and_a_finished_one_left_alone(
    reproduce: Any, ev: SimpleNamespace, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The experiment's rerun under the trainers' run-directory rules: a run killed mid-way
    continues from its last checkpoint (``--resume`` with the same options), its log keeps each
    step once, every epoch's checkpoint is kept; a finished run is not started again; a run
    still going at the deadline is stopped and named."""
    tier = dataclasses.replace(
        reproduce.dry_run_tier(reproduce.TIERS["cpu"]), data="generated", seeds=(0,), jobs=1
    )
    train_set = ev.seg.ShapesSegmentation(tier.train_images, tier.image_size, seed=0)
    data, runs = tmp_path / "data", tmp_path / "runs"
    ev.seg.write_image_folder(data, train_set, train_set.num_classes)
    steps_per_epoch = tier.train_images // tier.batch_size
    epochs = 2
    steps = steps_per_epoch * epochs
    lines: list[str] = []
    # Killed in the middle of the second epoch: the first epoch's checkpoint is the last one.
    monkeypatch.setenv("EXAMPLES_TEST_FAULT", f"kill:step:{steps_per_epoch + 2}")
    with pytest.raises(SystemExit, match="failed"):
        reproduce.train_all(tier, data, runs, epochs, steps, lines.append)
    run = runs / "dino_s0"
    assert not reproduce.finished(run, steps)
    assert [s for s, _ in reproduce.kept_checkpoints(run)] == [steps_per_epoch]
    monkeypatch.delenv("EXAMPLES_TEST_FAULT")
    lines.clear()
    reproduce.train_all(tier, data, runs, epochs, steps, lines.append)
    assert [line.split(" in ")[0] for line in lines] == [
        "training dino_s0",
        "trained dino_s0",
        "training dino_sere_s0",
        "trained dino_sere_s0",
    ]
    assert f"resumed from step {steps_per_epoch}" in (run / "train.log").read_text()
    assert reproduce.finished(run, steps)
    assert reproduce.finished(runs / "dino_sere_s0", steps)
    logged = [int(row["step"]) for row in ev.rundir.CSVLog.read(run / "log.csv")]
    assert logged == list(range(1, steps + 1))
    assert [s for s, _ in reproduce.kept_checkpoints(run)] == [steps_per_epoch, steps]
    # Finished: nothing is trained again, nothing in the directories changes.
    before = {p: p.stat().st_mtime_ns for p in runs.rglob("*") if p.is_file()}
    lines.clear()
    reproduce.train_all(tier, data, runs, epochs, steps, lines.append)
    assert lines == []
    assert {p: p.stat().st_mtime_ns for p in runs.rglob("*") if p.is_file()} == before
    # Past the deadline, what runs is stopped, and what waits is named too.
    lines.clear()
    stopped = reproduce.train_all(tier, data, tmp_path / "late", epochs, steps, lines.append,
                                  deadline=0.0)  # fmt: skip
    assert stopped == ["dino_s0", "dino_sere_s0"]
    assert lines[-1].startswith("stopped dino_s0 at the deadline")


def test_voc_folder_errors_name_the_files(ev: SimpleNamespace, tmp_path: Path) -> None:
    from PIL import Image

    data = ev.seg.ShapesSegmentation(3, 32, seed=2)
    root = ev.seg.write_voc(tmp_path, {"train": data})
    split = ev.seg.VOCSegmentationFolder(root, "train")
    # An RGB mask: the message names the mask's file and its mode.
    Image.new("RGB", (32, 32)).save(root / "SegmentationClass/train_000000.png")
    with pytest.raises(ValueError, match=r"SegmentationClass/train_000000\.png: .* got mode RGB"):
        split[0]
    # A mask of another size: both files and both sizes.
    Image.new("L", (16, 32)).save(root / "SegmentationClass/train_000001.png")
    with pytest.raises(
        ValueError, match=r"train_000001\.png is 16 x 32 px but its image .*32 x 32"
    ):
        split[1]
    # A listed image without files, and one without a mask.
    (root / "SegmentationClass/train_000002.png").unlink()
    with pytest.raises(FileNotFoundError, match=r"'train_000002' of .*train\.txt has no mask"):
        split[2]
    for ext in ("jpg", "png"):
        (root / f"JPEGImages/train_000002.{ext}").unlink(missing_ok=True)
    with pytest.raises(FileNotFoundError, match=r"'train_000002' of .* neither .*\.jpg nor"):
        split[2]


@pytest.mark.parametrize("text", ["1024", "1024,0", "a,b", "1,2,3"])
def test_image_counts_name_the_option(ev: SimpleNamespace, text: str) -> None:
    with pytest.raises(ValueError, match=r"--images: expected 'TRAIN,VAL'.* got '"):
        ev.seg.split_sizes(text)
    assert list(ev.seg.split_sizes("1024,256")) == [1024, 256]
