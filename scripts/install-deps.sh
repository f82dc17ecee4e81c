#!/usr/bin/env bash
# Installs the Debian packages that tscale's build, tests and demo need; skips what is there.
# Idempotent: a second run installs nothing. Needs root (or sudo) only when something is missing.
#   --build-only  only what building the server, the CLI and the Python client needs (the image's
#                 build stage: TARGETS="tscale-server tscale tscale_python" scripts/build.sh
#                 -DTSCALE_BUILD_TESTS=OFF)
#   --images      also what scripts/test.sh --images needs: buildah, podman, runc, debootstrap
set -euo pipefail

# What building the server, the CLI and the Python client needs (find_package in CMakeLists.txt).
build_packages=(
  g++ make cmake pkg-config
  libtorch-dev libopenblas0-pthread
  libgloo-dev  # the headers of LibTorch's ProcessGroupGloo (replica groups, server/group)
  libabsl-dev
  libprotobuf-dev protobuf-compiler
  libgrpc++-dev protobuf-compiler-grpc
  prometheus-cpp-dev
  nlohmann-json3-dev
  libssl-dev
)
image_packages=(
  buildah podman runc debootstrap
  containernetworking-plugins iptables  # podman's bridge network (ports published to the host)
  uidmap  # podman's user namespaces
  catatonit  # the init of a pod's infra container (compose as a pod)
  docker-compose  # validates deploy/compose*.yaml (Debian's 1.29)
)

mode=all
images=0
for arg in "$@"; do
  case "$arg" in
    --build-only) mode=build ;;
    --images) images=1 ;;
    *) echo "install-deps: unknown option $arg (expected --build-only or --images)" >&2; exit 2 ;;
  esac
done

# Everything else: the tests, the benchmarks, the demo.
packages=(
  "${build_packages[@]}"
  git
  # fuzzing (scripts/test.sh --fuzz): clang and its libFuzzer and sanitizer runtimes
  clang libclang-rt-14-dev
  libblas3  # the reference BLAS, on which the golden vectors are bit-equal
  libgtest-dev libgmock-dev
  # Python clients, interop tests with the reference, the demo
  python3 python3-numpy python3-grpcio python3-protobuf python3-torch
  python3-sklearn python3-matplotlib
  # deploy tests: promtool checks the Prometheus config and rules; prometheus scrapes the server
  prometheus
  python3-yaml  # tests/deploy/deploy_files_test.py parses the deployment files
  openssl       # TLS tests make their certificates at run time
)

if [ "$mode" = build ]; then packages=("${build_packages[@]}"); fi
if [ "$images" = 1 ]; then packages+=("${image_packages[@]}"); fi

missing=()
for p in "${packages[@]}"; do
  if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q '^install ok installed$'; then
    missing+=("$p")
  fi
done

if [ ${#missing[@]} -eq 0 ]; then
  echo "install-deps: all ${#packages[@]} packages present"
  exit 0
fi

echo "install-deps: installing ${missing[*]}"
sudo=""
if [ "$(id -u)" -ne 0 ]; then sudo="sudo"; fi
export DEBIAN_FRONTEND=noninteractive
$sudo apt-get update -qq
# --no-install-recommends: libtorch-dev otherwise pulls in desktop toolkits.
$sudo apt-get install -y -qq --no-install-recommends "${missing[@]}"
