"""The trainers' command lines (``training/options.py``): a careless value fails at once.

Every numeric option of every trainer is a finite number (or an integer) within a range, so
``--lr -1`` (gradient ascent), ``--clip-grad nan`` (no clipping) or ``--momentum 1.5`` stop
with argparse's message and exit status 2, before any file is written.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("timm", reason="the examples need the 'examples' extra (timm, tqdm)")

TRAINERS = ("dino_sere", "ibot_sere", "mocov3_sere")


def _parser(module: Any, monkeypatch: pytest.MonkeyPatch) -> argparse.ArgumentParser:
    """The parser a trainer builds in ``parse_args``."""
    seen: list[argparse.ArgumentParser] = []

    class Built(Exception):
        pass

    def capture(self: argparse.ArgumentParser, *args: Any, **kwargs: Any) -> Any:
        seen.append(self)
        raise Built

    with monkeypatch.context() as patch:
        patch.setattr(argparse.ArgumentParser, "parse_args", capture)
        with pytest.raises(Built):
            module.parse_args([])
    return seen[0]


def _refused(module: Any, argv: list[str], out: Path, capsys: pytest.CaptureFixture[str]) -> str:
    """What the trainer printed when it refused ``argv``; nothing was written."""
    with pytest.raises(SystemExit) as caught:
        module.main([*argv, "--output-dir", str(out), "--check-images", "0"])
    assert caught.value.code == 2
    assert not out.exists()
    return capsys.readouterr().err


@pytest.mark.parametrize("name", TRAINERS)
def test_every_numeric_option_refuses_nan_before_writing_anything(
    examples: Any,
    name: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    module = getattr(examples, name)
    actions = _parser(module, monkeypatch)._actions
    plain = [a.dest for a in actions if a.type in (int, float)]
    assert not plain, f"numeric options without a range: {plain}"
    numeric = [a for a in actions if isinstance(a.type, examples.options.Number)]
    assert len(numeric) >= 12
    for action in numeric:
        flag = action.option_strings[0]
        count = action.nargs if isinstance(action.nargs, int) else 1
        err = _refused(module, [flag, *["nan"] * count], tmp_path / "run", capsys)
        assert f"argument {flag}: expected " in err, err
        assert "got nan" in err or "got 'nan'" in err, err


@pytest.mark.parametrize(
    ("name", "argv", "message"),
    [
        ("dino_sere", ["--lr", "-1"], "argument --lr: expected a finite number > 0, got -1"),
        ("dino_sere", ["--lr", "nan"], "argument --lr: expected a finite number > 0, got nan"),
        (
            "ibot_sere",
            ["--clip-grad", "nan"],
            "--clip-grad: expected a finite number >= 0, got nan",
        ),
        ("dino_sere", ["--momentum", "1.5"], "--momentum: expected a finite number in [0, 1], got"),
        ("mocov3_sere", ["--moco-m", "-0.1"], "--moco-m: expected a finite number in [0, 1], got"),
        ("mocov3_sere", ["--moco-t", "0"], "--moco-t: expected a finite number > 0, got 0"),
        ("ibot_sere", ["--alpha", "-1"], "argument --alpha: expected a finite number >= 0, got -1"),
        ("dino_sere", ["--teacher-temp", "0.04", "inf"], "--teacher-temp: expected a finite"),
        (
            "dino_sere",
            ["--epochs", "2.5"],
            "argument --epochs: expected an integer >= 1, got '2.5'",
        ),
        ("mocov3_sere", ["--workers", "-1"], "argument --workers: expected an integer >= 0, got"),
        ("dino_sere", ["--seed", "-3"], "--seed: expected an integer in [0, 1000000], got -3"),
        (
            "dino_sere",
            ["--alpha", "0", "--beta", "0"],
            "--alpha 0 and --beta 0 leave SERE nothing to add: use --no-sere",
        ),
        (
            "ibot_sere",
            ["--alpha", "3", "--beta", "1.5"],
            "--ibot-weight authors needs --alpha + --beta < 4 (L_iBOT's weight > 0)",
        ),
    ],
)
def test_careless_values_are_refused_with_the_option_named(
    examples: Any,
    name: str,
    argv: list[str],
    message: str,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    err = _refused(getattr(examples, name), argv, tmp_path / "run", capsys)
    assert message in err, err


def test_sensible_edge_values_are_taken(examples: Any) -> None:
    args = examples.dino_sere.parse_args(
        ["--momentum", "1", "--clip-grad", "0", "--no-sere", "--alpha", "0", "--beta", "0"]
    )
    assert (args.momentum, args.clip_grad, args.alpha) == (1.0, 0.0, 0.0)
    ibot = examples.ibot_sere.parse_args(
        ["--alpha", "3", "--beta", "1.5", "--ibot-weight", "paper"]
    )
    assert ibot.alpha + ibot.beta == 4.5
    assert examples.mocov3_sere.parse_args(["--seed", "1000000"]).seed == 1_000_000
