"""Container health check: exit 0 when the service on this container answers GET /readyz with 200, else 1.

Readiness, not liveness: the container is healthy once a model is loaded and warmed up. Standard library only, so it
runs in any image that has the service's Python. ZSAD_PORT picks the port (8000), ZSAD_HEALTHCHECK_URL overrides the
whole URL, ZSAD_HEALTHCHECK_TIMEOUT the timeout in seconds (4).
"""
from __future__ import annotations

import os
import sys
import urllib.error
import urllib.request


def main() -> int:
    url = os.environ.get("ZSAD_HEALTHCHECK_URL") or f"http://127.0.0.1:{os.environ.get('ZSAD_PORT', '8000')}/readyz"
    timeout = float(os.environ.get("ZSAD_HEALTHCHECK_TIMEOUT", "4"))
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            ok = response.status == 200
    except urllib.error.HTTPError as exc:
        print(f"not ready: {url} answered {exc.code}: {exc.read(300).decode('utf-8', 'replace')}")
        return 1
    except (OSError, ValueError) as exc:
        print(f"not ready: {url}: {exc}")
        return 1
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
