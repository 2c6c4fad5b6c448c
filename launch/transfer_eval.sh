#!/usr/bin/env bash
# Transfer evaluation: launch/transfer_eval.sh <pennaction|finegym|pouring|synthetic> [checkpoint] [--flags]
# (see launch/transfer_eval.py --help)
set -euo pipefail
exec python "$(dirname "$0")/transfer_eval.py" "$@"
