"""Load page: score the demo or your own model + manifest, or open an existing run folder."""

from __future__ import annotations

from pathlib import Path
from typing import get_args

import streamlit as st
from views.context import Context, open_run, start_job
from views.finetune import summary as finetune_summary

from ecif.config import AUTO_DELTA, AUTO_LOSS, LOSSES, CurvatureConfig, CurvatureKind, FinetuneConfig, RunConfig
from ecif.curvature.solvers import SOLVER_NAMES
from ecif.data.manifest import ManifestError, load_manifest
from ecif.devices import device_choices
from ecif.jobs.launch import run_dir_for
from ecif.run import Run

#: The penalty δ the form offers when the curator sets it by hand (the default is "auto").
MANUAL_DELTA = 1.0


def _check_manifest(path: str) -> None:
    """Validate a manifest now and show its bad rows as a table (nothing is scored yet)."""
    try:
        with st.spinner("Checking the manifest…"):
            loaded = load_manifest(path, check_images=True)
    except (ManifestError, OSError) as error:
        st.error(str(error))
        return
    st.success(f"{len(loaded.frame)} valid pairs · splits: "
               + ", ".join(f"{k} {v}" for k, v in loaded.frame["split"].value_counts().items()))
    if len(loaded.bad_rows):
        st.warning(f"{len(loaded.bad_rows)} rows will be skipped:")
        st.dataframe(loaded.bad_rows, hide_index=True, width="stretch")


def _start(ctx: Context, config: RunConfig) -> None:
    open_run(config.run_dir)
    ctx.run = Run(config.run_dir)
    start_job(ctx, config)


def _own_data_form(ctx: Context) -> None:
    """Model, manifest, trusted split and influence settings -> a background scoring job."""
    defaults = RunConfig(run_dir=Path())  # the form starts from the engine's defaults
    finetune, curvature = defaults.finetune, defaults.curvature
    model = st.text_input("open_clip model name", defaults.model, key="load_model",
                          help="“demo” trains the small built-in model on your train split; any other "
                               "open_clip name needs a local checkpoint or a cached pretrained tag.")
    checkpoint = st.text_input("Local checkpoint path (any model but demo)", key="load_checkpoint",
                               help="A local file; nothing is downloaded. Without it (or a cached tag) the job "
                                    "is refused rather than run with random weights.")
    pretrained = st.text_input("open_clip pretrained tag (optional, must be cached)", key="load_pretrained")
    tokenizer = st.text_input("Tokenizer folder (optional)", key="load_tokenizer",
                              help="For a model whose tokenizer open_clip fetches from the Hugging Face hub (SigLIP, "
                                   "Hugging Face text towers): a local folder. Empty: the local Hugging Face cache; "
                                   "nothing is downloaded, and the job is refused if neither has it.")
    manifest = st.text_input("Manifest (CSV, TSV, JSONL, parquet or an image folder)", key="load_manifest")
    splits = st.columns(2)
    trusted = splits[0].text_input("Trusted split (the clean set influence is measured on)",
                                   defaults.trusted_split, key="load_trusted")
    test = splits[1].text_input("Test split (scanned for mispredictions)", defaults.test_split, key="load_test")
    with st.expander("Influence settings"):
        auto_delta = st.checkbox("Choose the penalty δ on held-out trusted pairs", finetune.auto_delta,
                                 key="load_delta_auto",
                                 help="Fine-tunes at δ = " + ", ".join(f"{d:g}" for d in finetune.delta_grid)
                                 + " and keeps the well-conditioned one with the lowest loss on "
                                 f"{finetune.selection_fraction:.0%} of the trusted split; influence is measured "
                                 "on the rest.")
        delta = st.number_input("Penalty δ towards the starting heads", 1e-4, 1e4, MANUAL_DELTA, format="%g",
                                key="load_delta", disabled=auto_delta,
                                help="Too weak a penalty leaves the fine-tuning ill-conditioned; the run reports it.")
        batch = st.number_input("Reference batch size B", 2, 1 << 20, finetune.batch_size, key="load_batch")
        damping = st.number_input("Damping λ", 0.0, 10.0, curvature.damping, format="%.1e",
                                  key="load_damping")
        solvers = list(SOLVER_NAMES)
        solver = st.selectbox("Solver", solvers, solvers.index(curvature.solver), key="load_solver",
                              help="auto: exact influence by EK-FAC-preconditioned conjugate gradient, EK-FAC "
                              "self-influence (about a second on the demo). dense: the reference Hessian, exact "
                              f"self-influence too (up to ~{curvature.dense_max_params / 1000:.0f}k parameters; "
                              "30-60 s on the demo).")
        kinds = get_args(CurvatureKind)
        kind = st.selectbox("Curvature", kinds, kinds.index(curvature.kind), key="load_kind")
        blocks = st.number_input("Transformer blocks in the influence scope", 0, 4, finetune.blocks, key="load_blocks",
                                 help="0: the projection heads only (fast, any size). N > 0 adds the last N blocks of "
                                 "each tower: influence through what the towers compute, for up to a few thousand pairs.")
        losses = [AUTO_LOSS, *LOSSES]
        loss = st.selectbox("Contrastive loss", losses, losses.index(finetune.loss), key="load_loss",
                            help="auto: the model's own (SigLIP's sigmoid for a model with a logit bias, else CLIP's "
                                 "softmax); with the demo model also the loss it is trained with.")
        devices = device_choices()
        device = st.selectbox("Device", devices, devices.index(defaults.device), key="load_device",
                              help="Where the job computes. auto: the first GPU torch sees, else the CPU. The maths "
                              "stays float64 and the results are the same on every device.")
    default_dir = run_dir_for(manifest, model, checkpoint or None, blocks=int(blocks)) if manifest else None
    run_dir = st.text_input("Run folder (optional)", key="load_run_dir",
                            placeholder=str(default_dir or "derived from the manifest"),
                            help="Results and decisions are kept here; empty = the default shown.")
    left, right = st.columns(2)
    if left.button("Check manifest", key="check_manifest", disabled=not manifest):
        _check_manifest(manifest)
    if right.button("Start scoring", key="start_scoring", type="primary", disabled=not manifest):
        config = RunConfig(
            run_dir=Path(run_dir) if run_dir else default_dir,
            manifest=Path(manifest).expanduser().resolve(), model=model or defaults.model,
            checkpoint=Path(checkpoint) if checkpoint else None, pretrained=pretrained or None,
            tokenizer=Path(tokenizer).expanduser() if tokenizer else None,
            trusted_split=trusted, test_split=test,
            finetune=FinetuneConfig(delta=AUTO_DELTA if auto_delta else float(delta), batch_size=int(batch),
                                    blocks=int(blocks), loss=loss),
            curvature=CurvatureConfig(damping=float(damping), solver=solver, kind=kind), device=device)
        _start(ctx, config)
        st.rerun()


def render(ctx: Context) -> None:
    st.header("Load")
    demo, own, existing = st.tabs(["Demo", "Your model and data", "Open a run folder"])
    with demo:
        st.markdown("A small built-in dataset with known corrupted captions and a CLIP model "
                    "trained on it; scoring takes a few minutes on a laptop CPU and is cached.")
        if st.button("Score the demo", key="load_demo", type="primary"):
            _start(ctx, RunConfig(run_dir_for()))
            st.rerun()
    with own:
        _own_data_form(ctx)
    with existing:
        folder = st.text_input("Run folder", key="open_folder")
        if st.button("Open", key="open_run", disabled=not folder):
            if Run(folder).is_run_folder:
                open_run(folder)
                st.rerun()
            st.error(f"{folder} is not a run folder (no run.json).")

    st.subheader("Open run")
    st.markdown(f"`{ctx.run.directory}` · {'scored' if ctx.run.is_scored else 'not scored yet'}")
    finetune_summary(ctx.run)
    info = ctx.run.info
    if info:
        with st.expander("run.json"):
            st.json(info)
    bad = ctx.run.bad_rows()
    if len(bad):
        st.warning(f"{len(bad)} manifest rows were skipped:")
        st.dataframe(bad, hide_index=True, width="stretch")
