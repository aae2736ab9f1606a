#!/usr/bin/env bash
# Set up (if needed) and run the test suite: the default tier, then the slow tier.
# Checks that the suite leaves no mount behind.
set -euo pipefail
cd "$(dirname "$0")/.."
tools/bootstrap.sh
mounts_before=$(awk '$3 ~ /^fuse/ || $3 == "overlay" {print $2}' /proc/mounts | sort)
status=0
.venv/bin/python -m pytest -m "not slow" "$@" || status=$?
if [ "$status" = 0 ] && [ -z "${MERGEFS_SKIP_SLOW:-}" ]; then
  .venv/bin/python -m pytest -m slow "$@" || { s=$?; [ "$s" = 5 ] || status=$s; }
fi
mounts_after=$(awk '$3 ~ /^fuse/ || $3 == "overlay" {print $2}' /proc/mounts | sort)
leaked=$(comm -13 <(echo "$mounts_before") <(echo "$mounts_after"))
if [ -n "$leaked" ]; then
  echo "test.sh: the suite left mounts behind:" >&2
  echo "$leaked" >&2
  status=1
fi
exit "$status"
