#!/usr/bin/env bash
# The vision encoders on a CUDA GPU: ms per CLIP-L/336 tile for ggml-CUDA, NumPy and libmtmd-CUDA, and
# max |diff| of the features against the float32 NumPy encoder (f32 and f16 mmproj).
#
#   benchmarks/gpu.sh prepare   # here, with the package registries: fills .gpu-carry/ (< 64 MiB)
#   benchmarks/gpu.sh run       # on the CUDA machine (nvcc, CMake, ninja, Python 3.12; no registry):
#                               # builds ggml, llama and mtmd from the carried sources for one CUDA
#                               # architecture (CUDA_ARCH, default 90), then runs benchmarks/vision.py --gpu
#
# The device tool carries .gpu-carry/ with the working tree: run(command="benchmarks/gpu.sh run",
# carry=[".gpu-carry"]). Nothing is downloaded on the device.
set -euo pipefail
cd "$(dirname "$0")/.."
carry=.gpu-carry
version=0.3.36  # llama-cpp-python: its pure-Python package and the llama.cpp it vendors
py=3.12

case "${1:-run}" in
prepare)
    rm -rf "$carry" && mkdir -p "$carry/wheels"
    pip download -q --no-deps --no-binary :all: "llama-cpp-python==$version" -d "$carry/sdist"
    tar -xzf "$carry/sdist/llama_cpp_python-$version.tar.gz" -C "$carry/sdist"
    src="$carry/sdist/llama_cpp_python-$version"
    # the sources the three libraries need, without docs, models, tests and other backends (the sdist is 76 MB)
    tar -C "$src" -cJf "$carry/llama-cpp-src.tar.xz" \
        --exclude='vendor/llama.cpp/ggml/src/ggml-vulkan' --exclude='vendor/llama.cpp/ggml/src/ggml-sycl' \
        --exclude='vendor/llama.cpp/ggml/src/ggml-metal' --exclude='vendor/llama.cpp/ggml/src/ggml-hexagon' \
        --exclude='vendor/llama.cpp/ggml/src/ggml-opencl' --exclude='vendor/llama.cpp/ggml/src/ggml-cann' \
        --exclude='vendor/llama.cpp/ggml/src/ggml-musa' --exclude='vendor/llama.cpp/ggml/src/ggml-webgpu' \
        llama_cpp vendor/llama.cpp/CMakeLists.txt vendor/llama.cpp/cmake vendor/llama.cpp/ggml \
        vendor/llama.cpp/include vendor/llama.cpp/src vendor/llama.cpp/common vendor/llama.cpp/vendor \
        vendor/llama.cpp/tools/CMakeLists.txt vendor/llama.cpp/tools/mtmd vendor/llama.cpp/licenses
    rm -rf "$carry/sdist"
    # the runtime's Python dependencies for CPython 3.12 on x86-64 Linux
    pip download -q --only-binary :all: --python-version "$py" --platform manylinux2014_x86_64 \
        --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 -d "$carry/wheels" \
        numpy pillow gguf sentencepiece protobuf pyyaml jinja2 markupsafe diskcache typing_extensions tqdm requests
    du -sh "$carry"
    ;;
run)
    work="$(mktemp -d)"
    tar -xJf "$carry/llama-cpp-src.tar.xz" -C "$work"
    arch="${CUDA_ARCH:-90}"
    start=$(date +%s)
    cmake -S "$work/vendor/llama.cpp" -B "$work/build" -G Ninja -DCMAKE_BUILD_TYPE=Release \
        -DBUILD_SHARED_LIBS=ON -DGGML_CUDA="${GGML_CUDA:-ON}" -DCMAKE_CUDA_ARCHITECTURES="$arch" -DGGML_CUDA_FA=OFF \
        -DGGML_CUDA_NCCL=OFF \
        -DGGML_NATIVE=ON -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF \
        -DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_APP=OFF -DLLAMA_BUILD_MTMD=ON -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF \
        > "$work/cmake.log" || { tail -40 "$work/cmake.log"; exit 1; }
    cmake --build "$work/build" --target ggml llama mtmd -j "$(nproc)" > "$work/build.log" \
        || { tail -40 "$work/build.log"; exit 1; }
    echo "built ggml, llama and mtmd with CUDA (sm_$arch) in $(( $(date +%s) - start )) s"
    lib="$(dirname "$(find "$work/build" -name 'libggml.so' | head -1)")"
    python3 -m venv "$work/venv"
    "$work/venv/bin/pip" install -q --no-index --find-links "$carry/wheels" \
        numpy pillow gguf sentencepiece protobuf pyyaml jinja2 markupsafe diskcache typing_extensions tqdm
    # llama-cpp-python's pure-Python package, loading the libraries just built
    export PYTHONPATH="$work:$PWD" LLAMA_CPP_LIB_PATH="$lib" MTMD_CPP_LIB="$lib" LLAVA_GGUF_GGML_LIB="$lib"
    export LD_LIBRARY_PATH="$lib:${LD_LIBRARY_PATH:-}"
    mkdir -p "$work/llama_cpp/lib" && cp -a "$lib"/lib*.so* "$work/llama_cpp/lib/"
    nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
    "$work/venv/bin/python" benchmarks/vision.py --gpu --tiles 5 --runs 3 --types f32,f16 --json
    ;;
*)
    echo "usage: $0 prepare|run" >&2
    exit 2
    ;;
esac
