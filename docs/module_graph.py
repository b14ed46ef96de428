"""The import graph of fastkd's modules, drawn from their source with `ast`: which module imports which, and what.

    python docs/module_graph.py            # prints the Mermaid graph and the import floors
    python docs/module_graph.py --write    # writes them into docs/architecture.md between its markers

tests/test_docs.py checks that docs/architecture.md shows the graph of the code as it is."""
from __future__ import annotations

import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT/'fastkd'
BEGIN, END = '<!-- module graph: begin -->', '<!-- module graph: end -->'


def imports() -> dict[str, dict[str, list[str]]]:
    "For each module of fastkd (but `all`), the fastkd modules it imports and the names it takes from each"
    graph = {}
    for path in sorted(PACKAGE.glob('*.py')):
        if path.stem in ('__init__', 'all'): continue
        edges = graph[path.stem] = {}
        for node in ast.walk(ast.parse(path.read_text(encoding='utf-8'))):
            if isinstance(node, ast.ImportFrom) and node.level == 1 and node.module:
                edges.setdefault(node.module, []).extend(alias.name for alias in node.names)
    return graph


def floors(graph: dict[str, dict[str, list[str]]]) -> dict[str, int]:
    "Each module's floor: 0 for one that imports no fastkd module, else one above the highest it imports"
    floor = {}
    def visit(module):
        if module not in floor: floor[module] = 1 + max((visit(m) for m in graph[module]), default=-1)
        return floor[module]
    for module in graph: visit(module)
    return floor


def private_borrowings(graph: dict[str, dict[str, list[str]]]) -> list[str]:
    "Names starting with `_` that a module imports from another"
    return [f'{module} takes {name} from {source}' for module, edges in graph.items()
            for source, names in edges.items() for name in names if name.startswith('_')]


def markdown(graph: dict[str, dict[str, list[str]]]) -> str:
    "The graph as a Mermaid flowchart (an arrow from importer to imported), then the floors and private borrowings"
    floor = floors(graph)
    lines = ['```mermaid', 'flowchart BT']
    lines += [f'    {module} --> {source}' for module, edges in graph.items() for source in sorted(edges)]
    lines += ['```', '', f'{max(floor.values()) + 1} floors, from the bottom:', '']
    for level in range(max(floor.values()) + 1):
        lines.append(f'{level}. ' + ', '.join(f'`{m}`' for m in sorted(m for m in floor if floor[m] == level)))
    borrowed = private_borrowings(graph)
    lines += ['', 'Private names imported across modules: ' + ('; '.join(borrowed) if borrowed else 'none.')]
    return '\n'.join(lines)


def main():
    text = markdown(imports())
    if '--write' not in sys.argv: return print(text)
    page = ROOT/'docs'/'architecture.md'
    before, rest = page.read_text(encoding='utf-8').split(BEGIN)
    page.write_text(before + BEGIN + '\n' + text + '\n' + END + rest.split(END)[1], encoding='utf-8')


if __name__ == '__main__':
    main()
