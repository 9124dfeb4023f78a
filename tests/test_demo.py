"""The main job runs end to end on its embedded default and learns."""

from __future__ import annotations

import re

import numpy as np
import pytest

from sae_ref.data.synthetic import mean_max_cosine
from sae_ref.demo import DemoSetup, run


def test_demo_trains_on_numpy_and_torch_from_the_same_start():
    """Both backends train, the loss falls, and their losses agree for many steps."""
    pytest.importorskip("torch")
    lines: list[str] = []
    finals = run(("numpy", "torch"), steps=200, echo=lines.append)
    assert set(finals) == {"numpy", "torch"}
    nmse = [float(m.group(1)) for line in lines if (m := re.search(r"nmse ([0-9.]+)", line))
            and line.startswith("[numpy]")]
    assert nmse[-1] < nmse[0]
    same = int(re.search(r"first (\d+) of 200", "\n".join(lines)).group(1))
    assert same >= 20


def test_mean_max_cosine_is_one_for_the_true_atoms_and_lower_for_random_ones():
    atoms = DemoSetup().source().atoms
    assert mean_max_cosine(atoms[::-1].copy(), atoms) == pytest.approx(1.0)
    rand = np.random.default_rng(12345).standard_normal(atoms.shape)  # not the atoms seed
    assert mean_max_cosine(rand, atoms) < 0.8
