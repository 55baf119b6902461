#!/usr/bin/env bash
# Screenshots of the MLflow UI for two lorapipe runs (the images in README "Comparing runs in MLflow").
#
#   tools/mlflow_screenshot.sh RUN_A RUN_B [OUT_DIR]
#
# Run it in a project folder where both runs have finished (results/runs/<run>/mlflow.json exists,
# store sqlite:///mlflow.db, the default). It starts `mlflow ui` on a free port of 127.0.0.1,
# takes two headless Chromium screenshots and stops the server again:
#   OUT_DIR/mlflow-runs.png     the experiment's runs, chart view (loss curves of both runs)
#   OUT_DIR/mlflow-compare.png  the compare-runs page of the two runs (params that differ, metrics)
# Each is cropped to its content and kept under ~300 KB (Pillow).
# Needs: chromium (Debian: apt-get install -y chromium), mlflow and Pillow on PATH/python
# (PYTHON=.venv/bin/python by default; MLFLOW=.venv/bin/mlflow), setsid, timeout.
# Env: WIDTH, HEIGHT (browser window, default 1600x1000; COMPARE_HEIGHT 1800 for the compare page),
# WAIT_MS (virtual time for each page to render, default 15000), CROP_W (keep the left CROP_W px:
# default 1190 cuts off MLflow 3.17's "Assistant" side panel), CHROMIUM (default: chromium).
set -euo pipefail

if [[ $# -lt 2 ]]; then
    sed -n '2,17p' "$0" | sed 's/^# \{0,1\}//'
    exit 2
fi
RUN_A=$1 RUN_B=$2 OUT=${3:-docs}
PYTHON=${PYTHON:-.venv/bin/python}
MLFLOW=${MLFLOW:-.venv/bin/mlflow}
CHROMIUM=${CHROMIUM:-chromium}
WIDTH=${WIDTH:-1600} HEIGHT=${HEIGHT:-1000} COMPARE_HEIGHT=${COMPARE_HEIGHT:-1800}
WAIT_MS=${WAIT_MS:-15000} CROP_W=${CROP_W:-1190}

for run in "$RUN_A" "$RUN_B"; do
    [[ -f results/runs/$run/mlflow.json ]] || {
        echo "results/runs/$run/mlflow.json not found: run 'snakemake --cores 2' for run $run first" >&2
        exit 1
    }
done
command -v "$CHROMIUM" >/dev/null || { echo "$CHROMIUM not found (apt-get install -y chromium)" >&2; exit 1; }
mkdir -p "$OUT"

# run ids and experiment id, from what the track stage wrote
read -r ID_A EXP_A < <("$PYTHON" -c 'import json,sys; d=json.load(open(sys.argv[1])); print(d["run_id"], d["experiment_id"])' "results/runs/$RUN_A/mlflow.json")
read -r ID_B EXP_B < <("$PYTHON" -c 'import json,sys; d=json.load(open(sys.argv[1])); print(d["run_id"], d["experiment_id"])' "results/runs/$RUN_B/mlflow.json")
[[ $EXP_A == "$EXP_B" ]] || echo "note: the runs are in different experiments ($EXP_A, $EXP_B)" >&2

PORT=$("$PYTHON" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
LOG=$(mktemp)
TMP=$(mktemp -d)
# its own process group: `mlflow ui` starts uvicorn and job-runner (huey) children, all stopped at exit
setsid "$MLFLOW" ui --backend-store-uri sqlite:///mlflow.db --host 127.0.0.1 --port "$PORT" >"$LOG" 2>&1 &
SERVER=$!
cleanup() {
    kill -TERM -- "-$SERVER" 2>/dev/null || true
    sleep 1
    kill -KILL -- "-$SERVER" 2>/dev/null || true
    rm -rf "$TMP" "$LOG"
}
trap cleanup EXIT

URL=http://127.0.0.1:$PORT
for _ in $(seq 120); do
    curl -fs "$URL/health" >/dev/null 2>&1 && break
    kill -0 "$SERVER" 2>/dev/null || { cat "$LOG" >&2; exit 1; }
    sleep 0.5
done
curl -fs "$URL/health" >/dev/null || { echo "mlflow ui did not come up on $URL" >&2; cat "$LOG" >&2; exit 1; }

shot() {  # URL OUTFILE WINDOW_HEIGHT
    # virtual time lets the page's requests and charts finish; `timeout` because once (server
    # cold, machine loaded) chromium never returned
    timeout -k 5 $((WAIT_MS / 1000 + 60)) "$CHROMIUM" --headless=new --no-sandbox --disable-gpu \
        --hide-scrollbars --user-data-dir="$TMP/profile" --window-size="$WIDTH,$3" \
        --virtual-time-budget="$WAIT_MS" --run-all-compositor-stages-before-draw \
        --screenshot="$2" "$1" >/dev/null 2>&1 || true
    [[ -s $2 ]] || { echo "no screenshot of $1" >&2; exit 1; }
}
# MLflow 3 UI routes (hash router): the experiment's runs in chart view, and compare-runs.
# The first visit with a fresh browser profile showed "Something went wrong" here once: a first
# pass warms the profile and the server, the second is kept.
shot "$URL/#/experiments/$EXP_A/runs?compareRunsMode=CHART" "$TMP/runs.png" "$HEIGHT"
shot "$URL/#/experiments/$EXP_A/runs?compareRunsMode=CHART" "$TMP/runs.png" "$HEIGHT"
RUNS=$("$PYTHON" -c 'import sys, urllib.parse as u; print(u.quote("[\"%s\",\"%s\"]" % (sys.argv[1], sys.argv[2])))' "$ID_A" "$ID_B")
EXPS=$("$PYTHON" -c 'import sys, urllib.parse as u; print(u.quote("[\"%s\"]" % sys.argv[1]))' "$EXP_A")
shot "$URL/#/compare-runs?runs=$RUNS&experiments=$EXPS" "$TMP/compare.png" "$COMPARE_HEIGHT"

# keep the left CROP_W px, crop away the empty margin at the bottom/right, shrink to <= 1280 px wide, palette PNG
"$PYTHON" - "$CROP_W" "$TMP/runs.png" "$OUT/mlflow-runs.png" "$TMP/compare.png" "$OUT/mlflow-compare.png" <<'EOF'
import sys
from PIL import Image, ImageChops

crop_w = int(sys.argv[1])
for src, dst in zip(sys.argv[2::2], sys.argv[3::2]):
    img = Image.open(src).convert("RGB")
    img = img.crop((0, 0, min(img.width, crop_w), img.height))
    bg = Image.new("RGB", img.size, img.getpixel((img.width - 1, img.height - 1)))
    box = ImageChops.difference(img, bg).getbbox() or (0, 0, img.width, img.height)
    img = img.crop((0, 0, min(img.width, box[2] + 16), min(img.height, box[3] + 16)))
    if img.width > 1280:
        img = img.resize((1280, round(img.height * 1280 / img.width)), Image.LANCZOS)
    img.quantize(colors=256, method=Image.MEDIANCUT, dither=Image.NONE).save(dst, optimize=True)
    print(f"{dst}: {img.width}x{img.height}")
EOF
