"""TCAV (testing with concept activation vectors) through `captum.concept`.

The model is wrapped so that each chosen layer exposes one module whose output is the residual after that block
at the last token ([batch, d_model]; TCAV needs a fixed-size activation per text, and texts differ in length).
Concept examples: the texts of one class of a concept; random concepts: as many texts drawn at random from the
whole dataset. For each layer, captum trains a CAV (our classifier: an L2 logistic regression with a fixed seed, so
runs repeat) for the concept against each of `n_random` random concepts, and for as many other random concepts against
the same counterparts (the null). The TCAV score of a CAV is the fraction of input texts whose directional derivative of
the target (a token's logit at the last position) along the CAV is positive. The concept's scores are compared
with the null's by a two-sided t-test (the TCAV paper's test): a concept whose scores do not differ from random
ones' (p >= 0.05 after a Bonferroni correction over the layers tested) is not shown to matter, whatever its mean
score; a CAV whose held-out accuracy is near chance has no concept to test either.
"""
from __future__ import annotations

import tempfile
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import pandas as pd
import torch
from torch import nn

from ... import concept_data
from ...concept_data import pick_concepts
from ...errors import WorkbenchError
from ...estimate import Estimate
from ...result import Result
from ...session import ModelSession, check_layer, resid_after_name, same_length_batches
from ...specs import Spec, param
from ...tokens import encode_texts, single_token_ids
from ..concepts.compute import FIT_SECONDS, one_blas_thread


class LastTokenModel(nn.Module):
    """bridge(ids) -> logits at the last position, with `point_{l}` modules carrying the residual after block l
    (the embedding for -1) at the last token, so captum can read and differentiate it."""

    def __init__(self, bridge, layers):
        super().__init__()
        self.bridge = bridge
        self.layers = list(layers)
        self.points = nn.ModuleDict({f"point_{layer}".replace("-", "m"): nn.Identity() for layer in self.layers})

    @staticmethod
    def point_name(layer: int) -> str:
        return "points." + f"point_{layer}".replace("-", "m")

    def forward(self, ids):
        hooks = []
        for layer in self.layers:
            point = self.points[f"point_{layer}".replace("-", "m")]

            def hook(resid, hook, point=point):
                return torch.cat([resid[:, :-1], point(resid[:, -1])[:, None]], 1)

            hooks.append((resid_after_name(layer), hook))
        return self.bridge.run_with_hooks(ids, fwd_hooks=hooks)[:, -1]


def _classifier(seed: int):
    from captum.concept._utils.classifier import Classifier
    from sklearn.linear_model import LogisticRegression

    class SeededLogistic(Classifier):
        """captum's Classifier interface over scikit-learn's logistic regression (deterministic for a seed)."""

        def __init__(self):
            self.clf = None

        def train_and_eval(self, dataloader, test_split_ratio: float = 0.33, **kwargs):
            xs, ys = zip(*[(x, y) for x, y in dataloader])
            X, y = torch.cat(xs).float().cpu().numpy(), torch.cat(ys).cpu().numpy()
            perm = np.random.default_rng(seed).permutation(len(y))
            n_test = int(test_split_ratio * len(y))
            te, tr = perm[:n_test], perm[n_test:]
            with one_blas_thread():
                self.clf = LogisticRegression(C=1.0, max_iter=2000, random_state=seed).fit(X[tr], y[tr])
            return {"accs": torch.tensor(float((self.clf.predict(X[te]) == y[te]).mean()) if n_test else float("nan"))}

        def weights(self):
            w = torch.tensor(self.clf.coef_, dtype=torch.float32)
            return torch.stack([-w[0], w[0]]) if w.shape[0] == 1 else w

        def classes(self):
            return [int(c) for c in self.clf.classes_]

    return SeededLogistic()


@dataclass(frozen=True)
class TCAVSpec(Spec):
    """TCAV scores of one concept class for a target token, per layer, with a t-test against random concepts."""

    analysis: ClassVar[str] = "tcav"
    title: ClassVar[str] = "TCAV: how much a concept moves a token's logit, tested against random concepts"
    dataset: str = param("shipped", "'shipped' or the id of an uploaded concept CSV", max_len=64)
    concept: str = param("topic", "the concept", max_len=128)
    value: str = param("weather", "the class of the concept whose examples form the concept set", max_len=128)
    target: str = param(" coast", "the token whose logit at the last position is explained (one token)", max_len=64)
    layers: tuple[int, ...] = param((), "layers (residual after block l; -1 the embedding); empty: all", min=-1,
                                 max=1024, max_len=64)
    drop_last: int = param(2, "final tokens cut from every text (2 on the shipped sentences: they end '... near the')",
                        min=0, max=64)
    n_examples: int = param(50, "texts per concept set (the concept's and each random one)", min=10, max=1000)
    n_random: int = param(10, "random concepts to test against", min=2, max=50)
    n_inputs: int = param(200, "input texts whose directional derivatives are counted", min=10, max=5000)
    seed: int = param(0, "sampling and classifier seed", min=0, max=2**31 - 1)

    def resolve(self, model) -> "TCAVSpec":
        for layer in self.layers:
            check_layer(layer, model.summary.n_layers)
        return self


def _batches(seqs: dict[int, list[int]], idx, device) -> list[torch.Tensor]:
    """Texts of one length per batch (captum flattens each batch's activations)."""
    return [toks.to(device) for _, toks in same_length_batches(seqs, idx, batch=10**9)]


def compute(session: ModelSession, spec: TCAVSpec, inputs, progress) -> Result:
    from captum.concept import TCAV, Concept
    from scipy import stats

    data = inputs["data"]
    (concept,) = pick_concepts((spec.concept,), concept_data.concept_columns(data))
    labels = data[concept].astype(str).to_numpy()
    if spec.value not in set(labels):
        raise WorkbenchError(f"{concept!r} has no class {spec.value!r}.",
                             hint=f"Its classes: {', '.join(sorted(set(labels)))}.")
    (target,) = single_token_ids(session, (spec.target,), "target")
    layers = list(spec.layers) or list(range(-1, session.n_layers))
    rng = np.random.default_rng(spec.seed)
    pos = np.flatnonzero(labels == spec.value)
    if len(pos) < spec.n_examples:
        raise WorkbenchError(f"{concept} = {spec.value!r} has {len(pos)} texts; the concept set needs "
                             f"{spec.n_examples}.", hint="Lower 'examples per set'.")
    N = len(labels)
    concept_idx = rng.choice(pos, spec.n_examples, replace=False)
    random_idx = [rng.choice(N, spec.n_examples, replace=False) for _ in range(2 * spec.n_random)]
    input_idx = rng.choice(N, min(spec.n_inputs, N), replace=False)
    needed = sorted(set(concept_idx) | set(input_idx) | {int(i) for r in random_idx for i in r})
    progress(0.05, "tokenizing")
    seqs = dict(zip(needed, encode_texts(session, data["text"].iloc[needed], spec.drop_last, spec.bos)))

    dev = session.device
    cset = Concept(0, f"{concept}={spec.value}", _batches(seqs, concept_idx, dev))
    randoms = [Concept(i + 1, f"random{i}", _batches(seqs, r, dev)) for i, r in enumerate(random_idx)]
    others, nulls = randoms[:spec.n_random], randoms[spec.n_random:]
    # the null: a different random "concept" against each counterpart, so the null scores are as independent of
    # each other as the concept's are (one shared null concept would make them look more certain than they are)
    sets = [[cset, r] for r in others] + [[n, r] for n, r in zip(nulls, others)]
    wrapper = LastTokenModel(session.bridge, layers)
    names = [LastTokenModel.point_name(layer) for layer in layers]
    inputs = _batches(seqs, input_idx, dev)
    scores = np.zeros((2, len(others), len(layers)))
    magnitude = np.zeros((2, len(others), len(layers)))
    n_seen = 0
    with torch.enable_grad(), tempfile.TemporaryDirectory() as tmp:
        tcav = TCAV(wrapper, names, model_id="m", classifier=_classifier(spec.seed), save_path=tmp)
        # the CAVs one experimental set at a time, in interpret's order (each classifier is seeded alone, so they
        # are the ones interpret would train; it then loads them), so the bar moves while they are trained (the
        # CAVs were about 0.85 of a default run on the default model, the directional derivatives the rest)
        for k, exp in enumerate(sets):
            progress(0.1 + 0.75 * k / len(sets), f"CAVs: {exp[0].name} against {exp[1].name} ({k + 1} of "
                                                  f"{len(sets)}, {len(names)} layers each)")
            tcav.compute_cavs([exp])
        for bi, batch in enumerate(inputs):
            progress(0.85 + 0.15 * bi / len(inputs), f"directional derivatives: inputs {n_seen + 1} to "
                                                     f"{n_seen + len(batch)} of {len(input_idx)}")
            out = tcav.interpret(batch, sets, target=target)
            for s, exp in enumerate(sets):
                key = "-".join(str(c.id) for c in exp)
                for li, name in enumerate(names):
                    kind, r = divmod(s, len(others))
                    scores[kind, r, li] += float(out[key][name]["sign_count"][0]) * len(batch)
                    magnitude[kind, r, li] += float(out[key][name]["magnitude"][0]) * len(batch)
            n_seen += len(batch)
        accs = np.array([[float(tcav.cavs["-".join(str(c.id) for c in exp)][name].stats["accs"])
                          for name in names] for exp in sets])
        cavs = []  # the concept's CAVs (toward the concept), so the scores can be checked and reused
        for k, exp in enumerate(sets[:len(others)]):
            for li, name in enumerate(names):
                st = tcav.cavs["-".join(str(c.id) for c in exp)][name].stats
                row = list(st["classes"]).index(0)
                cavs.append({"layer": layers[li], "draw": k,
                             "weight": st["weights"][row].float().cpu().numpy().astype(np.float32)})
    scores /= n_seen
    magnitude /= n_seen
    rows, draws = [], []
    for li, layer in enumerate(layers):
        c, r = scores[0, :, li], scores[1, :, li]
        if np.allclose(c, c[0]) and np.allclose(r, r[0]) and np.isclose(c[0], r[0]):
            p = 1.0
        else:
            p = float(stats.ttest_ind(c, r, equal_var=False).pvalue)
        p_adj = min(1.0, p * len(layers))  # Bonferroni over the layers tested
        rows.append({"layer": layer, "tcav_mean": float(c.mean()), "tcav_std": float(c.std(ddof=1)),
                     "random_mean": float(r.mean()), "random_std": float(r.std(ddof=1)), "p_value": p,
                     "p_bonferroni": p_adj, "significant": bool(p_adj < 0.05),
                     "cav_accuracy": float(accs[:len(others), li].mean())})
        for kind, name in ((0, "concept"), (1, "random")):
            for k in range(len(others)):
                draws.append({"layer": layer, "set": name, "draw": k, "tcav": float(scores[kind, k, li]),
                              "magnitude": float(magnitude[kind, k, li]),
                              "cav_accuracy": float(accs[kind * len(others) + k, li])})
    return Result(table=pd.DataFrame(rows), meta={"concept": concept, "value": spec.value, "target": spec.target,
                                                  "target_id": int(target), "n_inputs": n_seen,
                                                  "inputs": [int(i) for i in input_idx]},
                  extra={"draws": pd.DataFrame(draws), "cavs": pd.DataFrame(cavs)})


CAV_FIT_S = 0.03  # one CAV's logistic regression (a few hundred L-BFGS steps on residuals), reference machine:
# a third of the default model's TCAV run (140 fits, 13.7 s), which the per-entry figure alone put at 0.5 s


def estimate(plan) -> Estimate:
    """The concept and random sets run once with every tested layer's last-token residual kept, a CAV fitted per
    set and layer (scikit-learn, float64), and per batch of inputs of one length (all of them at once) one forward
    and backward per tested layer, the logits' gradient included."""
    spec, s = plan.spec, plan.shape
    layers = len(spec.layers) or s.n_layers + 1
    lengths = plan.lengths(None, spec.drop_last)
    typical = max(set(lengths), key=lengths.count) if lengths else 14
    share = lengths.count(typical) / max(1, len(lengths))  # the largest batch: inputs of the commonest length
    rows = max(1, round(min(spec.n_inputs, len(lengths) or spec.n_inputs) * share))
    n_sets = 1 + 2 * spec.n_random
    sets_bytes = n_sets * spec.n_examples * layers * s.d_model * 4 + s.forward_bytes(spec.n_examples, typical)
    n_in = min(spec.n_inputs, len(lengths) or spec.n_inputs)
    flops = (n_sets * s.forward_flops(spec.n_examples, typical)
             + layers * s.backward_flops(n_in, typical))
    fits = 2 * spec.n_random * layers
    kinds = max(1, len(set(lengths)))  # texts of one length per batch
    blocks = (n_sets * min(kinds, spec.n_examples) * s.calls(1)
              + layers * min(kinds, spec.n_inputs) * s.calls(3))  # per input batch, a backward per tested layer
    grads = s.backward_bytes(rows, typical)
    # captum's attributions and CAVs add about a tenth of that per tested layer (measured on the default model:
    # 5.5 MiB a layer beside 54 MiB of gradients)
    return Estimate(parts={"concept sets": sets_bytes, "gradients": grads, "per tested layer": layers * grads // 10,
                           "CAV fits": 3 * 2 * spec.n_examples * s.d_model * 8},
                    flops=flops, blocks=blocks,
                    extra_seconds=fits * (CAV_FIT_S + FIT_SECONDS * 2 * spec.n_examples * s.d_model * 3),
                    lower="n_inputs, layers or n_random")


def spread_layers(n: int):
    """A rung of the TCAV ladder: n layers spread evenly over the model (the embedding and the last included)."""
    def pick(shape) -> tuple[int, ...]:
        L = shape.n_layers
        return tuple(sorted({round(-1 + i * L / (n - 1)) for i in range(n)}))

    return pick
