"""Every setting of a scoring run, in one place: :class:`RunConfig` and its parts.

The pipeline records ``RunConfig.settings()`` in ``run.json`` and compares it on resume; the engine,
the command line (its defaults and choices) and the app read these classes instead of restating
them.  Only the standard library is imported here, so every layer of ecif may depend on it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Literal

#: The two curvatures of ``R`` at ``θ̂`` a solver may invert (docs/method.md §5).
CurvatureKind = Literal["hessian", "ggn"]

AUTO_DELTA = "auto"
DELTA_GRID = (3.0, 1.0, 0.3, 0.1, 0.03, 0.01)

#: The contrastive losses ``R`` can be built on (docs/method.md §1): CLIP's softmax cross-entropy
#: (``"clip"``) and SigLIP's pairwise sigmoid with a logit bias (``"siglip"``).
Loss = Literal["clip", "siglip"]
LOSSES: tuple[Loss, ...] = ("clip", "siglip")
#: ``FinetuneConfig.loss`` default: the model's own loss (``"siglip"`` for an open_clip model with a
#: ``logit_bias``, else ``"clip"``; the demo model is trained with ``"clip"``).
AUTO_LOSS = "auto"


@dataclass
class FinetuneConfig:
    """Settings of the heads fine-tuning.

    ``delta`` is the penalty ``δ`` towards the starting heads ``θ₀``: a number, or ``"auto"`` (the
    default) to choose it on held-out trusted data (:func:`ecif.finetune.select_delta`): fine-tune at every δ of
    ``delta_grid`` (largest first, each warm-started from the previous minimiser), keep the δ whose
    fine-tune reached a well-conditioned minimiser, and take the one with the lowest contrastive loss
    on ``selection_fraction`` of the trusted split (drawn with ``selection_seed``).  Influence is then
    measured on the rest of the trusted split only, so the δ was not chosen on the data it is judged on.
    Each grid point may spend ``sweep_lbfgs_iterations`` and a ``sweep_check_products``-product
    eigenvalue check; the chosen δ gets the full check.  Too weak a penalty lets projected features
    collapse towards the origin, where ``normalize`` is singular and no minimiser is reached; too
    strong a one keeps the heads at ``θ₀`` and leaves the curvature ≈ ``δ·I``, where influence says
    little about the data.

    ``blocks`` widens the influence scope from the heads to the heads plus the last ``blocks``
    transformer blocks of each tower (:mod:`ecif.objective.blocks`); 0 keeps the heads only.

    ``loss`` is the contrastive loss of ``R`` (:data:`LOSSES`), or ``"auto"``: the model's own
    (:func:`ecif.models.scope.model_loss`).  With the demo model it is also the loss the demo CLIP is
    trained with (``"auto"``: ``"clip"``).
    """

    delta: float | str = AUTO_DELTA
    delta_grid: tuple[float, ...] = DELTA_GRID
    selection_fraction: float = 0.5
    selection_seed: int = 0
    blocks: int = 0
    batch_size: int = 64
    batch_seed: int = 0
    learn_logit_scale: bool = False
    loss: str = AUTO_LOSS
    gradient_tolerance: float = 1e-7
    max_lbfgs_iterations: int = 3000
    newton_steps: int = 5
    newton_start_gradient: float = 1e-3
    min_prenorm_warning: float = 1e-2
    curvature_check_products: int | None = None
    sweep_check_products: int = 60
    sweep_lbfgs_iterations: int = 500

    def __post_init__(self) -> None:
        self.delta = parse_delta(self.delta)
        self.delta_grid = tuple(sorted((float(value) for value in self.delta_grid), reverse=True))
        if not self.delta_grid or min(self.delta_grid) <= 0:
            raise ValueError(f"delta_grid must hold positive penalties, got {self.delta_grid}")
        if not 0 < self.selection_fraction < 1:
            raise ValueError(f"selection_fraction must lie strictly between 0 and 1, got {self.selection_fraction}")
        if self.loss not in (AUTO_LOSS, *LOSSES):
            raise ValueError(f"loss must be {AUTO_LOSS!r} or one of {', '.join(LOSSES)}, got {self.loss!r}")

    @property
    def demo_loss(self) -> Loss:
        """The loss the demo model is trained with: ``loss``, with ``"auto"`` meaning CLIP's."""
        return "clip" if self.loss == AUTO_LOSS else self.loss  # type: ignore[return-value]

    @property
    def auto_delta(self) -> bool:
        return self.delta == AUTO_DELTA

    def check_products(self, heads_scope: bool) -> int:
        """Curvature-vector products the smallest-eigenvalue check may spend (Lanczos).

        ``curvature_check_products`` when set; by default 800 for the heads scope and 100 for the
        blocks scope, where each product is a pass through the blocks over the whole training set
        (measured 0.16 s for 128 demo pairs; linear in N).  Fewer products leave the estimate an upper bound: a negative
        value still proves the curvature indefinite, and a later conjugate gradient reports one it meets.
        """
        if self.curvature_check_products is not None:
            return self.curvature_check_products
        return 800 if heads_scope else 100

    def to_dict(self) -> dict:
        return asdict(self)


AUTO_DEVICE = "auto"
#: The accepted forms of the ``device`` setting (``cuda:N``: the GPU of index N), as help texts list them.
DEVICE_FORMS = (AUTO_DEVICE, "cpu", "cuda", "cuda:N")


def parse_device(value: str) -> str:
    """The ``device`` setting in its canonical form (``auto``, ``cpu``, ``cuda`` or ``cuda:N``).

    Only the form is checked here; whether this machine has the device is
    :func:`ecif.devices.resolve_device`'s question.
    """
    text = str(value).strip().lower()
    kind, colon, index = text.partition(":")
    if text in (AUTO_DEVICE, "cpu", "cuda") or (kind == "cuda" and colon and index.isdigit()):
        return f"cuda:{int(index)}" if colon else text
    raise ValueError(f"device must be one of {', '.join(DEVICE_FORMS)} (N a GPU index, e.g. cuda:1), got {value!r}")


def parse_delta(value: float | str) -> float | str:
    """``"auto"`` or a positive penalty (a number or its text, as the command line gives it)."""
    if isinstance(value, str) and value.strip().lower() == AUTO_DELTA:
        return AUTO_DELTA
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"delta must be 'auto' or a positive number, got {value!r}") from None
    if not math.isfinite(number) or number <= 0:
        raise ValueError(f"delta must be 'auto' or a positive number, got {value!r}")
    return number


@dataclass
class CurvatureConfig:
    """How to invert the curvature.

    ``damping`` (λ) is added on top of ``δ``; at a well-conditioned minimum the Hessian is already
    positive definite and a small λ only guards round-off (bench/fidelity_selected.py measures the effect).
    ``solver="auto"`` takes ``"ekfac-cg"`` for the heads scope (exact influence at any size, in a
    second on the demo where the dense reference takes 30 s to assemble; ``"dense"`` on request) and,
    for the blocks scope, the dense reference up to ``dense_max_params`` parameters and
    ``"lowrank-cg"`` (``low_rank`` eigenpairs) above.
    ``"ekfac-cg"`` solves exactly (to ``cg_tolerance``) by conjugate gradient preconditioned with the
    EK-FAC: influence on a test function as the dense solver gives it, at tens of passes of
    curvature products over the data per test function (see :class:`RefinedSolver`).
    """

    solver: str = "auto"
    kind: CurvatureKind = "hessian"
    damping: float = 1e-4
    dense_max_params: int = 16384
    cg_tolerance: float = 1e-10
    cg_max_iterations: int = 1000
    low_rank: int = 64

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, settings: Mapping[str, object]) -> CurvatureConfig:
        """The config recorded in a run.json; settings that later versions retired are ignored."""
        known = {item.name for item in fields(cls)}
        return cls(**{key: value for key, value in settings.items() if key in known})


@dataclass
class DemoDataConfig:
    """The built-in demo data set generated when no manifest is given."""

    name: str = "shapes"
    n: int = 3000
    noise: float = 0.1
    corruption: str = "random-caption"
    seed: int = 0


@dataclass
class RunConfig:
    """Everything that defines a scoring run.

    ``manifest=None`` generates the built-in demo data inside the run folder.  ``model="demo"``
    trains the small ``ecif-demo`` open_clip model on the manifest's train split (cached); any
    other open_clip model name needs a local ``checkpoint`` (or an already-cached ``pretrained`` tag);
    ``tokenizer`` is a local tokenizer folder for a model whose tokenizer open_clip would fetch from
    the Hugging Face hub (SigLIP, Hugging Face text towers; without it, the local Hugging Face cache).
    ``trusted_split`` is the clean validation set the influence is measured on; ``test_split`` is
    scanned for mispredictions.

    ``device`` is where the work runs (:data:`DEVICE_FORMS`, resolved by
    :func:`ecif.devices.resolve_device`).  It is not one of :meth:`settings`: every device writes the
    same files (the maths is float64 everywhere), so a run started on a GPU resumes on the CPU;
    run.json's ``device`` (and each stage's) records the device actually used.
    """

    run_dir: Path
    manifest: Path | None = None
    model: str = "demo"
    checkpoint: Path | None = None
    pretrained: str | None = None
    tokenizer: Path | None = None
    trusted_split: str = "val"
    test_split: str = "test"
    demo: DemoDataConfig = field(default_factory=DemoDataConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    curvature: CurvatureConfig = field(default_factory=CurvatureConfig)
    device: str = AUTO_DEVICE

    def __post_init__(self) -> None:
        self.device = parse_device(self.device)

    def settings(self) -> dict[str, Any]:
        """The settings that determine the results (recorded in run.json, compared on resume)."""
        return {
            "manifest": str(self.manifest) if self.manifest else None,
            "model": self.model,
            "checkpoint": str(self.checkpoint) if self.checkpoint else None,
            "pretrained": self.pretrained,
            "tokenizer": str(self.tokenizer) if self.tokenizer else None,
            "trusted_split": self.trusted_split,
            "test_split": self.test_split,
            "demo": asdict(self.demo) if self.manifest is None else None,
            "finetune": self.finetune.to_dict(),
            "curvature": self.curvature.to_dict(),
        }

    @classmethod
    def from_settings(cls, run_dir: Path, settings: dict[str, Any]) -> RunConfig:
        return cls(
            run_dir=Path(run_dir),
            manifest=Path(settings["manifest"]) if settings.get("manifest") else None,
            model=settings.get("model", "demo"),
            checkpoint=Path(settings["checkpoint"]) if settings.get("checkpoint") else None,
            pretrained=settings.get("pretrained"),
            tokenizer=Path(settings["tokenizer"]) if settings.get("tokenizer") else None,
            trusted_split=settings.get("trusted_split", "val"),
            test_split=settings.get("test_split", "test"),
            demo=DemoDataConfig(**(settings.get("demo") or {})),
            finetune=FinetuneConfig(**settings.get("finetune", {})),
            curvature=CurvatureConfig.from_dict(settings.get("curvature", {})),
        )


@dataclass
class StreamingConfig:
    """Settings of streamed scoring.

    ``batch_size``/``seed``: the reference batching within each shard.  ``delta`` (δ of ``R``) and
    ``damping`` (λ) enter the EK-FAC exactly.  ``self_influence``: also ``∇g_nᵀH⁻¹∇g_n`` per pair,
    in both forms of :data:`SELF_INFLUENCE_COLUMNS` (a Jacobian ``[B, P]`` per batch and form, ``B``
    backward passes: far costlier than ``influence``, which is one forward-mode pass).

    ``gradient_tolerance``: the largest ``‖∇R(θ̂)‖`` (absolute, Euclidean over all ``P`` parameters)
    accepted as "θ̂ is a minimiser of the ``R`` being scored".  Default ``1e-4``: fine-tuning stops
    at ``1e-7`` and calls itself converged below ``1e-5``
    (:class:`ecif.config.FinetuneConfig`), so converged heads pass with room for heads stored
    in float32 and for the store's summation order, while heads fine-tuned on anything else fail by
    orders of magnitude.  Measured on the 400-pair, ``P = 132`` problem of the tests (δ = 1,
    batches of 25 in 3 shards): converged heads ``3e-14``, the same rounded to float32 ``3e-7``,
    moved by ``1e-3`` per coordinate ``1.6e-2``, the starting heads ``θ̂ = θ₀`` ``2.9``, and heads
    converged on the same pairs but one whole-set batching instead of the per-shard one ``0.29``
    (the reference batching is part of ``R``).  Near a positive-definite minimum a gradient ``g``
    leaves ``θ̂`` about ``‖H⁻¹g‖ ≲ ‖g‖/δ`` from the minimiser, which changes every pair's ``Δθ_n``
    by a relative ``O(‖g‖/δ)`` (so the tolerance need not shrink with ``N``): with ``δ = 1``,
    ``1e-4`` is far below what the EK-FAC approximation changes.  The relative value
    ``‖∇R‖ / ‖(1/N)∇Σ(a+b)‖`` is recorded next to it but not used to decide: when the minimiser lies
    close to ``θ₀`` (a strong penalty, or starting heads that already fit the pairs) its denominator
    ``= δ‖θ̂ − θ₀‖`` is itself small.
    ``allow_unconverged``: score anyway when the check fails (or when no ``θ₀`` was given to check
    with), with the measurement and a warning in the result, instead of raising :class:`NotAMinimiser`.
    Neither setting changes a score, so neither is part of an output folder's fingerprint.
    """

    batch_size: int = 64
    seed: int = 0
    delta: float = 1.0
    damping: float = 1e-4
    self_influence: bool = False
    gradient_tolerance: float = 1e-4
    allow_unconverged: bool = False
