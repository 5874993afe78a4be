"""Curvature-vector products of ``R`` (docs/method.md §5): exact Hessian and Gauss–Newton.

Both are matrix-free: ``product(problem, theta)`` returns a function ``v [P] → C v [P]`` that also
works under ``torch.func.vmap`` (many vectors at once), which is how the dense matrix is assembled.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor
from torch.func import grad, jvp, vjp, vmap

from ecif.config import CurvatureKind, Loss
from ecif.objective.contrastive import (
    ContrastiveProblem,
    HeadsScope,
    chunk_logits,
    logits_from_projections,
    mask_logits,
    positive_terms,
)
from ecif.objective.logits import learnt_logit_count
from ecif.progress import Reporter, as_reporter

Product = Callable[[Tensor], Tensor]


def hessian_product(problem: ContrastiveProblem, theta: Tensor) -> Product:
    """``v ↦ ∇²R(θ) v`` by forward-over-reverse differentiation (exact, possibly indefinite)."""
    gradient = grad(problem.objective)

    def product(vector: Tensor) -> Tensor:
        return jvp(gradient, (theta,), (vector,))[1]

    return product


def _logit_hessian_product(logits: Tensor, tangent: Tensor, loss: Loss = "clip") -> Tensor:
    """Hessian of a batch's loss with respect to masked logits ``S``, applied to ``dS``.

    Softmax, ``Σ_i (lse_row_i + lse_col_i)``: each row (and column) softmax cross-entropy has Hessian
    ``diag(p) − p pᵀ``; ``−2 S_ii`` is linear.  Sigmoid, ``Σ_ij −log σ(y_ij S_ij)``: diagonal in ``S``,
    ``σ(S_ij) σ(−S_ij)`` whatever the label.  Padded entries have probability exactly 0, so they
    contribute nothing.
    """
    if loss == "siglip":
        probabilities = torch.sigmoid(logits)
        return probabilities * (1.0 - probabilities) * tangent
    rows = torch.softmax(logits, dim=-1)
    cols = torch.softmax(logits, dim=-2)
    row_part = rows * tangent - rows * (rows * tangent).sum(dim=-1, keepdim=True)
    col_part = cols * tangent - cols * (cols * tangent).sum(dim=-2, keepdim=True)
    return row_part + col_part


def gauss_newton_product(problem: ContrastiveProblem, theta: Tensor) -> Product:
    """``v ↦ (Jᵀ ∇²_S L J + δI) v`` with ``J = ∂S/∂θ`` per batch: positive semi-definite (+δ)."""
    scope, data = problem.scope, problem.data

    def product(vector: Tensor) -> Tensor:
        total = problem.delta * vector
        for chunk in data.chunks():

            def logits_of(parameters: Tensor, chunk: slice = chunk) -> Tensor:
                logits, mask = chunk_logits(scope, parameters, data, chunk)
                return mask_logits(logits, mask)

            logits, tangent = jvp(logits_of, (theta,), (vector,))
            _, pullback = vjp(logits_of, theta)
            total = total + pullback(_logit_hessian_product(logits, tangent, scope.loss))[0] / data.normaliser
        return total

    return product


def curvature_product(problem: ContrastiveProblem, theta: Tensor, kind: CurvatureKind = "hessian") -> Product:
    if kind == "hessian":
        return hessian_product(problem, theta)
    if kind == "ggn":
        return gauss_newton_product(problem, theta)
    raise ValueError(f"unknown curvature kind {kind!r}; expected 'hessian' or 'ggn'")


def dense_curvature(
    problem: ContrastiveProblem,
    theta: Tensor,
    kind: CurvatureKind = "hessian",
    reporter: Reporter | None = None,
) -> Tensor:
    """The full ``[P, P]`` curvature matrix of ``R`` at ``θ`` (symmetric, ``δI`` included).

    Assembled one reference batch at a time in embedding space, which is far cheaper than ``P``
    curvature-vector products through the heads: a batch's loss depends on ``θ`` only through the
    pre-normalisation projections ``z = h W`` ``[B, e]`` of both modalities (and ``ℓ``), so its
    curvature is ``Gᵀ C_z G`` with ``C_z`` the curvature in ``z`` (closed form, see
    :func:`_embedding_curvature`; the learnt scale's row is one curvature-vector product) and
    ``G = ∂z/∂θ = h ⊗ I``, applied as two feature contractions.  A learnt logit scale together with a
    learnt bias (sigmoid loss) has no closed-form rows here: that scope is assembled by products.
    """
    if kind not in ("hessian", "ggn"):
        raise ValueError(f"unknown curvature kind {kind!r}; expected 'hessian' or 'ggn'")
    reporter = as_reporter(reporter)
    scope, data = problem.scope, problem.data
    if not isinstance(scope, HeadsScope) or learnt_logit_count(scope) > 1:
        return _dense_by_products(problem, theta, kind, reporter)
    log_scale, bias = scope.log_scale(theta), scope.bias(theta)
    embed_dim, size = scope.embed_dim, theta.numel()
    widths = (scope.image_dim, scope.text_dim)
    offsets = np.cumsum([0, widths[0] * embed_dim, widths[1] * embed_dim])
    parts = [slice(offsets[a], offsets[a + 1]) for a in range(2)]
    matrix = torch.zeros(size, size, dtype=theta.dtype, device=theta.device)
    for position, rows in enumerate(data.batches):
        batch = len(rows)
        image, text = data.image[rows], data.text[rows]
        z_image, z_text = scope.project_image(theta, image), scope.project_text(theta, text)
        features = (scope.image_inputs(image), scope.text_inputs(text))  # without any fixed offset
        blocks = _embedding_curvature(z_image, z_text, log_scale, kind, bias)
        for (a, b), block in zip(((0, 0), (0, 1), (1, 1)), blocks):
            # [i, e, j, e'] → contract j with h_b, then i with h_a, as two large matrix products
            right = block.permute(0, 1, 3, 2).reshape(-1, batch) @ features[b]  # [i·e·e', d_b]
            right = right.reshape(batch, embed_dim, embed_dim, widths[b]).permute(0, 1, 3, 2).reshape(batch, -1)
            matrix[parts[a], parts[b]] += (features[a].T @ right).reshape(widths[a] * embed_dim, -1)
        if scope.learn_logit_scale:  # softmax only (see above)
            column = _scale_column(z_image, z_text, log_scale, kind)
            halves = column[:-1].reshape(2, batch, embed_dim)
            for a in range(2):
                matrix[parts[a], -1] += (features[a].T @ halves[a]).reshape(-1)
            matrix[-1, -1] += column[-1]
        reporter.report("curvature (dense)", position + 1, len(data.batches))
    matrix[parts[1], parts[0]] = matrix[parts[0], parts[1]].T
    if scope.learn_logit_scale:
        matrix[-1, :-1] = matrix[:-1, -1]
    matrix /= data.normaliser
    matrix.diagonal().add_(problem.delta)
    return 0.5 * (matrix + matrix.T)


def _dense_by_products(problem: ContrastiveProblem, theta: Tensor, kind: CurvatureKind, reporter: Reporter, columns: int = 64) -> Tensor:
    """The curvature matrix as ``P`` curvature-vector products, ``columns`` at a time (any scope; the
    reference for small blocks scopes, where no closed form in embedding space applies)."""
    product = vmap(curvature_product(problem, theta, kind))
    size = theta.numel()
    identity = torch.eye(size, dtype=theta.dtype, device=theta.device)
    parts = []
    for start in range(0, size, columns):
        parts.append(product(identity[start : start + columns]))
        reporter.report("curvature (dense)", min(start + columns, size), size)
    matrix = torch.cat(parts)
    return 0.5 * (matrix + matrix.T)


def _scale_column(z_image: Tensor, z_text: Tensor, log_scale: Tensor, kind: CurvatureKind) -> Tensor:
    """Column ``[2Be+1]`` of one batch's curvature in ``(z_image, z_text, ℓ)`` that belongs to ``ℓ``."""
    batch, embed_dim = z_image.shape
    flat = torch.cat([z_image.reshape(-1), z_text.reshape(-1), log_scale.reshape(1)])
    direction = torch.zeros_like(flat)
    direction[-1] = 1.0

    def logits_of(values: Tensor) -> Tensor:
        image = values[: batch * embed_dim].reshape(batch, embed_dim)
        text = values[batch * embed_dim : 2 * batch * embed_dim].reshape(batch, embed_dim)
        return logits_from_projections(image, text, values[-1])

    if kind == "hessian":
        return jvp(grad(lambda values: positive_terms(logits_of(values)).sum()), (flat,), (direction,))[1]
    logits, tangent = jvp(logits_of, (flat,), (direction,))
    return vjp(logits_of, flat)[1](_logit_hessian_product(logits, tangent))[0]


def _embedding_curvature(
    z_image: Tensor, z_text: Tensor, log_scale: Tensor, kind: CurvatureKind, bias: Tensor | None = None
) -> tuple[Tensor, Tensor, Tensor]:
    """Curvature of one batch's loss in its projections: the image–image, image–text and text–text
    blocks, each ``[B, e, B, e]``; softmax, or sigmoid with logit bias ``bias`` when it is given.

    Closed form, because ``vmap`` over ``2Be`` curvature-vector products costs seconds per batch.
    Softmax, ``Σ_i (a_i + b_i)``: with ``S = s·U Vᵀ``, row softmax ``P``, column softmax ``Q`` and
    ``G = ∂L/∂S = P + Q − 2I``, the curvature in the unit embeddings ``(U, V)`` has blocks
    (``m_i = Σ_j P_ij v_j``, ``n_j = Σ_i Q_ij u_i``)

    - ``UU[i,k] = s²(δ_ik (Σ_j (P_ij + Q_ij) v_j v_jᵀ − m_i m_iᵀ) − Σ_j Q_ij Q_kj v_j v_jᵀ)``, ``VV`` alike;
    - ``UV[i,j] = s²(P_ij (v_j − m_i) u_iᵀ + Q_ij v_j (u_i − n_j)ᵀ) + s·G_ij I`` (the last term: Hessian only).

    Sigmoid, ``Σ_ij −log σ(y_ij S_ij)`` with ``S = s·U Vᵀ + b``: the curvature in ``S`` is diagonal,
    ``ω_ij = σ(S_ij) σ(−S_ij)``, and ``G = σ(S) − I``, so

    - ``UU[i,k] = s² δ_ik Σ_j ω_ij v_j v_jᵀ``, ``VV[j,l] = s² δ_jl Σ_i ω_ij u_i u_iᵀ``;
    - ``UV[i,j] = s² ω_ij v_j u_iᵀ + s·G_ij I`` (the last term: Hessian only).

    Either is carried to ``z`` by ``normalize``'s Jacobian ``(I − u uᵀ)/‖z‖`` carries to ``z``.  The exact Hessian adds the
    second derivative of ``normalize`` against the embedding gradient ``g``:
    ``(−g uᵀ − u gᵀ − (g·u) I + 3 (g·u) u uᵀ)/‖z‖²`` on each pair's own block.  The Gauss–Newton
    curvature (logits as outputs) leaves out both second-derivative terms.
    """
    batch, width = z_image.shape
    scale = log_scale.exp()
    norm_u, norm_v = z_image.norm(dim=1), z_text.norm(dim=1)
    u, v = z_image / norm_u[:, None], z_text / norm_v[:, None]
    logits = scale * (u @ v.T)
    eye_batch = torch.eye(batch, dtype=u.dtype, device=u.device)
    eye_width = torch.eye(width, dtype=u.dtype, device=u.device)
    if bias is None:
        rows, cols = torch.softmax(logits, dim=1), torch.softmax(logits, dim=0)
        loss_gradient = rows + cols - 2.0 * eye_batch  # G = ∂L/∂S

        def same_side(anchor: Tensor, other: Tensor, own: Tensor, cross: Tensor) -> Tensor:
            # own[i, j]: anchor i's softmax over the others; cross[i, j]: anchor i's entry in other j's softmax
            mean = own @ other
            diagonal = torch.einsum("ij,ja,jb->iab", own + cross, other, other) - mean[:, :, None] * mean[:, None, :]
            coupled = torch.einsum("ij,kj,ja,jb->iakb", cross, cross, other, other)
            return scale**2 * (torch.einsum("ik,iab->iakb", eye_batch, diagonal) - coupled)

        image_image = same_side(u, v, rows, cols)
        text_text = same_side(v, u, cols.T, rows.T)
        image_text = scale**2 * (
            torch.einsum("ij,ija,ib->iajb", rows, v[None, :, :] - (rows @ v)[:, None, :], u)
            + torch.einsum("ij,ja,ijb->iajb", cols, v, u[:, None, :] - (cols.T @ u)[None, :, :])
        )
    else:
        probabilities = torch.sigmoid(logits + bias)
        weights = probabilities * (1.0 - probabilities)  # ω = ∂²L/∂S² (diagonal)
        loss_gradient = probabilities - eye_batch  # G = ∂L/∂S
        image_image = scale**2 * torch.einsum("ik,iab->iakb", eye_batch, torch.einsum("ij,ja,jb->iab", weights, v, v))
        text_text = scale**2 * torch.einsum("jl,jab->jalb", eye_batch, torch.einsum("ij,ia,ib->jab", weights, u, u))
        image_text = scale**2 * torch.einsum("ij,ja,ib->iajb", weights, v, u)
    if kind == "hessian":
        image_text = image_text + scale * torch.einsum("ij,ab->iajb", loss_gradient, eye_width)

    def through_normalize(block: Tensor, left: Tensor, right: Tensor) -> Tensor:
        return torch.einsum("iac,icjd,jdb->iajb", left, block, right)

    jacobian_u = (eye_width - u[:, :, None] * u[:, None, :]) / norm_u[:, None, None]
    jacobian_v = (eye_width - v[:, :, None] * v[:, None, :]) / norm_v[:, None, None]
    image_image = through_normalize(image_image, jacobian_u, jacobian_u)
    text_text = through_normalize(text_text, jacobian_v, jacobian_v)
    image_text = through_normalize(image_text, jacobian_u, jacobian_v)
    if kind == "hessian":
        for block, unit, norm, gradient in (
            (image_image, u, norm_u, scale * loss_gradient @ v),
            (text_text, v, norm_v, scale * loss_gradient.T @ u),
        ):
            along = (gradient * unit).sum(dim=1)[:, None, None]
            second = (
                -gradient[:, :, None] * unit[:, None, :]
                - unit[:, :, None] * gradient[:, None, :]
                - along * eye_width
                + 3.0 * along * unit[:, :, None] * unit[:, None, :]
            ) / norm[:, None, None] ** 2
            block += torch.einsum("ik,iab->iakb", eye_batch, second)
    return image_image, image_text, text_text


def linear_operator(product: Product, size: int, dtype: torch.dtype = torch.float64, device: torch.device | str = "cpu"):
    """``product`` (of vectors on ``device``) as a scipy ``LinearOperator`` on float64 numpy vectors (for ``eigsh``)."""
    from scipy.sparse.linalg import LinearOperator

    def matvec(vector: np.ndarray) -> np.ndarray:
        return product(torch.as_tensor(vector.ravel(), dtype=dtype, device=device)).detach().cpu().numpy()

    return LinearOperator((size, size), matvec=matvec, dtype=np.float64)


@dataclass(frozen=True)
class EigenvalueEstimate:
    """The smallest eigenvalue of a symmetric operator as Lanczos leaves it.

    ``value`` is the smallest Ritz value: an upper bound on the smallest eigenvalue (a Rayleigh
    quotient), and, by Weyl/Kahan, within ``residual = ‖Hy − θy‖`` (unit Ritz vector ``y``) of some
    eigenvalue.  ``converged``: the residual met the tolerance (or Lanczos found an invariant
    subspace); otherwise ``max_products`` ran out and ``value`` is the upper bound reached so far.
    ``products``: the operator products spent.
    """

    value: float
    residual: float
    products: int
    converged: bool

    def describe(self) -> str:
        """One sentence for a report, e.g. ``0.028 (Lanczos, converged to residual 3e-04)``."""
        if self.converged:
            return f"{self.value:.3g} (Lanczos, converged to residual {self.residual:.0e})"
        return f"≤ {self.value:.3g} (Lanczos upper bound after {self.products} products; residual {self.residual:.0e})"


def smallest_eigenvalue_estimate(
    product: Product,
    size: int,
    dtype: torch.dtype = torch.float64,
    max_products: int = 800,
    tolerance: float = 1e-3,
    memory_bytes: int = 1 << 30,
    device: torch.device | str = "cpu",
) -> EigenvalueEstimate:
    """Smallest (algebraic) eigenvalue of the symmetric operator ``product`` by Lanczos with full
    reorthogonalisation, within ``max_products`` products; always a finite answer for a finite operator.

    The low end of a penalised contrastive Hessian is clustered near ``δ``, where Lanczos converges
    slowly (scipy's ``eigsh`` then found no Ritz value at all on the demo at ``δ = 0.03``); this keeps
    the smallest Ritz value and its residual, both meaningful at any step.  Every new vector is
    reorthogonalised against the whole basis (classical Gram–Schmidt, repeated when it removed much),
    so no spurious copies of converged Ritz values appear.  The basis lives on ``device``, where
    ``product`` takes its vectors; only the small projected matrix is on the CPU.  Converged when the residual is at most
    ``tolerance · |value|`` (or ``1e-10`` of the spectrum's scale, for an eigenvalue at zero).
    The basis is kept whole while it fits in ``memory_bytes`` (800 vectors of 6144 parameters: 39 MB);
    beyond that (huge scopes) it holds at least 40 vectors and restarts thickly, keeping the lower
    half of the Ritz vectors.  The value is NaN only when a product is not finite.

    Cost beyond the products: about 2 ms a product at 6144 parameters and 800 products (one thread),
    against 30 ms for a Hessian-vector product over the 2104 demo pairs.
    """
    from scipy.linalg import eigh, eigh_tridiagonal

    max_products = max(1, int(max_products))
    itemsize = torch.empty((), dtype=dtype).element_size()
    capacity = max(min(max_products, 40), min(max_products, memory_bytes // max(1, size * itemsize)))
    capacity = max(1, min(capacity, size))
    basis = torch.zeros(capacity + 1, size, dtype=dtype, device=device)
    projected = np.zeros((capacity + 1, capacity + 1))  # Qᵀ H Q of the basis, with the couplings β
    # Drawn on the CPU: the same start vector, hence the same estimate, on every device.
    start = torch.randn(size, dtype=dtype, generator=torch.Generator().manual_seed(0)).to(device)
    basis[0] = start / start.norm()
    restarted = False
    current = 0  # the basis vector to expand next
    products = 0
    scale = 0.0
    value, residual = float("nan"), float("inf")

    def smallest_ritz(count: int) -> tuple[float, np.ndarray]:
        if restarted:  # arrowhead, then tridiagonal: dense
            values, vectors = eigh(projected[:count, :count], subset_by_index=[0, 0])
        elif count == 1:
            return float(projected[0, 0]), np.ones(1)
        else:
            values, vectors = eigh_tridiagonal(
                np.diag(projected[:count, :count]).copy(), np.diag(projected[:count, :count], 1).copy(),
                select="i", select_range=(0, 0),
            )
        return float(values[0]), vectors[:, 0]

    while products < max_products:
        vector = product(basis[current].clone()).detach().reshape(size).to(dtype)
        products += 1
        if not bool(torch.isfinite(vector).all()):
            return EigenvalueEstimate(float("nan"), float("inf"), products, False)
        with torch.no_grad():
            # the recurrence: subtract the known couplings (β_{j−1}, or the kept Ritz vectors after a
            # restart) and the new diagonal entry α_j ...
            # (elementwise, not matmul: a one-row matmul costs milliseconds on a busy multi-threaded host)
            for index in np.flatnonzero(projected[:current, current]):
                vector = vector - float(projected[index, current]) * basis[index]
            alpha = float((basis[current] * vector).sum())
            vector = vector - alpha * basis[current]
            # ... then reorthogonalise against the whole basis (two matrix-vector products over it),
            # a second time only when the first removed much (Daniel–Gragg–Kaufman–Stewart): rare
            active = basis[: current + 1]
            for _ in range(2):
                before = float(vector.norm())
                coefficients = active @ vector
                vector = vector - coefficients @ active
                alpha += float(coefficients[current])
                coupling = float(vector.norm())
                if coupling > 0.7071 * before:
                    break
        projected[current, current] = alpha
        scale = max(scale, abs(alpha) + coupling)
        value, ritz = smallest_ritz(current + 1)
        residual = coupling * abs(float(ritz[-1]))
        exhausted = coupling <= 1e-12 * scale or current + 1 >= size
        if exhausted or residual <= max(tolerance * abs(value), 1e-10 * scale):
            return EigenvalueEstimate(value, residual, products, True)
        if products >= max_products:
            break
        basis[current + 1] = vector / coupling
        projected[current, current + 1] = projected[current + 1, current] = coupling
        current += 1
        if current == capacity:  # thick restart: the lower Ritz vectors and the newest direction
            values, vectors = eigh(projected[:capacity, :capacity])
            keep = max(1, capacity // 2)
            couplings = coupling * vectors[-1, :keep]
            with torch.no_grad():
                kept = torch.as_tensor(vectors[:, :keep].T.copy(), dtype=dtype, device=device) @ basis[:capacity]
                basis[keep] = basis[capacity]
                basis[:keep] = kept
            projected[:] = 0.0
            projected[np.arange(keep), np.arange(keep)] = values[:keep]
            projected[keep, :keep] = projected[:keep, keep] = couplings
            current, restarted = keep, True
    return EigenvalueEstimate(value, residual, products, False)


def smallest_eigenvalue(
    product: Product, size: int, dtype: torch.dtype = torch.float64, max_products: int = 800
) -> float:
    """Smallest (algebraic) eigenvalue of a symmetric operator by Lanczos, within ``max_products`` products.

    The value of :func:`smallest_eigenvalue_estimate`: converged, or else the smallest Ritz value so
    far, an upper bound (a negative value still proves the operator indefinite).  Never NaN for a
    finite operator.
    """
    return smallest_eigenvalue_estimate(product, size, dtype, max_products).value


def lanczos_smallest_eigenvalue_estimate(
    problem: ContrastiveProblem, theta: Tensor, kind: CurvatureKind = "hessian", max_products: int = 800
) -> EigenvalueEstimate:
    """Smallest eigenvalue of the undamped curvature with its Lanczos residual and whether it converged
    (an upper bound when ``max_products`` ran out; see :func:`ecif.curvature.products.smallest_eigenvalue_estimate`)."""
    product = curvature_product(problem, theta, kind)
    return smallest_eigenvalue_estimate(product, theta.numel(), theta.dtype, max_products, device=theta.device)

