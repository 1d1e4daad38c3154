"""The package layering, read from the source with ``ast`` (nothing is imported).

Packages point one way (a package imports only packages of lower layers, and itself):

    config (foundation: imports nothing of xcit)
    < models (torch alone) < data < train (the one run engine)
    < inference, export < viz < classify, dino, detect, segment, bench (the tasks)
    < cli

``xcit/__init__.py`` (the public facade) and ``xcit/__main__.py`` stand outside the layers. Every import
counts, also one inside a function: a lazy import is still a dependency. Besides the layers:

* ``xcit.cli`` is imported only by ``xcit.cli`` itself and ``xcit.__main__``; nothing in ``benchmarks/``,
  ``scripts/`` or ``hubconf.py`` imports it (they use the library; ``benchmarks/run.py`` runs the command);
* no private name (``_x``) is imported from another module, in the package or outside it;
* the graph of imports between xcit modules has no cycle, lazy (function-level) imports included: a lazy
  import hides a cycle from Python, not from the design;
* ``xcit.models`` imports nothing but the standard library and torch at module level (optional extras such as
  safetensors or huggingface_hub only inside the functions that need them);
* shared pieces have one home (:data:`ONE_HOME`): the image reader, lister and extensions, the ImageNet
  statistics, the device picker, the pyramid factory, the schedules, the option helpers; no other module
  defines a name of them.

Every failure names the file, the line and the import.
"""
from __future__ import annotations

import ast
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src"
PACKAGE = SRC / "xcit"
OUTSIDE = sorted([*(ROOT / "benchmarks").glob("*.py"), *(ROOT / "scripts").glob("*.py"), ROOT / "hubconf.py"])

LAYERS = [("config",), ("models",), ("data",), ("train",), ("inference", "export"), ("viz",),
          ("classify", "dino", "detect", "segment", "bench"), ("cli",)]
LAYER = {pkg: i for i, group in enumerate(LAYERS) for pkg in group}
FACADE = ("xcit", "xcit.__main__")
MODELS_MAY_IMPORT = {"torch"}  # besides the standard library, at module level


def module_name(path: Path, root: Path = SRC) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


@dataclass(frozen=True)
class Import:
    file: Path
    line: int
    importer: str  # module name ("" for a file outside the package)
    target: str  # the module imported (a submodule when ``from pkg import submodule``)
    names: tuple[str, ...]  # the names taken from it (empty for ``import x``)
    module_level: bool  # outside any function (and not under ``if TYPE_CHECKING``)
    text: str

    def where(self) -> str:
        return f"{self.file.relative_to(ROOT)}:{self.line}: {self.text}"


def _package_of(module: str, path: Path) -> str:
    return module if path.name == "__init__.py" else module.rpartition(".")[0]


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def read_imports(path: Path, root: Path = SRC) -> list[Import]:
    """Every import statement of ``path`` (a module under ``root``, or a script), relative ones resolved to absolute
    module names."""
    module = module_name(path, root) if path.is_relative_to(root / "xcit") else ""
    package = _package_of(module, path) if module else ""
    source = path.read_text(encoding="utf-8")
    tree = ast.parse(source, filename=str(path))
    found: list[Import] = []

    def visit(node: ast.AST, module_level: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
                visit(child, False)
            elif isinstance(child, ast.If) and _is_type_checking(child):
                continue  # annotations only: never executed
            elif isinstance(child, ast.Import):
                for alias in child.names:
                    found.append(Import(path, child.lineno, module, alias.name, (), module_level,
                                        ast.get_source_segment(source, child) or ""))
            elif isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:
                    anchor = package.split(".")
                    anchor = anchor[:len(anchor) - (child.level - 1)]
                    base = ".".join([*anchor, *([child.module] if child.module else [])])
                names = tuple(a.name for a in child.names)
                text = ast.get_source_segment(source, child) or ""
                submodules = [n for n in names if f"{base}.{n}" in MODULES]
                for name in submodules:  # `from pkg import submodule` imports the submodule
                    found.append(Import(path, child.lineno, module, f"{base}.{name}", (), module_level, text))
                rest = tuple(n for n in names if n not in submodules)
                if rest or not submodules:
                    found.append(Import(path, child.lineno, module, base, rest, module_level, text))
            else:
                visit(child, module_level)

    visit(tree, True)
    return found


IMPORTS = [imp for path in MODULES.values() for imp in read_imports(path)]
OUTSIDE_IMPORTS = [imp for path in OUTSIDE for imp in read_imports(path)]
INTERNAL = [imp for imp in IMPORTS if imp.target == "xcit" or imp.target.startswith("xcit.")]


def top_package(module: str) -> str:
    """``xcit.models.weights`` -> ``models``; ``xcit.export`` -> ``export``; ``xcit`` -> ``xcit``."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else parts[0]


def report(problems: list[str], rule: str) -> str:
    return f"{len(problems)} import(s) break the rule: {rule}\n  " + "\n  ".join(problems)


def test_the_sources_are_found_and_every_package_has_a_layer():
    assert len(MODULES) > 80 and len(IMPORTS) > 500
    packages = {top_package(m) for m in MODULES if m not in FACADE}
    assert packages <= set(LAYER), f"packages without a layer in tests/test_layering.py: {sorted(packages - set(LAYER))}"


def test_packages_import_only_lower_layers():
    problems = []
    for imp in INTERNAL:
        if imp.importer in FACADE or imp.target == "xcit":
            continue
        mine, theirs = top_package(imp.importer), top_package(imp.target)
        if mine == theirs:
            continue
        if LAYER[theirs] > LAYER[mine]:
            problems.append(f"{imp.where()}  ({mine} imports the higher layer {theirs})")
        elif LAYER[theirs] == LAYER[mine]:
            problems.append(f"{imp.where()}  ({mine} imports {theirs}, a package of its own layer)")
    assert not problems, report(problems, "a package imports only packages of lower layers (models < data < train < "
                                          "inference/export < viz < tasks < cli)")


def test_the_package_root_is_imported_only_for_what_it_defines():
    """``from xcit import x`` inside the package: only the version (the facade imports models and inference)."""
    problems = [imp.where() for imp in INTERNAL
                if imp.target == "xcit" and imp.importer not in FACADE and set(imp.names) - {"__version__"}]
    assert not problems, report(problems, "modules of xcit import from their own package, not from the facade")


def test_foundation_imports_nothing_of_xcit():
    problems = [imp.where() for imp in INTERNAL if top_package(imp.importer) == "config"]
    assert not problems, report(problems, "xcit.config imports nothing of xcit")


def test_the_command_line_is_imported_by_nobody_else():
    problems = [imp.where() for imp in INTERNAL
                if top_package(imp.target) == "cli" and top_package(imp.importer) != "cli" and imp.importer != "xcit.__main__"]
    problems += [imp.where() for imp in OUTSIDE_IMPORTS if imp.target == "xcit.cli" or imp.target.startswith("xcit.cli.")]
    assert not problems, report(problems, "only xcit.cli and xcit.__main__ import xcit.cli (benchmarks and scripts "
                                          "use the library)")


@pytest.mark.parametrize("tasks", [("classify", "detect", "segment", "dino")])
def test_tasks_do_not_import_each_other(tasks):
    problems = [imp.where() for imp in INTERNAL
                if top_package(imp.importer) in tasks and top_package(imp.target) in tasks
                and top_package(imp.importer) != top_package(imp.target)]
    assert not problems, report(problems, f"{', '.join(tasks)} do not import each other")


def test_no_private_name_is_imported_from_another_module():
    problems = []
    for imp in [*IMPORTS, *OUTSIDE_IMPORTS]:
        if not (imp.target == "xcit" or imp.target.startswith("xcit.")):
            continue
        private = [n for n in imp.names if n.startswith("_") and not (n.startswith("__") and n.endswith("__"))]
        if private or any(part.startswith("_") and not part.startswith("__") for part in imp.target.split(".")):
            problems.append(f"{imp.where()}  (private: {', '.join(private) or imp.target})")
    assert not problems, report(problems, "no private name is imported from another module (make it public or move it)")


def _cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """One cycle per strongly connected component with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []
    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10_000))

    def connect(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(edges.get(v, ())):
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                components.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            connect(v)
    return components


def _graph(imports: list[Import]) -> tuple[dict[str, set[str]], dict[tuple[str, str], Import]]:
    edges: dict[str, set[str]] = {}
    first: dict[tuple[str, str], Import] = {}
    for imp in imports:
        if imp.target in MODULES and imp.target != imp.importer:
            edges.setdefault(imp.importer, set()).add(imp.target)
            first.setdefault((imp.importer, imp.target), imp)
    return edges, first


def _describe(component: list[str], edges: dict[str, set[str]], first: dict[tuple[str, str], Import]) -> str:
    inside = set(component)
    lines = [first[(a, b)].where() for a in component for b in sorted(edges.get(a, ())) if b in inside]
    return f"cycle among {', '.join(component)}:\n    " + "\n    ".join(lines)


def test_imports_have_no_cycle_at_any_level():
    """Lazy imports included (e.g. ``detect.model`` and ``detect.mmdet_compat`` importing each other inside
    functions): every edge is a dependency."""
    edges, first = _graph([imp for imp in INTERNAL if imp.importer not in FACADE])
    cycles = [_describe(c, edges, first) for c in _cycles(edges)]
    assert not cycles, report(cycles, "no cycle in the imports between xcit modules, lazy ones included")
    assert "xcit.models.registry" not in edges.get("xcit.models.weights", set())


def test_the_cycle_check_sees_a_lazy_cycle(tmp_path):
    """The checker itself: two modules importing each other only inside functions form a cycle."""
    pkg = tmp_path / "src" / "xcit" / "detect"
    pkg.mkdir(parents=True)
    (pkg / "a.py").write_text("def f():\n    from .b import g\n")
    (pkg / "b.py").write_text("def g():\n    from .a import f\n")
    imps = [imp for path in (pkg / "a.py", pkg / "b.py") for imp in read_imports(path, root=tmp_path / "src")]
    edges = {}
    for imp in imps:
        edges.setdefault(imp.importer, set()).add(imp.target)
    assert _cycles(edges) == [["xcit.detect.a", "xcit.detect.b"]]


def test_models_depend_on_torch_alone():
    stdlib = set(sys.stdlib_module_names)
    problems = []
    for imp in IMPORTS:
        if top_package(imp.importer) != "models" or not imp.module_level:
            continue
        root = imp.target.split(".")[0]
        if root not in stdlib and root not in MODELS_MAY_IMPORT and root != "xcit" and imp.target != "__future__":
            problems.append(imp.where())
    assert not problems, report(problems, "xcit.models imports only the standard library and torch at module level")


# name -> the one module that defines it (others import it from there)
ONE_HOME = {
    "IMAGE_EXTENSIONS": "xcit.data.images", "IMAGENET_MEAN": "xcit.data.images", "IMAGENET_STD": "xcit.data.images",
    "load_image": "xcit.data.images", "read_image": "xcit.data.images", "list_images": "xcit.data.images",
    "collect_images": "xcit.data.images", "pick_device": "xcit.train.distributed",
    "create_model": "xcit.models.registry", "create_pyramid": "xcit.models.registry",
    "read_trunk": "xcit.models.weights", "StepSchedule": "xcit.train.optim", "PolySchedule": "xcit.train.optim",
    "option": "xcit.config", "coerce": "xcit.config", "read_yaml": "xcit.config",
    "open_image": "xcit.data.images", "display_path": "xcit.data.images", "walk_images": "xcit.data.images",
    "atomic_write": "xcit.data.outputs", "claim_file": "xcit.data.outputs", "unique_stems": "xcit.data.outputs",
    "fit": "xcit.train.loop", "cadence": "xcit.train.options", "resolve_lr": "xcit.train.options",
}


def _top_level_definitions(path: Path) -> dict[str, int]:
    names = {}
    for node in ast.parse(path.read_text(encoding="utf-8")).body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names[node.name] = node.lineno
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            for target in node.targets if isinstance(node, ast.Assign) else [node.target]:
                for leaf in ast.walk(target):
                    if isinstance(leaf, ast.Name):
                        names[leaf.id] = node.lineno
    return names


def test_shared_pieces_have_one_home():
    problems = []
    for module, path in MODULES.items():
        for name, line in _top_level_definitions(path).items():
            if name in ONE_HOME and ONE_HOME[name] != module:
                problems.append(f"{path.relative_to(ROOT)}:{line}: defines {name} (its home is {ONE_HOME[name]})")
    for name, home in ONE_HOME.items():
        if name not in _top_level_definitions(MODULES[home]):
            problems.append(f"{MODULES[home].relative_to(ROOT)}: does not define {name} (tests/test_layering.py ONE_HOME)")
    assert not problems, report(problems, "one definition of each shared piece; import it from its home")


def test_the_checker_reads_imports_as_python_does(tmp_path):
    """The reader itself: relative imports resolve, submodules are told from names, function bodies are lazy."""
    path = PACKAGE / "models" / "registry.py"
    imps = read_imports(path)
    targets = {(i.target, i.module_level) for i in imps}
    assert ("xcit.models.weights", True) in targets and ("xcit.models.names", True) in targets
    bench = read_imports(PACKAGE / "bench" / "contenders.py")
    assert any(i.target == "xcit.export" and not i.module_level for i in bench)  # `from .. import export as ex`
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
