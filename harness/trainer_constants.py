"""Read and rewrite the UPPERCASE constants at the top of a trainer file.

`setup` writes a preset's starting values here so the file the agent edits is the whole truth of
the experiment; the built-in `mutate` proposer perturbs them. Only simple literal assignments
(`NAME = <literal>  # comment`) are touched; the trailing comment is kept.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path
from typing import Any

_ASSIGN = re.compile(r"^(?P<name>[A-Z][A-Z0-9_]*)\s*=\s*(?P<value>.*?)(?P<comment>\s*#.*)?$")


def read_constants(source: str) -> dict[str, Any]:
    """UPPERCASE module-level constants with literal values (e.g. `2**19` is evaluated)."""
    values: dict[str, Any] = {}
    for node in ast.parse(source).body:
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            name = node.targets[0].id
            if name.isupper():
                try:
                    values[name] = _eval_constant(node.value)
                except ValueError:
                    continue
    return values


def _eval_constant(node: ast.expr) -> Any:
    # Literals plus the arithmetic people write in constants (2**19, 40 * 524288).
    if isinstance(node, ast.BinOp) and isinstance(node.op, (ast.Pow, ast.Mult, ast.Add, ast.Sub, ast.Div, ast.FloorDiv)):
        left, right = _eval_constant(node.left), _eval_constant(node.right)
        ops = {ast.Pow: lambda a, b: a**b, ast.Mult: lambda a, b: a * b, ast.Add: lambda a, b: a + b,
               ast.Sub: lambda a, b: a - b, ast.Div: lambda a, b: a / b, ast.FloorDiv: lambda a, b: a // b}
        return ops[type(node.op)](left, right)
    return ast.literal_eval(node)


def format_value(value: Any) -> str:
    if isinstance(value, bool) or not isinstance(value, int):
        return repr(value)
    # Powers of two read better as such (TOTAL_BATCH_SIZE = 2**19).
    if value >= 1024 and value & (value - 1) == 0:
        return f"2**{value.bit_length() - 1}"
    return repr(value)


def write_constants(path: Path, values: dict[str, Any]) -> str:
    """Rewrite the named constants in place; every name must already be assigned in the file.
    Returns the new source. Raises KeyError naming constants the file does not define."""
    lines = path.read_text().splitlines(keepends=True)
    pending = dict(values)
    for i, line in enumerate(lines):
        match = _ASSIGN.match(line.rstrip("\n"))
        if not match or match["name"] not in pending:
            continue
        name = match["name"]
        comment = match["comment"] or ""
        newline = "\n" if line.endswith("\n") else ""
        lines[i] = f"{name} = {format_value(pending.pop(name))}{comment}{newline}"
    if pending:
        raise KeyError(f"{path} does not define {', '.join(sorted(pending))} as top-level constants")
    text = "".join(lines)
    ast.parse(text)  # never leave a trainer that does not parse
    path.write_text(text)
    return text
