"""kronfluence (Grosse et al. 2023; Bae et al.) EK-FAC influence on the heads scope over cached features.

kronfluence computes per-example gradients from hooks on ``nn.Linear`` modules, which is exact only
when each example's loss depends on that example's activations alone.  A contrastive pair's loss
does not (its softmax denominators hold the other pairs of its batch), so each kronfluence
*example* here is **the pair together with its whole reference batch**, laid out like a token
sequence: ``image [W, d]``, ``text [W, d']`` (the batch's features, zero padded to the widest
batch ``W``, with an attention ``mask [W]``) and ``own`` (the pair's position in the batch).  The
heads are applied to every "token"; kronfluence sums the per-token outer products, so an example's
per-sample gradient is the full ``∇Pos_n`` (also through the other pairs' embeddings).

Per-pair training loss (``Task.compute_train_loss``), the definition used for both the EK-FAC
factors and the training gradients: ``Pos_n = a_n + b_n = −2 s_nn + logsumexp_j s_nj +
logsumexp_j s_jn`` over the pair's reference batch (``s = exp(ℓ) u·v``), i.e. ecif's ``pair_losses``.
With ``sample=True`` (true Fisher, kronfluence's default for the factors) the matching caption and
image are sampled from the model's row / column softmax instead of the true ``n``:
``−s_{n,ĵ} + logsumexp_j s_nj − s_{î,n} + logsumexp_j s_jn``.  Measurement
(``compute_measurement``): a validation pair's own terms ``a_j + b_j`` in its validation reference
batch; ``φ = mean_j`` of them.  Only the two ``nn.Linear`` heads are tracked (a learnt logit scale
is not: kronfluence tracks Linear/Conv2d modules only).

Scale and sign: kronfluence returns ``τ[j, n] = ∇f_jᵀ (F̂ + λI)⁻¹ ∇L_n`` with ``F̂`` the EK-FAC of the
mean per-example Fisher.  Up-weighting ``n`` by ``ε`` moves ``f_j`` by ``−ε τ``; removing it
(``ε = −1/N``) moves it by ``+τ/N``.  So ``τ/N`` is on ECIF's Δφ scale with ECIF's sign (harmful <
0), with ``F̂`` in place of ECIF's Hessian and ``λ`` = the run's ``δ`` (+ its damping) in place of
the penalty's ``δI``: ``damping`` defaults to ``problem.delta + 1e-4`` (``None`` = kronfluence's
heuristic, 0.1 × mean eigenvalue).  Everything runs in float32 on CPU (``Analyzer(cpu=True)``).
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from bench.peers.trak_adapter import HeadsModule
from ecif.objective.contrastive import ContrastiveData, ContrastiveProblem, mask_logits


class HeadsLogits(HeadsModule):
    """The two heads as ``nn.Linear`` over a stack of batches: ``[n, W, d], [n, W, d'] → logits [n, W, W]``."""

    def forward(self, image: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        u, v, scale = super().forward(image, text)
        return scale * (u @ v.transpose(-1, -2))


class PairInBatchDataset(Dataset):
    """Item ``n`` = pair ``n`` with its whole reference batch (see the module docstring)."""

    def __init__(self, data: ContrastiveData, dtype: torch.dtype = torch.float32):
        self.data, self.dtype = data, dtype
        self.batch_of = torch.empty(data.n_pairs, dtype=torch.long)
        self.own = torch.empty(data.n_pairs, dtype=torch.long)
        for position, batch in enumerate(data.batches):
            self.batch_of[batch] = position
            self.own[batch] = torch.arange(len(batch))

    def __len__(self) -> int:
        return self.data.n_pairs

    def __getitem__(self, n: int) -> dict[str, torch.Tensor]:
        m = int(self.batch_of[n])
        index, mask = self.data.batch_index[m], self.data.batch_mask[m]
        keep = mask[:, None].to(self.dtype)
        return {
            "image": self.data.image[index].to(self.dtype) * keep,
            "text": self.data.text[index].to(self.dtype) * keep,
            "mask": mask,
            "own": self.own[n],
        }


def _pair_task():
    from kronfluence.task import Task

    class ContrastivePairTask(Task):
        """Per-pair loss = the pair's own contrastive terms in its reference batch (module docstring)."""

        def _rows(self, batch, model):
            logits = mask_logits(model(batch["image"], batch["text"]), batch["mask"])
            own, index = batch["own"], torch.arange(logits.shape[0])
            return logits[index, own, :], logits[index, :, own], logits[index, own, own]  # row, column, s_nn

        def compute_train_loss(self, batch, model, sample: bool = False) -> torch.Tensor:
            row, column, diagonal = self._rows(batch, model)
            if not sample:
                loss = -2.0 * diagonal + torch.logsumexp(row, -1) + torch.logsumexp(column, -1)
            else:
                with torch.no_grad():
                    caption = torch.distributions.Categorical(logits=row.detach()).sample()
                    image = torch.distributions.Categorical(logits=column.detach()).sample()
                index = torch.arange(row.shape[0])
                loss = (-row[index, caption] + torch.logsumexp(row, -1)) + (-column[index, image] + torch.logsumexp(column, -1))
            return loss.sum()

        def compute_measurement(self, batch, model) -> torch.Tensor:
            return self.compute_train_loss(batch, model, sample=False)

        def get_influence_tracked_modules(self):
            return ["image_proj", "text_proj"]

        def get_attention_mask(self, batch):
            return batch["mask"].long()  # an integer mask: kronfluence adds its sum to an int64 token count

    return ContrastivePairTask()


def kronfluence_matrix(
    problem: ContrastiveProblem,
    theta: torch.Tensor,
    validation: ContrastiveData,
    damping: float | None = -1.0,
    batch_size: int = 64,
    strategy: str = "ekfac",
    seed: int = 0,
    output_dir: str | Path | None = None,
    **_ignored,
) -> np.ndarray:
    """``[T, N]`` EK-FAC estimates of ``Δφ_j`` if pair ``n`` is removed (``τ / N``; harmful < 0).

    ``damping=-1`` (default) means ``problem.delta + 1e-4`` (ECIF's penalty + damping); ``None`` is
    kronfluence's own heuristic.
    """
    from kronfluence.analyzer import Analyzer, prepare_model
    from kronfluence.arguments import FactorArguments, ScoreArguments
    from kronfluence.utils.dataset import DataLoaderKwargs

    for name in ("kronfluence", "accelerate"):
        logging.getLogger(name).setLevel(logging.WARNING)
    torch.manual_seed(seed)  # sampled labels of the true Fisher
    task = _pair_task()
    model = prepare_model(HeadsLogits(problem.scope, theta), task)
    directory = Path(output_dir) if output_dir else Path(tempfile.mkdtemp(prefix="ecif-kronfluence-"))
    if damping is not None and damping < 0:
        damping = float(problem.delta) + 1e-4
    try:
        analyzer = Analyzer(
            analysis_name="ecif-peers", model=model, task=task, cpu=True, disable_tqdm=True, output_dir=str(directory)
        )
        analyzer.set_dataloader_kwargs(DataLoaderKwargs(num_workers=0))
        train, query = PairInBatchDataset(problem.data), PairInBatchDataset(validation)
        analyzer.fit_all_factors(
            factors_name=strategy,
            dataset=train,
            per_device_batch_size=batch_size,
            factor_args=FactorArguments(strategy=strategy),
            overwrite_output_dir=True,
        )
        analyzer.compute_pairwise_scores(
            scores_name="validation",
            factors_name=strategy,
            query_dataset=query,
            train_dataset=train,
            per_device_query_batch_size=batch_size,
            per_device_train_batch_size=batch_size,
            score_args=ScoreArguments(damping_factor=damping),
            overwrite_output_dir=True,
        )
        scores = analyzer.load_pairwise_scores("validation")["all_modules"].to(torch.float64).numpy()  # [T, N]
    finally:
        if not output_dir:
            shutil.rmtree(directory, ignore_errors=True)
    return scores / problem.data.normaliser
