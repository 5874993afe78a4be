"""TRAK (Park et al. 2023) through the ``traker`` package, on the heads scope over cached features.

The model is :class:`HeadsModule`: the two projection heads as ``nn.Linear`` layers (plus the log
logit scale, a parameter only when the run learns it) whose ``forward(image=, text=)`` takes cached
backbone features and returns ``(u, v, exp(ℓ))`` like open_clip's CLIP; so traker's own
:class:`trak.modelout_functions.CLIPModelOutput` (its output function and out-to-loss term) works on
it with cached features: no custom ModelOutput was needed beyond a shape fix (below).  What had to be configured for a CPU-only run:

- ``device="cpu"``, ``use_half_precision=False`` (float32 throughout; the model is cast to float32);
- an explicit projector: traker picks ``CudaProjector`` (``fast_jl``, CUDA only) by default.
  ``BasicProjector(proj_type="normal", device="cpu")`` (Gaussian JL; Rademacher sampling is not
  supported in float16 on CPU, traker's own CPU default is also ``normal``) with ``proj_dim``
  < ``N`` (default ``min(2048, N // 2)``): ``X̃ᵀX̃`` must be invertible and traker inverts it
  with ``lambda_reg = 0`` by default; ``NoOpProjector`` when ``proj_dim >= P``;
- ``CLIPModelOutput.get_embeddings`` allocates on CUDA (``.cuda()``), so the class attributes it
  would fill (``image_embeddings``, ``text_embeddings``, ``num_computed_embeddings``) are set
  directly to the training pairs' unit embeddings at ``θ̂`` (float32, CPU);
- traker 0.3.2's ``CLIPModelOutput.get_out_to_loss_grad`` returns shape ``[B]`` where the store
  (and every other ModelOutput) uses ``[B, 1]`` (``ValueError: shape mismatch`` in ``featurize``):
  :class:`_CLIPModelOutput` is a one-line subclass that adds the trailing dimension;
- traker 0.3.2's ``BasicProjector`` with a single block (``proj_dim ≤ block_size = 100``) loses its
  matrix in ``finalize_features`` (``free_memory``) and then fails in ``score``
  (``AttributeError: proj_matrix``): the projector used here keeps its matrix (no-op ``free_memory``);
- ``load_from_save_dir=True`` with a fresh temporary ``save_dir``: with ``False`` traker never
  writes ``experiments.json`` and ``start_scoring_checkpoint`` fails (``FileNotFoundError``);
- ``simulated_batch_size`` (default 300 in traker) must be ``< N`` (``multinomial`` without
  replacement over ``arange(N)`` weights); default here: the run's reference batch size, capped at ``N − 1``.

Model output (traker's CLIP margin, **without** the logit scale, as traker defines it):
``f(z) = −log Σ_{k∈S} exp(−u·(v − v_k)) − log Σ_{k∈S} exp(−v·(u − u_k))`` with ``S`` a random
simulated batch of training embeddings; the out-to-loss term ``Q = 1 − (P_ii + Q_ii)/2`` uses
``exp(ℓ)`` and the featurized batch (= each pair's reference batch here).  Targets are the
validation pairs (same margin), one checkpoint (``θ̂``) only; TRAK usually ensembles several
independently trained checkpoints, which we do not have (one fine-tune = one ``θ̂``).

Sign: ``τ[n, j] > 0`` means training pair ``n`` raises target ``j``'s margin, i.e. lowers its loss;
removing it would raise the loss: valuable, the same side as a positive Δφ.  The per-pair score is
the mean over targets; its scale is TRAK's (margin units), not nats.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ecif.objective.contrastive import ContrastiveData, ContrastiveProblem, HeadsScope, embed


class HeadsModule(nn.Module):
    """The heads scope as a CLIP-like ``nn.Module`` over cached features (float32 by default)."""

    def __init__(self, scope: HeadsScope, theta: torch.Tensor, dtype: torch.dtype = torch.float32):
        super().__init__()
        w_image, w_text, log_scale = scope.split(theta.detach())
        self.image_proj = nn.Linear(scope.image_dim, scope.embed_dim, bias=False, dtype=dtype)
        self.text_proj = nn.Linear(scope.text_dim, scope.embed_dim, bias=False, dtype=dtype)
        with torch.no_grad():
            self.image_proj.weight.copy_(w_image.T.to(dtype))
            self.text_proj.weight.copy_(w_text.T.to(dtype))
        value = torch.as_tensor(float(log_scale), dtype=dtype)
        if scope.learn_logit_scale:
            self.log_logit_scale = nn.Parameter(value)
        else:
            self.register_buffer("log_logit_scale", value)

    def forward(self, image: torch.Tensor, text: torch.Tensor):
        u = nn.functional.normalize(self.image_proj(image), dim=-1)
        v = nn.functional.normalize(self.text_proj(text), dim=-1)
        return u, v, self.log_logit_scale.exp()


def _clip_model_output():
    from trak.modelout_functions import CLIPModelOutput

    class _CLIPModelOutput(CLIPModelOutput):
        """traker's CLIPModelOutput with the out-to-loss term shaped ``[B, 1]`` like the store."""

        def get_out_to_loss_grad(self, model, weights, buffers, batch):
            return super().get_out_to_loss_grad(model, weights, buffers, batch).reshape(-1, 1)

    return CLIPModelOutput, _CLIPModelOutput


def _objective_model_output():
    """TRAK's CLIP margin made to match ecif's objective: the model's logit scale inside the margin,
    and a pair's negatives = the other members of its own fixed reference batch (not a random
    simulated batch).  Each example carries its batch's other unit embeddings at the checkpoint
    (``negative_image [W, e]``, ``negative_text [W, e]``, ``mask [W]``), held constant as TRAK does::

        f(z_n) = −log Σ_{k∈B(n)∖n} exp(−s·u_n·(v_n − v_k)) − log Σ_{k∈B(n)∖n} exp(−s·v_n·(u_n − u_k))

    i.e. ``log(p/(1−p))`` of the pair's own softmax probability in each direction (``s = exp(ℓ)``),
    whose loss ``−log p`` has out-to-loss derivative ``Q = 1 − p`` (mean of the two directions).
    """
    import torch as ch
    from trak.modelout_functions import AbstractModelOutput

    class ObjectiveMarginOutput(AbstractModelOutput):
        def __init__(self) -> None:
            super().__init__()

        @staticmethod
        def _logits(model, weights, buffers, image, text, negative_image, negative_text, mask):
            u, v, scale = ch.func.functional_call(model, (weights, buffers), args=(), kwargs={"image": image, "text": text})
            own = scale * (u * v).sum(-1, keepdim=True)  # [B, 1]
            rows = scale * ch.einsum("be,bwe->bw", u, negative_text)  # image n against the batch's captions
            columns = scale * ch.einsum("be,bwe->bw", v, negative_image)
            blocked = ch.where(mask, 0.0, -1e4)
            return own, rows + blocked, columns + blocked

        @staticmethod
        def get_output(model, weights, buffers, image, text, negative_image, negative_text, mask):
            own, rows, columns = ObjectiveMarginOutput._logits(
                model, weights, buffers, image.unsqueeze(0), text.unsqueeze(0), negative_image.unsqueeze(0),
                negative_text.unsqueeze(0), mask.unsqueeze(0))
            return (-ch.logsumexp(rows - own, dim=1) - ch.logsumexp(columns - own, dim=1)).sum()

        def get_out_to_loss_grad(self, model, weights, buffers, batch):
            own, rows, columns = self._logits(model, weights, buffers, *batch)
            p_row = ch.sigmoid(own.squeeze(1) - ch.logsumexp(rows, dim=1))
            p_column = ch.sigmoid(own.squeeze(1) - ch.logsumexp(columns, dim=1))
            return (1 - (p_row + p_column) / 2).reshape(-1, 1).clone().detach()

    return ObjectiveMarginOutput


def _with_negatives(scope: HeadsScope, theta: torch.Tensor, data: ContrastiveData, batch: torch.Tensor):
    """One featurize/score batch for the objective margin: features plus each member's batch-mates."""
    with torch.no_grad():
        u, v, _ = embed(scope, theta, data.image[batch], data.text[batch])
    width = len(batch)
    mask = ~torch.eye(width, dtype=torch.bool)
    return (data.image[batch].float(), data.text[batch].float(), u.float().expand(width, -1, -1).contiguous(),
            v.float().expand(width, -1, -1).contiguous(), mask)


OUTPUTS = ("traker-clip", "objective")


def trak_matrix(
    problem: ContrastiveProblem,
    theta: torch.Tensor,
    validation: ContrastiveData,
    proj_dim: int | None = None,
    simulated_batch_size: int | None = None,
    lambda_reg: float = 0.0,
    seed: int = 0,
    save_dir: str | Path | None = None,
    output: str = "traker-clip",
    checkpoints: list[tuple[torch.Tensor, ContrastiveData]] | None = None,
    **_ignored,
) -> np.ndarray:
    """TRAK scores ``[T, N]`` of every training pair for every validation pair.

    ``output``: ``"traker-clip"`` (traker's stock CLIP margin: no logit scale, a random simulated
    batch) or ``"objective"`` (:func:`_objective_model_output`).  ``lambda_reg``: traker's ridge on
    ``X̃ᵀX̃`` (with traker's normalisation the objective's own penalty corresponds to ``δ·N``).
    ``checkpoints``: ``(θ_k, training data with the batching θ_k was fine-tuned with)`` to ensemble
    (default: ``θ̂`` with the problem's own batching); traker sums the per-checkpoint scores.
    """
    from trak import TRAKer
    from trak.projectors import BasicProjector, NoOpProjector, ProjectionType

    if output not in OUTPUTS:
        raise ValueError(f"unknown TRAK output {output!r}; choose one of {OUTPUTS}")
    checkpoints = checkpoints or [(theta, problem.data)]
    n_train, n_targets = problem.data.n_pairs, validation.n_pairs
    models = [HeadsModule(problem.scope, checkpoint).eval() for checkpoint, _ in checkpoints]
    n_params = sum(p.numel() for p in models[0].parameters())
    dim = int(proj_dim or min(2048, max(1, n_train // 2)))
    if dim >= n_params:
        projector, dim = NoOpProjector(device="cpu"), n_params
    else:
        class _KeptBasicProjector(BasicProjector):
            def free_memory(self):  # keep the sketch: the single-block path never regenerates it
                pass

        projector = _KeptBasicProjector(
            grad_dim=n_params, proj_dim=dim, seed=seed, proj_type=ProjectionType.normal, device="cpu", dtype=torch.float32
        )
    if output == "objective":
        task = _objective_model_output()()
    else:
        width = max(len(b) for b in problem.data.batches)
        simulated = max(1, min(int(simulated_batch_size or width), n_train - 1))
        CLIPModelOutput, _CLIPModelOutput = _clip_model_output()
        task = _CLIPModelOutput(temperature=None, simulated_batch_size=simulated)

    def stock_embeddings(checkpoint: torch.Tensor, data: ContrastiveData) -> None:
        # CLIPModelOutput.get_embeddings allocates on CUDA; its class attributes are set directly.
        with torch.no_grad():
            u, v, _ = embed(problem.scope, checkpoint, data.image, data.text)
        CLIPModelOutput.image_embeddings, CLIPModelOutput.text_embeddings = u.float(), v.float()
        CLIPModelOutput.num_computed_embeddings = data.n_pairs

    def batch_of(checkpoint: torch.Tensor, data: ContrastiveData, batch: torch.Tensor):
        if output == "objective":
            return _with_negatives(problem.scope, checkpoint, data, batch)
        return data.image[batch].float(), data.text[batch].float()

    directory = Path(save_dir) if save_dir else Path(tempfile.mkdtemp(prefix="ecif-trak-"))
    torch.manual_seed(seed)  # the stock output's simulated batches are drawn with torch.multinomial
    try:
        traker = TRAKer(
            model=models[0],
            task=task,
            train_set_size=n_train,
            save_dir=str(directory),
            load_from_save_dir=True,  # False never creates experiments.json (scoring then fails); the dir is fresh
            device="cpu",
            projector=projector,
            proj_dim=dim,
            use_half_precision=False,
            lambda_reg=lambda_reg,
            logging_level=logging.WARNING,
        )
        for model_id, ((checkpoint, data), model) in enumerate(zip(checkpoints, models)):
            traker.load_checkpoint(model.state_dict(), model_id=model_id)
            if output != "objective":
                stock_embeddings(checkpoint, problem.data)
            for batch in data.batches:  # each pair featurized with its own reference batch (Q term)
                traker.featurize(batch=batch_of(checkpoint, data, batch), inds=batch.numpy())
        traker.finalize_features()
        for model_id, ((checkpoint, _), model) in enumerate(zip(checkpoints, models)):
            traker.start_scoring_checkpoint(exp_name="validation", checkpoint=model.state_dict(), model_id=model_id,
                                            num_targets=n_targets)
            if output != "objective":
                stock_embeddings(checkpoint, problem.data)
            for batch in validation.batches:
                traker.score(batch=batch_of(checkpoint, validation, batch), inds=batch.numpy())
        scores = np.array(traker.finalize_scores(exp_name="validation"), dtype=np.float64)  # [N, T]
    finally:
        if not save_dir:
            shutil.rmtree(directory, ignore_errors=True)
    return scores.T
