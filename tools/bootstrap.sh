#!/usr/bin/env bash
# Set up .venv with everything lorapipe needs. Idempotent: a second run with nothing changed
# returns in well under a second (a stamp records what was installed).
#
#   TORCH_SPEC   what to install for torch first (default: torch==2.13.0, a CPU build).
#                GPU users: TORCH_SPEC="torch --index-url https://download.pytorch.org/whl/cu128"
#                or install torch into .venv yourself and set TORCH_SPEC=skip.
#   PILLOW_SIMD  1 (default) builds pillow-simd in place of Pillow; 0 keeps Pillow.
#   CLUSTER      1 (`make cluster`, remembered in $VENV/.cluster) also installs the SLURM and S3
#                plugins into the venv (pyproject's cluster extras).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=${VENV:-.venv}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
PILLOW_SIMD=${PILLOW_SIMD:-1}
CLUSTER=${CLUSTER:-0}
[ -f "$VENV/.cluster" ] && CLUSTER=1
# Snakemake's cluster and storage plugins, for the tests (step 4). Keep in step with pyproject's
# cluster extras and the jobstep plugin the SLURM one requires (tests/unit/test_envs.py checks).
TEST_PLUGINS="snakemake-executor-plugin-slurm==2.8.0 snakemake-executor-plugin-slurm-jobstep==0.6.1 snakemake-storage-plugin-s3==0.3.6"
stamp="$VENV/.bootstrap-stamp"
want=$(cat pyproject.toml tools/bootstrap.sh | sha256sum | cut -c1-16)-$TORCH_SPEC-$PILLOW_SIMD-$CLUSTER
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && [ -x "$VENV/bin/snakemake" ]; then
  exit 0
fi
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
pip() { "$VENV/bin/python" -m pip --disable-pip-version-check -q "$@"; }
pip install --upgrade pip >/dev/null
# 1. torch first: otherwise peft/accelerate pull a multi-GB CUDA build.
if [ "$TORCH_SPEC" != "skip" ]; then
  # shellcheck disable=SC2086
  "$VENV/bin/python" -c "import torch" 2>/dev/null || pip install $TORCH_SPEC
fi
# 2. everything else, lorapipe itself editable; the cluster plugins only when asked for:
#    Snakemake imports every installed plugin at each start (~0.4 s of every invocation, #17).
if [ "$CLUSTER" = 1 ]; then
  pip install -e ".[dev,cluster]"
  touch "$VENV/.cluster"
else
  pip install -e ".[dev]"
  if "$VENV/bin/python" -m pip show -q snakemake-executor-plugin-slurm snakemake-storage-plugin-s3 \
      >/dev/null 2>&1; then
    # a set-up from before they became extras put them in the venv
    pip uninstall -y snakemake-executor-plugin-slurm snakemake-executor-plugin-slurm-jobstep \
      snakemake-storage-plugin-s3 >/dev/null 2>&1 || true
    echo "note: the SLURM/S3 plugins left .venv (each snakemake paid ~0.4 s for them);" \
         "\`make cluster\` puts them back" >&2
  fi
fi
# 3. pillow-simd in place of Pillow (diffusers requires "pillow", so this must come last).
if [ "$PILLOW_SIMD" = "1" ]; then
  # Any later install that touches diffusers puts Pillow back over PIL/: check what PIL *is*.
  simd_ver=$("$VENV/bin/python" -c "from importlib.metadata import version; print(version('pillow-simd'))" 2>/dev/null || true)
  pil_ver=$("$VENV/bin/python" -c "import PIL; print(PIL.__version__)" 2>/dev/null || true)
  if [ -z "$simd_ver" ] || [ "$simd_ver" != "$pil_ver" ]; then
    # WebP support needs libwebp headers at build time; get them when we can (root + apt).
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null && ! dpkg -s libwebp-dev >/dev/null 2>&1; then
      (apt-get install -y -q libwebp-dev >/dev/null 2>&1 \
        || { apt-get update -q >/dev/null 2>&1 && apt-get install -y -q libwebp-dev >/dev/null 2>&1; }) \
        || echo "note: libwebp-dev not installed; pillow-simd will build without WebP" >&2
    fi
    pip uninstall -y pillow pillow-simd >/dev/null 2>&1 || true
    if ! CC="cc -mavx2" pip install --no-cache-dir --no-deps --no-binary pillow-simd \
        "pillow-simd==12.1.1.post0" >/dev/null 2>&1; then
      echo "WARNING: pillow-simd failed to build (needs gcc, libjpeg-dev, zlib1g-dev);" \
           "falling back to Pillow (resizing ~8x slower)." >&2
      pip install "pillow>=10"
    fi
  fi
fi
# 4. the cluster plugins once more, apart, for the tests: $VENV/test-plugins is on no path but the
#    tests' (tests/conftest.py). Their dependencies are in the dev extras.
# shellcheck disable=SC2086
pip install --no-deps --upgrade --target "$VENV/test-plugins" $TEST_PLUGINS
"$VENV/bin/python" -c "import PIL, torch, diffusers, peft, webdataset, mlflow, snakemake" \
  || { echo "bootstrap: import check failed" >&2; exit 1; }
echo "$want" > "$stamp"
"$VENV/bin/lorapipe" info
