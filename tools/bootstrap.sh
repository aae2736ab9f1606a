#!/usr/bin/env bash
# Set-up shared by tools/demo.sh and tools/test.sh: Debian packages, .venv, editable install.
# Safe to run any number of times: each step checks before it acts.
set -euo pipefail
cd "$(dirname "$0")/.."

# Debian packages: fuse3/libfuse3-dev/pkg-config build and run pyfuse3; the rest are
# the test oracles and runtimes (kernel overlayfs needs none, it is in the kernel).
APT_PACKAGES=(fuse3 libfuse3-dev pkg-config gcc python3-dev attr fuse-overlayfs
              umoci skopeo runc busybox-static zstd time docker-registry
              containerd golang-go golang-github-containerd-containerd-dev
              podman uidmap)
missing=()
for p in "${APT_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
if ((${#missing[@]})); then
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
  echo "bootstrap: installing ${missing[*]}" >&2
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null || PY=python3
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
# Re-install only when the project metadata changed since the last install.
stamp=.venv/.mergefs-installed
if [ ! -f "$stamp" ] || [ setup.cfg -nt "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  .venv/bin/python -m pip install -q --upgrade pip
  .venv/bin/python -m pip install -q -e '.[test]'
  touch "$stamp"
fi
# Byte-compile the project as a non-editable install would (pip compiles the
# dependencies): a mount's server imports ~40 mergefs modules before its first
# answer, and compiling them costs ~40 ms a run where no .pyc can be written.
.venv/bin/python -m compileall -q mergefs snapshotter >/dev/null
# The gRPC stubs of containerd's Snapshots API (mergefs serve), from the .proto files
# of golang-github-containerd-containerd-dev; regenerated when the generator changes.
if [ ! -f snapshotter/serve/_proto/snapshots_pb2_grpc.py ] || [ tools/gen_proto.sh -nt snapshotter/serve/_proto/snapshots_pb2_grpc.py ]; then
  .venv/bin/python -m pip install -q 'grpcio-tools>=1.51'
  tools/gen_proto.sh .venv/bin/python
fi
# The inode-fh build of pyfuse3 lets read-only unions run "no-open" (see
# tools/pyfuse3_inode_fh.py). A no-op once installed; if it cannot be built,
# mergefs keeps real opens, which is correct, only slower.
.venv/bin/python tools/pyfuse3_inode_fh.py --install >/dev/null \
  || echo "bootstrap: warning: inode-fh pyfuse3 not built; union mounts keep real opens" >&2
# The C fast path of union mounts (mergefs/union/_fastpath.c, for the v5 build
# above): without it every request is served by the Python handlers, correctly.
.venv/bin/python tools/pyfuse3_inode_fh.py --fastpath >/dev/null \
  || echo "bootstrap: warning: mergefs/union/_fastpath not built; union mounts serve all in Python" >&2
# The compiled code of the methods attrs, dataclasses and namedtuple generate, recorded
# once so a mount's server does not compile them at every start (~10% of its
# work until its first answer; mergefs/union/codecache.py). Without it a server
# compiles them, as before.
.venv/bin/python -m mergefs.union.codecache >/dev/null \
  || echo "bootstrap: warning: mergefs.union.codecache not built; mounts start slower" >&2
