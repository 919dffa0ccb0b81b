#!/usr/bin/env python3
"""Structural checks of deploy/ that no schema validator covers (called by check-deploy.sh).

  check_deploy.py manifests RENDERED.yaml...   ServiceMonitor selects Services with a `metrics`
                                               port; PrometheusRule groups extracted for promtool
                                               (to $RULES_OUT), every metric they name is one
                                               the code registers
  check_deploy.py compose deploy/compose.yaml  the compose file's structure
  check_deploy.py dashboards FILE.json...      Grafana dashboards: JSON, a unique uid, every panel
                                               target a Prometheus query naming only metrics the
                                               code registers; the queries written as recording
                                               rules to $RULES_OUT (promtool checks their PromQL)
  check_deploy.py flags BIN_DIR FILE...        every `--flag` given to a Damselfly binary in
                                               FILE (YAML or systemd unit) exists in that
                                               binary's --help

Exits 1 with one line per problem.
"""
import os
import re
import subprocess
import sys

import yaml

BINARIES = ("dfdaemon", "scheduler", "manager", "dfget", "dfcache", "dfinit")
problems = []


def bad(msg):
    problems.append(msg)


def load_all(path):
    with open(path, encoding="utf-8") as f:
        return [d for d in yaml.safe_load_all(f) if d is not None]


def manifests(paths, rules_out):
    docs = [d for p in paths for d in load_all(p)]
    services = [d for d in docs if d.get("kind") == "Service"]
    groups = []
    for d in docs:
        kind, name = d.get("kind"), d.get("metadata", {}).get("name")
        if kind == "ServiceMonitor":
            spec = d.get("spec") or {}
            sel = spec.get("selector") or {}
            ports = {e.get("port") for e in spec.get("endpoints") or []}
            if not ports or None in ports:
                bad(f"ServiceMonitor/{name}: every endpoint needs a named port")
            matched = [s for s in services if selects(sel, s["metadata"].get("labels") or {})]
            if not matched:
                bad(f"ServiceMonitor/{name}: selects no Service")
            for s in matched:
                names = {p.get("name") for p in s["spec"].get("ports") or []}
                for p in ports - names:
                    bad(f"ServiceMonitor/{name}: Service/{s['metadata']['name']} has no port {p!r}")
        elif kind == "PrometheusRule":
            g = (d.get("spec") or {}).get("groups")
            if not isinstance(g, list) or not g:
                bad(f"PrometheusRule/{name}: spec.groups is empty")
            else:
                groups.extend(g)
        elif kind and "monitoring.coreos.com" in str(d.get("apiVersion")):
            bad(f"{kind}/{name}: no check for this kind")
    known = registered_metrics()
    for g in groups:
        for r in g.get("rules") or []:
            for m in set(re.findall(r"\bdamselfly_[a-z0-9_]+", str(r.get("expr", "")))):
                base = re.sub(r"_(total|bucket|sum|count)$", "", m)
                if base not in known and m not in known:
                    bad(f"rule {r.get('alert') or r.get('record')}: no metric {m} in the code")
    if rules_out:
        with open(rules_out, "w", encoding="utf-8") as f:
            yaml.safe_dump({"groups": groups}, f)


def registered_metrics():
    """Every `"damselfly_..."` string literal in the crates' sources (the metric names)."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    names = set()
    for crate in ("controlplane", "dataplane", "scheduler", "manager", "wire"):
        for dirpath, _, files in os.walk(os.path.join(root, crate, "src")):
            for f in files:
                if f.endswith(".rs"):
                    with open(os.path.join(dirpath, f), encoding="utf-8") as fh:
                        names.update(re.findall(r'"(damselfly_[a-z0-9_]+)"', fh.read()))
    return names


GRAFANA_INTERVALS = ("$__rate_interval", "$__interval", "$__range")


def dashboards(paths, rules_out):
    import json

    known = registered_metrics()
    uids = {}
    rules = []
    for path in paths:
        try:
            with open(path, encoding="utf-8") as f:
                d = json.load(f)
        except (OSError, ValueError) as e:
            bad(f"{path}: not JSON: {e}")
            continue
        uid = d.get("uid")
        if not isinstance(uid, str) or not uid:
            bad(f"{path}: no uid")
        elif uid in uids:
            bad(f"{path}: uid {uid} also in {uids[uid]}")
        else:
            uids[uid] = path
        if not d.get("title"):
            bad(f"{path}: no title")
        panels = []
        for p in d.get("panels") or []:
            panels.append(p)
            panels.extend(p.get("panels") or [])
        if not panels:
            bad(f"{path}: no panels")
        ids = [p.get("id") for p in panels]
        if len(set(ids)) != len(ids):
            bad(f"{path}: panel ids repeat")
        for p in panels:
            if p.get("type") == "row":
                continue
            title = p.get("title")
            targets = p.get("targets") or []
            if not targets:
                bad(f"{path}: panel {title!r} has no query")
            for t in targets:
                ds = t.get("datasource") or p.get("datasource") or {}
                if ds.get("type") != "prometheus":
                    bad(f"{path}: panel {title!r}: datasource is not Prometheus")
                expr = t.get("expr")
                if not isinstance(expr, str) or not expr.strip():
                    bad(f"{path}: panel {title!r}: a target without expr")
                    continue
                for m in set(re.findall(r"\bdamselfly_[a-z0-9_]+", expr)):
                    base = re.sub(r"_(total|bucket|sum|count)$", "", m)
                    if base not in known and m not in known:
                        bad(f"{path}: panel {title!r}: no metric {m} in the code")
                for v in GRAFANA_INTERVALS:
                    expr = expr.replace(v, "5m")
                if "$" in expr:
                    bad(f"{path}: panel {title!r}: unknown variable in {expr!r}")
                    continue
                rules.append({"record": f"dashboard:panel_{len(rules)}", "expr": expr})
    if rules_out:
        with open(rules_out, "w", encoding="utf-8") as f:
            yaml.safe_dump({"groups": [{"name": "dashboards", "rules": rules}]}, f)


def selects(sel, labels):
    for k, v in (sel.get("matchLabels") or {}).items():
        if labels.get(k) != v:
            return False
    for e in sel.get("matchExpressions") or []:
        val, op = labels.get(e.get("key")), e.get("operator")
        vals = e.get("values") or []
        if op == "In" and val not in vals:
            return False
        if op == "NotIn" and val in vals:
            return False
        if op == "Exists" and val is None:
            return False
        if op == "DoesNotExist" and val is not None:
            return False
    return True


COMPOSE_SERVICE_KEYS = {
    "image", "command", "network_mode", "restart", "volumes", "depends_on", "security_opt",
    "user", "environment", "ports",
}


def compose(path):
    docs = load_all(path)
    if len(docs) != 1 or not isinstance(docs[0], dict):
        bad(f"{path}: not one YAML mapping")
        return
    c = docs[0]
    unknown = set(c) - {"name", "services", "volumes", "networks"}
    if unknown:
        bad(f"{path}: unknown top-level keys {sorted(unknown)}")
    services = c.get("services")
    if not isinstance(services, dict) or not services:
        bad(f"{path}: no services")
        return
    volumes = set((c.get("volumes") or {}).keys())
    listen = {}
    for name, s in services.items():
        if not isinstance(s, dict):
            bad(f"{name}: not a mapping")
            continue
        for k in set(s) - COMPOSE_SERVICE_KEYS:
            bad(f"{name}: unknown key {k!r}")
        if not isinstance(s.get("image"), str):
            bad(f"{name}: no image")
        cmd = s.get("command")
        if not (isinstance(cmd, list) and cmd and all(isinstance(a, str) for a in cmd)):
            bad(f"{name}: command must be a list of strings")
            continue
        if not cmd[0].startswith("/usr/local/bin/"):
            bad(f"{name}: command does not start with an image binary")
        for dep in s.get("depends_on") or []:
            if dep not in services:
                bad(f"{name}: depends on unknown service {dep!r}")
        for v in s.get("volumes") or []:
            src = str(v).split(":", 1)[0]
            if not src.startswith("/") and src not in volumes:
                bad(f"{name}: volume {src!r} not declared")
        if s.get("network_mode") == "host":
            for port in host_ports(cmd):
                if port in listen:
                    bad(f"{name}: port {port} also used by {listen[port]}")
                listen[port] = name


# Default ports of each binary when the command does not override them (host network).
DEFAULT_PORTS = {
    "dfdaemon": {"--data-port": "4005", "--metrics": "4002"},
    "scheduler": {"--listen": "8002"},
    "manager": {"--grpc": "65003", "--rest": "8080"},
}


def host_ports(cmd):
    binary = os.path.basename(cmd[0])
    given = {}
    for i, a in enumerate(cmd):
        if a.startswith("--") and i + 1 < len(cmd) and not cmd[i + 1].startswith("--"):
            given[a] = cmd[i + 1]
    ports = []
    for flag, default in DEFAULT_PORTS.get(binary, {}).items():
        ports.append(given.get(flag, default).rsplit(":", 1)[-1])
    for flag in ("--proxy",):
        if flag in given:
            ports.append(given[flag].rsplit(":", 1)[-1])
    if binary in ("scheduler", "manager") and "--metrics" in given:
        ports.append(given["--metrics"].rsplit(":", 1)[-1])
    return ports


def flags(bin_dir, paths):
    helps = {}
    for b in BINARIES:
        exe = os.path.join(bin_dir, b)
        if os.access(exe, os.X_OK):
            out = subprocess.run([exe, "--help"], capture_output=True, text=True, timeout=30)
            if out.returncode != 0:
                bad(f"{exe} --help exited {out.returncode}")
            helps[b] = set(re.findall(r"--[a-z][a-z0-9-]*", out.stdout))
    checked = 0
    for p in paths:
        for binary, args in commands_of(p):
            if binary not in helps:
                bad(f"{p}: no {binary} binary in {bin_dir} to check its flags")
                continue
            for a in args:
                m = re.match(r"(--[a-z][a-z0-9-]*)", a)
                if m:
                    checked += 1
                    if m.group(1) not in helps[binary]:
                        bad(f"{p}: {binary} has no flag {m.group(1)}")
    if checked == 0:
        bad("no flags found to check")


def commands_of(path):
    """(binary, args) of every Damselfly command in a YAML file or a systemd unit."""
    if path.endswith(".service"):
        with open(path, encoding="utf-8") as f:
            for line in f:
                if line.startswith("ExecStart="):
                    words = line.split("=", 1)[1].split()
                    yield os.path.basename(words[0]), words[1:]
        return
    for d in load_all(path):
        yield from commands(d)


def commands(node):
    """Yields (binary, args) for each container/compose command found anywhere in node."""
    if isinstance(node, dict):
        cmd = node.get("command")
        if isinstance(cmd, list) and cmd and isinstance(cmd[0], str) and cmd[0].startswith("/usr/local/bin/"):
            yield os.path.basename(cmd[0]), [str(a) for a in cmd[1:]] + [str(a) for a in node.get("args") or []]
        for v in node.values():
            yield from commands(v)
    elif isinstance(node, list):
        for v in node:
            yield from commands(v)


def main():
    if len(sys.argv) < 3:
        print(__doc__, file=sys.stderr)
        return 2
    mode = sys.argv[1]
    if mode == "manifests":
        out = os.environ.get("RULES_OUT")
        manifests(sys.argv[2:], out)
    elif mode == "dashboards":
        dashboards(sys.argv[2:], os.environ.get("RULES_OUT"))
    elif mode == "compose":
        compose(sys.argv[2])
    elif mode == "flags":
        flags(sys.argv[2], sys.argv[3:])
    else:
        print(__doc__, file=sys.stderr)
        return 2
    for p in problems:
        print(f"check_deploy {mode}: {p}", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
