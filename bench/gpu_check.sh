#!/bin/sh
# The checks that need an NVIDIA GPU, in one run: build with the machine's own torch
# (which must have CUDA), the CUDA tests, the CUDA tests under compute-sanitizer memcheck,
# and the GPU benchmark. Logs go to $OUT (default: bench/out).
#   sh bench/gpu_check.sh            everything
#   STAGES="build test" sh bench/gpu_check.sh
set -u
OUT=${OUT:-bench/out}
STAGES=${STAGES:-"build test sanitize bench"}
PY=${PY:-python3}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD/python${PYTHONPATH:+:$PYTHONPATH}"
nvidia-smi -L
$PY -c "import torch; print('torch', torch.__version__, 'CUDA', torch.version.cuda, torch.cuda.get_device_name())"
summary=""
for stage in $STAGES; do
  start=$(date +%s)
  case $stage in
  build)
    # the host compiler must match the libstdc++ that torch loads: on a machine whose default
    # c++ is a newer GCC than the system's, C++ exceptions thrown by the operators (every
    # argument check) crashed the process; the system compiler is the safe default
    [ -x /usr/bin/g++ ] && export CXX=${CXX:-/usr/bin/g++} CC=${CC:-/usr/bin/gcc}
    MAX_JOBS=${MAX_JOBS:-16} $PY setup.py -q build_clib build_ext --inplace >"$OUT/build.log" 2>&1
    rc=$?; tail -n 30 "$OUT/build.log" ;;
  test)
    timeout ${TEST_TIMEOUT:-300} $PY -m pytest -q -rs tests/test_cuda.py >"$OUT/test_cuda.log" 2>&1
    rc=$?; tail -n 40 "$OUT/test_cuda.log" ;;
  sanitize)
    # memcheck: first the test that writes bad positions behind the version counter (its point is
    # memory safety), then the operator tests (compile, gradcheck, opcheck and bad input left out
    # for time; CUDA graphs and the sync-debug checks need the caching allocator); no caching
    # allocator, so an access past a tensor's end is not hidden inside a pool
    PYTORCH_NO_CUDA_MEMORY_CACHING=1 timeout ${SAN_TIMEOUT:-240} compute-sanitizer --tool memcheck \
      --error-exitcode 9 --print-limit 20 $PY -m pytest -q -x tests/test_cuda.py -k "memory_safe" \
      >"$OUT/sanitize.log" 2>&1
    rc=$?
    if [ $rc -eq 0 ]; then
      PYTORCH_NO_CUDA_MEMORY_CACHING=1 timeout ${SAN_TIMEOUT:-240} compute-sanitizer --tool memcheck \
        --error-exitcode 9 --print-limit 20 $PY -m pytest -q -x tests/test_cuda.py \
        -k "not compile and not gradcheck and not opcheck and not bad_input and not graph and not capture and not synchronise" \
        >>"$OUT/sanitize.log" 2>&1
      rc=$?
    fi
    tail -n 25 "$OUT/sanitize.log" ;;
  bench)
    timeout ${BENCH_TIMEOUT:-300} $PY bench/bench_cuda.py --out "$OUT/cuda.md" --csv "$OUT/cuda.csv" ${BENCH_ARGS:-} >"$OUT/bench.log" 2>&1
    rc=$?; cat "$OUT/bench.log" ;;
  *) echo "unknown stage $stage"; rc=2 ;;
  esac
  summary="$summary
$stage: exit $rc in $(( $(date +%s) - start )) s"
done
echo "$summary"
