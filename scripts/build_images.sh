#!/usr/bin/env bash
# Proves the two Dockerfiles for real, without a Docker engine: builds each image with buildah
# (chroot isolation, an image store of its own) from a clean copy of this checkout, on a local
# Debian base made with debootstrap (passed as BASE_IMAGE), with the PyTorch build that pip
# installs on this machine; then runs each handler inside its image on its test input and
# checks the result. Prints JSON lines: build times, image sizes, time to ready, checks.
#
#   sudo scripts/build_images.sh                  # both images (about 20 min on 2 cores)
#   scripts/build_images.sh --only infer          # or splat
#   scripts/build_images.sh --touch-rebuild       # then rebuild after a code-only change
#   scripts/build_images.sh --fresh               # empty the image store first (no cached layers)
#   scripts/build_images.sh --clean               # remove the image store at the end
#
# Environment: WORK (default /var/tmp/vision-workers-build: the image store, the base, logs),
# STORAGE_DRIVER (overlay or vfs; default overlay where the kernel has it: vfs keeps a full copy
# of the file system per layer, ~6.5 GB each here), TORCH_INDEX_URL (default PyPI's index),
# PYTHON (a Python with the project's requirements, for the test checkpoints; default .venv),
# SUITE and DEBIAN_MIRROR (the base: bookworm, whose Python 3.11 is the project's), REF (build a
# commit, e.g. HEAD, instead of the working tree's tracked and unignored files).
set -euo pipefail

REPO=$(cd "$(dirname "$0")/.." && pwd)
WORK=${WORK:-/var/tmp/vision-workers-build}
SUITE=${SUITE:-bookworm}
DEBIAN_MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
TORCH_INDEX_URL=${TORCH_INDEX_URL:-https://pypi.org/simple}
PYTHON=${PYTHON:-$REPO/.venv/bin/python}
REF=${REF:-}
ONLY=""
TOUCH_REBUILD=0
CLEAN=0
FRESH=0

usage() { sed -n '2,/^set /{/^#/p}' "$0" | sed 's/^# \{0,1\}//'; }
while [ $# -gt 0 ]; do
  case "$1" in
    --only) ONLY=$2; shift 2 ;;
    --touch-rebuild) TOUCH_REBUILD=1; shift ;;
    --clean) CLEAN=1; shift ;;
    --fresh) FRESH=1; shift ;;
    -h|--help) usage; exit 0 ;;
    *) echo "unknown argument: $1" >&2; usage >&2; exit 2 ;;
  esac
done
case "$ONLY" in ""|infer|splat) ;; *) echo "--only takes infer or splat" >&2; exit 2 ;; esac

say() { printf '== %s\n' "$*" >&2; }
die() { printf 'build_images: %s\n' "$*" >&2; exit 1; }
json() { printf '%s\n' "$1" | tee -a "$WORK/results.jsonl"; }

retry() {  # retry CMD...: three tries, 20 s apart (mirrors and indexes have bad minutes)
  local try
  for try in 1 2 3; do
    "$@" && return 0
    [ "$try" = 3 ] || { say "failed (try $try of 3): $*; again in 20 s"; sleep 20; }
  done
  return 1
}

[ "$(id -u)" = 0 ] || die "run as root (buildah's chroot isolation and debootstrap need it)"
[ -x "$PYTHON" ] || die "PYTHON=$PYTHON is not executable: run 'make setup' first, or set PYTHON"
if ! command -v buildah >/dev/null || ! command -v debootstrap >/dev/null; then
  say "installing buildah and debootstrap (Debian packages)"
  retry timeout 900 apt-get update -qq || die "apt-get update failed"
  DEBIAN_FRONTEND=noninteractive retry timeout 900 apt-get install -y -qq buildah debootstrap \
    >/dev/null || die "installing buildah and debootstrap failed"
fi

if [ -z "${STORAGE_DRIVER:-}" ]; then
  if grep -qw overlay /proc/filesystems; then STORAGE_DRIVER=overlay; else STORAGE_DRIVER=vfs; fi
fi
need_gb=30  # measured: both images and their cache take 7 GB with overlay
[ "$STORAGE_DRIVER" = vfs ] && need_gb=90  # ~7 GB per layer after PyTorch's, ~12 such layers
mkdir -p "$WORK/logs" "$WORK/results"
if [ "$FRESH" = 1 ]; then
  say "emptying the image store ($STORAGE_DRIVER)"
  rm -rf "$WORK/storage-$STORAGE_DRIVER" "$WORK/run-$STORAGE_DRIVER"
fi
free_gb=$(df --output=avail -BG "$WORK" | tail -1 | tr -dc '0-9')
[ "$free_gb" -ge "$need_gb" ] || die "$WORK has ${free_gb} GB free; the $STORAGE_DRIVER store needs about ${need_gb} GB"
B=(buildah --root "$WORK/storage-$STORAGE_DRIVER" --runroot "$WORK/run-$STORAGE_DRIVER"
   --storage-driver "$STORAGE_DRIVER")
: > "$WORK/results.jsonl"
CONTAINERS=()
cleanup() {
  local c
  for c in "${CONTAINERS[@]}"; do "${B[@]}" rm "$c" >/dev/null 2>&1 || true; done
  if [ "$CLEAN" = 1 ]; then
    "${B[@]}" rm --all >/dev/null 2>&1 || true
    "${B[@]}" rmi --all --force >/dev/null 2>&1 || true
    rm -rf "$WORK/storage-$STORAGE_DRIVER" "$WORK/run-$STORAGE_DRIVER"
  fi
}
trap cleanup EXIT

# 1. The base: a minimal Debian made with debootstrap, imported once into the store.
BASE_IMAGE=localhost/debian-$SUITE-base:local
if ! "${B[@]}" inspect --type image "$BASE_IMAGE" >/dev/null 2>&1; then
  say "making $BASE_IMAGE with debootstrap ($SUITE, minbase)"
  rootfs="$WORK/rootfs-$SUITE"
  rm -rf "$rootfs"
  debootstrap_once() {
    rm -rf "$rootfs"
    timeout 1200 debootstrap --variant=minbase "$SUITE" "$rootfs" "$DEBIAN_MIRROR" \
      >"$WORK/logs/debootstrap.log" 2>&1
  }
  retry debootstrap_once || die "debootstrap failed: see $WORK/logs/debootstrap.log"
  rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/*
  ctr=$("${B[@]}" from scratch)
  mnt=$("${B[@]}" mount "$ctr")
  tar -C "$rootfs" -cf - . | tar -C "$mnt" -xf -
  "${B[@]}" umount "$ctr" >/dev/null
  "${B[@]}" config --cmd '["/bin/bash"]' "$ctr"
  "${B[@]}" commit --quiet "$ctr" "$BASE_IMAGE" >/dev/null
  "${B[@]}" rm "$ctr" >/dev/null
  rm -rf "$rootfs"
fi

# 2. A clean context: what a checkout holds (a commit, or the files git tracks or does not
#    ignore), never local leftovers; then the test checkpoints in its weights/ folder.
CTX="$WORK/context"
rm -rf "$CTX"
mkdir -p "$CTX"
if [ -n "$REF" ]; then
  git -C "$REPO" archive "$REF" | tar -C "$CTX" -xf -
else
  (cd "$REPO" && git ls-files -z --cached --others --exclude-standard \
    | while IFS= read -r -d '' f; do [ -e "$f" ] && printf '%s\0' "$f"; done \
    | tar --null -T - -cf -) | tar -C "$CTX" -xf -
fi
say "context: $(find "$CTX" -type f | wc -l) files from ${REF:-the working tree}"
export YOLO_CONFIG_DIR="$WORK/ultralytics-config" YOLO_OFFLINE=1
(cd "$REPO" && "$PYTHON" scripts/make_test_weights.py --all --no-sam3 "$CTX/weights" >/dev/null)

# 3. pip inside the build uses this machine's pip settings (local indexes, certificate).
mapfile -t PIP_MOUNTS < <("$PYTHON" "$REPO/scripts/docker/report.py" pip-config "$WORK/pip.conf")
VOLUMES=()
for m in "${PIP_MOUNTS[@]}"; do VOLUMES+=(-v "$m"); done

build() {  # build NAME DOCKERFILE PHASE [extra buildah args...]
  local name=$1 dockerfile=$2 phase=$3 log="$WORK/logs/build-$1-$3.log" started rc
  shift 3
  say "building $name ($phase), log: $log"
  started=$(date +%s)
  set +e
  "${B[@]}" build --isolation chroot --layers --format docker --pull=false \
    -f "$CTX/$dockerfile" -t "localhost/vision-$name:test" \
    --build-arg BASE_IMAGE="$BASE_IMAGE" --build-arg TORCH_INDEX_URL="$TORCH_INDEX_URL" \
    "${VOLUMES[@]}" "$@" "$CTX" >"$log" 2>&1
  rc=$?
  set -e
  [ "$rc" = 0 ] || { tail -30 "$log" >&2; die "building $name failed (see $log)"; }
  local size steps
  size=$("${B[@]}" images --format '{{.Size}}' "localhost/vision-$name:test")
  steps=$("$PYTHON" "$REPO/scripts/docker/report.py" steps "$log")
  json "{\"bench\": \"image_build\", \"image\": \"$name\", \"phase\": \"$phase\", \"build_s\": $(( $(date +%s) - started )), \"size\": \"$size\", \"log\": \"$log\", \"steps\": $steps}"
}

CTR=""
new_container() {  # new_container NAME: a fresh container of that image, named in $CTR
  CTR="vision-$1-test"
  "${B[@]}" rm "$CTR" >/dev/null 2>&1 || true
  "${B[@]}" from --pull=false --name "$CTR" "localhost/vision-$1:test" >/dev/null
  CONTAINERS+=("$CTR")
}

check_and_report() {  # check_and_report LOG SUBCOMMAND ARGS...: report.py's check, as a JSON line
  local log=$1 out
  shift
  out=$("$PYTHON" "$REPO/scripts/docker/report.py" "$@") || true
  json "$out"
  [[ $out == *'"ok": true'* ]] || die "$1 failed in the image (see $log)"
}

image_bytes() {  # image_bytes NAME ROOTFS: the image's files, uncompressed (the test's are tiny)
  json "{\"bench\": \"image_size\", \"image\": \"$1\", \"rootfs_bytes\": $(du -sb --exclude="$2/tmp" "$2" | cut -f1)}"
}

test_infer() {
  local ctr log="$WORK/logs/run-infer.log" mnt
  new_container infer
  ctr=$CTR
  say "infer: the image's CMD on its test_input.json (SDK local mode)"
  local cmd
  read -r -a cmd <<<"$("${B[@]}" inspect --type image --format '{{range .Docker.Config.Cmd}}{{.}} {{end}}' localhost/vision-infer:test)"
  if ! "$PYTHON" "$REPO/bench/bench_startup.py" --runs 1 --label infer-image-test_input \
      --log "$log" -- "${B[@]}" run --isolation chroot --env RESULT_PATH=/tmp/result.json "$ctr" -- \
      "${cmd[@]}" | tee -a "$WORK/results.jsonl"; then
    die "the infer worker failed in its image (see $log)"
  fi
  mnt=$("${B[@]}" mount "$ctr")
  check_and_report "$log" check-infer "$mnt/tmp/result.json" "$log"
  image_bytes infer "$mnt"
  "${B[@]}" umount "$ctr" >/dev/null

  say "infer: a preload that fails stops the worker with status 3"
  set +e
  "${B[@]}" run --isolation chroot --env PRELOAD_MODELS=object-detection=missing.pt "$ctr" -- \
    python -u handlers/infer.py >"$WORK/logs/run-infer-bad-preload.log" 2>&1
  local rc=$?
  set -e
  if [ "$rc" != 3 ] || ! grep -q "will not start" "$WORK/logs/run-infer-bad-preload.log"; then
    die "a failing preload exited $rc without the expected log line"
  fi
  json "{\"check\": \"infer_bad_preload\", \"ok\": true, \"exit_code\": $rc}"

  say "infer: time to ready, 3 fresh starts on a health job"
  if ! "$PYTHON" "$REPO/bench/bench_startup.py" --runs 3 --label infer-image -- \
      "${B[@]}" run --isolation chroot "$ctr" -- \
      python -u handlers/infer.py --test_input '{"input": {"task": "health"}}' \
      | tee -a "$WORK/results.jsonl"; then
    die "the infer worker did not start in its image"
  fi
}

test_splat() {
  local ctr log="$WORK/logs/run-splat.log" mnt
  new_container splat
  ctr=$CTR
  say "splat: examples/splat/test_input.json on the CPU (a few minutes)"
  if ! "$PYTHON" "$REPO/bench/bench_startup.py" --runs 1 --label splat-image-test_input \
      --log "$log" -- "${B[@]}" run --isolation chroot --workingdir /opt/worker/examples/splat \
      --env OUTPUT_DIR=/tmp/splat-out --env RESULT_PATH=/tmp/splat-result.json "$ctr" -- \
      python -u /opt/worker/handlers/splat.py | tee -a "$WORK/results.jsonl"; then
    die "the splat worker failed in its image (see $log)"
  fi
  mnt=$("${B[@]}" mount "$ctr")
  check_and_report "$log" check-splat "$mnt/tmp/splat-result.json" "$log" "$mnt"
  image_bytes splat "$mnt"
  "${B[@]}" umount "$ctr" >/dev/null
}

inspect_image() { "${B[@]}" inspect --type image "localhost/vision-$1:test" >"$WORK/results/$1-$2.json"; }

# The image's default weights (random-weight stand-ins made above; SAM 3 is not a default without
# a token) plus the shapes detector its test_input.json names; the image's PRELOAD_MODELS loads them.
INFER_ARGS=(--build-arg "WEIGHTS=default,shapes-yolo11.pt" --build-arg WEIGHTS_FROM_CONTEXT=1)
started_all=$(date +%s)
if [ "$ONLY" != splat ]; then
  build infer Dockerfile clean "${INFER_ARGS[@]}"
  inspect_image infer clean
  test_infer
fi
if [ "$ONLY" != infer ]; then
  build splat Dockerfile.splat clean
  inspect_image splat clean
  test_splat
fi

if [ "$TOUCH_REBUILD" = 1 ]; then
  # A code-only change: one comment line more in core/. Only the code layers may rebuild.
  printf '\n# touched by build_images.sh at %s\n' "$(date -u +%FT%TZ)" >>"$CTX/core/__init__.py"
  for name in infer splat; do
    [ -n "$ONLY" ] && [ "$ONLY" != "$name" ] && continue
    if [ "$name" = infer ]; then
      build infer Dockerfile code-touch "${INFER_ARGS[@]}"
    else
      build splat Dockerfile.splat code-touch
    fi
    inspect_image "$name" code-touch
    json "{\"bench\": \"code_touch_layers\", \"image\": \"$name\", \"result\": $("$PYTHON" "$REPO/scripts/docker/report.py" layers "$WORK/results/$name-clean.json" "$WORK/results/$name-code-touch.json")}"
  done
  for c in "${CONTAINERS[@]}"; do "${B[@]}" rm "$c" >/dev/null 2>&1 || true; done
  CONTAINERS=()
  # The images the rebuild replaced (their cached layers stay).
  "${B[@]}" images --filter dangling=true --format '{{.ID}}' | xargs -r "${B[@]}" rmi >/dev/null
fi

json "{\"bench\": \"build_images_total\", \"storage_driver\": \"$STORAGE_DRIVER\", \"total_s\": $(( $(date +%s) - started_all ))}"
say "all checks passed; results in $WORK/results.jsonl"
