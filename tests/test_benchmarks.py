"""The benchmark harness: its statistics, its rounds and what it records (no timing claims)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))

import cases  # noqa: E402
import record  # noqa: E402
import report  # noqa: E402
import run  # noqa: E402
import stats  # noqa: E402


@pytest.mark.parametrize("q", [0.0, 0.25, 0.5, 0.75, 1.0])
def test_quantile_is_numpys_linear_rule(q: float) -> None:
    values = [3.0, 1.0, 7.0, 2.0, 9.5, 4.0, 4.5]
    assert stats.quantile(values, q) == pytest.approx(float(np.quantile(values, q)))


def test_median_interval_from_order_statistics() -> None:
    seven = [5.0, 1.0, 4.0, 2.0, 7.0, 3.0, 6.0]
    # With 7 values only the range reaches 95 %: 1 - 2 / 2**7 = 98.4375 %.
    assert stats.median_interval(seven) == (1.0, 7.0, 1 - 2 / 2**7)
    twenty = [float(x) for x in range(1, 21)]
    # n = 20: P(Bin(20, 1/2) <= 5) = 21700 / 2**20, so the 6th smallest and 6th largest give
    # 1 - 2 * 21700 / 2**20 = 95.86 %; the 7th would give 88.5 %.
    low, high, cover = stats.median_interval(twenty)
    assert (low, high) == (6.0, 15.0)
    assert cover == pytest.approx(1 - 2 * 21700 / 2**20)
    assert stats.median_interval([3.0]) == (3.0, 3.0, 0.0)  # one round claims no coverage


def test_ratios_are_taken_within_rounds() -> None:
    # Load moves both sides of a round together: the per-round ratios are 2 and 4, while a ratio
    # of the medians (8 / 3) would describe no round at all.
    baseline = [2.0, 4.0, 6.0, 8.0, 10.0, 12.0, 14.0]
    fast = [1.0, 1.0, 3.0, 2.0, 5.0, 3.0, 7.0]
    s = stats.ratio_summary(baseline, fast)
    assert s["values"] == pytest.approx([2.0, 4.0, 2.0, 4.0, 2.0, 4.0, 2.0])
    assert s["median"] == pytest.approx(2.0)
    assert (s["q25"], s["q75"]) == pytest.approx((2.0, 4.0))
    assert (s["ci_low"], s["ci_high"]) == pytest.approx((2.0, 4.0))
    with pytest.raises(ValueError, match="same rounds"):
        stats.ratio_summary([1.0, 2.0], [1.0])


def test_rounds_warm_up_every_case_and_rotate_the_order() -> None:
    calls: list[str] = []

    def case(name: str) -> cases.Case:
        leaf = torch.zeros((), requires_grad=True)

        def loss() -> torch.Tensor:
            calls.append(name)
            return leaf * 2

        return cases.Case(cases.SETTINGS["quick"], name, "sere", loss, [leaf])

    built = [case("a"), case("b"), case("c")]
    times, numbers, cpu = run.time_rounds(built, 4, torch.device("cpu"), min_sample_s=0.0)
    assert numbers == {"a": 1, "b": 1, "c": 1}
    # Each case: an untimed warm-up step and a timed one that sizes its samples, then rounds.
    assert calls[:6] == ["a", "a", "b", "b", "c", "c"]
    assert calls[6:] == [*"abc", *"bca", *"cab", *"abc"]
    assert {name: len(t) for name, t in times.items()} == {"a": 4, "b": 4, "c": 4}
    assert {name: len(t) for name, t in cpu.items()} == {"a": 4, "b": 4, "c": 4}


def test_dirty_state_covers_the_whole_tree(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def git(*args: str) -> None:
        subprocess.run(["git", *args], cwd=tmp_path, check=True, capture_output=True)

    git("init", "-q")
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "a.py").write_text("x = 1\n")
    git("add", ".")
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "a")
    monkeypatch.setattr(record, "ROOT", tmp_path)
    assert record.dirty() == []
    (tmp_path / "src" / "a.py").write_text("x = 2\n")
    (tmp_path / "benchmarks").mkdir()
    (tmp_path / "benchmarks" / "new.py").write_text("")
    assert record.dirty() == [" M src/a.py", "?? benchmarks/new.py"]


def test_record_names_the_machine_threads_and_allocator() -> None:
    env = record.environment(torch.device("cpu"))
    assert env["device"]["cores"]
    assert env["device"]["cpu"]
    assert env["threads"]["torch_intra_op"] == torch.get_num_threads()
    assert "mallopt" in env["allocator"]
    assert env["versions"]["torch"] == torch.__version__


def _results(speedups: list[float], memory: float, share: float) -> dict[str, Any]:
    base = [1.0] * len(speedups)
    runs = {
        "library": {
            "speedup": stats.ratio_summary(speedups, base),
            "memory_ratio": memory,
        },
        "library:chunked": {"speedup": stats.ratio_summary(speedups, base), "memory_ratio": 0.25},
    }
    terms = {term: {"impls": runs} for term in ("sere", "channel")}
    shares = [share] * 7
    return {
        "device": {"type": "cpu"},
        "settings": [{"name": "dino_b32", "terms": terms}],
        "dino_step": {
            "status": "measured",
            "batch": 8,
            "share": stats.ratio_summary(shares, [1.0] * 7),
        },
    }


def test_targets_use_the_median_and_say_whether_the_interval_clears() -> None:
    rows = report.evaluate_targets(_results([1.9, 2.05, 2.1, 2.1, 2.2, 2.3, 2.4], 0.4, 0.02))
    speed, memory, _, memory_chunked, channel, share = rows
    assert speed["met"] is True
    assert speed["clears"] is False  # the interval (the range here) reaches down to 1.9
    assert memory["met"] is False
    assert memory_chunked["met"] is True
    assert channel["met"] is True
    assert share["met"] is True
    assert share["clears"] is True
    table = report.targets_table(rows)
    assert "yes (median; the interval reaches past the bound)" in table
    assert "**no**" in table


def test_sere_profile_counts_product_work_by_hand() -> None:
    import sere_profile

    assert sere_profile._flops("aten::mm", [[6, 4], [4, 5]]) == 2 * 6 * 4 * 5
    # baddbmm(input, batch1, batch2): the products are the second and third inputs
    assert (
        sere_profile._flops("aten::baddbmm", [[3, 6, 5], [3, 6, 4], [3, 4, 5]]) == 2 * 3 * 6 * 4 * 5
    )
    assert sere_profile._flops("aten::bmm", [[3, 6, 4], [3, 4, 5]]) == 2 * 3 * 6 * 4 * 5
    assert sere_profile._flops("aten::dot", [[7], [7]]) == 14
    assert sere_profile._flops("aten::add", [[7], [7]]) == 0
    assert sere_profile._kind("aten::mm", "MmBackward0") == "heads: linear"
    assert (
        sere_profile._kind("aten::bmm", "_BlockedGramCEBackward") == "relations: batched products"
    )
    assert (
        sere_profile._kind("aten::exp_", "_PairedChannelCE") == "relations: softmax and elementwise"
    )
    assert sere_profile._kind("aten::sort", "EmbeddingBagBackward0") == "sampling"


def test_sere_profile_sums_every_op_once_and_counts_the_heads_products() -> None:
    import sere_profile

    rec = sere_profile.profile_sere(batch=2, rounds=1, preset="tiny")
    kinds = rec["kinds"]
    assert set(kinds) == set(sere_profile.KINDS)
    assert sum(k["ms"] for k in kinds.values()) == pytest.approx(rec["profiled_aten_ms"])
    assert sum(k["share"] for k in kinds.values()) == pytest.approx(1.0)
    for kind in sere_profile.KINDS:
        assert kinds[kind]["ms"] > 0, kind
    # The heads' linear maps, by hand: tiny preset, C = 96; batch 2 x (2 views of 8 x 8 tokens
    # + 4 of 4 x 4); each term's prediction heads run one product forward and two backward.
    rows, dim = 2 * (2 * 64 + 4 * 16), 96
    assert rec["products"]["mm"]["gflop"] == pytest.approx(2 * 3 * 2 * rows * dim * dim / 1e9)
    assert rec["mm_rate_shape"] == [2 * 2 * 64, dim, dim]
    assert rec["mm_rate_gflops"] > 0


def test_device_op_counter_counts_kernels_not_views() -> None:
    import sere_profile

    x = torch.empty(4, 6, device="meta", requires_grad=True)
    with sere_profile._DeviceOps() as ops:
        y = (x + 1).view(24).t().exp()  # two kernels; the views launch none
        y.sum().backward()  # sum, its backward (expand: a view, then a copy into .grad), exp's
    assert ops.counts["add"] == 1
    assert ops.counts["exp"] == 1
    assert "view" not in ops.counts
    assert "t" not in ops.counts
    cpu = torch.ones(3)
    with sere_profile._DeviceOps() as ops:
        cpu.add(1)  # a CPU tensor is not the tokens' device: not counted
    assert not ops.counts


def test_sere_sends_few_operations_to_the_device() -> None:
    # On a GPU SERE is bound by launching kernels (the CUDA check's profile: 6.8 ms of kernels in
    # 17.5 ms at batch 64), so the count of operations per call is the figure to keep down. It
    # was 607 at batch 64 before the bilinear taps were computed for their four corners and two
    # axes at once, 321 after (311 at batch 8). The bound leaves room for a torch version's
    # other decompositions, not for a loop over pairs or corners again.
    import sere_profile

    counted = sere_profile.count_device_ops(batch=8)
    assert counted["total"] == sum(counted["by_op"].values())
    assert counted["total"] <= 350, counted["by_op"]
    bigger = sere_profile.count_device_ops(batch=64)
    assert bigger["total"] <= counted["total"] + 10, "per-image work must not become per-op"


def test_backbones_takes_every_ratio_within_rounds_against_the_first_row(tmp_path: Path) -> None:
    """``backbones.py``: the first row is the reference (ratio 1 in every round), every other
    row's ratio is per image, from the same rounds, and the record says how it was run."""
    import json

    import backbones

    threads = torch.get_num_threads()
    try:
        code = backbones.main(
            ["--quick", "--rounds", "2", "--threads", "1", "--out", str(tmp_path)]
        )
    finally:
        torch.set_num_threads(threads)
    assert code == 0
    record = json.loads((tmp_path / "backbones-quick.json").read_text())
    first, other = record["rows"]
    assert first["per_image_vs_first"]["values"] == [1.0, 1.0]
    assert len(first["seconds"]["values"]) == len(other["seconds"]["values"]) == 2
    expected = [
        (t / other["batch"]) / (r / first["batch"])
        for t, r in zip(other["seconds"]["values"], first["seconds"]["values"], strict=True)
    ]
    assert other["per_image_vs_first"]["values"] == pytest.approx(expected)
    assert record["rounds"] == 2
    assert "commit" in record["environment"]


def _worktrees() -> list[str]:
    listing = subprocess.run(
        ["git", "-C", str(BENCHMARKS.parent), "worktree", "list", "--porcelain"],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    return [line for line in listing.stdout.splitlines() if line.startswith("worktree ")]


@pytest.mark.skipif(not (BENCHMARKS.parent / ".git").exists(), reason="needs a git checkout")
def test_against_times_this_tree_against_a_commit(tmp_path: Path) -> None:
    before = _worktrees()
    out = subprocess.run(
        [sys.executable, str(BENCHMARKS / "against.py"), "--ref", "HEAD", "--settings", "quick",
         "--rounds", "5", "--min-sample", "0", "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=600, check=False,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    saved = json.loads((tmp_path / "against-HEAD.json").read_text())
    assert [(r["backend"], r["recipe"]) for r in saved["rows"]] == [
        ("auto", "authors"), ("auto", "paper"), ("chunked", "authors"), ("chunked", "paper")
    ]  # fmt: skip
    for row in saved["rows"]:
        assert len(row["seconds"]["this"]) == len(row["seconds"]["other"]) == 5
        assert row["ratio"]["median"] > 0
    assert "| quick | chunked | paper |" in (tmp_path / "against-HEAD.md").read_text()
    assert _worktrees() == before  # the other tree's worktree is removed


def test_against_refuses_to_time_two_different_losses() -> None:
    import against

    import sere_loss

    class Other(sere_loss.SERELoss):
        def forward(self, *args: Any, **kwargs: Any) -> Any:
            return 1.01 * super().forward(*args, **kwargs)

    other = type(sys)("other")
    other.SERELoss = Other  # type: ignore[attr-defined]
    libraries = {"this": sere_loss, "other": other}
    with pytest.raises(SystemExit, match=r"quick, backend='auto', recipe 'paper': the two trees "):
        against.compare(libraries, cases.SETTINGS["quick"], "auto", "paper", 5, 0.0)
    row = against.compare(
        {"this": sere_loss, "other": sere_loss}, cases.SETTINGS["quick"], "auto", "paper", 5, 0.0
    )
    assert row["ratio"]["n"] == 5
