"""The drift alarm (edge_quq.drift): martingale against references, false alarms, static clips, shifts."""
from __future__ import annotations

import math

import numpy as np
import pytest

from edge_quq.conformal import conformal_pvalues, sort_calibration
from edge_quq.drift import DriftMonitor, FeedRule, alarm_level, drift_pvalues, first_alarm, martingale_path
from edge_quq.errors import InputError, OptionError


def _reference_path(p, eps, bet, jump):
    """Plain-space, one-stream, loop reference of the jumper mixture."""
    cap = np.full(eps.size, 1.0 / eps.size)
    out = []
    for x in p:
        cap = (1 - jump) * cap + jump * cap.sum() / eps.size
        cap = cap * bet(x, eps)
        out.append(math.log10(cap.sum()))
    return np.array(out)


def test_path_matches_a_plain_loop_for_both_families_and_jumps():
    rng = np.random.default_rng(0)
    p = rng.random(300) ** 1.5
    power_eps = np.linspace(0.05, 1.0, 20)
    for jump in (0.0, 0.01, 0.2):
        np.testing.assert_allclose(martingale_path(p, "power", jump),
                                   _reference_path(p, power_eps, lambda x, e: e * x ** (e - 1), jump), atol=1e-9)
        np.testing.assert_allclose(martingale_path(p, "simple", jump),
                                   _reference_path(p, np.array([-1.0, 0, 1]), lambda x, e: 1 + e * (x - 0.5), jump), atol=1e-9)
    batched = martingale_path(np.stack([p, p[::-1]]), "power", 0.01)
    np.testing.assert_allclose(batched[1], martingale_path(p[::-1], "power", 0.01))


def test_monitor_follows_the_batched_path_until_its_first_alarm():
    rng = np.random.default_rng(6)
    for family, jump in (("power", 0.01), ("simple", 0.01), ("power", 0.0)):
        p = rng.random(400) ** 1.2
        want = martingale_path(p, family, jump)
        mon = DriftMonitor(feed=FeedRule(mode="interval"), family=family, jump=jump)
        got = np.array([mon.update(float(x)).log10_martingale for x in p])
        stop = int(first_alarm(want, mon.delta)) if first_alarm(want, mon.delta) >= 0 else p.size
        np.testing.assert_allclose(got[:stop], want[:stop], atol=1e-9)


def test_simple_jumper_matches_mapie():
    martingales = pytest.importorskip("mapie.exchangeability_testing.martingales")
    p = np.random.default_rng(1).random(200) ** 2
    omt = martingales.OnlineMartingaleTest(random_state=0, jump_size=0.01)
    theirs = np.log10([omt.update_simple_jumper_martingale(x) for x in p])
    np.testing.assert_allclose(martingale_path(p, "simple", 0.01), theirs, atol=1e-9)


def test_false_alarm_rate_on_exchangeable_streams_is_at_most_delta():
    """Fresh calibration set per seed, p-values through drift_pvalues (the DKW margin), 2000 frames."""
    rng = np.random.default_rng(2)
    delta, seeds, frames, n_cal = 0.05, 300, 2000, 500
    p = np.empty((seeds, frames))
    for s in range(seeds):
        cal = sort_calibration([rng.standard_t(4, n_cal)])
        raw = conformal_pvalues(rng.standard_t(4, (frames, 1)), cal, smooth=True, rng=rng)
        p[s] = drift_pvalues(raw, [n_cal], delta)
    for jump in (0.0, 0.01):
        rate = np.mean(first_alarm(martingale_path(p, "power", jump), delta) >= 0)
        assert rate <= delta + 4 * math.sqrt(delta * (1 - delta) / seeds)
    # exact uniforms: Ville at level delta/2
    u = martingale_path(rng.random((seeds, frames)), "power", 0.01)
    assert np.mean(first_alarm(u, delta) >= 0) <= delta / 2 + 4 * math.sqrt(delta / 2 / seeds)


def test_shifted_stream_alarms_within_a_few_tens_of_frames():
    rng = np.random.default_rng(3)
    n_cal = 2000
    cal = sort_calibration([rng.normal(size=n_cal)])
    for mu in (2.0, 4.0):
        delays = []
        for _ in range(50):
            raw = conformal_pvalues(rng.normal(mu, 1, (100, 1)), cal)
            mon = DriftMonitor()
            feats = rng.normal(size=(100, 64))  # distinct scenes: every frame is fed
            hit = [mon.update(float(q), f).alarm for q, f in zip(drift_pvalues(raw, [n_cal], mon.delta), feats)]
            delays.append(hit.index(True) if any(hit) else 999)
        assert np.percentile(delays, 90) <= (20 if mu == 2.0 else 10), (mu, delays)


def test_static_in_distribution_clip_does_not_alarm_with_the_default_feed():
    """10 000 frames of one (atypical but in-distribution) object with sensor noise on its features."""
    rng = np.random.default_rng(4)
    base = rng.normal(size=64)
    mon = DriftMonitor()
    status = None
    for _ in range(10000):
        status = mon.update(0.02, base + rng.normal(0, 0.02, 64))
    assert status is not None and not status.alarm and status.fed_frames == 1
    # camera shake cycling through a few appearances of a typical object is fed once per appearance
    looks = rng.normal(size=(5, 64))
    mon = DriftMonitor()
    for i in range(10000):
        status = mon.update(0.3, looks[i % 5])
    assert not status.alarm and status.fed_frames == 5
    # feeding every frame of the same clip is what the feed rule prevents: it alarms at once
    every = DriftMonitor(feed=FeedRule(mode="interval"))
    assert any(every.update(0.02).alarm for _ in range(200))


def test_alarm_is_raised_held_and_cleared():
    rng = np.random.default_rng(5)
    mon = DriftMonitor(feed=FeedRule(mode="interval"), clear_after=30)
    states = [mon.update(p) for p in np.concatenate([rng.random(50), np.full(60, 1e-3), rng.random(200)])]
    alarms = np.array([s.alarm for s in states])
    first = int(np.argmax(alarms))
    assert 50 <= first < 60 and not alarms[:50].any()
    assert alarms[first:110].all() and all(s.since_frame == first for s in states[first:110])
    assert not alarms[110 + 30 + 5:].any()  # clears after clear_after quiet fed frames
    assert states[-1].since_frame is None
    assert set(states[first].to_json()) == {"alarm", "log10_martingale", "since_frame"}
    assert alarm_level(0.01) == pytest.approx(math.log10(200))


def test_bad_options_are_one_clear_error():
    with pytest.raises(OptionError, match="drift delta"):
        DriftMonitor(delta=0.0)
    with pytest.raises(OptionError, match="feed mode"):
        DriftMonitor(feed=FeedRule(mode="sometimes"))
    with pytest.raises(OptionError, match="family"):
        DriftMonitor(family="cusum")
    with pytest.raises(InputError, match="feature vector"):
        DriftMonitor().update(0.5)
    with pytest.raises(InputError, match=r"\[N, 2\]"):
        drift_pvalues(np.ones((3, 1)), [10, 10], 0.01)


def test_real_fashion_mnist_streams_with_the_default_feed():
    """Default bundle, Mahalanobis p-values against 2000 held-out calibration images: a clean stream of
    1000 other test images does not alarm; strong corruptions alarm within 20 frames; a static clip (one
    image, sensor noise of 2/255, 1000 frames) is fed once."""
    from tests.gate_util import detector_scores, features_of, real_id_data, real_images

    data = real_id_data()
    x = real_images()
    cal = sort_calibration([data["score_mahalanobis"][:2000]])

    def run(images):
        f = features_of(images)
        p = drift_pvalues(conformal_pvalues(detector_scores(f, "mahalanobis")[:, None], cal), [2000], 0.01)
        mon = DriftMonitor()
        states = [mon.update(float(q), ff) for q, ff in zip(p, f)]
        return next((i for i, s in enumerate(states) if s.alarm), None), states[-1].fed_frames

    stream = x[5000:6000]
    assert run(stream)[0] is None
    rng = np.random.default_rng(7)
    shifted = {
        "noise": np.clip(stream[:100] + rng.normal(0, 60, (100, 28, 28)), 0, 255),
        "low contrast": stream[:100] * 0.3 + 90,
        "bright": np.clip(stream[:100].astype(int) + 120, 0, 255),
    }
    for name, imgs in shifted.items():
        first, _ = run(imgs.astype(np.uint8))
        assert first is not None and first < 20, name
    static = np.clip(x[6000][None] + rng.normal(0, 2, (1000, 28, 28)), 0, 255).astype(np.uint8)
    first, fed = run(static)
    assert first is None and fed <= 3
