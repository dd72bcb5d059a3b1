#!/bin/sh
# zsad container entrypoint: run the REST service (uvicorn through `zsad serve`) with settings from the environment.
#
#   (no arguments) | serve [--log-level L]   the service; every setting comes from ZSAD_* variables (service/settings.py)
#   -* ...                                   same, with these extra `zsad serve` options
#   anything else                            run that command instead (e.g. `zsad store list`, `zsad train ...`)
#
# Before serving, `zsad db upgrade` migrates the database (ZSAD_RESULTS_URL, else SQLite at ZSAD_RESULTS_PATH) to
# this release's schema; replicas starting together migrate once (PostgreSQL advisory lock). ZSAD_DB_UPGRADE=false
# skips it (migrations run as a separate step); a failed upgrade stops the container with its message.
# ZSAD_HOST (0.0.0.0 in the image), ZSAD_PORT (8000) and ZSAD_LOG_LEVEL (info) choose where and how uvicorn listens.
# API keys may come from files, as Docker and Kubernetes secrets are mounted: ZSAD_API_KEYS_READ_FILE and
# ZSAD_API_KEYS_ADMIN_FILE name a file with one key per line (blank lines and lines starting with # are skipped);
# they become ZSAD_API_KEYS_READ / ZSAD_API_KEYS_ADMIN (a JSON list, the form the settings read).
set -eu

PYTHON="${ZSAD_ENTRYPOINT_PYTHON:-python}"

keys_from_file() {  # $1: READ or ADMIN
    eval "file=\${ZSAD_API_KEYS_$1_FILE:-}"
    [ -n "$file" ] || return 0
    if [ ! -r "$file" ]; then
        echo "zsad-entrypoint: ZSAD_API_KEYS_$1_FILE=$file is not a readable file" >&2
        exit 1
    fi
    keys=$("$PYTHON" -c '
import json, sys
keys = [k.strip() for k in open(sys.argv[1], encoding="utf-8") if k.strip() and not k.lstrip().startswith("#")]
print(json.dumps(keys))
' "$file")
    if [ "$keys" = "[]" ]; then
        echo "zsad-entrypoint: ZSAD_API_KEYS_$1_FILE=$file holds no key" >&2
        exit 1
    fi
    export "ZSAD_API_KEYS_$1=$keys"
}

keys_from_file READ
keys_from_file ADMIN

migrate() {
    case "$(printf '%s' "${ZSAD_DB_UPGRADE:-}" | tr 'A-Z' 'a-z')" in
        false|0|no|off) return 0 ;;
    esac
    if ! zsad db upgrade >&2; then
        echo "zsad-entrypoint: zsad db upgrade failed (see above); set ZSAD_DB_UPGRADE=false to start without it" >&2
        exit 1
    fi
}

serve() {
    case " $* " in
        *" --help "*|*" -h "*) ;;
        *) migrate ;;
    esac
    exec zsad serve --host "${ZSAD_HOST:-0.0.0.0}" --port "${ZSAD_PORT:-8000}" \
        --log-level "${ZSAD_LOG_LEVEL:-info}" "$@"
}

case "${1:-serve}" in
    serve)
        [ "$#" -gt 0 ] && shift
        serve "$@"
        ;;
    -*)
        serve "$@"
        ;;
    *)
        exec "$@"
        ;;
esac
