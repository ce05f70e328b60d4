#!/usr/bin/env bash
# One call on a lent GPU machine for issue 19: unpack the bundle that `benchmarks/tvm_gpu.py pack` made here
# (a runtime-only TVM, the apache-tvm-ffi wheel, and any of: tuning candidates, a staged latency profile, the
# benchmark's artifacts and check images) and run, for what it holds, `tvm_tune.py measure`, `qcompile profile
# --staged` and `tvm_gpu.py run`, writing the console, tuning.json, profile-tvm.json and tvm_gpu.json into OUT.
# From the repository root there:
#
#   bash benchmarks/tvm_gpu_session.sh "$OUT" .gpu/tvm-gpu.tar.gz --profile
#
# The machine has no TVM: the bundle's wheels are unzipped into a site folder beside a copy of qcompile
# (benchmarks/qcompile_site.sh), and `python3 -P` keeps the checkout off sys.path. TVM_GPU_ARGS and
# TVM_PROFILE_ARGS add arguments to the run and the profile, TVM_TUNE_ARGS replaces the measure's (default
# "--budget-s 180"; the CPU rehearsal: "--device cpu --repeat 2" and "--device cpu").
set -o pipefail
out=$1 bundle=$2
shift 2
work=${TVM_GPU_WORK:-/tmp/tvm-gpu}
rm -rf "$work" && mkdir -p "$work/site" && tar xzf "$bundle" -C "$work" || exit 3
for wheel in "$work"/*.whl; do
    [ -e "$wheel" ] && { python3 -m zipfile -e "$wheel" "$work/site" || exit 3; }
done
bash benchmarks/qcompile_site.sh "$work/site" || exit 3
export PYTHONPATH=$work/site:$work/tvm-runtime TVM_USE_RUNTIME_LIB=1 PYTHONUNBUFFERED=1
python3 -P -c "import tvm, qcompile.backends.tvm.runtime; print('tvm', tvm.__version__, tvm.__file__)" || exit 3
{
    if [ -d "$work/tuning" ]; then  # first: the next build needs these times; a crash here spares the benchmark
        python3 -P -W ignore benchmarks/tvm_tune.py measure --out "$work/tuning" --json "$out/tuning.json" \
            ${TVM_TUNE_ARGS:---budget-s 180}
    fi
    if [ -d "$work/profile" ]; then
        python3 -P -W ignore -m qcompile profile --staged "$work/profile" --out "$out/profile-tvm.json" \
            ${TVM_PROFILE_ARGS:-}
    fi
    if [ -d "$work/bench" ]; then
        python3 -P -W ignore benchmarks/tvm_gpu.py run --out "$work/bench" --json "$out/tvm_gpu.json" \
            ${TVM_GPU_ARGS:-} "$@"
    fi
} 2>&1 | tee "$out/console.txt"
