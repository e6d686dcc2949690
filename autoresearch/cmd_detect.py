"""`autoresearch detect` and `autoresearch presets`: what hardware is here, which backend,
device and preset fit it, and the tiers to choose from. Data goes to stdout, messages to stderr;
the harness is imported inside the commands so `autoresearch --help` stays fast."""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, Optional

import typer

from autoresearch.output import err, fail, print_json

if TYPE_CHECKING:
    from harness.hardware.detect import Choice, HardwareReport, TorchBuildAdvice
    from harness.hardware.presets import Preset

JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON object on stdout.")]
BackendOpt = Annotated[Optional[str], typer.Option(
    "--backend", help="Use this trainer backend (cuda, rocm, mps, mlx) if what is installed allows it.")]
PresetOpt = Annotated[Optional[str], typer.Option(
    "--preset", help="Use this preset instead of the detected one (see `autoresearch presets`).")]
VerifyOpt = Annotated[bool, typer.Option(
    "--verify", help="Import torch and mlx to ask them what they see (seconds; `setup` always does).")]

LABEL_WIDTH = 14


def _load_presets() -> dict[str, "Preset"]:
    from harness.hardware.presets import PresetError, load_presets

    try:
        return load_presets()
    except PresetError as exc:
        fail(str(exc), "fix the preset file (or restore it with `git checkout presets/`)")


def _gb(memory_bytes: int | None) -> str:
    return "unknown" if memory_bytes is None else f"{memory_bytes / 2**30:.1f} GB"


def _row(label: str, value: str, indent: str = "") -> None:
    typer.echo(f"{indent}{label:<{LABEL_WIDTH}}{value}")


def _predicted(source: str) -> str:
    return " (build read from its files; `--verify` imports it)" if source == "files" else ""


def _print_report(report: "HardwareReport", choice: "Choice", advice: "TorchBuildAdvice | None") -> None:
    wsl = f", WSL{report.wsl}" if report.wsl else ""
    _row("OS", f"{report.os} {report.os_release} ({report.arch}{wsl})")
    _row("Python", report.python)
    cpu = report.cpu
    _row("CPU", f"{cpu.model or 'unknown model'}, {cpu.cores or '?'} cores, {_gb(cpu.ram_bytes)} RAM")

    torch, mlx = report.frameworks.torch, report.frameworks.mlx
    if torch is not None:
        gpu = (f"HIP {torch.hip}" if torch.hip else f"CUDA {torch.cuda}" if torch.cuda else "CPU build")
        _row("torch", f"{torch.version} ({gpu}); GPU devices: {torch.cuda_device_count}; "
                      f"MPS: {'yes' if torch.mps_available else 'no'}{_predicted(torch.source)}")
    else:
        _row("torch", report.absent.get("torch", "not probed"))
    if advice is not None:
        _row("", f"wrong build: {advice.problem}")
        _row("", f"fix: {advice.command}")
        _row("", f"     (with uv: {advice.uv_command})")
    if mlx is not None:
        _row("mlx", f"{mlx.version}, default device {mlx.default_device}{_predicted(mlx.source)}")
    else:
        _row("mlx", report.absent.get("mlx", "not probed"))

    if report.accelerators:
        typer.echo("Accelerators")
        for acc in report.accelerators:
            details = [f"{acc.vendor}", _gb(acc.memory_bytes)]
            if acc.compute_capability:
                details.append(f"capability {acc.compute_capability}")
            if acc.gfx_arch:
                details.append(acc.gfx_arch)
            if acc.driver_version:
                details.append(f"driver {acc.driver_version}")
            typer.echo(f"  {acc.name}: {', '.join(details)} [{acc.source}]")
    else:
        _row("Accelerators", "none found")
    hardware_probes = {k: v for k, v in report.absent.items() if k not in ("torch", "mlx")}
    if hardware_probes:
        typer.echo("Probes that found nothing")
        for name, reason in hardware_probes.items():
            _row(name, reason, indent="  ")

    typer.echo("Choice")
    for key, value in (("backend", choice.backend), ("device", choice.device), ("preset", choice.preset)):
        _row(key, value, indent="  ")
        typer.echo(f"  {'':<{LABEL_WIDTH}}{choice.reasons[key]}")


def detect(
    json_output: JsonOpt = False,
    backend: BackendOpt = None,
    preset: PresetOpt = None,
    verify: VerifyOpt = False,
) -> None:
    """Show the hardware here and the backend, device and preset `setup` would use.

    Reports OS, WSL, Python, frameworks (torch CUDA/HIP/MPS, mlx), accelerators and the probes
    that found nothing; then the choice, each part with its reason. torch and mlx are not
    imported (that takes seconds): their builds are read from the installed files and what they
    can use is predicted from the hardware; `--verify` imports them instead."""
    from harness.hardware.detect import choose, probe, torch_build_advice

    presets = _load_presets()
    if verify:
        with err.status("probing hardware and importing frameworks..."):
            report = probe(frameworks="import")
    else:
        report = probe(frameworks="files")
    try:
        choice = choose(report, presets, backend=backend, preset=preset)
    except ValueError as exc:
        fail(str(exc))  # it names the valid choices, or what to install
    advice = torch_build_advice(report)
    if json_output:
        print_json({**report.to_dict(), "torch_build": advice.to_dict() if advice else None,
                    "choice": choice.to_dict()})
    else:
        _print_report(report, choice, advice)


presets_app = typer.Typer(
    help="The hardware tiers `detect` chooses from (presets/*.toml).",
    no_args_is_help=False,
    add_completion=False,
)


def _print_table(presets: dict[str, "Preset"]) -> None:
    header = ("NAME", "BACKEND", "MATCH", "DATA", "SEQ", "DEPTH", "BATCH", "TOTAL", "WINDOW")
    rows = [header] + [
        (p.name, p.backend, p.match.summary(), p.evaluator.DATA_SOURCE, str(p.evaluator.MAX_SEQ_LEN),
         str(p.trainer["DEPTH"]), str(p.trainer["DEVICE_BATCH_SIZE"]), str(p.trainer["TOTAL_BATCH_SIZE"]),
         str(p.trainer["WINDOW_PATTERN"]))
        for p in presets.values()
    ]
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    for row in rows:
        typer.echo("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip())


def _list(json_output: bool) -> None:
    presets = _load_presets()
    if json_output:
        print_json({"presets": [p.to_dict() for p in presets.values()]})
    else:
        _print_table(presets)


@presets_app.callback(invoke_without_command=True)
def presets_main(ctx: typer.Context, json_output: JsonOpt = False) -> None:
    """List the hardware tiers (same as `presets list`)."""
    if ctx.invoked_subcommand is None:
        _list(json_output)


@presets_app.command("list")
def presets_list(json_output: JsonOpt = False) -> None:
    """List every tier: name, backend, hardware it matches, main settings."""
    _list(json_output)


@presets_app.command("show")
def presets_show(
    name: Annotated[str, typer.Argument(help="Preset name, e.g. h100 or cpu-tiny.")],
    json_output: JsonOpt = False,
) -> None:
    """Print one preset: match rules, evaluator and trainer constants."""
    presets = _load_presets()
    if name not in presets:
        fail(f"unknown preset {name!r}; known presets: {', '.join(presets)}", "see `autoresearch presets`")
    preset = presets[name]
    if json_output:
        print_json(preset.to_dict())
        return
    typer.echo(f"{preset.name}: {preset.description}")
    _row("file", str(preset.path), indent="  ")
    _row("backend", preset.backend, indent="  ")
    _row("match", preset.match.summary(), indent="  ")
    if preset.match.names:
        _row("names", ", ".join(preset.match.names), indent="  ")
    _row("num_shards", str(preset.num_shards), indent="  ")
    for section, values in (("evaluator", preset.to_dict()["evaluator"]), ("trainer", preset.trainer)):
        typer.echo(f"[{section}]")
        for key, value in values.items():
            typer.echo(f"  {key} = {value!r}")


def register(app: typer.Typer) -> None:
    app.command(rich_help_panel="Hardware")(detect)
    app.add_typer(presets_app, name="presets", rich_help_panel="Hardware")
