#!/usr/bin/env bash
# The small-scale experiment on a GPU machine, one call of at most 10 minutes at a time: re-run it until the
# last line says "all done". The first call unpacks and tokenises the corpus (from data/real_text.tar.xz,
# written by `python experiments/real_text.py --out data/real_text --pack data/real_text.tar.xz` where the
# Debian packages are installed); every call then trains and measures for what is left of BUDGET seconds,
# on all GPUs of the machine (one worker per GPU). Extra arguments go to small_scale.py (e.g. --only RUN).
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${DATA:-data/real_text}
ARCHIVE=${ARCHIVE:-data/real_text.tar.xz}
BUDGET=${BUDGET:-540}
if [ ! -f "$DATA/tokens/meta.json" ]; then
    if [ -f "$ARCHIVE" ]; then
        python experiments/real_text.py --out "$DATA" --from-archive "$ARCHIVE"
    else
        python experiments/real_text.py --out "$DATA"
    fi
fi
LEFT=$((BUDGET - SECONDS))
if (( LEFT < 60 )); then
    echo "small_scale.sh: the corpus took this call's time; run it again to train"
    exit 0
fi
GPUS=$(python -c "import torch; print(','.join(map(str, range(torch.cuda.device_count()))))")
if [[ "$GPUS" == *,* ]]; then
    exec python experiments/small_scale.py --data "$DATA" --time-budget "$LEFT" --gpus "$GPUS" "$@"
fi
exec python experiments/small_scale.py --data "$DATA" --time-budget "$LEFT" "$@"
