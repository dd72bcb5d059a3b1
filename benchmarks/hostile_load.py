"""Benchmark: the service against hostile and careless clients (issue 14's targets), on a real `zsad serve`.

Starts `python -m service.cli serve` on 127.0.0.1 and a free port (loopback only) on the store's current model
(`--store`, default the repo's `model_store/`, i.e. `default@v3`), with its own results and thresholds files in a
temp dir and its log in a file, then runs the scenarios named by `--scenarios` (all by default), each bounded:

* `big`: the idle server's RSS is the baseline (after one warm-up request with a heatmap). Then 4 concurrent
  uploads of a 7000x7000 grey PNG of zeros (48 KB, under the 50 MP limit) to `/v1/detect?heatmap=png`, and, 0.5 s
  after they start, one small 640x480 JPEG to `/v1/detect`. Prints the peak RSS growth over the idle server (Linux
  VmHWM, reset through /proc/PID/clear_refs just before), the RSS still held 3 s after, each big request's time and
  status, and the small request's latency. Then the same peak for 3 such files in one
  `/v1/detect/batch?heatmap=json`.
* `aborted`: `--aborted` chunked `POST /v1/detect` uploads whose client closes the socket after one 1 KiB chunk
  (8 sockets at a time), while another thread polls `/readyz` every 0.1 s. Prints the requests counted as 5xx in
  `/metrics`, the server log lines and ERROR lines written meanwhile, the /readyz answers that were not 200 and
  the slowest /readyz.
* `stalled`: one chunked upload that sends one chunk and then nothing; after `--stall-wait` seconds, says whether
  the server answered (and with what) or closed the connection, or still holds it open.
* `smuggle`: one request with both `Content-Length` and `Transfer-Encoding: chunked`; says what the server
  answered and whether it closed the connection (RFC 9112 section 6.3: it must).
* `soak`: `--clients` clients for `--duration` s, alternating `heatmap=none` and `heatmap=png` on a 640x480 JPEG;
  RSS sampled each second. Prints errors and the RSS growth from the mean of the first 10 s to the mean of the last
  10 s.

Ends with one `RESULT name=hostile_load ...` line. The machine may be shared: the figures include whatever else
runs on it (say so when quoting them). `--torch-threads` (default 1) keeps torch from oversubscribing a shared CPU.

Usage: python benchmarks/hostile_load.py [--scenarios big,aborted,stalled,smuggle,soak] [--aborted 2000]
       [--clients 8] [--duration 60] [--stall-wait 40] [--env ZSAD_X=1 ...]
"""
from __future__ import annotations

import argparse
import io
import os
import re
import socket
import subprocess
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from _server import free_port, start_server, stop_server, wait_ready
from PIL import Image

REPO = Path(__file__).resolve().parent.parent
PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


# --- inputs -----------------------------------------------------------------------------------------------------------
def big_png(side: int = 7000) -> bytes:
    buf = io.BytesIO()
    Image.new("L", (side, side), 0).save(buf, format="PNG", optimize=True)
    return buf.getvalue()


def small_jpeg(width: int = 640, height: int = 480) -> bytes:
    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    base = 0.5 + 0.25 * np.sin(x / width * 6.0) * np.cos(y / height * 4.0)
    rgb = np.stack([base, base * 0.9, base * 0.8], axis=-1) + rng.normal(0, 0.02, (height, width, 3))
    buf = io.BytesIO()
    Image.fromarray(np.clip(rgb * 255, 0, 255).astype(np.uint8), "RGB").save(buf, format="JPEG", quality=90)
    return buf.getvalue()


# --- the server ---------------------------------------------------------------------------------------------------------
def status_kb(pid: int, key: str) -> int:
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    return 0


def rss_mb(pid: int) -> float:
    return status_kb(pid, "VmRSS") / 1024.0


def reset_peak(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def peak_mb(pid: int) -> float:
    return status_kb(pid, "VmHWM") / 1024.0


class Server:
    def __init__(self, store: Path, workdir: Path, extra_env: dict[str, str], torch_threads: int):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = workdir / "server.log"
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "ZSAD_MODEL_STORE": str(store),
               "ZSAD_RESULTS_PATH": str(workdir / "results.sqlite"), "ZSAD_THRESHOLDS_PATH": str(workdir / "t.json"),
               "ZSAD_DEVICE": "cpu", "ZSAD_TORCH_THREADS": str(torch_threads), "ZSAD_REQUEST_TIMEOUT_S": "300",
               **extra_env}
        for k in ("ZSAD_API_KEYS_READ", "ZSAD_API_KEYS_ADMIN"):
            env.pop(k, None)
        self.env = env
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 300.0) -> None:
        self.proc = start_server(self.port, self.env, self.log_path, log_level="info", append=True)
        wait_ready(self.proc, self.url, self.log_path, timeout)

    def log_tail(self, n: int = 3000) -> str:
        return self.log_path.read_text(errors="replace")[-n:]

    def log_lines(self) -> list[str]:
        return self.log_path.read_text(errors="replace").splitlines()

    def stop(self) -> None:
        stop_server(self.proc)

    def metric_5xx(self) -> float:
        return self.metric(lambda name, labels: name == "zsad_requests_total" and re.search(r'status="5\d\d"', labels))

    def metric(self, want) -> float:
        """Sum of the /metrics samples for which want(name, labels) is true."""
        import httpx

        for attempt in range(10):  # an overwhelmed server may not answer at once: that is reported elsewhere
            try:
                text = httpx.get(self.url + "/metrics", timeout=60).text
                break
            except httpx.HTTPError:
                if attempt == 9:
                    raise
                time.sleep(5)
        total = 0.0
        for m in re.finditer(r'^(zsad_\w+?)(?:\{([^}]*)\})? (\S+)$', text, re.M):
            if want(m.group(1), m.group(2) or ""):
                total += float(m.group(3))
        return total


# --- scenarios ------------------------------------------------------------------------------------------------------------
def scenario_big(srv: Server, out: dict) -> None:
    import httpx

    pid = srv.proc.pid
    png, small = big_png(), small_jpeg()
    print(f"big: 7000x7000 grey PNG of zeros, {len(png) / 1024:.0f} KB")
    httpx.post(srv.url + "/v1/detect", params={"heatmap": "png"}, content=small,
               headers={"content-type": "image/jpeg"}, timeout=120)
    time.sleep(2)
    idle = rss_mb(pid)
    have_peak = reset_peak(pid)
    samples: list[float] = []
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            samples.append(rss_mb(pid))
            time.sleep(0.02)

    def post_big(i: int) -> tuple[int, float]:
        t = time.perf_counter()
        r = httpx.post(srv.url + "/v1/detect", params={"heatmap": "png"}, content=png,
                       headers={"content-type": "image/png"}, timeout=600)
        return r.status_code, time.perf_counter() - t

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    with ThreadPoolExecutor(5) as pool:
        bigs = [pool.submit(post_big, i) for i in range(4)]
        time.sleep(0.5)
        t = time.perf_counter()
        r = httpx.post(srv.url + "/v1/detect", content=small, headers={"content-type": "image/jpeg"}, timeout=600)
        small_s, small_status = time.perf_counter() - t, r.status_code
        small_stages = r.json().get("timings_ms") if r.status_code == 200 else None
        big_res = [f.result() for f in bigs]
    stop.set()
    sampler.join()
    peak = peak_mb(pid) if have_peak else max(samples)
    time.sleep(3)
    held = rss_mb(pid) - idle
    out.update(idle_rss_mb=round(idle), big4_peak_growth_mb=round(peak - idle), big4_held_mb=round(held),
               big4_max_s=round(max(s for _, s in big_res), 2), small_during_big_s=round(small_s, 2))
    print(f"big: idle RSS {idle:.0f} MB; 4 concurrent: peak +{peak - idle:.0f} MB "
          f"({'VmHWM' if have_peak else 'sampled'}), held 3 s after: +{held:.0f} MB; statuses "
          f"{[c for c, _ in big_res]}, times {[round(s, 1) for _, s in big_res]} s; small image meanwhile: "
          f"{small_status} in {small_s:.2f} s (server stages, ms: {small_stages})")

    time.sleep(2)
    idle = rss_mb(pid)
    reset_peak(pid)
    files = [("files", (f"big{i}.png", png, "image/png")) for i in range(3)]
    t = time.perf_counter()
    r = httpx.post(srv.url + "/v1/detect/batch", params={"heatmap": "json"}, files=files, timeout=600)
    batch_s = time.perf_counter() - t
    peak = peak_mb(pid)
    out.update(batch3_peak_growth_mb=round(peak - idle), batch3_s=round(batch_s, 2))
    print(f"big: 3 in one batch (heatmap=json): {r.status_code} in {batch_s:.1f} s, peak +{peak - idle:.0f} MB")


def _abort_one(port: int, body_chunk: bytes) -> None:
    s = socket.create_connection(("127.0.0.1", port), timeout=10)
    try:
        s.sendall(b"POST /v1/detect HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: image/png\r\n"
                  b"Transfer-Encoding: chunked\r\n\r\n" + f"{len(body_chunk):x}\r\n".encode() + body_chunk + b"\r\n")
        time.sleep(0.005)
    finally:
        s.close()


def scenario_aborted(srv: Server, out: dict, n: int) -> None:
    import httpx

    before_lines = len(srv.log_lines())
    before_5xx = srv.metric_5xx()
    seen = lambda: srv.metric(lambda name, labels: name == "zsad_client_disconnects_total")
    before_seen = seen()
    chunk = big_png(64)[:1024].ljust(1024, b"\0")
    ready_bad: list[int] = []
    ready_max = [0.0]
    stop = threading.Event()

    def poll() -> None:
        with httpx.Client(timeout=30) as c:
            while not stop.is_set():
                t = time.perf_counter()
                try:
                    code = c.get(srv.url + "/readyz").status_code
                except httpx.HTTPError:
                    code = 0
                ready_max[0] = max(ready_max[0], time.perf_counter() - t)
                if code != 200:
                    ready_bad.append(code)
                time.sleep(0.1)

    poller = threading.Thread(target=poll, daemon=True)
    poller.start()
    t = time.perf_counter()
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda _: _abort_one(srv.port, chunk), range(n)))
    elapsed = time.perf_counter() - t
    time.sleep(3)  # let the server finish logging
    stop.set()
    poller.join()
    lines = srv.log_lines()[before_lines:]
    errors = [ln for ln in lines if " ERROR " in ln or ln.startswith("ERROR")]
    fivexx = srv.metric_5xx() - before_5xx
    reached = seen() - before_seen
    out.update(aborted=n, aborted_reached_app=int(reached), aborted_5xx=int(fivexx), aborted_log_lines=len(lines),
               aborted_error_lines=len(errors), aborted_readyz_not_200=len(ready_bad),
               aborted_readyz_max_s=round(ready_max[0], 2))
    print(f"aborted: {n} uploads in {elapsed:.1f} s, {reached:.0f} reached the app as client disconnects (uvicorn "
          f"drops the others before a request starts): counted 5xx {fivexx:.0f}, log lines {len(lines)} "
          f"(ERROR {len(errors)}), /readyz not 200: {len(ready_bad)}, slowest /readyz {ready_max[0]:.2f} s")


def _read_all(s: socket.socket, wait: float) -> tuple[bytes, bool]:
    """What the server sent within `wait` seconds, and whether it closed the connection."""
    s.settimeout(0.5)
    data = b""
    deadline = time.time() + wait
    while time.time() < deadline:
        try:
            got = s.recv(65536)
        except TimeoutError:
            continue
        except OSError:
            return data, True
        if not got:
            return data, True
        data += got
    return data, False


def scenario_stalled(srv: Server, out: dict, wait: float) -> None:
    s = socket.create_connection(("127.0.0.1", srv.port), timeout=10)
    s.sendall(b"POST /v1/detect HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: image/png\r\n"
              b"Transfer-Encoding: chunked\r\n\r\n10\r\n" + b"\x89PNG\r\n\x1a\n" + b"\0" * 8 + b"\r\n")
    t = time.perf_counter()
    data, closed = _read_all(s, wait)
    s.close()
    status = data.split(b"\r\n", 1)[0].decode(errors="replace") if data else "nothing"
    out.update(stalled_answer=status.replace(" ", "_"), stalled_closed=int(closed))
    print(f"stalled: after {time.perf_counter() - t:.0f} s: answer {status!r}, connection "
          f"{'closed' if closed else 'STILL OPEN'}")


def scenario_smuggle(srv: Server, out: dict) -> None:
    s = socket.create_connection(("127.0.0.1", srv.port), timeout=10)
    s.sendall(b"POST /v1/thresholds/x HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
              b"Content-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"
              b"GET /readyz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
    data, closed = _read_all(s, 5.0)
    s.close()
    answers = re.findall(rb"HTTP/1\.1 (\d{3})", data)
    out.update(smuggle_answers="+".join(a.decode() for a in answers) or "none", smuggle_closed=int(closed))
    print(f"smuggle: CL + TE: answers {[a.decode() for a in answers]}, connection {'closed' if closed else 'kept open'}")


def scenario_soak(srv: Server, out: dict, clients: int, seconds: float) -> None:
    import httpx

    pid = srv.proc.pid
    body = small_jpeg()
    samples: list[tuple[float, float]] = []
    errors: list[str] = []
    counts = [0]
    stop = threading.Event()
    t0 = time.perf_counter()

    def client(i: int) -> None:
        n = 0
        with httpx.Client(timeout=120) as c:
            while not stop.is_set():
                mode = "png" if (n + i) % 2 else "none"
                try:
                    r = c.post(srv.url + "/v1/detect", params={"heatmap": mode}, content=body,
                               headers={"content-type": "image/jpeg"})
                    if r.status_code != 200:
                        errors.append(str(r.status_code))
                except httpx.HTTPError as exc:
                    errors.append(type(exc).__name__)
                n += 1
                counts[0] += 1

    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(clients)]
    for th in threads:
        th.start()
    while time.perf_counter() - t0 < seconds:
        samples.append((time.perf_counter() - t0, rss_mb(pid)))
        time.sleep(1.0)
    stop.set()
    for th in threads:
        th.join(120)
    first = [r for t, r in samples if t < 10.0]
    last = [r for t, r in samples if t >= seconds - 10.0]
    growth = (np.mean(last) / np.mean(first) - 1.0) * 100.0
    out.update(soak_requests=counts[0], soak_errors=len(errors), soak_rss_first_mb=round(float(np.mean(first))),
               soak_rss_last_mb=round(float(np.mean(last))), soak_rss_growth_pct=round(float(growth), 1))
    print(f"soak: {clients} clients x {seconds:.0f} s: {counts[0]} requests, {len(errors)} errors "
          f"{sorted(set(errors))[:5]}; RSS first 10 s {np.mean(first):.0f} MB, last 10 s {np.mean(last):.0f} MB "
          f"({growth:+.1f}%)")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--store", type=Path, default=REPO / "model_store")
    ap.add_argument("--scenarios", default="big,aborted,stalled,smuggle,soak")
    ap.add_argument("--aborted", type=int, default=2000)
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--duration", type=float, default=60.0)
    ap.add_argument("--stall-wait", type=float, default=40.0)
    ap.add_argument("--torch-threads", type=int, default=1)
    ap.add_argument("--env", action="append", default=[], help="extra server environment, NAME=VALUE")
    args = ap.parse_args()
    scenarios = [s.strip() for s in args.scenarios.split(",") if s.strip()]
    extra = dict(e.split("=", 1) for e in args.env)
    out: dict = {}
    with tempfile.TemporaryDirectory(prefix="zsad-hostile-") as tmp:
        srv = Server(args.store, Path(tmp), extra, args.torch_threads)
        srv.start()
        print(f"server {srv.url} pid {srv.proc.pid}, load average {os.getloadavg()[0]:.1f} at start")
        try:
            for name in scenarios:
                if name == "big":
                    scenario_big(srv, out)
                elif name == "aborted":
                    scenario_aborted(srv, out, args.aborted)
                elif name == "stalled":
                    scenario_stalled(srv, out, args.stall_wait)
                elif name == "smuggle":
                    scenario_smuggle(srv, out)
                elif name == "soak":
                    scenario_soak(srv, out, args.clients, args.duration)
                else:
                    raise SystemExit(f"unknown scenario {name!r}")
        finally:
            srv.stop()
    out["load_avg"] = round(os.getloadavg()[0], 1)
    print("RESULT name=hostile_load " + " ".join(f"{k}={v}" for k, v in out.items()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
