#!/usr/bin/env bash
# One lent-machine call: gpu_check.sh under a deadline that leaves time to pack the logs (the machine returns at most
# 8 files, and none of an unfinished step's archive). Usage: bash scripts/gpu_call.sh SECONDS STEP...
deadline=$1; shift
export STATICMOE_COMMIT=${STATICMOE_COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo unknown)}
timeout --kill-after=10 "$deadline" bash scripts/gpu_check.sh "$@"
rc=$?
out=${OUT:-gpu-logs}
if [ ! -f "$out/0_all_logs.tgz" ]; then
  tar czf /tmp/gpu_logs.tgz -C "$out" . && mv /tmp/gpu_logs.tgz "$out/0_all_logs.tgz"
fi
exit $rc
