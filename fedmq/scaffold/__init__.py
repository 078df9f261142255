"""Project templates for ``fedmq new`` (shipped inside the package).

A template is a directory under ``templates/``: files ending in ``.tmpl`` are rendered
(``{{name}}``, ``{{module}}``, ``{{template}}`` replaced; the suffix dropped), every
other file, such as the prebuilt model bundle, is copied byte for byte.  ``__module__``
in a file name becomes the project's data module name.
"""

from __future__ import annotations

import re
import shutil
from dataclasses import dataclass
from pathlib import Path

from fedmq.errors import ConfigError, InvalidIdentifierError
from fedmq.wire.ids import validate_id

TEMPLATES_DIR = Path(__file__).resolve().parent / "templates"
TEMPLATES = ("digits", "sensors")
TEMPLATE_SUFFIX = ".tmpl"
MODULE_PLACEHOLDER = "__module__"
# The shipped example bundles each template carries (fedmq simulate --model falls back
# to these outside a source checkout).
SHIPPED_BUNDLES = {"digits_mlp": "digits", "sensor_autoencoder": "sensors"}
_PLACEHOLDER = re.compile(r"\{\{\s*(\w+)\s*\}\}")
# The aggregator's client id is fedmq-aggregator-<name> and device ids <name>-device-<n>;
# both must stay within the 64-character id limit.
MAX_NAME_LENGTH = 40


@dataclass(frozen=True)
class Scaffold:
    """What ``fedmq new`` created."""

    directory: Path
    name: str
    module: str
    template: str
    files: tuple[Path, ...]


def shipped_bundle(model: str) -> Path | None:
    """The packaged copy of an example bundle, if a template carries it."""
    template = SHIPPED_BUNDLES.get(model)
    if template is None:
        return None
    directory = TEMPLATES_DIR / template / "bundle"
    return directory if (directory / "manifest.json").is_file() else None


def module_name(name: str) -> str:
    """The project's data module: ``<name>_data`` as a Python identifier."""
    module = re.sub(r"[^A-Za-z0-9_]", "_", name).lower() + "_data"
    return module if module[0].isalpha() else f"p_{module}"


def render(text: str, values: dict[str, str]) -> str:
    """Replace every ``{{key}}``.

    Raises:
        KeyError: a placeholder has no value (a broken template).
    """
    return _PLACEHOLDER.sub(lambda match: values[match[1]], text)


def create_project(directory: Path, template: str = "digits") -> Scaffold:
    """Create a project from ``template`` in ``directory`` (which must not hold files).

    The federation id is the directory's name.

    Raises:
        ConfigError: unknown template, a name that is not a valid id, or a directory
            that exists and is not empty.
    """
    if template not in TEMPLATES:
        raise ConfigError(f"unknown template {template!r}; choose one of {', '.join(TEMPLATES)}")
    name = directory.resolve().name
    try:
        validate_id(name, "project name")
    except InvalidIdentifierError as exc:
        raise ConfigError(f"{exc} (it becomes the federation id)") from None
    if len(name) > MAX_NAME_LENGTH:
        raise ConfigError(
            f"project name {name!r} is {len(name)} characters; at most {MAX_NAME_LENGTH} "
            "(the aggregator's and devices' ids are derived from it)"
        )
    if directory.exists() and (not directory.is_dir() or any(directory.iterdir())):
        raise ConfigError(f"{directory} already exists and is not empty")
    module = module_name(name)
    values = {"name": name, "module": module, "template": template}
    source = TEMPLATES_DIR / template
    created: list[Path] = []
    directory.mkdir(parents=True, exist_ok=True)
    for path in sorted(source.rglob("*")):
        if path.is_dir() or "__pycache__" in path.parts:
            continue
        relative = path.relative_to(source)
        target = directory / str(relative).replace(MODULE_PLACEHOLDER, module)
        target.parent.mkdir(parents=True, exist_ok=True)
        if path.name.endswith(TEMPLATE_SUFFIX):
            target = target.with_name(target.name.removesuffix(TEMPLATE_SUFFIX))
            target.write_text(render(path.read_text(encoding="utf-8"), values), encoding="utf-8")
        else:
            shutil.copyfile(path, target)
        created.append(target)
    return Scaffold(directory, name, module, template, tuple(created))
