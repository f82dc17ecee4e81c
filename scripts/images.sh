#!/usr/bin/env bash
# Builds the cpu and demo images (Dockerfile) with buildah and runs them with podman, daemonless
# and without an image registry: tests/images/images_test.py checks health, the HEALTHCHECK, the
# user, /metrics, training from the host's CLI and from the Python client inside the image, a
# checkpoint volume across stop/start, SIGTERM, --read-only with tokens, each Kubernetes variant's
# arguments and probes, and the compose stack as a pod. Run by `scripts/test.sh --images` (after
# the main build: the host's CLI and Python client talk to the containers); needs root.
#
# The Debian base images the Dockerfile names (debian:bookworm, debian:bookworm-slim) are made
# with `debootstrap --variant=minbase bookworm` from the Debian mirror apt already uses, with apt's
# own sources, and imported under those names. Everything lives under TSCALE_IMAGES_DIR (default
# build-images/): storage, podman's and buildah's settings (runc, cgroupfs, ulimits no higher than
# this shell's soft limits), the base root file system (kept, reused by the next run). At the end
# the containers, pods, volumes and images are removed, unless TSCALE_IMAGES_KEEP=1.
#
# The cuda image (Dockerfile.cuda) needs NVIDIA's base images from a registry: not built here.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD

if [ "$(id -u)" -ne 0 ]; then
  echo "images: needs root (podman's networks, debootstrap)" >&2
  exit 1
fi
for f in build/bin/tscale build/python/tscale/__init__.py; do
  if [ ! -e "$f" ]; then
    echo "images: $f missing: run scripts/build.sh first (the checks use the host's client)" >&2
    exit 1
  fi
done

dir=$(mkdir -p "${TSCALE_IMAGES_DIR:-build-images}" && cd "${TSCALE_IMAGES_DIR:-build-images}" \
      && pwd)
mkdir -p "$dir/conf" "$dir/storage" "$dir/run" "$dir/tmp" "$dir/cni"
export TMPDIR="$dir/tmp"

# ------------------------------------------------------------------ settings of podman and buildah
nofile=$(ulimit -Sn)
nproc=$(ulimit -Su)
[ "$nproc" = unlimited ] && nproc=1048576
driver=overlay
if ! grep -qw overlay /proc/filesystems; then driver=vfs; fi
cat > "$dir/conf/storage.conf" <<EOF
[storage]
driver = "$driver"
graphroot = "$dir/storage"
runroot = "$dir/run"
EOF
cat > "$dir/conf/containers.conf" <<EOF
[containers]
# No higher than this machine's soft limits: raising them may be refused.
default_ulimits = ["nofile=$nofile:$nofile", "nproc=$nproc:$nproc"]
log_driver = "k8s-file"

[engine]
runtime = "runc"
cgroup_manager = "cgroupfs"
events_logger = "file"
events_logfile_path = "$dir/run/events.log"
tmp_dir = "$dir/run/libpod"

[network]
network_backend = "cni"
network_config_dir = "$dir/cni"
default_subnet = "10.235.0.0/24"
EOF
cat > "$dir/conf/registries.conf" <<EOF
# No registry: every image comes from this machine's storage.
unqualified-search-registries = []
short-name-mode = "disabled"
EOF
export CONTAINERS_STORAGE_CONF="$dir/conf/storage.conf"
export CONTAINERS_CONF="$dir/conf/containers.conf"
export CONTAINERS_REGISTRIES_CONF="$dir/conf/registries.conf"
export BUILDAH_ISOLATION=chroot

elapsed() { echo "$(( SECONDS - $1 ))"; }

# ------------------------------------------------------------------ the Debian base images
# The mirror apt already uses, from its sources (deb822 or one-line format); never a fixed host.
mirror() {
  local f
  for f in /etc/apt/sources.list.d/*.sources; do
    [ -e "$f" ] || continue
    awk 'BEGIN { RS = ""; FS = "\n" }
         /(^|\n)Suites:[^\n]*bookworm( |\n|$)/ && !/Enabled: *no/ {
           for (i = 1; i <= NF; i++) if ($i ~ /^URIs:/) { split($i, u, " "); print u[2]; exit }
         }' "$f"
  done
  for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list; do
    [ -e "$f" ] || continue
    awk '$1 == "deb" { for (i = 2; i <= NF; i++) if ($i !~ /^\[/ && $i !~ /\]$/) {
           if ($(i + 1) == "bookworm") print $i; break } }' "$f"
  done
}
url=$(mirror | awk 'NR == 1')
if [ -z "$url" ]; then
  echo "images: no Debian bookworm mirror in apt's sources (/etc/apt/sources.list*)" >&2
  exit 1
fi

base="$dir/base-bookworm.tar"
if [ ! -s "$base" ]; then
  start=$SECONDS
  echo "=== images: debootstrap --variant=minbase bookworm from $url"
  rm -rf "$dir/rootfs"
  debootstrap --variant=minbase bookworm "$dir/rootfs" "$url" > "$dir/debootstrap.log" 2>&1 || {
    tail -n 20 "$dir/debootstrap.log" >&2
    exit 1
  }
  # apt's own sources (the updates and security suites too), as on this machine.
  rm -f "$dir/rootfs/etc/apt/sources.list"
  for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list /etc/apt/sources.list.d/*.sources; do
    if [ -e "$f" ]; then cp "$f" "$dir/rootfs$f"; fi
  done
  rm -rf "$dir/rootfs/var/cache/apt/archives/"*.deb "$dir/rootfs/var/lib/apt/lists/"*
  tar -C "$dir/rootfs" --numeric-owner -cf "$base.part" .
  mv "$base.part" "$base"
  rm -rf "$dir/rootfs"
  echo "=== images: base root file system in $(elapsed "$start") s"
fi

podman rm -af -t 0 > /dev/null 2>&1 || true
for name in debian:bookworm debian:bookworm-slim; do
  podman import --quiet --change 'CMD ["/bin/bash"]' "$base" "docker.io/library/$name" > /dev/null
done
# The runtime may refuse even the soft limit of processes (seen: more than 32768 refused with
# "error setting rlimit type 6"): the highest of these that a container accepts.
for n in "$nproc" 32768 16384 4096; do
  [ "$n" -le "$nproc" ] || continue
  if podman run --rm --network none --ulimit "nofile=$nofile:$nofile" --ulimit "nproc=$n:$n" \
       debian:bookworm-slim true \
       > /dev/null 2>&1; then
    sed -i "s/\"nproc=$nproc:$nproc\"/\"nproc=$n:$n\"/" "$dir/conf/containers.conf"
    break
  fi
done

bridge_before=0
if ip link show cni-podman0 > /dev/null 2>&1; then bridge_before=1; fi
cni_chains_before=$(iptables-save 2>/dev/null | grep -c '^:CNI-' || true)
remove_cni_chains() {  # the chains and jumps podman's CNI plugins add, where none were here before
  local table rule chain
  for table in nat filter; do
    iptables -t "$table" -S 2>/dev/null | grep -E '^-A [A-Z]+ .*-j CNI-' | sed 's/^-A /-D /' \
      | while read -r rule; do eval "iptables -t $table $rule" 2>/dev/null || true; done
    for chain in $(iptables -t "$table" -S 2>/dev/null | awk '$1 == "-N" && $2 ~ /^CNI-/ { print $2 }'); do
      iptables -t "$table" -F "$chain" 2>/dev/null || true
    done
    for chain in $(iptables -t "$table" -S 2>/dev/null | awk '$1 == "-N" && $2 ~ /^CNI-/ { print $2 }'); do
      iptables -t "$table" -X "$chain" 2>/dev/null || true
    done
  done
}
cleanup() {
  if [ "${TSCALE_IMAGES_KEEP:-0}" = 1 ]; then
    echo "=== images: kept (TSCALE_IMAGES_KEEP=1): storage in $dir/storage"
    return
  fi
  podman pod rm -af -t 0 > /dev/null 2>&1 || true
  podman rm -af -t 0 > /dev/null 2>&1 || true
  podman volume prune -f > /dev/null 2>&1 || true
  podman rmi -af > /dev/null 2>&1 || true
  buildah rm -a > /dev/null 2>&1 || true
  podman system reset -f > /dev/null 2>&1 || true
  rm -rf "$dir/storage" "$dir/run" "$dir/tmp" "$dir/cni"
  if [ "$bridge_before" = 0 ]; then ip link del cni-podman0 > /dev/null 2>&1 || true; fi
  if [ "$cni_chains_before" = 0 ]; then remove_cni_chains; fi
}
trap cleanup EXIT

# ------------------------------------------------------------------ the compose files
# Validated by the compose implementation Debian ships (docker-compose 1.29; no daemon needed).
for f in deploy/compose.yaml deploy/compose-group.yaml; do
  docker-compose -f "$f" config -q
  echo "=== images: $f: valid for $(docker-compose version --short)"
done

# ------------------------------------------------------------------ the images
build() {  # build TARGET
  local start=$SECONDS
  echo "=== images: buildah bud --target $1"
  buildah bud --isolation chroot --network host --pull=never --format docker --layers \
    --jobs 1 --target "$1" -t "localhost/tscale:$1" -f Dockerfile . > "$dir/build-$1.log" 2>&1 || {
    tail -n 40 "$dir/build-$1.log" >&2
    echo "=== images: building $1 FAILED (log: $dir/build-$1.log)" >&2
    return 1
  }
  echo "=== images: tscale:$1 built in $(elapsed "$start") s;" \
    "$(podman image inspect --format '{{.Size}}' "localhost/tscale:$1" \
       | awk '{ printf "%.0f MB", $1 / 1e6 }')"
}
build cpu
build demo

# ------------------------------------------------------------------ the checks
start=$SECONDS
PYTHONPATH="$root/build/python" PYTHONDONTWRITEBYTECODE=1 \
  TSCALE_CLI_BIN="$root/build/bin/tscale" TSCALE_SERVER_BIN="$root/build/bin/tscale-server" \
  TSCALE_IMAGE_CPU=localhost/tscale:cpu TSCALE_IMAGE_DEMO=localhost/tscale:demo \
  /usr/bin/python3 tests/images/images_test.py -v
echo "=== images: checks passed in $(elapsed "$start") s"
