"""Tower families of the heads scope (timm, ResNet, Hugging Face text, biased text projections) and
offline tokenizers.

Every model here is a tiny architecture registered by this module, with seeded random weights that
the test saves as a local checkpoint (nothing is downloaded). For each family: ecif's embeddings
(the scope's projection of the cached features, normalised) equal open_clip's own
``encode_image``/``encode_text``, θ written back with ``write_scope`` is what the model then
computes, and a run scores end to end.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import open_clip
import pytest
import timm.models
import torch
from timm.models.convnext import ConvNeXt
from timm.models.vision_transformer import VisionTransformer

import ecif
from ecif.data import load_manifest, make_demo_data
from ecif.models import ModelLoadError, UnsupportedModelError, load_images, load_model, save_checkpoint
from ecif.models.features import encode_captions, encode_images, get_heads
from ecif.models.scope import initial_scope, write_scope
from ecif.models.towers import projection_heads, refuse_unsupported_config
from ecif.objective.contrastive import HeadsScope, scope_from_dict
from ecif.tasks.engine import load_engine

transformers = pytest.importorskip("transformers")

PAIRS = 36
WORDS = "a an the of at in is there picture photo large small red green blue yellow purple orange circle square triangle star cross top bottom left right center middle"
HUB_TOKENIZER = "ecif-test/tiny-wordpiece"
"""A Hugging Face hub name no machine has: the SigLIP-like model's tokenizer comes from a folder or the cache."""


def _timm_entrypoint(name: str, cls: type, **defaults):
    """Register a tiny timm architecture ``name`` (open_clip's TimmModel builds towers by timm name)."""

    def build(pretrained: bool = False, pretrained_cfg=None, pretrained_cfg_overlay=None, cache_dir=None, **kwargs):
        model = cls(**{**defaults, **kwargs})
        model.pretrained_cfg = model.default_cfg = {}
        return model

    build.__name__ = name
    build.__module__ = __name__
    if not timm.models.is_model(name):
        timm.models.register_model(build)


_timm_entrypoint("ecif_test_vit", VisionTransformer, img_size=32, patch_size=8, embed_dim=32, depth=1, num_heads=2)
_timm_entrypoint("ecif_test_convnext", ConvNeXt, depths=(1, 1, 1, 1), dims=(8, 16, 24, 32))


def _text_transformer(**extra) -> dict:
    return {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1, **extra}  # open_clip's BPE


def _configs(folder: Path) -> dict[str, dict]:
    """open_clip configs of one tiny model per family, the Hugging Face parts pointing into ``folder``."""
    bert = {"hf_model_name": str(folder), "hf_tokenizer_name": str(folder), "hf_pooler_type": "mean_pooler", "context_length": 16}
    return {
        # SigLIP's shape: timm ViT with attention pooling ('map') and no projection; text projection with a bias.
        "ecif-test-sig": {
            "embed_dim": 32,
            "vision_cfg": {"image_size": 32, "timm_model_name": "ecif_test_vit", "timm_pool": "map", "timm_proj": "none"},
            "text_cfg": _text_transformer(vocab_size=64, hf_tokenizer_name=HUB_TOKENIZER, proj_bias=True, no_causal_mask=True, pool_type="last"),
        },
        "ecif-test-convnext-bert": {
            "embed_dim": 16,
            "vision_cfg": {"image_size": 32, "timm_model_name": "ecif_test_convnext", "timm_pool": "", "timm_proj": "linear",
                           "timm_proj_bias": True},
            "text_cfg": {**bert, "hf_proj_type": "mlp"},
        },
        "ecif-test-vitmlp-bert": {
            "embed_dim": 16,
            "vision_cfg": {"image_size": 32, "timm_model_name": "ecif_test_vit", "timm_pool": "token", "timm_proj": "mlp",
                           "timm_proj_bias": True},
            "text_cfg": {**bert, "hf_proj_type": "linear"},
        },
        # EVA02's, MobileCLIP's: timm_proj unset, the timm model's classifier (with a bias) is the projection.
        "ecif-test-vit-classifier": {
            "embed_dim": 16,
            "vision_cfg": {"image_size": 32, "timm_model_name": "ecif_test_vit", "timm_pool": "token", "timm_proj": None},
            "text_cfg": _text_transformer(),
        },
        "ecif-test-resnet": {
            "embed_dim": 16,
            "vision_cfg": {"image_size": 32, "layers": [1, 1, 1, 1], "width": 8},
            "text_cfg": _text_transformer(),
        },
    }


FAMILIES = ["ecif-test-sig", "ecif-test-convnext-bert", "ecif-test-vitmlp-bert", "ecif-test-vit-classifier", "ecif-test-resnet"]


def _write_tokenizer(folder: Path) -> Path:
    """A word-piece tokenizer over the demo captions' words, and a 1-layer BERT config, saved in ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    vocab = folder / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS.split()]) + "\n")
    transformers.BertTokenizerFast(vocab_file=str(vocab)).save_pretrained(folder)
    transformers.BertConfig(
        vocab_size=64, hidden_size=24, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32, max_position_embeddings=16
    ).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def families(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Each family's name → a checkpoint of seeded random weights; the configs registered with open_clip."""
    root = tmp_path_factory.mktemp("towers")
    tokenizer = _write_tokenizer(root / "tokenizer")
    checkpoints = {}
    for name, config in _configs(tokenizer).items():
        (root / f"{name}.json").write_text(json.dumps(config))
        open_clip.add_model_config(root / f"{name}.json")
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            model = open_clip.create_model(name, pretrained_text=False)
        checkpoints[name] = save_checkpoint(model, root / f"{name}.safetensors")
    return checkpoints


@pytest.fixture(scope="module")
def tokenizer_folder(families: dict[str, Path]) -> Path:
    return families["ecif-test-sig"].parent / "tokenizer"


@pytest.fixture(scope="module")
def demo_manifest(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_demo_data("shapes", tmp_path_factory.mktemp("towers-data"), n=PAIRS, noise=0.1)


def _load(name: str, families: dict[str, Path], tokenizer_folder: Path):
    return load_model(name, checkpoint=families[name], tokenizer=tokenizer_folder if name == "ecif-test-sig" else None)


def _embeddings_error(loaded, scope: HeadsScope, theta: torch.Tensor, pixels: torch.Tensor, captions: list[str]) -> float:
    """Largest difference between ecif's unit embeddings (scope of cached features) and open_clip's own."""
    image = torch.as_tensor(encode_images(loaded, pixels), dtype=torch.float64)
    text = torch.as_tensor(encode_captions(loaded, captions), dtype=torch.float64)
    ours = [torch.nn.functional.normalize(project(theta, features), dim=-1) for project, features in
            ((scope.project_image, image), (scope.project_text, text))]
    with torch.inference_mode():
        theirs = [loaded.model.encode_image(pixels, normalize=True), loaded.model.encode_text(loaded.tokenizer(captions), normalize=True)]
    return max(float((a - b.double()).abs().max()) for a, b in zip(ours, theirs))


@pytest.mark.parametrize("name", FAMILIES)
def test_embeddings_equal_open_clips_own_and_theta_writes_back(name, families, tokenizer_folder, demo_manifest) -> None:
    loaded = _load(name, families, tokenizer_folder)
    frame = load_manifest(demo_manifest).frame.iloc[:6]
    pixels, failed = load_images(frame["filepath"].tolist(), loaded.preprocess)
    captions = frame["caption"].tolist()
    assert not failed
    scope, theta0 = initial_scope(loaded.model)
    image_head, text_head = projection_heads(loaded.model)
    assert (scope.image_dim, scope.text_dim) == (image_head.input_dim, text_head.input_dim)
    # Measured: at most 3e-7 (float32 backbones); the heads themselves are exact.
    assert _embeddings_error(loaded, scope, theta0, pixels, captions) < 1e-5

    moved = theta0 + 0.05 * torch.randn(theta0.shape, dtype=theta0.dtype, generator=torch.Generator().manual_seed(1))
    write_scope(loaded.model, scope, moved)
    assert _embeddings_error(loaded, scope, moved, pixels, captions) < 1e-5
    np.testing.assert_allclose(initial_scope(loaded.model)[1].numpy(), moved.numpy(), rtol=1e-6, atol=1e-7)


def test_each_family_has_the_scope_it_documents(families, tokenizer_folder) -> None:
    """The head, the bias column and the offset of each family, and that scope records round-trip."""
    expected = {
        # name: (image d, image offset, text d, embedding width)
        "ecif-test-sig": (32 * 4 + 1, True, 32 + 1, 32),  # attention pool's mlp.fc2 (hidden 4·32) + bias; text bias
        "ecif-test-convnext-bert": (32 + 1, False, (24 + 16) // 2, 16),  # head.proj + bias; BERT mlp's last layer
        "ecif-test-vitmlp-bert": (2 * 16 + 1, False, 24, 16),  # head.mlp.fc2 + bias; BERT linear
        "ecif-test-vit-classifier": (32 + 1, False, 32, 16),  # trunk.head + bias; text_projection
        "ecif-test-resnet": (8 * 32 + 1, False, 32, 16),  # attnpool.c_proj + bias; text_projection
    }
    for name, (image_dim, offset, text_dim, embed_dim) in expected.items():
        heads = get_heads(_load(name, families, tokenizer_folder).model)
        scope = heads.scope()
        assert (scope.image_dim, scope.image_offset, scope.text_dim, scope.text_offset, scope.embed_dim) == (
            image_dim, offset, text_dim, False, embed_dim), name
        assert scope_from_dict(json.loads(json.dumps(scope.to_dict()))) == scope
    # A record from before the offsets reads as a scope without them.
    old = {"kind": "heads", "image_dim": 4, "text_dim": 3, "embed_dim": 2, "log_logit_scale": 1.0, "learn_logit_scale": 0}
    assert scope_from_dict(old) == HeadsScope(4, 3, 2, 1.0)
    assert HeadsScope(4, 3, 2, 1.0).to_dict() == {**old, "learn_logit_scale": False}


# One run (a few seconds on two free cores) covers the offset, the biases and the tokenizer folder; the
# other families' runs add up to about a quarter of a minute more and run with the slow checks.
@pytest.mark.parametrize("name", [FAMILIES[0], *(pytest.param(name, marks=pytest.mark.slow) for name in FAMILIES[1:])])
def test_a_run_scores_end_to_end(name, families, tokenizer_folder, demo_manifest, tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("ECIF_CACHE", str(tmp_path / "cache"))
    config = ecif.RunConfig(
        run_dir=tmp_path / "run",
        manifest=demo_manifest,
        model=name,
        checkpoint=families[name],
        tokenizer=tokenizer_folder if name == "ecif-test-sig" else None,
        # δ fixed (choosing it fine-tunes six times) and large: a random tower maps every image to nearly
        # one feature, and with δ = 10 the SigLIP-like head (whose offset it can cancel) collapses some
        # embeddings towards 0 (measured: not converged after 289 L-BFGS steps, Hessian indefinite);
        # δ = 100 converges in under 40 steps to a Hessian with smallest eigenvalue ≈ 80.
        finetune=ecif.FinetuneConfig(delta=100.0),
    )
    run = ecif.run_pipeline(config)
    assert run.info["stages"]["fine-tune"]["converged"]
    scores = run.scores()
    assert len(scores) == int((run.manifest()["split"] == "train").sum())
    assert np.isfinite(scores["influence"]).all()
    engine = load_engine(run)
    assert engine.scope == initial_scope(_load(name, families, tokenizer_folder).model)[0].with_logit_scale(engine.scope.log_logit_scale)
    if name == "ecif-test-sig":
        assert run.info["settings"]["tokenizer"] == str(tokenizer_folder)


def test_unsupported_families_are_refused_by_name_before_any_work(families, tmp_path) -> None:
    with pytest.raises(UnsupportedModelError, match=r"coca_ViT-B-32: CoCa models .* are not supported; the heads scope supports image towers"):
        refuse_unsupported_config("coca_ViT-B-32")
    config = ecif.RunConfig(run_dir=tmp_path / "run", model="coca_ViT-B-32", checkpoint=families["ecif-test-resnet"])
    with pytest.raises(UnsupportedModelError, match="CoCa"):
        ecif.run_pipeline(config)
    blocks = ecif.RunConfig(run_dir=tmp_path / "run", model="ecif-test-resnet", checkpoint=families["ecif-test-resnet"],
                            finetune=ecif.FinetuneConfig(blocks=1))
    with pytest.raises(UnsupportedModelError, match="the blocks scope needs an open_clip VisionTransformer"):
        ecif.run_pipeline(blocks)
    assert not (tmp_path / "run").exists()
    with pytest.raises(UnsupportedModelError, match="the blocks scope is not supported for image tower ModifiedResNet"):
        initial_scope(load_model("ecif-test-resnet", checkpoint=families["ecif-test-resnet"]).model, blocks=1)


def test_a_hub_tokenizer_is_refused_offline_with_what_to_pass(families, tmp_path) -> None:
    with pytest.raises(ModelLoadError, match=r"comes from the Hugging Face hub \('ecif-test/tiny-wordpiece'\).*--tokenizer PATH"):
        load_model("ecif-test-sig", checkpoint=families["ecif-test-sig"])
    config = ecif.RunConfig(run_dir=tmp_path / "run", model="ecif-test-sig", checkpoint=families["ecif-test-sig"])
    with pytest.raises(ModelLoadError, match="--tokenizer PATH"):
        ecif.run_pipeline(config)
    assert not (tmp_path / "run").exists()
    with pytest.raises(ModelLoadError, match="has its tokenizer built in"):
        load_model("ecif-test-resnet", checkpoint=families["ecif-test-resnet"], tokenizer=tmp_path)


def test_a_hub_tokenizer_is_read_from_a_folder_or_the_local_cache(families, tokenizer_folder, tmp_path, monkeypatch) -> None:
    import huggingface_hub.constants

    captions = ["a large blue circle at the bottom left", "there is a small red star"]
    from_folder = load_model("ecif-test-sig", checkpoint=families["ecif-test-sig"], tokenizer=tokenizer_folder)
    expected = transformers.BertTokenizerFast.from_pretrained(tokenizer_folder)(captions, padding="max_length", max_length=16)["input_ids"]
    assert from_folder.tokenizer(captions).tolist() == expected
    # The folder's files are part of what the features are keyed by.
    assert from_folder.model_hash != load_model("ecif-test-resnet", checkpoint=families["ecif-test-resnet"]).model_hash

    # The same files as a snapshot of HUB_TOKENIZER in a Hugging Face cache: found there, offline.
    cache = tmp_path / "hub"
    repository = cache / f"models--{HUB_TOKENIZER.replace('/', '--')}"
    snapshot = repository / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    for path in tokenizer_folder.iterdir():
        (snapshot / path.name).write_bytes(path.read_bytes())
    (repository / "refs").mkdir()
    (repository / "refs" / "main").write_text("0" * 40)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    from_cache = load_model("ecif-test-sig", checkpoint=families["ecif-test-sig"])
    assert from_cache.tokenizer(captions).tolist() == expected


def test_the_command_line_takes_a_tokenizer_folder(families, tokenizer_folder, demo_manifest, tmp_path, monkeypatch, capsys) -> None:
    from ecif.cli import main

    monkeypatch.setenv("ECIF_CACHE", str(tmp_path / "cache"))
    command = ["features", "--manifest", str(demo_manifest), "--model", "ecif-test-sig", "--checkpoint",
               str(families["ecif-test-sig"]), "--out", str(tmp_path / "run")]
    assert main(command) == 1
    assert "pass a local tokenizer folder (command line --tokenizer PATH" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()
    assert main([*command, "--tokenizer", str(tokenizer_folder), "--json"]) == 0
    stage = json.loads(capsys.readouterr().out)
    assert (stage["image_dim"], stage["text_dim"]) == (32 * 4 + 1 + 32, 32 + 1)  # fc2's input, bias column, offset
    assert ecif.Run(tmp_path / "run").info["settings"]["tokenizer"] == str(tokenizer_folder)
