#!/usr/bin/env bash
# Checks every deploy artefact offline (called by scripts/test.sh; runs alone too):
#  - each Kubernetes overlay renders (kustomize, or `kubectl kustomize`) and every object
#    validates, strictly, against the schemas of Kubernetes $K8S_VERSION (kubernetes-validate);
#    ServiceMonitors must select a Service with their port, PrometheusRules load in promtool;
#  - every systemd unit passes `systemd-analyze verify` with no warning;
#  - every Grafana dashboard (deploy/grafana) is JSON whose queries parse (promtool) and name
#    only metrics the code registers (tests/tests/e2e_prometheus.rs runs them in Prometheus);
#  - deploy/compose.yaml is well-formed (services, images, volumes, no port clash);
#  - every --flag given to a Damselfly binary in the manifests, compose file and units exists
#    in that binary's --help (binaries from $DAMSELFLY_BIN_DIR, else the cargo target dir).
# Installs kubernetes-validate (pip), systemd and prometheus (apt) when missing, as root.
set -euo pipefail
cd "$(dirname "$0")/.."
K8S_VERSION=${K8S_VERSION:-1.31.0}
fail() { echo "check-deploy: FAIL: $*" >&2; exit 1; }

need=()
command -v systemd-analyze >/dev/null 2>&1 || need+=(systemd)
command -v promtool >/dev/null 2>&1 || need+=(prometheus)
if [ ${#need[@]} -gt 0 ]; then
    [ "$(id -u)" = 0 ] || fail "${need[*]} missing (apt-get install ${need[*]})"
    echo "check-deploy: installing ${need[*]} ..."
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi
if ! command -v kubernetes-validate >/dev/null 2>&1; then
    echo "check-deploy: installing kubernetes-validate ..."
    python3 -m pip install -q kubernetes-validate || fail "pip install kubernetes-validate failed"
    hash -r
fi

bin_dir=${DAMSELFLY_BIN_DIR:-}
if [ -z "$bin_dir" ]; then
    t=${CARGO_TARGET_DIR:-target}
    for d in "$t/debug" "$t/release"; do
        if [ -x "$d/dfdaemon" ] && [ -x "$d/scheduler" ] && [ -x "$d/manager" ]; then bin_dir=$d; break; fi
    done
fi
[ -n "$bin_dir" ] || fail "no dfdaemon, scheduler and manager binaries found: run 'cargo build --bins' or set DAMSELFLY_BIN_DIR"

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

# --- Kubernetes ---
# CHECK_DEPLOY_NO_KUSTOMIZE=1 takes the no-kustomize path even where one is installed.
if [ -n "${CHECK_DEPLOY_NO_KUSTOMIZE:-}" ]; then render=()
elif command -v kustomize >/dev/null 2>&1; then render=(kustomize build)
elif command -v kubectl >/dev/null 2>&1 && kubectl kustomize --help >/dev/null 2>&1; then render=(kubectl kustomize)
else render=()
fi
rendered=()
if [ ${#render[@]} -gt 0 ]; then
    for o in deploy/kubernetes/overlays/*/; do
        name=$(basename "$o")
        "${render[@]}" "$o" > "$work/$name.yaml" || fail "overlay $name does not render"
        rendered+=("$work/$name.yaml")
    done
    echo "check-deploy: rendered ${#rendered[@]} overlays with ${render[*]}"
else
    # No kustomize here (none in Debian, PyPI or npm): check the base's and components'
    # object files as they are; the overlays' patches and generators go unchecked.
    echo "check-deploy: NOTE no kustomize or kubectl: validating base and component files unrendered (overlays not rendered)" >&2
    for f in deploy/kubernetes/base/*.yaml deploy/kubernetes/components/*/*.yaml; do
        case $(basename "$f") in kustomization.yaml) continue ;; esac
        rendered+=("$f")
    done
fi
kv_out=$work/kv.log
if ! kubernetes-validate -k "$K8S_VERSION" --strict --quiet "${rendered[@]}" > "$kv_out" 2>&1; then
    cat "$kv_out" >&2
    fail "Kubernetes objects do not validate against $K8S_VERSION"
fi
# Only the Prometheus Operator kinds may lack a schema; check_deploy.py checks those.
if grep -v -E "Couldn't find schema for kind (ServiceMonitor|PrometheusRule) with api version monitoring.coreos.com/v1 " "$kv_out" | grep -q .; then
    cat "$kv_out" >&2
    fail "kubernetes-validate warned"
fi
n=$(cat "${rendered[@]}" | grep -c '^kind:')
echo "check-deploy: $n Kubernetes objects valid for Kubernetes $K8S_VERSION"
RULES_OUT=$work/rules.yaml python3 scripts/check_deploy.py manifests "${rendered[@]}" || fail "monitoring objects"
promtool check rules "$work/rules.yaml" >/dev/null || { promtool check rules "$work/rules.yaml" >&2; fail "PrometheusRule rules"; }

# --- Grafana dashboards: JSON, metric names the code registers, PromQL that promtool parses
RULES_OUT=$work/dashboards.yaml python3 scripts/check_deploy.py dashboards deploy/grafana/*.json || fail "dashboards"
promtool check rules "$work/dashboards.yaml" >/dev/null || { promtool check rules "$work/dashboards.yaml" >&2; fail "a dashboard query is not valid PromQL"; }
echo "check-deploy: $(ls deploy/grafana/*.json | wc -l) Grafana dashboards checked"

# --- systemd: verify in a throw-away root that holds the binaries where the units expect them
root=$work/root
mkdir -p "$root/usr/local/bin" "$root/etc/systemd/system" "$root/usr/lib/systemd"
for b in dfdaemon scheduler manager; do ln "$bin_dir/$b" "$root/usr/local/bin/$b" 2>/dev/null || cp "$bin_dir/$b" "$root/usr/local/bin/$b"; done
cp -a /lib/systemd/system "$root/usr/lib/systemd/system"
cp deploy/systemd/*.service "$root/etc/systemd/system/"
out=$(systemd-analyze verify --root="$root" "$root"/etc/systemd/system/damselfly-*.service 2>&1) || { echo "$out" >&2; fail "systemd-analyze verify"; }
[ -z "$out" ] || { echo "$out" >&2; fail "systemd-analyze verify warned"; }
echo "check-deploy: $(ls deploy/systemd/*.service | wc -l) systemd units verified"

# --- compose and flags
python3 scripts/check_deploy.py compose deploy/compose.yaml || fail "deploy/compose.yaml"
python3 scripts/check_deploy.py flags "$bin_dir" "${rendered[@]}" deploy/compose.yaml deploy/systemd/*.service || fail "flags"
echo "check-deploy: compose file and every flag checked against $bin_dir"
echo "check-deploy: OK"
