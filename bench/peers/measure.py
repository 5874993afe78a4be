"""The five measures of the peers benchmark, on one :class:`~bench.peers.setting.PeerSetting`.

1. cost: wall time and peak memory to score every training pair (:func:`score_methods`);
2. detection against planted corruptions: AUROC, AP, P@50 (:func:`detection`);
3. leave-one-out fidelity against actual retraining (:func:`leave_one_out`);
4. linear datamodeling score over random half-subsets (:func:`linear_datamodeling`);
5. cleaning: test metric after removing the top 10% by each method and re-fine-tuning (:func:`cleaning`).

"Retrain" is always ``finetune_heads(reduced_problem(problem, removed), θ̂, config)``: warm start
from ``θ̂``, remaining pairs renormalised, gradient tolerance ``tolerance`` (as bench/fidelity_selected.py).

Peak memory: the process's peak resident set (``VmHWM``) is reset before each method by writing
``5`` to ``/proc/self/clear_refs`` (Linux ≥ 4.0) and read after it; reported as ``VmHWM − VmRSS``
at the start, i.e. the extra resident memory the method needed at its peak (torch tensors
included, which ``tracemalloc`` does not see).  Where ``clear_refs`` is not writable, the
``ru_maxrss`` delta is reported instead (a lower bound: 0 unless the method set a new process peak).
"""

from __future__ import annotations

import dataclasses
import re
import resource
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from bench.peers.adapters import METHODS
from bench.peers.setting import PeerSetting

# --- time and memory -----------------------------------------------------------------------------------


def _status_kib(field: str) -> int | None:
    try:
        match = re.search(rf"{field}:\s+(\d+)", Path("/proc/self/status").read_text())
    except OSError:
        return None
    return int(match.group(1)) if match else None


def _reset_peak() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def measured(function: Callable[[], object]) -> tuple[object, float, float, str]:
    """``(result, seconds, peak extra MiB, how memory was measured)``."""
    start_rss = _status_kib("VmRSS")
    if start_rss is not None and _reset_peak():
        how = "VmHWM − VmRSS (clear_refs reset)"
        before = start_rss
    else:
        how = "ru_maxrss delta"
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    started = time.perf_counter()
    result = function()
    seconds = time.perf_counter() - started
    after = _status_kib("VmHWM") if how.startswith("VmHWM") else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return result, seconds, max(0, (after or 0) - before) / 1024.0, how


# --- scoring -------------------------------------------------------------------------------------------


def score_methods(setting: PeerSetting, names: list[str], options: dict[str, dict] | None = None,
                  log: Callable[[str], None] = print) -> dict[str, dict]:
    """Every method's per-pair scores with its wall time and peak memory (and the [T, N] matrix of
    TRAK / kronfluence, which they compute anyway; the ECIF/TracIn matrices are built by :func:`matrices`).

    ECIF's curvature solver (the run's stored dense factor, or a fresh dense Hessian for a toy) is
    built once, timed as its own row (``ecif_curvature``), and shared by the ECIF methods.
    """
    options = options or {}
    out: dict[str, dict] = {}
    if any(METHODS[n].uses_solver for n in names if n in METHODS):
        solver, seconds, peak, how = measured(lambda: setting.solver)
        out["ecif_curvature"] = {"seconds": seconds, "peak_mib": peak, "memory": how,
                                 "note": setting.info.get("curvature_source", "solver built once, shared by the ECIF rows")}
        log(f"ECIF curvature ready in {seconds:.1f}s")
    for name in names:
        method = METHODS[name]
        ok, why = method.available()
        if not ok:
            out[name] = {"error": f"not run: {why}"}
            log(f"{name}: {why}")
            continue
        kwargs = dict(options.get(name, {}))
        if method.uses_solver:
            kwargs["solver"] = setting.solver
        native_matrix = name in ("trak", "kronfluence")

        def call(method=method, kwargs=kwargs, native_matrix=native_matrix):
            if native_matrix:
                matrix = method.matrix(setting.problem, setting.theta, setting.validation, **kwargs)
                return matrix.mean(axis=0), matrix
            return method.score(setting.problem, setting.theta, setting.validation, **kwargs), None

        try:
            (scores, matrix), seconds, peak, how = measured(call)
        except Exception as error:  # one broken peer must not lose the others
            out[name] = {"error": f"{type(error).__name__}: {error}", "traceback": traceback.format_exc()}
            log(f"{name} FAILED: {type(error).__name__}: {error}")
            continue
        out[name] = {"scores": np.asarray(scores, dtype=float), "seconds": seconds, "peak_mib": peak, "memory": how}
        if matrix is not None:
            out[name]["matrix"] = matrix
        log(f"{name}: {seconds:.2f}s, peak +{peak:.0f} MiB")
    return out


def matrices(setting: PeerSetting, results: dict[str, dict]) -> dict[str, np.ndarray]:
    """``[T, N]`` per-target estimates of every influence-type method that ran (for LDS)."""
    out = {}
    for name, result in results.items():
        method = METHODS.get(name)
        if method is None or method.kind != "influence" or "scores" not in result:
            continue
        if "matrix" in result:
            out[name] = result["matrix"]
        elif method.matrix is not None:
            kwargs = {"solver": setting.solver} if method.uses_solver else {}
            out[name] = method.matrix(setting.problem, setting.theta, setting.validation, **kwargs)
    return out


# --- detection ------------------------------------------------------------------------------------------


def detection(setting: PeerSetting, results: dict[str, dict], k: int = 50) -> list[dict]:
    """AUROC, AP, P@k of each method's suspicion (``Method.suspicion``) against the planted flags.

    (``ecif.tasks.detect.detection_report`` computes the same metrics, but only for the score
    columns it knows in ``SUSPICION``; the peers' columns are oriented here by the registry.)
    """
    from sklearn.metrics import average_precision_score, roc_auc_score

    labels = np.asarray(setting.corrupted, dtype=bool)
    rows = []
    for name, result in results.items():
        if name not in METHODS or "scores" not in result:
            continue
        oriented = METHODS[name].suspicion(result["scores"])
        order = np.argsort(-oriented, kind="stable")
        rows.append({"method": name, "auroc": float(roc_auc_score(labels, oriented)),
                     "average_precision": float(average_precision_score(labels, oriented)),
                     f"precision@{k}": float(labels[order[:k]].mean()), "base_rate": float(labels.mean())})
    return rows


# --- retraining-based measures ------------------------------------------------------------------------------


def retrain(setting: PeerSetting, drop_rows, tolerance: float) -> tuple[torch.Tensor, dict]:
    from ecif.influence.scores import reduced_problem
    from ecif.finetune import finetune_heads

    config = dataclasses.replace(setting.finetune, gradient_tolerance=tolerance)
    started = time.perf_counter()
    theta, report = finetune_heads(reduced_problem(setting.problem, list(map(int, drop_rows))), setting.theta, config)
    return theta, {"gradient_norm": report.gradient_norm, "converged": report.converged,
                   "seconds": time.perf_counter() - started}


def _correlations(predicted, actual) -> tuple[float, float]:
    from scipy.stats import pearsonr, spearmanr

    predicted, actual = np.asarray(predicted, float), np.asarray(actual, float)
    if len(actual) < 3 or np.ptp(predicted) == 0 or np.ptp(actual) == 0:
        return float("nan"), float("nan")
    return float(pearsonr(predicted, actual)[0]), float(spearmanr(predicted, actual)[0])


def leave_one_out(setting: PeerSetting, results: dict[str, dict], removals: int, tolerance: float, seed: int = 0,
                  log: Callable[[str], None] = print) -> dict:
    """Pearson/Spearman of each influence-type score against the actual Δφ of single-pair removals.

    Sampling as bench/fidelity_selected.py: half uniformly from the 10% most harmful pairs by exact ECIF
    (or by the first available influence method), half uniformly from the rest.
    """
    n = setting.problem.data.n_pairs
    reference = next((results[m]["scores"] for m in ("ecif_exact", "pos_only", "tracin") if "scores" in results.get(m, {})), None)
    rng = np.random.default_rng(seed)
    if reference is None:
        rows = rng.choice(n, size=min(removals, n), replace=False)
    else:
        order = np.argsort(reference, kind="stable")
        harmful = order[: max(1, n // 10)]
        first = rng.choice(harmful, size=min(removals // 2, len(harmful)), replace=False)
        rest = np.setdiff1d(np.arange(n), first)
        rows = np.concatenate([first, rng.choice(rest, size=min(removals - len(first), len(rest)), replace=False)])
    base = setting.phi(setting.theta)
    actual, reports = [], []
    for position, row in enumerate(rows, start=1):
        theta, report = retrain(setting, [row], tolerance)
        actual.append(setting.phi(theta) - base)
        reports.append(report)
        if position % 5 == 0 or position == len(rows):
            log(f"LOO {position}/{len(rows)}")
    actual = np.asarray(actual)
    table = []
    for name, result in results.items():
        if name in METHODS and METHODS[name].kind == "influence" and "scores" in result:
            pearson, spearman = _correlations(result["scores"][rows], actual)
            table.append({"method": name, "pearson": pearson, "spearman": spearman})
    return {"rows": rows.tolist(), "actual": actual.tolist(), "table": table,
            "retrain_gradient_norm_max": float(max(r["gradient_norm"] for r in reports)),
            "retrain_seconds_median": float(np.median([r["seconds"] for r in reports]))}


def target_losses(setting: PeerSetting, theta: torch.Tensor) -> np.ndarray:
    """``φ_j(θ)`` ``[T]``: each validation pair's own terms in its validation batch (``φ = mean``)."""
    from ecif.objective.contrastive import pair_losses

    with torch.no_grad():
        return pair_losses(setting.problem.scope, theta, setting.validation).numpy()


def linear_datamodeling(setting: PeerSetting, results: dict[str, dict], mats: dict[str, np.ndarray], subsets: int,
                        tolerance: float, fraction: float = 0.5, seed: int = 0, log: Callable[[str], None] = print) -> dict:
    """Linear datamodeling score (Park et al. 2023), removal form.

    Protocol: ``subsets`` random subsets ``S_m`` of ``fraction·N`` training pairs are *kept* (drawn
    uniformly without replacement, seed ``seed``); for each, the heads are re-fine-tuned on ``S_m``
    (warm start from ``θ̂``, renormalised objective, gradient tolerance ``tolerance``) and every
    target's loss ``φ_j`` (the validation pairs) is measured.  A method's prediction for subset ``m``
    and target ``j`` is the additive ``Σ_{n∉S_m} A[j, n]`` (its estimates of the change when each removed
    pair leaves; the base value and the renormalisation shift are the same for every subset of that
    size and do not change a correlation).  LDS = Spearman over subsets, averaged over targets; also
    the Spearman for the aggregate ``φ`` (prediction ``Σ_{n∉S_m} score_n``).  Diagnostics without a
    per-target matrix (self-influence, CLIP-score, loss) get the aggregate column only, with their
    suspicion negated as the additive "score" (suspicious = predicted to lower φ when removed).
    """
    from scipy.stats import spearmanr

    n = setting.problem.data.n_pairs
    keep = int(round(fraction * n))
    rng = np.random.default_rng(seed + 1000)
    removed_masks, actual_targets, actual_phi = [], [], []
    for m in range(subsets):
        kept = rng.choice(n, size=keep, replace=False)
        removed = np.setdiff1d(np.arange(n), kept)
        theta, _ = retrain(setting, removed, tolerance)
        mask = np.zeros(n, dtype=bool)
        mask[removed] = True
        removed_masks.append(mask)
        actual_targets.append(target_losses(setting, theta))
        actual_phi.append(setting.phi(theta))
        if (m + 1) % 5 == 0 or m + 1 == subsets:
            log(f"LDS subsets {m + 1}/{subsets}")
    masks = np.asarray(removed_masks, dtype=float)  # [M, N]
    actual_targets = np.asarray(actual_targets)  # [M, T]
    table = []
    for name, result in results.items():
        if name not in METHODS or "scores" not in result:
            continue
        method = METHODS[name]
        additive = result["scores"] if method.kind == "influence" else -method.suspicion(result["scores"])
        phi_spearman = float(spearmanr(masks @ additive, actual_phi)[0])
        row = {"method": name, "lds": float("nan"), "lds_std_over_targets": float("nan"), "phi_spearman": phi_spearman}
        if name in mats:
            predicted = masks @ mats[name].T  # [M, T]
            per_target = [spearmanr(predicted[:, j], actual_targets[:, j])[0] for j in range(actual_targets.shape[1])]
            per_target = np.asarray(per_target, dtype=float)
            row["lds"], row["lds_std_over_targets"] = float(np.nanmean(per_target)), float(np.nanstd(per_target))
        table.append(row)
    return {"subsets": subsets, "kept_fraction": fraction, "targets": int(actual_targets.shape[1]), "table": table}


def cleaning(setting: PeerSetting, results: dict[str, dict], fraction: float, tolerance: float, seed: int = 0,
             log: Callable[[str], None] = print) -> dict:
    """Test metric and φ after removing the ``fraction`` most suspicious pairs by each method and
    re-fine-tuning (warm start), against nothing removed and a random ``fraction``."""
    n = setting.problem.data.n_pairs
    k = max(1, int(round(fraction * n)))
    labels = None if setting.corrupted is None else np.asarray(setting.corrupted, dtype=bool)
    rows = [{"method": "nothing removed", "removed": 0, "corrupted_removed": 0,
             "test_metric": setting.test_metric(setting.theta), "phi": setting.phi(setting.theta), "seconds": 0.0}]
    choices = [("random", np.random.default_rng(seed + 7).choice(n, size=k, replace=False))]
    for name, result in results.items():
        if name in METHODS and "scores" in result:
            choices.append((name, np.argsort(-METHODS[name].suspicion(result["scores"]), kind="stable")[:k]))
    for name, drop in choices:
        theta, report = retrain(setting, drop, tolerance)
        rows.append({"method": name, "removed": int(k),
                     "corrupted_removed": int(labels[drop].sum()) if labels is not None else None,
                     "test_metric": setting.test_metric(theta), "phi": setting.phi(theta), "seconds": report["seconds"]})
        log(f"cleaning: {name} done")
    return {"fraction": fraction, "table": rows}
