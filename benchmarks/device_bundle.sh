#!/usr/bin/env bash
# The Python packages `make gpu-check` needs, packed for a GPU machine that has no network and no
# venv of ours (the workplace's lent GPU machine: Python 3.12 with a CUDA torch, transformers,
# accelerate, peft, numpy, aiohttp, grpcio..., but no Ray, DeepSpeed, diffusers or moto).
#
#   bash benchmarks/device_bundle.sh            # here: writes .gpu/ (~36 MB; git-ignored via .git/info/exclude)
#   # there, from the repo root, with .gpu carried along:
#   source .gpu/setup.sh && python3 benchmarks/gpu_check.py [-k EXPR] [--skip-bench]
#
# The Ray wheel (79 MB) is over the 64 MiB a call may carry: its Java jars, RLlib, Serve, LLM and
# the dashboard's source maps go, its three native binaries are stripped, and it travels as tar.xz
# (20 MB). Versions are this venv's, for CPython 3.12 / manylinux x86-64.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
out=.gpu work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
mkdir -p "$out" .git/info
grep -qx '/.gpu/' .git/info/exclude 2>/dev/null || echo '/.gpu/' >> .git/info/exclude

ver() { "$PY" -m pip show "$1" 2>/dev/null | sed -n 's/^Version: //p'; }
fetch() {  # NAME... -> wheels for cp312 in $work/whl (this venv's version where it has one)
  for n in "$@"; do
    v=$(ver "$n"); "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
      --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
      --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d "$work/whl" "$n${v:+==$v}" 2>&1 | grep -v '^WARNING' || true
  done
}
pack() {  # ARCHIVE DIR
  (cd "$2" && find . -name __pycache__ -prune -exec rm -rf {} + && tar -cf - . | xz -9 -T0 > "$OLDPWD/$out/$1")
}
unpack() { mkdir -p "$1"; for w in "${@:2}"; do unzip -q -o "$w" -d "$1"; done; }

# 1. Ray, slimmed.
fetch ray
unpack "$work/ray" "$work"/whl/ray-*.whl
(cd "$work/ray/ray" && rm -rf jars rllib serve llm dashboard/client/build/static/js/*.map &&
 strip --strip-unneeded _raylet.so core/src/ray/raylet/raylet core/src/ray/gcs/gcs_server)
pack ray312.tar.xz "$work/ray"
rm -f "$work"/whl/*

# 2. The product's other needs, and ray[default]'s dashboard (init_ray starts it). DeepSpeed ships
#    only as source: its installed (pure-Python) package is copied from this venv.
fetch pydantic pydantic_core annotated-types typing-inspection diffusers english-words tensorboardX hjson \
  py-cpuinfo aiohttp-cors colorful opencensus opencensus-context smart-open jsonschema \
  jsonschema-specifications referencing rpds-py importlib_metadata opentelemetry-api opentelemetry-sdk \
  opentelemetry-proto opentelemetry-exporter-prometheus opentelemetry-semantic-conventions \
  googleapis-common-protos google-api-core google-auth cachetools proto-plus pyasn1 pyasn1-modules \
  wcwidth prettytable
unpack "$work/rest" "$work"/whl/*.whl
site=$("$PY" -c 'import deepspeed, os; print(os.path.dirname(os.path.dirname(deepspeed.__file__)))')
cp -r "$site"/deepspeed "$site"/deepspeed-*.dist-info "$work/rest/"
pack rest312.tar.xz "$work/rest"
rm -f "$work"/whl/*

# 3. The tests' S3 (moto's server, boto3, s3fs), botocore cut to the services they call.
fetch moto flask flask-cors werkzeug xmltodict responses cryptography cffi pycparser blinker itsdangerous \
  boto3 botocore s3transfer jmespath aiobotocore aioitertools wrapt s3fs py-partiql-parser
unpack "$work/test" "$work"/whl/*.whl
find "$work/test/botocore/data" -mindepth 1 -maxdepth 1 -type d ! -name s3 ! -name s3control ! -name sts \
  ! -name iam -exec rm -rf {} +
rm -rf "$work/test/moto/ssm/resources" "$work/test/moto/ec2/resources"
pack test312.tar.xz "$work/test"

cat > "$out/setup.sh" <<'EOF'
# Sourced on the GPU machine from the repo root: unpacks the carried packages once per machine.
mkdir -p /tmp/site
for a in .gpu/*.tar.xz; do m=/tmp/site/.$(basename $a).$(stat -c %s $a); [ -f $m ] || { tar -xJf $a -C /tmp/site && touch $m; } & done; wait
[ -f /tmp/site/.compiled ] || { python3 -m compileall -q -j 16 /tmp/site $PWD/dreambooth_ray >/dev/null 2>&1; touch /tmp/site/.compiled; }
# The product reads its version from its package metadata (export.py); it is not pip-installed there.
mkdir -p /tmp/site/dreambooth_ray-0.1.0.dist-info && printf 'Metadata-Version: 2.1\nName: dreambooth-ray\nVersion: 0.1.0\n' > /tmp/site/dreambooth_ray-0.1.0.dist-info/METADATA
export PYTHONPATH=/tmp/site:$PWD:$PWD/tests PYTHONUNBUFFERED=1 RAY_USAGE_STATS_ENABLED=0
EOF
du -sh "$out"/*
