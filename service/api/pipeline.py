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
from ..detector import TextTowerOff
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


async def infer(state: AppState, images: list[Any], object_name: str | None, heatmap: bool,
                deadline: float, arrival: Arrival | None = None, on_done: Any = None,
                map_score: str | None = None, memory: Any = None, task: Any = None) -> list[JobResult]:
    """Queue images for the worker and wait for all of them (until `deadline`, a perf_counter time). `on_done` runs
    on the inference thread when the last image is scored; `map_score`'s map is made in the batch
    (`InferenceWorker.submit_many`). `memory` scores them in few-shot mode; `task(detector, items)` runs instead of
    `detect` (see `worker.Job`)."""
    state.require_ready()
    try:
        futures = state.worker.submit_many(images, object_name, heatmap, arrival, memory=memory, task=task,
                                           on_done=on_done, map_score=map_score)
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
    except TextTowerOff as exc:  # an object word with no cached anchors while the text tower is off: the request's fault
        raise ApiError(422, "object_word_unavailable", str(exc)) from None
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

    def _headers_and_threshold() -> tuple[list[tuple[int, int]], Any, Resolved]:
        # one trip to the pool: the headers, the product's reference memory (few-shot) and the threshold for its
        # mode (whose score names the map the answer shows)
        sizes = inspect_all(uploads, settings.max_pixels)
        ref = state.references.lookup(opts.product, opts.line, state.detector)
        return sizes, ref, state.thresholds.resolve(opts.product, opts.line, opts.score, settings.default_score,
                                                    settings.default_threshold, manifest, settings.mask_threshold,
                                                    ref.mode)

    try:
        sizes, ref, resolved = await to_thread.run_sync(_headers_and_threshold, limiter=state.decode_limiter)
        decoded, pixels = await reserve_and_decode(state, uploads, deadline, sizes)
        try:  # the decoded pixels are held until the answer is encoded
            results = await infer(state, [d.model_input for d in decoded], opts.object_name,
                                  opts.heatmap != "none", deadline, arrival, slot.expect, resolved.score,
                                  memory=ref.memory)
            return await to_thread.run_sync(_finish, state, decoded, results, opts, resolved, start, slot, ref)
        finally:
            pixels.release()
    finally:
        slot.settle()  # a request that ends without rows (an error, a timeout) is not waited for


def _finish(state: AppState, decoded: list[Decoded], results: list[JobResult], opts: DetectOptions,
            resolved: Resolved, start: float, slot: Any, ref: Any) -> list[dict[str, Any]]:
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
            mode=getattr(res.detection, "mode", ref.mode), shots=getattr(res.detection, "shots", ref.shots),
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
            "reference": ref.info,
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
                            store: bool, pixel: bool = True, reference: bool | None = False,
                            caller: str | None = None, dense: bool | None = None) -> dict[str, Any]:
    """Score normal images exactly as /v1/detect would, fit the threshold at `target_frr` and store it; with `pixel`
    the images also run with heatmaps and the pixel threshold is `PIXEL_QUANTILE` of their heat
    (`calibration.NormalHeat`).

    Decoded and scored a micro-batch at a time (within the pixel budget), each upload's bytes released once scored and
    the maps folded into a fixed-size histogram: memory stays bounded by the batch, not by the (up to
    `calibration_max_images`) images of the request.

    With `reference` the images also become the product's (line's) few-shot reference memory
    (`calibrate_few_shot`); `reference=None` (the API's default) does so when there are at least 2 images and the model
    can make a memory, else calibrates zero-shot. Without it, storing the threshold also removes any memory of that
    product (line), so the product is judged zero-shot against the threshold just fitted zero-shot. `dense` chooses
    the memory's dense bank (None: the `reference_dense` setting)."""
    from ..calibration import NormalHeat

    if dense and reference is False:
        raise ApiError(400, "bad_request", "dense=true asks for a reference memory's dense bank; reference=false "
                       "keeps no memory")
    if reference or dense or (reference is None and len(uploads) >= 2 and _can_make_memory(state.detector)):
        few = await calibrate_few_shot(state, uploads, product, line, score_name, target_frr, object_name, store,
                                       pixel, caller, required=bool(reference or dense), dense=dense)
        if few is not None:
            return few
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
                                                              pixel_threshold=pixel_threshold, mode="zero_shot",
                                                              shots=0))
        await to_thread.run_sync(_drop_memory, state, product, line)
    # every calibration is kept as a record (who, when, how many images, the fitted values; stored or proposed)
    await to_thread.run_sync(lambda: state.thresholds.record_calibration(
        product, line, score_name, threshold, target_frr, len(scores), model, caller, store,
        {**summary, "mode": "zero_shot", "shots": 0}))
    return {"product": product, "line": line, "score_name": score_name, "threshold": threshold,
            "target_frr": target_frr, "pixel_threshold": pixel_threshold, "stored": store, "model": model,
            "distribution": dist, "pixel_distribution": pixel_dist, "mode": "zero_shot", "shots": 0, "reference": None}


def _can_make_memory(detector: Any) -> bool:
    """Whether the serving detector embeds and scores against a memory (a `Detector`; not every test double does)."""
    return all(callable(getattr(detector, name, None)) for name in ("embed", "score"))


def _drop_memory(state: AppState, product: str, line: str | None) -> None:
    """Remove the memory of exactly this (product, line): a line's own, or the product's (lines keep theirs)."""
    state.references.store.delete(product, line)
    state.references.forget(product, line)


def _shot_indices(n: int, k: int) -> list[int]:
    """`k` of `n` upload positions spread evenly (first and last included), so a long upload of one shift does not
    give a memory of its first minutes only."""
    if k >= n:
        return list(range(n))
    return sorted({round(i * (n - 1) / (k - 1)) for i in range(k)}) if k > 1 else [0]


async def calibrate_few_shot(state: AppState, uploads: list[Upload], product: str, line: str | None,
                             score_name: str, target_frr: float, object_name: str | None,
                             store: bool, pixel: bool = True, caller: str | None = None,
                             required: bool = True, dense: bool | None = None) -> dict[str, Any] | None:
    """Few-shot calibration: up to `reference_max_shots` of the images become the reference memory, and the
    threshold (and, with `pixel`, the pixel threshold) is fitted on few-shot scores and maps in which no image is
    compared with its own embeddings: the other images against the whole memory, each shot against the memory
    without its rows (leave-one-out; with one shot that shot is left out of the fit). Everything runs on the
    inference thread, a micro-batch at a time, decoded within the pixel budget. Not `required` (the default mode):
    None, before anything is stored, when this model cannot make a memory (the caller calibrates zero-shot).
    `dense` (None: the `reference_dense` setting) gives the memory a dense bank (CNN towers, 2+ shots; with
    `dense=True` a model that cannot make one is an error, not a silent WinCLIP+ memory)."""
    from ..calibration import NormalHeat
    from ..fewshot import ReferenceMemoryError, build_memory
    from ..store import utc_now

    s = state.settings
    want_dense = s.reference_dense if dense is None else dense
    n = len(uploads)
    if n < 2:
        raise ApiError(400, "bad_request", "a few-shot calibration needs at least 2 good images (the memory, and "
                       "images to fit the threshold on without scoring them against themselves); or reference=false")
    chunk = max(1, s.max_batch_size)
    deadline = time.perf_counter() + s.request_timeout_s * max(1, 2 * n // chunk)
    shots = _shot_indices(n, min(s.reference_max_shots, n))
    shot_set = set(shots)

    def embed(det: Any, items: list[Any]) -> list[Any]:
        return [e.cpu() for e in det.embed(items, heatmap=True, dense=want_dense)]

    embs: list[Any] = []
    model = None
    for i in range(0, len(shots), chunk):
        part = [uploads[j] for j in shots[i: i + chunk]]
        decoded, pixels = await decode_within_budget(state, part, deadline)
        async with pixels:
            results = await infer(state, [d.model_input for d in decoded], object_name, True, deadline, task=embed)
        embs += [r.detection for r in results]
        model = {"name": results[0].model_name, "version": results[0].model_version, "clip": results[0].clip}
        del decoded
    stride = state.detector.settings.window_stride
    meta = {"created_at": utc_now(), "product": product, "line": line}
    try:
        memory = await to_thread.run_sync(build_memory, embs, model, stride, s.reference_max_rows, meta, want_dense)
        if dense and memory.dense is None:
            raise ReferenceMemoryError(f"no dense bank: {memory.meta.get('dense')}")
    except ReferenceMemoryError as exc:
        if not required:
            return None
        raise ApiError(422, "validation_error", f"this model cannot build a reference memory: {exc}") from None
    device = getattr(state.detector.backend, "device", None)
    on_device = memory.to(device) if device is not None else memory

    def loo(det: Any, items: list[Any]) -> list[Any]:
        return det.score([e for e, _ in items], object_name, memory=on_device, exclude=[k for _, k in items],
                         maps=pixel)

    by_upload: dict[int, float] = {}  # the distribution lists scores in upload order, as the zero-shot path does
    normal_heat = NormalHeat()

    def take(positions: list[int], results: list[Any]) -> None:
        for j, r in zip(positions, results):
            by_upload[j] = float(r.detection.scores[score_name])
            if pixel:
                normal_heat.add(r.detection.heat[score_name])

    rest = [j for j in range(n) if j not in shot_set]
    try:
        if len(shots) > 1:
            for i in range(0, len(shots), chunk):
                items = [(embs[k], k) for k in range(i, min(i + chunk, len(shots)))]
                take(shots[i: i + chunk], await infer(state, items, object_name, pixel, deadline, task=loo))
        for i in range(0, len(rest), chunk):
            part = [uploads[j] for j in rest[i: i + chunk]]
            decoded, pixels = await decode_within_budget(state, part, deadline)
            async with pixels:
                take(rest[i: i + chunk], await infer(state, [d.model_input for d in decoded], object_name, pixel,
                                                     deadline, memory=on_device))
            for u in part:
                u.data = b""
            del decoded
    except ReferenceMemoryError as exc:  # the model was swapped while this ran
        raise ApiError(503, "unavailable", f"the model changed during calibration ({exc}); retry",
                       {"Retry-After": "5"}) from None
    for u in uploads:
        u.data = b""
    scores = [by_upload[j] for j in sorted(by_upload)]
    threshold, dist = calibrate(scores, target_frr)
    dist["fit"] = (f"{len(scores)} few-shot scores: {len(rest)} images against the {len(shots)}-shot memory"
                   + (f", {len(shots)} shots each against the other {len(shots) - 1} (leave-one-out)" if len(shots) > 1
                      else "; the one shot is not scored against itself, so it is left out of the fit"))
    pixel_dist = normal_heat.summary() if pixel else None
    pixel_threshold = pixel_dist["threshold"] if pixel_dist else None
    data = memory.to_bytes()
    info = {"shots": memory.shots, "rows": memory.rows, "coreset": memory.meta.get("coreset") or {},
            "bytes": len(data), "model": model, "line": line,
            "dense_grid": list(memory.dense_grid) if memory.dense_grid else None, "dense_scale": memory.dense_scale,
            "dense_squash": memory.dense_squash,
            "dense_note": memory.meta.get("dense")}  # why there is no dense bank, when there is none
    summary = {k: v for k, v in dist.items() if k not in ("scores", "histogram")}
    summary["model"] = model
    if pixel_dist is not None:
        summary["pixel"] = pixel_dist
    if store:

        def _persist() -> None:
            state.references.store.put(product, line, data)
            state.references.forget(product, line)
            state.thresholds.put(product, threshold, score_name, line, "calibration", summary, updated_by=caller,
                                 pixel_threshold=pixel_threshold, mode="few_shot", shots=memory.shots)

        try:
            await to_thread.run_sync(_persist)
        except ValueError as exc:  # MemoryStoreError: over the size limit
            raise ApiError(413, "payload_too_large", str(exc)) from None
    await to_thread.run_sync(lambda: state.thresholds.record_calibration(
        product, line, score_name, threshold, target_frr, len(scores), model, caller, store,
        {**summary, "mode": "few_shot", "shots": memory.shots}))
    return {"product": product, "line": line, "score_name": score_name, "threshold": threshold,
            "target_frr": target_frr, "pixel_threshold": pixel_threshold, "stored": store, "model": model,
            "distribution": dist, "pixel_distribution": pixel_dist, "mode": "few_shot", "shots": memory.shots,
            "reference": info}
