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


def trak_matrix(
    problem: ContrastiveProblem,
    theta: torch.Tensor,
    validation: ContrastiveData,
    proj_dim: int | None = None,
    simulated_batch_size: int | None = None,
    lambda_reg: float = 0.0,
    seed: int = 0,
    save_dir: str | Path | None = None,
    **_ignored,
) -> np.ndarray:
    """TRAK scores ``[T, N]`` of every training pair for every validation pair (one checkpoint ``θ̂``)."""
    from trak import TRAKer
    from trak.projectors import BasicProjector, NoOpProjector, ProjectionType

    data = problem.data
    n_train, n_targets = data.n_pairs, validation.n_pairs
    model = HeadsModule(problem.scope, theta).eval()
    n_params = sum(p.numel() for p in model.parameters())
    dim = int(proj_dim or min(2048, max(1, n_train // 2)))
    if dim >= n_params:
        projector = NoOpProjector(device="cpu")
    else:
        class _KeptBasicProjector(BasicProjector):
            def free_memory(self):  # keep the sketch: the single-block path never regenerates it
                pass

        projector = _KeptBasicProjector(
            grad_dim=n_params, proj_dim=dim, seed=seed, proj_type=ProjectionType.normal, device="cpu", dtype=torch.float32
        )
    width = max(len(b) for b in data.batches)
    simulated = int(simulated_batch_size or width)
    simulated = max(1, min(simulated, n_train - 1))

    with torch.no_grad():
        u, v, _ = embed(problem.scope, theta, data.image, data.text)
    CLIPModelOutput, _CLIPModelOutput = _clip_model_output()
    CLIPModelOutput.image_embeddings = u.float()
    CLIPModelOutput.text_embeddings = v.float()
    CLIPModelOutput.num_computed_embeddings = n_train
    task = _CLIPModelOutput(temperature=None, simulated_batch_size=simulated)

    directory = Path(save_dir) if save_dir else Path(tempfile.mkdtemp(prefix="ecif-trak-"))
    torch.manual_seed(seed)  # the simulated batches are drawn with torch.multinomial
    try:
        traker = TRAKer(
            model=model,
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
        traker.load_checkpoint(model.state_dict(), model_id=0)
        for batch in data.batches:  # each pair featurized with its own reference batch (Q term)
            traker.featurize(batch=(data.image[batch].float(), data.text[batch].float()), inds=batch.numpy())
        traker.finalize_features()
        traker.start_scoring_checkpoint(exp_name="validation", checkpoint=model.state_dict(), model_id=0, num_targets=n_targets)
        for batch in validation.batches:
            traker.score(batch=(validation.image[batch].float(), validation.text[batch].float()), inds=batch.numpy())
        scores = np.array(traker.finalize_scores(exp_name="validation"), dtype=np.float64)  # [N, T]
    finally:
        if not save_dir:
            shutil.rmtree(directory, ignore_errors=True)
    return scores.T
