"""The ``segnode`` command: one Typer app for every task the node offers."""

from __future__ import annotations

import json
from contextlib import contextmanager
from pathlib import Path
from collections.abc import Callable, Iterator
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from node import __version__
from node.config import ConfigError, Settings, load_settings, masked_dict

app = typer.Typer(
    name="segnode",
    help="A DICOM segmentation node: receive series, segment them, send DICOM-SEG back.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
config_app = typer.Typer(help="Show or check the node's configuration.", no_args_is_help=True)
app.add_typer(config_app, name="config")

out = Console()
err = Console(stderr=True)


class _State:
    config_path: Optional[Path] = None


def settings() -> Settings:
    """The effective settings; an invalid config ends the command with one line and exit 2."""
    try:
        return load_settings(_State.config_path)
    except ConfigError as exc:
        err.print(f"[red]config error:[/red] {escape(str(exc))}", highlight=False, soft_wrap=True)
        raise typer.Exit(2) from None


def fail(message: str, code: int = 1) -> typer.Exit:
    err.print(f"[red]error:[/red] {escape(message)}", highlight=False, soft_wrap=True)
    return typer.Exit(code)


@contextmanager
def progress_bar(description: str) -> Iterator[Callable[[int, int], None]]:
    """A Rich progress bar; yields ``update(done, total)``."""
    with Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
        console=err, transient=True, disable=not err.is_terminal,
    ) as progress:
        task = progress.add_task(description, total=None)

        def update(done: int, total: int) -> None:
            progress.update(task, completed=done, total=total)

        yield update


def _version(value: bool) -> None:
    if value:
        out.print(f"segnode {__version__}")
        raise typer.Exit()


@app.callback()
def main_options(
    config: Annotated[
        Optional[Path], typer.Option("--config", "-c", help="TOML config file (default: configs/node.toml).")
    ] = None,
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version.")
    ] = False,
) -> None:
    _State.config_path = config


@config_app.command("show")
def config_show(
    as_json: Annotated[bool, typer.Option("--json", help="JSON instead of TOML.")] = False,
) -> None:
    """Print the effective configuration (file + SEGNODE_* environment), secrets masked."""
    import tomli_w

    data = masked_dict(settings())
    if as_json:
        out.print_json(json.dumps(data))
        return

    def drop_none(value):
        if isinstance(value, dict):
            return {k: drop_none(v) for k, v in value.items() if v is not None}
        if isinstance(value, list):
            return [drop_none(v) for v in value]
        return value

    typer.echo(tomli_w.dumps(drop_none(data)), nl=False)


@config_app.command("check")
def config_check() -> None:
    """Validate the configuration; exit 2 with the bad key and value if it is invalid."""
    settings()
    out.print("config ok")


@app.command("phantom")
def phantom(
    out_dir: Annotated[Path, typer.Argument(help="Folder for dicom/, labels.nii.gz, ct.nii.gz, classes.json.")],
    size: Annotated[str, typer.Option(help="Columns,rows,slices.")] = "256,256,160",
    spacing: Annotated[str, typer.Option(help="Millimetres along columns,rows,slices.")] = "0.8,0.8,1.5",
    seed: Annotated[int, typer.Option(help="Same seed, same phantom (pixels and UIDs).")] = 0,
    tiny: Annotated[bool, typer.Option("--tiny", help="64x64x40 at 3.2x3.2x6 mm, for quick checks.")] = False,
) -> None:
    """Write a synthetic contrast-enhanced abdominal CT series with its exact label map."""
    from node.phantom import TINY, PhantomSpec, write_phantom

    try:
        if tiny:
            spec = PhantomSpec(size=TINY.size, spacing=TINY.spacing, seed=seed)
        else:
            spec = PhantomSpec(
                size=tuple(int(v) for v in size.split(",")),
                spacing=tuple(float(v) for v in spacing.split(",")),
                seed=seed,
            )
    except ValueError as exc:
        raise fail(f"--size/--spacing need three comma-separated numbers: {exc}", 2) from None
    with err.status("Building phantom"):
        paths = write_phantom(spec, out_dir)
    for kind, path in paths.items():
        out.print(f"{kind:>8}: {path}")


@app.command("volume-info")
def volume_info(
    path: Annotated[Path, typer.Argument(help="A folder, zip or file of DICOM, or a NIfTI file.")],
    series: Annotated[Optional[str], typer.Option(help="SeriesInstanceUID to pick from a mix.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
) -> None:
    """Build the volume from PATH and print its geometry, or say exactly why it is refused."""
    volume = _load_volume(path, series)
    g = volume.geometry
    info = {
        "shape_ijk": list(volume.shape_ijk),
        "dtype": str(volume.array.dtype),
        "origin_lps": list(g.origin),
        "spacing": list(g.spacing),
        "direction": [list(r) for r in g.direction],
        "affine_ras": g.affine_ras.round(6).tolist(),
        "value_range": [float(volume.array.min()), float(volume.array.max())],
        "series_uid": volume.source.series_uid if volume.source else None,
        "modality": volume.source.modality if volume.source else None,
        "notes": volume.notes,
    }
    if as_json:
        typer.echo(json.dumps(info, indent=2))
        return
    table = Table(show_header=False, box=None)
    for key, value in info.items():
        table.add_row(key, str(value))
    out.print(table)


@app.command("convert")
def convert(
    path: Annotated[Path, typer.Argument(help="A folder, zip or file of DICOM.")],
    output: Annotated[Path, typer.Argument(help="Output .nii or .nii.gz file.")],
    series: Annotated[Optional[str], typer.Option(help="SeriesInstanceUID to pick from a mix.")] = None,
) -> None:
    """Convert a DICOM series to NIfTI with its exact geometry."""
    from node.nifti import write_nifti

    if not output.name.endswith((".nii", ".nii.gz")):
        raise fail(f"output must end in .nii or .nii.gz, got {output.name}", 2)
    volume = _load_volume(path, series)
    write_nifti(volume, output)
    out.print(f"wrote {output} ({'x'.join(map(str, volume.shape_ijk))}, {volume.array.dtype})")


rules_app = typer.Typer(help="Check routing rules against series.", no_args_is_help=True)
app.add_typer(rules_app, name="rules")


@rules_app.command("test")
def rules_test(
    path: Annotated[Path, typer.Argument(help="A folder holding one series, or one DICOM file.")],
    rules_file: Annotated[
        Optional[Path], typer.Option("--rules", help="Rules file (default: [node] rules of the config).")
    ] = None,
    calling_aet: Annotated[str, typer.Option(help="Pretend the series came from this calling AE.")] = "",
    via: Annotated[str, typer.Option(help="Pretend it arrived via dimse|stow|orthanc|file.")] = "file",
    address: Annotated[str, typer.Option(help="Pretend it came from this address.")] = "",
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
) -> None:
    """Show which rule a series matches and why: every condition with pass or fail."""
    from dataclasses import asdict

    from node.ingest import Sender
    from node.rules import RulesError, explain, load_rules, read_facts, route

    if via not in ("dimse", "stow", "orthanc", "file"):
        raise fail(f"--via must be dimse, stow, orthanc or file, got {via!r}", 2)
    if not path.exists():
        raise fail(f"{path}: no such file or folder", 2)
    config = settings()
    source = rules_file or config.node.rules
    if rules_file is not None and not rules_file.exists():
        raise fail(f"{rules_file}: no such rules file", 2)
    try:
        rules = load_rules(source, [d.name for d in config.destinations])
    except RulesError as exc:
        raise fail(str(exc), 2) from None
    facts = read_facts(path, Sender(via, calling_aet, address))  # type: ignore[arg-type]
    explained = explain(route(facts, rules), facts)
    if as_json:
        typer.echo(json.dumps(asdict(explained), indent=2))
        return
    typer.echo(f"rules: {source if source.exists() else 'built-in default (no ' + str(source) + ')'}")
    typer.echo("series: " + ", ".join(f"{k}={v}" for k, v in explained.facts.items() if v is not None))
    for rule in explained.rules:
        verdict = "no match"
        if rule["matched"]:
            verdict = "MATCH" if rule["name"] == explained.matched else "match, not used (an earlier rule won)"
        typer.echo(f"rule {rule['name']}: {verdict}")
        for check in rule["checks"]:
            typer.echo(f"  {'pass' if check['passed'] else 'FAIL'}  {check['condition']}: {check['detail']}")
    typer.echo(f"result: {explained.reason}")


@app.command("send")
def send_command(
    path: Annotated[Path, typer.Argument(help="A folder, zip or file of DICOM.")],
    to: Annotated[str, typer.Option("--to", help="The receiving C-STORE SCP as HOST:PORT.")],
    aet: Annotated[str, typer.Option("--aet", help="Called AE title (the receiver's).")] = "ANY-SCP",
    calling_aet: Annotated[str, typer.Option("--calling-aet", help="Our AE title.")] = "SEGNODE",
) -> None:
    """Send DICOM files to a C-STORE SCP (this node, a PACS, Orthanc) and print the status counts."""
    from pynetdicom import _config as pynetdicom_config
    from pynetdicom.status import code_to_category

    from node.ingest.send import send

    host, _, port = to.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise fail(f"--to must be HOST:PORT, got {to!r}", 2)
    pynetdicom_config.STORE_SEND_CHUNKED_DATASET = True  # send each file's bytes as they are
    try:
        with progress_bar(f"Sending to {to}") as update:
            report = send(path, host, int(port), called_aet=aet, calling_aet=calling_aet, progress=update)
    except FileNotFoundError as exc:
        raise fail(str(exc), 2) from None
    for status, count in sorted(report.statuses.items()):
        out.print(f"0x{status:04X} {code_to_category(status).lower():<8} {count}", highlight=False)
    if report.not_accepted:
        out.print(f"not accepted by the receiver (SOP class/transfer syntax): {len(report.not_accepted)}")
    if report.not_dicom:
        out.print(f"skipped, not DICOM: {len(report.not_dicom)}")
    if report.error:
        raise fail(f"{to}: {report.error}")
    if report.failed:
        raise typer.Exit(1)


@app.command("listen")
def listen_command(
    port: Annotated[Optional[int], typer.Option(help="Port (default: \\[dicom] port; 0 = any free one).")] = None,
    aet: Annotated[Optional[str], typer.Option("--aet", help="Our AE title (default: \\[dicom] ae_title).")] = None,
) -> None:
    """Run the DICOM listener in the foreground: store into the spool, print each series that is ready."""
    import logging
    import signal
    import threading

    from node.ingest.scp import serve_forever, start_listener

    config = settings()
    if aet:
        config.dicom.ae_title = aet
    logging.basicConfig(level=config.node.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    def ready(event) -> None:
        fields = ("series_uid", "reason", "instance_count", "generation", "modality", "is_image")
        typer.echo(json.dumps({"ready": {k: getattr(event, k) for k in fields}, "folder": str(event.folder)}))

    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.set())
    try:
        listener = start_listener(config, ready, port=port)
    except (OSError, ValueError) as exc:
        raise fail(f"cannot listen: {exc}") from None
    typer.echo(f"listening as {config.dicom.ae_title} on {config.dicom.host}:{listener.port}", err=True)
    serve_forever(listener, stop)


@app.command("run")
def run(
    input: Annotated[Path, typer.Argument(help="A DICOM folder, zip or file, or a NIfTI file.")],
    outdir: Annotated[Path, typer.Argument(help="Folder for labels.nii.gz, classes.json, stats.csv, report.json.")],
    engine: Annotated[
        Optional[str], typer.Option(help="threshold | labelmap | totalsegmentator (default: config segmentation.engine).")
    ] = None,
    task: Annotated[Optional[str], typer.Option(help="TotalSegmentator task (default: config segmentation.task).")] = None,
    fast: Annotated[bool, typer.Option("--fast", help="TotalSegmentator's 3 mm model.")] = False,
    fastest: Annotated[bool, typer.Option("--fastest", help="TotalSegmentator's 6 mm model.")] = False,
    roi_subset: Annotated[
        Optional[list[str]],
        typer.Option("--roi_subset", help="Keep only these classes: --roi_subset liver aorta (after INPUT OUTDIR)."),
    ] = None,
    robust_crop: Annotated[bool, typer.Option("--robust_crop", help="TotalSegmentator's robust ROI crop.")] = False,
    device: Annotated[Optional[str], typer.Option(help="cpu | gpu | gpu:N | mps (default: config segmentation.device).")] = None,
    labels: Annotated[
        Optional[Path], typer.Option("--labels", help="labelmap engine: a label NIfTI or a folder of per-class masks.")
    ] = None,
    series: Annotated[Optional[str], typer.Option(help="SeriesInstanceUID to pick from a mix.")] = None,
    post: Annotated[
        Optional[list[str]], typer.Option("--post", help="Post-processing stage by name (repeatable).")
    ] = None,
    option: Annotated[
        Optional[list[str]], typer.Option("--option", help="Engine option KEY=VALUE, e.g. vessel_hu=120 (repeatable).")
    ] = None,
    output: Annotated[
        Optional[list[str]], typer.Option("--output", help="Extra output by name, e.g. seg (repeatable).")
    ] = None,
    split_portal_hepatic: Annotated[
        bool, typer.Option("--split_portal_hepatic", help="Liver vessels: split into portal and hepatic trees.")
    ] = False,
    min_component_size: Annotated[
        Optional[int], typer.Option("--min_component_size", help="Liver vessels: drop smaller components (voxels).")
    ] = None,
    no_fallback_full_liver: Annotated[
        bool, typer.Option("--no_fallback_full_liver", help="Liver vessels: fail without a liver.")
    ] = False,
    split_support_dir: Annotated[
        Optional[Path], typer.Option("--split_support_dir", help="Liver vessels: folder of support masks.")
    ] = None,
    generate_split_support: Annotated[
        bool, typer.Option("--generate_split_support", help="Liver vessels: make missing support labels.")
    ] = False,
    no_skeleton: Annotated[
        bool, typer.Option("--no_skeleton", help="Liver vessels: split without the skeleton graph.")
    ] = False,
    min_split_component_size: Annotated[
        Optional[int], typer.Option("--min_split_component_size", help="Liver vessels: merge smaller pieces.")
    ] = None,
) -> None:
    """Segment a series: load, engine, post-processing; labels, classes, stats and report.json in OUTDIR."""
    import re

    from rich.progress import SpinnerColumn

    from node.pipeline import ProgressEvent, request_from_settings, run_pipeline
    from node.segment.registry import ENGINES

    config = settings()
    engine = (engine or config.segmentation.engine).lower()
    if engine not in ENGINES:
        raise fail(f"--engine must be one of {', '.join(ENGINES)}, got {engine!r}", 2)
    if device is not None and not re.fullmatch(r"cpu|gpu|gpu:\d+|mps", device):
        raise fail(f"--device must be cpu, gpu, gpu:N or mps, got {device!r}", 2)
    if engine == "labelmap" and labels is None:
        raise fail("--engine labelmap needs --labels: a label NIfTI or a folder of per-class masks", 2)
    options: dict[str, object] = {}
    for item in option or []:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise fail(f"--option takes KEY=VALUE, got {item!r}", 2)
        try:
            options[key.strip()] = json.loads(value)
        except json.JSONDecodeError:
            options[key.strip()] = value
    # The liver vessel pipeline's own flags; any of them turns the liver_vessels stage on.
    vessel_flags = {
        "split_portal_hepatic": split_portal_hepatic or None, "min_component_size": min_component_size,
        "no_fallback_full_liver": no_fallback_full_liver or None, "split_support_dir": split_support_dir,
        "generate_split_support": generate_split_support or None, "no_skeleton": no_skeleton or None,
        "min_split_component_size": min_split_component_size,
    }
    vessel_options = {k: str(v) if isinstance(v, Path) else v for k, v in vessel_flags.items() if v is not None}
    post = list(post or [])
    if vessel_options and "liver_vessels" not in post:
        post.append("liver_vessels")
    request = request_from_settings(
        config, engine=engine, task=task, fast=fast or None, fastest=fastest or None,
        roi_subset=[n for value in roi_subset or [] for n in value.replace(",", " ").split()],
        robust_crop=robust_crop or None, device=device, labels_path=labels, options=options,
        post=post, series_uid=series, outputs=output or (),
        stage_options={"liver_vessels": vessel_options} if vessel_options else None,
    )
    with Progress(
        SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
        console=err, disable=not err.is_terminal,
    ) as progress:
        tasks: dict[str, object] = {}

        def show(event: ProgressEvent) -> None:
            if event.status == "output":  # an output is ready to deliver: the stage's line says it
                return
            if event.status == "started":
                tasks[event.stage] = progress.add_task(event.stage, total=None)
            elif event.status == "progress":
                progress.update(tasks[event.stage], completed=event.done, total=event.total)  # type: ignore[arg-type]
            else:
                mark = {"done": "[green]done[/green]", "skipped": "[yellow]skipped[/yellow]"}.get(
                    event.status, "[red]failed[/red]"
                )
                line = f"{event.stage}: {mark} ({event.seconds or 0:.2f} s)"
                if event.message and event.status == "skipped":
                    line += f": {escape(event.message)}"
                progress.update(tasks[event.stage], description=line, completed=1, total=1)  # type: ignore[arg-type]
                if progress.disable:  # not a terminal (logs, CI): one line per stage
                    err.print(line, highlight=False, soft_wrap=True)

        result = run_pipeline(input, outdir, request, progress=show)
    if not result.ok:
        assert result.error is not None
        report = f" (report: {result.paths['report']})" if "report" in result.paths else ""
        raise fail(f"{result.error.message} [{result.error.code}]{report}")
    table = Table(title=f"{engine} on {input.name}", title_justify="left")
    for column in ("id", "name", "voxels", "ml", "mean HU"):
        table.add_column(column, justify="left" if column == "name" else "right")
    for s in result.report["structures"]:
        table.add_row(str(s["id"]), s["name"], str(s["voxels"]), f"{s['volume_ml']:.1f}", str(s["mean_hu"]))
    out.print(table)
    for note in result.report.get("notes", []):
        out.print(f"note: {escape(note)}", highlight=False, soft_wrap=True)
    total = result.report["timings_s"]["total"]
    out.print(f"wrote {', '.join(p.name for p in result.paths.values())} in {outdir} ({total:.2f} s)", highlight=False,
              soft_wrap=True)


#: Options that take several values, as TotalSegmentator's do: ``--roi_subset liver aorta``.
_MULTI_VALUE_OPTIONS = ("--roi_subset",)


def _expand_multi_value(argv: list[str]) -> list[str]:
    """``--roi_subset a b`` -> ``--roi_subset a --roi_subset b`` (click takes one value per use)."""
    expanded: list[str] = []
    option, taken = None, 0
    for arg in argv:
        if arg in _MULTI_VALUE_OPTIONS:
            option, taken = arg, 0
        elif option is not None and not arg.startswith("-"):
            if taken:
                expanded.append(option)
            taken += 1
        else:
            option = None
        expanded.append(arg)
    return expanded


weights_app = typer.Typer(help="TotalSegmentator weights: what is installed; offline import.", no_args_is_help=True)
app.add_typer(weights_app, name="weights")


def _weights_home(weights_dir: Optional[Path]) -> Path:
    from node.segment.weights import home_dir

    return weights_dir if weights_dir is not None else home_dir(settings())


@weights_app.command("status")
def weights_status(
    weights_dir: Annotated[
        Optional[Path], typer.Option("--weights-dir", help="TotalSegmentator home (default: from the config).")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
) -> None:
    """List TotalSegmentator's tasks and modes with the dataset folders each needs, and which are present."""
    from dataclasses import asdict

    from node.segment.weights import WeightsError, installed_datasets, package_version, results_dir, task_status

    home = _weights_home(weights_dir)
    try:
        status = task_status(home)
    except WeightsError as exc:
        raise fail(f"{exc} [{exc.code}]") from None
    if as_json:
        data = {
            "totalsegmentator_version": package_version(),
            "weights_dir": str(home),
            "installed": installed_datasets(home),
            "tasks": [{**asdict(s), "ready_modes": s.ready_modes} for s in status],
        }
        typer.echo(json.dumps(data, indent=2))
        return
    table = Table(title=f"TotalSegmentator {package_version()} weights in {results_dir(home)}", title_justify="left")
    for column in ("task", "mode", "modality", "licence", "datasets", "status"):
        table.add_column(column)

    def ids(folders) -> str:  # Dataset297_TotalSegmentator_total_3mm_1559subj -> 297
        return " ".join(f.rsplit("/", 1)[-1].split("_")[0].removeprefix("Dataset").lstrip("0") or "0" for f in folders)

    ready = 0
    for s in status:
        for m in s.modes:
            ready += m.ready
            state = "[green]ready[/green]" if m.ready else f"[red]missing {ids(m.missing)}[/red]"
            table.add_row(s.task, m.mode, s.modality, "yes" if s.license_required else "", ids(m.datasets), state)
    out.print(table)
    modes = sum(len(s.modes) for s in status)
    out.print(f"{ready} of {modes} task modes ready; import weights with `segnode weights import ZIP|DIR`",
              highlight=False, soft_wrap=True)


@weights_app.command("import")
def weights_import(
    source: Annotated[
        Path, typer.Argument(help="A TotalSegmentator weights zip, a DatasetNNN_* folder, or a folder of them.")
    ],
    weights_dir: Annotated[
        Optional[Path], typer.Option("--weights-dir", help="TotalSegmentator home (default: from the config).")
    ] = None,
) -> None:
    """Install TotalSegmentator weights offline (idempotent: identical datasets are left as they are)."""
    from node.segment.weights import WeightsError, import_weights, results_dir

    home = _weights_home(weights_dir)
    try:
        with err.status(f"Importing {source.name}"):
            imported = import_weights(source, home)
    except WeightsError as exc:
        raise fail(f"{exc} [{exc.code}]", 2 if exc.code in ("not_found", "no_datasets", "bad_zip") else 1) from None
    for item in imported:
        line = f"{item.action:>9}: {item.name}"
        out.print(line + (f"  ({item.note})" if item.note else ""), highlight=False, soft_wrap=True)
    out.print(f"weights in {results_dir(home)}", highlight=False, soft_wrap=True)


def _start_logging(config: Settings) -> None:
    import logging

    logging.basicConfig(level=config.node.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")


@app.command("serve")
def serve_command() -> None:
    """Run the node: DICOM listener, HTTP API with STOW-RS, and job workers (until Ctrl-C/SIGTERM)."""
    from node.rules import RulesError
    from node.serve import ServeError, serve

    config = settings()
    _start_logging(config)
    try:
        serve(config)
    except (ServeError, RulesError) as exc:
        raise fail(str(exc), 2) from None
    except OSError as exc:  # a port in use, an unwritable data folder
        raise fail(f"cannot start: {exc}") from None


@app.command("worker")
def worker_command() -> None:
    """Run extra job workers on the Redis queue (queue backend "redis"), e.g. on a GPU machine."""
    from node.serve import ServeError, work

    config = settings()
    _start_logging(config)
    try:
        work(config)
    except ServeError as exc:
        raise fail(str(exc), 2) from None


@app.command("viewer")
def viewer_command(
    dicomweb: Annotated[Optional[str], typer.Option(
        help="DICOMweb root to review (default: \\[orthanc] url + dicomweb_root, with its credentials).")] = None,
    ohif_dist: Annotated[Optional[Path], typer.Option(help="OHIF's dist/ (default: what make setup fetched).")] = None,
    username: Annotated[str, typer.Option(help="Basic user for --dicomweb.")] = "",
    password: Annotated[str, typer.Option(envvar="SEGNODE_VIEWER_PASSWORD", show_default=False)] = "",
    host: str = "127.0.0.1",
    port: int = 3000,
) -> None:
    """Review results in OHIF: its viewer, with a DICOMweb server behind a same-origin proxy (no CORS)."""
    from node.web.viewer import DEFAULT_DIST, ViewerError, serve_viewer

    if dicomweb is None:
        orthanc = settings().orthanc
        if not orthanc.url:
            raise fail("no DICOMweb server: give --dicomweb, or set [orthanc] url", 2)
        dicomweb = orthanc.url.rstrip("/") + orthanc.dicomweb_root
        username, password = orthanc.username, orthanc.password.get_secret_value()
    try:
        serve_viewer(ohif_dist or DEFAULT_DIST, dicomweb, host=host, port=port, username=username,
                     password=password)
    except ViewerError as exc:
        raise fail(str(exc), 2) from None


xnat_app = typer.Typer(
    help="XNAT case folders (SCANS + ASSESSORS): inventory, per-object NIfTI, clean DICOM-SEG.",
    no_args_is_help=True,
)
app.add_typer(xnat_app, name="xnat")

_XnatPath = Annotated[Path, typer.Argument(help="A case folder or a parent of case folders.")]
_XnatOut = Annotated[Path, typer.Argument(help="Output folder (a sub-folder per case).")]
_XnatNames = Annotated[
    Optional[list[str]], typer.Option("--name", help="SEG name or folder (repeatable).")
]
_XnatSheet = Annotated[
    Optional[Path], typer.Option("--sheet", help="CSV/XLSX: case and name(s) columns.")
]
_XnatCaseCol = Annotated[Optional[str], typer.Option("--case-column", help="Sheet column: case.")]
_XnatNameCol = Annotated[Optional[str], typer.Option("--name-column", help="Sheet column: names.")]
_XnatSheetName = Annotated[Optional[str], typer.Option("--sheet-name", help="XLSX worksheet.")]
_XnatMerge = Annotated[
    Optional[list[str]], typer.Option("--merge", help="NEW=A+B+C (repeatable).")
]
_XnatOverw = Annotated[bool, typer.Option("--overwrite", help="Rewrite existing outputs.")]
_XnatJson = Annotated[bool, typer.Option("--json", help="Machine-readable output.")]


@xnat_app.command("inventory")
def xnat_inventory(path: _XnatPath, out_dir: _XnatOut, as_json: _XnatJson = False) -> None:
    """Write StudySeries_info.json and Segmentations_info.json per case (headers and catalogs only)."""
    from node.xnat.inventory import XnatError, run_inventory

    try:
        with progress_bar("XNAT inventory") as update:
            summaries = run_inventory(path, out_dir, progress=lambda done, total, _case: update(done, total))
    except XnatError as exc:
        raise fail(f"{exc} [{exc.code}]", 2) from None
    if as_json:
        typer.echo(json.dumps(summaries, indent=2))
        return
    table = Table(title=f"XNAT inventory of {path} in {out_dir}", title_justify="left")
    for column in ("case", "series", "segmentations", "problems"):
        table.add_column(column)
    for s in summaries:
        problems = "; ".join(f"{p.get('where', '')} {p['code']}".strip() for p in s["problems"])
        table.add_row(s["case"], str(s["series"]), str(s["segmentations"]), escape(problems))
    out.print(table)


def _xnat_run(mode: str, path: Path, out_dir: Path, names: Optional[list[str]], sheet: Optional[Path],
              case_column: Optional[str], name_column: Optional[str], sheet_name: Optional[str],
              merge: Optional[list[str]], overwrite: bool, as_json: bool) -> None:
    from node.xnat.export import ExportError, ExportOptions, failed, parse_merge, run
    from node.xnat.inventory import XnatError
    from node.xnat.select import Selection, SelectionError, read_sheet

    try:
        table = read_sheet(sheet, case_column, name_column, sheet_name) if sheet is not None else None
        merges = tuple(parse_merge(m) for m in merge or [])
        options = ExportOptions(Selection(tuple(names or ()), table), merges, overwrite)
        with progress_bar(f"XNAT {mode}") as update:
            # Outbox hook: run(..., deliver=callable(seg_path, report)) is called for each SEG written.
            reports = run(path, out_dir, options, mode=mode, progress=lambda d, t, _case: update(d, t))
    except (SelectionError, ExportError, XnatError) as exc:
        raise fail(f"{exc} [{exc.code}]", 2) from None
    if as_json:
        typer.echo(json.dumps(reports, indent=2))
    else:
        shown = Table(title=f"XNAT {mode}: {path} -> {out_dir}", title_justify="left")
        for column in ("case", "segmentation", "name", "series", "placement", "objects", "result"):
            shown.add_column(column, overflow="fold")
        messages = []
        for report in reports:
            for p in report.get("problems", []):
                messages.append(f"{report['case']}: {p['code']}: {p['message']}")
            for folder, s in report["segmentations"].items():
                objects = s.get("objects", [])
                statuses = sorted({o.get("status", s.get("status", "")) for o in objects} - {""})
                result = ", ".join(statuses or [s.get("status", "")])
                if s.get("error"):
                    result = f"[red]{escape(s['error']['code'])}[/red]"
                    messages.append(f"{report['case']}/{folder}: {s['error']['code']}: {s['error']['message']}")
                shown.add_row(report["case"], folder, escape(str(s.get("name") or "")),
                              str(s.get("series_folder") or ""), (s.get("placement") or {}).get("method", ""),
                              str(len(objects)), result)
        out.print(shown)
        for message in messages:
            out.print(escape(message), highlight=False, soft_wrap=True)
    if failed(reports):
        raise typer.Exit(1)


@xnat_app.command("export")
def xnat_export(path: _XnatPath, out_dir: _XnatOut, name: _XnatNames = None, sheet: _XnatSheet = None,
                case_column: _XnatCaseCol = None, name_column: _XnatNameCol = None,
                sheet_name: _XnatSheetName = None, merge: _XnatMerge = None, overwrite: _XnatOverw = False,
                as_json: _XnatJson = False) -> None:
    """Selected SEGs as NIfTI: {series}.nii.gz, {series}_ON_{object}_FN_{segfolder}.nii.gz per object."""
    _xnat_run("export", path, out_dir, name, sheet, case_column, name_column, sheet_name, merge, overwrite,
              as_json)


@xnat_app.command("to-seg")
def xnat_to_seg(path: _XnatPath, out_dir: _XnatOut, name: _XnatNames = None, sheet: _XnatSheet = None,
                case_column: _XnatCaseCol = None, name_column: _XnatNameCol = None,
                sheet_name: _XnatSheetName = None, merge: _XnatMerge = None, overwrite: _XnatOverw = False,
                as_json: _XnatJson = False) -> None:
    """Selected SEGs as standard DICOM-SEG: <case>/SEG/{series}_SEG_FN_{segfolder}.dcm.

    Send them to the archive with `segnode send OUT/<case>/SEG --to HOST:PORT`.
    """
    _xnat_run("to-seg", path, out_dir, name, sheet, case_column, name_column, sheet_name, merge, overwrite,
              as_json)


seg_app = typer.Typer(help="DICOM-SEG: describe one, or convert it to NIfTI.", no_args_is_help=True)
app.add_typer(seg_app, name="seg")


@seg_app.command("info")
def seg_info(
    seg: Annotated[Path, typer.Argument(help="A DICOM-SEG file.")],
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
) -> None:
    """Segments (number, label, codes, colour, frame count), type and referenced series of SEG."""
    from node.dicom.seg import SegError, describe_seg

    try:
        info = describe_seg(seg)
    except SegError as exc:
        raise fail(f"{seg}: {exc} [{exc.code}]") from None
    if as_json:
        typer.echo(json.dumps(info, indent=2, default=str))
        return
    out.print(f"{info['segmentation_type']} SEG, {info['frames']} frame(s) of "
              f"{info['columns']}x{info['rows']}, series {info['series_number']} "
              f"{escape(info['series_description'])} ({escape(info['manufacturer'])})", highlight=False)
    for uid, count in info["referenced_series"].items():
        out.print(f"references series {uid} ({count} instance(s))", highlight=False)
    table = Table()
    for column in ("#", "id", "label", "type", "category", "colour", "frames", "algorithm"):
        table.add_column(column, overflow="fold")

    def code(c):
        return "" if c is None else f"{c['meaning']} ({c['scheme']} {c['value']})"

    for s in info["segments"]:
        modifier = f", {s['type_modifier']['meaning']}" if s["type_modifier"] else ""
        colour = "#{:02x}{:02x}{:02x}".format(*s["color"]) if s["color"] else ""
        table.add_row(str(s["number"]), str(s["label_id"]), escape(s["label"]),
                      escape(code(s["type"]) + modifier), escape(code(s["category"])), colour,
                      "" if s["frames"] is None else str(s["frames"]), escape(s["algorithm"]))
    out.print(table)
    for note in info["notes"]:
        out.print(f"note: {escape(note)}", highlight=False)


@seg_app.command("to-nifti")
def seg_to_nifti_command(
    seg: Annotated[Path, typer.Argument(help="A DICOM-SEG file.")],
    output: Annotated[Path, typer.Argument(help="Output .nii/.nii.gz label map (classes.json beside it).")],
    source: Annotated[Optional[Path], typer.Option(
        help="The source series (folder/zip): the label map gets its grid. Default: the SEG's planes.")] = None,
) -> None:
    """Convert SEG to a multilabel NIfTI on the source's grid, with classes.json beside it."""
    from node.dicom.seg import SegError, seg_to_nifti

    if not output.name.endswith((".nii", ".nii.gz")):
        raise fail(f"output must end in .nii or .nii.gz, got {output.name}", 2)
    try:
        result = seg_to_nifti(seg, output, source)
    except SegError as exc:
        raise fail(f"{seg}: {exc} [{exc.code}]") from None
    out.print(f"wrote {result['nifti']} ({'x'.join(map(str, result['shape_ijk']))}, "
              f"{len(result['labels'])} label(s)) and {result['classes']}", highlight=False)
    for note in result["notes"]:
        out.print(f"note: {escape(note)}", highlight=False)


outbox_app = typer.Typer(help="Deliveries of results to the destinations: state, retry.", no_args_is_help=True)
app.add_typer(outbox_app, name="outbox")


def _open_outbox(with_jobs: bool = False):
    """The node's outbox (``<data_dir>/outbox.db``), safe beside a running ``serve`` (no recovery)."""
    from node.export.outbox import Outbox

    config = settings()
    if not (Path(config.node.data_dir) / "outbox.db").exists():
        raise fail(f"no outbox in {config.node.data_dir} (nothing was queued yet)")
    store = None
    if with_jobs:
        from node.jobs import open_store

        store = open_store(config)
    return Outbox.from_settings(config, on_change=store.set_destinations if store else None, recover=False), store


@outbox_app.command("status")
def outbox_status(as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False) -> None:
    """Deliveries per destination: pending, delivering, delivered, failed, cancelled; next attempt, last error."""
    import datetime as dt

    outbox, _ = _open_outbox()
    try:
        rows = outbox.status()
    finally:
        outbox.close()
    if as_json:
        typer.echo(json.dumps(rows, indent=2))
        return
    table = Table(title="outbox", title_justify="left")
    for column in ("destination", "kind", "pending", "delivering", "delivered", "failed", "cancelled",
                   "next attempt"):
        table.add_column(column)
    table.add_column("last error", overflow="fold")
    for r in rows:
        nxt = dt.datetime.fromtimestamp(r["next_attempt"]).strftime("%H:%M:%S") if r["next_attempt"] else ""
        table.add_row(escape(r["destination"]), r["kind"], *(str(r[k]) for k in
                      ("pending", "delivering", "delivered", "failed", "cancelled")), nxt,
                      escape(r["last_error"] or ""))
    out.print(table)


@outbox_app.command("retry")
def outbox_retry(
    destination: Annotated[Optional[str], typer.Option(help="Only this destination.")] = None,
    job: Annotated[Optional[str], typer.Option(help="Only this job's deliveries.")] = None,
) -> None:
    """Failed deliveries are due again, with fresh attempts (a running node sends them within a second)."""
    outbox, store = _open_outbox(with_jobs=True)
    try:
        count = outbox.retry(destination=destination, job_id=job)
    finally:
        outbox.close()
        if store is not None:
            store.close()
    out.print(f"{count} failed deliver{'y' if count == 1 else 'ies'} queued again", highlight=False)


_LabelsArg = Annotated[Path, typer.Argument(
    help="A label NIfTI (classes: --classes, <name>.json beside it, classes.json, or TotalSegmentator's map) "
         "or a run folder with labels.nii.gz.")]
_ClassesOpt = Annotated[Optional[Path], typer.Option("--classes", help="Class table JSON (names, colours).")]
_TaskOpt = Annotated[str, typer.Option("--task", help="TotalSegmentator task whose class map names the ids.")]
_SmoothOpt = Annotated[int, typer.Option("--mesh-smooth-iters", help="Taubin smoothing iterations; 0: exact voxel surface.")]


def _labels_for_artifacts(path: Path, classes: Optional[Path], task: str):
    from node.artifacts import load_labels
    from node.segment import SegmentationError

    try:
        return load_labels(path, classes, task)
    except (OSError, ValueError, SegmentationError) as exc:
        raise fail(str(exc), 2) from None


@app.command("mesh")
def mesh_command(
    labels: _LabelsArg,
    outdir: Annotated[Path, typer.Argument(help="Folder for <structure>.<format> files and meshes.json.")],
    export_format: Annotated[str, typer.Option("--export-format", help="stl | obj | ply")] = "stl",
    units: Annotated[str, typer.Option("--units", help="mm | m")] = "mm",
    space: Annotated[str, typer.Option("--space", help="RAS (NIfTI, Slicer, Blender) | LPS (DICOM)")] = "RAS",
    mesh_smooth_iters: _SmoothOpt = 10,
    decimate: Annotated[Optional[float], typer.Option("--decimate", help="Fraction of faces to keep, e.g. 0.1.")] = None,
    write_empty: Annotated[bool, typer.Option("--write-empty", help="Empty files for expected structures with no voxel.")] = False,
    classes: _ClassesOpt = None,
    task: _TaskOpt = "total",
    workers: Annotated[int, typer.Option("--workers", help="Processes meshing side by side (0: one per core).")] = 0,
) -> None:
    """One closed, manifold mesh per structure, in patient space (RAS by default), named after it."""
    from node.artifacts.mesh import MeshOptions, export_meshes

    try:
        options = MeshOptions(smooth_iters=mesh_smooth_iters, decimate=decimate, space=space.upper(),  # type: ignore[arg-type]
                              units=units, export_format=export_format.lower(), write_empty=write_empty,  # type: ignore[arg-type]
                              workers=workers)
    except ValueError as exc:
        raise fail(str(exc), 2) from None
    volume, table = _labels_for_artifacts(labels, classes, task)
    with progress_bar("Meshing") as update:
        index = export_meshes(volume, outdir, options, expected=table if write_empty else None, progress=update)
    result = Table(title=f"{len(index['meshes'])} meshes in {outdir} ({index['seconds']:.1f} s)", title_justify="left")
    for column in ("name", "faces", "closed", "volume/voxels"):
        result.add_column(column, justify="left" if column == "name" else "right")
    for e in index["meshes"]:
        ratio = f"{e['mesh_volume_ml'] / e['voxel_volume_ml']:.3f}" if e["voxel_volume_ml"] else "-"
        result.add_row(escape(e["name"]), str(e["faces"]), "empty" if e["empty"] else ("yes" if e["watertight"] else "NO"),
                       ratio)
    out.print(result)
    if any(not e["empty"] and not e["watertight"] for e in index["meshes"]):
        raise fail("some meshes are not closed and manifold (see meshes.json)")


@app.command("slices")
def slices_command(
    input: Annotated[Path, typer.Argument(help="A CT: DICOM folder/zip/file or NIfTI.")],
    outdir: Annotated[Path, typer.Argument(help="Folder for axial/, coronal/, sagittal/, slices.json, contact_sheet.png.")],
    labels: Annotated[Optional[Path], typer.Option("--labels", help="Label NIfTI (or run folder) drawn over the CT.")] = None,
    window: Annotated[str, typer.Option("--window", help="abdomen | liver | bone | lung | brain | mediastinum | percentile | W,L")] = "abdomen",
    planes: Annotated[str, typer.Option("--planes", help="Comma-separated: axial,coronal,sagittal.")] = "axial,coronal,sagittal",
    every: Annotated[int, typer.Option("--every", help="Write every n-th slice.")] = 1,
    flat: Annotated[bool, typer.Option("--flat", help="All PNGs in one folder (axial_001.png ...).")] = False,
    overlay_alpha: Annotated[float, typer.Option("--overlay-alpha", help="Label opacity over the CT (0: none).")] = 0.4,
    palette: Annotated[str, typer.Option("--palette", help="exact | auto (overlay colours)")] = "exact",
    contact_sheet: Annotated[bool, typer.Option("--contact-sheet/--no-contact-sheet")] = True,
    classes: _ClassesOpt = None,
    task: _TaskOpt = "total",
    series: Annotated[Optional[str], typer.Option(help="SeriesInstanceUID to pick from a mix.")] = None,
) -> None:
    """PNG slices in radiological orientation with square pixels, their plane corners (slices.json), a contact sheet."""
    from node.artifacts.slices import SliceOptions, write_slices

    try:
        options = SliceOptions(planes=tuple(p.strip() for p in planes.split(",") if p.strip()), window=window,
                               every=every, flat=flat, overlay_alpha=overlay_alpha, palette=palette,
                               contact_sheet=contact_sheet)
    except ValueError as exc:
        raise fail(str(exc), 2) from None
    ct = _load_volume(input, series)
    overlay = None
    if labels is not None:
        from node.segment.labelmap import place_on_grid

        overlay, _ = _labels_for_artifacts(labels, classes, task)
        if overlay.array.shape != ct.array.shape or not overlay.geometry.same_grid(ct.geometry):
            try:
                overlay.array, _ = place_on_grid(overlay, ct.geometry, ct.array.shape)
            except Exception as exc:
                raise fail(f"{labels}: cannot place the labels on the CT's grid: {exc}", 2) from None
            overlay.geometry = ct.geometry
    index = write_slices(ct, outdir, options, labels=overlay)
    counts = ", ".join(f"{p} {v['written']}" for p, v in index["planes"].items())
    out.print(f"{counts} PNGs in {outdir} ({index['seconds']:.1f} s)", highlight=False)


@app.command("blender")
def blender_command(
    source: Annotated[Path, typer.Argument(help="A mesh folder (segnode mesh, or STL/OBJ/PLY files), or labels "
                                                "(a label NIfTI or run folder: meshes are made first).")],
    output: Annotated[Path, typer.Argument(help="The .blend to write.")],
    palette: Annotated[str, typer.Option("--palette", help="exact (the classes' DICOM colours) | auto (semantic)")] = "exact",
    mapping_json: Annotated[Optional[Path], typer.Option("--mapping-json", help="JSON name -> colour overrides.")] = None,
    collection: Annotated[str, typer.Option("--collection", help="The collection holding the structures.")] = "Organs",
    group_categories: Annotated[bool, typer.Option("--group-categories", help="Sub-collections Bone, Muscle, ... Vessel, Other.")] = False,
    scale: Annotated[float, typer.Option("--scale", help="Uniform scale after mm -> m.")] = 1.0,
    units: Annotated[Optional[str], typer.Option("--units", help="Units of a mesh folder without meshes.json: mm | m.")] = None,
    rotate_x_deg: Annotated[float, typer.Option("--rotate-x-deg", help="Rotate about X (degrees).")] = 0.0,
    mirror_x: Annotated[bool, typer.Option("--mirror-x", help="Mirror across X.")] = False,
    remesh: Annotated[str, typer.Option("--remesh", help="none | voxel | quad | smooth | sharp | blocks")] = "none",
    voxel_size: Annotated[Optional[float], typer.Option("--voxel-size", help="Remesh voxel size (Blender units).")] = None,
    slices: Annotated[Optional[Path], typer.Option("--slices", help="PNG slice folder (segnode slices) for the add-on.")] = None,
    blender: Annotated[Optional[str], typer.Option("--blender", help="Blender >= 4.2 binary or a Python with bpy.")] = None,
    mesh_smooth_iters: _SmoothOpt = 10,
    decimate: Annotated[float, typer.Option("--decimate", help="From labels: fraction of faces to keep.")] = 0.1,
    classes: _ClassesOpt = None,
    task: _TaskOpt = "total",
) -> None:
    """A Blender scene: one object per structure, coloured, grouped, framed by a camera; the slice add-on."""
    from node.artifacts.blender import BlenderError, SceneOptions, build_scene
    from node.artifacts.mesh import MeshOptions, label_meshes

    try:
        options = SceneOptions(palette=palette, mapping_json=str(mapping_json) if mapping_json else None,
                               collection=collection, group_categories=group_categories, scale=scale,
                               rotate_x_deg=rotate_x_deg, mirror_x=mirror_x, remesh=remesh, voxel_size=voxel_size,
                               blender=blender)
        mesh_options = MeshOptions(smooth_iters=mesh_smooth_iters, decimate=decimate if decimate < 1 else None)
    except ValueError as exc:
        raise fail(str(exc), 2) from None
    is_labels = source.name.endswith((".nii", ".nii.gz")) or (source.is_dir() and (source / "labels.nii.gz").is_file()
                                                             and not any(source.glob("*.stl")))
    table = None
    if is_labels:
        volume, _ = _labels_for_artifacts(source, classes, task)
        with progress_bar("Meshing") as update:
            meshes: object = label_meshes(volume, mesh_options, progress=update)
        table = volume.classes
    elif source.is_dir():
        meshes = source
    else:
        raise fail(f"{source}: give a mesh folder, a label NIfTI or a run folder", 2)
    try:
        result = build_scene(meshes, output, options, slices=slices, classes=table, units=units)  # type: ignore[arg-type]
    except (BlenderError, ValueError) as exc:
        raise fail(str(exc), 2 if getattr(exc, "code", "") == "no_blender" else 1) from None
    runner = result["runner"]
    out.print(f"{output}: {len(result['objects'])} objects (Blender {result['blender']}, {runner['kind']}, "
              f"{runner['seconds']:.1f} s)" + (f"; skipped: {', '.join(result['skipped'])}" if result["skipped"] else ""),
              highlight=False)


def _load_volume(path: Path, series: Optional[str]):
    from node.dicom.series import VolumeError, read_series
    from node.nifti import read_nifti

    if path.name.endswith((".nii", ".nii.gz")):
        return read_nifti(path)
    try:
        with progress_bar(f"Reading {path.name}") as update:
            return read_series(
                path, series, spacing_tolerance=settings().volume.spacing_tolerance, progress=update
            )
    except VolumeError as exc:
        raise fail(f"{path}: {exc} [{exc.code}]") from None


def main() -> None:
    import sys

    app(args=_expand_multi_value(sys.argv[1:]))


if __name__ == "__main__":
    main()
