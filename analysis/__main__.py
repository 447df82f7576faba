"""Command line: run any analysis into the store, and move stores between machines.

    python -m analysis model --prompt "The capital of France is" --top-k 5 --csv out.csv --html out.html
    python -m analysis model --spec specs.json          # one spec, or a JSON list of specs (a batch)
    python -m analysis runs                             # what the store holds
    python -m analysis batch SPECS.json [--executor ray --address auto]   # many specs, planned and run at once
    python -m analysis batch --warm-pages MODEL         # every page's default analysis, for a review deployment
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
                       help=help_.replace("%", "%%"))  # argparse formats help with %


def _parser() -> argparse.ArgumentParser:
    from .registry import REGISTRY  # imported here: a bad WORKBENCH_ANALYSES is a message, not a traceback

    ap = argparse.ArgumentParser(prog="python -m analysis", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, a in sorted(REGISTRY.items()):
        p = sub.add_parser(name, help=a.title.replace("%", "%%"),
                           description=f"{a.title} (analysis version {a.version})")
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
    _batch_parser(sub)
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


def _batch_parser(sub) -> None:
    p = sub.add_parser("batch", help="plan and run many specs (any analyses, any models) into the store, locally or "
                                     "on a Ray cluster", formatter_class=argparse.RawDescriptionHelpFormatter,
                       description="""Plan first (resolve each spec, derive its run key, skip what the store holds,
inputs before what needs them, grouped by model), then compute the rest with the chosen executor. Only this
process writes the store, each result as it arrives: a stopped batch keeps what finished; a rerun computes the rest.

  python -m analysis batch specs.json                                  # in this process
  python -m analysis batch specs.json --executor ray                   # a local Ray cluster (one actor per CPU)
  python -m analysis batch specs.json --executor ray --address auto    # the Ray cluster this machine is part of
  python -m analysis batch --analysis lens --set prompt="The capital of France is" --sweep checkpoints data/checkpoints
  python -m analysis batch --analysis entropy --sweep prompts prompts.txt
  python -m analysis batch --warm-pages default""")
    p.add_argument("specs", nargs="?", type=Path, help="a JSON file: a list of spec objects, each with its analysis")
    p.add_argument("--analysis", help="the analysis of the base spec (with --set), instead of a file")
    p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                   help="a field of the base spec (repeatable); with a file, set on every spec")
    p.add_argument("--sweep", nargs=2, metavar=("KIND", "ARG"),
                   help="checkpoints FOLDER|A,B,... (one spec per checkpoint folder or hub revision), or prompts "
                        "FILE (one spec per line: a prompt, or for patching a JSON list of pairs)")
    p.add_argument("--warm-pages", metavar="MODEL", help="every page's default analysis for MODEL")
    p.add_argument("--executor", choices=("local", "ray"), default="local")
    p.add_argument("--address", help="the Ray cluster: auto, HOST:PORT or ray://HOST:10001 "
                                     "[default: start a local one]")
    p.add_argument("--workers", type=int, help="Ray actors [default: one per GPU, else one per CPU slot]")
    p.add_argument("--cpus-per-worker", type=float, default=1.0)
    p.add_argument("--gpus-per-worker", type=float,
                   help="GPUs per actor (fractions let small models share a GPU) [default: 1 if the cluster has GPUs]")
    p.add_argument("--max-retries", type=int, default=2, help="retries of a spec whose worker died [default: 2]")
    p.add_argument("--summary", type=Path, help="also write the outcome of every spec as JSON")
    p.add_argument("--store", type=Path)
    p.add_argument("--device", default="auto")
    p.add_argument("--author", default="")
    p.add_argument("--full-defaults", action="store_true", help="keep the analyses' defaults on a large model")


def _batch_specs(args) -> list:
    from .batch import checkpoint_list, page_specs, sweep_checkpoints, sweep_prompts
    from .runner import spec_from_dict

    sets = {}
    for item in args.set:
        name, eq, value = item.partition("=")
        if not eq:
            raise WorkbenchError(f"--set {item}: write FIELD=VALUE.")
        sets[name.strip()] = value
    if args.warm_pages:
        return [(s, set(s.to_dict())) for s in page_specs(args.warm_pages, device=args.device,
                                                           full_defaults=args.full_defaults)]
    if args.specs is not None:
        try:
            data = json.loads(args.specs.read_text())
        except (OSError, ValueError) as e:
            raise WorkbenchError(f"Cannot read the spec file {args.specs}: {e}") from e
        items = data if isinstance(data, list) else [data]
        if not all(isinstance(i, dict) for i in items):
            raise WorkbenchError(f"{args.specs}: every spec is a JSON object with its analysis.")
        base = [{**i, **sets} for i in items]
    elif args.analysis:
        base = [{"analysis": args.analysis, **sets}]
    else:
        raise WorkbenchError("Give a spec file, --analysis (with --set), or --warm-pages MODEL.")
    if args.sweep:
        kind, arg = args.sweep
        if kind == "checkpoints":
            base = sweep_checkpoints(base, checkpoint_list(arg))
        elif kind == "prompts":
            base = sweep_prompts(base, arg)
        else:
            raise WorkbenchError(f"--sweep {kind}: sweep checkpoints or prompts.")
    if not base:
        raise WorkbenchError("The batch is empty.")
    return [(spec_from_dict(b), set(b) - {"analysis"}) for b in base]


def _batch(args, store: Store) -> int:
    from tqdm import tqdm

    from .batch import LocalExecutor, RayExecutor, execute, plan

    specs = _batch_specs(args)
    if not args.full_defaults:
        specs = [(_smaller(spec, given, args.device), given) for spec, given in specs]
    if args.executor == "ray":
        try:
            import ray  # noqa: F401
        except ImportError as e:
            raise WorkbenchError("--executor ray needs Ray: pip install ray==2.60.0") from e
        executor = RayExecutor(args.address, workers=args.workers, cpus_per_worker=args.cpus_per_worker,
                               gpus_per_worker=args.gpus_per_worker, device=args.device,
                               max_retries=args.max_retries, author=args.author)
    else:
        executor = LocalExecutor(args.device, args.author)
    items = plan([s for s, _ in specs], store, device=args.device)
    todo = sum(i.status == "todo" for i in items)
    print(f"batch: {len(items)} runs ({len(specs)} given, {len(items) - len(specs)} inputs): "
          f"{sum(i.status == 'hit' for i in items)} in the store, {todo} to compute", file=sys.stderr)
    with tqdm(total=todo, unit="spec", file=sys.stderr, disable=None) as bar:
        def progress(state: dict) -> None:
            bar.n = state["computed"] + state["failed"] - failed_at_plan
            workers = ", ".join(f"{w}: {m}" for w, m in state["running"].items())
            bar.set_postfix_str(f"failed {state['failed']}; {workers}"[:120])
            bar.refresh()

        failed_at_plan = sum(i.status == "failed" for i in items)
        report = execute(items, store, executor, progress=progress)
    table = report.table()
    print(table.to_string(index=False))
    counts = report.counts()
    print(f"batch {report.id}: {counts['hit']} hit, {counts['computed']} computed, {counts['failed']} failed in "
          f"{report.seconds:.1f} s", file=sys.stderr)
    if args.summary:
        args.summary.write_text(json.dumps(report.summary(), indent=1, default=str))
    return 1 if counts["failed"] else 0


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

    from .export import html_report, item_from_result, to_csv

    def table(o: "RunOutcome"):
        return o.result.table.assign(run_key=o.key) if len(outcomes) > 1 else o.result.table

    if args.csv:
        args.csv.write_bytes(to_csv(pd.concat([table(o) for o in outcomes])))
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
        from .runner import check_run_key, get_store, run

        store = Store(args.store) if args.store else get_store()
        if args.command == "batch":
            return _batch(args, store)
        if args.command == "runs":
            df = store.runs(args.analysis)
            print(df.drop(columns=["spec"]).to_string(index=False) if len(df) else "the store is empty")
            return 0
        if args.command == "export-parquet":
            for path in store.export_parquet(args.path):
                print(path)
            return 0
        if args.command == "import-parquet":
            print(json.dumps(store.import_parquet(args.path, check_run=check_run_key)))
            return 0
        if args.command == "import-store":
            print(json.dumps(store.import_store(args.path, check_run=check_run_key)))
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
