"""Loading open_clip models offline, from a checkpoint file or a locally cached pretrained tag.

Nothing here touches the network: a pretrained tag is only used when its weights are already in
the local Hugging Face or open_clip cache, and checkpoint files are read as safetensors or with
``torch.load(weights_only=True)``, so a checkpoint can never run code.  A tokenizer that open_clip
would fetch from the Hugging Face hub comes from a local folder or the local cache (:func:`load_tokenizer`).
"""

from __future__ import annotations

import difflib
import json
import logging
import os
import pickle
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import open_clip
import safetensors
import safetensors.torch
import torch
from open_clip.constants import HF_SAFE_WEIGHTS_NAME, HF_WEIGHTS_NAME
from open_clip.tokenizer import DEFAULT_CONTEXT_LENGTH, HFTokenizer
from open_clip.transform import PreprocessCfg, image_transform_v2
from PIL import Image

# Registers the "ecif-demo" architecture with open_clip before any name is looked up.
import ecif.models.configs  # noqa: F401  (imported for its side effect)
from ecif.paths import file_sha256, text_sha256
from ecif.run import atomic_write_bytes

Preprocess = Callable[[Image.Image], torch.Tensor]
"""PIL image -> float tensor [3, H, W] (open_clip's evaluation transform: resize, crop, normalise)."""
Tokenizer = Callable[[list[str]], torch.Tensor]
"""Captions -> token ids, int64 tensor [k, context_length]."""

# How many offending keys an error message lists before it says "and N more".
_MAX_LISTED = 5

# Preprocessing settings a pretrained tag may override (e.g. SigLIP's mean/std).
_TAG_PREPROCESS_KEYS = ("mean", "std", "interpolation", "resize_mode")


class ModelLoadError(RuntimeError):
    """A model could not be built or its weights could not be loaded; the message says why and what to do."""


@dataclass
class LoadedModel:
    """An open_clip model ready for inference, with everything needed to feed it.

    ``model_hash`` identifies the weights: the SHA-256 of the checkpoint file, or a hash of
    ``name`` and ``pretrained`` (or of ``name`` and the random-initialisation seed, so two
    untrained loads with one seed are the same model and share caches), and the ``tokenizer``
    folder's files when one was given. Caches of features computed with this model are keyed by it.
    """

    model: torch.nn.Module
    preprocess: Preprocess
    tokenizer: Tokenizer
    name: str
    checkpoint: Path | None
    pretrained: str | None
    model_hash: str

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device


def load_model(
    name: str,
    checkpoint: str | os.PathLike[str] | None = None,
    pretrained: str | None = None,
    device: str | torch.device = "cpu",
    seed: int = 0,
    tokenizer: str | os.PathLike[str] | None = None,
) -> LoadedModel:
    """Build open_clip architecture ``name`` (any of ``open_clip.list_models()``, or "ecif-demo").

    Weights come from ``checkpoint`` (a ``.safetensors`` file, or a torch file holding a state dict
    or ``{"state_dict": ...}``), from ``pretrained`` (an open_clip tag such as "laion2b_s34b_b79k",
    only if already cached locally), or, when neither is given, from a seeded random
    initialisation with ``seed``. The model is returned in eval mode on ``device``. ``tokenizer``:
    a local tokenizer folder for an architecture whose tokenizer comes from the Hugging Face hub
    (:func:`load_tokenizer`).

    Raises :class:`ModelLoadError` for an unknown name, a tag that is not cached, a checkpoint
    that is unreadable or does not fit the architecture, or a tokenizer that is not available offline.
    """
    if checkpoint is not None and pretrained is not None:
        raise ModelLoadError("give either a checkpoint file or a pretrained tag, not both")
    if name not in open_clip.list_models():
        raise ModelLoadError(_unknown_model_message(name))
    model_hash = weights_hash(name, checkpoint, pretrained, seed, tokenizer)
    text_tokenizer = load_tokenizer(name, tokenizer)  # before the model: refusing it costs nothing

    preprocess_overrides: dict[str, object] = {}
    quick_gelu = False
    weights_file: Path | None = None
    if checkpoint is not None:
        weights_file = Path(checkpoint).expanduser().resolve()
    elif pretrained is not None:
        tag_cfg = open_clip.get_pretrained_cfg(name, pretrained)
        if not tag_cfg:
            known = open_clip.list_pretrained_tags_by_model(name)
            raise ModelLoadError(
                f"unknown pretrained tag {pretrained!r} for {name!r}; known tags: {known or 'none'}"
            )
        weights_file = _cached_pretrained_file(name, pretrained, tag_cfg)
        preprocess_overrides = {k: tag_cfg[k] for k in _TAG_PREPROCESS_KEYS if k in tag_cfg}
        # open_clip only warns when a tag was trained with QuickGELU and the config lacks it; the
        # weights are then silently wrong, so follow the tag.
        quick_gelu = bool(tag_cfg.get("quick_gelu", False))

    # Seeded even when weights are loaded afterwards: then it costs nothing and changes nothing.
    with torch.random.fork_rng(devices=[]), _quiet_random_init_warning():
        torch.manual_seed(seed)
        model = open_clip.create_model(
            name,
            pretrained=None,
            force_quick_gelu=quick_gelu,
            force_preprocess_cfg=preprocess_overrides,
            pretrained_text=False,  # hf text towers would otherwise try to download base weights
        )
    if weights_file is not None:
        load_weights(model, read_state_dict(weights_file), weights_file)
    model.to(device).eval()

    # open_clip's evaluation transform (resize, centre crop, normalise), as create_model_and_transforms builds it.
    preprocess = image_transform_v2(PreprocessCfg(**model.visual.preprocess_cfg), is_train=False)
    return LoadedModel(
        model=model,
        preprocess=preprocess,
        tokenizer=text_tokenizer,
        name=name,
        checkpoint=weights_file if checkpoint is not None else None,
        pretrained=pretrained,
        model_hash=model_hash,
    )


def require_weights(name: str, checkpoint: str | os.PathLike[str] | None, pretrained: str | None) -> None:
    """Refuse to score with a randomly initialised model.

    :func:`load_model` builds random weights when given neither a checkpoint nor a tag (the demo
    model starts that way before its training, and tests save such models); a user who names an
    architecture and forgets ``--checkpoint`` would otherwise get meaningless scores without a word.
    """
    if checkpoint is None and pretrained is None:
        raise ModelLoadError(
            f"model {name!r} needs its weights: a local checkpoint file (.safetensors or a torch state "
            "dict; command line --checkpoint, app 'Local checkpoint path') or a pretrained tag that open_clip has "
            "cached (--pretrained; nothing is downloaded). Without either it would be randomly initialised. "
            "For the built-in model choose 'demo'."
        )
    if checkpoint is not None:
        checkpoint_file(checkpoint)


def checkpoint_file(checkpoint: str | os.PathLike[str]) -> Path:
    """The checkpoint's absolute path; :class:`ModelLoadError` if no such file exists."""
    path = Path(checkpoint).expanduser().resolve()
    if not path.is_file():
        raise ModelLoadError(f"checkpoint {path} does not exist")
    return path


def weights_hash(
    name: str,
    checkpoint: str | os.PathLike[str] | None = None,
    pretrained: str | None = None,
    seed: int = 0,
    tokenizer: str | os.PathLike[str] | None = None,
) -> str:
    """The :attr:`LoadedModel.model_hash` that :func:`load_model` gives these arguments, without
    building the model: the checkpoint file's SHA-256, else a hash of the name and the tag (or seed);
    with a ``tokenizer`` folder, a hash of that and of the folder's files (its tokens change the text
    features). Raises :class:`ModelLoadError` if the checkpoint file does not exist."""
    if checkpoint is not None:
        weights = file_sha256(checkpoint_file(checkpoint))
    elif pretrained is not None:
        weights = text_sha256(name, pretrained)
    else:
        weights = text_sha256(name, f"random-init-seed-{seed}")
    if tokenizer is None:
        return weights
    folder = tokenizer_folder(tokenizer)
    files = sorted(path for path in folder.rglob("*") if path.is_file())
    return text_sha256(weights, *(f"{path.relative_to(folder)}\x1e{file_sha256(path)}" for path in files))


def load_tokenizer(name: str, tokenizer: str | os.PathLike[str] | None = None) -> Tokenizer:
    """The tokenizer of open_clip architecture ``name``, offline.

    Most architectures bundle their vocabulary (open_clip's BPE) and take no ``tokenizer``. Those
    whose config names a Hugging Face tokenizer (``hf_tokenizer_name``: SigLIP, the Hugging Face text
    towers, CLIPA) read it from ``tokenizer``, a local folder with its files (as
    ``save_pretrained`` writes them), or else from the local Hugging Face cache, never the network.
    Raises :class:`ModelLoadError` saying what to pass when neither has it.
    """
    text_cfg = (open_clip.get_model_config(name) or {}).get("text_cfg", {})
    hub_name = text_cfg.get("hf_tokenizer_name")
    if not hub_name:
        if tokenizer is not None:
            raise ModelLoadError(
                f"{name!r} has its tokenizer built in (open_clip's); a tokenizer folder is only for models "
                "whose tokenizer comes from the Hugging Face hub (hf_tokenizer_name in their config)"
            )
        return open_clip.get_tokenizer(name)
    source = str(tokenizer_folder(tokenizer)) if tokenizer is not None else hub_name
    try:
        # As open_clip.get_tokenizer builds it from the config, from `source` and without the network.
        return HFTokenizer(
            source,
            context_length=text_cfg.get("context_length", DEFAULT_CONTEXT_LENGTH),
            tokenizer_mode=text_cfg.get("tokenizer_mode"),
            local_files_only=True,
            **text_cfg.get("tokenizer_kwargs", {}),
        )
    except Exception as error:
        where = f"the folder {source}" if tokenizer is not None else "the local Hugging Face cache"
        raise ModelLoadError(
            f"the tokenizer of {name!r} comes from the Hugging Face hub ({hub_name!r}) and {where} does not "
            "hold it; this machine is offline: pass a local tokenizer folder (command line --tokenizer PATH, "
            "RunConfig.tokenizer), e.g. one written elsewhere by transformers' "
            f"AutoTokenizer.from_pretrained({hub_name!r}).save_pretrained(PATH), or put it in the local Hugging "
            f"Face cache ({type(error).__name__}: {error})"
        ) from error


def tokenizer_folder(tokenizer: str | os.PathLike[str]) -> Path:
    """The tokenizer folder's absolute path; :class:`ModelLoadError` if no such folder exists."""
    path = Path(tokenizer).expanduser().resolve()
    if not path.is_dir():
        raise ModelLoadError(f"tokenizer folder {path} does not exist")
    return path


def read_state_dict(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """Tensors of a checkpoint file, without ever unpickling arbitrary objects.

    ``.safetensors`` files are read directly; anything else goes through
    ``torch.load(weights_only=True)`` and may hold the state dict itself or ``{"state_dict": ...}``.
    A ``module.`` prefix (left by DataParallel/DDP) is stripped from every key.
    """
    path = checkpoint_file(path)
    try:
        if path.suffix == ".safetensors":
            state = _read_safetensors(path)
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        raise ModelLoadError(
            f"checkpoint {path} holds more than plain tensors and ecif refuses to unpickle it "
            f"(it could run code); re-save its state dict with safetensors or torch.save: {error}"
        ) from error
    except Exception as error:
        raise ModelLoadError(f"cannot read checkpoint {path}: {error}") from error

    if isinstance(state, Mapping) and isinstance(state.get("state_dict"), Mapping):
        state = state["state_dict"]
    if not isinstance(state, Mapping) or not state:
        raise ModelLoadError(f"checkpoint {path} does not contain a state dict")
    not_tensors = [key for key, value in state.items() if not isinstance(value, torch.Tensor)]
    if not_tensors:
        raise ModelLoadError(
            f"checkpoint {path} is not a plain state dict: {_listed(not_tensors)} are not tensors"
        )
    return {key.removeprefix("module."): value for key, value in state.items()}


def load_weights(model: torch.nn.Module, state: Mapping[str, torch.Tensor], source: Path) -> None:
    """Copy ``state`` into ``model``; every key and shape must match (``source`` names the file in errors)."""
    expected = model.state_dict()
    state = dict(state)
    # Older checkpoints store the logit scale/bias as [1] where the model has [] (or the reverse).
    for key in ("logit_scale", "logit_bias"):
        if key in state and key in expected and state[key].numel() == expected[key].numel():
            state[key] = state[key].reshape(expected[key].shape)

    missing = [key for key in expected if key not in state]
    unexpected = [key for key in state if key not in expected]
    wrong_shape = [
        f"{key} (file {tuple(state[key].shape)}, model {tuple(expected[key].shape)})"
        for key in expected
        if key in state and state[key].shape != expected[key].shape
    ]
    problems = []
    if wrong_shape:
        problems.append(f"wrong shapes: {_listed(wrong_shape)}")
    if missing:
        problems.append(f"missing keys: {_listed(missing)}")
    if unexpected:
        problems.append(f"unexpected keys: {_listed(unexpected)}")
    if problems:
        raise ModelLoadError(
            f"checkpoint {source} does not fit this architecture ({len(expected)} tensors expected); "
            + "; ".join(problems)
        )
    model.load_state_dict(state, strict=True)


#: safetensors metadata key: ``{name: shape}`` of the tensors stored as their kept rows only
#: (``name.rows`` int64 [k], ``name.values`` [k, ...]; every other row is zero).
ROW_SPARSE_METADATA = "ecif.row_sparse"


def save_checkpoint(
    model: torch.nn.Module, path: str | os.PathLike[str], kept_rows: Mapping[str, torch.Tensor] | None = None
) -> Path:
    """Write ``model``'s state dict as safetensors (atomically), loadable by :func:`load_model`.

    ``kept_rows`` maps a tensor's name to the row indices worth storing; its other rows are left
    out of the file and read back as zeros. The shipped demo model keeps only the rows of its
    49,408-token embedding that the demo's captions use: 2.4 MB instead of 22 MB.
    """
    path = Path(path)
    # safetensors refuses tensors that share storage or are views; plain contiguous copies are safe.
    tensors = {key: value.detach().cpu().contiguous().clone() for key, value in model.state_dict().items()}
    sparse: dict[str, list[int]] = {}
    for name, rows in (kept_rows or {}).items():
        full = tensors.pop(name)
        rows = torch.as_tensor(rows, dtype=torch.int64).unique()
        tensors[f"{name}.rows"], tensors[f"{name}.values"] = rows, full[rows].contiguous()
        sparse[name] = list(full.shape)
    metadata = {ROW_SPARSE_METADATA: json.dumps(sparse)} if sparse else None
    atomic_write_bytes(path, safetensors.torch.save(tensors, metadata=metadata))
    return path


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """A safetensors file's tensors, with row-sparse ones (see :func:`save_checkpoint`) made whole."""
    with safetensors.safe_open(str(path), framework="pt", device="cpu") as handle:
        metadata = handle.metadata() or {}
        state = {key: handle.get_tensor(key) for key in handle.keys()}
    for name, shape in json.loads(metadata.get(ROW_SPARSE_METADATA, "{}")).items():
        rows, values = state.pop(f"{name}.rows"), state.pop(f"{name}.values")
        state[name] = torch.zeros(shape, dtype=values.dtype).index_copy_(0, rows, values)
    return state


def _cached_pretrained_file(name: str, tag: str, tag_cfg: Mapping[str, object]) -> Path:
    """The local file of an open_clip pretrained tag, looked up in the caches without any download."""
    hf_hub = str(tag_cfg.get("hf_hub") or "")
    if hf_hub:
        from huggingface_hub import try_to_load_from_cache

        repo_id, filename = os.path.split(hf_hub)
        filename = filename or HF_WEIGHTS_NAME
        # open_clip prefers a safetensors sibling of the pickled file when the repository has one.
        candidates = [HF_SAFE_WEIGHTS_NAME, str(Path(filename).with_suffix(".safetensors")), filename]
        for candidate in dict.fromkeys(candidates):
            cached = try_to_load_from_cache(repo_id, candidate)
            if isinstance(cached, str) and Path(cached).is_file():
                return Path(cached)
    url = str(tag_cfg.get("url") or "")
    if url:
        cached_file = Path("~/.cache/clip").expanduser() / os.path.basename(url)
        if cached_file.is_file():
            return cached_file
    raise ModelLoadError(
        f"pretrained weights {tag!r} for {name!r} are not in the local cache and this machine is "
        "offline; download the checkpoint file elsewhere and pass --checkpoint PATH"
    )


@contextmanager
def _quiet_random_init_warning() -> Iterator[None]:
    """Hide open_clip's "Model initialized randomly" warning: we either load the weights ourselves
    right after, or want a random initialisation (demo training, tests)."""

    def keep(record: logging.LogRecord) -> bool:
        return "initialized randomly" not in record.getMessage()

    root = logging.getLogger()
    root.addFilter(keep)
    try:
        yield
    finally:
        root.removeFilter(keep)


def _unknown_model_message(name: str) -> str:
    close = difflib.get_close_matches(name, open_clip.list_models(), n=5, cutoff=0.5)
    hint = f"; close names: {', '.join(close)}" if close else ""
    return (
        f"unknown model {name!r}{hint} "
        f"(see open_clip.list_models() for all {len(open_clip.list_models())} architectures; "
        "'hf-hub:' names need the network and are not supported)"
    )


def _listed(items: list[str]) -> str:
    shown = ", ".join(items[:_MAX_LISTED])
    return shown + (f" and {len(items) - _MAX_LISTED} more" if len(items) > _MAX_LISTED else "")
