#!/usr/bin/env bash
# Builds (once) every external binary the local control plane runs, at the versions pinned
# in e2e/versions.env, into e2e/.cache/bin. A second run with the same versions is a no-op.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
e2e="$(dirname "$here")"
# shellcheck source=../versions.env
source "$e2e/versions.env"
bin="$e2e/.cache/bin"
mkdir -p "$bin"

step() { printf '==> %s\n' "$*" >&2; }
fail() {
  printf 'error: step "%s" failed.\n  retry with: %s\n' "$1" "$2" >&2
  exit 1
}

command -v go >/dev/null 2>&1 || fail "find the Go toolchain" "install Go 1.24 or newer, then: make tools"

# A stamp per binary holds the version it was built at; a changed pin rebuilds it.
fresh() { [[ -x "$bin/$1" && "$(cat "$bin/.$1.version" 2>/dev/null)" == "$2" ]]; }
stamp() { echo "$2" >"$bin/.$1.version"; }

minor="${KUBERNETES_VERSION#v1.}"; minor="${minor%%.*}"
kube_ldflags="-s -w \
 -X k8s.io/component-base/version.gitVersion=$KUBERNETES_VERSION \
 -X k8s.io/component-base/version.gitMajor=1 \
 -X k8s.io/component-base/version.gitMinor=$minor \
 -X k8s.io/component-base/version.gitTreeState=clean \
 -X k8s.io/client-go/pkg/version.gitVersion=$KUBERNETES_VERSION \
 -X k8s.io/client-go/pkg/version.gitMajor=1 \
 -X k8s.io/client-go/pkg/version.gitMinor=$minor"

build_in_module() { # name package ldflags version
  local name=$1 pkg=$2 ldflags=$3 version=$4
  fresh "$name" "$version" && return 0
  step "building $name $version (cold: several minutes)"
  local cmd="cd $here && go build -trimpath -ldflags '$ldflags' -o $bin/$name $pkg"
  (cd "$here" && go build -trimpath -ldflags "$ldflags" -o "$bin/$name" "$pkg") || fail "build $name" "$cmd"
  stamp "$name" "$version"
}

go_install() { # name package@version
  local name=$1 pkg=$2 version=${2##*@}
  fresh "$name" "$version" && return 0
  step "installing $pkg"
  GOBIN="$bin" go install -trimpath -ldflags "-s -w" "$pkg" || fail "install $name" "GOBIN=$bin go install $pkg"
  stamp "$name" "$version"
}

step "downloading Go modules for Kubernetes $KUBERNETES_VERSION"
(cd "$here" && go mod download) || fail "download Kubernetes modules" "cd $here && go mod download"

build_in_module etcd go.etcd.io/etcd/server/v3 "-s -w" "$ETCD_VERSION"
build_in_module kube-apiserver k8s.io/kubernetes/cmd/kube-apiserver "$kube_ldflags" "$KUBERNETES_VERSION"
build_in_module kube-controller-manager k8s.io/kubernetes/cmd/kube-controller-manager "$kube_ldflags" "$KUBERNETES_VERSION"
go_install pebble "github.com/letsencrypt/pebble/v2/cmd/pebble@$PEBBLE_VERSION"
go_install pebble-challtestsrv "github.com/letsencrypt/pebble/v2/cmd/pebble-challtestsrv@$PEBBLE_VERSION"
go_install helm "helm.sh/helm/v3/cmd/helm@$HELM_VERSION"

# ---- the real node (kubelet, kube-proxy, kube-scheduler; containerd, runc, CNI; registry) ----
# Debian packages the node needs at build or run time: libseccomp for runc's seccomp support
# (Pod Security "restricted" asks for RuntimeDefault), nft for kube-proxy's nftables mode,
# musl-gcc for ring in the static image binaries, busybox-static for the test shell image.
need_pkgs=()
for p in libseccomp-dev:/usr/include/seccomp.h nftables:/usr/sbin/nft musl-tools:/usr/bin/musl-gcc \
  busybox-static:/bin/busybox conntrack:/usr/sbin/conntrack; do
  [[ -e "${p#*:}" ]] || need_pkgs+=("${p%%:*}")
done
if ((${#need_pkgs[@]})); then
  step "installing Debian packages: ${need_pkgs[*]}"
  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need_pkgs[@]}"; } \
    || fail "install ${need_pkgs[*]}" "apt-get update && apt-get install -y ${need_pkgs[*]}"
fi

build_in_module kubelet k8s.io/kubernetes/cmd/kubelet "$kube_ldflags" "$KUBERNETES_VERSION"
build_in_module kube-scheduler k8s.io/kubernetes/cmd/kube-scheduler "$kube_ldflags" "$KUBERNETES_VERSION"
build_in_module kube-proxy k8s.io/kubernetes/cmd/kube-proxy "$kube_ldflags" "$KUBERNETES_VERSION"

# containerd, runc and the registry are modules of their own with dependencies newer than
# the API server's: built with `go install`, so each resolves its own go.mod.
go_install_tagged() { # name package@version tags cgo
  local name=$1 pkg=$2 tags=$3 cgo=$4 version=${2##*@}
  fresh "$name" "$version" && return 0
  step "installing $pkg"
  local tmp; tmp=$(mktemp -d)
  CGO_ENABLED=$cgo GOBIN="$tmp" go install -trimpath -tags "$tags" -ldflags "-s -w" "$pkg" \
    || fail "install $name" "CGO_ENABLED=$cgo GOBIN=$bin go install -tags '$tags' $pkg"
  mv "$tmp"/* "$bin/$name" && rmdir "$tmp"
  stamp "$name" "$version"
}
cd_tags="no_btrfs no_devmapper no_zfs no_aufs"
go_install_tagged containerd "github.com/containerd/containerd/v2/cmd/containerd@$CONTAINERD_VERSION" "$cd_tags" 0
go_install_tagged containerd-shim-runc-v2 "github.com/containerd/containerd/v2/cmd/containerd-shim-runc-v2@$CONTAINERD_VERSION" "$cd_tags" 0
go_install_tagged ctr "github.com/containerd/containerd/v2/cmd/ctr@$CONTAINERD_VERSION" "$cd_tags" 0
# runc's nsenter is C (cgo); seccomp links libseccomp.
go_install_tagged runc "github.com/opencontainers/runc@$RUNC_VERSION" "seccomp" 1
go_install_tagged registry "github.com/distribution/distribution/v3/cmd/registry@$DISTRIBUTION_VERSION" "" 0
go_install_tagged crane "github.com/google/go-containerregistry/cmd/crane@$CRANE_VERSION" "" 0
cni="$e2e/.cache/cni/bin"
mkdir -p "$cni"
for plugin in main/bridge main/loopback ipam/host-local; do
  name=${plugin#*/}
  if [[ -x "$cni/$name" && "$(cat "$cni/.$name.version" 2>/dev/null)" == "$CNI_PLUGINS_VERSION" ]]; then continue; fi
  step "installing CNI plugin $name $CNI_PLUGINS_VERSION"
  CGO_ENABLED=0 GOBIN="$cni" go install -trimpath -ldflags "-s -w" \
    "github.com/containernetworking/plugins/plugins/$plugin@$CNI_PLUGINS_VERSION" \
    || fail "install CNI plugin $name" "GOBIN=$cni go install github.com/containernetworking/plugins/plugins/$plugin@$CNI_PLUGINS_VERSION"
  echo "$CNI_PLUGINS_VERSION" >"$cni/.$name.version"
done
# The sandbox ("pause") image's one binary, from Kubernetes' own source in the module cache.
if ! fresh pause "$KUBERNETES_VERSION"; then
  step "building pause $KUBERNETES_VERSION"
  src="$(cd "$here" && go list -m -f '{{.Dir}}' k8s.io/kubernetes)/build/pause/linux/pause.c"
  gcc -Os -Wall -Werror -static -DVERSION="$KUBERNETES_VERSION" -o "$bin/pause" "$src" \
    || fail "build pause" "gcc -static -o $bin/pause $src"
  stamp pause "$KUBERNETES_VERSION"
fi

# ---- the ingress controller: Traefik (issue 13) -------------------------------------------
# Traefik's go.mod has replace directives, so `go install` refuses it: it builds in a wrapper
# module (tools/traefik) that carries its replace and exclude lines. Three of them point at
# what this machine's module proxy refuses (403), each worked around here, on copies in
# e2e/.cache/traefik (never in the repository):
# - github.com/traefik/traefik/dynamic/ext (upstream: ./pkg/config/dynamic/ext, not in the
#   module zip): an empty module of our own with the three empty structs it holds in the
#   open-source build;
# - containous/go-http-auth at its 2026 pseudo-version: the served 2020 one of the same fork;
# - the SDKs of 13 lego DNS providers: lego registers every provider in one generated file,
#   zz_gen_dns_providers.go; the copy's is replaced by an empty registry (the plane solves
#   HTTP-01 only), which also drops every DNS SDK from the build.
traefik_src="$e2e/.cache/traefik"
traefik_mod="$here/traefik"
# Outside any module (a scratch folder), so no go.mod around decides what is downloaded.
download_json() { # module@version
  local scratch out
  scratch=$(mktemp -d)
  out=$(cd "$scratch" && GOFLAGS=-mod=mod GOWORK=off go mod download -json "$1") || { rmdir "$scratch"; return 1; }
  rmdir "$scratch"
  printf '%s\n' "$out"
}
pinned=$(sed -n 's/^require github.com\/traefik\/traefik\/v3 \(v[^ ]*\)$/\1/p' "$traefik_mod/go.mod")
[[ $pinned == "$TRAEFIK_VERSION" ]] ||
  fail "check Traefik's pin" "set TRAEFIK_VERSION in e2e/versions.env and the require line of $traefik_mod/go.mod to the same version (now $TRAEFIK_VERSION and $pinned)"
traefik_prepare() {
  # Prepared again when the version or this function (the workarounds) changes.
  local key lego legodir gomod
  key="$TRAEFIK_VERSION $(declare -f traefik_prepare | sha256sum | cut -c1-16)"
  [[ "$(cat "$traefik_src/.prepared" 2>/dev/null)" == "$key" ]] && return 0
  step "preparing Traefik $TRAEFIK_VERSION's module workarounds in $traefik_src"
  gomod=$(download_json "github.com/traefik/traefik/v3@$TRAEFIK_VERSION" | sed -n 's/^\t"GoMod": "\(.*\)",$/\1/p') ||
    fail "download Traefik $TRAEFIK_VERSION" "go mod download github.com/traefik/traefik/v3@$TRAEFIK_VERSION"
  lego=$(sed -n 's/^\tgithub.com\/go-acme\/lego\/v5 \(v[^ ]*\)$/\1/p' "$gomod")
  [[ -n $lego ]] || fail "find Traefik's lego v5 version" "grep go-acme/lego/v5 $gomod"
  legodir=$(download_json "github.com/go-acme/lego/v5@$lego" | sed -n 's/^\t"Dir": "\(.*\)",$/\1/p') ||
    fail "download lego $lego" "go mod download github.com/go-acme/lego/v5@$lego"
  rm -rf "$traefik_src" && mkdir -p "$traefik_src/ext"
  printf 'module github.com/traefik/traefik/dynamic/ext\n\ngo 1.24\n' >"$traefik_src/ext/go.mod"
  cat >"$traefik_src/ext/ext.go" <<'GO'
// Package ext is where Traefik's own builds extend the dynamic configuration; the
// open-source build has nothing in it.
package ext

// HTTP extends dynamic.HTTPConfiguration.
type HTTP struct{}

// Router extends dynamic.Router.
type Router struct{}

// RouterIng extends the Kubernetes Ingress router annotations.
type RouterIng struct{}
GO
  cp -r "$legodir" "$traefik_src/lego" && chmod -R u+w "$traefik_src/lego"
  rm -f "$traefik_src/lego/providers/dns/dns_providers_test.go"
  cat >"$traefik_src/lego/providers/dns/zz_gen_dns_providers.go" <<'GO'
// Replaced by sidecert's e2e/tools/build.sh: no DNS-01 provider in this build.
package dns

import (
	"fmt"

	"github.com/go-acme/lego/v5/challenge"
)

// NewDNSChallengeProviderByName knows no provider in this build.
func NewDNSChallengeProviderByName(name string) (challenge.Provider, error) {
	return nil, fmt.Errorf("unrecognized DNS provider: %s (none in this build)", name)
}
GO
  echo "$key" >"$traefik_src/.prepared"
}
# The binary is rebuilt when the version, the wrapper module or the workarounds change.
traefik_key="$TRAEFIK_VERSION $(cat "$traefik_mod/go.mod" "$traefik_mod/go.sum" <(declare -f traefik_prepare) | sha256sum | cut -c1-16)"
if ! fresh traefik "$traefik_key"; then
  traefik_prepare
  step "building traefik $TRAEFIK_VERSION (cold: about 15 minutes on 2 cores)"
  (cd "$traefik_mod" && CGO_ENABLED=0 go build -trimpath \
    -ldflags "-s -w -X github.com/traefik/traefik/v3/pkg/version.Version=$TRAEFIK_VERSION" \
    -o "$bin/traefik" github.com/traefik/traefik/v3/cmd/traefik) ||
    fail "build traefik" "cd $traefik_mod && CGO_ENABLED=0 go build -o $bin/traefik github.com/traefik/traefik/v3/cmd/traefik"
  stamp traefik "$traefik_key"
fi
# The Gateway API CRDs Traefik implements: the standard channel of the version its go.mod
# requires (so the pin in versions.env must be that one), from the module's config/crd.
gwapi="$e2e/.cache/gateway-api/$GATEWAY_API_VERSION"
if [[ ! -f "$gwapi/.complete" ]]; then
  step "taking the Gateway API $GATEWAY_API_VERSION CRDs (standard channel) from sigs.k8s.io/gateway-api"
  traefik_prepare # the wrapper module's replace folders must exist for `go list`
  traefiks=$(cd "$traefik_mod" && go list -m -f '{{.Version}}' sigs.k8s.io/gateway-api) ||
    fail "find Traefik's Gateway API version" "cd $traefik_mod && go list -m sigs.k8s.io/gateway-api"
  [[ $traefiks == "$GATEWAY_API_VERSION" ]] ||
    fail "check the Gateway API pin" "set GATEWAY_API_VERSION in e2e/versions.env to $traefiks, the version Traefik $TRAEFIK_VERSION implements"
  gwdir=$(cd "$traefik_mod" && go list -m -f '{{.Dir}}' sigs.k8s.io/gateway-api) ||
    fail "download sigs.k8s.io/gateway-api" "cd $traefik_mod && go mod download sigs.k8s.io/gateway-api"
  rm -rf "$gwapi" && mkdir -p "$gwapi"
  cp "$gwdir"/config/crd/standard/*.yaml "$gwapi/" && chmod 0644 "$gwapi"/*.yaml
  touch "$gwapi/.complete"
fi

step "tools ready in $bin"
