"""The app's pages and the parts they share.

Pages (each has ``render(ctx)``; ``main.py`` registers them): ``load``, ``review``,
``mispredictions``, ``whatif``, ``plots``, ``export``; ``finetune`` shows how the heads were
fine-tuned, on the Load page and above any score.

Shared parts: ``context`` (the open run, its decisions and scores, its scoring job), ``data``
(cached reads of the run folder), ``filters`` (the sidebar's view), ``cards`` (pairs drawn as
cards), ``actions`` (decisions as button callbacks), ``job_panel`` (the job's sidebar panel).
Scoring, filtering, neighbours and exports are library calls; file names inside a run folder
belong to :class:`ecif.run.Run`.
"""
