#!/usr/bin/env bash
# galerne-mini from nothing: corpus (Debian + PyPI downloads), then pretraining and the chat
# stage on the CPU (about an hour on 2 cores), written to galerne/assets/galerne-mini.
set -euo pipefail
cd "$(dirname "$0")/../.."
CORPUS="${CORPUS:-.bench/galerne-mini-corpus}"
python recipes/galerne_mini/corpus.py --out "$CORPUS"
python recipes/galerne_mini/train.py --corpus "$CORPUS" --out galerne/assets/galerne-mini "$@"
