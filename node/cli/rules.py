"""``segnode rules``: check routing rules against series."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer

from node.cli.common import fail, settings

rules_app = typer.Typer(help="Check routing rules against series.", no_args_is_help=True)


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
    from node.logs import register_path

    register_path(path)
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
