"""The fidelity report over seeds: train.py runs grouped by configuration (every override but the seed),
each figure as mean ± std over the seeds, with BKD's wall time beside it.

    python train.py -m seed=0,1,2 method=ptq_minmax,tpq_minmax,dilatequant quant=w4a4,w6a6
    python -m dq.evaluation.sweep --fidelity multirun/<date>/<time> [more dirs] --out docs/sweep

A run's configuration is read from its `.hydra/overrides.yaml` (written by Hydra in every run dir): the
overrides minus `seed=` and `hydra.*` name the row, so that the 3 seeds of one point land in one row.
The figures are those of results.json (train.py's fidelity check: FP and student from the same noise,
`fidelity.num_samples` images, noise seed 1234 + seed): PSNR, SSIM, MSE against the FP samples and the
kernel distance (KID) of the student's samples to the teacher's on the digit classifier's features.

Where a run dir also holds evaluate.py's metrics.json (`python -m dq.evaluation.sweep --seeded`), its
domain FID (against the real data's reference statistics) is a column of its own, and the FP model's
evaluations (metrics.json with method "fp", one per seed) make the FP row. The report names the
evaluation protocol of that column and says so when the runs' protocols differ.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from dq.errors import UserError
from dq.io import atomic_write, read_json_object
from dq.metrics.kernel import KID_PROTOCOL

FIGURES = (  # (results.json key, column title, scale, digits, higher is better)
    ("psnr_vs_fp", "PSNR vs FP (dB)", 1.0, 2, True),  # the mean of per-image PSNRs (the headline)
    ("psnr_median_vs_fp", "median PSNR (dB)", 1.0, 2, True),  # the median per-image PSNR
    ("psnr_mse_vs_fp", "PSNR of the MSE (dB)", 1.0, 2, True),  # 10·log10(1/mse): follows the mean error
    ("ssim_vs_fp", "SSIM vs FP", 1.0, 4, True),
    ("mse_vs_fp", "MSE vs FP (×1e-3)", 1e3, 3, False),
    ("kid_vs_fp", "KID vs FP (×1e-3)", 1e3, 2, False),
    ("fid", "domain FID", 1.0, 2, False),  # evaluate.py's metrics.json in the run dir, where evaluated
)
FID_PROTOCOL_KEYS = ("backend", "num_samples", "sampler", "steps", "spacing", "eta")
IGNORED_OVERRIDES = ("seed=", "hydra.", "progress_bar=", "output_dir=")


@dataclass
class SeedGroup:
    """The runs of one configuration, one per seed."""

    label: str
    method: str
    bits: str
    runs: list[dict[str, Any]] = field(default_factory=list)
    seeds: list[int] = field(default_factory=list)

    def values(self, key: str) -> list[float]:
        runs = self.runs
        if key == "kid_vs_fp":  # only the paired estimator's figure (earlier runs' is biased below zero)
            runs = [r for r in runs if (r.get("fidelity_protocol") or {}).get("kid") == KID_PROTOCOL]
        if key == "psnr_mse_vs_fp":  # a function of mse_vs_fp: derived for runs that predate the figure
            runs = [r if isinstance(r.get(key), (int, float)) or not isinstance(r.get("mse_vs_fp"), (int, float))
                    else {**r, key: 10 * math.log10(1.0 / r["mse_vs_fp"])} for r in runs]
        return [float(r[key]) for r in runs if isinstance(r.get(key), (int, float))]

    def stats(self, key: str) -> tuple[float, float, int] | None:
        """(mean, sample std, n) of a figure over the seeds; std is 0 for one seed."""
        values = self.values(key)
        if not values:
            return None
        mean = sum(values) / len(values)
        std = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else 0.0
        return mean, std, len(values)

    def prep_share(self) -> float | None:
        """Block preparation (caches + initialisation) as a share of train_seconds, mean over seeds."""
        shares = []
        for run in self.runs:
            prep, total = run.get("prep_seconds"), run.get("train_seconds")
            if isinstance(prep, dict) and total:
                shares.append(sum(prep.values()) / float(total))
        return sum(shares) / len(shares) if shares else None


def run_overrides(run_dir: Path) -> list[str]:
    """The command-line overrides of a run (Hydra's .hydra/overrides.yaml), minus the seed and hydra.*."""
    path = run_dir / ".hydra" / "overrides.yaml"
    if not path.is_file():
        return []
    items = OmegaConf.to_container(OmegaConf.load(path))
    return sorted(str(o) for o in items if not str(o).startswith(IGNORED_OVERRIDES))


def run_seed(run_dir: Path, results: dict[str, Any]) -> int | None:
    path = run_dir / "config.yaml"
    if path.is_file():
        seed = OmegaConf.load(path).get("seed")
        return int(seed) if seed is not None else None
    return results.get("seed")


def _with_evaluation(results: dict[str, Any], run_dir: Path) -> dict[str, Any]:
    """results.json plus the domain FID (and its protocol) of the run's metrics.json, if evaluated."""
    path = run_dir / "metrics.json"
    if not path.is_file():
        return results
    metrics = read_json_object(path, "metrics file")
    return {**results, "fid": metrics.get("fid"), "fid_protocol": metrics.get("protocol") or {}}


def _fp_evaluations(root: Path) -> list[tuple[int | None, dict[str, Any]]]:
    """(seed, figures) of every FP evaluation under root: metrics.json with method fp, no results.json beside."""
    found = []
    for path in sorted(Path(root).rglob("metrics.json")):
        if (path.parent / "results.json").is_file():
            continue
        metrics = read_json_object(path, "metrics file")
        if metrics.get("method") == "fp":
            protocol = metrics.get("protocol") or {}
            found.append((protocol.get("seed"), {"fid": metrics.get("fid"), "fid_protocol": protocol}))
    return found


def fid_protocols(groups: Sequence[SeedGroup]) -> set[tuple]:
    """The distinct evaluation protocols (backend, N, sampler, ...) behind the domain FID column."""
    return {tuple(str(r["fid_protocol"].get(k)) for k in FID_PROTOCOL_KEYS)
            for g in groups for r in g.runs if isinstance(r.get("fid"), (int, float))}


def collect_groups(roots: Iterable[Path]) -> list[SeedGroup]:
    """Every complete train.py run under roots (results.json with complete: true), grouped by configuration,
    and the FP model's evaluations (one group, bits "FP") where there are any."""
    groups: dict[str, SeedGroup] = {}
    fp = SeedGroup("(the FP model)", "fp", "FP")
    for root in roots:
        for seed, figures in _fp_evaluations(Path(root)):
            if seed not in fp.seeds:
                fp.runs.append(figures)
                fp.seeds.append(seed)
        for path in sorted(Path(root).rglob("results.json")):
            results = read_json_object(path)
            if not results.get("complete"):
                continue
            run_dir = path.parent
            results = _with_evaluation(results, run_dir)
            overrides = run_overrides(run_dir)
            label = " ".join(overrides) or "(defaults)"
            bits = f"W{results.get('weight_bits')}A{results.get('act_bits')}"
            key = f"{results.get('method')}|{bits}|{label}"
            group = groups.setdefault(key, SeedGroup(label, str(results.get("method")), bits))
            seed = run_seed(run_dir, results)
            if seed in group.seeds:  # the same point and seed twice (a rerun): keep the newer one
                index = group.seeds.index(seed)
                group.runs[index], group.seeds[index] = results, seed
                continue
            group.runs.append(results)
            group.seeds.append(seed)
    ordered = sorted(groups.values(), key=lambda g: (g.bits, g.method, g.label))
    return ([fp] if fp.runs else []) + ordered


def _cell(stats: tuple[float, float, int] | None, scale: float, digits: int) -> str:
    if stats is None:
        return "–"
    mean, std, n = stats
    return f"{mean * scale:.{digits}f} ± {std * scale:.{digits}f}" if n > 1 else f"{mean * scale:.{digits}f} (1 seed)"


def render(groups: Sequence[SeedGroup], plot_name: str | None) -> str:
    """report.md: one row per configuration, mean ± std over its seeds, best mean per bit-width in bold."""
    lines = ["# Fidelity to the FP model over seeds", "",
             "Each row: one configuration; each cell: mean ± sample std over the seeds listed. Figures from "
             "each run's results.json (FP and student sampled from the same noise). BKD s: train.py's "
             "train_seconds (calibration load, block preparation and training); prep: the share of it "
             "spent building block caches and initialising.", ""]
    header = ["bits", "method", "overrides", "seeds", *[title for _, title, *_ in FIGURES], "BKD s", "prep"]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    best = _best_per_bits(groups)
    for g in groups:
        cells = []
        for key, _, scale, digits, _higher in FIGURES:
            stats = g.stats(key)
            text = _cell(stats, scale, digits)
            if stats is not None and 1 < stats[2] < len(g.seeds):  # not every seed has this figure
                text += f" ({stats[2]} seeds)"
            cells.append(f"**{text}**" if best.get((g.bits, key)) is g else text)
        wall = g.stats("train_seconds")
        share = g.prep_share()
        lines.append("| " + " | ".join([
            g.bits, g.method, f"`{g.label}`", ",".join(str(s) for s in g.seeds), *cells,
            f"{wall[0]:.0f}" if wall else "–", f"{share:.0%}" if share is not None else "–",
        ]) + " |")
    protocols = fid_protocols(groups)
    if protocols:
        names = "; ".join(", ".join(f"{k} {v}" for k, v in zip(FID_PROTOCOL_KEYS, p)) for p in sorted(protocols))
        lines += ["", f"Domain FID: evaluate.py against the real data's reference statistics, each run with its "
                  f"own seed's noise ({names})."]
        if len(protocols) > 1:
            lines.append("**The domain FID column mixes evaluation protocols: its rows are not comparable.**")
    if plot_name:
        lines += ["", f"![PSNR vs FP per configuration]({plot_name})"]
    return "\n".join(lines) + "\n"


def _best_per_bits(groups: Sequence[SeedGroup]) -> dict[tuple[str, str], SeedGroup]:
    """Per (bit-width, figure), the configuration with the best mean (the FIGURES direction)."""
    best: dict[tuple[str, str], SeedGroup] = {}
    for key, _, _, _, higher in FIGURES:
        for bits in {g.bits for g in groups} - {"FP"}:  # the FP row is the reference, not a contender
            scored = [(g.stats(key)[0], g) for g in groups if g.bits == bits and g.stats(key) is not None]
            if scored:
                pick = max if higher else min
                best[(bits, key)] = pick(scored, key=lambda item: item[0])[1]
    return best


def plot(groups: Sequence[SeedGroup], path: Path, key: str = "psnr_vs_fp") -> None:
    """Mean ± std of one figure per configuration, grouped by bit-width, as a horizontal bar chart."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as err:
        raise ImportError("the sweep plot needs matplotlib: pip install -r requirements-dev.txt") from err
    rows = [(g, g.stats(key)) for g in groups if g.stats(key) is not None]
    figure, axes = plt.subplots(figsize=(8, 0.35 * len(rows) + 1.5), dpi=120)
    labels = [f"{g.bits} {g.method} {g.label if g.label != '(defaults)' else ''}"[:70] for g, _ in rows]
    axes.barh(range(len(rows)), [s[0] for _, s in rows], xerr=[s[1] for _, s in rows], capsize=3)
    axes.set_yticks(range(len(rows)), labels, fontsize=7)
    axes.invert_yaxis()
    low = min(s[0] - s[1] for _, s in rows)
    axes.set_xlim(left=max(0.0, low - 2.0))
    axes.set_xlabel(f"{key} (mean ± std over seeds)")
    axes.grid(True, axis="x", alpha=0.3)
    figure.tight_layout()
    atomic_write(path, lambda tmp: figure.savefig(tmp, format="png"))
    plt.close(figure)


def write_seed_report(roots: Sequence[Path], out_dir: Path, with_plot: bool = True) -> Path:
    """Group the runs under roots, write report.md (and psnr_over_seeds.png) into out_dir; the .md path."""
    groups = collect_groups(roots)
    if not groups:
        raise UserError(f"no complete train.py results.json under {[str(r) for r in roots]}")
    out_dir.mkdir(parents=True, exist_ok=True)
    plot_name = "psnr_over_seeds.png" if with_plot else None
    if plot_name:
        plot(groups, out_dir / plot_name)
    path = out_dir / "report.md"
    text = render(groups, plot_name)
    atomic_write(path, lambda tmp: Path(tmp).write_text(text))
    return path
