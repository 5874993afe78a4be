"""Zero-shot classes: the class names of a labelled dataset and the prompts that describe each class.

A class is scored by the mean of its prompts' text embeddings (prompt ensembling), so the prompts
should read like the captions the model was trained on.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from ecif.run import atomic_write_json

CLASSES_FILE_NAME = "classes.json"

DEFAULT_TEMPLATES: tuple[str, ...] = (
    "a photo of a {label}.",
    "a picture of a {label}.",
    "an image of a {label}.",
    "a photo of the {label}.",
    "a {label}.",
)
"""Prompt templates for datasets that only give a ``label`` column (CLIP's generic photo prompts)."""


class ClassesError(ValueError):
    """A ``classes.json`` that cannot be read or has the wrong shape."""


@dataclass
class ZeroShotClasses:
    """Class names (in a fixed order: prediction index ``i`` means ``names[i]``) and their prompts."""

    names: list[str]
    prompts: dict[str, list[str]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        # A class without prompts could never be predicted; fall back to the generic templates.
        for name in self.names:
            if not self.prompts.get(name):
                self.prompts[name] = [template.format(label=name) for template in DEFAULT_TEMPLATES]

    @classmethod
    def from_labels(
        cls, labels: Iterable[str], templates: Iterable[str] = DEFAULT_TEMPLATES
    ) -> ZeroShotClasses:
        """Classes named by the distinct ``labels`` (sorted), each prompted by every template."""
        names = sorted(set(labels))
        templates = tuple(templates)
        return cls(names, {name: [template.format(label=name) for template in templates] for name in names})

    def to_json(self) -> dict[str, object]:
        return {"names": list(self.names), "prompts": {name: list(self.prompts[name]) for name in self.names}}

    @classmethod
    def from_json(cls, value: object) -> ZeroShotClasses:
        """Parse ``{"names": [...], "prompts": {name: [...]}}``; ``prompts`` may be omitted."""
        if not isinstance(value, dict) or not isinstance(value.get("names"), list) or not value["names"]:
            raise ClassesError('expected {"names": [...], "prompts": {...}} with at least one name')
        prompts = value.get("prompts") or {}
        if not isinstance(prompts, dict):
            raise ClassesError('"prompts" must map a class name to a list of prompt strings')
        names = [str(name) for name in value["names"]]
        return cls(names, {name: [str(prompt) for prompt in prompts.get(name, [])] for name in names})

    def save(self, path: Path) -> None:
        atomic_write_json(path, self.to_json())

    @classmethod
    def load(cls, path: Path) -> ZeroShotClasses:
        try:
            return cls.from_json(json.loads(Path(path).read_text(encoding="utf-8")))
        except (OSError, json.JSONDecodeError, ClassesError) as error:
            raise ClassesError(f"{path}: {error}") from error
