"""Peers of ECIF side by side: TracIn, TRAK (``traker``), kronfluence EK-FAC, CLIP-score, pair loss.

Benchmark code only: ``ecif`` never imports this package, and the peers' libraries (``traker``,
``kronfluence``) are installed by the ``bench`` extra (``pip install -e '.[bench]'``), not by ``.[dev]``.

Every method scores every training pair of a heads-scope :class:`ecif.objective.contrastive.ContrastiveProblem`
at its fine-tuned ``θ̂`` with the same signature ``score(problem, theta, validation, **options) -> [N]``
(rows in the problem's row order).  Sign convention, the same as ECIF's:

- *influence-type* methods (ECIF exact / first order, positive-only IF, TracIn, TRAK, kronfluence)
  return an estimate of ``Δφ_n``, the change of the trusted (validation) loss ``φ`` if pair ``n`` is
  removed: **negative = harmful**, positive = valuable.  Their scales differ (TracIn uses ``H = I``,
  TRAK predicts a margin, not a loss); rankings and correlations are what is compared.
- *diagnostics* (self-influence, TracIn self-influence, CLIP-score, pair loss) are not ``Δφ``; each
  has a documented suspicious direction (:attr:`adapters.Method.suspicious`).

See :mod:`bench.peers.adapters` for the definitions and ``python -m bench.peers --help`` for the runner.
"""

from bench.peers.adapters import METHODS, Method, method_names  # noqa: F401
