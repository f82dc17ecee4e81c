# syntax=docker/dockerfile:1
# tscale images. Targets (see README.md, "Deploy"):
#   docker build --target cpu  -t tscale:cpu  .   Debian 12, LibTorch 1.13 from Debian, CPU only
#   docker build --target demo -t tscale:demo .   cpu + scikit-learn and matplotlib for the example
#   docker build --target cuda -t tscale:cuda .   Ubuntu 24.04 + CUDA 13, LibTorch from PyTorch's wheel
# A plain `docker build .` builds cpu (the last stage).
#
# The cpu build stage runs the same scripts as the README and CI: scripts/install-deps.sh, then
# scripts/build.sh. Tests are not run by default; --build-arg RUN_TESTS=1 runs ctest in the build.
# The runtime stages hold only the two binaries, the Python client and the shared libraries they
# need, and run as the non-root user tscale (uid 10001).
#
# Not built on the machine these files were written on (it has no Docker engine); the cuda target
# has never been built at all: see deploy/README.md.

ARG DEBIAN_IMAGE=debian:bookworm
ARG DEBIAN_RUNTIME_IMAGE=debian:bookworm-slim
ARG CUDA_DEVEL_IMAGE=nvidia/cuda:13.0.1-devel-ubuntu24.04
ARG CUDA_RUNTIME_IMAGE=nvidia/cuda:13.0.1-runtime-ubuntu24.04

# ----------------------------------------------------------------------------------------------
# cuda: build stage. LibTorch comes from PyTorch's pip wheel (its CMake config is inside the wheel,
# as on a CUDA host, docs/gpu.md); gRPC, protobuf, Abseil, prometheus-cpp come from Ubuntu 24.04's
# packages (the Debian packages that docs/gpu.md downloads are for hosts without a registry; the
# image build has one).
FROM ${CUDA_DEVEL_IMAGE} AS cuda-build
ARG TORCH_PIP_SPEC="torch==2.11.*"
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cu130
ARG CUDA_ARCHITECTURES="80;86;89;90"
ARG RUN_TESTS=0
ENV DEBIAN_FRONTEND=noninteractive
RUN apt-get update \
 && apt-get install -y --no-install-recommends \
      g++ make pkg-config git ca-certificates \
      python3 python3-venv python3-numpy python3-grpcio python3-protobuf \
      libabsl-dev libprotobuf-dev protobuf-compiler libgrpc++-dev protobuf-compiler-grpc \
      prometheus-cpp-dev nlohmann-json3-dev libgtest-dev libgmock-dev \
 && rm -rf /var/lib/apt/lists/*
# PEP 668: pip installs into a venv. CMake from pip as well: CUDA 13 needs a newer CMake than
# Ubuntu 24.04's 3.28 (the GPU host uses CMake 4.x). The venv goes last on PATH so that python3
# stays Ubuntu's (its grpcio and protobuf serve the Python client).
RUN python3 -m venv /opt/torch \
 && /opt/torch/bin/pip install --no-cache-dir --index-url "${TORCH_INDEX_URL}" "${TORCH_PIP_SPEC}" \
 && /opt/torch/bin/pip install --no-cache-dir "cmake>=3.31"
ENV PATH=${PATH}:/opt/torch/bin
WORKDIR /src
COPY . .
RUN PYTHON=/opt/torch/bin/python bash scripts/build.sh --torch-from-python \
      -DCMAKE_CUDA_ARCHITECTURES="${CUDA_ARCHITECTURES}" \
 && if [ "${RUN_TESTS}" = 1 ]; then cd build && ctest --output-on-failure; fi
# The Ubuntu packages whose shared libraries the binaries load (LibTorch's come with /opt/torch).
RUN ldd build/bin/tscale-server build/bin/tscale | awk '/=> \//{print $3}' | grep -v '^/opt/torch/' \
      | while read -r f; do dpkg -S "$f" 2>/dev/null || dpkg -S "/usr$f" 2>/dev/null \
          || dpkg -S "$(readlink -f "$f")" 2>/dev/null || true; done \
      | cut -d: -f1 | sort -u > /runtime-packages.txt \
 && cat /runtime-packages.txt

# cuda: runtime stage.
FROM ${CUDA_RUNTIME_IMAGE} AS cuda
ENV DEBIAN_FRONTEND=noninteractive
COPY --from=cuda-build /runtime-packages.txt /tmp/runtime-packages.txt
RUN apt-get update \
 && xargs -a /tmp/runtime-packages.txt apt-get install -y --no-install-recommends \
      python3 python3-numpy python3-grpcio python3-protobuf \
 && rm -rf /var/lib/apt/lists/* /tmp/runtime-packages.txt \
 && useradd --system --uid 10001 --user-group --home-dir /var/lib/tscale --shell /usr/sbin/nologin tscale \
 && mkdir -p /var/lib/tscale/checkpoints && chown -R 10001:10001 /var/lib/tscale
# LibTorch and the NVIDIA libraries of its wheel, at the path the binaries were linked against.
COPY --from=cuda-build /opt/torch /opt/torch
COPY --from=cuda-build /src/build/bin/tscale-server /src/build/bin/tscale /usr/local/bin/
COPY --from=cuda-build /src/build/python /opt/tscale/python
COPY --from=cuda-build /src/client/python/examples /opt/tscale/examples
ENV PYTHONPATH=/opt/tscale/python
USER 10001:10001
WORKDIR /var/lib/tscale
EXPOSE 50051 9090
HEALTHCHECK --interval=30s --timeout=5s --start-period=120s --retries=3 \
  CMD ["tscale", "--server", "127.0.0.1:50051", "--timeout", "3", "--retry-seconds", "0", "health"]
ENTRYPOINT ["tscale-server"]
CMD ["--listen", "0.0.0.0:50051", "--metrics-listen", "0.0.0.0:9090", "--checkpoint-dir", "/var/lib/tscale/checkpoints"]

# ----------------------------------------------------------------------------------------------
# cpu: build stage, the README's and CI's scripts.
FROM ${DEBIAN_IMAGE} AS cpu-build
ARG RUN_TESTS=0
WORKDIR /src
COPY . .
RUN bash scripts/install-deps.sh \
 && bash scripts/build.sh \
 && if [ "${RUN_TESTS}" = 1 ]; then cd build && ctest --output-on-failure; fi

# cpu: runtime base. Debian's runtime packages only (no -dev): libtorch1.13 pulls in OpenBLAS
# through libblas3/liblapack3 alternatives (libopenblas0-pthread provides both).
FROM ${DEBIAN_RUNTIME_IMAGE} AS cpu-runtime
ENV DEBIAN_FRONTEND=noninteractive
RUN apt-get update \
 && apt-get install -y --no-install-recommends \
      libgrpc++1.51 libprotobuf32 libabsl20220623 libtorch1.13 libopenblas0-pthread \
      libprometheus-cpp-core1.0 \
      python3 python3-grpcio python3-protobuf python3-numpy \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --system --uid 10001 --user-group --home-dir /var/lib/tscale --shell /usr/sbin/nologin tscale \
 && mkdir -p /var/lib/tscale/checkpoints && chown -R 10001:10001 /var/lib/tscale
COPY --from=cpu-build /src/build/bin/tscale-server /src/build/bin/tscale /usr/local/bin/
COPY --from=cpu-build /src/build/python /opt/tscale/python
COPY --from=cpu-build /src/client/python/examples /opt/tscale/examples
ENV PYTHONPATH=/opt/tscale/python
USER 10001:10001
WORKDIR /var/lib/tscale
EXPOSE 50051 9090
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 \
  CMD ["tscale", "--server", "127.0.0.1:50051", "--timeout", "3", "--retry-seconds", "0", "health"]
ENTRYPOINT ["tscale-server"]
CMD ["--listen", "0.0.0.0:50051", "--metrics-listen", "0.0.0.0:9090", "--checkpoint-dir", "/var/lib/tscale/checkpoints"]

# demo: the cpu image plus what client/python/examples/train_digits.py needs (deploy/compose.yaml).
FROM cpu-runtime AS demo
USER root
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3-sklearn python3-matplotlib \
 && rm -rf /var/lib/apt/lists/*
USER 10001:10001

# cpu: the default target (last stage).
FROM cpu-runtime AS cpu
