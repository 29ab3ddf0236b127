#!/usr/bin/env bash
# One lent-GPU session in stages (each run of the device tool is at most 10 minutes, and a machine
# that idles 30 s is gone, so every call starts with `setup`):
#
#   bash benchmarks/gpu_session.sh setup test            # build + every gpu test (or: test-triton,
#                                                        #   then test-others, if it needs two calls)
#   bash benchmarks/gpu_session.sh setup sanitize        # compute-sanitizer memcheck
#   bash benchmarks/gpu_session.sh setup layers          # ResNet-50 layers + block tails, fp16
#   bash benchmarks/gpu_session.sh setup layers-others   # ResNet-18 / ResNeXt-50 layers, fp16
#   bash benchmarks/gpu_session.sh setup models-256      # whole models at batch 256 (throughput)
#   bash benchmarks/gpu_session.sh setup models-1        # whole models at batch 1 (latency, CUDA graphs)
#   bash benchmarks/gpu_session.sh setup models-bf16     # ResNet-50 bf16 at batch 256 (the bf16 target)
#   bash benchmarks/gpu_session.sh setup models-autotune # + torch.compile max-autotune  (long)
#
# The machine has torch 2.11, triton 3.6, Python 3.12 and no network. Carry the wheels it lacks:
# on this (networked) machine run `bash benchmarks/gpu_session.sh wheels` once, then name `.whl`
# in each device call's `carry`. Set FASTRES_COMMIT to the commit being measured. Logs, JSON and
# plots go to $OUT (8 files come back at most), a short table last, and each stage's wall time.
#
# Tuning decisions outlive the machine: the cache lives in .tuning-cache/ (git-ignored) and each
# stage copies its JSON to $OUT. Copy the returned tuning-*.json into .tuning-cache/ here and add
# `.tuning-cache` to the next call's `carry`: later stages then reuse what earlier ones measured.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
export FASTRES_CACHE_DIR=${FASTRES_CACHE_DIR:-$PWD/.tuning-cache}
PY=${PY:-python3}

stage_wheels() {
    # Runs HERE, not on the GPU machine: the wheels the GPU machine lacks, for its Python 3.12.
    $PY -m pip download -q --dest .whl --only-binary=:all: --no-deps --python-version 3.12 \
        --platform manylinux2014_x86_64 --platform manylinux_2_28_x86_64 --platform any \
        -c constraints.txt nvidia-cutlass expecttest && ls .whl
}

stage_setup() {
    if ls .whl/*.whl >/dev/null 2>&1; then
        $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || return 1
        export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
    fi
    {
        nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem --format=csv
        $PY -c "import torch, triton, sys; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__, 'cudnn', torch.backends.cudnn.version())"
        nvcc --version | tail -1
        echo "commit ${FASTRES_COMMIT:-unknown}"
    } > "$OUT/env.txt" 2>&1
    cat "$OUT/env.txt"
    local start=$SECONDS
    FASTRES_BUILD_CUDA=1 MAX_JOBS=16 \
        $PY -m pip install --no-build-isolation --no-deps -e . > "$OUT/build.log" 2>&1 || { tail -40 "$OUT/build.log"; return 1; }
    echo "build: $((SECONDS - start)) s"
    $PY -c "import fastres; print(fastres.backend_status())"
}

logged() {  # logged LOG LINES COMMAND...: COMMAND's output to $OUT/LOG, its last LINES shown
    local log=$1 lines=$2
    shift 2
    "$@" > "$OUT/$log" 2>&1
    local rc=$?
    tail -"$lines" "$OUT/$log"
    return $rc
}

gpu_tests() {  # gpu_tests NAME [pytest args]: the gpu-marked tests, log in $OUT/NAME.log
    local name=$1
    shift
    logged "$name.log" 25 $PY -m pytest -m gpu -q --maxfail=10 --durations=15 -p no:cacheprovider "$@"
}

stage_test() { gpu_tests test-gpu; }
# The same tests in two halves, for when `test` does not fit one 10-minute call.
stage_test-triton() { gpu_tests test-gpu-triton tests/test_triton_backend.py; }
stage_test-others() { gpu_tests test-gpu-others --ignore=tests/test_triton_backend.py; }

stage_sanitize() {
    # memcheck on a few shapes per backend and on one Hopper and one Ampere CUTLASS kernel over all
    # its cases; the caching allocator off so every out-of-bounds access is seen
    PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --tool memcheck --error-exitcode 9 \
        $PY -m pytest -q -p no:cacheprovider tests/test_backends.py \
        -k "(matrix and float16 and (resnet50:c64h56 or odd:stem or odd:1x1-C12) and (cuda or cudnn)) or (every_cutlass_kernel and (0-torch.float16 or 5-torch.bfloat16))" \
        > "$OUT/sanitizer.log" 2>&1
    local rc=$?
    grep -E "ERROR SUMMARY|passed|failed" "$OUT/sanitizer.log" | tail -5
    return $rc
}

stage_layers() {
    # ResNet-50 alone first (the issue's per-layer target): each case also runs torch.compile and a
    # float64 CPU reference, so all three models in one call may not fit a 10-minute command.
    logged bench-layers.log 60 $PY -m fastres bench layers --model resnet50 --batch 128 --dtype fp16 --out "$OUT"
}

stage_layers-others() {
    logged bench-layers-others.log 60 $PY -m fastres bench layers --model resnet18 resnext50_32x4d --batch 128 \
        --dtype fp16 --out "$OUT/others"
}

models() {  # models BATCH: the three models the issue names, fp16, against eager, compile and graphs
    logged "bench-models-$1.log" 40 $PY -m fastres bench models --batch "$1" --dtype fp16 \
        --model resnet50 resnet18 resnext50_32x4d --baselines eager-nchw eager-cl compile eager-cl+graph --out "$OUT/models-$1"
}

stage_models-256() { models 256; }  # the throughput targets
stage_models-1() { models 1; }      # the latency target (CUDA graphs)

stage_models-bf16() {
    logged bench-models-bf16.log 20 $PY -m fastres bench models --batch 256 --dtype bf16 --model resnet50 \
        --backends auto --baselines eager-cl --out "$OUT/bf16"
}

stage_models-autotune() {
    logged bench-autotune.log 40 $PY -m fastres bench models --batch 256 1 --dtype fp16 --model resnet50 \
        --backends auto --baselines eager-cl compile-max-autotune eager-cl+graph --out "$OUT/autotune"
}

status=0
for stage in "$@"; do
    echo "=== $stage ==="
    started=$SECONDS
    "stage_$stage" || { status=1; echo "stage $stage failed"; [ "$stage" = setup ] && break; }
    echo "stage $stage: $((SECONDS - started)) s"
    [ "$stage" = wheels ] || cp "$FASTRES_CACHE_DIR"/tuning-*.json "$OUT"/ 2>/dev/null || true
done
exit $status
