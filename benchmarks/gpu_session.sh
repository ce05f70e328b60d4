#!/usr/bin/env bash
# One call on a lent GPU machine for issue 20: profile single training steps, then train (benchmarks/gpu_pareto.py
# run) until the budget is spent, writing at most 8 files into OUT. Run from the repository root there:
#
#   bash benchmarks/gpu_session.sh "$OUT" .gpu/cifar10-jpeg.tar.gz --budget-s 450 --workers 3 [--resume .gpu/prev]
#
# with `.gpu` named in the device call's carry, prepared here first (the data is outside the repository):
#
#   mkdir -p .gpu && cp ../shared/data/cifar10-jpeg.tar.gz .gpu/ && echo /.gpu/ >> .git/info/exclude
#
# GPU_PROFILE_ARGS replaces the profile's arguments (a CPU rehearsal: "--pairs w0.5-mostly4bit --batch 8 --steps 2
# --device cpu", with --smoke for the run). qcompile is not installed there: benchmarks/qcompile_site.sh copies it
# into a site folder first, and `python3 -P` keeps the checkout off sys.path.
set -o pipefail
out=$1 data=$2
shift 2
site=/tmp/qcompile-site
rm -rf "$site" && bash benchmarks/qcompile_site.sh "$site" || exit 3
export PYTHONPATH=$site PYTHONUNBUFFERED=1
python3 -P -c "import qcompile.passes, qcompile.train.run" || exit 3
(nvidia-smi dmon -s u -d 5 > "$out/dmon.txt" 2>&1 &)
{
    python3 -P -W ignore benchmarks/gpu_pareto.py profile "$out" ${GPU_PROFILE_ARGS:---steps 30}
    python3 -P -W ignore benchmarks/gpu_pareto.py run "$out" --data "$data" "$@"
} 2>&1 | tee "$out/console.txt"
