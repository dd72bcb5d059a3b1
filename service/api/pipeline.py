"""The use cases behind the HTTP routes: detect (headers + threshold -> decode -> queue for inference -> heatmap ->
persist)
and calibrate (decode -> score normal images -> threshold at a false-reject rate -> store).

Kept apart from the routes so the batch endpoint, the single endpoint and calibration share one path, and the
routers only parse and shape. Everything CPU-heavy runs off the event loop: decoding and heatmap encoding in the
thread pool, the model in the inference worker thread, database writes in the thread pool (committed before the
response is built). A detect request makes three trips to the pool (headers and threshold, decode, then answer +
commit) and one to the inference thread; the threshold is read first because its score names the one map the answer
shows, which the detector makes in the batch on the model's device (`Detector.score`). Overlay PNGs are encoded in
the pool, never on the inference thread, and only when asked for (or kept: ZSAD_KEEP_HEATMAPS).
"""
from __future__ import annotations

import asyncio
import base64
import time
from dataclasses import dataclass
from typing import Any

from anyio import to_thread
from PIL import Image

from ..constants import ALLOWED_FORMATS, MAX_REGIONS  # one allow-list and region cap for the CLI and the service
from .errors import ApiError
from .limits import PixelBudgetTimeout, Reservation, describe_format, sniff_format
from .results import NewResult, record
from .state import AppState
from .thresholds import Resolved, calibrate, decide
from .worker import Arrival, JobResult, QueueFull, WorkerStopped

MODEL_STAGES = ("preprocess", "embed", "windows", "aggregate")


@dataclass
class Upload:
    data: bytes
    filename: str | None = None
    content_type: str | None = None


@dataclass
class DetectOptions:
    line: str | None = None
    product: str | None = None
    heatmap: str = "none"  # none | png | json
    object_name: str | None = None
    score: str | None = None  # None: the product threshold's score, else settings.default_score


@dataclass
class Decoded:
    image: Image.Image  # at most settings.max_heatmap_pixels: a larger upload is decoded reduced
    format: str
    seconds: float
    filename: str | None
    prepared: Any = None  # detector.Prepared: resized + normalised here, off the inference thread
    width: int = 0  # the uploaded image's size (upright); 0: the image's own
    height: int = 0

    def __post_init__(self) -> None:
        if not self.width or not self.height:
            self.width, self.height = self.image.size

    @property
    def model_input(self) -> Any:
        return self.prepared if self.prepared is not None else self.image


def _label(upload: Upload, index: int, total: int) -> str:
    if total == 1:
        return "image"
    return f"file {index + 1}" + (f" ({upload.filename!r})" if upload.filename else "")


def _sniff(upload: Upload, what: str) -> str:
    if not upload.data:
        raise ApiError(400, "empty_image", f"{what} is empty (0 bytes)")
    fmt = sniff_format(upload.data[:32])
    if fmt is None:
        seen = describe_format(upload.data[:512])
        allowed = ", ".join(f.replace("WEBP", "WebP") for f in ALLOWED_FORMATS)
        raise ApiError(415, "unsupported_media_type",
                       f"{what}: unsupported image type ({seen}); accepted: {allowed}")
    return fmt


def _image_error(exc: Exception, what: str) -> ApiError:
    from ..preprocess import ImageError

    if isinstance(exc, ImageError):
        message = str(exc)
        if "decompression bomb" in message or "too large to decode" in message:
            return ApiError(413, "image_too_large", f"{what}: {message}")
        return ApiError(400, "invalid_image", f"{what}: {message}")
    # anything else a decoder throws is still the caller's bad file
    return ApiError(400, "invalid_image", f"{what} cannot be decoded: {type(exc).__name__}")


def inspect_upload(upload: Upload, max_pixels: int, what: str = "image") -> tuple[int, int]:
    """(width, height) from the allow-listed format's header, nothing decoded. Raises ApiError (4xx)."""
    from ..preprocess import image_size

    _sniff(upload, what)
    try:
        return image_size(upload.data, max_pixels)
    except Exception as exc:  # noqa: BLE001 - mapped to the caller's 4xx
        raise _image_error(exc, what) from None


def decode_upload(upload: Upload, max_pixels: int, what: str = "image", prepare: Any = None,
                  max_decoded_pixels: int | None = None) -> Decoded:
    """Allow-list check on the magic bytes, then `preprocess.decode_image` (reduced to at most `max_decoded_pixels`
    when given). Raises ApiError (4xx)."""
    from ..preprocess import decode_image

    t = time.perf_counter()
    fmt = _sniff(upload, what)
    try:
        dec = decode_image(upload.data, max_pixels, max_decoded_pixels)
    except Exception as exc:  # noqa: BLE001 - mapped to the caller's 4xx
        raise _image_error(exc, what) from None
    prepared = prepare(dec.image) if prepare is not None else None
    return Decoded(dec.image, fmt, time.perf_counter() - t, upload.filename, prepared, dec.width, dec.height)


def decode_all(uploads: list[Upload], max_pixels: int, prepare: Any = None,
               max_decoded_pixels: int | None = None) -> list[Decoded]:
    return [decode_upload(u, max_pixels, _label(u, i, len(uploads)), prepare, max_decoded_pixels)
            for i, u in enumerate(uploads)]


def inspect_all(uploads: list[Upload], max_pixels: int) -> list[tuple[int, int]]:
    return [inspect_upload(u, max_pixels, _label(u, i, len(uploads))) for i, u in enumerate(uploads)]


async def decode_in_pool(state: AppState, uploads: list[Upload]) -> list[Decoded]:
    """Decode in the thread pool, at most `state.decode_limiter` requests at once: decoding concurrency is bounded
    by the cores rather than by the thread pool size (and memory by `decode_within_budget`). Images over
    `max_heatmap_pixels` are decoded reduced. They are also resized and normalised for the current model here, in
    parallel, so the inference thread only runs CLIP."""
    prepare = getattr(state.detector, "prepare", None)
    s = state.settings
    return await to_thread.run_sync(decode_all, uploads, s.max_pixels, prepare, s.max_heatmap_pixels,
                                    limiter=state.decode_limiter)


async def decode_within_budget(state: AppState, uploads: list[Upload], deadline: float) -> tuple[list[Decoded],
                                                                                                  Reservation]:
    """Read the image headers, reserve the decoded pixels the request needs from `state.pixel_budget` (waiting
    for room until `deadline`: 503 `busy` then), decode, and keep only what the reduced images take.

    The reservation is the largest image at full size (the decoder's buffer; images are decoded one at a time)
    plus every image at its reduced size, so the pixels decoded at once stay within `max_pixels_in_flight`
    however many requests and batches arrive. The caller releases the returned reservation once its answer is
    encoded."""
    sizes = await to_thread.run_sync(inspect_all, uploads, state.settings.max_pixels, limiter=state.decode_limiter)
    return await reserve_and_decode(state, uploads, deadline, sizes)


async def reserve_and_decode(state: AppState, uploads: list[Upload], deadline: float,
                             sizes: list[tuple[int, int]]) -> tuple[list[Decoded], Reservation]:
    """`decode_within_budget` once the images' header sizes are known."""
    from ..preprocess import reduction_factor

    s = state.settings
    reduced = []
    for w, h in sizes:
        f = reduction_factor(w, h, s.max_heatmap_pixels)
        reduced.append(-(-w // f) * -(-h // f))
    try:
        reservation = await state.pixel_budget.reserve(max(w * h for w, h in sizes) + sum(reduced),
                                                       deadline - time.perf_counter())
    except PixelBudgetTimeout:
        raise ApiError(503, "busy", "too many image pixels are being processed; retry later",
                       {"Retry-After": "2"}) from None
    try:
        decoded = await decode_in_pool(state, uploads)
    except BaseException:
        reservation.release()
        raise
    reservation.shrink_to(sum(reduced))
    return decoded, reservation


async def infer(state: AppState, images: list[Image.Image], object_name: str | None, heatmap: bool,
                deadline: float, arrival: Arrival | None = None, on_done: Any = None,
                map_score: str | None = None) -> list[JobResult]:
    """Queue images for the worker and wait for all of them (until `deadline`, a perf_counter time). `on_done` runs
    on the inference thread when the last image is scored; `map_score`'s map is made in the batch
    (`InferenceWorker.submit_many`)."""
    state.require_ready()
    try:
        futures = state.worker.submit_many(images, object_name, heatmap, arrival, on_done, map_score)
    except QueueFull as exc:
        raise ApiError(503, "queue_full", "inference queue is full, retry later",
                       {"Retry-After": str(exc.retry_after)}) from None
    except WorkerStopped as exc:
        raise ApiError(503, "unavailable", str(exc), {"Retry-After": "5"}) from None
    waiting = [asyncio.wrap_future(f) for f in futures]
    timeout = max(0.0, deadline - time.perf_counter())
    try:
        return list(await asyncio.wait_for(asyncio.gather(*waiting), timeout))
    except asyncio.TimeoutError:
        for f in futures:
            f.cancel()
        raise ApiError(504, "timeout", f"inference did not finish within {state.settings.request_timeout_s:g} s") from None
    except WorkerStopped as exc:
        raise ApiError(503, "unavailable", str(exc), {"Retry-After": "5"}) from None
    except BaseException:
        for f in futures:
            f.cancel()
        raise


def _encode_one(state: AppState, dec: Decoded, res: JobResult, opts: DetectOptions, resolved: Resolved,
                want_png_for_store: bool) -> tuple[dict[str, Any] | None, list[dict] | None, bytes | None, float]:
    """Heatmap payload, regions and the PNG to keep; runs in a worker thread.

    Regions and the mask agree with the verdict (`score > threshold`, also under the `review` policy): an anomalous
    image has at least one region holding the heat's maximum, a normal one none (`heatmap.localise`), at the pixel
    threshold resolved with the image threshold and at least `ZSAD_MIN_REGION_AREA` of the map. The map is at the
    decoded (pixel-budget capped) size; regions are given in the original image's coordinates (`scale_regions`), the
    mask at the map's size."""
    from ..heatmap import localise, mask_png, min_area_pixels, overlay_png, scale_regions

    t = time.perf_counter()
    det = res.detection
    score_name = resolved.score
    if opts.heatmap == "none" or score_name not in det.heat:
        return None, None, None, time.perf_counter() - t
    heat = det.heat[score_name]  # the one map this answer needs, at the decoded size (<= max_heatmap_pixels)
    anomalous = float(det.scores[score_name]) > resolved.threshold
    found_regions, mask = localise(heat, resolved.pixel_threshold,
                                   min_area_pixels(heat.shape, state.settings.min_region_area), anomalous, MAX_REGIONS)
    found = [r.to_dict() for r in scale_regions(found_regions, dec.image.size, (dec.width, dec.height))]
    png = overlay_png(dec.image, heat) if (opts.heatmap == "png" or want_png_for_store) else None
    if opts.heatmap == "png":
        payload = {"format": "png", "score": score_name, "png_base64": base64.b64encode(png).decode("ascii"),
                   "grid": None, "rows": None, "cols": None,
                   "mask_png_base64": base64.b64encode(mask_png(mask)).decode("ascii"),
                   "pixel_threshold": resolved.pixel_threshold, "pixel_threshold_source": resolved.pixel_source}
    else:
        grid = det.grid[score_name]
        payload = {"format": "json", "score": score_name, "png_base64": None, "mask_png_base64": None,
                   "rows": int(grid.shape[0]), "cols": int(grid.shape[1]),
                   "grid": [[round(float(v), 4) for v in row] for row in grid],
                   "pixel_threshold": resolved.pixel_threshold, "pixel_threshold_source": resolved.pixel_source}
    return payload, found, png, time.perf_counter() - t


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000.0, 3)


async def detect_uploads(state: AppState, uploads: list[Upload], opts: DetectOptions,
                         arrival: Arrival | None = None) -> list[dict[str, Any]]:
    """Decode, score, then one trip to the thread pool that resolves the threshold, shapes the answers and commits
    the rows (with the rest of the micro-batch: `results.CommitSlot`); the answers are built once committed."""
    settings = state.settings
    start = time.perf_counter()
    deadline = start + settings.request_timeout_s
    state.require_ready()  # before spending time on decoding
    slot = state.results.commit_slot()
    manifest = state.detector.manifest if state.detector is not None else None

    def _headers_and_threshold() -> tuple[list[tuple[int, int]], Resolved]:
        # one trip to the pool: the headers, and the threshold (its score names the map the answer shows)
        sizes = inspect_all(uploads, settings.max_pixels)
        return sizes, state.thresholds.resolve(opts.product, opts.line, opts.score, settings.default_score,
                                               settings.default_threshold, manifest, settings.mask_threshold)

    try:
        sizes, resolved = await to_thread.run_sync(_headers_and_threshold, limiter=state.decode_limiter)
        decoded, pixels = await reserve_and_decode(state, uploads, deadline, sizes)
        try:  # the decoded pixels are held until the answer is encoded
            results = await infer(state, [d.model_input for d in decoded], opts.object_name,
                                  opts.heatmap != "none", deadline, arrival, slot.expect, resolved.score)
            return await to_thread.run_sync(_finish, state, decoded, results, opts, resolved, start, slot)
        finally:
            pixels.release()
    finally:
        slot.settle()  # a request that ends without rows (an error, a timeout) is not waited for


def _finish(state: AppState, decoded: list[Decoded], results: list[JobResult], opts: DetectOptions,
            resolved: Resolved, start: float, slot: Any) -> list[dict[str, Any]]:
    """Answer payloads, the durable commit, the answers: one thread, no hops between."""
    settings = state.settings
    keep_png = state.results.keep_heatmaps
    records: list[NewResult] = []
    extras: list[dict[str, Any]] = []
    for dec, res in zip(decoded, results):
        payload, found, png, enc_s = _encode_one(state, dec, res, opts, resolved, keep_png)
        score = float(res.detection.scores[resolved.score])
        label = decide(score, resolved, settings.uncalibrated)
        stage_s = {k: res.timings.get(k) for k in MODEL_STAGES}
        latency = time.perf_counter() - start
        records.append(NewResult(
            line=opts.line, product=opts.product, model_name=res.model_name, model_version=res.model_version,
            score_name=resolved.score, score=score, label=label, threshold=resolved.threshold,
            threshold_source=resolved.source, calibrated=resolved.calibrated,
            scores={k: float(v) for k, v in res.detection.scores.items()},
            latency_ms=latency * 1000.0, object_name=opts.object_name, filename=(dec.filename or None) and dec.filename[:255],
            width=dec.width, height=dec.height, heatmap_png=png,
        ))
        extras.append({
            "filename": dec.filename, "clip": res.clip,
            "timings_ms": {"decode": _ms(dec.seconds), "queue": _ms(res.queue_wait),
                           **{k: _ms(v) for k, v in stage_s.items()}, "encode": _ms(enc_s)},
            "batch_size": res.batch_size,
            "image": {"width": dec.width, "height": dec.height, "format": dec.format},
            "heatmap": payload, "regions": found,
        })
        state.metrics.observe_stages({"decode": dec.seconds, "encode": enc_s})

    t = time.perf_counter()
    ids = state.results.add_many(records, slot)  # committed before we answer
    persist_s = time.perf_counter() - t
    state.metrics.observe_stages({"persist": persist_s})
    total = time.perf_counter() - start
    bodies = []
    for rid, rec, extra in zip(ids, records, extras):
        row = {k: v for k, v in rec.__dict__.items() if k != "heatmap_png"}
        body = record({**row, "id": rid, "has_heatmap": bool(rec.heatmap_png and state.results.keep_heatmaps)})
        body["model"]["clip"] = extra.pop("clip")
        body.update(extra)  # the untruncated filename, and what only the answer carries
        body["timings_ms"]["persist"] = _ms(persist_s)
        body["timings_ms"]["total"] = _ms(total)
        bodies.append(body)
        state.metrics.observe_prediction(rec.line, rec.product, rec.label, rec.score, calibrated=rec.calibrated)
    return bodies


async def calibrate_uploads(state: AppState, uploads: list[Upload], product: str, line: str | None,
                            score_name: str, target_frr: float, object_name: str | None,
                            store: bool, pixel: bool = True, caller: str | None = None) -> dict[str, Any]:
    """Score normal images exactly as /v1/detect would, fit the threshold at `target_frr` and store it; with `pixel`
    the images also run with heatmaps and the pixel threshold is `PIXEL_QUANTILE` of their heat
    (`calibration.NormalHeat`).

    Decoded and scored a micro-batch at a time (within the pixel budget), each upload's bytes released once scored and
    the maps folded into a fixed-size histogram: memory stays bounded by the batch, not by the (up to
    `calibration_max_images`) images of the request."""
    from ..calibration import NormalHeat

    s = state.settings
    deadline = time.perf_counter() + s.request_timeout_s * max(1, len(uploads) // max(1, s.max_batch_size))
    scores: list[float] = []
    normal_heat = NormalHeat()
    model = None
    chunk = max(1, s.max_batch_size)
    for i in range(0, len(uploads), chunk):
        part = uploads[i: i + chunk]
        decoded, pixels = await decode_within_budget(state, part, deadline)
        async with pixels:
            inputs = [d.model_input for d in decoded]
            results = await infer(state, inputs, object_name, False, deadline)  # the scores of /v1/detect?heatmap=none
            scores.extend(float(r.detection.scores[score_name]) for r in results)
            if pixel:  # a second pass with heatmaps; the scores above stay those of the global-only path
                mapped = await infer(state, inputs, object_name, True, deadline)
                for r in mapped:
                    normal_heat.add(r.detection.heat[score_name])
                del mapped
        model = {"name": results[0].model_name, "version": results[0].model_version, "clip": results[0].clip}
        for u in part:
            u.data = b""
        del decoded, results, inputs
    threshold, dist = calibrate(scores, target_frr)
    pixel_dist = normal_heat.summary() if pixel else None
    pixel_threshold = pixel_dist["threshold"] if pixel_dist else None
    summary = {k: v for k, v in dist.items() if k not in ("scores", "histogram")}
    summary["model"] = model
    if pixel_dist is not None:
        summary["pixel"] = pixel_dist
    if store:
        await to_thread.run_sync(lambda: state.thresholds.put(product, threshold, score_name, line, "calibration",
                                                              summary, updated_by=caller,
                                                              pixel_threshold=pixel_threshold))
    # every calibration is kept as a record (who, when, how many images, the fitted values; stored or proposed)
    await to_thread.run_sync(lambda: state.thresholds.record_calibration(
        product, line, score_name, threshold, target_frr, len(scores), model, caller, store, summary))
    return {"product": product, "line": line, "score_name": score_name, "threshold": threshold,
            "target_frr": target_frr, "pixel_threshold": pixel_threshold, "stored": store, "model": model,
            "distribution": dist, "pixel_distribution": pixel_dist}
