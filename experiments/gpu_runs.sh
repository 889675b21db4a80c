#!/usr/bin/env bash
# The real problems' GPU runs, as reported in the README's results section.
#   bash experiments/gpu_runs.sh RESULTS_DIR JOB...   with JOB in: peft arch rag throughput fractional
# Each job writes its run store (SQLite), its log and any JSON into RESULTS_DIR; `qd plot` and
# `qd show` read the stores afterwards, on any machine.
set -u
out=$(realpath -m "${1:?results folder}"); shift
mkdir -p "$out"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
qd() { python3 -m qd.cli "$@"; }
for job in "$@"; do
  start=$(date +%s)
  case "$job" in
    peft)
      qd run experiments/peft_gpu.toml --resume --storage "sqlite:///$out/peft_gpu.db" > "$out/peft.log" 2>&1
      python3 experiments/peft_test_split.py --storage "sqlite:///$out/peft_gpu.db" --name peft-gpu \
        --out "$out/peft_test_split.json" >> "$out/peft.log" 2>&1 ;;
    arch)
      qd run experiments/arch_gpu.toml --resume --storage "sqlite:///$out/arch_gpu.db" > "$out/arch.log" 2>&1 ;;
    rag)
      qd run experiments/rag_gpu.toml --resume --storage "sqlite:///$out/rag_gpu.db" > "$out/rag.log" 2>&1 ;;
    throughput)
      python3 experiments/bench_throughput.py --workers 16 --n 160 --methods process,ray,tune \
        --out "$out/throughput.json" > "$out/throughput.log" 2>&1 ;;
    fractional)
      python3 experiments/gpu_fractional.py --out "$out/fractional.json" > "$out/fractional.log" 2>&1 ;;
    *) echo "unknown job $job"; exit 2 ;;
  esac
  echo "$job: exit $? after $(( $(date +%s) - start )) s"
  tail -n 4 "$out/$job.log" 2>/dev/null
done
