"""open_clip architecture configs that ship with ecif, registered with open_clip on import.

"ecif-demo" (``ecif-demo.json``) is a tiny CLIP for the 64×64 demo data sets: a 4-layer ViT with
16×16 patches (16 tokens; 8×8 patches learned no faster per epoch and cost twice as much) and a
3-layer text transformer (context 32, open_clip's bundled BPE tokenizer, so it works offline).
Both backbones are 96 wide and project to a 64-d joint space, so the two projection heads that
form the default influence scope have 2·96·64 = 12288 parameters: small enough for the
dense-Hessian reference solver.

"ecif-demo-sigmoid" (``ecif-demo-sigmoid.json``) is the same architecture with a logit bias, for the
demo trained with SigLIP's sigmoid loss: open_clip gives a model a learnt ``logit_bias`` when its
config has ``init_logit_bias`` (SigLIP's initialisation: bias −10, logit scale 10).  Its name must not
contain "siglip": open_clip would then give it SigLIP's tokenizer, whose vocabulary is a download.
"""

from __future__ import annotations

from pathlib import Path

import open_clip

from ecif.config import Loss

DEMO_MODEL_NAME = "ecif-demo"
#: The demo architecture per training loss (see :data:`ecif.config.LOSSES`).
DEMO_MODEL_NAMES: dict[Loss, str] = {"clip": DEMO_MODEL_NAME, "siglip": f"{DEMO_MODEL_NAME}-sigmoid"}


def demo_config_file(loss: Loss) -> Path:
    """The open_clip config file of the demo architecture trained with ``loss``."""
    return Path(__file__).with_name(f"{DEMO_MODEL_NAMES[loss]}.json")


def register_configs() -> None:
    """Make ``open_clip.create_model("ecif-demo")`` (and ``"ecif-demo-sigmoid"``) work (idempotent)."""
    for loss, name in DEMO_MODEL_NAMES.items():
        if name not in open_clip.list_models():
            open_clip.add_model_config(demo_config_file(loss))


register_configs()
