#!/usr/bin/env bash
# `make container-test`: build the CPU image (containers/Dockerfile.cpu) and run the smoke tests
# (containers/smoke-tests.txt: one per tool, and the reduced demo) inside it with --network none, as the
# non-root user. Says which engine, base image and torch source were used, the build time and the image size.
# Optional environment:
#   CONTAINER_ENGINE  docker or podman (default: docker if a Docker engine answers, else podman)
#   BASE_IMAGE        the FROM image (default: the Dockerfile's own if present or pullable, else a Debian bookworm
#                     + Python 3.11 base made here with mmdebstrap and imported, reused on later runs)
#   TORCH_INDEX_URL   where torch/torchvision come from (default: the Dockerfile's CPU index if reachable, else PyPI)
#   CA_BUNDLE         the host's CA bundle, passed as a build secret (default /etc/ssl/certs/ca-certificates.crt)
#   IMAGE             the tag to build (default localhost/neva-recipes:cpu-test)
set -euo pipefail
cd "$(dirname "$0")/.."
root="$(pwd)"
dockerfile=containers/Dockerfile.cpu
image="${IMAGE:-localhost/neva-recipes:cpu-test}"
local_base=localhost/neva-base:bookworm-python3.11

say() { printf 'container-test: %s\n' "$*"; }
die() { printf 'container-test: error: %s\n' "$*" >&2; exit 1; }
arg_default() { sed -n "s/^ARG $1=//p" "$dockerfile" | head -n 1; }

# The engine: a running Docker engine, else podman with the settings measured on this kind of machine.
engine="${CONTAINER_ENGINE:-}"
if [[ -z "$engine" ]]; then
  if command -v docker >/dev/null && docker info >/dev/null 2>&1; then engine=docker
  elif command -v podman >/dev/null; then engine=podman
  else die "no Docker engine answers and podman is missing; install it: apt-get install -y podman runc mmdebstrap"
  fi
fi
if [[ "$engine" == podman ]]; then
  if [[ "$(id -u)" == 0 ]]; then
    export CONTAINERS_CONF="${CONTAINERS_CONF:-$root/containers/podman/containers.conf}"
  fi
  format='{{.Host.OCIRuntime.Name}}, {{.Host.CgroupManager}}, {{.Host.EventLogger}} events, {{.Store.GraphDriverName}}'
  say "engine: $(podman --version) ($(podman info --format "$format") storage${CONTAINERS_CONF:+; $CONTAINERS_CONF})"
else
  export DOCKER_BUILDKIT=1
  say "engine: $(docker --version)"
fi
image_exists() { "$engine" image inspect "$1" >/dev/null 2>&1; }

# The base image: given, the Dockerfile's default if it can be had, else made locally (no registry reachable).
default_base="$(arg_default BASE_IMAGE)"
if [[ -n "${BASE_IMAGE:-}" ]]; then
  base="$BASE_IMAGE"; base_note="given by BASE_IMAGE"
elif image_exists "$default_base" || timeout 120 "$engine" pull -q "$default_base" >/dev/null 2>&1; then
  base="$default_base"; base_note="the Dockerfile's default, from its registry"
else
  base="$local_base"
  base_note="made here: mmdebstrap --variant=minbase bookworm + python3 python3-venv, imported with $engine import, "
  base_note+="because $default_base could not be pulled (no registry reachable)"
  if image_exists "$local_base"; then
    base_note+="; reused from an earlier run"
  else
    command -v mmdebstrap >/dev/null || die "mmdebstrap is missing (apt-get install -y mmdebstrap); it makes the base"
    tmp="$(mktemp -d)"
    trap 'rm -rf "$tmp"' EXIT
    start=$SECONDS
    mmdebstrap --quiet --variant=minbase --include=python3,python3-venv bookworm "$tmp/base.tar"
    quiet=(); [[ "$engine" == podman ]] && quiet=(--quiet)
    "$engine" import "${quiet[@]}" --change 'CMD ["/bin/bash"]' \
      --change 'LABEL org.opencontainers.image.description="Debian bookworm minbase, python3, python3-venv"' \
      "$tmp/base.tar" "$local_base" >/dev/null
    base_note+="; made in $((SECONDS - start)) s"
  fi
fi
say "base image: $base ($base_note)"

# torch/torchvision at the lock's versions: the CPU index by default; PyPI's build of the same version otherwise.
cpu_index="$(arg_default TORCH_INDEX_URL)"
if [[ -n "${TORCH_INDEX_URL:-}" ]]; then
  torch_index="$TORCH_INDEX_URL"; torch_note="given by TORCH_INDEX_URL"
elif curl -sSf --max-time 20 -o /dev/null "$cpu_index/torch/" 2>/dev/null; then
  torch_index="$cpu_index"; torch_note="the CPU builds"
else
  torch_index=https://pypi.org/simple
  torch_note="$cpu_index is unreachable here, so PyPI's build of the same versions (a CUDA build; it runs on CPU, "
  torch_note+="but makes the image several GB larger)"
fi
say "torch from: $torch_index ($torch_note)"

ca="${CA_BUNDLE:-/etc/ssl/certs/ca-certificates.crt}"
secret=()
if [[ -s "$ca" ]]; then
  secret=(--secret "id=ca_bundle,src=$ca"); say "CA bundle for the build: $ca (build secret, not stored in the image)"
fi

old_id="$("$engine" image inspect --format '{{.Id}}' "$image" 2>/dev/null || true)"
start=$SECONDS
"$engine" build -f "$dockerfile" "${secret[@]}" \
  --build-arg "BASE_IMAGE=$base" --build-arg "TORCH_INDEX_URL=$torch_index" -t "$image" .
build_seconds=$((SECONDS - start))
new_id="$("$engine" image inspect --format '{{.Id}}' "$image")"
if [[ -n "$old_id" && "$old_id" != "$new_id" ]]; then "$engine" rmi "$old_id" >/dev/null 2>&1 || true; fi
size_bytes="$("$engine" image inspect --format '{{.Size}}' "$image")"
size="$(awk -v b="$size_bytes" 'BEGIN { printf "%.2f GB", b / 1e9 }')"

run=("$engine" run --rm --network none --user neva --shm-size=1g -e NEVA_NO_PROGRESS=1 -w /opt/neva "$image")
probe='import sys, torch, torchvision, megatron.core as m, neva_tools as n
print(f"python {sys.version.split()[0]}, torch {torch.__version__}, torchvision {torchvision.__version__}, "
      f"megatron-core {m.__version__}, neva {n.__version__}")'
versions="$("${run[@]}" python -W ignore -c "$probe")"
if ((${#secret[@]})); then
  # The CA bundle was a build secret: no file of the image may be a copy of it.
  ca_sum="$(sha256sum < "$ca" | cut -d ' ' -f 1)"
  if "$engine" run --rm --network none "$image" sh -c \
      "find / -xdev -type f -size $(stat -c %s "$ca")c -exec sha256sum {} + 2>/dev/null | grep -q $ca_sum"; then
    die "a copy of the build's CA bundle $ca is stored in the image; it must only be a build secret"
  fi
fi
say "built $image in $build_seconds s, $size: $versions${secret:+; the CA bundle is in no layer}"

mapfile -t smoke < <(sed -e 's/#.*//' -e 's/[[:space:]]*$//' -e '/^$/d' containers/smoke-tests.txt)
say "running ${#smoke[@]} smoke entries (containers/smoke-tests.txt) in the image: --network none, user neva"
start=$SECONDS
"${run[@]}" python -m pytest -q -p no:cacheprovider --durations=5 "${smoke[@]}"
say "passed in the image in $((SECONDS - start)) s (base $base; torch from $torch_index; build $build_seconds s, $size)"
