"""Who may import whom: the layer table, checked over every import statement.

:data:`LAYERS` is the table of ``docs/architecture.md`` (a test checks that they agree).
For every module of ``fedmq/`` and ``edge_agent/`` it reads every import statement from
the source, function-local and ``TYPE_CHECKING`` ones included (and
``importlib.import_module`` of a literal name), so an import that only runs in one
command still counts.  A forbidden import fails with the module, the line and the rule.
A few subprocess imports then check what really gets loaded, third-party imports of
imports included: the device agent loads onnxruntime and nothing of the server.
"""

from __future__ import annotations

import ast
import json
import re
import subprocess
import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SOURCES = ("fedmq", "edge_agent")
DOC = ROOT / "docs" / "architecture.md"
ANYTHING = "*"


@dataclass(frozen=True)
class Layer:
    """One row of the table.

    Args:
        imports: the fedmq packages it may import besides itself (short names: ``wire``
            is ``fedmq.wire``); ``*`` for any.
        owns: third-party packages (import names) that only the layers owning them may
            import; ``*`` for any.  Packages nobody owns (numpy, pydantic, the standard
            library) are free for all.
        asyncio: whether it may import asyncio.  A layer without the event loop imports
            only layers without it, so the property holds for everything it loads.
    """

    imports: frozenset[str] = frozenset()
    owns: frozenset[str] = frozenset()
    asyncio: bool = False


def layer(imports: Iterable[str] = (), owns: Iterable[str] = (), *, asyncio: bool = False) -> Layer:
    return Layer(frozenset(map(full_name, imports)), frozenset(owns), asyncio)


def full_name(short: str) -> str:
    """``wire`` -> ``fedmq.wire``; ``fedmq``, ``edge_agent`` and ``*`` stay as they are."""
    return short if short in ("fedmq", "edge_agent", ANYTHING) else f"fedmq.{short}"


# Beside the errors at the bottom: small helpers every layer above may use (the root
# package holds only __version__).
HELPERS = (
    "fedmq",
    "errors",
    "buffers",
    "exit_codes",
    "backoff",
    "timeouts",
    "durable_files",
    "config_file",
    "systemd",
    "log_format",
)
# Server and operator layers below the commands; none of them is ever on a device.
SERVER_LAYERS = (
    "strategies",
    "coordinator",
    "aggregator",
    "report",
    "broker",
    "scaffold",
    "datasets",
    "pki",
)
LAYERS: dict[str, Layer] = {
    "fedmq": layer(),
    "fedmq.errors": layer(),
    "fedmq.buffers": layer(),
    "fedmq.exit_codes": layer(),
    "fedmq.backoff": layer(),
    "fedmq.timeouts": layer(asyncio=True),
    "fedmq.durable_files": layer(["buffers"]),
    "fedmq.config_file": layer(["errors"]),
    "fedmq.systemd": layer(),
    "fedmq.log_format": layer(),
    "fedmq.wire": layer(["errors", "buffers"], ["msgpack", "zstandard", "nacl"]),
    "fedmq.bundle": layer(["errors", "buffers", "wire"]),
    "fedmq.runtime": layer(["errors", "buffers", "wire", "bundle"], ["onnxruntime"]),
    "fedmq.strategies": layer(["errors", "buffers", "wire", "bundle"]),
    "fedmq.coordinator": layer(["errors", "buffers", "wire", "bundle", "strategies"]),
    "fedmq.transport": layer([*HELPERS, "wire"], ["aiomqtt", "paho"], asyncio=True),
    "fedmq.scaffold": layer(["errors", "wire"]),
    "fedmq.datasets": layer(["errors"], ["sklearn"]),
    "fedmq.compile": layer(
        ["errors", "buffers", "wire", "bundle"],
        ["torch", "onnx", "onnxscript", "onnx2torch", "torchvision"],
    ),
    "fedmq.broker": layer(HELPERS, ["amqtt"], asyncio=True),
    "fedmq.pki": layer(
        ["errors", "buffers", "durable_files", "config_file", "wire"], ["cryptography"]
    ),
    "edge_agent": layer([*HELPERS, "wire", "bundle", "runtime", "transport"], asyncio=True),
    "fedmq.aggregator": layer(
        [*HELPERS, "wire", "bundle", "strategies", "coordinator", "transport"],
        ["onnx", "prometheus_client"],
        asyncio=True,
    ),
    "fedmq.report": layer([*HELPERS, "coordinator", "aggregator"], ["matplotlib"], asyncio=True),
    "fedmq.monitor": layer([*HELPERS, "wire", "transport"], ["rich"], asyncio=True),
    "fedmq.simulate": layer(
        [*HELPERS, "wire", "bundle", "runtime", "transport", "edge_agent", *SERVER_LAYERS],
        ["typer", "rich", "sklearn"],
        asyncio=True,
    ),
    "fedmq.cli": layer(  # everything but fedmq.testing
        [
            *HELPERS,
            "wire",
            "bundle",
            "runtime",
            "transport",
            "edge_agent",
            *SERVER_LAYERS,
            "compile",
            "simulate",
            "monitor",
        ],
        ["typer", "rich"],
        asyncio=True,
    ),
    # Scripted MQTT clients for tests and benchmarks: anything goes, nothing imports it.
    "fedmq.testing": layer([ANYTHING], [ANYTHING], asyncio=True),
}
RESTRICTED = frozenset().union(*(rule.owns for rule in LAYERS.values())) - {ANYTHING}

# Imports that break the table in files whose owners have yet to change them.  Each
# entry must still occur (the test says when it can go).
KNOWN_VIOLATIONS: dict[tuple[str, str], str] = {}


# ------------------------------------------------------------------ reading imports


@dataclass(frozen=True)
class Import:
    """One imported name: ``target`` is a fedmq layer or a third-party top-level name."""

    module: str
    path: Path
    line: int
    target: str


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def source_files() -> list[Path]:
    return sorted(path for source in SOURCES for path in (ROOT / source).rglob("*.py"))


MODULES = {module_name(path): path for path in source_files()}


def layer_of(module: str) -> str:
    """The table row a fedmq or edge_agent module belongs to (may not be in the table)."""
    parts = module.split(".")
    if parts[0] == "fedmq" and len(parts) > 1:
        return f"fedmq.{parts[1]}"
    return parts[0]


def _imported_modules(tree: ast.AST, module: str, is_package: bool) -> Iterator[tuple[int, str]]:
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative (ruff bans them; resolved anyway)
                package = module.split(".")
                package = package if is_package else package[:-1]
                anchor = package[: len(package) - node.level + 1]
                base = ".".join([*anchor, *([base] if base else [])])
            for alias in node.names:
                submodule = f"{base}.{alias.name}"
                yield node.lineno, submodule if submodule in MODULES else base
        elif (
            isinstance(node, ast.Call)
            and node.args
            and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, str)
            and (
                (isinstance(node.func, ast.Attribute) and node.func.attr == "import_module")
                or (isinstance(node.func, ast.Name) and node.func.id == "__import__")
            )
        ):
            yield node.lineno, node.args[0].value


def target_of(name: str) -> str:
    """The layer of an imported fedmq/edge_agent module, or a third-party top-level name."""
    top = name.partition(".")[0]
    return layer_of(name) if top in SOURCES else top


def imports_of(module: str, path: Path, source: str) -> Iterator[Import]:
    tree = ast.parse(source, str(path))
    for line, name in _imported_modules(tree, module, path.name == "__init__.py"):
        yield Import(module, path, line, target_of(name))


def imports() -> Iterator[Import]:
    for module, path in MODULES.items():
        yield from imports_of(module, path, path.read_text(encoding="utf-8"))


def broken_rule(item: Import) -> str | None:
    """Why the import is forbidden, or None."""
    source = layer_of(item.module)
    rule = LAYERS[source]
    target = item.target
    if target in LAYERS:
        if target == source or ANYTHING in rule.imports or target in rule.imports:
            return None
        allowed = ", ".join(sorted(rule.imports)) or "no fedmq package"
        return f"{source} may import only {allowed}"
    if target == "asyncio" and not rule.asyncio:
        return f"{source} never imports asyncio (it runs without an event loop)"
    if target in RESTRICTED and ANYTHING not in rule.owns and target not in rule.owns:
        owners = sorted(name for name, other in LAYERS.items() if target in other.owns)
        return f"{target} belongs to {', '.join(owners)}"
    return None


def violations(items: Iterable[Import]) -> list[str]:
    """``path:line: module imports target: rule`` for every forbidden import."""
    found = []
    for item in items:
        if layer_of(item.module) not in LAYERS:
            continue  # reported by test_every_module_belongs_to_a_layer
        rule = broken_rule(item)
        if rule is not None and (item.module, item.target) not in KNOWN_VIOLATIONS:
            where = item.path.relative_to(ROOT)
            found.append(f"{where}:{item.line}: {item.module} imports {item.target}: {rule}")
    return found


# ------------------------------------------------------------------ the code obeys the table


def test_every_module_belongs_to_a_layer() -> None:
    orphans = sorted(module for module in MODULES if layer_of(module) not in LAYERS)
    assert not orphans, (
        f"{orphans}: add their package to LAYERS here and to the table in {DOC.name}"
    )


def test_every_import_follows_the_layer_table() -> None:
    found = violations(imports())
    assert not found, "forbidden imports:\n" + "\n".join(found)


def test_known_violations_still_exist() -> None:
    found = {(item.module, item.target) for item in imports() if broken_rule(item) is not None}
    fixed = sorted(set(KNOWN_VIOLATIONS) - found)
    assert not fixed, f"fixed, remove them from KNOWN_VIOLATIONS: {fixed}"


def test_a_violation_names_module_line_and_rule() -> None:
    source = (
        "import numpy\n"
        "from typing import TYPE_CHECKING\n"
        "if TYPE_CHECKING:\n"
        "    from fedmq.aggregator import service\n"
        "def run():\n"
        "    import asyncio\n"
        "    from fedmq import errors, strategies\n"
        "    importlib.import_module('torch.nn')\n"
    )
    path = ROOT / "fedmq" / "wire" / "example.py"
    assert violations(imports_of("fedmq.wire.example", path, source)) == [
        "fedmq/wire/example.py:4: fedmq.wire.example imports fedmq.aggregator: "
        "fedmq.wire may import only fedmq.buffers, fedmq.errors",
        "fedmq/wire/example.py:6: fedmq.wire.example imports asyncio: "
        "fedmq.wire never imports asyncio (it runs without an event loop)",
        "fedmq/wire/example.py:7: fedmq.wire.example imports fedmq.strategies: "
        "fedmq.wire may import only fedmq.buffers, fedmq.errors",
        "fedmq/wire/example.py:8: fedmq.wire.example imports torch: torch belongs to fedmq.compile",
    ]


# ------------------------------------------------------------------ the table is a layering


def closure(name: str) -> set[str]:
    """``name`` and every layer it may import, directly or through others."""
    seen: set[str] = set()
    todo = [name]
    while todo:
        current = todo.pop()
        if current not in seen:
            seen.add(current)
            allowed = LAYERS[current].imports
            todo.extend(set(LAYERS) if ANYTHING in allowed else allowed)
    return seen


def test_the_table_names_only_its_own_layers() -> None:
    unknown = {
        name: sorted(rule.imports - set(LAYERS) - {ANYTHING})
        for name, rule in LAYERS.items()
        if rule.imports - set(LAYERS) - {ANYTHING}
    }
    assert not unknown


def test_layers_form_no_cycle() -> None:
    cycles = sorted(
        f"{name} -> {other}"
        for name, rule in LAYERS.items()
        if ANYTHING not in rule.imports
        for other in rule.imports
        if name in closure(other)
    )
    assert not cycles


def test_layers_without_asyncio_import_only_layers_without_it() -> None:
    leaks = sorted(
        f"{name} -> {other}"
        for name, rule in LAYERS.items()
        if not rule.asyncio
        for other in closure(name)
        if LAYERS[other].asyncio
    )
    assert not leaks


def test_nothing_imports_the_testing_package() -> None:
    assert [name for name in LAYERS if "fedmq.testing" in closure(name)] == ["fedmq.testing"]


def test_the_agent_reaches_no_server_or_workstation_layer() -> None:
    off_device = {full_name(name) for name in [*SERVER_LAYERS, "compile", "simulate", "cli"]}
    assert sorted(closure("edge_agent") & (off_device | {"fedmq.testing"})) == []


# ------------------------------------------------------------------ the doc holds the same table


def _names(cell: str) -> set[str]:
    if cell.strip() in ("", "—"):
        return set()
    names: set[str] = set()
    for word in re.findall(r"`([^`]+)`|(\bhelpers\b|\banything\b)", cell):
        name = word[0] or word[1]
        names.update(HELPERS if name == "helpers" else [ANYTHING if name == "anything" else name])
    return names


def doc_table() -> dict[str, Layer]:
    """The rows of the first table under ``## Layers`` in docs/architecture.md."""
    text = DOC.read_text(encoding="utf-8")
    section = text.split("\n## Layers", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("|")][2:]
    table: dict[str, Layer] = {}
    for row in rows:
        packages, may_import, owns, uses_asyncio = (c.strip() for c in row.strip("|").split("|"))
        rule = layer(_names(may_import), _names(owns), asyncio=uses_asyncio == "yes")
        for package in _names(packages):
            table[full_name(package)] = rule
    return table


def describe(rule: Layer | None) -> str:
    if rule is None:
        return "no row"
    return (
        f"imports {sorted(rule.imports)}, owns {sorted(rule.owns)}, "
        f"asyncio {'yes' if rule.asyncio else 'no'}"
    )


def test_the_architecture_doc_shows_this_table() -> None:
    documented = doc_table()
    differences = [
        f"{name}: here {describe(LAYERS.get(name))}; in {DOC.name} {describe(documented.get(name))}"
        for name in sorted(set(LAYERS) | set(documented))
        if LAYERS.get(name) != documented.get(name)
    ]
    assert not differences, "\n".join(differences)


# ------------------------------------------------------------------ what an import really loads

# The old agent check also kept these off devices (heavy stacks nothing there needs).
NOT_ON_DEVICES = ("scipy", "prometheus_client", "cryptography")
LOADED = """
import importlib, json, pkgutil, sys
package = importlib.import_module(sys.argv[1])
for info in pkgutil.walk_packages(package.__path__, package.__name__ + "."):
    if not info.name.endswith("__main__"):
        importlib.import_module(info.name)
print(json.dumps(sorted({name.split(".")[0] for name in sys.modules} | {
    ".".join(name.split(".")[:2]) for name in sys.modules if name.startswith("fedmq.")
})))
"""


@pytest.mark.parametrize(
    "package",
    [
        "fedmq.wire",
        "fedmq.bundle",
        "fedmq.runtime",
        "fedmq.strategies",
        "fedmq.coordinator",
        "fedmq.transport",
        "edge_agent",
    ],
)
def test_importing_a_layer_loads_only_what_it_may(package: str) -> None:
    result = subprocess.run(
        [sys.executable, "-c", LOADED, package],
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    )
    loaded = set(json.loads(result.stdout))
    reachable = closure(package)
    owned = set().union(*(LAYERS[name].owns for name in reachable))
    forbidden = set(RESTRICTED - owned) | (set(LAYERS) - reachable - {"fedmq"})
    if not LAYERS[package].asyncio:
        forbidden.add("asyncio")
    if package == "edge_agent":
        forbidden.update(NOT_ON_DEVICES)
        assert "onnxruntime" in loaded  # the runtime really is loaded
    assert sorted(loaded & forbidden) == []


def _defined(dotted: str) -> bool:
    """A module, or a name that a module defines or imports (read from its source)."""
    module, _, name = dotted.rpartition(".")
    if dotted in MODULES:
        return True
    return module in MODULES and re.search(rf"\b{name}\b", MODULES[module].read_text()) is not None


def test_the_architecture_doc_names_only_files_and_modules_that_exist() -> None:
    text = DOC.read_text(encoding="utf-8")
    paths = re.findall(r"`((?:fedmq|edge_agent)/[\w/]+(?:\.py|/))`", text)
    names = re.findall(r"`((?:fedmq|edge_agent)\.[\w.]+)`", text)
    missing = [path for path in paths if not (ROOT / path).exists()]
    missing += [name for name in names if not _defined(name)]
    assert not missing, f"{DOC.name} names what does not exist: {missing}"
