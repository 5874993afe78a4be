"""open_clip architecture configs that ship with ecif, registered with open_clip on import.

"ecif-demo" (``ecif-demo.json``) is a tiny CLIP for the 64×64 demo data sets: a 4-layer ViT with
16×16 patches (16 tokens; 8×8 patches learned no faster per epoch and cost twice as much) and a
3-layer text transformer (context 32, open_clip's bundled BPE tokenizer, so it works offline).
Both backbones are 96 wide and project to a 64-d joint space, so the two projection heads that
form the default influence scope have 2·96·64 = 12288 parameters: small enough for the
dense-Hessian reference solver.
"""

from __future__ import annotations

from pathlib import Path

import open_clip

DEMO_MODEL_NAME = "ecif-demo"
DEMO_CONFIG_FILE = Path(__file__).with_name(f"{DEMO_MODEL_NAME}.json")


def register_configs() -> None:
    """Make ``open_clip.create_model("ecif-demo")`` work (idempotent)."""
    if DEMO_MODEL_NAME not in open_clip.list_models():
        open_clip.add_model_config(DEMO_CONFIG_FILE)


register_configs()
