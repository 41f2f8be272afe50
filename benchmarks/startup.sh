#!/usr/bin/env bash
# Start-up cost of two checkouts side by side: `gemrun --help`, `gemrun info` and a one-token `generate` (time to
# the first token, load included), wall seconds and peak RSS, 3 runs each, alternating.
#
#   bash benchmarks/startup.sh OLD_CHECKOUT NEW_CHECKOUT [PYTHON]
#
# Each command runs as `python -S -m gemrun.cli` from /tmp with the checkout and site-packages on PYTHONPATH, so
# neither the current directory nor an editable install decides which code runs.
set -u
old=$1 new=$2 py=${3:-python}
site=$("$py" -c "import site; print(':'.join(site.getsitepackages()))")
cd /tmp
for i in 1 2 3; do
  for dir in "$old" "$new"; do
    for c in "--help" "info" "generate Hi --max-tokens 1 --temperature 0"; do
      /usr/bin/time -f "%e s %M KB" env PYTHONPATH="$dir:$site" "$py" -S -m gemrun.cli --threads 2 $c \
        >/dev/null 2>/tmp/gemrun-startup.err
      echo "$dir | $c | $(tail -1 /tmp/gemrun-startup.err)"
    done
  done
done
