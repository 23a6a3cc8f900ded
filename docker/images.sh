#!/usr/bin/env bash
# Build the toolplane images with podman, with no base image pulled from a registry.
#
#   docker/images.sh              engine set up, base made (or taken from the cache), both images built
#   docker/images.sh engine       only install and configure podman (idempotent)
#   docker/images.sh base         only the base image
#   docker/images.sh standins     stand-ins for the Redis and PostgreSQL images (tests only)
#
# 1. engine: podman, runc and debootstrap from apt (only if missing), and
#    /etc/containers/containers.conf with runc, cgroupfs and the ulimits this kind of VM
#    allows (crun refuses a hybrid cgroup layout; RLIMIT_NOFILE cannot go above 20000
#    nor RLIMIT_NPROC above 32768 here).
# 2. base: the image the Dockerfiles' FROM line names (python:3.11.11-slim-bookworm), made
#    locally: Debian bookworm (debootstrap, minbase, with the C libraries Python's
#    extension modules link against) plus a CPython >= 3.11.3 copied from this machine
#    ($TOOLPLANE_BASE_PYTHON: its prefix; default that of `python3` on PATH, here pyenv's
#    3.11.7; Debian's own 3.11.2 is older than redis-py allows). Its root file system is cached as a tar under
#    $TOOLPLANE_IMAGE_CACHE (default /var/cache/toolplane-images), keyed by a hash of this
#    script and of the Python's version, so the ~3 minutes of debootstrap happen once.
# 3. images: `podman build --pull=never` of docker/Dockerfile.control and
#    docker/Dockerfile.worker, unmodified, tagged toolplane-control:TAG and
#    toolplane-worker:TAG (TAG: $TOOLPLANE_IMAGE_TAG, default 0.1.0, as compose.yaml).
#    The builds run with --network=none: pip inside them installs from a wheelhouse
#    downloaded beforehand on this host (its pip, its index and certificates), exactly
#    the pinned wheels of docker/requirements/*.txt and setuptools, cached under
#    $TOOLPLANE_IMAGE_CACHE/wheels-<hash of the lists>, and mounted into the build with
#    a pip.conf that allows nothing else (no index).
set -euo pipefail
cd "$(dirname "$0")/.."

TAG=${TOOLPLANE_IMAGE_TAG:-0.1.0}
CACHE=${TOOLPLANE_IMAGE_CACHE:-/var/cache/toolplane-images}
# The CPython installation to copy: its prefix (bin/python3.11, lib/python3.11/). By
# default the one `python3` on PATH belongs to (its sys.base_prefix, not a venv's).
PY_SRC=${TOOLPLANE_BASE_PYTHON:-$(python3 -c 'import sys; print(sys.base_prefix)' 2> /dev/null || echo /root/.pyenv/versions/3.11.7)}
MIRROR=${TOOLPLANE_DEBIAN_MIRROR:-http://deb.debian.org/debian}
BASE=$(awk '/^FROM /{print $2; exit}' docker/Dockerfile.worker)
# Shared libraries of CPython's extension modules (ssl, ctypes, sqlite3, bz2, lzma,
# readline, curses, dbm, uuid, nis) and what pip needs to verify TLS.
BASE_PACKAGES=ca-certificates,libssl3,libffi8,libsqlite3-0,libbz2-1.0,liblzma5,zlib1g,libncursesw6,libreadline8,libuuid1,libgdbm6,libgdbm-compat4,libexpat1,libtirpc3,libnsl2,tzdata,netbase

log() { printf 'images: %s\n' "$*" >&2; }

engine() {
    local missing=()
    for prog in podman runc debootstrap; do
        command -v "$prog" > /dev/null || PATH=$PATH:/usr/sbin:/sbin command -v "$prog" > /dev/null || missing+=("$prog")
    done
    if ((${#missing[@]})); then
        log "installing ${missing[*]} (apt-get)"
        export DEBIAN_FRONTEND=noninteractive
        apt-get install -y -q podman runc debootstrap > /dev/null \
            || { apt-get update -q > /dev/null && apt-get install -y -q podman runc debootstrap > /dev/null; }
    fi
    local conf=/etc/containers/containers.conf
    local want
    want=$(printf '%s\n' \
        '# Written by toolplane docker/images.sh: runc (crun refuses a hybrid cgroup layout),' \
        '# cgroupfs (no systemd), and ulimits this kind of VM can grant.' \
        '[containers]' \
        'default_ulimits = ["nofile=20000:20000", "nproc=32768:32768"]' \
        '[engine]' \
        'runtime = "runc"' \
        'cgroup_manager = "cgroupfs"' \
        'events_logger = "file"')
    if [[ ! -f $conf ]] || [[ "$(cat "$conf")" != "$want" ]]; then
        mkdir -p /etc/containers
        [[ -f $conf && ! -f $conf.before-toolplane ]] && cp "$conf" "$conf.before-toolplane"
        printf '%s\n' "$want" > "$conf"
        log "wrote $conf"
    fi
}

python_version() { "$PY_SRC/bin/python3" -c 'import sys; print("%d.%d.%d" % sys.version_info[:3])'; }

base() {
    local version key tarball
    version=$(python_version)
    "$PY_SRC/bin/python3" -c 'import sys; sys.exit(sys.version_info < (3, 11, 3) or sys.version_info[:2] != (3, 11))' \
        || { log "$PY_SRC is Python $version: need 3.11.x >= 3.11.3 (TOOLPLANE_BASE_PYTHON)"; exit 1; }
    key=$( (declare -f base; echo "$BASE_PACKAGES $version $BASE") | sha256sum | cut -c1-16)
    if [[ "$(podman image inspect --format '{{index .Labels "toolplane.base"}}' "$BASE" 2> /dev/null || true)" == "$key" ]]; then
        log "base $BASE is current ($key)"
        return
    fi
    tarball=$CACHE/base-$key.tar
    if [[ ! -f $tarball ]]; then
        local root
        mkdir -p "$CACHE"
        root=$(mktemp -d "$CACHE/rootfs.XXXXXX")
        trap 'rm -rf "$root"' RETURN
        log "debootstrap bookworm minbase into $root (a few minutes, once)"
        local t0=$SECONDS
        debootstrap --variant=minbase --include="$BASE_PACKAGES" bookworm "$root" "$MIRROR" > "$root.log" 2>&1 \
            || { tail -20 "$root.log" >&2; exit 1; }
        rm -f "$root.log"
        log "copying Python $version from $PY_SRC"
        local lib=$PY_SRC/lib/python3.11
        mkdir -p "$root/usr/local/bin" "$root/usr/local/lib/python3.11/site-packages"
        cp -a "$PY_SRC/bin/python3.11" "$root/usr/local/bin/"
        # A shared build's library (a static build has none); its RPATH names $PY_SRC,
        # absent in the image, so the loader finds it in /usr/local/lib (ldconfig below).
        if compgen -G "$PY_SRC/lib/libpython3.11.so*" > /dev/null; then
            cp -a "$PY_SRC"/lib/libpython3.11.so* "$root/usr/local/lib/"
        fi
        tar -C "$lib" -cf - --exclude=./site-packages --exclude=./test --exclude=./idlelib \
            --exclude=./tkinter --exclude=./turtledemo --exclude='./config-3.11-*' \
            --exclude='__pycache__' . | tar -C "$root/usr/local/lib/python3.11" -xf -
        ln -s python3.11 "$root/usr/local/bin/python3"
        ln -s python3.11 "$root/usr/local/bin/python"
        chroot "$root" /sbin/ldconfig
        # pip and setuptools from the wheels bundled with CPython: nothing fetched.
        PIP_ROOT_USER_ACTION=ignore chroot "$root" /usr/local/bin/python3 -m ensurepip --default-pip > /dev/null
        chroot "$root" /usr/local/bin/python3 -c 'import ssl, ctypes, sqlite3, bz2, lzma, zlib, uuid, readline, json, venv'
        rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/* "$root"/usr/share/doc/* \
            "$root"/usr/share/man/* "$root"/usr/share/locale/*
        tar -C "$root" --numeric-owner -cf "$tarball.part" .
        mv "$tarball.part" "$tarball"
        log "base root file system: $tarball ($((SECONDS - t0)) s)"
    fi
    podman import --quiet \
        --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
        --change 'ENV LANG=C.UTF-8' \
        --change 'ENV PYTHON_VERSION='"$version" \
        --change 'LABEL toolplane.base='"$key" \
        --change 'CMD ["python3"]' \
        "$tarball" "$BASE" > /dev/null
    log "base $BASE imported ($key, Python $version)"
}

wheelhouse() {
    local key
    key=$(cat docker/requirements/*.txt docker/Dockerfile.* | sha256sum | cut -c1-16)
    WHEELS=$CACHE/wheels-$key
    if [[ ! -f $WHEELS/pip.conf ]]; then
        local setuptools py
        setuptools=$(grep -ho 'setuptools==[0-9.]*' docker/Dockerfile.* | sort -u)
        py=${PYTHON:-python3}
        rm -rf "$WHEELS.part" && mkdir -p "$WHEELS.part"
        log "downloading the pinned wheels into $WHEELS (once)"
        # This host's pip picks wheels for this host: CPython 3.11 on glibc, as the base.
        "$py" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))' \
            || { log "$py is not Python 3.11 (set PYTHON)"; exit 1; }
        "$py" -m pip download --quiet --disable-pip-version-check --no-deps --only-binary=:all: \
            --dest "$WHEELS.part" $setuptools \
            -r docker/requirements/control.txt -r docker/requirements/worker.txt \
            > "$WHEELS.log" 2>&1 || { grep -v '^WARNING: Location' "$WHEELS.log" | tail -20 >&2; exit 1; }
        rm -f "$WHEELS.log"
        printf '[global]\nno-index = true\nfind-links = /wheelhouse\n' > "$WHEELS.part/pip.conf"
        mv "$WHEELS.part" "$WHEELS"
    fi
}

images() {
    local t0 image
    wheelhouse
    for image in worker control; do
        t0=$SECONDS
        # --format docker keeps the images' HEALTHCHECK (OCI images have none).
        podman build --pull=never --network=none --format docker --quiet --layers \
            --volume "$WHEELS:/wheelhouse:ro" --volume "$WHEELS/pip.conf:/etc/pip.conf:ro" \
            -f "docker/Dockerfile.$image" -t "toolplane-$image:$TAG" . > /dev/null
        log "toolplane-$image:$TAG built in $((SECONDS - t0)) s ($(podman image inspect --format '{{.Size}}' "toolplane-$image:$TAG") bytes)"
    done
}

# Stand-ins for the Redis and PostgreSQL images compose.yaml names, which cannot be
# pulled here (docker/standins/Containerfile): for `make containers` only. Their build
# installs Debian's packages, so it needs the Debian mirror (not the index).
standins() {
    local t0 target
    for target in redis postgres; do
        if podman image exists "toolplane-standin-$target:latest" \
            && [[ "$(podman image inspect --format '{{index .Labels "toolplane.standin"}}' "toolplane-standin-$target")" == "$(standin_key)" ]]; then
            continue
        fi
        t0=$SECONDS
        podman build --pull=never --format docker --quiet --layers --target "$target" \
            --label "toolplane.standin=$(standin_key)" -t "toolplane-standin-$target:latest" docker/standins > /dev/null
        log "toolplane-standin-$target built in $((SECONDS - t0)) s"
    done
}

standin_key() { cat docker/standins/* | sha256sum | cut -c1-16; }

case ${1:-all} in
    engine) engine ;;
    base) engine && base ;;
    all) engine && base && images ;;
    standins) engine && base && standins ;;
    *) echo "usage: $0 [engine|base|all|standins]" >&2; exit 2 ;;
esac
