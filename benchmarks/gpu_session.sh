#!/usr/bin/env bash
# One lent-GPU session in stages (each run of the device tool is at most 10 minutes, and a machine
# that idles 30 s is gone, so every call starts with `setup`):
#
#   bash benchmarks/gpu_session.sh setup test            # build + every gpu test (or: test-triton,
#                                                        #   then test-others, if it needs two calls)
#   bash benchmarks/gpu_session.sh setup test-first      # a 150-test first look (short budgets)
#   bash benchmarks/gpu_session.sh setup sanitize        # compute-sanitizer memcheck
#   bash benchmarks/gpu_session.sh setup test-onnx       # torch.onnx.export of GPU models (tests/test_onnx.py)
#   bash benchmarks/gpu_session.sh setup layers          # ResNet-50 layers + block tails, fp16
#   bash benchmarks/gpu_session.sh setup layers-others   # ResNet-18 / ResNeXt-50 layers, fp16
#   bash benchmarks/gpu_session.sh setup models-256      # whole models at batch 256 (throughput)
#   bash benchmarks/gpu_session.sh setup models-1        # whole models at batch 1 (latency, CUDA graphs)
#   bash benchmarks/gpu_session.sh setup models-bf16     # ResNet-50 bf16 at batch 256 (the bf16 target)
#   bash benchmarks/gpu_session.sh setup models-autotune # + torch.compile max-autotune  (long)
#   bash benchmarks/gpu_session.sh setup models-timm     # timm nets whose LeakyReLU / GELU the epilogue fuses
#   bash benchmarks/gpu_session.sh setup host            # host time of one fused call, level by level
#   bash benchmarks/gpu_session.sh setup profile         # ncu, kernel by kernel, on ResNet-50's layers
#                                                        #   (PROFILE_CASES="c64h56 c256h14" narrows it)
#
# The machine has torch 2.11, triton 3.6, Python 3.12 and no network. Carry the wheels it lacks:
# on this (networked) machine run `bash benchmarks/gpu_session.sh wheels` once, then name `.whl`
# in each device call's `carry` (.whl/onnx/ holds ONNX's, installed by test-onnx alone, apart;
# without it test-onnx uses the image's own ONNX packages). Set FASTRES_COMMIT to the commit being measured. Logs, JSON and
# plots go to $OUT (8 files come back at most), a short table last, and each stage's wall time.
#
# Nothing measured is lost to the call's time limit, and the next call goes on from it:
# - The tuning cache is $OUT/cache, seeded from .tuning-cache/ (git-ignored): copy the returned
#   cache/tuning-*.json into .tuning-cache/ and carry it, and later stages reuse what earlier ones
#   measured.
# - Each bench stage writes $OUT/<stage>/ after every case, seeded from .bench-results/<stage>/
#   (git-ignored), and starts no case that would end after CALL_LIMIT seconds (default 570) from
#   the script's start. A stage cut short says so: copy the returned <stage>/*.json into
#   .bench-results/<stage>/, carry `.bench-results`, and run the same stage again (--resume runs
#   the cases not done; same commit, device and options, or it refuses). A contender that loses the
#   CUDA context (a faulting kernel) is recorded and the stage goes on in a new process without it.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench-out}
CALL_LIMIT=${CALL_LIMIT:-570}
mkdir -p "$OUT/cache"
cp .tuning-cache/tuning-*.json "$OUT/cache"/ 2>/dev/null
export PYTHONUNBUFFERED=1
export FASTRES_CACHE_DIR=$(cd "$OUT/cache" && pwd)
PY=${PY:-python3}

stage_wheels() {
    # Runs HERE, not on the GPU machine: the wheels the GPU machine lacks, for its Python 3.12, and
    # CI's setuptools (the image's version is unread; one older than 77 refuses pyproject's license).
    $PY -m pip download -q --dest .whl --only-binary=:all: --no-deps --python-version 3.12 \
        --platform manylinux2014_x86_64 --platform manylinux_2_28_x86_64 --platform any \
        -c constraints.txt nvidia-cutlass expecttest setuptools && ls .whl
    # ONNX and its runtime with their compiled dependencies: ~36 MB, only for test-onnx
    $PY -m pip download -q --dest .whl/onnx --only-binary=:all: --no-deps --python-version 3.12 \
        --platform manylinux2014_x86_64 --platform manylinux_2_28_x86_64 --platform any \
        -c constraints.txt onnx onnxscript onnx-ir onnxruntime ml_dtypes protobuf flatbuffers && ls .whl/onnx
}

stage_setup() {
    if ls .whl/*.whl >/dev/null 2>&1; then
        $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || return 1
        export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
    fi
    {
        nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem --format=csv
        $PY -c "import torch, triton, setuptools, sys; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__, 'cudnn', torch.backends.cudnn.version(), 'setuptools', setuptools.__version__)"
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
    local name=$1 plugins=() budget rc
    shift
    # pytest-timeout and pytest-xdist are on the GPU machine's image. A hung kernel then fails its
    # test, not the call; and GPU_TEST_WORKERS processes share the GPU, so the tests' Triton
    # compiles (most of their time: every shape and dtype tunes from an empty cache) use the cores.
    $PY -c "import pytest_timeout" 2>/dev/null && plugins+=(--timeout=240)
    $PY -c "import xdist" 2>/dev/null && plugins+=(-n "${GPU_TEST_WORKERS:-8}")
    # Interrupted (SIGINT) before the call's limit, pytest still prints its failures' tracebacks and
    # summary; killed with the call, it would leave only dots. TESTS_LEAVE seconds stay for the
    # stages after it in the same call.
    budget=$((CALL_LIMIT - SECONDS - ${TESTS_LEAVE:-0}))
    if [ "$budget" -lt 60 ]; then
        echo "$name: $budget s left for tests in this call, not started"
        return 3
    fi
    logged "$name.log" 25 timeout -s INT -k 30 "$budget" \
        $PY -m pytest -m gpu -q --maxfail=10 --durations=15 -p no:cacheprovider "${plugins[@]}" "$@"
    rc=$?
    [ $rc = 124 ] && return 3
    return $rc
}

# A first look within a short device budget (150 tests, fp16): the backend matrix on ResNet-50's
# layers (CUTLASS, cuDNN + epilogue), every CUTLASS kernel, the Triton kernel on ResNet-50's layers,
# odd shapes and projected residuals, every epilogue activation compiled, and the CUDA-graph paths.
FIRST_TESTS="(backend_matrix and torch.float16 and resnet50 and not auto) or every_cutlass_kernel
    or (model_layers_full_size and torch.float16 and resnet50) or (odd_cases and torch.float16)
    or (projected_residual and torch.float16 and not every_candidate) or cuda_graph or capture
    or reduce_overhead or (every_activation_compiled and torch.float16) or (cutlass_out_form and torch.float16)"
stage_test-first() { gpu_tests test-gpu-first -k "$(echo $FIRST_TESTS)"; }
stage_test() { gpu_tests test-gpu; }
# The same tests in two halves, for when `test` does not fit one 10-minute call.
stage_test-triton() { gpu_tests test-gpu-triton tests/test_triton_backend.py; }
stage_test-others() { gpu_tests test-gpu-others --ignore=tests/test_triton_backend.py; }

stage_test-onnx() {
    # The image has onnx, onnxscript and onnxruntime (KINDS.md); carried wheels (`wheels`: the
    # versions constraints.txt pins) go in their own --target, so the benchmarks' stages never
    # import them.
    if ls .whl/onnx/*.whl >/dev/null 2>&1; then
        $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site-onnx .whl/onnx/*.whl \
            || return 1
    fi
    PYTHONPATH=/tmp/site-onnx${PYTHONPATH:+:$PYTHONPATH} logged test-onnx.log 25 $PY -m pytest -q -p no:cacheprovider tests/test_onnx.py
}

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

bench() {  # bench STAGE ARGS...: `fastres bench ARGS` into $OUT/STAGE, resumed, within the call's time
    local stage=$1 log rc
    shift
    mkdir -p "$OUT/$stage"
    cp .bench-results/"$stage"/*.json "$OUT/$stage"/ 2>/dev/null
    for log in "bench-$stage.log" "bench-$stage-2.log" "bench-$stage-3.log"; do
        if [ $((CALL_LIMIT - SECONDS)) -lt 60 ]; then  # the first case always runs: start none this late
            echo "$stage: $((CALL_LIMIT - SECONDS)) s left in this call, not started"
            return 3
        fi
        logged "$log" 60 $PY -m fastres bench "$@" --out "$OUT/$stage" --resume --time-limit $((CALL_LIMIT - SECONDS))
        rc=$?
        # 4: a contender lost the CUDA context; a new process goes on with the case's other contenders
        [ $rc = 4 ] || break
    done
    return $rc
}

# ResNet-50 alone first (the issue's per-layer target): each case also runs torch.compile and a
# float64 CPU reference, so one call may not hold all its cases (the stage resumes).
stage_layers() { bench layers layers --model resnet50 --batch 128 --dtype fp16; }
stage_layers-others() { bench layers-others layers --model resnet18 resnext50_32x4d --batch 128 --dtype fp16; }

models() {  # models BATCH: the three models the issue names, fp16, against eager, compile and graphs
    bench "models-$1" models --batch "$1" --dtype fp16 --model resnet50 resnet18 resnext50_32x4d \
        --baselines eager-nchw eager-cl compile eager-cl+graph
}

stage_models-256() { models 256; }  # the throughput targets
stage_models-1() { models 1; }      # the latency target (CUDA graphs)
stage_models-bf16() { bench models-bf16 models --batch 256 --dtype bf16 --model resnet50 --backends auto --baselines eager-cl; }
stage_models-autotune() {
    bench models-autotune models --batch 256 1 --dtype fp16 --model resnet50 --backends auto \
        --baselines eager-cl compile-max-autotune eager-cl+graph
}

# The image's own timm (KINDS.md lists it): DarkNet's LeakyReLU and RepViT's GELU, fused since the
# thirteenth session, against eager and torch.compile.
stage_models-timm() {
    bench models-timm models --batch 256 --dtype fp16 --model timm:cspdarknet53 timm:repvit_m1 --backends auto \
        --baselines eager-cl compile
}

# Host time of one fused call at each level of its dispatch (a few seconds): whether batch 1
# without CUDA graphs waits on Python (NOTES, sixteenth session).
stage_host() {
    mkdir -p "$OUT/host"
    logged host.log 45 $PY -m pytest -q -p no:cacheprovider benchmarks/bench_host.py --benchmark-enable \
        --benchmark-columns=min,median,rounds --benchmark-json="$OUT/host/host.json"
}

stage_profile() {
    # Cut short, it still leaves profile/ncu.csv and profile/regions.json: here, run
    # python -c "from pathlib import Path; from fastres.bench.profile import summarize; summarize(Path('DIR'))"
    logged profile.log 80 $PY -m fastres bench profile --model resnet50 --batch 128 --dtype fp16 \
        --out "$OUT/profile" ${PROFILE_CASES:+--cases $PROFILE_CASES}
}

status=0
for stage in "$@"; do
    echo "=== $stage ==="
    started=$SECONDS
    "stage_$stage"
    rc=$?
    case $rc in
        0) ;;
        3) status=3
           echo "stage $stage stopped at the time limit (a bench stage: carry its JSON back in" \
                ".bench-results/$stage/ and run it again)" ;;
        *) status=1; echo "stage $stage failed"; [ "$stage" = setup ] && break ;;
    esac
    echo "stage $stage: $((SECONDS - started)) s"
done
exit $status
