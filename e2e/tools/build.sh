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
step "tools ready in $bin"
