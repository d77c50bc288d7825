"""The comparison the reproducibility test makes (tests/reproduce.py), on the committed example."""

from __future__ import annotations

import copy
import json

from .reproduce import EXAMPLE, REL_TOL, differences


def test_a_last_bit_difference_reproduces_and_a_real_one_does_not():
    expected = json.loads(EXAMPLE.read_text())
    assert differences(expected, copy.deepcopy(expected)) == []

    ulp = copy.deepcopy(expected)  # what CI's machine gave on 2026-12-07: one float32 ulp off
    ulp["baseline"]["eval_loss"] = 3.2049333268592926
    ulp["trials"][0]["evals"][0][1] *= 1 + 5e-8
    assert differences(expected, ulp) == []

    moved = copy.deepcopy(expected)
    moved["trials"][4]["eval_loss"] *= 1 + 20 * REL_TOL
    moved["trials"][5]["parameters"]["train.learning_rate"] *= 1 + 1e-9  # a proposal moved: exact
    moved["replicates"][0]["seed"] = 7
    found = differences(expected, moved)
    assert [line.split(":")[0] for line in found] == [
        "trial 5 eval_loss",
        "trial 6 parameters",
        "replicates",
    ]
    assert differences(expected, moved, trials=3) == []  # on other kernels: the first three only
