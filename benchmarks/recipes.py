"""What each difference between ``--recipe authors`` and ``--recipe paper`` does, measured.

    python benchmarks/recipes.py            # minutes on 2 CPU cores (27 min under heavy load)

For each setting where the authors' code and the paper's text differ (SPEC 8), the SERE loss is
computed both ways on the same tokens, heads and crops, everything else held fixed, and the
script reports how far ``L_p`` moves (relative difference) and how the spatial term's gradient
with respect to the student's tokens turns (cosine; 1 = same direction) or scales (norm ratio).

Tokens, each with the trainer's own crops of synthetic photos (``SyntheticImages``):

- ``vit_s_init``: a ViT-S/16 at initialisation (the first step of every run), DINO's crops,
  2 x 224 + 4 x 96 px, batch 8: 14 x 14 and 6 x 6 tokens, 13 x 13 and 6 x 6 lattices.
- ``tiny_trained``: the ``tiny`` preset after a short DINO + SERE run (``--epochs 8 --lr 0.004``,
  64 steps of batch 16, the authors' recipe), tokens that training has begun to shape, 64 / 32 px
  crops.
- ``vit_b_init``: a ViT-B/16 at initialisation (for the spatial heads, 6 against 12), batch 4.

Also: how often the crop samplers give a (teacher, student) pair that does not overlap, over
images of several aspect ratios; how much weight decay on biases shrinks them over a 100-epoch
ImageNet run; and, on the CPU, how far fp16 and bf16 autocast move the losses from fp32 (an
indication only: GPUs round differently). The results go to ``benchmarks/results/recipes.json``
and ``.md``.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "examples"))

import dino_sere  # noqa: E402
from torchvision.transforms import v2  # noqa: E402
from training import checkpoints, data, optim, options  # noqa: E402

from sere_loss import SERELoss  # noqa: E402
from sere_loss.transforms import dino_sere_transform  # noqa: E402


def _tokens(vit: nn.Module, views: list[Tensor]) -> list[Tensor]:
    """Pre-norm patch tokens of the last block, one tensor per resolution (globals first)."""
    out, start = [], 0
    while start < len(views):
        end = start
        while end < len(views) and views[end].shape[-1] == views[start].shape[-1]:
            end += 1
        with torch.no_grad():
            _, (patches,) = vit.forward_intermediates(  # type: ignore[operator]
                torch.cat(views[start:end]), indices=1, norm=False, output_fmt="NLC"
            )
        out.append(patches)
        start = end
    return out


def _batch(preset: Any, batch: int, seed: int = 0) -> tuple[list[Tensor], Tensor, Tensor]:
    """One collated batch of the preset's DINO crops of synthetic photos."""
    torch.manual_seed(seed)
    transform = dino_sere_transform(
        global_size=preset.global_px, local_size=preset.local_px, num_local=preset.num_local,
        global_scale=preset.global_scale, local_scale=preset.local_scale,
    )  # fmt: skip
    images = data.SyntheticImages(batch, preset.synthetic_size, seed=seed)
    crops = [transform(images[i][0]) for i in range(batch)]
    views = [torch.stack([c.views[v] for c in crops]) for v in range(len(crops[0].views))]
    return views, torch.stack([c.boxes for c in crops]), torch.stack([c.flips for c in crops])


def _spatial(
    options: dict[str, Any], heads_from: SERELoss | None, tokens: list[Tensor], boxes: Tensor,
    flips: Tensor, teacher: list[Tensor],
) -> tuple[float, Tensor, SERELoss]:  # fmt: skip
    """``L_p`` and its gradient with respect to the student tokens (globals, then locals)."""
    dim = tokens[0].shape[-1]
    torch.manual_seed(1)
    sere = SERELoss(dim, beta=0.0, **options)
    if heads_from is not None:
        sere.load_state_dict(heads_from.state_dict())
    leaves = [t.detach().clone().requires_grad_() for t in tokens]
    local = leaves[1] if len(leaves) > 1 else None
    loss = sere(leaves[0], teacher[0], boxes, flips, local)
    grads = torch.autograd.grad(loss, leaves)
    return float(loss.detach()), torch.cat([g.flatten() for g in grads]), sere


def _compare(a: tuple[float, Tensor, Any], b: tuple[float, Tensor, Any]) -> dict[str, float]:
    cos = float(torch.nn.functional.cosine_similarity(a[1], b[1], dim=0))
    return {
        "loss_a": a[0],
        "loss_b": b[0],
        "relative_difference": abs(b[0] - a[0]) / abs(a[0]),
        "gradient_cosine": cos,
        "gradient_norm_ratio": float(b[1].norm() / a[1].norm()),
    }


PAPER = {"points": "center", "padding": "border", "empty_pairs": "mask", "num_heads": 6}


def measure_tokens(name: str, preset: Any, vit: nn.Module, batch: int) -> dict[str, Any]:
    """Each SERE difference of the recipes on one set of tokens."""
    views, boxes, flips = _batch(preset, batch)
    vit.eval()
    student = _tokens(vit, views)
    teacher = [t + 0.05 * t.std() * torch.randn_like(t) for t in student[:1]]  # an EMA's drift
    authors = {**PAPER, "points": "official", "padding": "zeros", "empty_pairs": "uniform"}
    base = _spatial(PAPER, None, student, boxes, flips, teacher)
    heads = base[2]

    def run(**change: Any) -> tuple[float, Tensor, Any]:
        return _spatial({**PAPER, **change}, heads, student, boxes, flips, teacher)

    result: dict[str, Any] = {"tokens": name, "batch": batch, "grid": list(student[0].shape)}
    result["lattice_and_padding"] = _compare(
        base, run(points="official", padding="zeros")
    )  # the recipes' lattice difference, empty pairs masked in both
    result["points_only"] = _compare(base, run(points="official"))
    result["padding_only"] = _compare(base, run(padding="zeros"))
    official = run(points="official", padding="zeros")
    result["empty_pairs"] = _compare(official, run(points="official", padding="zeros",
                                                   empty_pairs="uniform"))  # fmt: skip
    result["empty_pairs"]["empty_fraction_in_batch"] = _empty_fraction(boxes)
    result["authors_vs_paper"] = _compare(base, _spatial(authors, heads, student, boxes, flips,
                                                         teacher))  # fmt: skip
    # The prediction head's initialisation: PyTorch's default (now the library's) against the
    # Kaiming fan-out normal the library used before.
    kaiming = copy.deepcopy(heads)
    for term in (kaiming.spatial,):
        assert term is not None
        for linear in (term.heads.prediction[0], term.heads.local_prediction[0]):
            nn.init.kaiming_normal_(linear.weight, mode="fan_out", nonlinearity="relu")
    result["head_init"] = _compare(base, _spatial(PAPER, kaiming, student, boxes, flips, teacher))
    return result


def _empty_fraction(boxes: Tensor) -> float:
    """Of the (teacher global, student view) pairs of the batch, the share without overlap."""
    empty = total = 0
    views = boxes.shape[1]
    for i in range(2):
        for v in range(views):
            if v == i:
                continue
            a, b = boxes[:, i], boxes[:, v]
            w = torch.minimum(a[:, 2], b[:, 2]) - torch.maximum(a[:, 0], b[:, 0])
            h = torch.minimum(a[:, 3], b[:, 3]) - torch.maximum(a[:, 1], b[:, 1])
            empty += int(((w <= 0) | (h <= 0)).sum())
            total += len(a)
    return empty / total


def crop_statistics(samples: int = 4000) -> list[dict[str, Any]]:
    """Share of non-overlapping pairs under the DINO and iBOT crop scales, by aspect ratio."""
    rows = []
    gen_state = torch.get_rng_state()
    torch.manual_seed(0)
    for method, global_scale, local_scale, locals_ in (
        ("dino", (0.35, 1.0), (0.05, 0.35), 4),
        ("ibot", (0.4, 1.0), (0.05, 0.4), 10),
    ):
        for width, height in ((256, 256), (400, 300), (448, 252), (500, 200)):
            image = torch.empty(3, height, width)
            boxes = []
            for _ in range(samples):
                crops = []
                for scale in [global_scale] * 2 + [local_scale] * locals_:
                    top, left, h, w = v2.RandomResizedCrop.get_params(
                        image, list(scale), [3 / 4, 4 / 3]
                    )
                    crops.append([left / width, top / height, (left + w) / width,
                                  (top + h) / height])  # fmt: skip
                boxes.append(crops)
            fraction = _empty_fraction(torch.tensor(boxes))
            pairs = 2 * (1 + locals_)
            rows.append({
                "method": method, "aspect": f"{width}x{height}", "empty_fraction": fraction,
                "gradient_scale": 1 - fraction, "pairs_per_image": pairs,
            })  # fmt: skip
    torch.set_rng_state(gen_state)
    return rows


def heads_count(vit: nn.Module, preset: Any, batch: int) -> dict[str, Any]:
    """Spatial heads 6 (the paper) against the backbone's own (the authors) on ViT-B tokens."""
    views, boxes, flips = _batch(preset, batch)
    vit.eval()
    student = _tokens(vit, views)
    teacher = [t + 0.05 * t.std() * torch.randn_like(t) for t in student[:1]]
    base = _spatial(PAPER, None, student, boxes, flips, teacher)
    heads = options.vit_heads(vit)
    return {"heads": heads, **_compare(base, _spatial({**PAPER, "num_heads": heads}, base[2],
                                                      student, boxes, flips, teacher))}  # fmt: skip


def precision_effect(vit: nn.Module, preset: Any, batch: int) -> dict[str, Any]:
    """L_p and L_c under CPU autocast, fp16 and bf16, against fp32 (an indication only)."""
    views, boxes, flips = _batch(preset, batch)
    vit.eval()
    torch.manual_seed(1)
    sere = SERELoss(vit.embed_dim, **{**PAPER, "points": "official", "padding": "zeros"})  # type: ignore[arg-type]
    out: dict[str, Any] = {}
    reference = None
    for name, dtype in (("fp32", None), ("bf16", torch.bfloat16), ("fp16", torch.float16)):
        context = (
            torch.autocast("cpu", dtype=dtype) if dtype else torch.autocast("cpu", enabled=False)
        )
        with context, torch.no_grad():
            tokens = _tokens(vit, views)
            _, terms = sere(tokens[0], tokens[0], boxes, flips, tokens[1], return_terms=True)
        values = {k: float(v) for k, v in terms.items()}
        if reference is None:
            reference = values
        out[name] = {k: {"value": v, "relative_error": abs(v - reference[k]) / abs(reference[k])}
                     for k, v in values.items()}  # fmt: skip
    return out


def bias_decay(world_size: int = 8, images: int = 1_281_167) -> dict[str, Any]:
    """What weight decay on biases means over the DINO ViT-S/16 run: parameters and shrinkage."""
    preset = dino_sere.PRESETS["vit_small"]
    with torch.device("meta"):
        vit = options.build_vit(preset, 0.1)
        sere = SERELoss(384, **options.RECIPES["authors"].sere_options(vit))
    counts = {}
    for rule, kwargs in (("authors", {"decay_biases": True}), ("dino", {})):
        groups = optim.param_groups([vit, sere], **kwargs)
        counts[rule] = {
            "decayed_tensors": len(groups[0]["params"]),
            "decayed_values": sum(p.numel() for p in groups[0]["params"]),
        }
    steps = images // (preset.batch_size * world_size)
    args = dino_sere.parse_args(["--preset", "vit_small"])
    schedule = dino_sere.schedules(args, preset, steps, world_size)
    pairs = zip(schedule["lr"], schedule["wd"], strict=True)
    shrink = math.exp(sum(math.log1p(-lr * wd) for lr, wd in pairs))
    return {
        "counts": counts,
        "biases_decayed": counts["authors"]["decayed_values"] - counts["dino"]["decayed_values"],
        "steps": len(schedule["lr"]),
        "shrink_over_run_without_gradient": shrink,
    }


def train_tiny(work: Path) -> nn.Module:
    """The tiny preset after 64 steps of DINO + SERE (authors' recipe, 8x the lr); its ViT."""
    out = work / "tiny"
    argv = ["--preset", "tiny", "--epochs", "8", "--lr", "0.004", "--output-dir", str(out)]
    dino_sere.main([*argv, "--no-progress", "--workers", "0", "--check-images", "0"])
    state = checkpoints.load_checkpoint(out / "checkpoint.pth")
    vit = options.build_vit(dino_sere.PRESETS["tiny"], 0.0)
    vit.load_state_dict({k.removeprefix("backbone."): v for k, v in state["student"].items()
                         if k.startswith("backbone.")})  # fmt: skip
    return vit


def markdown(record: dict[str, Any]) -> str:
    """The record as a page, one table per question."""

    def row(name: str, c: dict[str, float]) -> str:
        return (f"| {name} | {c['loss_a']:.4f} | {c['loss_b']:.4f} | "
                f"{100 * c['relative_difference']:.1f} % | {c['gradient_cosine']:.3f} | "
                f"{c['gradient_norm_ratio']:.3f} |")  # fmt: skip

    lines = ["# The recipes' differences, measured", "", f"`python benchmarks/recipes.py`, "
             f"{record['date']}, {record['machine']}, torch {record['torch']}, commit "
             f"`{record['commit']}`, {record['seconds']:.0f} s.", ""]  # fmt: skip
    for t in record["tokens"]:
        lines += [f"## {t['tokens']} (student tokens {t['grid']}, batch {t['batch']})", "",
                  "| change (a -> b) | L_p a | L_p b | L_p moves | gradient cosine | "
                  "gradient norm b/a |", "|---|---:|---:|---:|---:|---:|"]  # fmt: skip
        lines.append(row("paper lattice -> authors' (edge to edge, zero padding)",
                         t["lattice_and_padding"]))  # fmt: skip
        lines.append(row("  points only: cell centres -> edge to edge", t["points_only"]))
        lines.append(row("  padding only: border -> zeros", t["padding_only"]))
        share = 100 * t["empty_pairs"]["empty_fraction_in_batch"]
        lines.append(row(f"empty pairs masked -> log S ({share:.1f} % of pairs empty)",
                         t["empty_pairs"]))  # fmt: skip
        lines.append(row("paper recipe -> authors' recipe (all of the above)",
                         t["authors_vs_paper"]))  # fmt: skip
        lines.append(row("prediction init: PyTorch default -> Kaiming fan-out (old)",
                         t["head_init"]))  # fmt: skip
        lines.append("")
    h = record["heads"]
    lines += ["## Spatial heads on ViT-B/16 tokens", "", "| change | L_p a | L_p b | L_p moves | "
              "gradient cosine | gradient norm b/a |", "|---|---:|---:|---:|---:|---:|",
              row(f"6 heads (paper) -> {h['heads']} (the backbone's, authors)", h), ""]  # fmt: skip
    lines += ["## Pairs without overlap, by image shape", "",
              "| crops | image | empty pairs | spatial gradient scale with log S |",
              "|---|---|---:|---:|"]  # fmt: skip
    for c in record["crops"]:
        lines.append(f"| {c['method']} | {c['aspect']} | {100 * c['empty_fraction']:.1f} % | "
                     f"{c['gradient_scale']:.3f} |")  # fmt: skip
    b = record["bias_decay"]
    lines += ["", "## Weight decay on biases (DINO ViT-S/16 + SERE, 100 epochs, batch 512)", "",
              f"- The authors' rule decays {b['biases_decayed']:,} more values "
              f"({b['counts']['authors']['decayed_tensors']} tensors against "
              f"{b['counts']['dino']['decayed_tensors']}).",
              f"- Over {b['steps']:,} steps, decay alone multiplies a bias by "
              f"{b['shrink_over_run_without_gradient']:.2e} (the product of 1 - lr * wd).",
              ""]  # fmt: skip
    p = record["precision"]
    lines += ["## Autocast on the CPU (ViT-S/16 at init, an indication only)", "",
              "| precision | L_p rel. error | L_c rel. error |", "|---|---:|---:|"]  # fmt: skip
    for name in ("bf16", "fp16"):
        lines.append(f"| {name} | {p[name]['spatial']['relative_error']:.2e} | "
                     f"{p[name]['channel']['relative_error']:.2e} |")  # fmt: skip
    return "\n".join(lines) + "\n"


def main() -> None:
    """Measure everything; write ``recipes.json`` and ``recipes.md``."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = parser.parse_args()
    tic = time.perf_counter()
    torch.manual_seed(0)
    small = dino_sere.PRESETS["vit_small"]
    tiny = dino_sere.PRESETS["tiny"]
    vit_s = options.build_vit(small, 0.0)
    record: dict[str, Any] = {"tokens": [measure_tokens("vit_s_init", small, vit_s, 8)]}
    with tempfile.TemporaryDirectory() as work:
        trained = train_tiny(Path(work))
    record["tokens"].append(measure_tokens("tiny_trained", tiny, trained, 16))
    import ibot_sere

    base = ibot_sere.PRESETS["vit_base"]
    torch.manual_seed(0)
    record["heads"] = heads_count(options.build_vit(base, 0.0), base, 4)
    record["crops"] = crop_statistics()
    record["bias_decay"] = bias_decay()
    record["precision"] = precision_effect(vit_s, small, 4)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT,
                            capture_output=True, text=True, check=False).stdout.strip()  # fmt: skip
    cpu = platform.processor() or platform.machine()
    record |= {
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{cpu}, {torch.get_num_threads()} threads",
        "torch": torch.__version__,
        "commit": commit,
        "seconds": time.perf_counter() - tic,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "recipes.json").write_text(json.dumps(record, indent=1) + "\n")
    (args.out / "recipes.md").write_text(markdown(record))
    print(markdown(record))


if __name__ == "__main__":
    main()
