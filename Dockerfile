# tscale's CPU images, Debian 12 with Debian's LibTorch 1.13. Targets (see README.md, "Deploy"):
#   docker build -t tscale:cpu .                    cpu, the default (the last stage)
#   docker build --target demo -t tscale:demo .     cpu + scikit-learn and matplotlib for the example
#   buildah bud --format docker --target cpu -t tscale:cpu .   (docker format: keeps HEALTHCHECK)
# The CUDA image has its own file, Dockerfile.cuda, so that nothing here needs NVIDIA's images.
#
# The build stage runs the README's scripts: scripts/install-deps.sh --build-only, then
# scripts/build.sh for the targets the images ship (the server, the CLI, the Python client).
# --build-arg RUN_TESTS=1 installs everything the tests need, builds everything and runs ctest.
# The runtime stages hold only the two binaries, the Python client and the shared libraries they
# need, and run as the non-root user tscale (uid and gid 10001).
# The classic Docker builder (DOCKER_BUILDKIT=0) also builds demo when asked for cpu: it walks every
# stage before the target. BuildKit and buildah build only the stages the target needs.
# scripts/test.sh --images builds both targets with buildah and runs them (README.md, "Deploy").

ARG DEBIAN_IMAGE=debian:bookworm
ARG DEBIAN_RUNTIME_IMAGE=debian:bookworm-slim

# ----------------------------------------------------------------------------------------------
# cpu: build stage, the README's and CI's scripts.
FROM ${DEBIAN_IMAGE} AS cpu-build
ARG RUN_TESTS=0
WORKDIR /src
COPY . .
RUN if [ "${RUN_TESTS}" = 1 ]; then \
      bash scripts/install-deps.sh && bash scripts/build.sh && (cd build && ctest --output-on-failure); \
    else \
      bash scripts/install-deps.sh --build-only \
      && TARGETS="tscale-server tscale tscale_python" bash scripts/build.sh -DTSCALE_BUILD_TESTS=OFF; \
    fi

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
 && groupadd --system --gid 10001 tscale \
 && useradd --system --uid 10001 --gid 10001 --home-dir /var/lib/tscale --shell /usr/sbin/nologin tscale \
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
