"""Model loading: a Hugging Face id, a local Hugging Face folder or a GGUF file, through TransformerLens 4's
TransformerBridge.

    handle = load_model("default")                      # the small model shipped in data/
    handle = load_model("EleutherAI/pythia-70m", dtype="bfloat16")
    handle = load_model("/path/to/hf/folder", device="cpu")
    handle = load_model("/path/to/model.Q4_1.gguf")     # dequantised to the dtype (transformers' GGUF support)

A `ModelHandle` carries the bridge, the tokenizer, a config summary and a fingerprint (a content hash of the
weights plus name and revision) that every cache key includes. Handles are cached in memory per process,
keyed by (name, revision, device, dtype, trust_remote_code); several models may be loaded at once. The handle
also records whether the model's own tokenizer puts a BOS token in front of a text (`prepends_bos`): that is
what `tokens.encode` does unless a spec says otherwise.

Every error a person can cause (bad id, no network, a folder that is not a model, an unsupported
architecture, not enough memory, custom code that needs trust_remote_code) raises `WorkbenchError` with a
message that says what to do; nothing is cached for a failed load.
"""
from __future__ import annotations

import collections
import contextlib
import functools
import hashlib
import json
import os
import re
import threading
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from .errors import WorkbenchError
from .gguf import GgufFile, check_architecture, gguf_architectures
from .gguf import reading as gguf_reading
from .settings import allow_local_folders, allow_remote_code, review_mode

REPO_ROOT = Path(__file__).resolve().parent.parent
DATA_DIR = REPO_ROOT / "data"
DEFAULT_MODEL_DIR = DATA_DIR / "default-model"
CHECKPOINTS_DIR = DATA_DIR / "checkpoints"
DEFAULT_MODEL = "default"  # alias for DEFAULT_MODEL_DIR
DEFAULT_MODEL_NAME = "workbench/default-model"  # the name that goes into its fingerprint, the same on every machine

DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DEVICES = ("auto", "cpu", "cuda")
# A Hugging Face repo id: "name" or "owner/name", letters, digits, "-", "_", "." (no "--" or ".." runs).
_HUB_ID = re.compile(r"^(?:[A-Za-z0-9][A-Za-z0-9_.-]{0,95}/)?[A-Za-z0-9][A-Za-z0-9_.-]{0,95}$")
_WEIGHT_FILES = ("*.safetensors", "*.safetensors.index.json", "pytorch_model*.bin")


# ----------------------------------------------------------------------------------------------------------
# The handle
# ----------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ModelSummary:
    """A short description of the architecture, for display and for reports."""

    name: str
    architecture: str
    n_params: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    d_model: int
    d_head: int
    d_mlp: int | None
    d_vocab: int
    n_ctx: int
    norm: str  # "LayerNorm" | "RMSNorm"
    mlp: str  # e.g. "GELU (gelu_new)", "gated SiLU"
    attention: str  # "multi-head" | "grouped-query (2 key/value heads)" | "multi-query"
    positions: str  # "learned absolute" | "rotary" | ...
    block: str  # "sequential" | "parallel attention + MLP"
    device: str
    dtype: str

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


class Turns:
    """Who waits for a model's lock: sessions count themselves in while they wait, so that a long run can let
    them in between two parts of its work (ModelSession.let_others_in)."""

    def __init__(self):
        self.cond = threading.Condition()
        self.waiting = 0  # sessions waiting for the lock now
        self.entries = 0  # sessions that were done waiting (got it, or gave up), ever
        self.holds = 0  # how many times its holder has taken the (re-entrant) lock now


@dataclass(eq=False)
class ModelHandle:
    """A loaded model. `lock` must be held while hooks are attached to `bridge` (hooks are shared module state)."""

    name: str  # as the caller gave it ("default", "gpt2", a folder, a .gguf file)
    source: str  # "local" | "hub" | "gguf"
    path: str | None  # the resolved folder (local models) or file (GGUF)
    revision: str | None
    device: str
    dtype: str
    bridge: Any  # transformer_lens.model_bridge.TransformerBridge
    tokenizer: Any
    summary: ModelSummary
    fingerprint: str
    prepends_bos: bool = True  # the tokenizer's own convention: does it put its BOS token before a text?
    lock: threading.RLock = field(default_factory=threading.RLock, repr=False)
    turns: Turns = field(default_factory=Turns, repr=False)

    @property
    def cfg(self):
        return self.bridge.cfg

    @functools.cached_property
    def tokenizer_fingerprint(self) -> str:
        """What this model's token ids mean (analysis.tokens.tokenizer_fingerprint): a link's ids belong to it."""
        from .tokens import tokenizer_fingerprint

        return tokenizer_fingerprint(self.tokenizer)

    @property
    def info(self) -> dict:
        """The summary the store and the app keep for this model: its config summary, whether its tokenizer puts a
        BOS token in front, its tokenizer's fingerprint, and the activations every block has (what a sweep over
        layers can patch: a convolution or state-space block has no attention)."""
        from kernels.patching import available_activations

        return {**self.summary.as_dict(), "prepends_bos": self.prepends_bos, "tokenizer": self.tokenizer_fingerprint,
                "activations": list(available_activations(self.bridge))}


# ----------------------------------------------------------------------------------------------------------
# Public API
# ----------------------------------------------------------------------------------------------------------
def load_model(
    name: str = DEFAULT_MODEL,
    *,
    revision: str | None = None,
    device: str = "auto",
    dtype: str = "float32",
    trust_remote_code: bool = False,
) -> ModelHandle:
    """Load (or return from the in-process cache) a model by hub id, local folder, or "default"."""
    return MODEL_CACHE.get(name, revision=revision, device=device, dtype=dtype, trust_remote_code=trust_remote_code)


def display_name(name: str) -> str:
    """A model's name as a person reads it: a GGUF file's or a local folder's own name rather than its whole path
    (hub ids and "default" as they are)."""
    if name.lower().endswith(".gguf") or name.startswith(("/", ".", "~")) or "\\" in name:
        return Path(name).name or name
    return name


def resolve_device(device: str | None) -> str:
    device = (device or "auto").strip().lower()
    if device not in DEVICES:
        raise WorkbenchError(f"Unknown device {device!r}.", hint=f"Pick one of {', '.join(DEVICES)}.")
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise WorkbenchError("No CUDA GPU is available to this process.",
                             hint="Pick device 'cpu' (or 'auto'), or install a CUDA build of torch (see README).")
    return device


def resolve_dtype(dtype: str | None) -> str:
    dtype = (dtype or "float32").strip().lower()
    if dtype not in DTYPES:
        raise WorkbenchError(f"Unknown dtype {dtype!r}.", hint=f"Pick one of {', '.join(DTYPES)}.")
    return dtype


@dataclass(frozen=True)
class Checkpoint:
    """One model of a series tracked over training."""

    step: int | None  # its training step when known (a "step-N" in the entry, the folder's trainer state, the
    # default model's training record), else None
    name: str
    revision: str | None
    label: str  # "step N" when the step is known, else the entry as given (unique within a series)


def checkpoint_series(model: str, revision: str, checkpoints) -> list[Checkpoint]:
    """The checkpoints to track, in the order given (folders, hub ids, id@revision), or for the default model its
    shipped checkpoints and the final model, or the model alone. Every entry is checked against the deployment's
    restrictions here, before anything runs."""
    if checkpoints:
        entries = []
        for entry in checkpoints:
            name, _, rev = entry.partition("@")
            name, rev = name.strip(), rev.strip() or None
            check_allowed(name)
            entries.append((_known_step(entry, name), name, rev, entry.strip()))
    elif model == DEFAULT_MODEL and not revision:
        entries = [(step, str(path), None, "") for step, path in list_checkpoints()]
        entries.append((_known_step(DEFAULT_MODEL, DEFAULT_MODEL), DEFAULT_MODEL, None, DEFAULT_MODEL))
    else:
        entries = [(None, model, revision or None, f"{model}@{revision}" if revision else model)]
    out, seen = [], collections.Counter()
    for step, name, rev, given in entries:
        label = f"step {step}" if step is not None else given
        seen[label] += 1
        out.append(Checkpoint(step, name, rev, label if seen[label] == 1 else f"{label} ({seen[label]})"))
    return out


def _known_step(entry: str, name: str) -> int | None:
    """The training step an entry names ("step-2000", "pythia-70m@step3000"), the default model's final step, or
    the step a local checkpoint folder's trainer state records; None when nothing says."""
    m = re.search(r"step[-_]?(\d+)", entry)
    if m:
        return int(m.group(1))
    if name == DEFAULT_MODEL:
        return int(json.loads((DEFAULT_MODEL_DIR / "training.json").read_text()).get("final_step", 0))
    state = Path(name).expanduser() / "trainer_state.json"
    if allow_local_folders() and state.is_file():
        try:
            return int(json.loads(state.read_text())["global_step"])
        except (ValueError, KeyError, TypeError):
            return None
    return None


def list_checkpoints(model_dir: Path | None = None) -> list[tuple[int, Path]]:
    """The default model's intermediate training checkpoints as (step, folder), in training order."""
    root = CHECKPOINTS_DIR if model_dir is None else Path(model_dir)
    out = []
    for p in sorted(root.glob("step-*")):
        try:
            out.append((int(p.name.split("-", 1)[1]), p))
        except ValueError:
            continue
    return sorted(out)


# ----------------------------------------------------------------------------------------------------------
# The per-process cache
# ----------------------------------------------------------------------------------------------------------
class ModelCache:
    """Loaded models, least recently used first out, at most `max_models` at once.

    Two threads asking for the same model wait for one load; different models load in parallel."""

    def __init__(self, max_models: int | None = None):
        self.max_models = max_models or int(os.environ.get("WORKBENCH_MAX_MODELS", "3"))
        self._models: collections.OrderedDict[tuple, ModelHandle] = collections.OrderedDict()
        self._lock = threading.Lock()
        self._loading: dict[tuple, threading.Lock] = {}
        self.loads = 0  # how many real loads happened (tests and the app's status line read it)

    def get(self, name: str, *, revision=None, device="auto", dtype="float32", trust_remote_code=False) -> ModelHandle:
        req = _resolve_request(name, revision, device, dtype, trust_remote_code)
        key = req.key()
        with self._lock:
            if key in self._models:
                self._models.move_to_end(key)
                return self._models[key]
            load_lock = self._loading.setdefault(key, threading.Lock())
        with load_lock:
            with self._lock:  # loaded by another thread while we waited
                if key in self._models:
                    return self._models[key]
            handle = _load(req)
            with self._lock:
                self._models[key] = handle
                self.loads += 1
                while len(self._models) > self.max_models:
                    self._models.popitem(last=False)
                self._loading.pop(key, None)
        return handle

    def has(self, name: str, *, revision=None, device="auto", dtype="float32", trust_remote_code=False) -> bool:
        """Is this model loaded (a request that cannot be resolved is not)?"""
        try:
            key = _resolve_request(name, revision, device, dtype, trust_remote_code).key()
        except WorkbenchError:
            return False
        with self._lock:
            return key in self._models

    def loaded(self) -> list[ModelHandle]:
        with self._lock:
            return list(self._models.values())

    def clear(self) -> None:
        with self._lock:
            self._models.clear()


MODEL_CACHE = ModelCache()


class TorchDefaultsGate:
    """transformers sets torch's process-wide default dtype while it builds a model (float16 or bfloat16 for such
    a load, `modeling_utils.local_torch_dtype`); a computation in another thread that made a tensor meanwhile
    would make it in that dtype, and its result would be stored as if computed in float32. So every model session
    holds the shared side (`computing`), and building a model holds the exclusive side (`building`): it waits for
    other threads' computations to end and holds new ones off until it is done. A thread that is computing may
    build (a checkpoint loaded inside a run); re-entrant on both sides."""

    def __init__(self):
        self._cond = threading.Condition()
        self._computing: collections.Counter[int] = collections.Counter()  # thread -> depth
        self._builder: int | None = None
        self._build_depth = 0
        self._waiting = 0  # builders waiting: new computations of other threads wait behind them

    @contextlib.contextmanager
    def computing(self):
        me = threading.get_ident()
        with self._cond:
            self._cond.wait_for(lambda: self._builder in (None, me) and (
                not self._waiting or self._computing[me] > 0 or self._builder == me))
            self._computing[me] += 1
        try:
            yield
        finally:
            with self._cond:
                self._computing[me] -= 1
                if not self._computing[me]:
                    del self._computing[me]
                self._cond.notify_all()

    @contextlib.contextmanager
    def building(self, timeout_s: float = 600.0):
        me = threading.get_ident()
        with self._cond:
            self._waiting += 1
            try:
                ok = self._cond.wait_for(lambda: self._builder in (None, me)
                                         and not set(self._computing) - {me}, timeout_s)
            finally:
                self._waiting -= 1
            if not ok:
                raise WorkbenchError("Other runs kept the server busy for too long to load a model.",
                                     hint="Try again when they are done.")
            self._builder, self._build_depth = me, self._build_depth + 1
        try:
            yield
        finally:
            with self._cond:
                self._build_depth -= 1
                if not self._build_depth:
                    self._builder = None
                self._cond.notify_all()


TORCH_DEFAULTS = TorchDefaultsGate()


# ----------------------------------------------------------------------------------------------------------
# Resolving what to load, with every check that needs no weights
# ----------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Request:
    name: str  # as given
    target: str  # what transformers loads: a folder path or a hub id
    source: str  # "local" | "hub" | "gguf"
    fingerprint_name: str
    revision: str | None
    device: str
    dtype: str
    trust_remote_code: bool
    stamp: str  # for local folders: the weights' modification times, so an edited folder reloads
    gguf_file: str | None = None  # for GGUF: the file's name inside `target` (its folder)

    def key(self) -> tuple:
        return (self.target, self.revision, self.device, self.dtype, self.trust_remote_code, self.stamp)


def _shipped(name: str) -> bool:
    """The default model or one of its shipped checkpoints (by path, as given or resolved)."""
    if name == DEFAULT_MODEL:
        return True
    path = Path(name).expanduser().resolve()  # no filesystem check: nothing is revealed about other paths
    return path == DEFAULT_MODEL_DIR.resolve() or path.parent == CHECKPOINTS_DIR.resolve()


def check_allowed(name: str, trust_remote_code: bool = False) -> None:
    """Refuse what this deployment does not load (every model load passes here, whichever field named it):
    anything in review mode, a repository's own code unless WORKBENCH_ALLOW_REMOTE_CODE=1, and with
    WORKBENCH_ALLOW_LOCAL_FOLDERS=0 any server path but the shipped models. The messages are the same whether
    or not a path exists."""
    if review_mode():
        raise WorkbenchError("Review mode: this server loads no model and computes nothing.",
                             hint="Open a link to a stored result.")
    if trust_remote_code and not allow_remote_code():
        raise WorkbenchError("This server does not run a model repository's own code (trust_remote_code).",
                             hint="Whoever runs the server can allow it with WORKBENCH_ALLOW_REMOTE_CODE=1.")
    if not allow_local_folders() and isinstance(name, str) and not _shipped(name.strip()):
        name = name.strip()
        if _looks_like_path(name) or not _HUB_ID.match(name) or "--" in name or ".." in name or \
                name.lower().endswith(".gguf"):
            raise WorkbenchError("This deployment loads the shipped models and Hugging Face ids only, not folders "
                                 "or files on the server.", hint="Pick the default model, one of its checkpoints, "
                                                                 "or a hub id like 'EleutherAI/pythia-70m'.")


def _looks_like_path(name: str) -> bool:
    return name.startswith(("/", "./", "../", "~", ".\\")) or "\\" in name or name.count("/") > 1


def _resolve_request(name, revision, device, dtype, trust_remote_code) -> _Request:
    if not isinstance(name, str) or not name.strip():
        raise WorkbenchError("No model given.", hint="Type a Hugging Face id (like 'gpt2') or a local folder.")
    name = name.strip()
    if len(name) > 1024:
        raise WorkbenchError("That model name is too long to be a hub id or a folder.")
    check_allowed(name, trust_remote_code)
    revision = (revision or "").strip() or None
    device, dtype = resolve_device(device), resolve_dtype(dtype)
    trust_remote_code = bool(trust_remote_code)

    if name == DEFAULT_MODEL:
        path = DEFAULT_MODEL_DIR
        if not path.is_dir():
            raise WorkbenchError(f"The default model is missing from {path}.",
                                 hint="Restore data/ from git, or rebuild it: python data/build_default_model.py")
    else:
        path = Path(name).expanduser()
    if name == DEFAULT_MODEL or ((allow_local_folders() or _shipped(name)) and path.exists()):
        path = path.resolve()
        if revision is not None:
            raise WorkbenchError(f"A revision ({revision!r}) applies to hub ids, not to a local folder.",
                                 hint="Clear the revision, or point at the folder of the revision you want.")
        gguf = _gguf_file(path)
        if gguf is not None:
            stamp = f"{gguf.name}:{gguf.stat().st_mtime_ns}:{gguf.stat().st_size}"
            return _Request(name, str(gguf.parent), "gguf", gguf.name, None, device, dtype, trust_remote_code, stamp,
                            gguf_file=gguf.name)
        _check_model_folder(path)
        fp_name = DEFAULT_MODEL_NAME if path == DEFAULT_MODEL_DIR.resolve() else path.name
        stamp = ",".join(f"{p.name}:{p.stat().st_mtime_ns}" for p in sorted(_weight_files(path)))
        return _Request(name, str(path), "local", fp_name, None, device, dtype, trust_remote_code, stamp)
    if _looks_like_path(name):
        raise WorkbenchError(f"There is no folder at {name}.",
                             hint="Check the path, or give a Hugging Face id like 'EleutherAI/pythia-70m'.")
    if not _HUB_ID.match(name) or "--" in name or ".." in name:
        raise WorkbenchError(f"{name!r} is neither an existing folder nor a valid Hugging Face model id.",
                             hint="A hub id looks like 'gpt2' or 'EleutherAI/pythia-70m'.")
    if revision is not None and not re.match(r"^[\w./-]{1,128}$", revision):
        raise WorkbenchError(f"{revision!r} is not a valid revision.", hint="Use a branch, tag or commit hash.")
    return _Request(name, name, "hub", name, revision, device, dtype, trust_remote_code, "")


def _gguf_file(path: Path) -> Path | None:
    """The GGUF file a path names: the file itself, or the one .gguf in a folder without config.json."""
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            return None
        with path.open("rb") as f:
            if f.read(4) != b"GGUF":
                raise WorkbenchError(f"{path} is named .gguf but is not a GGUF file (it does not start with 'GGUF').")
        return path
    if not path.is_dir() or (path / "config.json").exists():
        return None
    files = sorted(p for p in path.iterdir() if p.suffix.lower() == ".gguf" and p.is_file())
    if len(files) > 1:
        raise WorkbenchError(f"{path} holds {len(files)} GGUF files ({', '.join(p.name for p in files[:5])}).",
                             hint="Give the path of the one file to load.")
    return _gguf_file(files[0]) if files else None


def _weight_files(path: Path) -> list[Path]:
    return [p for pattern in _WEIGHT_FILES for p in path.glob(pattern)]


def _check_model_folder(path: Path) -> None:
    if not path.is_dir():
        raise WorkbenchError(f"{path} is a file, not a model folder.",
                             hint="Pick the folder that holds config.json and the weights.")
    cfg = path / "config.json"
    if not cfg.is_file():
        raise WorkbenchError(f"{path} is not a Hugging Face model folder: it has no config.json.",
                             hint="Pick the folder that holds config.json and the weights (*.safetensors), "
                                  "e.g. one written by save_pretrained().")
    try:
        json.loads(cfg.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise WorkbenchError(f"{cfg} is not valid JSON ({e}).", hint="Re-save the model with save_pretrained().")
    if not _weight_files(path):
        raise WorkbenchError(f"{path} has a config.json but no weights (*.safetensors or pytorch_model*.bin).",
                             hint="Copy the weight files into the folder, or re-save it with save_pretrained().")


# ----------------------------------------------------------------------------------------------------------
# Loading
# ----------------------------------------------------------------------------------------------------------
def _hub_error(e: BaseException, req: _Request) -> WorkbenchError | None:
    """Turn an exception from transformers / huggingface_hub into a clear message, or None if it is not one."""
    from huggingface_hub import constants, errors

    chain, c = [], e
    while c is not None and len(chain) < 20:
        chain.append(c)
        c = c.__cause__ or c.__context__
    types = tuple(type(c) for c in chain)
    text = " ".join(str(c) for c in chain)

    def has(cls) -> bool:
        return any(issubclass(t, cls) for t in types)

    offline = constants.HF_HUB_OFFLINE
    if has(errors.GatedRepoError):
        return WorkbenchError(f"{req.name} is a gated model.",
                              hint="Accept its licence on the hub and set HF_TOKEN, or pick another model.")
    if has(errors.RevisionNotFoundError):
        return WorkbenchError(f"{req.name} has no revision {req.revision!r}.",
                              hint="Check the branch, tag or commit, or leave the revision empty.")
    if has(errors.RepositoryNotFoundError):
        return WorkbenchError(f"There is no model called {req.name!r} on the Hugging Face hub "
                              "(or it is private and no token is set).",
                              hint="Check the spelling, e.g. 'EleutherAI/pythia-70m', or give a local folder.")
    if has(errors.LocalEntryNotFoundError) or has(errors.OfflineModeIsEnabled) or (
        "couldn't connect" in text.lower() or "connect" in " ".join(t.__name__ for t in types).lower()
    ):
        why = "offline mode is on (HF_HUB_OFFLINE=1)" if offline else "the hub cannot be reached from here"
        return WorkbenchError(f"{req.name} is not in the local Hugging Face cache and {why}.",
                              hint="Download it where there is network (`hf download NAME`) and copy the cache "
                                   "over, or load a local folder.")
    if has(errors.EntryNotFoundError) or "does not appear to have a file named config.json" in text:
        return WorkbenchError(f"{req.name} exists on the hub but is not a model repository (no config.json).")
    if "trust_remote_code" in text:
        return WorkbenchError(f"{req.name} needs its own modelling code, which is off by default.",
                              hint="Turn on trust_remote_code only if you trust the code in that repository.")
    return None


def _gguf_error(e: BaseException, req: _Request) -> WorkbenchError | None:
    """A message for a GGUF file that failed to load after its checks (analysis.gguf: completeness, tensor
    types, architecture) passed: what failed, not a guess that the file is incomplete."""
    if req.source != "gguf":
        return None
    if isinstance(e, WorkbenchError):
        return e
    text = str(e)
    if "architecture" in text and "not supported" in text:
        return WorkbenchError(f"{req.name}: {text}",
                              hint=f"GGUF architectures transformers can read: {', '.join(gguf_architectures())}.")
    return WorkbenchError(f"Could not load the GGUF file {req.name}: {type(e).__name__}: {text[:300]}",
                          hint="The file is complete and its tensor types and architecture are ones that load; "
                               "this is a mismatch between the file's metadata and transformers' reading of it.")


def _check_gguf(req: _Request) -> GgufFile:
    """Parse the GGUF file's header once (metadata and tensor table, no tensor data) and refuse a file cut short,
    a tensor type that cannot be dequantised or an architecture transformers cannot load, naming which."""
    file = GgufFile.parse(Path(req.target) / req.gguf_file)
    try:
        file.check_types()
        check_architecture(file)
    except WorkbenchError:
        file.close()
        raise
    return file


def hub_reachable(timeout: float = 3.0) -> bool:
    """Can the hub's endpoint (HF_ENDPOINT) be connected to at all? One TCP connection with a short timeout."""
    import socket
    from urllib.parse import urlsplit

    from huggingface_hub import constants

    url = urlsplit(constants.ENDPOINT)
    try:
        socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https" else 80)), timeout).close()
        return True
    except OSError:
        return False


def _check_hub(req: _Request) -> None:
    """A hub model not in the local cache, with the hub out of reach, is refused at once: huggingface_hub would
    retry the request five times with back-off (23 s) before saying what one connection says in a moment."""
    import urllib.request

    from huggingface_hub import constants, try_to_load_from_cache

    if req.source != "hub" or constants.HF_HUB_OFFLINE or urllib.request.getproxies():
        return  # behind a proxy the hub is reached through it, not directly: huggingface_hub's own call decides
    try:
        if isinstance(try_to_load_from_cache(req.target, "config.json", revision=req.revision), str):
            return  # cached: transformers reads it from the cache when the hub does not answer
    except ValueError:  # not a valid repository id: transformers' own call says so below
        return
    if not hub_reachable():
        raise WorkbenchError(f"{req.name} is not in the local Hugging Face cache and the hub cannot be reached "
                             f"from here ({constants.ENDPOINT}).",
                             hint="Download it where there is network (`hf download NAME`) and copy the cache over, "
                                  "or load a local folder.")


def _load_config(req: _Request):
    from transformers import AutoConfig

    _check_hub(req)
    try:
        return AutoConfig.from_pretrained(req.target, revision=req.revision, trust_remote_code=req.trust_remote_code,
                                          **_gguf_kwargs(req))
    except Exception as e:  # noqa: BLE001 - classified below, re-raised if not a known case
        mapped = _hub_error(e, req) or _gguf_error(e, req)
        if mapped is not None:
            raise mapped from e
        if isinstance(e, (ValueError, KeyError, OSError)):
            raise WorkbenchError(f"Could not read the config of {req.name}: {e}",
                                 hint="Is it a transformers model folder or repository?") from e
        raise


def _check_architecture(config, req: _Request) -> str:
    from importlib.metadata import version

    from transformer_lens.factories.architecture_adapter_factory import ArchitectureAdapterFactory
    from transformer_lens.model_bridge.sources._hf_format import determine_architecture_from_hf_config

    if not getattr(config, "architectures", None):  # a GGUF file's config, some folders': the model_type only
        from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

        mapped = MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(getattr(config, "model_type", None) or "")
        if mapped is not None:
            config.architectures = [mapped]
    try:
        arch = determine_architecture_from_hf_config(config)
    except ValueError as e:  # the bridge knows neither the config's architectures nor its model_type
        arch = (getattr(config, "architectures", None) or [None])[0] or getattr(config, "model_type", None)
        if arch is None:
            raise WorkbenchError(f"Cannot tell the architecture of {req.name}: {e}") from e
    ArchitectureAdapterFactory.discover_entry_points()
    supported = set(ArchitectureAdapterFactory._adapters)
    if arch not in supported:
        known = ["GPT2LMHeadModel", "GPTNeoXForCausalLM", "LlamaForCausalLM", "MistralForCausalLM",
                 "Qwen2ForCausalLM", "Qwen3ForCausalLM", "Gemma2ForCausalLM", "PhiForCausalLM", "OPTForCausalLM"]
        examples = ", ".join(a for a in known if a in supported)
        raise WorkbenchError(
            f"{req.name} is a {arch}, an architecture that TransformerLens "
            f"{version('transformer-lens')}'s TransformerBridge does not support.",
            hint=f"Pick a model of a supported architecture: {examples} and {len(supported)} in all.",
        )
    return arch


def estimate_parameters(config) -> int | None:
    """Parameter count of a config, from an instance built on the meta device (no memory used)."""
    from transformers import AutoModelForCausalLM

    try:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
        return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
    except Exception:  # noqa: BLE001 - an estimate only; the load itself still guards against OOM
        return None


def available_memory(device: str) -> int:
    """Free bytes on the device (for the CPU: available system memory)."""
    if device == "cuda":
        return torch.cuda.mem_get_info()[0]
    import psutil

    return psutil.virtual_memory().available


def load_need(n_params: int, dtype: str) -> int:
    """Bytes a model of n_params needs to load and run in dtype: its weights, the bridge's own copies of some
    (a fifth at most), and room for a run's activations."""
    return int(n_params * DTYPES[dtype].itemsize * 1.2 + 256 * 2**20)


def _check_memory(config, req: _Request) -> int | None:
    """Refuse a model that cannot fit before loading it, saying which dtypes would; returns the parameter count
    (None if unknown)."""
    n = estimate_parameters(config)
    if n is None:
        return None
    need = load_need(n, req.dtype)
    free = available_memory(req.device)
    if need > free:
        fits = [d for d in DTYPES if load_need(n, d) <= free]
        would = (f"In {' or '.join(fits)} it would fit (about {load_need(n, fits[0]) / 2**30:.1f} GiB): pick that "
                 "dtype in the sidebar or with --dtype." if fits else
                 f"It fits in no dtype here: even bfloat16 needs about {load_need(n, 'bfloat16') / 2**30:.1f} GiB.")
        raise WorkbenchError(
            f"Not enough memory for {req.name}: {n / 1e9:.2f} B parameters in {req.dtype} need about "
            f"{need / 2**30:.1f} GiB, and {req.device} has {free / 2**30:.1f} GiB free. {would}",
            hint="Pick bfloat16 or float16, a smaller model, or a machine with more memory; "
                 "unload other models first.",
        )
    return n


def _gguf_kwargs(req: _Request) -> dict:
    return {"gguf_file": req.gguf_file} if req.gguf_file else {}


def _load_tokenizer(req: _Request):
    """The model's own tokenizer, as its files configure it (TransformerLens would force a BOS on it)."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(req.target, revision=req.revision,
                                             trust_remote_code=req.trust_remote_code, **_gguf_kwargs(req))
    except Exception as e:  # noqa: BLE001 - every failure here is about the model the person picked
        mapped = _hub_error(e, req) or _gguf_error(e, req)
        if mapped is not None:
            raise mapped from e
        raise WorkbenchError(f"Could not load the tokenizer of {req.name}: {type(e).__name__}: {e}",
                             hint="A model folder needs its tokenizer files (tokenizer.json and "
                                  "tokenizer_config.json).") from e


def prepends_bos(tokenizer) -> bool:
    """Whether a tokenizer, left to itself, puts its BOS token in front of a text."""
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return False
    ids = tokenizer("a")["input_ids"]
    return bool(ids) and ids[0] == bos


def file_fingerprint(path: Path, name: str) -> str:
    """Content hash of a weights file (a GGUF) plus its name."""
    h = hashlib.blake2b(digest_size=16)
    h.update(json.dumps({"name": name, "file": True}).encode())
    with path.open("rb") as f:
        while block := f.read(2**24):
            h.update(block)
    return h.hexdigest()


def weights_fingerprint(model: torch.nn.Module, name: str, revision: str | None) -> str:
    """Content hash of every tensor in the state dict (names, shapes, dtypes, bytes) plus name and revision."""
    h = hashlib.blake2b(digest_size=16)
    h.update(json.dumps({"name": name, "revision": revision}).encode())
    for key, t in sorted(model.state_dict().items()):
        t = t.detach()
        h.update(f"{key}|{tuple(t.shape)}|{t.dtype}|".encode())
        h.update(t.contiguous().cpu().view(-1).view(torch.uint8).numpy())
    return h.hexdigest()


def _describe(bridge, config, n_params: int, req: _Request, name: str) -> ModelSummary:
    c = bridge.cfg
    n_heads = int(c.n_heads)
    n_kv = int(getattr(c, "n_key_value_heads", None) or n_heads)
    attention = ("multi-head" if n_kv == n_heads else "multi-query" if n_kv == 1
                 else f"grouped-query ({n_kv} key/value heads)")
    act = str(getattr(c, "act_fn", None) or "?")
    pretty = {"gelu_new": "GELU", "gelu": "GELU", "gelu_fast": "GELU", "gelu_pytorch_tanh": "GELU",
              "silu": "SiLU", "relu": "ReLU", "swish": "SiLU"}.get(act, act)
    mlp = f"gated {pretty}" if getattr(c, "gated_mlp", False) else f"{pretty} ({act})" if pretty != act else act
    norm = {"LN": "LayerNorm", "LNPre": "LayerNorm", "RMS": "RMSNorm", "RMSPre": "RMSNorm"}.get(
        str(c.normalization_type), str(c.normalization_type))
    positions = {"standard": "learned absolute", "rotary": "rotary", "shortformer": "shortformer",
                 "alibi": "ALiBi"}.get(str(c.positional_embedding_type), str(c.positional_embedding_type))
    return ModelSummary(
        name=name, architecture=str(c.architecture), n_params=n_params, n_layers=int(c.n_layers),
        n_heads=n_heads, n_kv_heads=n_kv, d_model=int(c.d_model), d_head=int(c.d_head),
        d_mlp=int(c.d_mlp) if getattr(c, "d_mlp", None) else None, d_vocab=int(c.d_vocab), n_ctx=int(c.n_ctx),
        norm=norm, mlp=mlp, attention=attention, positions=positions,
        block="parallel attention + MLP" if getattr(c, "parallel_attn_mlp", False) else "sequential",
        device=req.device, dtype=req.dtype,
    )


def _load(req: _Request) -> ModelHandle:
    file = _check_gguf(req) if req.source == "gguf" else None
    with gguf_reading(file) if file is not None else contextlib.nullcontext():  # the file parsed once
        try:
            return _load_parts(req)
        finally:
            if file is not None:
                file.close()


def _load_parts(req: _Request) -> ModelHandle:
    from transformer_lens.model_bridge import TransformerBridge

    config = _load_config(req)
    arch = _check_architecture(config, req)
    n_params = _check_memory(config, req)
    tokenizer = _load_tokenizer(req)
    bos = prepends_bos(tokenizer)
    try:
        with TORCH_DEFAULTS.building():  # transformers sets the process-wide default dtype meanwhile
            hf_model, overrides = None, None
            if req.source == "gguf":  # dequantised by transformers, then bridged like any loaded model
                from transformers import AutoModelForCausalLM

                hf_model = AutoModelForCausalLM.from_pretrained(
                    req.target, gguf_file=req.gguf_file, dtype=DTYPES[req.dtype], attn_implementation="eager",
                ).to(req.device)
                hf_model.config.architectures = hf_model.config.architectures or [arch]
            elif not getattr(config, "architectures", None):
                overrides = {"architectures": [arch]}  # a config that names only its model_type
            bridge = TransformerBridge.boot_transformers(
                req.target, device=None if hf_model is not None else req.device, dtype=DTYPES[req.dtype],
                revision=req.revision, trust_remote_code=req.trust_remote_code, tokenizer=tokenizer, hf_model=hf_model,
                **({"hf_config_overrides": overrides} if overrides else {}),
            )
    except (torch.OutOfMemoryError, MemoryError) as e:
        raise WorkbenchError(f"Ran out of memory loading {req.name} in {req.dtype} on {req.device}.",
                             hint="Pick bfloat16 or float16, a smaller model, or unload other models.") from e
    except Exception as e:  # noqa: BLE001 - every failure here is about the model the person picked
        mapped = _hub_error(e, req) or _gguf_error(e, req)
        if mapped is not None:
            raise mapped from e
        raise WorkbenchError(f"Could not load {req.name}: {type(e).__name__}: {e}") from e
    bridge.eval()
    for block in getattr(bridge, "blocks", ()):
        # the bridge wires each block's own hooks (the pre-norm residual for split q/k/v inputs, hook_mlp_in, a
        # scaled block's output hooks) on the block's first forward; wired here, they are part of the state a
        # session keeps, not hooks it removes as added during the run that happened to be first
        wire = getattr(block, "_maybe_wire_capture_hooks", None)
        if wire is not None:
            wire()
    hf_model = bridge.original_model
    if n_params is None:  # the bridge adds split q/k/v copies as parameters, so this over-counts a little
        n_params = sum(p.numel() for p in {id(p): p for p in hf_model.parameters()}.values())
    display = "default" if req.fingerprint_name == DEFAULT_MODEL_NAME else req.name
    summary = _describe(bridge, config, n_params, req, display)
    if req.source == "gguf":
        path = Path(req.target) / req.gguf_file
        fingerprint = file_fingerprint(path, req.fingerprint_name)
    else:
        path, fingerprint = req.target, weights_fingerprint(hf_model, req.fingerprint_name, req.revision)
    return ModelHandle(
        name=req.name, source=req.source, path=str(path) if req.source != "hub" else None,
        revision=req.revision, device=req.device, dtype=req.dtype, bridge=bridge, tokenizer=bridge.tokenizer,
        summary=summary, fingerprint=fingerprint, prepends_bos=bos,
    )
