#!/usr/bin/env bash
# One lent-machine call: gpu_check.sh under a deadline that leaves time to pack the logs (the machine returns at most
# 8 files, and none of an unfinished step's archive). Usage: bash scripts/gpu_call.sh SECONDS STEP...
deadline=$1; shift
export STATICMOE_COMMIT=${STATICMOE_COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo unknown)}
timeout --kill-after=10 "$deadline" bash scripts/gpu_check.sh "$@"
rc=$?
[ -f "${OUT:-gpu-logs}/0_all_logs.tgz" ] || tar czf /tmp/gpu_logs.tgz -C "${OUT:-gpu-logs}" . && mv /tmp/gpu_logs.tgz "${OUT:-gpu-logs}/0_all_logs.tgz" 2>/dev/null
exit $rc
