"""Loading models offline: names, pretrained tags, checkpoint formats and their failure messages."""

from __future__ import annotations

import pytest
import torch

from ecif.models import LoadedModel, ModelLoadError, load_model, save_checkpoint
from ecif.paths import file_sha256


@pytest.fixture(scope="module")
def random_demo() -> LoadedModel:
    """An untrained ecif-demo model (seeded, so every test sees the same weights)."""
    return load_model("ecif-demo", seed=1)


def _same_weights(first: torch.nn.Module, second: torch.nn.Module) -> bool:
    a, b = first.state_dict(), second.state_dict()
    return a.keys() == b.keys() and all(torch.equal(a[key], b[key]) for key in a)


def test_unknown_name_lists_close_names() -> None:
    with pytest.raises(ModelLoadError, match=r"unknown model 'ViT-B32'.*close names: ViT-B-32"):
        load_model("ViT-B32")


def test_pretrained_tag_not_in_cache_says_how_to_proceed_offline() -> None:
    with pytest.raises(ModelLoadError) as caught:
        load_model("ViT-B-32", pretrained="laion2b_s34b_b79k")
    assert str(caught.value) == (
        "pretrained weights 'laion2b_s34b_b79k' for 'ViT-B-32' are not in the local cache and this "
        "machine is offline; download the checkpoint file elsewhere and pass --checkpoint PATH"
    )


def test_unknown_pretrained_tag_lists_known_tags() -> None:
    with pytest.raises(ModelLoadError, match=r"unknown pretrained tag 'nope'.*laion2b_s34b_b79k"):
        load_model("ViT-B-32", pretrained="nope")


def test_random_init_is_seeded_and_hashed(random_demo: LoadedModel) -> None:
    again = load_model("ecif-demo", seed=1)
    assert _same_weights(random_demo.model, again.model)
    assert again.model_hash == random_demo.model_hash
    assert load_model("ecif-demo", seed=2).model_hash != random_demo.model_hash
    assert not random_demo.model.training
    assert random_demo.tokenizer(["a red circle"]).shape == (1, 32)
    assert random_demo.preprocess.transforms[0].size == 64


def test_safetensors_roundtrip(random_demo: LoadedModel, tmp_path) -> None:
    path = save_checkpoint(random_demo.model, tmp_path / "demo.safetensors")
    loaded = load_model("ecif-demo", checkpoint=path)
    assert _same_weights(loaded.model, random_demo.model)
    assert loaded.checkpoint == path.resolve()
    assert loaded.model_hash == file_sha256(path)


def test_torch_file_with_wrapped_state_dict_and_module_prefix(random_demo: LoadedModel, tmp_path) -> None:
    state = {f"module.{key}": value for key, value in random_demo.model.state_dict().items()}
    path = tmp_path / "demo.pt"
    torch.save({"state_dict": state, "epoch": 3}, path)
    assert _same_weights(load_model("ecif-demo", checkpoint=path).model, random_demo.model)


class _NotATensor:
    pass


def test_torch_file_with_arbitrary_objects_is_never_unpickled(random_demo: LoadedModel, tmp_path) -> None:
    path = tmp_path / "pickled.pt"
    torch.save({"state_dict": random_demo.model.state_dict(), "extra": _NotATensor()}, path)
    with pytest.raises(ModelLoadError, match=r"pickled\.pt holds more than plain tensors.*refuses to unpickle"):
        load_model("ecif-demo", checkpoint=path)


def test_checkpoint_of_another_shape_names_file_and_mismatches(random_demo: LoadedModel, tmp_path) -> None:
    state = dict(random_demo.model.state_dict())
    state["visual.proj"] = torch.zeros(96, 16)
    del state["text_projection"]
    state["extra.weight"] = torch.zeros(1)
    path = tmp_path / "wrong.pt"
    torch.save(state, path)
    with pytest.raises(ModelLoadError) as caught:
        load_model("ecif-demo", checkpoint=path)
    message = str(caught.value)
    assert str(path) in message
    assert "wrong shapes: visual.proj (file (96, 16), model (96, 32))" in message
    assert "missing keys: text_projection" in message
    assert "unexpected keys: extra.weight" in message


def test_unreadable_or_missing_checkpoint(tmp_path) -> None:
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"not a safetensors file")
    with pytest.raises(ModelLoadError, match=r"cannot read checkpoint .*garbage\.safetensors"):
        load_model("ecif-demo", checkpoint=garbage)
    with pytest.raises(ModelLoadError, match=r"absent\.pt does not exist"):
        load_model("ecif-demo", checkpoint=tmp_path / "absent.pt")
    with pytest.raises(ModelLoadError, match="either a checkpoint file or a pretrained tag"):
        load_model("ecif-demo", checkpoint=garbage, pretrained="openai")
