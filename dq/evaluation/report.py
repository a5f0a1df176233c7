"""The ablation report: a markdown table (method x bit-width) and a plot of FID vs bits per method, from a
sweep dir of train.py run dirs (results.json) evaluated by evaluate.py (metrics.json).

    python -m dq.evaluation.report multirun/<date>/<time>                # writes report.md, fid_vs_bits.png there
    python -m dq.evaluation.report SWEEP --fp outputs/<date>/<time>_eval --metric fid --out docs/

Run dirs are found recursively; an FP evaluation (metrics.json with method "fp") anywhere under the sweep
dir, or given with --fp, is the full-precision row. A metrics.json copied into a run dir and the one in
its eval dir are the same evaluation (same evaluation_id) and count once. Runs evaluated under different
protocols (backend, N, reference, sampler, seed) are flagged: their numbers are not comparable.
"""

from __future__ import annotations

import argparse
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dq import cli
from dq.errors import MissingFileError, UserError
from dq.io import atomic_write, read_json_object

METHOD_ORDER = ("fp", "ptq_minmax", "no_bkd", "no_wd", "no_tpq", "dilatequant")
TRAINING_MARK = "†"  # marks a figure taken from results.json for lack of an evaluation
LOWER_IS_BETTER = {"fid": True, "sfid": True, "is": False, "psnr_vs_fp": False, "psnr_mse_vs_fp": False, "psnr_median_vs_fp": False, "ssim_vs_fp": False, "mse_vs_fp": True}
PROTOCOL_KEYS = ("backend", "num_samples", "sampler", "steps", "eta", "spacing", "guidance_scale", "seed")


@dataclass
class RunRecord:
    """One evaluated (or only trained) configuration."""

    directory: Path
    label: str  # the directory relative to the sweep dir it was found under
    method: str
    weight_bits: int | None
    act_bits: int | None
    metrics: dict[str, Any] = field(default_factory=dict)  # metrics.json ({} if not evaluated)
    results: dict[str, Any] = field(default_factory=dict)  # results.json ({} for an FP evaluation)

    @property
    def bits(self) -> str:
        return "FP" if self.method == "fp" else f"W{self.weight_bits}A{self.act_bits}"

    def value(self, metric: str) -> float | None:
        """The figure from metrics.json, else (fidelity only) train.py's quick one from results.json."""
        value = self.metrics.get(metric)
        if value is None and metric in ("psnr_vs_fp", "mse_vs_fp"):
            value = self.results.get(metric)
        return float(value) if isinstance(value, (int, float)) else None

    def from_training(self, metric: str) -> bool:
        """Whether value(metric) is train.py's quick figure (its fixed fidelity batch), not an evaluation's."""
        return self.metrics.get(metric) is None and self.value(metric) is not None

    def protocol(self) -> tuple:
        protocol = self.metrics.get("protocol", {})
        reference = protocol.get("reference") or {}
        return (*(protocol.get(key) for key in PROTOCOL_KEYS), reference.get("sha256") or reference.get("spec"))


def collect_runs(roots: Iterable[Path]) -> list[RunRecord]:
    """Every dir under `roots` holding results.json and/or metrics.json, one record per evaluation."""
    found = {p.parent: Path(root) for root in reversed(list(roots)) for name in ("results.json", "metrics.json")
             for p in Path(root).rglob(name)}
    records = []
    for directory, root in sorted(found.items()):
        metrics = read_json_object(directory / "metrics.json", "metrics file") if (directory / "metrics.json").is_file() else {}
        results = read_json_object(directory / "results.json", "results file") if (directory / "results.json").is_file() else {}
        method = metrics.get("method") or results.get("method")
        if method is None:
            raise UserError(f"{directory}: neither metrics.json nor results.json names the method")
        weight_bits = metrics.get("weight_bits", results.get("weight_bits"))
        act_bits = metrics.get("act_bits", results.get("act_bits"))
        label = str(directory.relative_to(root)) if directory != root else directory.name
        records.append(RunRecord(directory, label, str(method), weight_bits, act_bits, metrics, results))
    # a run dir's metrics.json is a copy of its eval dir's: keep the copy that sits beside results.json
    by_evaluation: dict[str, RunRecord] = {}
    unique = []
    for record in sorted(records, key=lambda r: not r.results):
        evaluation = record.metrics.get("evaluation_id")
        if evaluation is not None and evaluation in by_evaluation:
            continue
        if evaluation is not None:
            by_evaluation[evaluation] = record
        unique.append(record)
    return sorted(unique, key=lambda r: str(r.directory))


def _method_rank(method: str) -> tuple[int, str]:
    return (METHOD_ORDER.index(method) if method in METHOD_ORDER else len(METHOD_ORDER), method)


def _latest(records: Sequence[RunRecord]) -> RunRecord:
    """The most recent evaluation among duplicates of one (method, bits) cell."""
    return max(records, key=lambda r: (r.metrics.get("protocol", {}).get("date") or "", str(r.directory)))


def _format(value: float | None) -> str:
    if value is None:
        return "—"
    return f"{value:.2f}" if abs(value) >= 0.1 else f"{value:.4f}"


def build_table(records: Sequence[RunRecord]) -> tuple[list[str], list[str], dict[tuple[str, str], RunRecord]]:
    """(methods in report order, bit settings by (weight bits, act bits), cell -> record) of the quantized runs."""
    quantized = [r for r in records if r.method != "fp"]
    settings = sorted({(r.weight_bits, r.act_bits) for r in quantized}, key=lambda wa: (wa[0] or 0, wa[1] or 0))
    bit_names = [f"W{w}A{a}" for w, a in settings]
    methods = sorted({r.method for r in quantized}, key=_method_rank)
    cells: dict[tuple[str, str], RunRecord] = {}
    for method in methods:
        for bits in bit_names:
            candidates = [r for r in quantized if r.method == method and r.bits == bits]
            if candidates:
                cells[(method, bits)] = _latest(candidates)
    return methods, bit_names, cells


def render_markdown(records: Sequence[RunRecord], metric: str, plot_name: str | None) -> str:
    """The report: headline table of `metric`, PSNR vs FP table, protocol, notes, and every run's numbers."""
    fp = [r for r in records if r.method == "fp"]
    fp_record = _latest(fp) if fp else None
    methods, bit_names, cells = build_table(records)
    evaluated = [r for r in records if r.metrics]
    protocols = {r.protocol() for r in evaluated}
    lines = [f"# Ablation: {metric} by method and bit-width", ""]
    if evaluated:
        protocol = _latest(evaluated).metrics.get("protocol", {})
        reference = protocol.get("reference") or {}
        lines += [
            f"Protocol: backend **{protocol.get('backend')}** ({protocol.get('feature_network')}), "
            f"N = {protocol.get('num_samples')}, reference: {reference.get('source')} "
            f"({reference.get('count')} images), sampler {protocol.get('sampler')} {protocol.get('steps')} steps, "
            f"eta {protocol.get('eta')}, {protocol.get('spacing')} spacing, guidance {protocol.get('guidance_scale')}, "
            f"seed {protocol.get('seed')}, code {(protocol.get('code_version') or {}).get('git_commit')}.",
            "",
        ]
        if metric in protocol:
            lines += [f"{metric}: {protocol[metric]}.", ""]
    if len(protocols) > 1:
        lines += [f"**Warning: these runs were evaluated under {len(protocols)} different protocols "
                  f"({', '.join(PROTOCOL_KEYS)}, reference); their numbers are not comparable.**", ""]
    direction = "lower" if LOWER_IS_BETTER.get(metric, True) else "higher"
    if fp_record is not None:
        lines += [f"Full-precision model: {metric} = {_format(fp_record.value(metric))} "
                  f"({fp_record.label}).", ""]
    lines += [f"{metric} ({direction} is better):", "", "| method | " + " | ".join(bit_names) + " |",
              "|---|" + "---|" * len(bit_names)]
    for method in methods:
        row = [_cell(cells[(method, b)], metric) if (method, b) in cells else "—" for b in bit_names]
        lines.append(f"| {method} | " + " | ".join(row) + " |")
    if metric != "psnr_vs_fp":
        lines += ["", "PSNR vs FP, dB (same noise; higher is better):", "",
                  "| method | " + " | ".join(bit_names) + " |", "|---|" + "---|" * len(bit_names)]
        for method in methods:
            row = [_cell(cells[(method, b)], "psnr_vs_fp") if (method, b) in cells else "—" for b in bit_names]
            lines.append(f"| {method} | " + " | ".join(row) + " |")
    if plot_name:
        lines += ["", f"![{metric} vs bits]({plot_name})"]
    lines += ["", "## All runs", "",
              "| run dir | method | bits | FID | sFID | IS | PSNR vs FP | SSIM vs FP | N | train s |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for record in sorted(records, key=lambda r: (_method_rank(r.method), r.weight_bits or 0, r.act_bits or 0)):
        lines.append(
            f"| {record.label} | {record.method} | {record.bits} | {_format(record.value('fid'))} | "
            f"{_format(record.value('sfid'))} | {_format(record.value('is'))} | {_cell(record, 'psnr_vs_fp')} | "
            f"{_format(record.value('ssim_vs_fp'))} | {record.metrics.get('num_samples', '—')} | "
            f"{record.results.get('train_seconds', '—')} |"
        )
    if any(r.from_training(m) for r in records for m in ("psnr_vs_fp", "mse_vs_fp")):
        lines += ["", f"{TRAINING_MARK} train.py's figure on its fixed fidelity batch (results.json), not an "
                  "evaluation's: the run has no metrics.json yet."]
    missing = [r for r in records if not r.metrics]
    if missing:
        lines += ["", "Not evaluated yet (run `python evaluate.py run=DIR`): "
                  + ", ".join(r.label for r in missing)]
    return "\n".join(lines) + "\n"


def _cell(record: RunRecord, metric: str) -> str:
    return _format(record.value(metric)) + (TRAINING_MARK if record.from_training(metric) else "")


def plot(records: Sequence[RunRecord], metric: str, path: Path) -> None:
    """`metric` vs bit setting, one line per method, the FP model as a dashed line; written as PNG."""
    try:
        import matplotlib

        matplotlib.use("Agg")  # no display on servers and CI
        import matplotlib.pyplot as plt
    except ImportError as err:
        raise ImportError("the ablation plot needs matplotlib: pip install -r requirements-dev.txt") from err
    methods, bit_names, cells = build_table(records)
    figure, axes = plt.subplots(figsize=(6.4, 4.2), dpi=120)
    positions = range(len(bit_names))
    values_seen: list[float] = []
    for method in methods:
        values = [cells[(method, b)].value(metric) if (method, b) in cells else None for b in bit_names]
        points = [(x, v) for x, v in zip(positions, values) if v is not None]
        if points:
            axes.plot([x for x, _ in points], [v for _, v in points], marker="o", label=method)
            values_seen += [v for _, v in points]
    fp = [r for r in records if r.method == "fp" and r.value(metric) is not None]
    if fp:
        fp_value = _latest(fp).value(metric)
        axes.axhline(fp_value, color="black", linestyle="--", linewidth=1, label="FP")
        values_seen.append(fp_value)
    positive = [v for v in values_seen if v > 0]
    if positive and max(positive) / min(positive) > 20:
        axes.set_yscale("log")  # PTQ at 4 bits can be orders of magnitude worse than the rest
    axes.set_xticks(list(positions), bit_names)
    axes.set_xlabel("bit-width (weights / activations)")
    axes.set_ylabel(metric)
    protocol = _latest([r for r in records if r.metrics]).metrics.get("protocol", {}) if any(
        r.metrics for r in records) else {}
    axes.set_title(f"{metric} vs bits ({protocol.get('backend', '?')} backend, N = {protocol.get('num_samples', '?')})")
    axes.grid(True, alpha=0.3)
    axes.legend(fontsize=8)
    figure.tight_layout()
    atomic_write(path, lambda tmp: figure.savefig(tmp, format="png"))
    plt.close(figure)


def write_report(roots: Sequence[Path], out_dir: Path, metric: str = "fid", with_plot: bool = True) -> Path:
    """Collect the runs under `roots`, write report.md (and <metric>_vs_bits.png) into out_dir; return the .md path."""
    records = collect_runs(roots)
    if not records:
        raise UserError(f"no results.json or metrics.json found under {[str(r) for r in roots]}")
    plot_name = f"{metric}_vs_bits.png" if with_plot else None
    if plot_name:
        plot(records, metric, out_dir / plot_name)
    text = render_markdown(records, metric, plot_name)
    path = out_dir / "report.md"
    atomic_write(path, lambda tmp: Path(tmp).write_text(text))
    return path


@cli.entry
def main(argv: list[str]) -> None:
    parser = cli.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("sweep_dir", type=Path, help="a dir of train.py run dirs (e.g. a multirun sweep dir)")
    parser.add_argument("--fp", type=Path, action="append", default=[], help="FP evaluation dir(s) outside the sweep")
    parser.add_argument("--metric", default="fid", help="table and plot metric: fid, sfid, is, psnr_vs_fp, ...")
    parser.add_argument("--out", type=Path, default=None, help="output dir (default: the sweep dir)")
    parser.add_argument("--no-plot", action="store_true")
    args = parser.parse_args(argv)
    if not args.sweep_dir.is_dir():
        raise MissingFileError(f"sweep dir {args.sweep_dir} does not exist")
    path = write_report([args.sweep_dir, *args.fp], args.out or args.sweep_dir, args.metric, not args.no_plot)
    print(path.read_text())
    print(f"report -> {path}")


if __name__ == "__main__":
    main()
