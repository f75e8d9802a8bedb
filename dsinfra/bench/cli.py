"""Run the registered component benchmarks (all of them, or those named) on one
device. Each prints a table; every figure is measured in this run, against the
device's ceilings (copy bandwidth, matmul rate) measured first, and
against the component's naive baseline."""

from __future__ import annotations

import argparse

import torch

from dsinfra.bench import runner
from dsinfra.cli import CommandError, check_output


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("components", nargs="*", metavar="component", help="benchmarks to run (default: all)")
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda[:N]")
    parser.add_argument("--json", metavar="PATH", help="write the report (machine, versions, date, results) here")
    parser.add_argument("--quick", action="store_true", help="small shapes and few repeats: a smoke run")
    parser.add_argument("--list", action="store_true", help="list the registered benchmarks and exit")
    parser.add_argument("--warmup", type=int, default=2, help="untimed calls before timing (default 2)")
    parser.add_argument("--repeats", type=int, default=10, help="timed calls per case (default 10)")
    parser.add_argument(
        "--markdown", action="store_true", help="print the tables in Markdown, one per component, however wide (for docs)"
    )
    parser.add_argument("--report", metavar="PATH", help="print the tables of a saved --json report instead of running")


def run(args: argparse.Namespace) -> int:
    if args.report:
        return _print_report(args.report, args.components, args.markdown)
    modules = runner.registered()
    if args.list:
        print("registered benchmarks:")
        for name, module in modules.items():
            print(f"  {name:<10} {runner.description(module)}")
        return 0
    unknown = [name for name in args.components if name not in modules]
    if unknown:
        raise CommandError(f"unknown benchmark {', '.join(unknown)}; registered: {', '.join(modules) or 'none'} (see --list)")
    try:
        device = torch.device(args.device)
    except RuntimeError:
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        raise CommandError(f"--device must be cpu or cuda[:N]; got {args.device!r}")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise CommandError("--device cuda: no CUDA device is available here")
    if args.warmup < 0 or args.repeats < 1:
        raise CommandError("--warmup must be >= 0 and --repeats >= 1")
    if args.json:
        check_output("--json", args.json)
    report = runner.run_benchmarks(
        args.components or list(modules),
        device,
        quick=args.quick,
        warmup=args.warmup,
        repeats=args.repeats,
        markdown=args.markdown,
    )
    if args.json:
        try:
            runner.write_json(report, args.json)
        except OSError as error:
            raise CommandError(f"--json {args.json}: {error.strerror}") from None
        print(f"\nwrote {args.json}")
    return 0


def _print_report(path: str, components: list[str], markdown: bool) -> int:
    try:
        report, results = runner.read_results(path)
    except OSError as error:
        raise CommandError(f"--report {path}: {error.strerror}") from None
    except ValueError as error:
        raise CommandError(f"--report {path}: not a report written by bench --json ({error})") from None
    print(f"{report['date']}, {report['device']}: {report['machine']['cpu']}; torch {report['versions']['torch']}")
    print(runner.describe_ceilings(report["ceilings"]))
    for name in dict.fromkeys(r.component for r in results):
        if not components or name in components:
            print(f"\n{name}\n")
            print(runner.format_table([r for r in results if r.component == name], markdown=markdown))
    return 0
