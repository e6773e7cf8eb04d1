"""grpo_cli's modules import one another without a cycle, counting the imports inside functions:
an import moved into a function to dodge a cycle leaves the cycle in place (the modules still
need each other), so only a layering where every module could import at the top passes."""

import ast
from pathlib import Path

import grpo_cli

PACKAGE = Path(grpo_cli.__file__).parent


def imported_modules(source: str, modules: set[str]) -> set[str]:
    """The grpo_cli modules (of `modules`) that a module's source imports, anywhere in it."""
    found = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from the package
                base = "grpo_cli" + ("." + base if base else "")
            names = [base] + [f"{base}.{alias.name}" for alias in node.names]  # `from grpo_cli import rollout`
        else:
            continue
        for name in names:
            parts = name.split(".")
            if parts[0] == "grpo_cli" and len(parts) > 1 and parts[1] in modules:
                found.add(parts[1])
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


def package_sources() -> dict[str, str]:
    return {path.stem: path.read_text() for path in PACKAGE.glob("*.py")}


def test_grpo_cli_modules_import_one_another_without_a_cycle():
    cycle = find_cycle(import_graph(package_sources()))
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_an_import_inside_a_function_still_makes_a_cycle():
    sources = {"decoder": "from grpo_cli.logprobs import causal_lm\n",
               "logprobs": "def prompt_states(model):\n    from grpo_cli.rollout import new_cache\n",
               "rollout": "from grpo_cli import decoder\n"}
    assert find_cycle(import_graph(sources)) == ["decoder", "logprobs", "rollout", "decoder"]
    sources["logprobs"] = "from grpo_cli.model_calls import new_cache\n"
    assert find_cycle(import_graph(sources)) is None


def test_model_calls_is_a_leaf():
    sources = package_sources()
    assert imported_modules(sources["model_calls"], set(sources)) <= {"errors"}
