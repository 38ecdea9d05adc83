"""Numeric flags of every mode are checked by argparse (finite, in range) with a message naming the flag."""
from __future__ import annotations

import pytest

import main

REQUIRED = {"infer": ["--weights", "w.pth", "--images", "x.jpg"], "eval": ["--weights", "w.pth"],
            "train": [], "trainval": []}

BAD_IMAGES = "expected a number of images (e.g. 10) or a percentage from 0% to 100% (e.g. 1%)"
BAD = [
    ("infer", "--threshold", "nan", "expected a number in [0, 1], got nan"),
    ("infer", "--threshold", "-1", "expected a number in [0, 1], got -1"),
    ("infer", "--threshold", "1.5", "expected a number in [0, 1], got 1.5"),
    ("infer", "--batch-size", "0", "expected an integer in [1, inf), got 0"),
    ("eval", "--batch-size", "2.5", "expected an integer in [1, inf), got '2.5'"),
    ("eval", "--workers", "-1", "expected an integer in [0, inf), got -1"),
    ("eval", "--max-images", "0", "expected an integer in [1, inf), got 0"),
    ("eval", "--max-bad-images", "101%", f"{BAD_IMAGES}, got '101%'"),
    ("train", "--max-bad-images", "-3", f"{BAD_IMAGES}, got '-3'"),
    ("train", "--epochs", "0", "expected a number in (0, inf), got 0"),
    ("train", "--epochs", "inf", "expected a number in (0, inf), got inf"),
    ("train", "--lr", "nan", "expected a number in (0, inf), got nan"),
    ("train", "--lr", "-0.1", "expected a number in (0, inf), got -0.1"),
    ("train", "--warmup-epochs", "-1", "expected a number in [0, inf), got -1"),
    ("train", "--weight-decay", "-0.1", "expected a number in [0, inf), got -0.1"),
    ("train", "--clip-norm", "nan", "expected a number in [0, inf), got nan"),
    ("train", "--ema-decay", "1", "expected a number in [0, 1), got 1"),
    ("train", "--ema-decay", "-0.5", "expected a number in [0, 1), got -0.5"),
    ("train", "--label-smoothing", "1", "expected a number in [0, 1), got 1"),
    ("train", "--seed", "-1", "expected an integer in [0, 9223372036854775807], got -1"),
    ("train", "--save-every", "0", "expected an integer in [1, inf), got 0"),
    ("train", "--log-every", "-5", "expected an integer in [1, inf), got -5"),
    ("trainval", "--eval-every", "0", "expected an integer in [1, inf), got 0"),
    ("trainval", "--val-max-images", "0", "expected an integer in [1, inf), got 0"),
]


def _parse(mode, *flags):
    return main.parse_args(["-mode", mode, *REQUIRED[mode], *flags])


@pytest.mark.parametrize("mode, flag, value, message", BAD, ids=[f"{m}{f}={v}" for m, f, v, _ in BAD])
def test_bad_numbers_are_refused_naming_the_flag(mode, flag, value, message, capsys):
    with pytest.raises(SystemExit) as exit_:
        _parse(mode, flag, value)
    assert exit_.value.code == 2
    assert capsys.readouterr().err.splitlines()[-1] == f"main.py: error: argument {flag}: {message}"


@pytest.mark.parametrize("values, message", [(["0", "1"], "expected a number in (0, inf), got 0"),
                                             (["nan", "1"], "expected a number in (0, inf), got nan"),
                                             (["2", "1"], "expected MIN <= MAX, got 2 1")])
def test_jitter_range(values, message, capsys):
    with pytest.raises(SystemExit):
        _parse("train", "--jitter", *values)
    assert capsys.readouterr().err.splitlines()[-1] == f"main.py: error: argument --jitter: {message}"


def test_boundary_values_are_accepted():
    args = _parse("infer", "--threshold", "0", "--batch-size", "1")
    assert args.threshold == 0.0 and _parse("infer", "--threshold", "1").threshold == 1.0
    args = _parse("trainval", "--epochs", "0.5", "--clip-norm", "0", "--ema-decay", "0", "--warmup-epochs", "0",
                  "--jitter", "1", "1", "--max-bad-images", "0", "--seed", "0")
    assert (args.epochs, args.clip_norm, args.jitter, args.max_bad_images.of(100)) == (0.5, 0.0, (1.0, 1.0), 0)
    assert _parse("eval", "--max-bad-images", "100%").max_bad_images.of(7) == 7
    assert _parse("train").max_bad_images.of(1000) == 10  # default 1 %


def test_every_numeric_flag_of_every_mode_is_validated():
    """No flag of any mode parses with a bare int / float (which take nan, inf and any sign)."""
    unchecked = []
    for mode in main.MODES:
        for action in main.build_parser(mode)._actions:
            if action.type in (int, float) and action.dest != "image_size":  # --image-size: its own parser
                unchecked.append(f"{mode} {action.option_strings[0]}")
    assert unchecked == []
