"""The longest functions of the repository's Python (tests/ excluded), by line count.

    python tools/longest_functions.py [-n 10] [ROOT]

A function's length is its lines from the `def` (decorators excluded) to its last line, docstring
included; nested functions count in their parent and also on their own. Hidden folders are skipped.
"""
from __future__ import annotations

import argparse
import ast
import os


def function_lengths(root: str, exclude=("tests",)) -> list[tuple[int, str]]:
    """[(lines, "path:line name")] of every function and method under `root`, longest first."""
    found = []
    for folder, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if not d.startswith(".") and not (folder == root and d in exclude))
        for name in sorted(files):
            if not name.endswith(".py"):
                continue
            path = os.path.join(folder, name)
            with open(path, encoding="utf-8") as fh:
                tree = ast.parse(fh.read(), path)
            for node in ast.walk(tree):
                if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    where = f"{os.path.relpath(path, root)}:{node.lineno} {node.name}"
                    found.append((node.end_lineno - node.lineno + 1, where))
    return sorted(found, key=lambda item: (-item[0], item[1]))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("root", nargs="?", default=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    parser.add_argument("-n", type=int, default=10, help="how many to list")
    args = parser.parse_args(argv)
    for lines, where in function_lengths(args.root)[:args.n]:
        print(f"{lines:5d}  {where}")


if __name__ == "__main__":
    main()
