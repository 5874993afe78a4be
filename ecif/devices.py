"""Where the work runs: the ``device`` setting (``auto``, ``cpu``, ``cuda``, ``cuda:N``) resolved on this machine.

The setting's accepted forms are defined once, in :func:`ecif.config.parse_device`; this module asks
torch what the machine has.  Every stage keeps its maths in float64 on the resolved device, and every
file a run writes is the same in format whichever device wrote it (tensors are stored from the CPU),
so the device is not part of a run's settings: a run started on a GPU resumes on the CPU.
"""

from __future__ import annotations

import torch

from ecif.config import AUTO_DEVICE, parse_device


class DeviceUnavailable(ValueError):
    """The device asked for is not on this machine (as torch sees it)."""


def visible_devices() -> list[str]:
    """The devices torch can use here, CPU first: ``["cpu", "cuda:0", …]``."""
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    return ["cpu", *(f"cuda:{index}" for index in range(gpus))]


def device_choices() -> list[str]:
    """The settings a form offers on this machine: ``auto``, then every device torch sees."""
    return [AUTO_DEVICE, *visible_devices()]


def resolve_device(setting: str | torch.device) -> torch.device:
    """The device the ``setting`` names on this machine.

    ``auto``: the first GPU when ``torch.cuda.is_available()``, else the CPU.  ``cuda`` / ``cuda:N``
    on a machine without that GPU raises :class:`DeviceUnavailable` naming what torch sees; any other
    text raises ``ValueError`` listing the accepted forms (:func:`ecif.config.parse_device`).
    """
    if isinstance(setting, torch.device):
        setting = str(setting)
    setting = parse_device(setting)
    if setting == AUTO_DEVICE:
        return torch.device("cuda:0" if torch.cuda.is_available() else "cpu")
    device = torch.device(setting)
    if device.type == "cuda":
        visible = visible_devices()
        index = 0 if device.index is None else device.index
        if f"cuda:{index}" not in visible:
            seen = ", ".join(visible[1:]) or "no CUDA device"
            if not torch.cuda.is_available():
                seen += f" (torch {torch.__version__}, CUDA build {torch.version.cuda or 'none'})"
            instead = "cpu or auto" if len(visible) == 1 else f"one of {', '.join(visible)} or auto"
            raise DeviceUnavailable(f"device {setting!r} is not available: torch sees {seen}; pass --device {instead}")
        return torch.device("cuda", index)
    return device


def device_record(setting: str, device: torch.device) -> dict[str, str]:
    """What run.json records of a device: the setting asked for, the device used and its name."""
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    return {"setting": setting, "used": str(device), "name": name}
