#!/usr/bin/env bash
# The quick start: set up, build the corpus, train char-rnn, sample, render the graph.
set -euo pipefail
cd "$(dirname "$0")/.."

# the plot extra brings matplotlib: the run ends by drawing its learning curve (metrics.png)
python -m pip install -q -e '.[plot]'
if ! command -v dot >/dev/null 2>&1; then
  if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
    apt-get update -qq >/dev/null && apt-get install -y -qq graphviz >/dev/null
  else
    echo "note: Graphviz's dot is missing (apt-get install graphviz / brew install graphviz);" \
         "the graph will be written as .dot source only"
  fi
fi

python tools/make_corpus.py
# --resume: running the quick start again continues the run instead of refusing to overwrite it
python -m engine.train configs/char-rnn-small.conf --resume
echo "--- sample (temperature 0.8) ---"
python -m engine.sample --checkpoint workspace/char-rnn-small/checkpoints/step1500.npz \
  --length 600 --prime "def " --temperature 0.8
python tools/graph.py configs/char-rnn-small.conf workspace/char-rnn-small/char-rnn-unrolled.svg --steps 0:4
python tools/graph.py configs/char-rnn-small.conf workspace/char-rnn-small/char-rnn-folded.svg --fold
echo "--- results ---"
echo "learning curve:  workspace/char-rnn-small/metrics.png"
echo "graphs:          workspace/char-rnn-small/char-rnn-unrolled.svg, char-rnn-folded.svg"
echo "checkpoints:     workspace/char-rnn-small/checkpoints/"
