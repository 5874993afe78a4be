"""Models: open_clip loading (offline), the demo model, backbone features, zero-shot, the projection heads."""

from ecif.models.configs import DEMO_MODEL_NAME
from ecif.models.demo import DemoTrainConfig, train_demo_model
from ecif.models.features import (
    Features,
    Heads,
    PromptFeatures,
    compute_features,
    encode_captions,
    encode_images,
    encode_prompts,
    get_heads,
    iter_chunk_features,
    load_images,
    set_heads,
)
from ecif.models.open_clip_models import LoadedModel, ModelLoadError, load_model, read_state_dict, save_checkpoint
from ecif.models.towers import UnsupportedModelError
from ecif.models.zero_shot import zero_shot, zero_shot_accuracy, zero_shot_probabilities

__all__ = [
    "DEMO_MODEL_NAME",
    "DemoTrainConfig",
    "Features",
    "Heads",
    "LoadedModel",
    "ModelLoadError",
    "PromptFeatures",
    "UnsupportedModelError",
    "compute_features",
    "encode_captions",
    "encode_images",
    "encode_prompts",
    "get_heads",
    "iter_chunk_features",
    "load_images",
    "load_model",
    "read_state_dict",
    "save_checkpoint",
    "set_heads",
    "train_demo_model",
    "zero_shot",
    "zero_shot_accuracy",
    "zero_shot_probabilities",
]
