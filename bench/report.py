"""Combines one bench/run.sh run's result files into one JSON document, draws the plots, fills
the tables in BENCHMARKS.md between `<!-- bench:KIND -->` and `<!-- /bench:KIND -->`, and gates
peak RSS against bench/budgets.json (exit 1 naming every result over budget)."""

import argparse
import glob
import json
import math
import os
import re
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def load(parts):
    docs = {}
    for path in sorted(glob.glob(os.path.join(parts, "*.json"))):
        kind = os.path.basename(path).split("-", 1)[1].removesuffix(".json")
        docs[kind] = json.load(open(path))
    if not docs:
        sys.exit(f"no result files in {parts}")
    return docs


# S3 Standard request prices, us-east-1, dollars per request: PUT, COPY, POST and LIST $0.005 per
# 1,000; GET and HEAD $0.0004 per 1,000; DELETE free.
PRICES = {"put": 0.005e-3, "list": 0.005e-3, "get": 0.0004e-3, "head": 0.0004e-3, "delete": 0.0}


def dollars(requests):
    """What `requests` (op → count) cost at S3 list prices, to two significant digits."""
    cost = sum(PRICES.get(op, 0.0) * c for op, c in requests.items())
    if cost == 0:
        return "$0"
    return f"${cost:.{max(2, 1 - math.floor(math.log10(cost)))}f}"


def table(doc):
    base = doc["results"][doc["baseline"]]["wall_median_s"]
    asked = any("requests" in r for r in doc["results"].values())
    lines = [
        f"| command | wall (median, min–max) | CPU (user+sys) | peak RSS | wall ÷ {doc['baseline']} |"
        + (" repository requests | cost on S3 (list prices) |" if asked else ""),
        "|---|---|---|---|---|" + ("---|---|" if asked else ""),
    ]
    for name, r in doc["results"].items():
        shown = name.replace("|", "\\|")  # a pipe in a command would end the cell
        asks = r.get("requests", {})
        counts = ", ".join(f"{c} {op.upper()}" for op, c in asks.items() if c)
        lines.append(
            f"| {shown} | {r['wall_median_s']:.2f} s ({r['wall_min_s']:.2f}–{r['wall_max_s']:.2f}) "
            f"| {r['cpu_median_s']:.2f} s | {r['peak_rss_mib']:.0f} MiB | {r['wall_median_s'] / base:.2f} |"
            + (f" {counts or 'none'} | {dollars(asks)} |" if asked else "")
        )
    runs = next(iter(doc["results"].values()))["runs"]
    return f"{doc['note']}; median of {runs} run(s), {doc['date'][:10]}.\n\n" + "\n".join(lines)


def scaling_rows(docs, prefix):
    """The result documents of one scaling series, smallest first."""
    return sorted(
        (d for k, d in docs.items() if k.startswith(prefix)),
        key=lambda d: float(d.get("scale") or 0),
    )


def scaling_table(docs, prefix, label):
    rows = scaling_rows(docs, prefix)
    if not rows:
        return None
    names = list(rows[0]["results"])
    head = f"| {label} | " + " | ".join(f"{n}: wall / peak RSS" for n in names) + " |"
    lines = [head, "|---" * (len(names) + 1) + "|"]
    for d in rows:
        size = d.get("scale")
        if prefix.startswith("pg"):
            size = f"{d['database_bytes'] / 2**20:,.0f} MiB"
        cells = [
            f"{d['results'][n]['wall_median_s']:.2f} s / {d['results'][n]['peak_rss_mib']:.0f} MiB"
            if n in d["results"]
            else "–"
            for n in names
        ]
        lines.append(f"| {size} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def gate(docs, budgets):
    over, checked = [], []
    skipped = tuple(budgets.get("not_gated", []))
    for kind, d in docs.items():
        if kind.startswith(skipped):
            continue
        for name, r in d["results"].items():
            # The longest matching key is the budget: a row may have its own, as "KIND: NAME".
            matching = [
                k for k in budgets["peak_rss_mib"]
                if name.startswith(k) or f"{kind}: {name}".startswith(k)
            ]
            if not matching:
                continue
            prefix = max(matching, key=len)
            limit = budgets["peak_rss_mib"][prefix]
            checked.append(f"{kind}: {name}: {r['peak_rss_mib']:.0f} MiB (budget {limit})")
            if r["peak_rss_mib"] > limit:
                over.append(checked[-1])
    return checked, over


def plots(docs, budgets, out):
    os.makedirs(out, exist_ok=True)
    main = {k: d for k, d in docs.items() if "scaling" not in k}
    compared = {k: d for k, d in main.items() if len(d["results"]) > 1}
    fig, axes = plt.subplots(len(compared), 1, figsize=(10, 0.45 * sum(len(d["results"]) for d in compared.values()) + 1.2 * len(compared)), squeeze=False)
    for ax, (kind, d) in zip(axes[:, 0], compared.items()):
        base = d["results"][d["baseline"]]["wall_median_s"]
        names = list(d["results"])
        vals = [d["results"][n]["wall_median_s"] / base for n in names]
        colors = ["tab:orange" if n.startswith("lifeboat") else "tab:gray" for n in names]
        ax.barh(names, vals, color=colors)
        ax.axvline(1.0, color="black", linewidth=0.8)
        ax.set_title(f"{kind}: wall time ÷ {d['baseline']}", fontsize=9)
        ax.tick_params(labelsize=7)
        ax.invert_yaxis()
    fig.tight_layout()
    fig.subplots_adjust(left=0.42)
    fig.savefig(os.path.join(out, "ratios.png"), dpi=110)
    plt.close(fig)

    rss = [
        (f"{k}: {n}", r["peak_rss_mib"])
        for k, d in main.items()
        for n, r in d["results"].items()
        if n.startswith("lifeboat")
    ]
    fig, ax = plt.subplots(figsize=(9, 0.35 * len(rss) + 1.2))
    ax.barh([n for n, _ in rss], [v for _, v in rss], color="tab:orange")
    for limit in sorted(set(budgets["peak_rss_mib"].values())):
        ax.axvline(limit, color="red", linestyle="--", linewidth=0.8)
    ax.set_xlabel("peak RSS, MiB (dashed: budgets)")
    ax.tick_params(labelsize=7)
    ax.invert_yaxis()
    fig.tight_layout()
    fig.subplots_adjust(left=0.5)
    fig.savefig(os.path.join(out, "rss.png"), dpi=110)
    plt.close(fig)

    for prefix, xlabel, fname in [
        ("pg_scaling", "database size, MiB", "pg_scaling.png"),
        ("objects_scaling", "files", "objects_scaling.png"),
    ]:
        rows = scaling_rows(docs, prefix)
        if len(rows) < 2:
            continue
        xs = [
            d["database_bytes"] / 2**20 if prefix.startswith("pg") else float(d["scale"])
            for d in rows
        ]
        fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4))
        for name in rows[0]["results"]:
            ys = [d["results"].get(name, {}).get("wall_median_s") for d in rows]
            ms = [d["results"].get(name, {}).get("peak_rss_mib") for d in rows]
            a1.plot(xs, ys, marker="o", label=name)
            a2.plot(xs, ms, marker="o", label=name)
        for a, t in [(a1, "wall time, s"), (a2, "peak RSS, MiB")]:
            a.set_xscale("log")
            a.set_xlabel(xlabel)
            a.set_title(t, fontsize=9)
            a.grid(alpha=0.3)
        a1.set_yscale("log")
        a2.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(os.path.join(out, fname), dpi=110)
        plt.close(fig)


def fill(markdown, docs):
    text = open(markdown).read()
    sections = {k: table(d) for k, d in docs.items() if "scaling" not in k}
    for prefix, label in [("pg_scaling", "database"), ("objects_scaling", "files")]:
        t = scaling_table(docs, prefix, label)
        if t:
            sections[prefix] = t
    for kind, body in sections.items():
        pattern = re.compile(
            rf"(<!-- bench:{re.escape(kind)} -->\n).*?(\n<!-- /bench:{re.escape(kind)} -->)", re.S
        )
        text, n = pattern.subn(lambda m: m.group(1) + body + m.group(2), text)
        if n == 0:
            print(f"note: {markdown} has no bench:{kind} markers; its table is not there", file=sys.stderr)
    open(markdown, "w").write(text)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--parts", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--plots", required=True)
    p.add_argument("--markdown")
    p.add_argument("--gate", required=True)
    a = p.parse_args()
    docs = load(a.parts)
    budgets = json.load(open(a.gate))
    checked, over = gate(docs, budgets)
    json.dump(
        {"benchmarks": docs, "rss_gate": {"checked": checked, "over_budget": over}},
        open(a.out, "w"),
        indent=2,
    )
    plots(docs, budgets, a.plots)
    if a.markdown:
        fill(a.markdown, docs)
    for kind, d in docs.items():
        print(f"\n### {kind}\n\n{table(d)}")
    print(f"\nresults: {a.out}; plots: {a.plots}/")
    print("\npeak RSS gate:\n  " + "\n  ".join(checked))
    if over:
        print("\nOVER BUDGET:\n  " + "\n  ".join(over), file=sys.stderr)
        sys.exit(1)


main()
