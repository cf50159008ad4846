"""MLflow runs -> pandas -> tables (Markdown, HTML, CSV, LaTeX) + plots -> reports/<study>/.

Built only from ``mlflow.search_runs`` and metric histories, so it works against any
tracking server; the same runs always render the same bytes (sorted rows, fixed
number formats, PNGs without timestamps).
"""
from __future__ import annotations

import html
import math
from pathlib import Path

import numpy as np
import pandas as pd

from .errors import StudyError
from .studies import Study, cell_id, load_study

BASE_METRICS = ("gflops_fwd", "params_m", "train_samples_per_s", "infer_samples_per_s", "peak_mem_mb")
UNITS = {"gflops_fwd": "GFLOPs fwd (MAC, attn incl.)", "params_m": "params (M)",
         "train_samples_per_s": "train samples/s", "infer_samples_per_s": "infer samples/s",
         "peak_mem_mb": "peak mem (MB)"}


MFU_DTYPES = {"measured fp32 GEMM": "fp32", "measured bf16 GEMM": "bf16"}


def mfu_against_study_peak(df: pd.DataFrame, trials: pd.DataFrame) -> tuple[pd.DataFrame, dict]:
    """Restate every MFU against the best peak of its dtype measured in *any* trial of the
    study.  A trial logs its MFU against the best peak its own process had seen by then, so
    the first trials of a process, timed against a peak that a later measurement beat,
    would read high; one denominator per dtype makes the cells comparable and never
    flatters.  Trials with a datasheet peak (``peak_tflops``) keep theirs."""
    if df.empty or "mfu_peak_tflops" not in df or "tags.bench.mfu_peak" not in trials:
        return df, {}
    fin = trials[trials["status"] == "FINISHED"]
    best = {d: float(fin[f"metrics.peak_{d}_tflops"].max()) for d in ("fp32", "bf16")
            if f"metrics.peak_{d}_tflops" in fin and fin[f"metrics.peak_{d}_tflops"].notna().any()}
    which = trials.set_index("run_id")["tags.bench.mfu_peak"].map(MFU_DTYPES)
    df = df.copy()
    for i, r in df.iterrows():
        d = which.get(r["run_id"])
        if d not in best or not r["mfu_peak_tflops"] > 0:
            continue
        factor = r["mfu_peak_tflops"] / best[d]
        for m in ("train_mfu", "infer_mfu"):
            if m in df:
                df.at[i, m] = r[m] * factor
        df.at[i, "mfu_peak_tflops"] = best[d]
    return df, best


def speed_environment(trials: pd.DataFrame, study_peaks: dict | None = None) -> list[str]:
    """Lines for a speed study's report: the matmul peak its trials measured (the MFU
    denominator), the MFU rule, malloc mode, and other processes' CPU use while timing."""
    lines = []
    for d in ("fp32", "bf16"):
        col = f"metrics.peak_{d}_tflops"
        if col in trials and trials[col].notna().any():
            v = trials[col].dropna()
            lines.append(f"- dense {d} matmul peak measured in the same run (every trial's process): "
                         f"{v.min():.3f} to {v.max():.3f} TFLOP/s (2·M·N·K per s)")
    if study_peaks:
        lines.append("- MFU in this report: against the best peak of the run's dtype measured in any "
                     "trial of the study (" + ", ".join(f"{d} {v:.3f}" for d, v in study_peaks.items())
                     + " TFLOP/s), the same denominator for every cell; MLflow's per-trial `train_mfu` "
                     "divides by the best peak its own process had measured by then")
    for tag, label in (("tags.bench.mfu_peak", "MFU denominator"), ("tags.bench.mfu_rule", "MFU rule"),
                       ("tags.bench.malloc", "malloc"), ("tags.bench.attention", "attention kernel (SDPA)"),
                       ("tags.bench.compile", "torch.compile"), ("tags.bench.channels_last", "channels-last"),
                       ("tags.bench.peak_mem_source", "peak memory from")):
        values = sorted(set(trials[tag].dropna().astype(str)) - {""}) if tag in trials else []
        if values:  # (an empty tag: not applicable here, e.g. the CPU malloc mode on a GPU)
            lines.append(f"- {label}: {', '.join(values)}")
    col = "metrics.other_cpu_cores"
    if col in trials and trials[col].notna().any():
        lines.append(f"- CPU cores used by other processes while timing: up to "
                     f"{trials[col].max():.2f} (0 = a quiet machine)")
    return lines


def variant_text(study) -> str:
    """The variant(s) the trials ran: the swept ones where the sweep sets the variant."""
    swept = study.sweep.get("variant")
    if swept:
        return "variants " + ", ".join(f"`{v}`" for v in swept) + " (swept)"
    return f"variant `{study.variant}`"


def t95(n: int) -> float:
    """Two-sided 95% Student-t quantile for n samples."""
    if n < 2:
        return float("nan")
    from scipy.stats import t
    return float(t.ppf(0.975, n - 1))


def mean_ci(values) -> tuple[float, float, int]:
    v = np.asarray([x for x in values if x is not None and not (isinstance(x, float) and math.isnan(x))],
                   dtype=float)
    if len(v) == 0:
        return float("nan"), float("nan"), 0
    half = t95(len(v)) * v.std(ddof=1) / math.sqrt(len(v)) if len(v) > 1 else float("nan")
    return float(v.mean()), float(half), len(v)


def fmt(x: float) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "n/a"
    a = abs(x)
    if a == 0:
        return "0"
    if a >= 1000:
        return f"{x:,.0f}"
    if a >= 100:
        return f"{x:.1f}"
    if a >= 1:
        return f"{x:.3f}"
    return f"{x:.4g}"


def fmt_ci(m: float, h: float) -> str:
    return fmt(m) if math.isnan(h) else f"{fmt(m)} ± {fmt(h)}"


# ----------------------------------------------------------------- loading

def load_runs(study: Study, tracking_uri: str) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(trial runs, parent runs) of the study's experiment, sorted deterministically."""
    import mlflow
    mlflow.set_tracking_uri(tracking_uri)
    exp = mlflow.get_experiment_by_name(study.study_name)
    if exp is None:
        raise StudyError(f"no MLflow experiment {study.study_name!r} at {tracking_uri}: "
                         f"run `harness run {study.path}"
                         f"{' --profile ' + study.profile if study.profile else ''}` first")
    runs = mlflow.search_runs(experiment_ids=[exp.experiment_id], max_results=50000,
                              output_format="pandas")
    if runs.empty:
        raise StudyError(f"experiment {study.study_name!r} has no runs yet")
    kind = runs.get("tags.harness.kind", pd.Series([""] * len(runs)))
    trials = runs[kind == "trial"].copy()
    parents = runs[kind == "study_run"].copy()
    trials["trial_number"] = trials["tags.trial_number"].astype(int)
    trials["seed"] = trials["tags.seed"].astype(int)
    order = {cell_id(c): i for i, c in enumerate(study.cells())}
    trials["cell_order"] = trials["tags.cell_id"].map(order).fillna(len(order)).astype(int)
    trials = trials.sort_values(["cell_order", "seed", "trial_number"]).reset_index(drop=True)
    parents = parents.sort_values("start_time").reset_index(drop=True)
    return trials, parents


def finished_table(study: Study, trials: pd.DataFrame, metrics: list[str]) -> pd.DataFrame:
    """One row per finished (cell, seed): the last finished trial of each point."""
    fin = trials[trials["status"] == "FINISHED"]
    fin = fin.drop_duplicates(subset=["tags.cell_id", "seed"], keep="last")
    rows = []
    cells = study.cell_by_id()
    for _, r in fin.iterrows():
        cell = cells.get(r["tags.cell_id"])
        if cell is None:  # a cell no longer in the study file
            continue
        row = {"cell": r["tags.cell_id"], "seed": int(r["seed"]), "trial": int(r["trial_number"]),
               "run_id": r["run_id"], **{k: v for k, v in cell.items()}}
        for m in metrics:
            col = f"metrics.{m}"
            row[m] = float(r[col]) if col in r and pd.notna(r[col]) else float("nan")
        rows.append(row)
    return pd.DataFrame(rows)


# ------------------------------------------------------------------ tables

def group_table(df: pd.DataFrame, by: list[str], metrics: list[str], objectives) -> tuple[pd.DataFrame, list]:
    """Mean ± 95% CI over seeds per group; the best group (first objective) is marked."""
    out = []
    first = objectives[0]
    for key, g in df.groupby(by, sort=False):
        key = key if isinstance(key, tuple) else (key,)
        row = dict(zip(by, key))
        row["n"] = len(g)
        for m in metrics:
            mean, half, _ = mean_ci(g[m].tolist())
            row[m] = mean
            row[f"{m}_ci95"] = half
        out.append(row)
    t = pd.DataFrame(out)
    best = None
    if not t.empty and t[first.metric].notna().any():
        best = (t[first.metric].idxmax() if first.direction == "maximize" else t[first.metric].idxmin())
    t["best"] = ["★" if i == best else "" for i in t.index]
    return t, by


def to_markdown(t: pd.DataFrame, by: list[str], metrics: list[str]) -> str:
    head = by + ["n"] + [UNITS.get(m, m) for m in metrics] + [""]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for _, r in t.iterrows():
        cells = [str(r[b]) for b in by] + [str(int(r["n"]))]
        cells += [fmt_ci(r[m], r[f"{m}_ci95"]) for m in metrics] + [r["best"]]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def to_latex(t: pd.DataFrame, by: list[str], metrics: list[str], caption: str) -> str:
    esc = lambda s: str(s).replace("_", r"\_").replace("%", r"\%").replace("&", r"\&")
    cols = by + ["n"] + metrics
    lines = [r"\begin{table}[t]", r"\centering", r"\begin{tabular}{" + "l" * len(by) + "r" * (len(cols) - len(by)) + "}",
             r"\toprule", " & ".join(esc(UNITS.get(c, c)) for c in cols) + r" \\", r"\midrule"]
    for _, r in t.iterrows():
        vals = [esc(r[b]) for b in by] + [str(int(r["n"]))]
        for m in metrics:
            s = fmt_ci(r[m], r[f"{m}_ci95"]).replace("±", r"$\pm$").replace(",", "{,}")
            vals.append(r"\textbf{" + s + "}" if r["best"] and m == metrics[0] else s)
        lines.append(" & ".join(vals) + r" \\")
    lines += [r"\bottomrule", r"\end{tabular}", r"\caption{" + esc(caption) + "}", r"\end{table}"]
    return "\n".join(lines) + "\n"


def to_html_table(t: pd.DataFrame, by: list[str], metrics: list[str]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in by + ["n"] + [UNITS.get(m, m) for m in metrics] + [""])
    body = []
    for _, r in t.iterrows():
        cells = [str(r[b]) for b in by] + [str(int(r["n"]))] + \
                [fmt_ci(r[m], r[f"{m}_ci95"]) for m in metrics] + [r["best"]]
        body.append("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in cells) + "</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


# ------------------------------------------------------------------- plots

def _plt():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    plt.rcParams.update({"svg.hashsalt": "harness", "figure.dpi": 100, "font.size": 9})
    return plt


def pareto_front(points: list[tuple[float, float]], maximize: bool) -> list[int]:
    """Indices of points not dominated in (lower cost, better quality)."""
    idx = []
    for i, (c, q) in enumerate(points):
        dominated = False
        for j, (c2, q2) in enumerate(points):
            if j == i:
                continue
            better_q = q2 >= q if maximize else q2 <= q
            strictly = (c2 < c) or (q2 > q if maximize else q2 < q)
            if c2 <= c and better_q and strictly:
                dominated = True
                break
        if not dominated:
            idx.append(i)
    return sorted(idx, key=lambda i: points[i][0])


def plot_pareto(cells: pd.DataFrame, metric: str, maximize: bool, path: Path) -> None:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    x, y, e = cells["gflops_fwd"].to_numpy(), cells[metric].to_numpy(), cells[f"{metric}_ci95"].to_numpy()
    ax.errorbar(x, y, yerr=np.nan_to_num(e), fmt="o", capsize=3, color="tab:blue")
    for xi, yi, label in zip(x, y, cells["cell"]):
        ax.annotate(label, (xi, yi), fontsize=7, xytext=(4, 4), textcoords="offset points")
    front = pareto_front(list(zip(x, y)), maximize)
    ax.plot(x[front], y[front], "--", color="tab:red", label="Pareto front")
    ax.set_xlabel("GFLOPs per sample, forward (1 MAC = 1 flop, attention included)")
    ax.set_ylabel(f"{metric} ({'higher' if maximize else 'lower'} is better)")
    ax.legend(loc="best")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, metadata={"Software": None})
    plt.close(fig)


def plot_throughput(cells: pd.DataFrame, path: Path) -> None:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.4, 0.6 + 0.45 * len(cells)))
    yy = np.arange(len(cells))
    for off, m, color in ((-0.2, "train_samples_per_s", "tab:orange"), (0.2, "infer_samples_per_s", "tab:green")):
        if m in cells:
            ax.barh(yy + off, cells[m].fillna(0), height=0.4, xerr=np.nan_to_num(cells[f"{m}_ci95"]),
                    color=color, label=UNITS[m])
    ax.set_yticks(yy, cells["cell"], fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel("samples / s (median step, per trial; mean ± 95% CI over seeds)")
    ax.legend(loc="best", fontsize=7)
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, metadata={"Software": None})
    plt.close(fig)


def plot_loss_curves(curves: dict[str, list[np.ndarray]], path: Path, metric: str = "train_loss") -> None:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for cell, series in curves.items():
        if not series:
            continue
        steps = series[0][:, 0]
        same = [s for s in series if len(s) == len(steps) and np.array_equal(s[:, 0], steps)]
        mean = np.mean([s[:, 1] for s in same], axis=0)
        ax.plot(steps, mean, label=f"{cell} (n={len(same)})")
    ax.set_xlabel("step")
    ax.set_ylabel(f"{metric} (mean over seeds)")
    ax.set_yscale("log")
    ax.legend(fontsize=6, loc="best")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, metadata={"Software": None})
    plt.close(fig)


# ------------------------------------------------------------------ claims

def evaluate_claim(claim: dict, table: pd.DataFrame, axis: str, metric: str, maximize: bool) -> str:
    """A paper's ordering claim checked against the measured means (and their CIs)."""
    t = table.dropna(subset=[metric])
    if t.empty:
        return f"- **{claim['text']}**: cannot be judged (no finished runs with `{metric}`)."
    order = t.sort_values(metric, ascending=not maximize)
    ranking = " > ".join(f"{r[axis]} ({fmt_ci(r[metric], r[f'{metric}_ci95'])})" for _, r in order.iterrows())
    verdicts = []
    holds = True
    for role, pos in (("best", 0), ("worst", -1)):
        want = claim.get(role)
        if want is None:
            continue
        got = order.iloc[pos][axis]
        ok = str(got) == str(want)
        holds &= ok
        verdicts.append(f"{role}: expected {want}, measured {got}")
    sep = ""
    if len(order) >= 2:
        a, b = order.iloc[0], order.iloc[1]
        if not (math.isnan(a[f"{metric}_ci95"]) or math.isnan(b[f"{metric}_ci95"])):
            gap = abs(a[metric] - b[metric])
            overlap = gap < a[f"{metric}_ci95"] + b[f"{metric}_ci95"]
            sep = (" The top two overlap within their 95% CIs, so the top rank is not settled."
                   if overlap else " The top two are separated beyond their 95% CIs.")
    word = "HOLDS" if holds else "DOES NOT HOLD"
    return (f"- **{claim['text']}** — {word} here ({'; '.join(verdicts)}). "
            f"Ranking by `{metric}` ({'higher' if maximize else 'lower'} is better): {ranking}.{sep}")


# ------------------------------------------------------------------ ratios

def paired_ideal(ratio: dict) -> str | None:
    """The ideal as the value arm's trial logged it for its in-trial reference model."""
    return f"reference_{ratio['ideal']}" if ratio.get("paired") and ratio.get("ideal") else None


def verdict(judged: list[float], target: float) -> str:
    return (("met" if np.mean(judged) >= target else "**not met**")
            + (f" ({sum(j >= target for j in judged)}/{len(judged)} seeds)" if len(judged) > 1 else ""))


def ratio_section(ratio: dict, df: pd.DataFrame, axes: list[str]) -> list[str]:
    """``value``'s metric over ``baseline``'s along one axis, per combination of the other
    axes, paired by seed (one seed: the same data for both arms); against an ideal (a
    metric of the baseline's runs, e.g. pad's tokens per real token) where the study names one.
    With ``paired`` (a metric of the value arm's trials: its speed over a baseline model timed
    in turn with it in the same trial), that in-trial ratio too, against the ideal the trial
    logged for its reference (``reference_<ideal>``), with its own verdict."""
    axis, m, ideal, target = ratio["axis"], ratio["metric"], ratio.get("ideal"), ratio.get("target")
    paired, p_ideal = ratio.get("paired"), paired_ideal(ratio)
    others = [a for a in axes if a != axis]
    head = [*others, "seeds", f"{ratio['value']} `{m}`", f"{ratio['baseline']} `{m}`",
            "ratio across trials (min-max)" if paired else "ratio (min-max)"]
    if ideal:
        head += [f"ideal (`{ideal}` of {ratio['baseline']})", "of ideal (min-max)"]
    if paired:
        head += [f"in-trial `{paired}` (min-max)"] + (["of ideal (min-max)"] if ideal else [])
    if target is not None:
        goal = f"{target:.0%} of ideal" if ideal else f"{target:g}"
        head.append(f"target: {goal}" + (" (across trials / in-trial)" if paired else ""))
    lines = [f"**{ratio['text']}**", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    groups = df.groupby(others, sort=False) if others else [((), df)]

    def span(xs, f="{:.3g}"):
        one = f.format
        return f"{one(np.mean(xs))} ({one(min(xs))}-{one(max(xs))})" if len(xs) > 1 else one(xs[0])
    for key, g in groups:
        key = key if isinstance(key, tuple) else (key,)
        v = g[g[axis] == ratio["value"]].drop_duplicates("seed").set_index("seed")
        b = g[g[axis] == ratio["baseline"]].drop_duplicates("seed").set_index("seed")
        cols = [m] + ([ideal] if ideal else [])
        seeds = sorted(set(v[m].dropna().index) & set(b[cols].dropna().index))
        if not seeds:
            continue
        rs = [v.loc[s, m] / b.loc[s, m] for s in seeds]
        row = [*(str(k) for k in key), str(len(seeds)), fmt(float(np.mean(v.loc[seeds, m]))),
               fmt(float(np.mean(b.loc[seeds, m]))), span(rs)]
        judged = rs
        if ideal:
            ideals = [b.loc[s, ideal] for s in seeds]
            judged = [r / i for r, i in zip(rs, ideals)]
            row += [f"{np.mean(ideals):.3g}", span(judged, "{:.0%}")]
        p_judged = []
        if paired:
            cols = [paired] + ([p_ideal] if ideal else [])
            p_seeds = sorted(v[cols].dropna().index) if set(cols) <= set(v.columns) else []
            ps = [v.loc[s, paired] for s in p_seeds]
            p_judged = [p / v.loc[s, p_ideal] for p, s in zip(ps, p_seeds)] if ideal else ps
            row += [span(ps) if ps else "-"] + ([span(p_judged, "{:.0%}") if ps else "-"] if ideal else [])
        if target is not None:
            row.append(verdict(judged, target)
                       + (f" / {verdict(p_judged, target) if p_judged else '-'}" if paired else ""))
        lines.append("| " + " | ".join(row) + " |")
    if len(lines) == 4:
        lines.append("(no seed has finished runs of both arms)")
    return lines + [""]


# ------------------------------------------------------------------ render

def render_report(study_path: str, *, profile: str | None = None, tracking_uri: str | None = None,
                  runs_dir: str = "runs", out_dir: str | None = None, command: str | None = None) -> Path:
    import os

    from mlflow.tracking import MlflowClient

    from .tracking import check_tracking_uri, default_tracking_uri, mask_url, sqlite_file

    study = load_study(study_path, profile)
    uri = check_tracking_uri(tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
                             or default_tracking_uri(Path(runs_dir)))
    store = sqlite_file(uri)
    if store is not None and not store.is_file():
        # before MLflow opens it: opening would create an empty store where there was none
        raise StudyError(f"no tracking store at {store}: run `harness run "
                         f"{study.path}{' --profile ' + study.profile if study.profile else ''} "
                         f"--runs-dir {runs_dir}` first, or give this report the --runs-dir "
                         "(or --tracking-uri) that run used")
    trials, parents = load_runs(study, uri)
    objectives = study.objectives
    extra = [m for m in study.resolved.get("report_metrics", []) if m not in [o.metric for o in objectives]]
    metrics = [o.metric for o in objectives] + extra + [m for m in BASE_METRICS
                                                       if m not in extra and m not in [o.metric for o in objectives]]
    ratios = study.resolved.get("ratios") or []
    ratio_metrics = [m for r in ratios for m in (r["metric"], r.get("ideal"), r.get("paired"),
                                                 paired_ideal(r)) if m and m not in metrics]
    df = finished_table(study, trials, metrics + list(dict.fromkeys(ratio_metrics)))
    df, study_peaks = mfu_against_study_peak(df, trials)
    out = Path(out_dir or Path("reports") / study.study_name)
    out.mkdir(parents=True, exist_ok=True)
    axes = list(study.sweep)
    first = objectives[0]
    maximize = first.direction == "maximize"

    # tables
    sections, html_sections, latex = [], [], []
    if df.empty:
        raise StudyError(f"experiment {study.study_name!r} has no finished trial to report")
    cells, _ = group_table(df, ["cell"], metrics, objectives)
    for axis in axes:
        t, by = group_table(df, [axis], metrics, objectives)
        title = f"By {axis} (mean ± 95% CI over every run with that value)"
        sections.append(f"### {title}\n\n{to_markdown(t, by, metrics)}\n")
        html_sections.append(f"<h3>{html.escape(title)}</h3>{to_html_table(t, by, metrics)}")
        latex.append(to_latex(t, by, metrics, f"{study.study_name}: {title}"))
    cell_md = to_markdown(cells, ["cell"], metrics)
    latex.append(to_latex(cells, ["cell"], metrics, f"{study.study_name}: per cell"))

    # claims
    claim_lines = []
    for claim in study.resolved.get("claims", []) or []:
        axis = claim.get("axis", axes[0] if axes else None)
        metric = claim.get("metric", first.metric)
        if axis not in axes or metric not in df:
            claim_lines.append(f"- **{claim.get('text', '?')}**: cannot be judged (axis {axis!r} or "
                               f"metric {metric!r} not in this study's runs).")
            continue
        direction = claim.get("direction") or next((o.direction for o in objectives if o.metric == metric),
                                                   "maximize")
        sub = df
        for wk, wv in (claim.get("where") or {}).items():
            sub = sub[sub[wk].isin(wv)]
        t, _ = group_table(sub, [axis], [metric], objectives if metric in [o.metric for o in objectives]
                           else [type(first)(metric, direction)])
        line = evaluate_claim(claim, t, axis, metric, direction == "maximize")
        if claim.get("where"):
            line += " (Judged on " + "; ".join(f"{k} in {v}" for k, v in claim["where"].items()) + ".)"
        claim_lines.append(line)

    # plots
    plot_pareto(cells, first.metric, maximize, out / "pareto.png")
    plot_throughput(cells, out / "throughput.png")
    client = MlflowClient(tracking_uri=uri)
    curves: dict[str, list[np.ndarray]] = {}
    for _, r in df.iterrows():
        hist = sorted((m.step, m.value) for m in client.get_metric_history(r["run_id"], "train_loss"))
        if hist:
            curves.setdefault(r["cell"], []).append(np.array(hist, dtype=float))
    plots = ["pareto.png", "throughput.png"]
    if curves:  # a benchmark study trains nothing: no curves, no empty plot
        plot_loss_curves(curves, out / "loss_curves.png")
        plots.append("loss_curves.png")
    else:
        (out / "loss_curves.png").unlink(missing_ok=True)  # an earlier render's
    artifacts = copy_artifacts(client, df, out)

    # csv
    csv = df.drop(columns=["run_id"]).copy()
    csv.to_csv(out / "results.csv", index=False, float_format="%.6g")
    (out / "results.tex").write_text("\n".join(latex))

    # environment and status
    status_counts = trials["status"].value_counts().sort_index()
    status_line = ", ".join(f"{n} {s.lower()}" for s, n in status_counts.items())
    env_keys = ["device_name", "torch_threads", "cpu_linear", "cpu_gelu", "cpu_attention", "cpu_mkl", "torch_version", "python_version", "harness_version", "git_sha"]
    env = []
    for k in env_keys:
        col = f"tags.{k}"
        vals = sorted(set(trials[col].dropna().astype(str))) if col in trials else []
        env.append(f"- {k.replace('_', ' ')}: {', '.join(vals) if vals else 'n/a'}")
    loads = [float(x) for c in ("tags.load_avg_1m_start", "tags.load_avg_1m_end") if c in trials
             for x in trials[c].dropna()]
    if loads:
        env.append(f"- load average (1 min) during trials: {min(loads):.2f} to {max(loads):.2f} "
                   f"on {trials['tags.device_name'].dropna().iloc[0] if 'tags.device_name' in trials else '?'}"
                   " (throughput figures are only comparable at similar load)")
    env += speed_environment(trials, study_peaks)
    cmds = sorted(set(parents.get("tags.harness.command", pd.Series(dtype=str)).dropna()))
    cmd = command or (cmds[0] if cmds else f"harness run {study.path}")
    report_cmd = f"harness report {study.path}" + (f" --profile {study.profile}" if study.profile else "")
    if not tracking_uri and str(runs_dir) != "runs":
        report_cmd += f" --runs-dir {runs_dir}"
    if out != Path("reports") / study.study_name:
        report_cmd += f" --out {out_dir}"
    failed = trials[trials["status"] != "FINISHED"]
    fail_lines = [f"- trial {int(r['trial_number'])} `{r['tags.cell_id']}` seed {int(r['seed'])}: "
                  f"{r['status']}: {r.get('tags.fail_reason', '') or 'no reason recorded'}"
                  for _, r in failed.iterrows()]
    seeds = sorted(int(x) for x in df["seed"].unique())
    fl = trials["tags.flop_convention"].dropna().iloc[0] if "tags.flop_convention" in trials else ""

    md = [f"# {study.study_name}", "",
          f"**Question.** {study.question}", "",
          "**Reproduce.**", "", "```", cmd, report_cmd, "```", "",
          f"Rendered by `harness report` from {len(trials)} MLflow trial runs ({status_line}); "
          f"{len(df)} finished cell × seed points, seeds {seeds}. "
          f"Objective: {', '.join(f'`{o.metric}` ({o.direction})' for o in objectives)}; "
          f"★ marks the best value of `{first.metric}`. Task `{study.task}`, data `{study.data}`, "
          f"{variant_text(study)}, budget {study.budget.steps} steps.", "",
          "## Environment", "", *env, f"- FLOP convention: {fl}",
          f"- tracking store: {mask_url(uri) if not uri.startswith('sqlite') else 'embedded SQLite'}", ""]
    if claim_lines:
        md += ["## Do the paper's findings hold here?", "", *claim_lines, ""]
    if ratios:
        md += ["## Ratios (paired by seed: the same data in both arms)", ""]
        for r in ratios:
            md += ratio_section(r, df, axes)
    md += ["## Results by ablation axis", "", *sections,
           "### Per cell", "", cell_md, "",
           "## Plots", "",
           f"![quality vs GFLOPs](pareto.png)", "",
           f"![throughput](throughput.png)", "",
           *([f"![loss curves](loss_curves.png)", ""] if "loss_curves.png" in plots else [])]
    if artifacts:
        md += ["## Samples and confusion matrices (lowest seed of each cell)", ""]
        md += [f"![{a}]({a})" for a in artifacts] + [""]
    if fail_lines:
        md += ["## Trials that did not finish", "", *fail_lines, ""]
    md += ["Files: `results.csv` (one row per finished run), `results.tex` (LaTeX tables), "
           "`report.html`.", ""]
    (out / "README.md").write_text("\n".join(md))
    body = "\n".join(html_sections)
    imgs = "".join(f'<p><img src="{html.escape(p)}" style="max-width:720px"></p>'
                   for p in [*plots, *artifacts])
    (out / "report.html").write_text(
        "<!doctype html><html><head><meta charset='utf-8'><title>" + html.escape(study.study_name) +
        "</title><style>body{font-family:sans-serif;max-width:1000px;margin:auto}"
        "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:3px 6px}</style></head><body>"
        f"<h1>{html.escape(study.study_name)}</h1><p><b>Question.</b> {html.escape(study.question)}</p>"
        f"<pre>{html.escape(cmd)}\n{html.escape(report_cmd)}</pre>"
        f"<h2>Results</h2>{body}<h3>Per cell</h3>{to_html_table(cells, ['cell'], metrics)}"
        f"<h2>Plots</h2>{imgs}</body></html>\n")
    return out


def copy_artifacts(client, df: pd.DataFrame, out: Path) -> list[str]:
    """One sample grid / confusion matrix per cell (seed 0 or the first seed), copied in."""
    import os
    import shutil
    import tempfile
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    names = []
    for cell, g in df.groupby("cell", sort=False):
        r = g.sort_values("seed").iloc[0]
        try:
            listing = client.list_artifacts(r["run_id"])
        except Exception as e:  # a store without artifacts: say so in the report
            print(f"harness report: no artifacts for {cell}: {e}")
            continue
        for a in listing:
            if not a.path.endswith(".png"):
                continue
            with tempfile.TemporaryDirectory() as tmp:
                local = client.download_artifacts(r["run_id"], a.path, tmp)
                safe = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in cell)
                name = f"{Path(a.path).stem}-{safe}.png"
                shutil.copyfile(local, out / name)
                names.append(name)
    return names
