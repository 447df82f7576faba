"""Run analyses in a fresh process and print, per analysis, its estimate beside the measured peak (JSON lines).

    python tests/estimate_probe.py MODEL '{"analysis": {fields}, ...}' STORE
    python tests/estimate_probe.py MODEL --serve      (then one JSON line per job on stdin: {"part": ..., "store": ...})

A fresh process, so the peak is not hidden by memory other tests freed; each analysis first runs once with
another seed or prompt (imports and compilations are not the run's), its inputs are run and stored first.

`--serve` imports everything and loads the model once, then forks a child per job: each child starts from that
state, with no run's heap behind it (the parent has run nothing), as a fresh process would, without paying the
imports and the load again (seconds each, for every analysis of every model). The parent answers each job with
the child's JSON lines and a line "END <exit status>"."""
from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from analysis.registry import get_analysis  # noqa: E402
from analysis.runner import measure_run, run  # noqa: E402
from analysis.specs import PromptSpec  # noqa: E402
from analysis.store import Store  # noqa: E402

WARM_PROMPT, PROMPT = "The cat sat on", "Then, John and Mary went to the store. John gave a ring to"
WARM = {  # the warm-up run: small settings (it is there for imports and compilations)
    "tuned_lens": {"steps": 2, "max_tokens": 512, "batch_tokens": 128},
    "infoplane": {"n_samples": 50},
    "concept_activations": {"max_sentences": 60},
    "probes": {"max_sentences": 60},
    "bottleneck": {"max_sentences": 80, "n_random": 1},
    "intervention": {"max_sentences": 60},
    "tcav": {"n_examples": 10, "n_random": 2, "n_inputs": 10},
    "atlas": {"max_sentences": 60, "max_points": 50},
    "quant_traces": {"n_seqs": 1, "seq_len": 8, "min_samples": 2, "max_samples": 2},
    "quant_sensitivity": {"formats": ("int8-channel",), "activation_formats": (), "units": ("type",), "n_seqs": 1,
                          "seq_len": 8, "min_samples": 2, "max_samples": 2},
    "quant_allocation": {"formats": ("int8-channel", "int4-g32"), "n_seqs": 1, "seq_len": 8, "min_samples": 2,
                         "max_samples": 2},
    "sae": {"steps": 20, "max_tokens": 2048, "batch_tokens": 256},
    # the feature analyses warm up on the same SAE (trained then): what is measured is their own work
    "sae_features": {"top_n": 3},
    "sae_attribution": {"n_pairs": 2},
    "sae_names": {"max_sentences": 80, "n_random": 1},
}
SAME_SAE = ("sae_features", "sae_attribution", "sae_names")


def main(model: str, specs: dict, store_path: str) -> None:
    store = Store(Path(store_path))
    for name, fields in specs.items():
        cls = get_analysis(name).spec
        warm = {**fields, **WARM.get(name, {})}
        if issubclass(cls, PromptSpec):
            warm["prompt"], fields = WARM_PROMPT, {"prompt": PROMPT, **fields}
        elif "seed" in cls.field_names() and name not in SAME_SAE:
            warm["seed"] = fields.get("seed", 0) + 1
        elif "n_pairs" in cls.field_names():  # patching: other pairs
            warm["n_pairs"] = fields.get("n_pairs", 8) + 1
        assert warm != fields, f"{name}: the warm-up would be the measured run"
        run(cls(model=model, **warm), store=store)
        est, peak, out = measure_run(cls(model=model, **fields), store)
        print(json.dumps({"analysis": name, "estimate": est.total_bytes, "weights": est.parts["weights"],
                          "working_estimate": est.working_bytes, "measured_working": peak.extra_bytes,
                          "measured": est.parts["weights"] + peak.extra_bytes, "seconds": peak.seconds,
                          "estimated_seconds": est.seconds, "hit": out.hit}), flush=True)


def serve(model: str) -> None:
    import os

    from analysis import load_model

    load_model(model)  # the weights once, shared with every child (copy-on-write)
    for line in sys.stdin:
        job = json.loads(line)
        sys.stdout.flush()
        pid = os.fork()
        if pid == 0:
            status = 0
            try:
                main(model, job["part"], job["store"])
            except BaseException:  # noqa: BLE001 - the traceback goes to stderr, the status to the parent
                import traceback

                traceback.print_exc()
                status = 1
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(status)
        _, code = os.waitpid(pid, 0)
        print(f"END {os.waitstatus_to_exitcode(code)}", flush=True)


if __name__ == "__main__":
    if sys.argv[2] == "--serve":
        serve(sys.argv[1])
    else:
        main(sys.argv[1], json.loads(sys.argv[2]), sys.argv[3])
