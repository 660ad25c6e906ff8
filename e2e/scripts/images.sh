#!/usr/bin/env bash
# Builds sidecert's images with no container daemon, as OCI image archives in
# e2e/.cache/images/<name>.tar (an OCI image layout, tarred), and prints each digest.
#
#   e2e/scripts/images.sh [webhook|sidecar|app|traefik ...]     (default: all)
#
# webhook, sidecar: what webhook/Dockerfile and sidecar/Dockerfile describe: one static (musl)
#   binary, CA certificates, /etc/passwd with the nonroot user 65532, /tmp; no shell. The same
#   commit gives the same digest in any clone on the same machine: fixed file times, owners and
#   order, --remap-path-prefix for the build folders, no timestamps in the image config.
# traefik: the plane's ingress controller, never published: the binary make tools builds
#   (e2e/tools/build.sh), static, run as the nonroot user on the node's network.
# app: the local plane's test workload, never published: Debian's static busybox, serving
#   HTTP on :8080 (busybox httpd, /www; exits on SIGTERM) unless given another command.
#
# The images are assembled with crane (go-containerregistry) against its own in-memory
# registry on 127.0.0.1 (`crane registry serve`), which is stopped at the end.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/../.." && pwd)"
# shellcheck source=lib.sh
source "$here/lib.sh"

bin="$root/e2e/.cache/bin"
out="$root/e2e/.cache/images"
work="$root/e2e/.cache/image-build"
crane="$bin/crane"
[[ -x $crane ]] || die "crane is missing: run make tools"
target=x86_64-unknown-linux-musl
registry_prefix="${IMAGE_REGISTRY:-ghcr.io/sidecert}"
tag="${IMAGE_TAG:-$(sed -n 's/^appVersion: *"\{0,1\}\([^"]*\)"\{0,1\}$/\1/p' "$root/charts/sidecert/Chart.yaml")}"

names=("$@")
((${#names[@]})) || names=(webhook sidecar app traefik)

# ---- binaries --------------------------------------------------------------------------
# The musl target comes with the pinned toolchain when rustup installs it (rust-toolchain.toml
# lists it), but not when the toolchain was on the machine already: add it then (rustup
# fetches it from static.rust-lang.org, once). ring's C needs musl-gcc (Debian's musl-tools,
# installed by make tools).
if ! (cd "$root" && rustup target list --installed) | grep -qx "$target"; then
  say "adding the Rust target $target (rustup target add)"
  (cd "$root" && rustup target add "$target") || die "rustup target add $target failed"
fi
export CC_x86_64_unknown_linux_musl=musl-gcc
# Paths that differ between clones and machines never reach the binaries.
cargo_home="${CARGO_HOME:-$HOME/.cargo}"
rustflags="--remap-path-prefix=$root=/src --remap-path-prefix=$cargo_home=/cargo"
build() { # profile package binary
  say "building $3 ($1, $target)"
  (cd "$root" && RUSTFLAGS="$rustflags" cargo build --locked --profile "$1" --target "$target" -p "$2" --bin "$3")
}

# ---- one image -------------------------------------------------------------------------
# rootfs folder -> layer tar with fixed metadata -> image in the scratch registry -> config
# set -> OCI layout -> tar in $out.
serve_registry() {
  local log="$work/registry.log"
  "$crane" registry serve --address 127.0.0.1:0 >"$log" 2>&1 &
  registry_pid=$!
  trap 'kill "$registry_pid" 2>/dev/null || true; wait "$registry_pid" 2>/dev/null || true' EXIT
  for _ in $(seq 1 50); do
    addr=$(sed -n 's/.*serving on port \([0-9]*\).*/127.0.0.1:\1/p' "$log" | head -1)
    [[ -n $addr ]] && return 0
    sleep 0.1
  done
  die "crane registry serve did not start: $(cat "$log")"
}

reproducible_tar() { # dir tarfile
  tar --sort=name --mtime=@0 --owner=0 --group=0 --numeric-owner --format=posix \
    --pax-option=exthdr.name=%d/PaxHeaders/%f,delete=atime,delete=ctime -cf "$2" -C "$1" .
}

base_rootfs() { # dir
  local d=$1
  rm -rf "$d"
  mkdir -p "$d/etc/ssl/certs" "$d/tmp" "$d/home/nonroot"
  chmod 1777 "$d/tmp"
  chmod 0700 "$d/home/nonroot"
  printf '%s\n' 'root:x:0:0:root:/root:/sbin/nologin' 'nobody:x:65534:65534:nobody:/nonexistent:/sbin/nologin' \
    'nonroot:x:65532:65532:nonroot:/home/nonroot:/sbin/nologin' >"$d/etc/passwd"
  printf '%s\n' 'root:x:0:' 'nobody:x:65534:' 'nonroot:x:65532:' >"$d/etc/group"
  cp /etc/ssl/certs/ca-certificates.crt "$d/etc/ssl/certs/ca-certificates.crt"
  chmod 0644 "$d/etc/passwd" "$d/etc/group" "$d/etc/ssl/certs/ca-certificates.crt"
}

image() { # name ref entrypoint ports rootfs
  local name=$1 ref=$2 entrypoint=$3 ports=$4 rootfs=$5
  # Files owned by 65532 would differ from distroless only in /home/nonroot: keep that one.
  local layer="$work/$name.layer.tar"
  reproducible_tar "$rootfs" "$layer"
  local scratch="$addr/build/$name"
  "$crane" append --oci-empty-base --platform linux/amd64 -f "$layer" -t "$scratch:layer" >/dev/null 2>>"$work/crane.log"
  local args=(mutate "$scratch:layer" -t "$scratch:final" --user 65532:65532 --entrypoint "$entrypoint"
    --label "org.opencontainers.image.source=https://github.com/sidecert/sidecert"
    --label "org.opencontainers.image.version=${version:-$tag}")
  [[ -n $ports ]] && args+=(--exposed-ports "$ports")
  "$crane" "${args[@]}" >/dev/null 2>>"$work/crane.log"
  local layout="$work/$name.oci"
  rm -rf "$layout"
  "$crane" pull --format=oci "$scratch:final" "$layout" 2>>"$work/crane.log"
  # The index names the image, for `ctr images import` and for people reading the archive.
  local digest
  digest=$("$crane" digest "$scratch:final")
  python3 - "$layout/index.json" "$ref" <<'EOF'
import json, sys
path, ref = sys.argv[1], sys.argv[2]
index = json.load(open(path))
for m in index["manifests"]:
    m["annotations"] = {"io.containerd.image.name": ref, "org.opencontainers.image.ref.name": ref.rsplit(":", 1)[1]}
json.dump(index, open(path, "w"), separators=(",", ":"), sort_keys=True)
EOF
  mkdir -p "$out"
  reproducible_tar "$layout" "$out/$name.tar"
  echo "$ref@$digest" >"$out/$name.ref"
  printf '%-8s %s@%s\n' "$name" "$ref" "$digest"
}

mkdir -p "$work"
for n in "${names[@]}"; do
  case $n in
    webhook) build release sidecert-webhook sidecert-webhook ;;
    sidecar) build release-small sidecert-sidecar sidecert-sidecar ;;
    app) [[ -x /bin/busybox ]] || die "busybox is missing: run make tools (Debian's busybox-static)" ;;
    traefik) [[ -x $bin/traefik ]] || die "traefik is missing: run make tools" ;;
    *) die "unknown image $n (webhook, sidecar, app, traefik)" ;;
  esac
done
serve_registry
for n in "${names[@]}"; do
  rootfs="$work/$n.rootfs"
  base_rootfs "$rootfs"
  case $n in
    webhook)
      install -m 0755 "$root/target/$target/release/sidecert-webhook" "$rootfs/sidecert-webhook"
      image webhook "$registry_prefix/webhook:$tag" /sidecert-webhook 8443,9443 "$rootfs" ;;
    sidecar)
      install -m 0755 "$root/target/$target/release-small/sidecert-sidecar" "$rootfs/sidecert-sidecar"
      image sidecar "$registry_prefix/sidecar:$tag" /sidecert-sidecar 8089,9089 "$rootfs" ;;
    app)
      mkdir -p "$rootfs/bin" "$rootfs/www"
      install -m 0755 /bin/busybox "$rootfs/bin/busybox"
      for a in sh cat echo env grep hostname httpd id ip ls mkdir mount nc printf sleep test; do ln -s busybox "$rootfs/bin/$a"; done
      echo 'sidecert test app' >"$rootfs/www/index.html"
      # httpd as PID 1 would ignore SIGTERM (the kernel drops signals PID 1 has no handler
      # for), so every deletion would wait out the grace period: a shell that exits on it.
      image app sidecert.test/app:1.0 "/bin/sh,-c,trap 'exit 0' TERM; httpd -f -v -p 8080 -h /www & wait" 8080 "$rootfs" ;;
    traefik)
      install -m 0755 "$bin/traefik" "$rootfs/traefik"
      version=$TRAEFIK_VERSION image traefik "sidecert.test/traefik:$TRAEFIK_VERSION" /traefik "" "$rootfs" ;;
  esac
done
