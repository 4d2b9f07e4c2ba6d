#!/bin/sh
# `shoal` for the benchmarks: this checkout's src (bench/containerd.py puts it first on PYTHONPATH) run by
# the benchmark's own interpreter ($SHOAL_BENCH_PYTHON), whatever console script a venv holds; through the
# entry point, so that a run is handed to a `shoal service` as the console script would hand it
exec "${SHOAL_BENCH_PYTHON:-python3}" -c 'import sys; from shoal.__main__ import main; sys.exit(main())' "$@"
