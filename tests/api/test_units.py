"""Unit tests of the API building blocks: thresholds, calibration, results store, worker, limits, auth."""
from __future__ import annotations

import threading
import time

import numpy as np
import pytest
from PIL import Image

from service.api.auth import KeyChecker
from service.api.limits import sniff_format
from service.api.results import NewResult, ResultsStore, parse_since, parse_window
from service.api.thresholds import ThresholdStore, calibrate
from service.api.worker import InferenceWorker, QueueFull

from .helpers import FakeDetector, image_bytes


# --- thresholds ------------------------------------------------------------------------------------------------------
def _threshold_store(tmp_path) -> ThresholdStore:
    from service.db.engine import make_engine, sqlite_url
    from service.db.migrate import upgrade

    engine = make_engine(sqlite_url(tmp_path / "t.sqlite"))
    upgrade(engine)
    return ThresholdStore(engine)


def test_threshold_resolution_order(tmp_path):
    ts = _threshold_store(tmp_path)
    r = ts.resolve("widget", "L1", None, "combined", None, None)
    assert (r.threshold, r.source, r.score) == (0.5, "fallback", "combined")
    assert ts.resolve("widget", None, None, "combined", None, {"threshold_advice": 0.42}).source == "manifest"
    assert ts.resolve("widget", None, "fnn", "combined", None, {"threshold_advice": {"fnn": 0.3}}).threshold == 0.3
    assert ts.resolve("widget", None, None, "combined", 0.7, {"threshold_advice": 0.42}).source == "settings"

    ts.put("widget", 0.61, "combined")
    ts.put("widget", 0.7, "combined", line="L1")
    assert ts.resolve("widget", "L1", None, "combined", 0.9, None).source == "line"
    r = ts.resolve("widget", "L2", None, "combined", 0.9, None)
    assert (r.threshold, r.source) == (0.61, "product")
    # A threshold set for one score never applies to another score.
    r = ts.resolve("widget", "L1", "fnn", "combined", 0.9, None)
    assert (r.threshold, r.source, r.score) == (0.9, "settings", "fnn")
    # With no score requested, the entry's own score is used.
    ts.put("gadget", 0.2, "fnn")
    r = ts.resolve("gadget", None, None, "combined", None, None)
    assert (r.threshold, r.source, r.score) == (0.2, "product", "fnn")
    # A line threshold alone (no product threshold) still resolves, and the product entry says it has none.
    ts.put("solo", 0.3, "combined", line="L9")
    assert ts.resolve("solo", "L9", None, "combined", None, None).source == "line"
    assert ts.get("solo")["threshold"] is None and ts.get("solo")["lines"]["L9"]["threshold"] == 0.3


def test_threshold_mode_from_extra_on_the_db_store(tmp_path):
    """Few-shot `mode`/`shots` live in the row's JSON `extra`; a threshold fitted in one mode never applies to the
    other mode's scores, an entry without a mode applies to both."""
    ts = _threshold_store(tmp_path)
    entry = ts.put("nut", 0.8, "combined", source="calibration", mode="few_shot", shots=4)
    assert (entry["mode"], entry["shots"]) == ("few_shot", 4)
    ts.put("nut", 0.3, "combined", line="L1", source="calibration", mode="zero_shot", shots=0)
    assert ts.resolve("nut", None, None, "combined", 0.9, None, mode="few_shot").threshold == 0.8
    assert ts.resolve("nut", None, None, "combined", 0.9, None, mode="zero_shot").source == "settings"
    r = ts.resolve("nut", "L1", None, "combined", 0.9, None, mode="few_shot")
    assert (r.threshold, r.source) == (0.8, "product")  # the line's zero-shot threshold is skipped
    assert ts.resolve("nut", "L1", None, "combined", 0.9, None, mode="zero_shot").source == "line"
    assert ts.resolve("nut", "L1", None, "combined", 0.9, None).source == "line"  # no mode given: no filter
    ts.put("nut", 0.5, "combined")  # a manual threshold has no mode: both modes use it
    assert ts.get("nut").get("mode") is None
    for mode in ("few_shot", "zero_shot"):
        assert ts.resolve("nut", None, None, "combined", 0.9, None, mode=mode).threshold == 0.5


def test_calibration_threshold_meets_target_rate():
    scores = [i / 1000 for i in range(1000)]
    thr, info = calibrate(scores, 0.01)
    assert sum(s > thr for s in scores) <= 10
    assert info["achieved_frr"] <= 0.01 and info["n"] == 1000 and "note" not in info
    assert sum(info["histogram"]["counts"]) == 1000
    thr, info = calibrate([0.1, 0.2, 0.3], 0.01)
    assert thr == 0.3 and info["achieved_frr"] == 0.0 and "note" in info
    assert info["expected_frr"] == 0.25  # 3 images: a new good part is the highest of 4 with probability 1/4


def test_calibration_threshold_meets_target_rate_on_new_parts():
    """The promise is about good parts the calibration never saw: averaged over many draws of N calibration scores,
    the share of fresh normal scores above the threshold stays within the target (the conformal bound), where the
    plain empirical quantile of the N scores overshoots it (by about one part in N + 1: 5.9% for 100 images at 5%)."""
    rng = np.random.default_rng(0)
    for n, frr in ((30, 0.05), (100, 0.05), (200, 0.01)):
        fresh_rates = []
        for _ in range(400):
            cal, fresh = rng.normal(size=n), rng.normal(size=2000)
            thr, info = calibrate(list(cal), frr)
            fresh_rates.append(float(np.mean(fresh > thr)))
        assert np.mean(fresh_rates) <= frr * 1.05, (n, frr, np.mean(fresh_rates))
        assert abs(np.mean(fresh_rates) - info["expected_frr"]) < 0.006


# --- results store ------------------------------------------------------------------------------------------------------
def _rec(i: int, **kw) -> NewResult:
    base = dict(line="L1", product="p", model_name="default", model_version="v1", score_name="combined",
                score=i / 100, label="anomalous" if i % 4 == 0 else "normal", threshold=0.5,
                threshold_source="fallback", scores={"fnn": 0.1, "prompt": 0.2, "combined": i / 100}, latency_ms=5.0)
    base.update(kw)
    return NewResult(**base)


@pytest.fixture(params=["sqlite", "postgresql"])
def results_store(request, tmp_path):
    """A fresh results store on SQLite, and on PostgreSQL when ZSAD_TEST_POSTGRES_URL names a server (CI starts one)."""
    if request.param == "sqlite":
        store = ResultsStore(None, tmp_path / "r.sqlite", keep_heatmaps=True, heatmap_retention=3)
    else:  # a private schema: other tests (and other runs on the same server) never share its tables
        from tests.pg import private_schema

        with private_schema("results") as url:
            store = ResultsStore(url, tmp_path / "unused", keep_heatmaps=True, heatmap_retention=3)
            store.open()
            yield store
            store.close()
        return
    store.open()
    yield store
    store.close()


def test_results_paging_is_stable_while_rows_arrive(results_store):
    store = results_store
    original = store.add_many([_rec(i) for i in range(37)])
    seen: list[int] = []
    cursor = None
    while True:
        rows, cursor = store.page(cursor=cursor, limit=5)
        seen += [r["id"] for r in rows]
        store.add_many([_rec(99)])  # new results arrive between pages
        if cursor is None:
            break
    assert seen == sorted(original, reverse=True)
    rows, _ = store.page(label="anomalous", limit=100)
    assert rows and all(r["label"] == "anomalous" for r in rows)
    assert store.page(line="nope")[0] == []
    st = store.stats("L1", None, None)
    assert st["count"] == 37 + 8 and 0 < st["anomaly_rate"] < 1 and st["score"]["p50"] > 0


def test_heatmap_retention(results_store):
    store = results_store
    ids = store.add_many([_rec(i, heatmap_png=b"png%d" % i) for i in range(5)])
    ids += store.add_many([_rec(9, heatmap_png=b"last")])
    kept = [i for i in ids if store.heatmap(i) is not None]
    assert kept == ids[-3:] and store.heatmap(ids[-1]) == b"last"
    assert store.get(ids[0])["has_heatmap"] is False and store.get(ids[-1])["has_heatmap"] is True


def test_time_parsing():
    assert parse_window("15m") == 900 and parse_window("2d") == 172800 and parse_window("30") == 30
    with pytest.raises(ValueError):
        parse_window("-1h")
    assert parse_since("1700000000") == 1700000000
    assert parse_since("2023-11-14T22:13:20Z") == 1700000000


# --- worker ---------------------------------------------------------------------------------------------------------------
def test_worker_micro_batches_and_bounds_its_queue():
    gate = threading.Event()
    det = FakeDetector(gate=gate)
    w = InferenceWorker(lambda: det, max_batch_size=4, max_wait_ms=50, batching=True, queue_size=6)
    w.start()
    img = Image.new("RGB", (8, 8))
    first = w.submit(img, None, False)
    assert det.entered.wait(5)  # the worker is now blocked inside detect with a batch of 1
    futures = [w.submit(img, None, False) for _ in range(6)]
    with pytest.raises(QueueFull) as exc:
        w.submit(img, None, False)
    assert exc.value.retry_after >= 1
    gate.set()
    for f in [first, *futures]:
        assert f.result(5).detection.scores["combined"] == 0.5
    assert det.calls[0] == 1 and max(det.calls[1:]) == 4  # the backlog went in batches of up to 4
    w.stop()
    assert not w.alive


def test_worker_waits_for_company_only_while_a_request_is_on_its_way():
    det = FakeDetector()
    w = InferenceWorker(lambda: det, max_batch_size=4, max_wait_ms=3000, batching=True, queue_size=16)
    w.start()
    img = Image.new("RGB", (8, 8))
    # A lone request on a quiet line runs at once, not after the 3 s wait.
    t0 = time.perf_counter()
    assert w.submit(img, None, False).result(5).batch_size == 1
    assert time.perf_counter() - t0 < 1.5
    # A request that is still being read joins the batch of the one already queued.
    with w.arrival() as late:
        first = w.submit(img, None, False)
        time.sleep(0.2)
        second = w.submit_many([img], None, False, late)[0]
        assert w.arriving == 0  # settled once its images are queued
    assert first.result(5).batch_size == 2 and second.result(5).batch_size == 2
    # One that fails before submitting (a bad image) releases the wait when its handler exits.
    t0 = time.perf_counter()
    with w.arrival():
        lone = w.submit(img, None, False)
        time.sleep(0.2)
    assert lone.result(5).batch_size == 1 and time.perf_counter() - t0 < 1.5
    w.stop()


def test_worker_without_batching_runs_one_at_a_time_and_separates_work():
    det = FakeDetector()
    w = InferenceWorker(lambda: det, max_batch_size=8, max_wait_ms=50, batching=False, queue_size=16)
    w.start()
    img = Image.new("RGB", (8, 8))
    futures = [w.submit(img, None, i % 2 == 0) for i in range(6)]
    results = [f.result(5) for f in futures]
    assert all(r.batch_size == 1 for r in results)
    assert bool(results[0].detection.heat) and not results[1].detection.heat
    w.stop()


def test_worker_stop_drains_queue():
    det = FakeDetector()
    w = InferenceWorker(lambda: det, batching=True, queue_size=64)
    futures = [w.submit(Image.new("RGB", (8, 8)), None, False) for _ in range(10)]
    w.start()
    w.stop(10)
    assert all(f.result(0).batch_size >= 1 for f in futures)


# --- limits and auth ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("fmt,expected", [("PNG", "PNG"), ("JPEG", "JPEG"), ("BMP", "BMP"), ("TIFF", "TIFF"),
                                          ("WEBP", "WEBP"), ("GIF", "GIF")])
def test_sniff_allow_list(fmt, expected):
    assert sniff_format(image_bytes(fmt)[:32]) == expected
    assert sniff_format(b"hello world") is None


def test_sniffer_recognises_every_format_the_decoder_accepts():
    from service.preprocess import ALLOWED_FORMATS

    assert {sniff_format(image_bytes(fmt)[:32]) for fmt in ALLOWED_FORMATS} == set(ALLOWED_FORMATS)


def test_key_checker_scopes():
    k = KeyChecker(["r1", "r2"], ["a1"])
    assert k.enabled and k.scope_of("r2") == "read" and k.scope_of("a1") == "admin" and k.scope_of("x") is None
    assert not KeyChecker([], [""]).enabled


def test_group_commit_under_concurrency_returns_every_callers_ids(results_store):
    store = results_store
    out: list[list[int]] = []
    lock = threading.Lock()

    def writer(k: int) -> None:
        for _ in range(10):
            ids = store.add_many([_rec(k), _rec(k)])
            with lock:
                out.append(ids)

    threads = [threading.Thread(target=writer, args=(k,)) for k in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    flat = [i for ids in out for i in ids]
    assert len(out) == 60 and len(flat) == 120 and len(set(flat)) == 120
    assert all(len(ids) == 2 and ids[1] == ids[0] + 1 for ids in out)  # a caller's rows stay together
    assert store.stats(None, None, None)["count"] == 120
    for ids in out[:5]:
        assert store.get(ids[0]) is not None
