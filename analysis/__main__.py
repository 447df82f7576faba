"""Command line: run any analysis into the store, and move stores between machines.

    python -m analysis model --prompt "The capital of France is" --top-k 5 --csv out.csv --html out.html
    python -m analysis model --spec specs.json          # one spec, or a JSON list of specs (a batch)
    python -m analysis runs                             # what the store holds
    python -m analysis export-parquet FOLDER | import-parquet FOLDER | import-store FILE
    python -m analysis add-concepts FILE.csv            # prints the id to pass as --dataset
    python -m analysis warm-up                          # compile umap's kernels once per machine

Every analysis command takes the spec's fields as flags (see `python -m analysis ANALYSIS --help`), writes its
result to the store (WORKBENCH_STORE, or --store), and optionally to CSV / Parquet / HTML.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import typing
from pathlib import Path
from typing import TYPE_CHECKING

from .errors import WorkbenchError
from .store import Store

if TYPE_CHECKING:
    from .runner import RunOutcome


def _add_spec_flags(p: argparse.ArgumentParser, spec_cls) -> None:
    hints = typing.get_type_hints(spec_cls)
    for f in dataclasses.fields(spec_cls):
        typ = hints[f.name]
        meta = f.metadata
        help_ = meta.get("help", "")
        if "choices" in meta:
            help_ += f" (one of {', '.join(map(str, meta['choices']))})"
        default = f.default if f.default is not dataclasses.MISSING else None
        if default not in (None, "", ()):
            help_ += f" [default: {default}]"
        if typing.get_origin(typ) is tuple:
            help_ += " (comma-separated)"
        p.add_argument(f"--{f.name.replace('_', '-')}", dest=f.name, default=None, metavar=f.name.upper(),
                       help=help_)


def _parser() -> argparse.ArgumentParser:
    from .registry import REGISTRY  # imported here: a bad WORKBENCH_ANALYSES is a message, not a traceback

    ap = argparse.ArgumentParser(prog="python -m analysis", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, a in sorted(REGISTRY.items()):
        p = sub.add_parser(name, help=a.title, description=f"{a.title} (analysis version {a.version})")
        _add_spec_flags(p, a.spec_cls)
        p.add_argument("--spec", type=Path, help="a JSON file: one spec object, or a list of them (a batch); "
                                                 "flags given here override its fields")
        p.add_argument("--store", type=Path, help="the DuckDB store file [default: WORKBENCH_STORE or "
                                                  "~/.cache/interp-workbench/store.duckdb]")
        p.add_argument("--device", default="auto", help="auto, cpu or cuda [default: auto]")
        p.add_argument("--author", default="", help="recorded with the run")
        p.add_argument("--full-defaults", action="store_true",
                       help="keep the analysis's defaults on a large model (without it, settings not given are the "
                            "smaller ones its page picks when the defaults would take over a minute on 2 CPU cores)")
        p.add_argument("--csv", type=Path, help="also write the tidy table as CSV")
        p.add_argument("--parquet", type=Path, help="also write the tidy table as Parquet")
        p.add_argument("--html", type=Path, help="also write a self-contained HTML report")
    p = sub.add_parser("runs", help="list the runs in the store")
    p.add_argument("--store", type=Path)
    p.add_argument("--analysis")
    for name, help_ in [("export-parquet", "write the whole store to a folder of Parquet files"),
                        ("import-parquet", "bring in a folder written by export-parquet"),
                        ("import-store", "bring in every run of another store file"),
                        ("warm-up", "compile umap's kernels into numba's persistent cache (once per machine, ~35 s; "
                                    "later atlases skip it)"),
                        ("add-concepts", "validate a concept CSV (text + one column per concept), keep it in the "
                                         "store and print its dataset id")]:
        p = sub.add_parser(name, help=help_)
        if name != "warm-up":
            p.add_argument("path", type=Path)
        p.add_argument("--store", type=Path)
    return ap


def _specs_from_args(args, analysis) -> list[tuple]:
    """(spec, the fields given for it) for each spec the flags or the spec file describe."""
    flags = {f.name: getattr(args, f.name) for f in dataclasses.fields(analysis.spec_cls)
             if getattr(args, f.name) is not None}
    if args.spec is None:
        return [(analysis.spec_cls.from_dict(flags), set(flags))]
    try:
        data = json.loads(args.spec.read_text())
    except (OSError, ValueError) as e:
        raise WorkbenchError(f"Cannot read the spec file {args.spec}: {e}") from e
    items = data if isinstance(data, list) else [data]
    return [(analysis.spec_cls.from_dict({**item, **flags}), set(item) | set(flags)) if isinstance(item, dict)
            else (analysis.spec_cls.from_dict(item), set()) for item in items]


def _smaller(spec, given: set[str], device: str):
    """The spec with its page's smaller settings for a large model in the fields not given (said on stderr)."""
    from .models import load_model
    from .runner import with_smaller_defaults

    handle = load_model(spec.model, revision=spec.revision or None, device=device, dtype=spec.dtype)
    spec, changed = with_smaller_defaults(spec, handle.summary, given)
    if changed:
        what = ", ".join(f"{k}={v!r} (default {d!r})" for k, (d, v) in changed.items())
        print(f"{spec.analysis}: smaller settings for {spec.model}, whose defaults would take over a minute on "
              f"2 CPU cores: {what}; --full-defaults keeps the defaults", file=sys.stderr)
    return spec


def _write_outputs(args, outcomes: list["RunOutcome"]) -> None:
    import pandas as pd

    from .export import html_report, item_from_result

    def table(o: "RunOutcome"):
        return o.result.table.assign(run_key=o.key) if len(outcomes) > 1 else o.result.table

    if args.csv:
        pd.concat([table(o) for o in outcomes]).to_csv(args.csv, index=False)
    if args.parquet:
        pd.concat([table(o) for o in outcomes]).to_parquet(args.parquet, index=False)
    if args.html:
        items = [item_from_result(o.spec.title or o.spec.analysis, o.spec.analysis, o.key, o.spec.to_dict(), o.result)
                 for o in outcomes]
        args.html.write_text(html_report(f"{outcomes[0].spec.analysis} report", items))


def main(argv: list[str] | None = None) -> int:
    from tqdm import tqdm

    try:
        parser = _parser()
    except WorkbenchError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    args = parser.parse_args(argv)
    try:
        from .registry import REGISTRY
        from .runner import get_store, run

        store = Store(args.store) if args.store else get_store()
        if args.command == "runs":
            df = store.runs(args.analysis)
            print(df.drop(columns=["spec"]).to_string(index=False) if len(df) else "the store is empty")
            return 0
        if args.command == "export-parquet":
            for path in store.export_parquet(args.path):
                print(path)
            return 0
        if args.command == "import-parquet":
            print(json.dumps(store.import_parquet(args.path)))
            return 0
        if args.command == "import-store":
            print(json.dumps(store.import_store(args.path)))
            return 0
        if args.command == "warm-up":
            import time

            from kernels.atlas import warm_up

            t0 = time.perf_counter()
            warm_up()
            print(f"umap ready in {time.perf_counter() - t0:.1f} s")
            return 0
        if args.command == "add-concepts":
            from .concept_data import save_concepts_csv

            try:
                data = args.path.read_bytes()
            except OSError as e:
                raise WorkbenchError(f"Cannot read {args.path}: {e.strerror}.") from e
            print(save_concepts_csv(store, data, name=args.path.name))
            return 0
        analysis = REGISTRY[args.command]
        specs = [spec if args.full_defaults else _smaller(spec, given, args.device)
                 for spec, given in _specs_from_args(args, analysis)]
        outcomes = []
        with tqdm(total=len(specs) * 100, unit="%", file=sys.stderr, disable=None) as bar:
            for i, spec in enumerate(specs):
                def progress(frac: float, what: str, i=i) -> None:
                    bar.n = int(100 * (i + frac))
                    bar.set_description(what[:40])
                    bar.refresh()

                outcomes.append(run(spec, store=store, device=args.device, author=args.author, progress=progress))
        for o in outcomes:
            print(f"{'hit' if o.hit else 'computed'} {o.spec.analysis} {o.key} ({len(o.result.table)} rows)")
        _write_outputs(args, outcomes)
        return 0
    except WorkbenchError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
