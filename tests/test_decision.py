"""The keep/ignore rule on hand-built mean/std vectors, one test per branch."""
from __future__ import annotations

import numpy as np
import pytest

from edge_quq.decision import (
    decide,
    decide_states,
    interval_states,
    predicted_labels,
    resolve_z,
    z_from_confidence_level,
)
from edge_quq.errors import OptionError

THR, Z = 0.5, 1.0


def d(mean, std, mixed="ignore"):
    return decide(np.array(mean), np.array(std), Z, THR, mixed)


def test_states_above_below_straddle():
    s = interval_states(np.array([0.9, 0.1, 0.55, 0.45]), np.array([0.1, 0.1, 0.1, 0.1]), Z, THR)
    assert s.tolist() == [1, 0, -1, -1]


def test_interval_touching_threshold_is_uncertain():
    # "entirely above" is strict: a lower bound equal to the threshold is not above it.
    s = interval_states(np.array([0.6, 0.4]), np.array([0.1, 0.1]), Z, THR)
    assert s.tolist() == [-1, -1]


def test_confident_single_class_is_kept():
    r = d([0.9, 0.1, 0.05], [0.05, 0.05, 0.05])
    assert r.keep and r.rule == "confident" and r.label == 0 and r.classes == (0,)


def test_confident_several_classes_kept_label_is_highest_mean():
    r = d([0.8, 0.95, 0.1], [0.05, 0.02, 0.05])
    assert r.keep and r.classes == (0, 1) and r.label == 1


def test_all_absent_is_ignored():
    r = d([0.1, 0.2, 0.05], [0.05, 0.05, 0.05])
    assert not r.keep and r.rule == "none_present" and r.label is None and r.classes == ()


def test_benefit_of_the_doubt_single_uncertain_rest_absent():
    r = d([0.1, 0.52, 0.05], [0.05, 0.2, 0.05])
    assert r.keep and r.rule == "benefit_of_doubt" and r.label == 1 and r.classes == (1,)


def test_two_uncertain_no_present_is_ignored():
    r = d([0.45, 0.52, 0.05], [0.1, 0.2, 0.05])
    assert not r.keep and r.rule == "uncertain"


def test_open_case_present_and_uncertain_default_ignores():
    r = d([0.9, 0.5, 0.05], [0.05, 0.2, 0.05])
    assert not r.keep and r.rule == "mixed_ignore"


def test_open_case_keep_policy_keeps_the_present_class():
    r = d([0.9, 0.5, 0.05], [0.05, 0.2, 0.05], mixed="keep")
    assert r.keep and r.rule == "mixed_keep" and r.classes == (0,) and r.label == 0


def test_bounds_are_mean_pm_z_std():
    r = decide(np.array([0.7]), np.array([0.1]), 2.0, THR)
    assert r.lower[0] == pytest.approx(0.5) and r.upper[0] == pytest.approx(0.9)


def test_zero_z_reduces_to_plain_thresholding():
    r = decide(np.array([0.51, 0.49]), np.array([0.3, 0.3]), 0.0, THR)
    assert r.keep and r.label == 0


def test_confidence_level_to_z():
    assert z_from_confidence_level(0.95) == pytest.approx(1.959964, abs=1e-6)
    assert z_from_confidence_level(0.9) == pytest.approx(1.644854, abs=1e-6)
    assert resolve_z(confidence_level=0.6827) == pytest.approx(1.0, abs=1e-3)
    assert resolve_z(z=0.8) == 0.8
    assert resolve_z(default=0.7) == 0.7


@pytest.mark.parametrize("level", [0.0, 1.0, -0.1, 1.5])
def test_confidence_level_outside_open_interval_is_refused(level):
    with pytest.raises(OptionError, match="between 0 and 1"):
        z_from_confidence_level(level)


def test_z_and_confidence_level_together_are_refused():
    with pytest.raises(OptionError, match="not both"):
        resolve_z(z=1.0, confidence_level=0.9)


def test_negative_z_is_refused():
    with pytest.raises(OptionError):
        resolve_z(z=-1.0)


def test_unknown_mixed_policy_is_refused():
    with pytest.raises(OptionError):
        decide_states(np.array([[1, -1]]), mixed="maybe")


def test_vectorised_rule_matches_per_sample_rule():
    rng = np.random.default_rng(0)
    mean = rng.random((2000, 5))
    std = rng.random((2000, 5)) * 0.2
    for mixed in ("ignore", "keep"):
        states = interval_states(mean, std, Z, THR)
        keep, _ = decide_states(states, mixed)
        labels = predicted_labels(mean, states, keep)
        for i in range(len(mean)):
            r = decide(mean[i], std[i], Z, THR, mixed)
            assert r.keep == keep[i]
            assert (r.label if r.keep else -1) == labels[i]


def test_ignore_policy_combines_the_mc_rule_and_detector_flags():
    from edge_quq.decision import check_ignore_on, combine_decision

    assert combine_decision(True, ["knn"], "mc") == (True, [])
    assert combine_decision(False, [], "mc") == (False, ["rule"])
    assert combine_decision(True, ["knn", "vim"], "any") == (False, ["knn", "vim"])
    assert combine_decision(False, ["knn"], "any") == (False, ["rule", "knn"])
    assert combine_decision(False, ["vim"], "knn") == (True, [])  # only the named detector may ignore
    assert combine_decision(True, ["knn"], "knn") == (False, ["knn"])
    assert check_ignore_on("any", None) == "any"
    with pytest.raises(OptionError, match="no fitted detectors"):
        check_ignore_on("knn", None)

