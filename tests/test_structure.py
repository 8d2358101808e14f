"""The package's shape: no import cycles, nothing imports the CLI, a lazy CLI, help text on every flag."""
import argparse
import ast
import subprocess
import sys
from pathlib import Path

from monovl.cli import COMMANDS, build_parser

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = SRC / "monovl"


def _module_name(path: Path) -> str:
    parts = path.relative_to(SRC).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(tree: ast.Module, module: str, is_package: bool, top_level_only: bool, modules) -> set[str]:
    """Names of the monovl modules `module` imports (`from a import b` counts a.b when that is a module, else a;
    like `import a.b`, it does not count the parent package `a`, which every submodule import runs)."""
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    if top_level_only:  # module level, including `if`/`try` blocks, excluding function and class bodies
        stack, nodes = list(tree.body), []
        while stack:
            node = stack.pop()
            nodes.append(node)
            if isinstance(node, (ast.If, ast.Try)):
                stack += node.body + node.orelse + getattr(node, "handlers", []) + getattr(node, "finalbody", [])
            elif isinstance(node, ast.ExceptHandler):
                stack += node.body
    out = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                pkg = module.split(".") if is_package else module.split(".")[:-1]
                base = ".".join(pkg[: len(pkg) - node.level + 1] + ([base] if base else []))
            out |= {f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names}
    return {m for m in out if m == "monovl" or m.startswith("monovl.")}


def import_graph(top_level_only: bool = True) -> dict[str, set[str]]:
    files = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph = {}
    for name, path in files.items():
        found = _imports(ast.parse(path.read_text()), name, path.name == "__init__.py", top_level_only, files)
        graph[name] = {m for m in found if m in files and m != name}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done

    def visit(node, path):
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return path + [node, nxt]
            if nxt not in state and (cycle := visit(nxt, path + [node])):
                return cycle
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node, [])):
            return cycle[cycle.index(cycle[-1]):]
    return None


def test_no_import_cycles():
    for top_level_only in (True, False):  # module-level imports; then also those inside functions
        graph = import_graph(top_level_only)
        assert len(graph) > 40
        assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))


def test_the_cycles_once_found_are_gone_even_counting_imports_inside_functions():
    graph = import_graph(top_level_only=False)
    for a, b in [("monovl.eval.run", "monovl.cli"), ("monovl.train.recipe", "monovl.train.loop"),
                 ("monovl.train.packing", "monovl.train.data")]:
        assert b not in graph[a], (a, b)


def test_nothing_imports_the_cli():
    graph = import_graph(top_level_only=False)
    assert [m for m, deps in graph.items() if "monovl.cli" in deps] == []


def test_the_cycle_finder_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]


def test_help_is_fast_and_loads_no_command():
    code = ("import sys; from monovl.cli import main\ntry:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
            "assert 'torch' not in sys.modules, 'torch was imported'\n"
            "assert not [m for m in sys.modules if m.startswith('monovl.commands.')]")
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True)
    out = subprocess.run([sys.executable, "-m", "monovl.cli", "--version"], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.startswith("monovl ")


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return action.choices


def test_every_flag_has_help_text_and_shows_its_default():
    parser = build_parser("*")
    subs = _subparsers(parser)
    assert sorted(subs) == sorted(COMMANDS)
    for name, sub in subs.items():
        text = "".join(sub.format_help().split())
        for action in sub._actions:
            if isinstance(action, argparse._HelpAction):
                continue
            assert action.help, f"monovl {name} {action.dest}: no help text"
            if action.option_strings and action.default not in (None, False, []):
                assert f"(default:{action.default})".replace(" ", "") in text or "default" in action.help, \
                    f"monovl {name} {action.option_strings[0]}: default not shown"


def test_layers_of_docs_architecture():
    graph = import_graph(top_level_only=False)
    assert graph["monovl.config"] == set() and graph["monovl.cli"] == set()
    for m in ("monovl.model.decoder", "monovl.model.vision", "monovl.model.mono"):
        assert all(d == "monovl.config" or d.startswith("monovl.model") for d in graph[m]), (m, graph[m])
    apps = ("monovl.serve", "monovl.eval", "monovl.train", "monovl.world", "monovl.loadtest", "monovl.speed")
    group = lambda m: next((a for a in apps if m == a or m.startswith(a + ".")), None)  # noqa: E731
    crossing = [(m, d) for m, deps in graph.items() for d in deps if group(m) and group(d) and group(m) != group(d)]
    assert crossing == []


LONG_FUNCTIONS_ELSEWHERE: set[str] = set()  # none left: keep it so


def test_no_long_functions_or_files():
    long_files, long_functions = [], []
    for path in sorted(PACKAGE.rglob("*.py")):
        text, module = path.read_text(), _module_name(path)
        if text.count("\n") > 400:
            long_files.append(module)
        for node in ast.walk(ast.parse(text)):
            is_function = isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
            if is_function and node.name != "register" and node.end_lineno - node.lineno + 1 > 60:
                long_functions.append(f"{module}.{node.name}")
    assert long_files == []
    assert set(long_functions) <= LONG_FUNCTIONS_ELSEWHERE, long_functions
