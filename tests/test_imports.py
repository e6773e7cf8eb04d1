"""grpo_cli's modules import one another without a cycle and along the layers docs/layout.md draws.

Imports inside functions count: an import moved into a function to dodge a cycle leaves the cycle in
place (the modules still need each other), so only a layering where every module could import at the
top passes. The layers are read from docs/layout.md, so the page and the code cannot drift apart."""

import ast
import re
from pathlib import Path

import grpo_cli

PACKAGE = Path(grpo_cli.__file__).parent
LAYOUT = PACKAGE.parent / "docs" / "layout.md"


def module_name(path: Path) -> str:
    """grpo_cli/run/train.py -> 'run.train'; grpo_cli/rewards/__init__.py -> 'rewards'."""
    parts = list(path.relative_to(PACKAGE).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def package_sources() -> dict[str, str]:
    """Every module of grpo_cli by dotted name (without the 'grpo_cli.'), the package's own __init__ left out."""
    return {module_name(path): path.read_text() for path in sorted(PACKAGE.rglob("*.py"))
            if path != PACKAGE / "__init__.py"}


def imported_modules(source: str, modules: set[str]) -> set[str]:
    """The grpo_cli modules (of `modules`) that a module's source imports, anywhere in it."""
    found = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative imports are not used in grpo_cli; read them as from the package root
                base = "grpo_cli" + ("." + node.module if node.module else "")
            else:
                base = node.module or ""
            names = [base] + [f"{base}.{alias.name}" for alias in node.names]  # `from grpo_cli.run import train`
        else:
            continue
        for name in names:
            if name.startswith("grpo_cli.") and name.removeprefix("grpo_cli.") in modules:
                found.add(name.removeprefix("grpo_cli."))
    return found


def import_graph(sources: dict[str, str]) -> dict[str, set[str]]:
    """Module name -> the other modules it imports."""
    return {name: imported_modules(source, set(sources)) - {name} for name, source in sources.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """A cycle as the modules along it (first one repeated at the end), or None."""
    state, path = {}, []  # state: 1 on the current path, 2 done

    def visit(node):
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def documented_layers() -> list[set[str]]:
    """The layers, lowest first, from docs/layout.md's line `layers: a b | c | ...`."""
    line = re.search(r"^layers: (.+)$", LAYOUT.read_text(), flags=re.M)
    assert line, "docs/layout.md has no `layers:` line"
    return [set(layer.split()) for layer in line.group(1).split("|")]


def against_the_layers(graph: dict[str, set[str]], layers: list[set[str]]) -> list[str]:
    """Imports that run against the layers, as 'importer -> imported'.

    A module's layer is its package's (or, for a top-level module, its own). A module may import its own
    package's modules, any lower layer's, and a leaf anywhere: a module that imports nothing of grpo_cli's
    but the lowest layer (the loss functions, the builtin task, the advantage arithmetic...). A leaf cannot
    close a cycle and holds nothing of the layer above it, so the recipe schema reads the registries of
    rules and losses, and the samplers the guard's drop points, without a layer inverted."""
    rank = {name: i for i, layer in enumerate(layers) for name in layer}
    base = layers[0]
    leaves = {m for m, imports in graph.items() if all(i.split(".")[0] in base for i in imports)}
    wrong = []
    for importer, imports in graph.items():
        mine = importer.split(".")[0]
        for imported in imports:
            theirs = imported.split(".")[0]
            if theirs != mine and imported not in leaves and rank[theirs] >= rank[mine]:
                wrong.append(f"{importer} -> {imported}")
    return sorted(wrong)


def test_grpo_cli_modules_import_one_another_without_a_cycle():
    cycle = find_cycle(import_graph(package_sources()))
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_every_package_and_top_level_module_has_a_documented_layer():
    layers = documented_layers()
    documented = set().union(*layers)
    present = {name.split(".")[0] for name in package_sources()}
    assert sorted(present - documented) == [] and sorted(documented - present) == []
    assert sum(len(layer) for layer in layers) == len(documented)  # each in one layer


def test_imports_follow_the_documented_layers():
    assert against_the_layers(import_graph(package_sources()), documented_layers()) == []


def test_an_import_against_the_layers_is_found():
    layers = [{"errors"}, {"model"}, {"rollout"}, {"run"}]
    sources = {"errors": "", "model.calls": "from grpo_cli.errors import UserError\n",
               "model.loading": "from grpo_cli.model.calls import x\nfrom grpo_cli.run.train import y\n",
               "rollout.sampling": "from grpo_cli.model import loading\nfrom grpo_cli.run.guard import drop_point\n",
               "run.guard": "from grpo_cli.errors import UserError\n",
               "run.train": "from grpo_cli.rollout.sampling import generate\n"}
    graph = import_graph(sources)
    assert graph["rollout.sampling"] == {"model.loading", "run.guard"}
    # run.guard is a leaf (it imports only the lowest layer), so the sampler may use it
    assert against_the_layers(graph, layers) == ["model.loading -> run.train"]


def test_an_import_inside_a_function_still_makes_a_cycle():
    sources = {"rollout.decoder": "from grpo_cli.model.logprobs import causal_lm\n",
               "model.logprobs": "def prompt_states(model):\n    from grpo_cli.rollout.sampling import new_cache\n",
               "rollout.sampling": "from grpo_cli.rollout import decoder\n"}
    assert find_cycle(import_graph(sources)) == ["model.logprobs", "rollout.sampling", "rollout.decoder",
                                                 "model.logprobs"]
    sources["model.logprobs"] = "from grpo_cli.model.calls import new_cache\n"
    assert find_cycle(import_graph(sources)) is None


def test_model_calls_is_a_leaf():
    sources = package_sources()
    assert imported_modules(sources["model.calls"], set(sources)) <= {"errors"}


def test_package_inits_import_nothing_but_the_public_rewards_api():
    """A package's __init__ runs before any of its modules: kept empty, importing one module never loads
    its siblings. grpo_cli.rewards re-exports the rules' API, the documented path of custom rules."""
    sources = package_sources()
    inits = {name for name in sources if (PACKAGE / name / "__init__.py").exists()}
    assert {name: imported_modules(sources[name], set(sources)) for name in inits if name != "rewards"} == \
        {name: set() for name in inits if name != "rewards"}
    assert imported_modules(sources["rewards"], set(sources)) == {"rewards.rules"}


def test_the_loop_reads_in_one_sitting():
    """run/train.py is the loop and its phases, nothing else: under 350 lines, no function over 60."""
    source = (PACKAGE / "run" / "train.py").read_text()
    assert len(source.splitlines()) < 350
    long = [f"{node.name}: {node.end_lineno - node.lineno + 1} lines" for node in ast.walk(ast.parse(source))
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno + 1 > 60]
    assert long == []
