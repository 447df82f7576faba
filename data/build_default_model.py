"""Build the default model shipped with the workbench, from nothing.

    python data/build_default_model.py            # the full build (about 40 minutes on 2 CPU cores)
    python data/build_default_model.py --steps 300 --out /tmp/pilot   # a quick pilot

What it does, every step seeded:
1. generates a corpus that mixes the behaviours the analyses need: indirect object identification (IOI,
   BABA and ABBA templates), induction (repeated random token spans), factual recall (country -> capital
   in several phrasings) and short concept-labelled sentences (sentiment, tense, number, topic);
   some IOI (template, indirect object) and fact (country, phrasing) combinations are held out;
2. trains a byte-level BPE tokenizer (`tokenizers`) on it and checks that every name, place, object,
   country and capital is a single token (with its leading space, as it appears in text);
3. trains a GPT-2-architecture model on the packed corpus, saving intermediate checkpoints;
4. writes the evaluation datasets (JSON lines, with token ids) and measures the model on held-out prompts.

Output layout (under --out, default: this folder):
    default-model/            Hugging Face folder: config.json, model.safetensors, tokenizer files,
                              training.json (the recipe and the measured figures)
    checkpoints/step-NNNNN/   intermediate checkpoints, float16 safetensors, same format
    tasks/                    ioi.jsonl, induction.jsonl, facts.jsonl, concepts.jsonl, entities.json
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import random
import re
import time
from pathlib import Path

import torch

BOS = "<|endoftext|>"
SEED = 1234

# ----------------------------------------------------------------------------------------------------------
# Vocabulary of the synthetic world. Every entry is one token (with a leading space) in the trained tokenizer.
# ----------------------------------------------------------------------------------------------------------
NAMES = """Mary John Alice Bob James Sarah Tom Emma David Laura Michael Anna Daniel Kate Paul Lisa Mark Rachel
Peter Grace Steven Helen Brian Julia Kevin Sophie Eric Olivia Frank Chloe George Diana Henry Ella Jack Rose Oscar
Amy Adam Lucy Simon Nora Victor Hannah Ryan Clara Sam Megan Luke Irene Carl Fiona Dean Paula Ivan Maria Leo Tina
Hugo Wendy""".split()
PLACES = """store park school garden office beach station library market hospital restaurant museum house river
bakery church""".split()
OBJECTS = """ring book kiss bone drink basket computer necklace snack ball letter bottle candle pencil bag hat""".split()
CAPITALS = dict(
    pair.split(":")
    for pair in """France:Paris Germany:Berlin Italy:Rome Spain:Madrid Portugal:Lisbon Japan:Tokyo China:Beijing
Russia:Moscow Egypt:Cairo Greece:Athens Austria:Vienna Hungary:Budapest Poland:Warsaw Sweden:Stockholm
Norway:Oslo Finland:Helsinki Denmark:Copenhagen Ireland:Dublin Belgium:Brussels Netherlands:Amsterdam
Canada:Ottawa Australia:Canberra Kenya:Nairobi Peru:Lima Chile:Santiago Cuba:Havana Thailand:Bangkok
Vietnam:Hanoi Indonesia:Jakarta Iran:Tehran Iraq:Baghdad Turkey:Ankara Ukraine:Kyiv Romania:Bucharest
Bulgaria:Sofia Serbia:Belgrade Croatia:Zagreb Czechia:Prague Slovakia:Bratislava Lebanon:Beirut Syria:Damascus
Jordan:Amman Nigeria:Abuja Ghana:Accra Morocco:Rabat Senegal:Dakar Colombia:Bogota Venezuela:Caracas
Ecuador:Quito Uruguay:Montevideo Philippines:Manila Nepal:Kathmandu Bangladesh:Dhaka Pakistan:Islamabad
Iceland:Reykjavik Estonia:Tallinn Latvia:Riga Qatar:Doha Oman:Muscat Switzerland:Bern""".split()
)

# IOI templates, written in BABA order: [B] is the subject (named twice), [A] the indirect object.
# ABBA swaps the two names of the first clause. Each ends right before the answer (the indirect object).
IOI_TEMPLATES = [
    "Then, {B} and {A} went to the {PLACE}. {B} gave a {OBJECT} to",
    "When {B} and {A} got a {OBJECT} at the {PLACE}, {B} decided to give it to",
    "After {B} and {A} went to the {PLACE}, {B} gave a {OBJECT} to",
    "Then, {B} and {A} had a long day at the {PLACE}. {B} handed the {OBJECT} to",
    "While {B} and {A} were working at the {PLACE}, {B} gave a {OBJECT} to",
    "Friends {B} and {A} found a {OBJECT} at the {PLACE}. {B} gave it to",
    "The {PLACE} was quiet when {B} and {A} arrived. {B} passed the {OBJECT} to",
    "Later, {B} and {A} met at the {PLACE}. {B} threw the {OBJECT} to",
]
# Fact phrasings; each ends right before the capital.
FACT_TEMPLATES = [
    "The capital of {C} is",
    "In {C}, the capital city is",
    "Q: What is the capital of {C}? A:",
    "Everyone knows that the capital of {C} is",
    "Travellers to {C} usually arrive in its capital,",
]
# Concept sentences: topic nouns (singular, plural), sentiment adjectives, tense/number verb forms.
TOPICS = {
    "sports": [("team", "teams"), ("player", "players"), ("match", "matches"), ("coach", "coaches"), ("race", "races")],
    "food": [("soup", "soups"), ("pizza", "pizzas"), ("meal", "meals"), ("dessert", "desserts"), ("sandwich", "sandwiches")],
    "weather": [("storm", "storms"), ("morning", "mornings"), ("breeze", "breezes"), ("forecast", "forecasts"), ("cloud", "clouds")],
    "music": [("song", "songs"), ("concert", "concerts"), ("band", "bands"), ("album", "albums"), ("singer", "singers")],
}
TOPIC_TAILS = {
    "sports": ["this season", "at the stadium", "in the final"],
    "food": ["at dinner", "in the kitchen", "at lunch"],
    "weather": ["this week", "over the hills", "near the coast"],
    "music": ["on the radio", "at the festival", "on stage"],
}
SENTIMENT = {
    "positive": ["wonderful", "great", "lovely", "excellent", "pleasant", "delightful"],
    "negative": ["terrible", "awful", "horrible", "boring", "dreadful", "disappointing"],
}
VERBS = {  # (tense, number) -> forms
    ("present", "singular"): ["is", "seems", "looks", "feels"],
    ("present", "plural"): ["are", "seem", "look", "feel"],
    ("past", "singular"): ["was", "seemed", "looked", "felt"],
    ("past", "plural"): ["were", "seemed", "looked", "felt"],
}
TIME_WORDS = {"present": ["Today", "Now", "These days"], "past": ["Yesterday", "Last year", "Back then"]}
ADVERBS = ["really", "very", "quite", "truly", "so"]


def _held_out(*parts: object, fraction: float = 0.2) -> bool:
    """Deterministic split of a combination into held-out (True) or training (False)."""
    h = hashlib.sha256("|".join(map(str, parts)).encode()).digest()
    return int.from_bytes(h[:4], "big") / 2**32 < fraction


def ioi_held_out(template: int, io_name: str) -> bool:
    return _held_out("ioi", template, io_name)


def fact_held_out(country: str, phrasing: int) -> bool:
    return _held_out("fact", country, phrasing)


# ----------------------------------------------------------------------------------------------------------
# Corpus generators. Each returns plain text (no BOS); documents are joined with BOS when packed.
# ----------------------------------------------------------------------------------------------------------
def ioi_prompt(rng: random.Random, held_out: bool | None) -> dict:
    """One IOI prompt. held_out=False: a training combination; True: a held-out one; None: either."""
    while True:
        t = rng.randrange(len(IOI_TEMPLATES))
        a, b = rng.sample(NAMES, 2)
        if held_out is None or ioi_held_out(t, a) == held_out:
            break
    order = rng.choice(["BABA", "ABBA"])
    place, obj = rng.choice(PLACES), rng.choice(OBJECTS)
    text = _fill_ioi(t, a, b, place, obj, order)
    return dict(template=t, order=order, io=a, s=b, place=place, object=obj, text=text)


def _fill_ioi(t: int, a: str, b: str, place: str, obj: str, order: str) -> str:
    tpl = IOI_TEMPLATES[t]
    if order == "ABBA":  # swap the first occurrence of B and A
        tpl = tpl.replace("{B} and {A}", "{A} and {B}", 1)
    return tpl.format(A=a, B=b, PLACE=place, OBJECT=obj)


def ioi_doc(rng: random.Random) -> str:
    p = ioi_prompt(rng, held_out=False)
    return f"{p['text']} {p['io']}."


def fact_doc(rng: random.Random) -> str:
    while True:
        country = rng.choice(list(CAPITALS))
        k = rng.randrange(len(FACT_TEMPLATES))
        if not fact_held_out(country, k):
            break
    return f"{FACT_TEMPLATES[k].format(C=country)} {CAPITALS[country]}."


def concept_sentence(rng: random.Random) -> dict:
    topic = rng.choice(list(TOPICS))
    noun_sg, noun_pl = rng.choice(TOPICS[topic])
    number = rng.choice(["singular", "plural"])
    tense = rng.choice(["present", "past"])
    sentiment = rng.choice(["positive", "negative"])
    noun = noun_sg if number == "singular" else noun_pl
    adj = rng.choice(SENTIMENT[sentiment])
    tail = rng.choice(TOPIC_TAILS[topic])
    verb = rng.choice(VERBS[(tense, number)])
    form = rng.randrange(3)
    if form == 0:
        text = f"The {noun} {verb} {rng.choice(ADVERBS)} {adj} {tail}."
    elif form == 1:
        text = f"{rng.choice(TIME_WORDS[tense])}, the {noun} {verb} {adj} {tail}."
    else:
        be = VERBS[(tense, number)][0]
        text = f"Everyone said the {noun} {be} {adj} {tail}."
    return dict(text=text, sentiment=sentiment, tense=tense, number=number, topic=topic)


def make_corpus(rng: random.Random, n_docs: int) -> list:
    """Text documents, or ("induction", n) markers filled with random token spans after tokenization."""
    docs: list = []
    for _ in range(n_docs):
        r = rng.random()
        if r < 0.40:
            docs.append(ioi_doc(rng))
        elif r < 0.58:
            docs.append(("induction", rng.randint(6, 24)))
        elif r < 0.80:
            docs.append(fact_doc(rng))
        else:
            docs.append(concept_sentence(rng)["text"])
    return docs


# ----------------------------------------------------------------------------------------------------------
# Tokenizer
# ----------------------------------------------------------------------------------------------------------
def entity_words() -> dict[str, list[str]]:
    return dict(
        names=NAMES, places=PLACES, objects=OBJECTS, countries=list(CAPITALS), capitals=list(CAPITALS.values())
    )


def train_tokenizer(texts: list[str], vocab_size: int):
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    tok = ByteLevelBPETokenizer(add_prefix_space=False)
    words = [w for ws in entity_words().values() for w in ws]
    # The entity words are repeated so that BPE merges each of them, with its leading space, into one token.
    boost = [" " + " ".join(words)] * 200
    tok.train_from_iterator(texts + boost, vocab_size=vocab_size, min_frequency=2, special_tokens=[BOS])
    hf = PreTrainedTokenizerFast(tokenizer_object=tok._tokenizer, bos_token=BOS, eos_token=BOS, unk_token=BOS)
    hf.model_max_length = 128
    bad = [w for w in words if len(hf.encode(" " + w)) != 1]
    if bad:
        raise SystemExit(f"these entities are not single tokens; raise --vocab-size: {bad}")
    return hf


# ----------------------------------------------------------------------------------------------------------
# Packing and training
# ----------------------------------------------------------------------------------------------------------
def induction_pool(tok) -> list[int]:
    """Token ids used for random spans: ordinary word tokens (a leading space, letters only)."""
    pool = []
    for t, i in tok.get_vocab().items():
        if t.startswith("\u0120") and t[1:].isalpha() and len(t) > 2:
            pool.append(i)
    return sorted(pool)


def pack(docs: list, tok, rng: random.Random, n_ctx: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Tokenize documents (each preceded by BOS) and pack them whole into rows of n_ctx tokens.

    Returns ids [rows, n_ctx] and a loss mask [rows, n_ctx] (0 on padding)."""
    pool = induction_pool(tok)
    texts = [d for d in docs if isinstance(d, str)]
    enc = iter(tok(texts, add_special_tokens=False)["input_ids"])
    bos = tok.convert_tokens_to_ids(BOS)
    rows, masks, cur = [], [], []

    def flush():
        pad = n_ctx - len(cur)
        rows.append(cur + [bos] * pad)
        masks.append([1] * len(cur) + [0] * pad)

    for d in docs:
        if isinstance(d, str):
            ids = [bos] + next(enc)
        else:
            span = [rng.choice(pool) for _ in range(d[1])]
            ids = [bos] + span + span
        if len(cur) + len(ids) > n_ctx:
            flush()
            cur = []
        cur = cur + ids
    if cur:
        flush()
    return torch.tensor(rows), torch.tensor(masks)


def save_model(model, tok, path: Path, dtype: torch.dtype, extra: dict | None = None) -> None:
    path.mkdir(parents=True, exist_ok=True)
    model = model.to(dtype)
    model.save_pretrained(path, safe_serialization=True)
    model.to(torch.float32)
    tok.save_pretrained(path)
    bos_in_front(path / "tokenizer.json")
    for junk in ["generation_config.json", "special_tokens_map.json"]:
        (path / junk).unlink(missing_ok=True)
    if extra is not None:
        (path / "training.json").write_text(json.dumps(extra, indent=2) + "\n")


def bos_in_front(tokenizer_json: Path) -> None:
    """The model is trained on documents that each start with BOS, so its tokenizer puts BOS in front of a text
    (the tokenizer's own convention, which tokens.encode follows)."""
    spec = json.loads(tokenizer_json.read_text())
    bos = {"SpecialToken": {"id": BOS, "type_id": 0}}
    (bos_id,) = [t["id"] for t in spec["added_tokens"] if t["content"] == BOS]
    template = {"type": "TemplateProcessing",
                "single": [bos, {"Sequence": {"id": "A", "type_id": 0}}],
                "pair": [bos, {"Sequence": {"id": "A", "type_id": 0}}, {"Sequence": {"id": "B", "type_id": 1}}],
                "special_tokens": {BOS: {"id": BOS, "ids": [bos_id], "tokens": [BOS]}}}
    spec["post_processor"] = {"type": "Sequence", "processors": [spec["post_processor"], template]}
    tokenizer_json.write_text(json.dumps(spec, ensure_ascii=False, indent=2))


def lr_at(step: int, steps: int, peak: float, warmup: int) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


# ----------------------------------------------------------------------------------------------------------
# Evaluation datasets and metrics
# ----------------------------------------------------------------------------------------------------------
def build_tasks(tok, rng: random.Random) -> dict[str, list[dict]]:
    bos = tok.convert_tokens_to_ids(BOS)

    def ids(text: str) -> list[int]:
        return [bos] + tok.encode(text, add_special_tokens=False)

    def one(word: str) -> int:
        (i,) = tok.encode(" " + word, add_special_tokens=False)
        return i

    ioi = []
    for n in range(400):  # held-out combinations only
        p = ioi_prompt(rng, held_out=True)
        # "ABC" corruption: the three name slots, in order of appearance, get three fresh distinct names
        x, y, z = rng.sample([m for m in NAMES if m not in (p["io"], p["s"])], 3)
        tpl = IOI_TEMPLATES[p["template"]]
        if p["order"] == "ABBA":
            tpl = tpl.replace("{B} and {A}", "{A} and {B}", 1)
        fresh = iter([x, y, z])
        corrupted = re.sub(r"\{[AB]\}", lambda _: next(fresh), tpl).format(PLACE=p["place"], OBJECT=p["object"])
        clean_ids, corr_ids = ids(p["text"]), ids(corrupted)
        assert len(clean_ids) == len(corr_ids)
        ioi.append(dict(
            id=n, template=p["template"], order=p["order"], io=p["io"], s=p["s"], place=p["place"],
            object=p["object"], abc=[x, y, z], clean=p["text"], corrupted=corrupted, held_out=True,
            clean_ids=clean_ids, corrupted_ids=corr_ids, io_id=one(p["io"]), s_id=one(p["s"]),
        ))

    pool = induction_pool(tok)
    induction = []
    for n in range(200):
        length = rng.randint(8, 20)
        span = [rng.choice(pool) for _ in range(length)]
        induction.append(dict(id=n, span_length=length, ids=[bos] + span + span))

    facts = []
    for country, capital in CAPITALS.items():
        for k, tpl in enumerate(FACT_TEMPLATES):
            prompt = tpl.format(C=country)
            facts.append(dict(
                country=country, phrasing=k, prompt=prompt, ids=ids(prompt), answer=capital,
                answer_id=one(capital), held_out=fact_held_out(country, k),
            ))

    concepts = []
    seen = set()
    while len(concepts) < 2000:
        c = concept_sentence(rng)
        if c["text"] in seen:
            continue
        seen.add(c["text"])
        concepts.append(dict(id=len(concepts), **c, ids=ids(c["text"])))
    return dict(ioi=ioi, induction=induction, facts=facts, concepts=concepts)


@torch.no_grad()
def evaluate(model, tasks: dict) -> dict:
    """The figures the README reports, computed from the model on held-out prompts."""
    model.eval()
    ioi = tasks["ioi"]
    lds = []
    for r in ioi:
        logits = model(torch.tensor([r["clean_ids"]])).logits[0, -1]
        lds.append((logits[r["io_id"]] - logits[r["s_id"]]).item())
    lds_t = torch.tensor(lds)
    first, second = [], []
    for r in tasks["induction"]:
        x = torch.tensor([r["ids"]])
        logp = model(x).logits[0, :-1].log_softmax(-1)
        nll = -logp.gather(-1, x[0, 1:, None])[:, 0]  # nll[i] = loss of predicting token i+1
        n = r["span_length"]
        first.append(nll[1:n].mean().item())  # tokens 2..n of the first copy
        second.append(nll[n + 1 : 2 * n].mean().item())  # tokens 2..n of the second copy
    hits_held, hits_all = [], []
    for r in tasks["facts"]:
        top = model(torch.tensor([r["ids"]])).logits[0, -1].argmax().item()
        hits_all.append(top == r["answer_id"])
        if r["held_out"]:
            hits_held.append(top == r["answer_id"])
    return dict(
        ioi_accuracy=(lds_t > 0).float().mean().item(),
        ioi_mean_logit_diff=lds_t.mean().item(),
        induction_loss_first_copy=sum(first) / len(first),
        induction_loss_second_copy=sum(second) / len(second),
        facts_top1_held_out=sum(hits_held) / max(1, len(hits_held)),
        facts_top1_all=sum(hits_all) / len(hits_all),
        n_ioi=len(ioi), n_facts_held_out=len(hits_held),
    )


# token ids this script evaluates with; the shipped IOI, fact and concept files keep only text and the pieces
# it is built from (any model's tokenizer encodes them: analysis/tasks.py). Induction spans stay ids.
TOKENIZER_FIELDS = ("clean_ids", "corrupted_ids", "io_id", "s_id", "ids", "answer_id")


def write_jsonl(path: Path, rows: list[dict]) -> None:
    keep = (lambda k: True) if path.stem == "induction" else (lambda k: k not in TOKENIZER_FIELDS)
    path.write_text("".join(json.dumps({k: v for k, v in r.items() if keep(k)}) + "\n" for r in rows))


# ----------------------------------------------------------------------------------------------------------
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent)
    ap.add_argument("--steps", type=int, default=4000)
    ap.add_argument("--batch", type=int, default=24, help="rows of n_ctx tokens per step")
    ap.add_argument("--n-ctx", type=int, default=128)
    ap.add_argument("--d-model", type=int, default=128)
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--vocab-size", type=int, default=2048)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--checkpoints", type=str, default="100,250,500,1000,2000,3000",
                    help="steps at which to save intermediate checkpoints")
    ap.add_argument("--seed", type=int, default=SEED)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()

    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    rng = random.Random(args.seed)
    t0 = time.time()

    tokens_needed = args.steps * args.batch * args.n_ctx
    n_docs = int(tokens_needed / 20 * 1.05) + 1000  # about 20 tokens a document, packed once (one epoch)
    docs = make_corpus(rng, n_docs)
    tok = train_tokenizer([d for d in docs[:60000] if isinstance(d, str)], args.vocab_size)
    ids, mask = pack(docs, tok, rng, args.n_ctx)
    print(f"corpus: {len(docs)} documents, {ids.shape[0]} rows of {args.n_ctx} tokens, "
          f"{int(mask.sum())} real tokens ({time.time() - t0:.0f}s)", flush=True)

    config = GPT2Config(
        vocab_size=len(tok), n_positions=args.n_ctx, n_embd=args.d_model, n_layer=args.layers,
        n_head=args.heads, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
    )
    model = GPT2LMHeadModel(config)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: {n_params:,} parameters", flush=True)
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.05}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=args.lr, betas=(0.9, 0.98))
    tasks = build_tasks(tok, random.Random(args.seed + 1))
    ckpt_steps = {int(s) for s in args.checkpoints.split(",") if s}
    out = args.out
    (out / "checkpoints").mkdir(parents=True, exist_ok=True)
    order = torch.randperm(ids.shape[0], generator=torch.Generator().manual_seed(args.seed))
    history = []
    model.train()
    for step in range(args.steps):
        rows = order[(torch.arange(args.batch) + step * args.batch) % ids.shape[0]]
        x, m = ids[rows], mask[rows]
        for g in opt.param_groups:
            g["lr"] = lr_at(step, args.steps, args.lr, warmup=100)
        logits = model(input_ids=x).logits[:, :-1]
        nll = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1),
                                                reduction="none")
        w = m[:, 1:].reshape(-1).float()
        loss = (nll * w).sum() / w.sum()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % 50 == 0 or step == args.steps - 1:
            print(f"step {step:5d} loss {loss.item():.4f} ({time.time() - t0:.0f}s)", flush=True)
        done = step + 1
        if done in ckpt_steps:
            metrics = evaluate(model, tasks)
            model.train()
            history.append(dict(step=done, loss=loss.item(), **metrics))
            print(f"checkpoint {done}: {metrics}", flush=True)
            save_model(model, tok, out / "checkpoints" / f"step-{done:05d}", torch.float16)

    metrics = evaluate(model, tasks)
    print(f"final: {metrics}", flush=True)
    recipe = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k != "out"}
    save_model(model, tok, out / "default-model", torch.float32, extra=dict(
        recipe=recipe, parameters=n_params, corpus_documents=len(docs), seconds=round(time.time() - t0),
        final_step=args.steps, final_metrics=metrics, checkpoints=history,
    ))
    tdir = out / "tasks"
    tdir.mkdir(parents=True, exist_ok=True)
    for name, rows in tasks.items():
        write_jsonl(tdir / f"{name}.jsonl", rows)
    (tdir / "entities.json").write_text(json.dumps(dict(
        **entity_words(), capital_of=CAPITALS, ioi_templates=IOI_TEMPLATES, fact_templates=FACT_TEMPLATES,
    ), indent=1) + "\n")
    print(f"done in {time.time() - t0:.0f}s", flush=True)


if __name__ == "__main__":
    main()
