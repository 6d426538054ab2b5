"""The study's plots (matplotlib): plots/valid_curves.png and plots/tau_histograms.png."""
from __future__ import annotations

from pathlib import Path

from megatron_tempnet.experiments.study.aggregate import _mean_std
from megatron_tempnet.experiments.study.config import StudyConfig


def _row_label(row: dict) -> str:
    rho = "" if row["rho"] is None else f" ρ={row['rho']:g}"
    arch = f" [{row['arch']}]" if row.get("arch") else ""
    return f"{row['loss mode']}{arch}{rho} {row['training mode']}"


def _mean_curve(curves: list[list[dict]], key: str) -> tuple[list, list, list]:
    """(iterations, mean, std) of ``key`` over seeds, at the iterations every seed has."""
    common = set.intersection(*[{p["iteration"] for p in c} for c in curves]) if curves else set()
    its = sorted(common)
    means, stds = [], []
    for it in its:
        stat = _mean_std([next(p[key] for p in c if p["iteration"] == it) for c in curves])
        means.append(stat["mean"])
        stds.append(stat["std"] or 0.0)
    return its, means, stds


def write_plots(cfg: StudyConfig, report: dict, out_dir: Path | None = None) -> list[Path]:
    """plots/valid_curves.png (validation perplexity at tau = 1, own tau and best T, and the
    mean tau, mean ± std over seeds per row) and plots/tau_histograms.png (the final
    evaluation's per-token tau of every TempNet row, summed over seeds). Needs matplotlib
    (``pip install .[dev]``)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir = Path(out_dir or cfg.out_dir / "plots")
    out_dir.mkdir(parents=True, exist_ok=True)
    by_row: dict[str, list] = {}
    for c in report["cells"]:
        if c["status"] == "ok":
            key = _row_label({"loss mode": c["loss_mode"], "rho": c["rho"],
                              "arch": c.get("arch"), "training mode": c["training_mode"]})
            if c["train_iters"] != cfg.train_iters:
                key += f" ({c['train_iters']} it)"
            by_row.setdefault(key, []).append(report["curves"][c["cell"]])
    panels = (("ppl tau=1", "valid ppl at τ = 1"), ("ppl own tau", "valid ppl, own τ"),
              ("ppl best T", "valid ppl, best global T"), ("own tau", "own τ (mean)"))
    fig, axes = plt.subplots(2, 2, figsize=(10, 7), dpi=80)
    for ax, (key, title) in zip(axes.flat, panels):
        for label, curves in by_row.items():
            its, mean, std = _mean_curve([c["valid"] for c in curves], key)
            if not its:
                continue
            line, = ax.plot(its, mean, marker=".", label=label)
            ax.fill_between(its, [m - s for m, s in zip(mean, std)],
                            [m + s for m, s in zip(mean, std)], color=line.get_color(),
                            alpha=0.15)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("iteration", fontsize=9)
        if key.startswith("ppl"):
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
    handles, labels = axes.flat[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=3, fontsize=8)
    fig.tight_layout(rect=(0, 0.06 + 0.025 * (len(labels) // 3), 1, 1))
    paths = [out_dir / "valid_curves.png"]
    fig.savefig(paths[0])
    plt.close(fig)

    hists = {label: [c for c in curves if c["tau histogram"]] for label, curves in by_row.items()}
    hists = {k: v for k, v in hists.items() if v}
    n = max(len(hists), 1)
    cols = min(n, 3)
    fig, axes = plt.subplots((n + cols - 1) // cols, cols, figsize=(4 * cols, 3 * ((n + 2) // 3)),
                             dpi=80, squeeze=False)
    for ax, (label, members) in zip(axes.flat, hists.items()):
        hs = [c["tau histogram"] for c in members]
        edges = hs[0]["edges"]
        counts = [sum(h["counts"][i] for h in hs) for i in range(len(edges) - 1)]
        total = sum(counts) or 1.0
        ax.bar(edges[:-1], [c / total for c in counts], width=[b - a for a, b in
                                                               zip(edges[:-1], edges[1:])],
               align="edge", edgecolor="black", linewidth=0.3)
        mean = _mean_std([c["tau mean"] for c in members])["mean"]
        ax.axvline(mean, color="black", linestyle="--", linewidth=0.8)
        ax.set_title(f"{label}: mean τ {mean:.2f}", fontsize=9)
        ax.set_xlabel("τ", fontsize=9)
        ax.set_ylabel("fraction of tokens", fontsize=8)
    for ax in list(axes.flat)[len(hists):]:
        ax.axis("off")
        if not hists:
            ax.text(0.5, 0.5, "no TempNet rows", ha="center", va="center")
    fig.tight_layout()
    paths.append(out_dir / "tau_histograms.png")
    fig.savefig(paths[1])
    plt.close(fig)
    return paths
