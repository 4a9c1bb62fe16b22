"""Property tests (Hypothesis) over hostile input, issue 15: mutated manifests, detector files and image
bytes never let a traceback escape. A manifest either loads or raises BundleError (one line), a detectors
file either loads and scores or raises BundleError, an image either decodes or raises InputError, and
memory stays bounded. derandomize=True: the same examples on every run, so CI failures reproduce."""
from __future__ import annotations

import copy
import json
import shutil
import tempfile
from pathlib import Path
from typing import Any, List, Tuple

import numpy as np
import pytest

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from edge_quq.bundle import DEFAULT_BUNDLE_DIR, MANIFEST_NAME, bundle_summary, load_bundle  # noqa: E402
from edge_quq.errors import BundleError, EdgeQuqError, InputError  # noqa: E402
from edge_quq.result import dumps  # noqa: E402

SAMPLES = Path(DEFAULT_BUNDLE_DIR).parent / "samples"
FUZZ = settings(max_examples=300, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def status_mb(field: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return 0.0


@pytest.fixture(scope="module", autouse=True)
def rss_baseline():
    """The resident size when this file starts, with the peak reset to it (clear_refs 5, Linux >= 4.0): the
    other test files of a session (TensorFlow exports) must not count against the fuzzing's bound."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pytest.skip("cannot reset the peak RSS here (/proc/self/clear_refs)")
    return status_mb("VmRSS")


@pytest.fixture(scope="module")
def bundle_copy():
    with tempfile.TemporaryDirectory() as d:
        b = Path(d) / "bundle"
        shutil.copytree(DEFAULT_BUNDLE_DIR, b)
        yield b


def one_line(e: BaseException) -> None:
    msg = str(e)
    assert msg and "\n" not in msg and "Traceback" not in msg, msg


# -- manifests ------------------------------------------------------------------------------------------------
BASE_MANIFEST = json.loads((Path(DEFAULT_BUNDLE_DIR) / MANIFEST_NAME).read_text())

garbage = st.recursive(
    st.none() | st.booleans() | st.integers(min_value=-(10**40), max_value=10**40)
    | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=8)
    | st.sampled_from([0, -1, 1, 2**63, 1e308, float("nan"), float("inf"), "", "abc", "int8", "relu"]),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=6), children, max_size=4),
    max_leaves=8,
)


def json_paths(node: Any, prefix: Tuple = ()) -> List[Tuple]:
    out = [prefix] if prefix else []
    if isinstance(node, dict):
        for k, v in node.items():
            out += json_paths(v, prefix + (k,))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            out += json_paths(v, prefix + (i,))
    return out


PATHS = json_paths(BASE_MANIFEST)


@st.composite
def mutated_manifests(draw):
    m = copy.deepcopy(BASE_MANIFEST)
    for _ in range(draw(st.integers(1, 3))):
        path = draw(st.sampled_from(PATHS))
        parent = m
        try:
            for k in path[:-1]:
                parent = parent[k]
            key = path[-1]
            parent[key]  # noqa: B018  (an earlier mutation may have replaced the branch)
        except (KeyError, IndexError, TypeError):
            continue
        if draw(st.booleans()) and isinstance(parent, dict):
            del parent[key]
        else:
            parent[key] = draw(garbage)
    return m


@FUZZ
@given(m=mutated_manifests())
def test_mutated_manifest_loads_or_is_one_bundle_error(bundle_copy, m):
    (bundle_copy / MANIFEST_NAME).write_text(json.dumps(m))  # Python's json writes NaN/Infinity tokens too
    try:
        b = load_bundle(bundle_copy)
    except BundleError as e:
        one_line(e)
        return
    # What `info` prints and writes must work on whatever loaded.
    bundle_summary(b)
    json.loads(dumps(b.manifest), parse_constant=lambda t: pytest.fail(f"non-standard JSON token {t}"))


@FUZZ
@given(data=st.binary(max_size=300) | st.builds(lambda t: t.encode(), st.text(max_size=200)))
def test_manifest_bytes_load_or_are_one_bundle_error(bundle_copy, data):
    (bundle_copy / MANIFEST_NAME).write_bytes(data)
    with pytest.raises(BundleError) as e:
        load_bundle(bundle_copy)
    one_line(e.value)


# -- detector files -------------------------------------------------------------------------------------------
with np.load(Path(DEFAULT_BUNDLE_DIR) / "detectors.npz") as _z:
    BASE_DETECTORS = {k: _z[k] for k in _z.files}
DET_KEYS = sorted(BASE_DETECTORS)

def _filled(shape, dtype, fill):
    if dtype == "U3":
        return np.full(shape, "abc")
    with np.errstate(all="ignore"):  # nan/inf cast to an integer type: whatever bits result are the point
        return np.full(shape, fill).astype(dtype)


arrays = st.builds(
    lambda shape, dtype, fill: _filled(shape, dtype, fill),
    st.lists(st.integers(0, 70), min_size=0, max_size=3).map(tuple),
    st.sampled_from(["float32", "float64", "float16", "int8", "uint8", "int64", "bool", "U3"]),
    st.sampled_from([0.0, 1.0, -3.5, 1e30, float("nan"), float("inf")]),
)


@st.composite
def mutated_detector_arrays(draw):
    a = dict(BASE_DETECTORS)
    for _ in range(draw(st.integers(1, 3))):
        key = draw(st.sampled_from(DET_KEYS))
        action = draw(st.sampled_from(["replace", "delete", "reshape", "meta"]))
        if action == "delete":
            a.pop(key, None)
        elif action == "reshape" and key in a and a[key].size > 1:
            a[key] = a[key].reshape(-1)[: draw(st.integers(1, a[key].size))]
        elif action == "meta":
            meta = json.loads(BASE_DETECTORS["meta"].tobytes())
            paths = json_paths(meta)
            path = draw(st.sampled_from(paths))
            parent = meta
            for k in path[:-1]:
                parent = parent[k]
            parent[path[-1]] = draw(garbage)
            a["meta"] = np.frombuffer(json.dumps(meta).encode(), np.uint8)
        else:
            a[key] = draw(arrays)
    return a


@pytest.fixture(scope="module")
def loaded():
    from edge_quq.head import load_head_weights

    with tempfile.TemporaryDirectory() as d:
        shutil.copytree(DEFAULT_BUNDLE_DIR, Path(d) / "bundle")
        b = load_bundle(Path(d) / "bundle")
        yield b, load_head_weights(b)


@FUZZ
@given(a=mutated_detector_arrays())
def test_mutated_detector_file_loads_and_scores_or_is_one_bundle_error(loaded, a):
    from edge_quq.detector_store import load_detectors

    b, head = loaded
    with np.errstate(all="ignore"):
        np.savez(b.path / "detectors.npz", **a)
    try:
        dset = load_detectors(b)
    except BundleError as e:
        one_line(e)
        return
    feats = np.random.default_rng(0).random((2, b.head.feature_size), dtype=np.float32)
    scores = dset.score_all(feats, head)
    assert all(v.shape == (2,) for v in scores.values())


@FUZZ
@given(cut=st.integers(0, 4000), flips=st.lists(st.tuples(st.integers(0, 10**6), st.integers(1, 255)), max_size=6))
def test_damaged_npz_bytes_are_one_bundle_error(loaded, cut, flips):
    from edge_quq.detector_store import load_detectors

    b, _ = loaded
    data = bytearray((Path(DEFAULT_BUNDLE_DIR) / "detectors.npz").read_bytes())
    for pos, x in flips:
        data[pos % len(data)] ^= x
    if cut:
        data = data[: len(data) - cut]
    (b.path / "detectors.npz").write_bytes(bytes(data))
    try:
        load_detectors(b)
    except BundleError as e:
        one_line(e)


# -- image bytes ----------------------------------------------------------------------------------------------
def _encoded(ext: str) -> bytes:
    import cv2

    img = cv2.imread(str(SAMPLES / "00_t-shirt-top.png"), cv2.IMREAD_UNCHANGED)
    ok, buf = cv2.imencode(ext, img)
    assert ok
    return buf.tobytes()


SEEDS = {"png": _encoded(".png"), "jpg": _encoded(".jpg")}


@st.composite
def image_bytes(draw):
    kind = draw(st.sampled_from(["png", "jpg", "random"]))
    if kind == "random":
        return kind, draw(st.binary(max_size=2000))
    data = bytearray(SEEDS[kind])
    for pos, x in draw(st.lists(st.tuples(st.integers(0, len(data) - 1), st.integers(1, 255)), max_size=8)):
        data[pos] ^= x
    if draw(st.booleans()):  # header fields (width, height) are within the first 200 bytes of both formats
        pos = draw(st.integers(0, min(200, len(data) - 4)))
        data[pos:pos + 4] = draw(st.binary(min_size=4, max_size=4))
    cut = draw(st.integers(0, len(data)))
    return kind, bytes(data[: len(data) - cut] if draw(st.booleans()) else data)


@pytest.fixture(scope="module")
def predictor():
    from edge_quq.predictor import Predictor

    return Predictor.from_bundle(seed=0)


@pytest.fixture(scope="module")
def scratch():
    with tempfile.TemporaryDirectory() as d:
        yield Path(d)


@FUZZ
@given(sample=image_bytes())
def test_image_bytes_decode_or_are_one_input_error(predictor, scratch, sample):
    from edge_quq.preprocess import read_image

    kind, data = sample
    p = scratch / f"x.{'png' if kind == 'random' else kind}"
    p.write_bytes(data)
    try:
        img = read_image(p, max_pixels=4_000_000)
        assert isinstance(img, np.ndarray) and img.size > 0
    except InputError as e:
        one_line(e)
    try:
        r = predictor.predict(p)
        assert r.decision in ("keep", "ignore")
        json.loads(r.to_json(), parse_constant=lambda t: pytest.fail(f"non-standard JSON token {t}"))
    except EdgeQuqError as e:
        one_line(e)


def test_memory_stayed_bounded(rss_baseline):
    """Runs last in this file: no example above raised the process's peak RSS by more than a small board
    can spare (a decompression bomb or a shape from a damaged header would add gigabytes)."""
    assert status_mb("VmHWM") - rss_baseline < 600, (rss_baseline, status_mb("VmHWM"))


def test_png_chunk_claiming_gigabytes_is_refused_without_allocating_them(rss_baseline):
    """Found by the image fuzzing: OpenCV 5 allocated an IDAT chunk's declared 3 GB for a 600-byte file."""
    import struct

    from edge_quq.preprocess import read_image

    data = bytearray(SEEDS["png"])
    idat = data.index(b"IDAT") - 4
    data[idat:idat + 4] = struct.pack(">I", 2_991_339_574)
    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / "x.png"
        p.write_bytes(bytes(data))
        Path("/proc/self/clear_refs").write_text("5")
        before = status_mb("VmRSS")
        with pytest.raises(InputError, match="runs past the end"):
            read_image(p)
        assert status_mb("VmHWM") - before < 100
