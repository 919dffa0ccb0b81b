#!/usr/bin/env bash
# Builds the Damselfly container image (deploy/Containerfile) with buildah from the release
# binaries, then checks it: every binary in the image's root filesystem runs `--version`
# (chrooted into the mounted image, so only the image's own libraries are used) and the
# image carries the OCI labels and the non-root user.
#
#   scripts/build-images.sh [--tag IMAGE] [--no-check]
#
# BIN_DIR=dir takes the binaries from there instead of ${CARGO_TARGET_DIR:-target}/release
# (built with `cargo build --release` when missing). SOURCE=url sets the source label
# (default: the git remote `origin`). Storage: buildah's vfs driver (works without overlay
# or fuse); BUILDAH_STORAGE_DRIVER overrides. Installs buildah with apt-get when missing.
set -euo pipefail
cd "$(dirname "$0")/.."
fail() { echo "build-images: FAIL: $*" >&2; exit 1; }

version=$(sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -1)
[ -n "$version" ] || fail "no version in Cargo.toml"
tag=localhost/damselfly:$version
check=1
while [ $# -gt 0 ]; do
    case $1 in
        --tag) tag=$2; shift 2 ;;
        --no-check) check=0; shift ;;
        *) fail "unknown argument $1" ;;
    esac
done
revision=$(git rev-parse HEAD 2>/dev/null || echo unknown)
source_url=${SOURCE:-$(git config --get remote.origin.url 2>/dev/null || echo unknown)}
created=$(date -u +%Y-%m-%dT%H:%M:%SZ)
driver=${BUILDAH_STORAGE_DRIVER:-vfs}
bins=(dfdaemon dfget dfcache dfinit scheduler manager)

if ! command -v buildah >/dev/null 2>&1; then
    [ "$(id -u)" = 0 ] || fail "buildah missing (apt-get install buildah)"
    echo "build-images: installing buildah ..."
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq buildah >/dev/null
fi

bin_dir=${BIN_DIR:-${CARGO_TARGET_DIR:-target}/release}
missing=()
for b in "${bins[@]}"; do [ -x "$bin_dir/$b" ] || missing+=("$b"); done
if [ ${#missing[@]} -gt 0 ]; then
    [ -z "${BIN_DIR:-}" ] || fail "BIN_DIR=$BIN_DIR lacks ${missing[*]}"
    echo "build-images: building release binaries (${missing[*]} missing) ..."
    . scripts/setup.sh
    cargo build --release -p damselfly-cli -p damselfly-scheduler -p damselfly-manager --bins
fi

ctx=$(mktemp -d)
ctr=
cleanup() {
    if [ -n "$ctr" ]; then buildah --storage-driver "$driver" rm "$ctr" >/dev/null 2>&1 || true; fi
    rm -rf "$ctx"
}
trap cleanup EXIT
root=$ctx/rootfs
mkdir -p "$root/usr/local/bin" "$root/etc/ssl/certs" "$root/var/lib/damselfly" "$root/run/damselfly" "$root/tmp"
for b in "${bins[@]}"; do
    strip --strip-debug -o "$root/usr/local/bin/$b" "$bin_dir/$b"
done
# The shared libraries the binaries link (glibc, libgcc_s), at the paths the loader expects.
for lib in $(for b in "${bins[@]}"; do ldd "$bin_dir/$b"; done | grep -oE '/[^ ]+\.so[^ ]*' | sort -u); do
    mkdir -p "$root$(dirname "$lib")"
    cp -L "$lib" "$root$lib"
done
[ -f /etc/ssl/certs/ca-certificates.crt ] && cp /etc/ssl/certs/ca-certificates.crt "$root/etc/ssl/certs/"
printf 'root:x:0:0:root:/root:/sbin/nologin\ndamselfly:x:65532:65532:damselfly:/var/lib/damselfly:/sbin/nologin\n' > "$root/etc/passwd"
printf 'root:x:0:\ndamselfly:x:65532:\n' > "$root/etc/group"
chown 65532:65532 "$root/var/lib/damselfly" "$root/run/damselfly"
ln -s ../run "$root/var/run"
chmod 1777 "$root/tmp"

echo "build-images: building $tag (revision $revision)"
old=$(buildah --storage-driver "$driver" images -q --no-trunc "$tag" 2>/dev/null | head -1 || true)
buildah --storage-driver "$driver" bud --quiet -f deploy/Containerfile \
    --build-arg VERSION="$version" --build-arg REVISION="$revision" \
    --build-arg SOURCE="$source_url" --build-arg CREATED="$created" \
    --annotation org.opencontainers.image.version="$version" \
    --annotation org.opencontainers.image.revision="$revision" \
    --annotation org.opencontainers.image.source="$source_url" \
    -t "$tag" "$ctx" >/dev/null
# The previous build of this tag, now untagged: remove it (vfs keeps full copies).
if [ -n "$old" ] && [ "$old" != "$(buildah --storage-driver "$driver" images -q --no-trunc "$tag" | head -1)" ]; then
    buildah --storage-driver "$driver" rmi "$old" >/dev/null 2>&1 || true
fi
size=$(buildah --storage-driver "$driver" images --format '{{.Size}}' "$tag" | head -1)
echo "build-images: built $tag ($size)"
[ "$check" = 1 ] || exit 0

# Check: run each binary from the image's own root filesystem.
ctr=$(buildah --storage-driver "$driver" from --quiet "$tag")
mnt=$(buildah --storage-driver "$driver" mount "$ctr")
for b in "${bins[@]}"; do
    out=$(chroot --userspec=65532:65532 "$mnt" "/usr/local/bin/$b" --version 2>&1) \
        || fail "$b --version in the image: $out"
    case $out in *"$version"*) ;; *) fail "$b --version in the image printed '$out', not version $version" ;; esac
    echo "build-images: image runs: $out"
    case $out in *"(rev ${revision:0:12})"*) ;; *) echo "build-images: note: $b was not built from HEAD ${revision:0:12}" >&2 ;; esac
done
buildah --storage-driver "$driver" umount "$ctr" >/dev/null
config=$(buildah --storage-driver "$driver" inspect --type image "$tag")
for want in '"User": "65532:65532"' "\"org.opencontainers.image.revision\": \"$revision\"" \
        "\"org.opencontainers.image.version\": \"$version\"" '"org.opencontainers.image.source"'; do
    grep -qF "$want" <<<"$config" || fail "image config lacks $want"
done
echo "build-images: OK $tag (user 65532, OCI labels and annotations: version $version, revision $revision)"
