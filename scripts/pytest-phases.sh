#!/usr/bin/env bash
# `make test` and `make test-fast`: the suite in two phases, each test once.
#   1. every test not marked `alone`, on $TEST_WORKERS pytest-xdist workers (default 2). A test that brings
#      up the machine's one emulated cluster holds it while it runs; one that needs it meanwhile waits
#      (tests/conftest.py);
#   2. the tests marked `alone` (they measure what every process shares, such as the loopback's counters), by
#      themselves.
# $1: a marker expression both phases also select by ("not slow" for test-fast; empty: every test). The
# exit status is the first phase's failure, else the second's (pytest's 5, "nothing selected", is no failure).
set -u
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
only=${1:+ and ($1)}

phase() {
    "$PY" -m pytest -q "$@"
    local status=$?
    [ "$status" -eq 5 ] && status=0
    return "$status"
}

phase -n "${TEST_WORKERS:-2}" -m "not alone$only"
first=$?
# only the files that mark tests `alone` (collecting every module again would cost 10 s of CPU)
mapfile -t alone_files < <(grep -l "mark\.alone" tests/test_*.py)
second=0
if [ "${#alone_files[@]}" -gt 0 ]; then
    phase -m "alone$only" "${alone_files[@]}"
    second=$?
fi
[ "$first" -ne 0 ] && exit "$first"
exit "$second"
