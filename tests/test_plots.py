"""nanoshift/plots.py on its own: the figures draw exactly the numbers and labels they are given (analyze.py reads
the files and pools the runs; tests/test_analyze.py and tests/test_groups.py check the figures of whole runs).

    python -m pytest -q tests/test_plots.py
"""

import pytest

from nanoshift import plots
from nanoshift.stats import describe


def test_cut_sweep_without_a_baseline_draws_the_pooled_points_and_names_multi_layer_cuts():
    points = [((0,), describe([3.4])), ((1, 3), describe([3.2]))]  # one run each; the second cuts blocks 1 and 3
    (ax,) = plots.plot_cut_sweep(points, [0.5]).axes
    (line,) = ax.get_lines()
    assert list(line.get_xdata()) == [0, 1] and list(line.get_ydata()) == pytest.approx([3.4, 3.2])
    assert line.get_label() == "cut, alpha 0.5"  # one run per cut: no "mean over seeds", no error bars
    assert not ax.containers and not ax.patches
    assert [t.get_text() for t in ax.texts] == ["1,3"]  # drawn at its first layer, labelled with all
    assert [t.get_text() for t in ax.get_xticklabels()] == ["0", "1"]


def test_cut_sweep_baseline_is_a_line_with_its_interval_shaded():
    points = [((2,), describe([3.1, 3.3]))]
    (ax,) = plots.plot_cut_sweep(points, [0.25, 0.5], describe([3.0, 3.2, 3.1]), "baseline, no cut (3 seeds)").axes
    sweep, base = [line for line in ax.get_lines() if not line.get_label().startswith("_")]  # not the error caps
    assert sweep.get_label() == "cut, alpha 0.25, 0.5 (mean over seeds, 95% CI)" and len(ax.containers) == 1
    assert base.get_label() == "baseline, no cut (3 seeds)" and list(base.get_ydata()) == pytest.approx([3.1, 3.1])
    assert len(ax.patches) == 1  # the baseline's 95% interval


def test_alpha_panels_take_their_title_and_starting_alpha_from_the_caller():
    run = {"name": "out-x", "alphas": [(0, [1.0, 1.0]), (10, [0.9, 1.0]), (20, [0.8, 0.95])]}
    with_start, without = plots.plot_alphas([run, dict(run, name="out-y")], ["layer gate", "no attenuation"],
                                            [0.75, None]).axes
    assert with_start.get_title() == "residual alpha per layer: layer gate"
    assert [line.get_label() for line in with_start.get_lines()] == ["uniform start (0.750)", "layer 0", "layer 1"]
    assert [line.get_label() for line in without.get_lines()] == ["layer 0", "layer 1"]  # None: no dashed line
    assert list(without.get_lines()[0].get_ydata()) == [1.0, 0.9, 0.8] and without.get_xlim() == (0, 20)
    assert without.get_legend().get_title().get_text() == "run out-y"
