"""Checks deploy/: alert rules are well-formed and each runbook_url names an existing RUNBOOK.md section."""
import re
import sys

import yaml


def anchors(markdown):
    out = set()
    for line in markdown.splitlines():
        m = re.match(r"^#+\s+(.*)$", line)
        if m:
            title = m.group(1).strip().lower()
            title = re.sub(r"[^\w\- ]", "", title)
            out.add(title.replace(" ", "-"))
    return out


def main():
    known = anchors(open("RUNBOOK.md", encoding="utf-8").read())
    rules = yaml.safe_load(open("deploy/prometheus/lifeboat-rules.yaml", encoding="utf-8"))
    problems = []
    names = []
    for group in rules["groups"]:
        for rule in group["rules"]:
            name = rule.get("alert", "?")
            names.append(name)
            for field in ("expr",):
                if not rule.get(field):
                    problems.append(f"{name}: no {field}")
            if rule.get("labels", {}).get("severity") not in ("warning", "critical"):
                problems.append(f"{name}: severity must be warning or critical")
            url = rule.get("annotations", {}).get("runbook_url", "")
            anchor = url.split("#", 1)[1] if "#" in url else ""
            if anchor not in known:
                problems.append(f"{name}: runbook_url {url!r} names no RUNBOOK.md section")
            if "job=" in rule.get("expr", "").replace("up{job", ""):
                problems.append(f"{name}: lifeboat metrics carry `source`, never `job`")
    for want in ("BackupTooOld", "BackupFailing", "VerificationFailed", "VerificationStale", "RestoreSlowerThanRTO", "AgentDown"):
        if want not in names:
            problems.append(f"missing alert {want}")
    # Every RUNBOOK.md#anchor an error hint names must exist.
    import pathlib
    for path in sorted(pathlib.Path(".").glob("*/src/**/*.rs")):
        for anchor in re.findall(r"RUNBOOK\.md#([\w-]+)", path.read_text(encoding="utf-8")):
            if anchor not in known:
                problems.append(f"{path}: hint names RUNBOOK.md#{anchor}, which is no section")
    if problems:
        print("deploy check failed:\n  " + "\n  ".join(problems))
        sys.exit(1)
    print(f"deploy check: {len(names)} alerts, every runbook_url and every hint's RUNBOOK.md link resolves")


main()
