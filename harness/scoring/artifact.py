"""The model a trainer hands over: its forward function, exported to a self-contained artifact that
the evaluator process loads without running any of the trainer's code.

An artifact is a folder in the run's folder:

    meta.json       framework, the input shape every call uses (batch, seq_len), export seconds
    program.json    torch: the torch.export graph in ATen ops, serialized as JSON
    tensors.pt      torch: its weights and constants, a plain dict of tensors
    forward.mlxfn   mlx: mx.export_function of the forward, fixed shapes

Shapes are fixed: the evaluator calls the forward with exactly `batch` rows every time (the last
micro-batch is padded), so probes and scoring use the same shape and the graph has no symbolic
sizes. The eval forward uses the framework's portable attention (SDPA, not FA3 or flex_attention):
the evaluator imports only the framework, so a custom kernel would not load there.

Why not `torch.export.save`/`load`: `load` unpickles weights with `weights_only=False`, parses
shape expressions with sympy and runs the program's guard code, so a crafted file would run code
in the evaluator. Here the graph is plain JSON, checked before it is deserialized (ATen operators
only, none that touch files; no symbolic shapes, custom objects, guard code or metadata), and the
tensors are read with `torch.load(weights_only=True)`.
"""

from __future__ import annotations

import json
import re
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from harness.files import atomic_write, atomic_write_text

META_FILE = "meta.json"
TORCH_PROGRAM = "program.json"
TORCH_TENSORS = "tensors.pt"
MLX_FUNCTION = "forward.mlxfn"
FRAMEWORKS = ("torch", "mlx")

_ATEN_TARGET = re.compile(r"^torch\.ops\.aten\.(\w+)\.(\w+)$")
# ATen operators a forward never needs and that reach outside the tensors (files, stdout).
_DENIED_OPS = {"from_file", "_print", "print", "save", "load", "_debug_has_internal_overlap"}
_INPUT_KINDS = {"user_input", "parameter", "buffer", "tensor_constant", "constant_input"}
_SPEC_TYPES = {None, "builtins.tuple", "builtins.list", "builtins.dict"}


class ArtifactError(ValueError):
    """The forward could not be exported, or an artifact is not one the evaluator accepts."""


@dataclass(frozen=True)
class ArtifactMeta:
    framework: str
    batch: int
    seq_len: int
    export_seconds: float = 0.0

    @classmethod
    def read(cls, directory: Path) -> "ArtifactMeta":
        try:
            data = json.loads((Path(directory) / META_FILE).read_text(encoding="utf-8"))
            meta = cls(framework=str(data["framework"]), batch=int(data["batch"]), seq_len=int(data["seq_len"]),
                       export_seconds=float(data.get("export_seconds", 0.0)))
        except FileNotFoundError:
            raise ArtifactError(f"no exported model in {directory} (the trainer did not reach ctx.finish)") from None
        except (ValueError, KeyError, TypeError) as exc:
            raise ArtifactError(f"{Path(directory) / META_FILE} is unreadable ({exc})") from None
        if meta.framework not in FRAMEWORKS:
            raise ArtifactError(f"unknown framework {meta.framework!r} in {directory}; expected one of {FRAMEWORKS}")
        return meta


# -- export (in the trainer's process) -------------------------------------------------------------

def export_forward(forward: Callable[[Any], Any], *, framework: str, batch: int, seq_len: int, vocab_size: int,
                   device: str, directory: Path) -> ArtifactMeta:
    """Export `forward` (int tokens (batch, seq_len) -> logits (batch, seq_len, V)) into `directory`.
    Raises ArtifactError saying what could not be exported."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    if framework == "torch":
        _export_torch(forward, batch, seq_len, vocab_size, device, directory)
    elif framework == "mlx":
        _export_mlx(forward, batch, seq_len, vocab_size, directory)
    else:
        raise ArtifactError(f"cannot export a {framework!r} forward: the evaluator takes {' or '.join(FRAMEWORKS)}")
    meta = ArtifactMeta(framework, batch, seq_len, round(time.perf_counter() - start, 3))
    atomic_write_text(directory / META_FILE, json.dumps(asdict(meta)))  # last: the artifact is complete
    return meta


def _as_module(forward: Callable[[Any], Any]) -> Any:
    """The trainer's forward as a module torch.export can trace (its tensors become constants)."""
    import torch

    class Forward(torch.nn.Module):
        def forward(self, x):
            return forward(x)

    return Forward()


def _export_torch(forward: Callable[[Any], Any], batch: int, seq_len: int, vocab_size: int, device: str,
                  directory: Path) -> None:
    import io

    import torch
    from torch._export.serde.serialize import serialize

    example = torch.randint(0, vocab_size, (batch, seq_len), dtype=torch.long, device=device)
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # pytree deprecations inside torch.export
            program = torch.export.export(_as_module(forward), (example,), strict=False).run_decompositions({})
        serialized = serialize(program)
    except Exception as exc:  # noqa: BLE001 - any tracing failure is the trainer's to fix
        raise ArtifactError(f"torch.export could not trace the forward: {type(exc).__name__}: "
                            f"{_first_line(exc)}") from exc
    program_json = json.loads(serialized.exported_program)
    check_torch_program(program_json)  # fail in the trainer, where the message reaches the agent
    tensors = {"state_dict": dict(program.state_dict), "constants": dict(program.constants)}
    if not all(isinstance(t, torch.Tensor) for part in tensors.values() for t in part.values()):
        raise ArtifactError("the forward holds constants that are not tensors (custom objects); "
                            "the evaluator loads tensors only")
    buffer = io.BytesIO()
    torch.save(tensors, buffer)
    atomic_write(directory / TORCH_TENSORS, buffer.getvalue())
    atomic_write_text(directory / TORCH_PROGRAM, json.dumps(program_json))


def _export_mlx(forward: Callable[[Any], Any], batch: int, seq_len: int, vocab_size: int, directory: Path) -> None:
    import mlx.core as mx

    example = mx.random.randint(0, vocab_size, (batch, seq_len)).astype(mx.int32)
    path = directory / MLX_FUNCTION
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        mx.export_function(str(tmp), forward, example)
    except Exception as exc:  # noqa: BLE001
        tmp.unlink(missing_ok=True)
        raise ArtifactError(f"mx.export_function could not export the forward: {type(exc).__name__}: "
                            f"{_first_line(exc)}") from exc
    tmp.replace(path)


# -- checks and loading (in the evaluator's process) -----------------------------------------------

def check_torch_program(program: dict) -> None:
    """Refuse a serialized program that could do more than compute logits from its input."""
    try:
        module = program["graph_module"]
        graph = module["graph"]
        nodes = graph["nodes"]
        specs = module["signature"]["input_specs"]
    except (KeyError, TypeError):
        raise ArtifactError("the exported program is malformed (no graph)") from None
    if program.get("verifiers") != ["ATEN"]:
        raise ArtifactError(f"the exported program is not an ATen graph (dialect {program.get('verifiers')})")
    if program.get("range_constraints") or any(graph.get(k) for k in
                                               ("sym_int_values", "sym_bool_values", "sym_float_values")):
        raise ArtifactError("the exported program has symbolic shapes; the evaluator takes fixed shapes only")
    if graph.get("custom_obj_values"):
        raise ArtifactError("the exported program holds custom objects; the evaluator takes tensors only")
    users = 0
    for spec in specs:
        kind = next(iter(spec), None) if isinstance(spec, dict) else None
        if kind not in _INPUT_KINDS:
            raise ArtifactError(f"the exported program takes an input of kind {kind!r}; only tensors are allowed")
        users += kind == "user_input"
    if users != 1:
        raise ArtifactError(f"the exported forward takes {users} inputs; it must take the token ids only")
    for node in nodes:
        target = node.get("target", "")
        match = _ATEN_TARGET.match(target)
        if match is None:
            raise ArtifactError(f"the exported forward calls {target!r}, which is not an ATen operator: custom "
                                "kernels and Python callbacks do not reach the evaluator (use SDPA for eval)")
        if match.group(1) in _DENIED_OPS:
            raise ArtifactError(f"the exported forward calls {target!r}, which reaches outside its tensors")
    for call in module.get("module_call_graph", []):
        for key in ("in_spec", "out_spec"):
            for kind in _spec_types(call.get("signature", {}).get(key)):
                if kind not in _SPEC_TYPES:
                    raise ArtifactError(f"the exported forward's {key} uses type {kind!r}")
    if "expr_str" in json.dumps(program):
        raise ArtifactError("the exported program holds shape expressions; the evaluator takes fixed shapes only")


def _spec_types(spec: object) -> set:
    if not spec:
        return set()
    try:
        tree = json.loads(spec)[1] if isinstance(spec, str) else spec
    except (ValueError, IndexError, TypeError):
        return {"(unreadable)"}
    found, stack = set(), [tree]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            found.add(item.get("type"))
            stack.extend(item.get("children_spec", []))
    return found


def _sanitized(program: dict) -> dict:
    """The program with everything the deserializer would evaluate as code emptied."""
    program = json.loads(json.dumps(program))
    program["guards_code"] = []
    module = program["graph_module"]
    module["metadata"] = {}
    for node in module["graph"]["nodes"]:
        node["metadata"] = {}
    return program


def load_forward(directory: Path, device: str, expected: tuple[int, int]) -> tuple[Callable[[Any], Any], ArtifactMeta]:
    """The artifact's forward, framework-native as `harness.scoring.evaluate`'s adapters call it
    (torch: an int64 tensor on `device`; mlx: an int32 mx.array), after checking that it takes
    exactly the `expected` (batch, seq_len)."""
    meta = ArtifactMeta.read(directory)
    if (meta.batch, meta.seq_len) != tuple(expected):
        raise ArtifactError(f"the exported forward takes inputs of shape ({meta.batch}, {meta.seq_len}); the "
                            f"evaluator feeds {tuple(expected)}")
    if meta.framework == "torch":
        return _load_torch(Path(directory), device), meta
    return _load_mlx(Path(directory)), meta


def _load_torch(directory: Path, device: str) -> Callable[[Any], Any]:
    import torch
    from torch._export.serde.serialize import SerializedArtifact, deserialize

    try:
        program = json.loads((directory / TORCH_PROGRAM).read_text(encoding="utf-8"))
        tensors = torch.load(directory / TORCH_TENSORS, map_location=device, weights_only=True)
    except FileNotFoundError as exc:
        raise ArtifactError(f"the exported model is incomplete: {exc.filename} is missing") from None
    except Exception as exc:  # noqa: BLE001 - a file that is not what we wrote
        raise ArtifactError(f"the exported model is unreadable: {type(exc).__name__}: {_first_line(exc)}") from None
    check_torch_program(program)
    if not (isinstance(tensors, dict) and set(tensors) == {"state_dict", "constants"}
            and all(isinstance(part, dict) for part in tensors.values())):
        raise ArtifactError(f"{directory / TORCH_TENSORS} is not the tensors of an exported forward")
    try:
        exported = deserialize(SerializedArtifact(json.dumps(_sanitized(program)).encode(), tensors["state_dict"],
                                                  tensors["constants"], b""))
        module = exported.module()
    except Exception as exc:  # noqa: BLE001
        raise ArtifactError(f"the exported model does not load: {type(exc).__name__}: {_first_line(exc)}") from None
    return module


def _load_mlx(directory: Path) -> Callable[[Any], Any]:
    import mlx.core as mx

    path = directory / MLX_FUNCTION
    if not path.is_file():
        raise ArtifactError(f"the exported model is incomplete: {path} is missing")
    try:
        imported = mx.import_function(str(path))
    except Exception as exc:  # noqa: BLE001
        raise ArtifactError(f"the exported model does not load: {type(exc).__name__}: {_first_line(exc)}") from None

    def forward(x: Any) -> Any:
        out = imported(x)
        return out[0] if isinstance(out, (list, tuple)) else out

    return forward


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:300] if text else ""
