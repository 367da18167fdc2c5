#!/usr/bin/env bash
# run each line of $1 as benchmarks/recipe/run.py arguments, one after another
cd "$(dirname "$0")/../.."
while read -r line; do
  [ -z "$line" ] && continue
  echo "=== $line $(date +%T)"
  PYTHONPATH=$PWD python benchmarks/recipe/run.py $line 2>&1 | tail -1
done < "$1"
