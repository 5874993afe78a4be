"""Inverse-curvature solvers behind one interface (ECIF_METHOD §5).

Every solver answers ``(C + λI)⁻¹ v`` for the curvature ``C`` of ``R`` at ``θ̂`` (exact Hessian or
Gauss–Newton, both including the ``δ`` penalty) and damping ``λ``:

- :class:`DenseSolver`: the assembled matrix and its Cholesky factor; the reference for the others
  (a few thousand to ~16k parameters).
- :class:`ConjugateGradientSolver`: matrix-free, one curvature-vector product per iteration.
- :class:`KroneckerSolver`: eigenvalue-corrected K-FAC (EK-FAC) of the Gauss–Newton matrix of each
  projection head; memory ``O(d² + e² + d·e)``, so it scales to ViT-B/32 heads (0.66M parameters).

``solve`` accepts ``[P]`` or ``[k, P]``; ``inverse_quadratic`` returns ``vᵀ(C + λI)⁻¹v`` per row.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Literal, Protocol

import torch
from torch import Tensor

from ecif.curvature.products import CurvatureKind, curvature_product, dense_curvature, smallest_eigenvalue
from ecif.influence.objective import HeadsProblem, embed
from ecif.progress import Reporter, as_reporter

SolverName = Literal["auto", "dense", "cg", "ekfac"]


@dataclass
class CurvatureConfig:
    """How to invert the curvature.

    ``damping`` (λ) is added on top of ``δ``; at a well-conditioned minimum the Hessian is already
    positive definite and a small λ only guards round-off (bench/fidelity measures the effect).
    ``solver="auto"`` takes the dense reference up to ``dense_max_params`` parameters and EK-FAC above.
    """

    solver: SolverName = "auto"
    kind: CurvatureKind = "hessian"
    damping: float = 1e-4
    dense_max_params: int = 16384
    cg_tolerance: float = 1e-10
    cg_max_iterations: int = 1000

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, settings: Mapping[str, object]) -> CurvatureConfig:
        """The config recorded in a run.json; settings that later versions retired are ignored."""
        known = {item.name for item in fields(cls)}
        return cls(**{key: value for key, value in settings.items() if key in known})


class CurvatureSolver(Protocol):
    name: str

    def solve(self, vectors: Tensor) -> Tensor:
        """``(C + λI)⁻¹ v`` for ``v [P]`` or each row of ``v [k, P]``."""
        ...

    def inverse_quadratic(self, vectors: Tensor) -> Tensor:
        """``vᵀ (C + λI)⁻¹ v`` for each row of ``vectors [k, P]`` → ``[k]``."""
        ...

    def describe(self) -> dict:
        """Facts worth recording in run.json (solver, sizes, smallest eigenvalue when known)."""
        ...


class CurvatureNotPositiveDefinite(RuntimeError):
    """The damped curvature has a non-positive eigenvalue; the influence estimate would be meaningless."""


class DenseSolver:
    """Explicit ``(C + λI)`` with a Cholesky factor (the reference solver)."""

    name = "dense"
    _matrix: Tensor | None = None

    def __init__(self, matrix: Tensor, damping: float, kind: CurvatureKind = "hessian"):
        size = matrix.shape[0]
        self.kind = kind
        self.damping = damping
        self.matrix = matrix + damping * torch.eye(size, dtype=matrix.dtype)
        factor, info = torch.linalg.cholesky_ex(self.matrix)
        if int(info) != 0:
            smallest = float(torch.linalg.eigvalsh(self.matrix)[0]) if size <= 4096 else float("nan")
            raise CurvatureNotPositiveDefinite(
                f"the damped {kind} is not positive definite (smallest eigenvalue {smallest:.3g}); "
                "fine-tune to convergence, raise the damping, or use the Gauss-Newton curvature"
            )
        self.factor = factor
        self.smallest_eigenvalue = self._smallest_eigenvalue()

    @classmethod
    def from_factor(cls, factor: Tensor, damping: float, kind: CurvatureKind, smallest_eigenvalue: float) -> DenseSolver:
        """A solver from a stored Cholesky factor (see :func:`save_solver`)."""
        solver = cls.__new__(cls)
        solver.kind, solver.damping, solver.factor = kind, damping, factor
        solver.smallest_eigenvalue = smallest_eigenvalue
        return solver

    @property
    def matrix(self) -> Tensor:
        """``C + λI`` (rebuilt from the factor when the solver was loaded from disk)."""
        if self._matrix is None:
            self._matrix = self.factor @ self.factor.T
        return self._matrix

    @matrix.setter
    def matrix(self, value: Tensor) -> None:
        self._matrix = value

    def _smallest_eigenvalue(self, iterations: int = 50) -> float:
        """Exact for small matrices; else a Rayleigh quotient after inverse iteration with the
        Cholesky factor (cheap; an upper bound, close when the smallest eigenvalue is isolated)."""
        if self.matrix.shape[0] <= 4096:
            return float(torch.linalg.eigvalsh(self.matrix)[0])
        vector = torch.randn(self.matrix.shape[0], dtype=self.matrix.dtype, generator=torch.Generator().manual_seed(0))
        for _ in range(iterations):
            vector = self.solve(vector)
            vector = vector / vector.norm()
        return float(vector @ self.matrix @ vector)

    def solve(self, vectors: Tensor) -> Tensor:
        columns = vectors.reshape(-1, vectors.shape[-1]).T
        return torch.cholesky_solve(columns, self.factor).T.reshape(vectors.shape)

    def inverse_quadratic(self, vectors: Tensor) -> Tensor:
        whitened = torch.linalg.solve_triangular(self.factor, vectors.T, upper=False)
        return (whitened**2).sum(dim=0)

    def describe(self) -> dict:
        return {
            "solver": self.name,
            "kind": self.kind,
            "damping": self.damping,
            "parameters": int(self.factor.shape[0]),
            "smallest_eigenvalue": self.smallest_eigenvalue,
        }


class ConjugateGradientSolver:
    """Matrix-free conjugate gradient with curvature-vector products, many right-hand sides at once."""

    name = "cg"

    def __init__(
        self,
        problem: HeadsProblem,
        theta: Tensor,
        damping: float,
        kind: CurvatureKind = "hessian",
        tolerance: float = 1e-10,
        max_iterations: int = 1000,
    ):
        base = curvature_product(problem, theta, kind)
        self.product = torch.func.vmap(lambda vector: base(vector) + damping * vector)
        self.size = theta.numel()
        self.kind, self.damping = kind, damping
        self.tolerance, self.max_iterations = tolerance, max_iterations
        self.last_iterations = 0

    def solve(self, vectors: Tensor) -> Tensor:
        rhs = vectors.reshape(-1, self.size)
        solution = torch.zeros_like(rhs)
        residual = rhs.clone()
        direction = residual.clone()
        residual_norm = (residual * residual).sum(dim=1)
        target = self.tolerance**2 * torch.clamp((rhs * rhs).sum(dim=1), min=1e-300)
        for iteration in range(1, self.max_iterations + 1):
            active = residual_norm > target
            if not bool(active.any()):
                break
            curved = self.product(direction)
            curvature = (direction * curved).sum(dim=1)
            if bool((curvature[active] <= 0).any()):
                raise CurvatureNotPositiveDefinite(
                    f"conjugate gradient met negative curvature ({self.kind}, damping {self.damping}); "
                    "raise the damping or use the Gauss-Newton curvature"
                )
            step = torch.where(active, residual_norm / torch.where(active, curvature, 1.0), 0.0)
            solution = solution + step[:, None] * direction
            residual = residual - step[:, None] * curved
            new_norm = (residual * residual).sum(dim=1)
            ratio = torch.where(active, new_norm / torch.clamp(residual_norm, min=1e-300), 0.0)
            direction = residual + ratio[:, None] * direction
            residual_norm = new_norm
            self.last_iterations = iteration
        return solution.reshape(vectors.shape)

    def inverse_quadratic(self, vectors: Tensor) -> Tensor:
        return (vectors * self.solve(vectors)).sum(dim=-1)

    def describe(self) -> dict:
        return {
            "solver": self.name,
            "kind": self.kind,
            "damping": self.damping,
            "parameters": self.size,
            "tolerance": self.tolerance,
            "last_iterations": self.last_iterations,
        }


def _per_pair_embedding_curvature(
    anchors: Tensor, others: Tensor, pre_norms: Tensor, scale: Tensor, own_rows: Tensor, cross_cols: Tensor
) -> Tensor:
    """Gauss–Newton block ``M_kk [B, e, e]`` of each pair's pre-normalisation embedding.

    For image ``k``: ``c² Vᵀ(diag(p_k) − p_k p_kᵀ + diag(q_k∘(1−q_k)))V`` from its row softmax ``p_k``
    and its entries ``q_k`` in every column softmax, pulled back through ``normalize``'s Jacobian
    ``(I − u uᵀ)/‖z‖``.  Cross-pair blocks are what K-FAC drops.
    """
    weights = own_rows + cross_cols * (1.0 - cross_cols)  # [B, B]
    weighted = torch.einsum("kj,je,jf->kef", weights, others, others)
    mean_direction = own_rows @ others  # [B, e]
    output_hessian = scale**2 * (weighted - mean_direction[:, :, None] * mean_direction[:, None, :])
    eye = torch.eye(anchors.shape[1], dtype=anchors.dtype)
    jacobian = (eye - anchors[:, :, None] * anchors[:, None, :]) / pre_norms[:, None, None]
    return jacobian @ output_hessian @ jacobian


class KroneckerSolver:
    """EK-FAC for the two projection heads: per head ``A ⊗ G`` eigenbases with corrected eigenvalues.

    ``A = E[h hᵀ]`` (backbone features), ``G = E[M_kk]`` (per-pair Gauss–Newton of the embedding);
    the eigenvalues in the Kronecker eigenbasis are refitted to ``E[(Q_Aᵀh)² ⊗ diag(Q_Gᵀ M_kk Q_G)]``
    (George et al., 2018).  The ``δ`` penalty and ``λ`` are added exactly.  A learnt logit scale gets
    its exact second derivative as a separate 1×1 block.
    """

    name = "ekfac"

    def __init__(self, problem: HeadsProblem, theta: Tensor, damping: float, reporter: Reporter | None = None):
        reporter = as_reporter(reporter)
        scope = problem.scope
        self.scope, self.damping, self.delta = scope, damping, problem.delta
        blocks = self._accumulate(problem, theta, reporter, bases=None)
        self.bases = {name: (torch.linalg.eigh(a)[1], torch.linalg.eigh(g)[1]) for name, (a, g, _) in blocks.items()}
        corrected = self._accumulate(problem, theta, reporter, bases=self.bases)
        self.eigenvalues = {name: lam for name, (_, _, lam) in corrected.items()}
        self.scale_curvature = None
        if scope.learn_logit_scale:
            index = scope.size - 1
            self.scale_curvature = float(
                torch.func.hessian(lambda value: problem.objective(torch.cat([theta[:index], value.reshape(1)])))(
                    theta[index]
                )
            ) + damping
        self.smallest_eigenvalue = min(float(v.min()) for v in self.eigenvalues.values()) + problem.delta + damping

    def _accumulate(self, problem: HeadsProblem, theta: Tensor, reporter: Reporter, bases: dict | None) -> dict:
        scope, data = problem.scope, problem.data
        w_image, w_text, _ = scope.split(theta)
        sums: dict[str, list] = {}
        stage = "curvature (EK-FAC factors)" if bases is None else "curvature (EK-FAC eigenvalues)"
        with torch.no_grad():
            for position in reporter.iterate(range(len(data.batches)), stage):
                batch = data.batches[position]
                image, text = data.image[batch], data.text[batch]
                u, v, scale = embed(scope, theta, image, text)
                logits = scale * (u @ v.T)
                rows = torch.softmax(logits, dim=1)
                cols = torch.softmax(logits, dim=0)
                per_modality = {
                    "image": (image, _per_pair_embedding_curvature(u, v, (image @ w_image).norm(dim=1), scale, rows, cols)),
                    "text": (text, _per_pair_embedding_curvature(v, u, (text @ w_text).norm(dim=1), scale, cols.T, rows.T)),
                }
                for name, (features, blocks) in per_modality.items():
                    if bases is None:
                        entry = sums.setdefault(name, [0.0, 0.0, None])
                        entry[0] = entry[0] + features.T @ features
                        entry[1] = entry[1] + blocks.sum(dim=0)
                    else:
                        basis_a, basis_g = bases[name]
                        projected_features = (features @ basis_a) ** 2  # [B, d]
                        projected_blocks = torch.einsum("ei,kef,fi->ki", basis_g, blocks, basis_g)  # [B, e]
                        entry = sums.setdefault(name, [None, None, 0.0])
                        entry[2] = entry[2] + projected_features.T @ projected_blocks
        n = data.normaliser
        return {
            name: tuple(None if value is None else value / n for value in entry) for name, entry in sums.items()
        }

    def _split(self, vectors: Tensor) -> tuple[Tensor, Tensor, Tensor | None]:
        scope = self.scope
        n_image = scope.image_dim * scope.embed_dim
        n_text = scope.text_dim * scope.embed_dim
        image = vectors[:, :n_image].reshape(-1, scope.image_dim, scope.embed_dim)
        text = vectors[:, n_image : n_image + n_text].reshape(-1, scope.text_dim, scope.embed_dim)
        scale = vectors[:, n_image + n_text :] if scope.learn_logit_scale else None
        return image, text, scale

    def _whitened(self, vectors: Tensor) -> list[Tensor]:
        """Coordinates of each block in its eigenbasis divided by the square root of its eigenvalue."""
        image, text, scale = self._split(vectors.reshape(-1, self.scope.size))
        parts = []
        for name, block in (("image", image), ("text", text)):
            basis_a, basis_g = self.bases[name]
            rotated = basis_a.T @ block @ basis_g
            parts.append(rotated / torch.sqrt(self.eigenvalues[name] + self.delta + self.damping))
        if scale is not None:
            parts.append(scale / math.sqrt(self.scale_curvature))
        return parts

    def solve(self, vectors: Tensor) -> Tensor:
        image, text, scale = self._split(vectors.reshape(-1, self.scope.size))
        solved = []
        for name, block in (("image", image), ("text", text)):
            basis_a, basis_g = self.bases[name]
            rotated = basis_a.T @ block @ basis_g / (self.eigenvalues[name] + self.delta + self.damping)
            solved.append((basis_a @ rotated @ basis_g.T).reshape(block.shape[0], -1))
        if scale is not None:
            solved.append(scale / self.scale_curvature)
        return torch.cat(solved, dim=1).reshape(vectors.shape)

    def inverse_quadratic(self, vectors: Tensor) -> Tensor:
        return sum((part**2).reshape(part.shape[0], -1).sum(dim=1) for part in self._whitened(vectors))

    def describe(self) -> dict:
        return {
            "solver": self.name,
            "kind": "ggn (EK-FAC)",
            "damping": self.damping,
            "parameters": self.scope.size,
            "smallest_eigenvalue": self.smallest_eigenvalue,
        }


def build_solver(
    problem: HeadsProblem, theta: Tensor, config: CurvatureConfig | None = None, reporter: Reporter | None = None
) -> CurvatureSolver:
    """The solver that ``config`` asks for (``auto``: dense up to ``dense_max_params``, else EK-FAC)."""
    config = config or CurvatureConfig()
    reporter = as_reporter(reporter)
    name = config.solver
    if name == "auto":
        name = "dense" if theta.numel() <= config.dense_max_params else "ekfac"
    if name == "dense":
        matrix = dense_curvature(problem, theta, config.kind, reporter)
        return DenseSolver(matrix, config.damping, config.kind)
    if name == "cg":
        return ConjugateGradientSolver(
            problem, theta, config.damping, config.kind, config.cg_tolerance, config.cg_max_iterations
        )
    if name == "ekfac":
        return KroneckerSolver(problem, theta, config.damping, reporter)
    raise ValueError(f"unknown solver {name!r}; expected one of auto, dense, cg, ekfac")


def lanczos_smallest_eigenvalue(problem: HeadsProblem, theta: Tensor, kind: CurvatureKind = "hessian") -> float:
    """Smallest eigenvalue of the undamped curvature by Lanczos (for the fine-tuning report)."""
    return smallest_eigenvalue(curvature_product(problem, theta, kind), theta.numel(), theta.dtype)


def save_solver(solver: CurvatureSolver, path: Path, fingerprint: str) -> bool:
    """Store a factorised solver so a new process reuses it (dense factor or EK-FAC factors).

    ``fingerprint`` identifies the problem and settings; :func:`load_solver` refuses a mismatch.
    Returns False for solvers with nothing worth storing (conjugate gradient).
    """
    from safetensors.torch import save_file

    if isinstance(solver, DenseSolver):
        tensors = {"factor": solver.factor.contiguous()}
        extra = {"kind": solver.kind, "smallest_eigenvalue": repr(solver.smallest_eigenvalue)}
    elif isinstance(solver, KroneckerSolver):
        tensors = {}
        for name, (basis_a, basis_g) in solver.bases.items():
            tensors[f"{name}.basis_a"] = basis_a.contiguous()
            tensors[f"{name}.basis_g"] = basis_g.contiguous()
            tensors[f"{name}.eigenvalues"] = solver.eigenvalues[name].contiguous()
        extra = {
            "delta": repr(solver.delta),
            "scale_curvature": repr(solver.scale_curvature),
            "smallest_eigenvalue": repr(solver.smallest_eigenvalue),
            "scope": json.dumps(asdict(solver.scope)),
        }
    else:
        return False
    metadata = {"solver": solver.name, "damping": repr(solver.damping), "fingerprint": fingerprint, **extra}
    temporary = path.with_name(f".{path.name}.tmp")
    save_file(tensors, str(temporary), metadata=metadata)
    temporary.replace(path)
    return True


def load_solver(path: Path, fingerprint: str) -> CurvatureSolver | None:
    """The solver stored by :func:`save_solver`, or None when absent or made for another problem."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    if not path.exists():
        return None
    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata()
    if metadata.get("fingerprint") != fingerprint:
        return None
    tensors = load_file(str(path))
    damping = float(metadata["damping"])
    if metadata["solver"] == DenseSolver.name:
        return DenseSolver.from_factor(tensors["factor"], damping, metadata["kind"], float(metadata["smallest_eigenvalue"]))
    from ecif.influence.objective import HeadsScope

    solver = KroneckerSolver.__new__(KroneckerSolver)
    solver.scope = HeadsScope(**json.loads(metadata["scope"]))
    solver.damping, solver.delta = damping, float(metadata["delta"])
    names = ("image", "text")
    solver.bases = {n: (tensors[f"{n}.basis_a"], tensors[f"{n}.basis_g"]) for n in names}
    solver.eigenvalues = {n: tensors[f"{n}.eigenvalues"] for n in names}
    scale = metadata["scale_curvature"]
    solver.scale_curvature = None if scale == "None" else float(scale)
    solver.smallest_eigenvalue = float(metadata["smallest_eigenvalue"])
    return solver
