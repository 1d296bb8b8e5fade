#!/usr/bin/env bash
# The GPU check of issue 6, in one call from the repo root on a machine with a CUDA GPU and no network:
#   bash benches/gpu_check.sh dist/tokenmill-*.whl [gpu_check.py options, e.g. --no-compile --json out.json]
# Installs the wheel (no dependencies, no index), then runs benches/gpu_check.py: correctness of every
# kernel against its reference, then one table of time / bytes / bandwidth / peak memory next to eager torch
# and torch.compile, plus copy bandwidth (NF4 dequantisation included); then benches/gpu_qlora_check.py (QLoRA
# step memory); then benches/gpu_train_check.py (the trainer: llama-1b MFU, llama-13b memory, issue 13's
# packed documents). The kernel part is about 6 minutes on an H100, the trainer part up to 15: one call of
# a 10-minute device limit holds one part, so pick with the variables below. Exit status 1 if any failed.
#   QLORA_CHECK=0                     skip the QLoRA step memory
#   TRAIN_CHECK=0                     skip the trainer; TRAIN_CHECK=only: the trainer alone
#   TRAIN_CHECK_ONLY=s2048-concat,13b gpu_train_check.py --only (comma-separated name patterns)
set -uo pipefail
if [ $# -lt 1 ] || [ ! -f "$1" ]; then
    echo "usage: bash benches/gpu_check.sh path/to/tokenmill-*.whl [gpu_check.py options]" >&2
    exit 2
fi
WHEEL="$1"
shift
PY="${PYTHON:-python3}"
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"

nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv,noheader 2>/dev/null || echo "nvidia-smi unavailable"
"$PY" -m pip install --quiet --no-deps --no-index --force-reinstall "$WHEEL" || {
    echo "pip install of $WHEEL failed" >&2
    exit 1
}
status=0
TRAIN="${TRAIN_CHECK:-1}"
if [ "$TRAIN" != "only" ]; then
    # `python benches/gpu_check.py` puts benches/ (not the repo root) on sys.path: tokenmill comes from the
    # wheel. Its own trainer hook is off: the trainer runs below under its own time limit.
    timeout --signal=INT --kill-after=20 "${GPU_CHECK_TIMEOUT:-420}" "$PY" "$HERE/gpu_check.py" --trainer off "$@"
    status=$?
    # Issue 12's QLoRA memory goals (7B, 13B on a capped 24 GB card, 65B on 48 GB); QLORA_CHECK=0 skips them.
    if [ "${QLORA_CHECK:-1}" != "0" ]; then
        echo
        echo "== QLoRA step memory (benches/gpu_qlora_check.py)"
        timeout --signal=INT --kill-after=20 "${QLORA_CHECK_TIMEOUT:-300}" "$PY" "$HERE/gpu_qlora_check.py" || status=1
    fi
fi
if [ "$TRAIN" != "0" ]; then
    echo
    echo "== trainer (benches/gpu_train_check.py${TRAIN_CHECK_ONLY:+ --only $TRAIN_CHECK_ONLY})"
    timeout --signal=INT --kill-after=20 "${TRAIN_CHECK_TIMEOUT:-900}" "$PY" "$HERE/gpu_train_check.py" \
        ${TRAIN_CHECK_ONLY:+--only "$TRAIN_CHECK_ONLY"} || status=1
fi
exit $status
