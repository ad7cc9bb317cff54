"""Every Streamlit helper of the dashboard: cached loaders, the background job manager, render functions.

Pages in ``pages/`` only lay out and display; ``laser_core`` never imports streamlit. Worker threads never
call Streamlit: they write progress into a ``Job`` that pages poll (``live_job``) while it runs.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import tempfile
import threading
import time
import traceback
import uuid
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import pandas as pd
import plotly.express as px
import plotly.graph_objects as go
import streamlit as st
from streamlit.errors import StreamlitPageNotFoundError

from laser_core import (CancelToken, Cancelled, ConfigError, LaserError, ModelSpec, SearchConfig, Store, TaskSpec,
                        load_model, load_task, make_splits)
from laser_core.answers import MATCH_HELP, MATCH_RULES, answer_rule_words
from laser_core.candidates import best_by_matrix, doc_edit, merit
from laser_core.config import CONTIGUOUS, PAPER_KS, PAPER_RHOS, canonical_json, to_dict
from laser_core.estimate import human_seconds
from laser_core.matrices import TYPE_ORDER
from laser_core.memory import device_memory, free_memory, human_bytes, memory_explained
from laser_core.models import cache_root
from laser_core.significance import change_between, family_summary
from laser_core.tasks import BUNDLED as BUNDLED_FILES, KIND_WORDS

DEFAULT_MODEL = os.environ.get("LASER_LAB_DEFAULT_MODEL", "demo")
DEFAULT_TASK = os.environ.get("LASER_LAB_DEFAULT_TASK", "fever")
BUNDLED = list(BUNDLED_FILES)
MODELS_KEPT = int(os.environ.get("LASER_LAB_MODELS_KEPT", "2"))  # models the dashboard keeps loaded, across sessions


# ------------------------------------------------------------------ jobs

@dataclass
class Job:
    """One background computation; written by its worker thread, read by pages."""

    id: str
    kind: str
    label: str
    device: str
    status: str = "running"  # running | done | cancelled | error
    phase: str = ""
    done: int = 0
    total: int = 1
    message: str = ""
    rows: list = field(default_factory=list)
    base: dict | None = None  # a search's base result on its search split, once evaluated
    started: float = field(default_factory=time.time)
    finished: float | None = None
    result: Any = None
    error: str | None = None
    cancel: CancelToken = field(default_factory=CancelToken)
    phase_started: float = field(default_factory=time.time)  # when the current phase began, and its done count then
    phase_done0: int = 0
    warnings: list = field(default_factory=list)  # what laser_core logged as a warning in the job's thread
    made_on: dict | None = None  # the model and splits it computes on (:func:`made_on`): pages show it only there

    def on_progress(self, ev: dict) -> None:
        if ev.get("phase", self.phase) != self.phase:
            self.phase, self.phase_started, self.phase_done0 = ev["phase"], time.time(), ev.get("done", 0)
        self.done, self.total = ev.get("done", self.done), max(1, ev.get("total", self.total))
        self.message = ev.get("message", "")
        if ev.get("row"):
            self.rows.append(ev["row"])
        if ev.get("base"):
            self.base = ev["base"]

    @property
    def elapsed(self) -> float:
        return (self.finished or time.time()) - self.started

    @property
    def eta(self) -> float | None:
        """Seconds left in the current phase at its pace so far (None until one step of it is done)."""
        steps = self.done - self.phase_done0
        if self.status != "running" or steps <= 0:
            return None
        return (time.time() - self.phase_started) / steps * max(0, self.total - self.done)


class JobManager:
    """At most one running job per device: a second request is refused with a message, never run alongside."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.jobs: dict[str, Job] = {}

    def submit(self, kind: str, label: str, device: str, fn: Callable[[Job], Any], made_on: dict | None = None) -> Job:
        """Start ``fn(job)`` in a thread. Raises ``JobBusy`` when a job already runs on ``device``."""
        from laser_core import JobBusy

        with self._lock:
            busy = next((j for j in self.jobs.values() if j.device == device and j.status == "running"), None)
            if busy:
                raise JobBusy(f"'{busy.label}' is still running on {device}; wait for it or cancel it first")
            job = Job(uuid.uuid4().hex[:8], kind, label, device, made_on=made_on)
            self.jobs[job.id] = job

        def work() -> None:
            status, error = "error", "stopped before it finished"
            try:  # the job's warnings: the cache switching itself off, ties a masked LM cannot break...
                with _warnings_into(job.warnings), memory_explained(f"in '{job.label}'", job.kind == "search"):
                    job.result = fn(job)
                partial = getattr(job.result, "status", "complete") == "partial"
                status, error = "cancelled" if partial or job.cancel.cancelled else "done", None
            except Cancelled:
                status, error = "cancelled", None
            except LaserError as e:
                error = str(e)
            except Exception as e:  # noqa: BLE001 - a real bug: keep the traceback for the page
                error = f"{type(e).__name__}: {e}\n{traceback.format_exc()}"
            finally:  # its end time before its status: one that is not running has one (live_job compares it)
                job.finished, job.error = time.time(), error
                job.status = status

        threading.Thread(target=work, name=f"laser-job-{job.id}", daemon=True).start()
        return job


@st.cache_resource
def job_manager() -> JobManager:
    return JobManager()


@st.cache_resource
def store() -> Store:
    return Store()


def _path_stamp(source: str) -> tuple | None:
    """What changes when the file or folder a model or task source names is written again: (name, modification
    time, size) of the file, or of each file directly in the folder; None for a name that is no path here (the
    demo, a bundled task, a hub id or dataset, a missing path: loading it says why)."""
    path = Path(source.strip()).expanduser()
    try:
        files = sorted(p for p in path.iterdir() if p.is_file()) if path.is_dir() else [path]
        return tuple((p.name, p.stat().st_mtime_ns, p.stat().st_size) for p in files)
    except OSError:
        return None


class _ThreadWarnings(logging.Handler):
    """Collects the warnings ``laser_core`` logs from the thread that made it (a page's, or a job's) while it is
    attached, each once, into ``messages``."""

    def __init__(self, messages: list) -> None:
        super().__init__(logging.WARNING)
        self.thread, self.messages = threading.get_ident(), messages

    def emit(self, record: logging.LogRecord) -> None:
        if record.thread == self.thread and record.getMessage() not in self.messages:
            self.messages.append(record.getMessage())


@contextlib.contextmanager
def _warnings_into(messages: list):
    """While active, what ``laser_core`` logs as a warning in this thread is appended to ``messages`` (each once)."""
    handler, logger = _ThreadWarnings(messages), logging.getLogger("laser_core")
    logger.addHandler(handler)
    try:
        yield
    finally:
        logger.removeHandler(handler)


def _with_warnings(fn: Callable[[], Any]) -> tuple[Any, tuple[str, ...]]:
    """(what ``fn()`` returns, the warnings ``laser_core`` logged meanwhile), for the page to show."""
    messages: list[str] = []
    with _warnings_into(messages):
        return fn(), tuple(messages)


class ModelShelf:
    """The models the dashboard keeps loaded, across sessions: at most ``kept``, so that trying model after model, or
    saving one folder again and again, does not fill RAM or GPU memory.

    The one used longest ago is dropped when a new one's source and config have been checked, just before its
    weights load (a job still running on it keeps it until it ends), so switching never holds more than ``kept``.
    Before, ``st.cache_resource(max_entries=...)`` dropped it only once the new one had loaded beside them all: a
    third model on a GPU that holds two ran out of memory. A source that fails its checks (a wrong path, no
    config.json) drops nothing.
    """

    def __init__(self, kept: int) -> None:
        self.kept = max(1, kept)
        self.lock = threading.Lock()  # guards ``items``
        self.loading = threading.Lock()  # one load at a time: two would each make room for one
        self.items: OrderedDict[tuple, Any] = OrderedDict()

    def _lookup(self, key: tuple) -> Any:
        with self.lock:
            if key in self.items:
                self.items.move_to_end(key)
                return self.items[key]
        return None

    def get(self, key: tuple, load: Callable[[Callable[[], None]], Any]) -> Any:
        """The value kept under ``key``, else ``load(make_room)``'s, kept (``make_room`` drops the models used longest
        ago down to ``kept`` - 1)."""
        found = self._lookup(key)
        if found is not None:
            return found
        with self.loading:
            found = self._lookup(key)  # another session may have loaded it meanwhile
            if found is not None:
                return found
            value = load(self._make_room)
            with self.lock:
                self.items[key] = value
                while len(self.items) > self.kept:  # a loader that never made room
                    self.items.popitem(last=False)
            return value

    def _make_room(self) -> None:
        with self.lock:
            while len(self.items) >= self.kept:
                self.items.popitem(last=False)
        free_memory()

    def clear(self) -> None:
        with self.lock:
            self.items.clear()


@st.cache_resource
def model_shelf() -> ModelShelf:
    """The server's one :class:`ModelShelf` (``MODELS_KEPT`` models)."""
    return ModelShelf(MODELS_KEPT)


def _loaded_model(spec: ModelSpec) -> tuple:
    """The model and what loading it warned about (a half-precision dtype on a CPU), kept on the :func:`model_shelf`
    by source, device, dtype and the source's :func:`_path_stamp` (a model folder saved again is loaded again)."""
    def load(make_room: Callable[[], None]) -> tuple:
        with st.spinner("Loading model (the demo model is prepared once, ~30 s)..."):
            return _with_warnings(lambda: load_model(spec, make_room=make_room))
    return model_shelf().get((spec.source, spec.device, spec.dtype, _path_stamp(spec.source)), load)


def _model_of(spec: ModelSpec):
    return _loaded_model(spec)[0]


@st.cache_resource(show_spinner="Loading task...")
def _cached_splits(spec_json: str, stamp: tuple | None):
    """The task's splits and the warnings loading it gave (duplicates dropped, sizes cut, ambiguous answers).
    ``stamp``: the source's :func:`_path_stamp`, so that a file edited or uploaded again is read again."""
    spec = TaskSpec(**json.loads(spec_json))
    return _with_warnings(lambda: make_splits(load_task(spec), spec))


def _loaded_task(task: TaskSpec) -> tuple:
    stamp = _path_stamp(task.source)
    _say_if_changed_on_disk(task.source, stamp)
    return _cached_splits(canonical_json(task), stamp)


def _say_if_changed_on_disk(source: str, stamp: tuple | None) -> None:
    """A toast, once, when the session's task file was written again since this session last read it: its examples
    are read again, so the page's numbers can change under the user (results for the old contents stay cached)."""
    seen = st.session_state.get("task_stamp")
    if seen is not None and seen[0] == source and seen[1] is not None and stamp is not None and seen[1] != stamp:
        st.toast(f"`{Path(source).name}` changed on disk since it was last read: its examples were read again.")
    st.session_state["task_stamp"] = (source, stamp)


def _splits_of(task: TaskSpec):
    return _loaded_task(task)[0]


@st.cache_data(show_spinner=False, max_entries=16)
def _task_notes(fingerprint: str, splits_key: str, max_new_tokens: int, _lm, _splits) -> tuple[str, ...]:
    """What a run would say of every split's questions (``checks.context_overflow``, ``masked_ties`` and
    ``unreachable_targets``), once per model, splits and decoding length (their identities are the key)."""
    from laser_core.checks import context_overflow, masked_ties, unreachable_targets
    examples = [e for split in ("calib", "val", "test") for e in _splits.examples(split)]
    notes = (context_overflow(_lm, examples, max_new_tokens), masked_ties(_lm, examples),
             unreachable_targets(_lm, examples, max_new_tokens))
    return tuple(n for n in notes if n)


def load_warnings() -> tuple[str, ...]:
    """What loading the session's model and task warned about (nothing for one that cannot be loaded), and, before
    any run: how many questions are longer than the model's context (a run refuses them); for a masked LM, how many
    have choices it cannot tell apart; for a generation task, how many have no accepted answer short enough for the
    decoding length."""
    notes: tuple[str, ...] = ()
    loaded = []  # the model, then the splits, where they load
    for load, spec in ((_loaded_model, model_spec()), (_loaded_task, task_spec())):
        try:
            value, warned = load(spec)
        except LaserError:
            continue
        notes += warned
        loaded.append(value)
    if len(loaded) == 2:
        lm, splits = loaded
        key = canonical_json([splits.key(s) for s in ("calib", "val", "test")])
        notes += _task_notes(lm.fingerprint, key, splits.spec.max_new_tokens, lm, splits)
    return notes


# ------------------------------------------------------------------ session state

def model_spec() -> ModelSpec:
    return st.session_state.get("model_spec") or ModelSpec(DEFAULT_MODEL, "auto", "float32")


def task_spec() -> TaskSpec:
    return st.session_state.get("task_spec") or TaskSpec(DEFAULT_TASK)


def switch_to(model: ModelSpec, task: TaskSpec) -> None:
    """Load ``model`` and ``task`` and make them the session's; on failure show why and keep the old ones."""
    try:  # the task first: it loads in seconds, a model can take minutes
        splits = _splits_of(task)
    except LaserError as e:
        user_error(f"Cannot load the task (still using `{task_spec().source}`): {e}", status=True)
    try:
        lm = _model_of(model)
    except LaserError as e:
        user_error(f"Cannot load the model (still using `{model_spec().source}`): {e}", status=True)
    if splits.task.kind == "gen" and lm.kind != "causal":
        user_error("Generation tasks need a causal LM; this model is a masked LM.", status=True)
    st.session_state["model_spec"], st.session_state["task_spec"] = model, task


MODEL_KINDS = ["demo (SmolLM2-135M-Instruct)", "local folder", ".gguf file", "cached hub id"]
TASK_KINDS = ["bundled", "task file path", "upload a file", "HF dataset"]
MODEL_PATH_LABELS = {MODEL_KINDS[1]: "Model folder (a Hugging Face folder with config.json)",
                     MODEL_KINDS[2]: ".gguf file",
                     MODEL_KINDS[3]: "Hub id (owner/name, or a name such as gpt2) in the local Hugging Face cache"}
TASK_PATH_LABELS = {"task file path": "Task file path (BIG-bench task.json or its folder, .jsonl, .csv/.tsv, .parquet, "
                                      ".json records)",
                    "HF dataset": "HF dataset: name[:split] or name:config:split (in the local cache, or on the hub)"}
SOURCE_KEYS = ("model_kind", "task_kind")  # the Model & task radios, outside its form
DEVICES = ["auto", "cpu", "cuda", "mps"]
TASK_COLUMNS = ("prompt_col", "choices_col", "answer_col", "targets_col")  # TaskSpec's column mapping
TASK_READING = (*TASK_COLUMNS, "prompt_template", "fixed_choices")  # and how prompts and choices are made of columns


def setup_form_state(model: ModelSpec, task: TaskSpec) -> dict[str, Any]:
    """The Model & task form's widget values that name ``model`` and ``task`` (by widget key)."""
    if model.source == "demo":
        kind = MODEL_KINDS[0]
    elif model.source.endswith(".gguf"):
        kind = MODEL_KINDS[2]
    else:
        kind = MODEL_KINDS[1] if Path(model.source).exists() else MODEL_KINDS[3]
    out: dict[str, Any] = {"model_kind": kind, "model_path": "" if model.source == "demo" else model.source,
                           "dtype": model.dtype}
    if model.device in DEVICES:  # "cuda:1" has no entry: the box keeps its default
        out["device"] = model.device
    if task.source in BUNDLED:
        out.update(task_kind="bundled", bundled=task.source)
    elif task.source.startswith("hf:"):
        out.update(task_kind="HF dataset", task_path=task.source[3:])
    else:  # an uploaded file was saved to disk: it reloads from that path
        out.update(task_kind="task file path", task_path=task.source)
    out.update({f: getattr(task, f) for f in (*TASK_READING, "n_calib", "n_test", "n_val", "seed", "shots",
                                              "max_new_tokens", "match")})
    out["answer_base"] = task.answer_base == 1  # a checkbox: "answers count from 1"
    return out


def seed_setup_form() -> None:
    """Fill the Model & task form from what is loaded, for every widget that has no value yet: on a first visit,
    and on coming back from another page (Streamlit drops a page's widget values when it is left). Otherwise
    the form showed its defaults beside a sidebar naming another task, and "Load" reset a seed or a split size
    that the user had not touched."""
    seeded = {key: value for key, value in setup_form_state(model_spec(), task_spec()).items()
              if key not in st.session_state}
    st.session_state.update(seeded)
    if set(seeded) & set(SOURCE_KEYS):  # the sources that name what is loaded, until a Load names others
        st.session_state["loaded_sources"] = {k: st.session_state[k] for k in SOURCE_KEYS}


@st.cache_data(show_spinner=False)
def bundled_facts(name: str) -> tuple[str, int]:
    """(kind, number of examples) of the bundled task ``name``: which fields its form needs, and what it holds."""
    task = load_task(TaskSpec(name))
    return task.kind, len(task)


def render_setup_form() -> None:
    """The Model & task form: the model and task sources above it, so that choosing one shows at once the fields
    it needs, and only those (a field hidden is its default: a bundled task takes no columns or template); every
    other widget in the form, read by key from the session state by :func:`load_setup_form` when it is submitted."""
    seed_setup_form()
    r1, r2 = st.columns(2)
    with r1:
        st.subheader("Model")
        st.radio("Source", MODEL_KINDS, horizontal=True, key="model_kind")
    generation = True  # a file's or dataset's kind is known once it loads: its decoding fields show
    with r2:
        st.subheader("Task")
        st.radio("Task source", TASK_KINDS, horizontal=True, key="task_kind")
        if st.session_state["task_kind"] == "bundled":  # above the form too: a generation task has more fields
            st.selectbox("Bundled task", BUNDLED, key="bundled",
                         help="BIG-bench tasks shipped with LASER Lab; their task.json sets prompts and choices")
            kind, size = bundled_facts(st.session_state["bundled"])
            st.caption(f"{KIND_WORDS[kind]}, {size} examples (BIG-bench)")
            generation = kind == "gen"
    model_kind, task_kind = st.session_state["model_kind"], st.session_state["task_kind"]
    note = st.empty()  # filled after the form: a Load in this run changes what is loaded
    with st.form("setup"):
        c1, c2 = st.columns(2)
        with c1:
            if model_kind != MODEL_KINDS[0]:
                st.text_input(MODEL_PATH_LABELS[model_kind], key="model_path")
            st.selectbox("Device", DEVICES, key="device")
            st.selectbox("dtype", ["float32", "bfloat16", "float16"], key="dtype",
                         help="On CPU keep float32: bf16 matmul is ~100x slower there.")
        with c2:
            if task_kind == "upload a file":
                st.file_uploader("Task file", type=["jsonl", "csv", "tsv", "parquet", "json"], key="upload",
                                 help="JSONL, CSV/TSV, Parquet, or JSON: a BIG-bench task.json or an array of records")
            elif task_kind != "bundled":
                st.text_input(TASK_PATH_LABELS[task_kind], key="task_path")
            if task_kind != "bundled":  # how rows of a file or dataset become questions
                for col, key in zip(st.columns(4), TASK_COLUMNS):
                    col.text_input(f"{key.removesuffix('_col')} column", key=key)
                t1, t2 = st.columns([3, 2])
                t1.text_input("Prompt template (optional)", key="prompt_template",
                              placeholder="Question: {question}\\nAnswer:",
                              help="Builds each prompt from the file's or dataset's columns, in place of the prompt "
                                   "column; \\n is a line break. Not for BIG-bench tasks, whose task.json sets the "
                                   "prompt.")
                t2.text_input("Fixed choices (optional)", key="fixed_choices", placeholder="no|yes",
                              help="The same choices for every row (BoolQ, SST-2), in place of the choices column; the "
                                   "answer column gives an index or the text of one (true/false: the second/first of "
                                   "two). Choices held one per column are named in the choices column instead: "
                                   "sol1,sol2.")
            s1, s2, s3, s4 = st.columns(4)
            s1.number_input("calibration", 1, 5000, key="n_calib", help="gradients and C2I's search")
            s2.number_input("held-out test", 1, 20000, key="n_test", help="reported, never searched on")
            s3.number_input("validation", 1, 20000, None, key="n_val", placeholder="20%",
                            help="LASER's search split; blank: 20% of the task")
            s4.number_input("seed", 0, 10**6, key="seed", help="shuffles the task before it is split")
            g0, g1, g2 = st.columns([2, 2, 3], vertical_alignment="bottom")  # room for "contains" whole
            g0.number_input("few-shot", 0, 64, key="shots",
                            help="solved examples before every prompt, drawn with the seed and kept out of every split "
                                 "(a BIG-bench file's separated as it says); 0: zero-shot, as LASER and the paper")
            if generation:  # a bundled multiple-choice task decodes nothing: its defaults stand
                g1.number_input("max new tokens", 1, 1024, key="max_new_tokens",
                                help="generation tasks: tokens decoded per answer; an answer longer than this is never "
                                     "right")
                g2.selectbox("Answer match", list(MATCH_RULES), key="match",
                             help="generation tasks: when an answer is right. " + MATCH_HELP)
            if task_kind != "bundled":
                st.checkbox("Answers count from 1", key="answer_base",
                            help="the answer column gives the first choice as 1 (Winogrande, Social IQa); a choice's "
                                 "text or label is read as it is")
        if st.form_submit_button("Load model and task", type="primary"):
            load_setup_form()
    loaded = st.session_state.get("loaded_sources", {})
    names = {"model": model_spec().source, "task": task_spec().source}
    changed = [what for what in ("model", "task") if st.session_state[f"{what}_kind"] != loaded.get(f"{what}_kind")]
    if "task" not in changed and task_kind == "bundled" and st.session_state["bundled"] != names["task"]:
        changed.append("task")  # another bundled task picked
    if changed:  # a source picked shows its fields at once, but nothing is loaded until the form is submitted
        still = " and ".join(f"the {what} `{names[what]}`" for what in changed)
        note.caption(f"Still loaded: {still}. Fill in the form and press **Load model and task** to switch.")


def saved_upload(uploaded) -> Path:
    """An uploaded file on disk, in a folder per content: another upload of that name (another session's, or a fixed
    file) is another file, and the file keeps its name (a task's name comes from it)."""
    data = uploaded.getvalue()
    folder = hashlib.sha256(data).hexdigest()[:16]
    dest = Path(tempfile.gettempdir()) / "laser-lab-uploads" / folder / uploaded.name
    if not dest.exists():
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_bytes(data)
    return dest


def load_setup_form() -> None:
    """Load the model and task that the Model & task form's widgets name (read by key from the session state);
    a missing or invalid value is shown as an error and what is loaded stays loaded."""
    f = st.session_state
    source = "demo" if f["model_kind"] == MODEL_KINDS[0] else f.get("model_path", "").strip()
    if not source:
        user_error("Give a folder, a .gguf file or a hub id for this model source.", status=True)
    path = f.get("task_path", "").strip()
    if f["task_kind"] == "bundled":
        tsource = f["bundled"]
    elif f["task_kind"] == "upload a file":
        if f.get("upload") is None:
            # also where Load was pressed the instant an upload ended: the browser enables the button a frame
            # before it sends the file's entry
            user_error("Choose a JSONL, CSV, Parquet or JSON file to upload first (where one shows as picked, it had "
                       "not finished uploading: press Load model and task again).", status=True)
        tsource = str(saved_upload(f["upload"]))
    else:
        tsource = ("hf:" + path if path else "") if f["task_kind"] == "HF dataset" else path
    if not tsource:
        user_error("Give a task: a task.json path or a dataset name.", status=True)
    # a bundled task hides how rows become questions: its task.json says, so those fields keep their defaults
    reading = {} if f["task_kind"] == "bundled" else {
        "answer_base": int(f["answer_base"]),
        **{c: f[c] if c == "prompt_template" else f[c].strip() for c in TASK_READING}}
    # nor does a bundled multiple-choice task decode (the decoding length is part of every result's cache key)
    decoding = {} if f["task_kind"] == "bundled" and bundled_facts(tsource)[0] == "mc" else {
        "max_new_tokens": int(f["max_new_tokens"]), "match": f["match"]}
    try:
        model = ModelSpec(source, f["device"], f["dtype"])
        task = TaskSpec(tsource, int(f["n_calib"]), int(f["n_test"]), None if f["n_val"] is None else int(f["n_val"]),
                        int(f["seed"]), shots=int(f["shots"]), **decoding, **reading)
    except ConfigError as e:
        user_error(str(e), status=True)
    switch_to(model, task)
    st.session_state["loaded_sources"] = {k: f[k] for k in SOURCE_KEYS}  # an upload is loaded as a file path


def current_model():
    """The loaded model of the session's spec (loaded once per spec, device and dtype), or st.error + stop."""
    spec = model_spec()
    try:
        return _model_of(spec)
    except LaserError as e:
        st.error(f"Cannot load the model: {e}")
        st.stop()


def current_splits():
    """The session task's splits, or st.error + stop."""
    try:
        return _splits_of(task_spec())
    except LaserError as e:
        st.error(f"Cannot load the task: {e}")
        st.stop()


def device_key(lm) -> str:
    return str(lm.device)


def start_job(kind: str, label: str, lm, splits, fn: Callable[[Job], Any]) -> None:
    """Submit a job on ``lm``'s device that computes on ``splits``, then rerun the page, so that the button that
    started it is drawn disabled (:func:`job_running`) beside its progress; shows a message instead when the device
    is busy. Before, the button stayed enabled until the job ended, and a second click got the busy message."""
    from laser_core import JobBusy
    try:
        job = job_manager().submit(kind, label, device_key(lm), fn, made_on(lm, splits))
    except JobBusy as e:
        st.warning(str(e))
        return
    st.session_state[f"job_{kind}"] = job.id
    _jobs_shown().add(kind)  # the page that started it shows it: the sidebar does not poll it too
    st.rerun()


def start_eval_job(kind: str, label: str, lm, splits, items: list[tuple[str, Any, str]]) -> None:
    """Background evaluation of (name, edit or None for the base or a list of edits applied together, split)
    items; result: {name: result doc}."""
    from laser_core.candidates import evaluate_edits

    def work(job: Job) -> dict:
        out = {}
        for i, (name, edit, split) in enumerate(items):
            job.on_progress({"phase": kind, "done": i, "total": len(items), "message": name[:40]})
            out[name] = evaluate_edits(lm, _as_edits(edit), splits, split, store(), job.cancel)
        return out
    start_job(kind, label, lm, splits, work)


def poll_seconds(threads: int | None = None) -> float:
    """How often a running job's view is redrawn: every second where torch has 4 or more threads, every 3 s on
    fewer cores (``$LASER_LAB_POLL_S`` overrides). Each redraw runs the view's script on the server and repaints it
    in the browser, on the cores the job computes on: on this 2-core machine a C2I search from an empty cache took
    168 s with the Explore page redrawn every second, 115 s every 3 s, and 85 s from the CLI. Most of that was
    Streamlit's full garbage collection after every script run, fragment reruns included (~0.4 s of the interpreter
    with torch and a model loaded), which `.streamlit/config.toml` switches off (``runner.postScriptGC``)."""
    if os.environ.get("LASER_LAB_POLL_S"):
        return float(os.environ["LASER_LAB_POLL_S"])
    import torch
    return 1.0 if (threads or torch.get_num_threads()) >= 4 else 3.0


def live_job(kind: str, lm, splits, show: Callable[[Job | None], None] | None = None) -> None:
    """Draw this session's ``kind`` job on ``lm`` and ``splits`` (``show``, default :func:`render_job`). While it
    runs the drawing is redone every :func:`poll_seconds`; when it ends (done, cancelled or failed) the page reruns
    once to show its result, and from then on nothing polls. A job that ended during this run (after
    :func:`use_app_navigation` began it) reruns the page at once: what the page read before may predate its end (a
    button disabled while it ran, its results not in the cache yet), and nothing would redraw that until a click."""
    show = show or render_job
    job = session_job(kind, lm, splits)
    running = job is not None and job.status == "running"
    if job is not None:  # the sidebar leaves it to the page (render_sidebar_jobs)
        _jobs_shown().add(kind)
        if not running:  # its end is shown here: the sidebar no longer reports it
            _jobs_seen().add(job.id)
            if (job.finished or 0) >= st.session_state.get("_run_started", math.inf):
                st.rerun()

    @st.fragment(run_every=poll_seconds() if running else None)
    def poll() -> None:
        now = session_job(kind, lm, splits)
        show(now)
        if running and now is not None and now.status != "running":
            st.rerun()
    poll()
    # A slot left empty on purpose. When a full rerun redefines the fragment without ``run_every``, the auto-rerun
    # the frontend had scheduled for the polling one can still arrive, and the page then loses the element right
    # after the fragment: in the browser test about 1 run in 3 lost Explore's "Best candidate" heading (on the
    # Model page that slot holds the next-step hint, on Export the Format radio). With this placeholder in it, 10
    # runs of 10 kept the heading. Streamlit 1.67; harmless where the race does not happen.
    st.empty()


def mark_seen(kind: str, lm, splits, when: bool = True) -> None:
    """The page draws the results of this session's ended ``kind`` job on ``lm`` and ``splits`` (``when``: they are
    this job's) from the cache, where it reads them once the job has ended, without :func:`live_job`
    (:func:`results_of` marks its evaluations so): the sidebar no longer reports that job's end on other pages.
    Before, a job watched to its end on its page (baseline, scores, Export's checks) was then reported as "finished"
    on every other page until dismissed."""
    job = session_job(kind, lm, splits)
    if when and job is not None and job.status != "running":
        _jobs_seen().add(job.id)


def found_scores(lm, splits, ks: tuple[int, ...], grouping: str, label: str):
    """Layer scores' (spectra, calibration loss) for the K grid ``ks`` under ``grouping``: from the cache, else from
    this session's scores job (``label``: that score's), computed but not cached (the cache switched off or
    unwritable); None when neither has them. Found for that job's score, the job's end is seen (:func:`mark_seen`)."""
    from laser_core.scores import cached_spectra
    found = cached_spectra(lm, splits, store(), ks, grouping)
    job = session_job("scores", lm, splits)
    if found is None and job is not None and job.status == "done" \
            and set(ks) <= set(next(iter(job.result[0].values())).S) \
            and (ks == (1,) or job.label == label):  # K = 1 is one block under any grouping
        found = job.result
    if found is not None:
        mark_seen("scores", lm, splits, job is not None and job.label == label)  # those shown are that job's
    return found


def _made_on(fingerprint: str | None, task: dict) -> dict:
    """A model fingerprint and a report's task (``search.report_task``) as :func:`made_on` compares them: what
    the results depend on, not where the task was read from nor its name."""
    return {"model": fingerprint, **{k: v for k, v in task.items() if k not in ("source", "name")}}


def made_on(lm, splits) -> dict:
    """What a result shown on a page must have been computed on: the model's weights, the task's examples, the
    seeded split sizes and, for a generation task, how answers are decoded and matched."""
    from laser_core.search import report_task

    return _made_on(lm.fingerprint, report_task(splits))


def job_running(kind: str, lm, splits) -> bool:
    """Whether this session's ``kind`` job on ``lm`` and ``splits`` is running: its button is then disabled."""
    job = session_job(kind, lm, splits)
    return job is not None and job.status == "running"


def session_job(kind: str, lm, splits) -> Job | None:
    """This session's latest ``kind`` job, where it ran on ``lm`` and ``splits``. Before, pages took the last job of
    its kind whatever it ran on: after loading another task, the Model page showed the previous task's baseline as
    this one's, Layer scores its scores."""
    jid = st.session_state.get(f"job_{kind}")
    job = job_manager().jobs.get(jid) if jid else None
    return job if job is not None and job.made_on == made_on(lm, splits) else None


# Settings that stay as the user left them on leaving a page and coming back (Streamlit drops the value of a
# widget whose page is not shown): widget key -> default. The widgets get their default from here, not from a
# value= of their own. Layer scores and Explore share "score", "tail" and "q": the matrices Layer scores lists
# as its top q are the ones a C2I search on Explore tries. Each of these widgets is also made with
# persist_state="session": re-assigning alone lost the value once a polling fragment (a job's live view) had rerun
# before the page was left (streamlit#10805; Streamlit 1.67).
SETTINGS: dict[str, Any] = {"score": "paper", "tail": SearchConfig.tail_fraction, "q": SearchConfig.q,
                            "method": "C2I (gradient-selected)", "ks": list(PAPER_KS), "rhos": list(PAPER_RHOS),
                            "early": False, "prefix_reuse": True, "prefix_budget_mb": SearchConfig.prefix_budget_mb,
                            "stack": SearchConfig.stack, "one_rho": 0.1, "fmt": "JSON", "score_check": "accuracy gain",
                            "grouping": CONTIGUOUS, "one_grouping": CONTIGUOUS}
MODEL_SETTINGS = ("types",)  # kept too, with no default: their options come from the model


def keep_settings() -> None:
    """Re-assign every setting to itself (or its default): what keeps a widget's value across pages."""
    for key, default in SETTINGS.items():
        st.session_state[key] = st.session_state.get(key, default)
    for key in MODEL_SETTINGS:
        if key in st.session_state:
            st.session_state[key] = st.session_state[key]


def use_app_navigation() -> None:
    """Make a page opened by a direct link run under app.py's navigation.

    Also keeps the pages' settings (:func:`keep_settings`) and notes when this run began (:func:`live_job`). Streamlit treats a ``pages/`` folder beside the entry
    script as its older automatic navigation until the entry script has called ``st.navigation`` once in the server
    process. Until then, a link straight to a page (a bookmark of /Explore opened right after ``streamlit run``) ran
    that page alone under a sidebar of file names with an extra "app" entry, and kept doing so for every such link
    until someone opened the home page. Called first on every page: it switches that mode off and reruns, so app.py
    runs, names the pages and shows this one.
    """
    from streamlit.runtime.pages_manager import PagesManager
    st.session_state["_run_started"] = time.time()  # a job that ends after this reruns the page (live_job)
    keep_settings()
    if getattr(PagesManager, "uses_pages_directory", None):
        PagesManager.uses_pages_directory = False
        st.rerun()


def user_error(msg: str, status: bool = False) -> None:
    """Show a user's mistake and stop the page; ``status``: also draw the sidebar status first (for pages that
    stop before they would draw it: what is loaded stays loaded, and the sidebar says so)."""
    st.error(msg)
    if status:
        render_sidebar_status()
    st.stop()


# ------------------------------------------------------------------ rendering

def render_sidebar_status() -> None:
    spec, tspec = model_spec(), task_spec()
    try:  # the sizes the splits have: a small task has fewer test (or validation) examples than asked
        s = _splits_of(tspec)
        sizes = f"calib {len(s.calib)}, val {len(s.val)}, test {len(s.test)}" + \
            (f", {tspec.max_new_tokens} new tokens" if s.task.kind == "gen" else "") + \
            (f", {tspec.match} match" if s.task.kind == "gen" and tspec.match != TaskSpec.match else "")
    except LaserError:  # the page says why when it loads the task
        sizes = f"calib {tspec.n_calib}{'' if tspec.n_val is None else f', val {tspec.n_val}'}, test {tspec.n_test}"
    reading = "".join(f"  \n{label}: `{value}`" for label, value in (("Prompt", tspec.prompt_template),
                                                                       ("Choices", tspec.fixed_choices),
                                                                       ("Answers", "count from 1" * tspec.answer_base))
                      if value)
    st.sidebar.caption(f"Model: `{spec.source}` ({spec.device}, {spec.dtype})  \nTask: `{tspec.source}` "
                       f"({sizes}, seed {tspec.seed}{f', {tspec.shots}-shot' if tspec.shots else ''}){reading}")
    render_sidebar_jobs()


# The dashboard's pages, in order: file, title and icon (app.py's navigation; the sidebar names pages by title).
PAGES = (("pages/1_Model_and_task.py", "Model & task", ":material/memory:"),
         ("pages/2_Layer_scores.py", "Layer scores", ":material/grid_on:"),
         ("pages/3_Explore.py", "Explore", ":material/science:"),
         ("pages/4_Results.py", "Results", ":material/table_chart:"),
         ("pages/5_Export.py", "Export", ":material/download:"))
_MODEL, _SCORES, _EXPLORE, _RESULTS, _EXPORT = (title for _, title, _ in PAGES)
# The page each kind of job shows on (its results, and its progress while it runs on that model and task).
JOB_PAGES = {"baseline": _MODEL, "scores": _SCORES, "search": _EXPLORE, "one": _EXPLORE, "compare": _RESULTS,
             "export_test": _EXPORT, "other_tasks": _EXPORT, "combine": _EXPORT, "recipe_test": _EXPORT}


def next_page(title: str, what: str) -> None:
    """A link to the next page of the workflow, ``title`` (one of :data:`PAGES`), saying what to do there. A page run
    outside app.py's navigation (a page test) has no pages to link to: it gets the same words, without the link."""
    path = next(path for path, t, _ in PAGES if t == title)
    try:
        st.page_link(path, label=f"Next: {title} — {what}", icon=":material/arrow_forward:")
    except StreamlitPageNotFoundError:
        st.info(f"Next: **{title}** in the sidebar — {what}")


def _jobs_record() -> dict[str, set[str]]:
    """The kinds of job the page being run draws itself (:func:`live_job`): ``"now"``, filled as this full run goes,
    and ``"last"``, its previous full run's, for the sidebar, which is drawn before the page's own jobs."""
    return st.session_state.setdefault("_jobs_shown", {}).setdefault(st.session_state.get("_page", ""),
                                                                      {"now": set(), "last": set()})


def _jobs_shown() -> set[str]:
    return _jobs_record()["now"]


def _jobs_seen() -> set[str]:
    """This session's ended jobs whose end it has seen: drawn by their page, or dismissed in the sidebar."""
    return st.session_state.setdefault("_jobs_seen", set())


def render_sidebar_jobs() -> None:
    """The sidebar's running jobs. This session's job that the page does not draw (started on another page, or on
    another model or task since loaded) shows its progress there, with a Cancel button and the page its results
    show on; when it ends, the page reruns. One the page draws is named only. While one of this session's jobs runs,
    the sidebar is redrawn every :func:`poll_seconds` (a few small elements): its first drawing, before the page's,
    goes by what the page's last run drew, and the next ones by what this run drew. Another session's job is named
    as what keeps the device busy. Before, the sidebar named the first running job of any session with its progress
    as of the page's last run, and a job could be cancelled only on its page, on the model and task it ran on.
    A job of this session that ended is reported there (finished, cancelled or failed, and where its results show)
    until its page has drawn it or it is dismissed: before, one that ended while another page was shown left no
    word of it."""
    record = _jobs_record()
    record["last"], record["now"] = record["now"], set()
    mine = {v for k, v in st.session_state.items() if str(k).startswith("job_")}
    watched = [j.id for j in job_manager().jobs.values() if j.status == "running" and j.id in mine]
    ran_full = []  # the fragment's first run is this full run's: the page's own jobs are not drawn yet

    @st.fragment(run_every=poll_seconds() if watched else None)
    def jobs() -> None:
        shown = record["now"] if ran_full else record["last"]
        ran_full.append(True)
        for j in [j for j in job_manager().jobs.values() if j.status == "running"]:
            if j.id not in mine:
                st.caption(f"Running for another session: {j.label}. This device takes no other job until it ends.")
            elif j.kind in shown:
                st.caption(f"Running: {j.label} (below)")
            else:
                job_progress(j)
                st.caption(f"Its results show on {JOB_PAGES.get(j.kind, 'its page')}.")
                if st.button("Cancel", key=f"sidebar-cancel-{j.id}"):
                    j.cancel.cancel()
                    st.caption("Cancelling: stops after the current step.")
        ended = [j for j in map(job_manager().jobs.get, watched) if j.status != "running"]
        if any(j.kind not in shown for j in ended):  # one the page draws: its live_job reruns the page
            st.rerun()  # the page then shows what the job left, and nothing polls
        page = st.session_state.get("_page")
        ended_here = [j for j in map(job_manager().jobs.get, mine) if j is not None and j.status != "running"]
        for j in sorted(ended_here, key=lambda j: j.started):
            if j.id in _jobs_seen() or j.kind in shown or JOB_PAGES.get(j.kind) == page:
                continue  # seen, or its page is this one (which draws it, and marks it seen, if it ran here)
            show, text = job_outcome(j)
            show(text)
            st.caption(f"Its results show on {JOB_PAGES.get(j.kind, 'its page')}.")
            st.button("Dismiss", key=f"sidebar-dismiss-{j.id}", on_click=_jobs_seen().add, args=(j.id,))
    with st.sidebar:
        jobs()
        st.empty()  # as after live_job's fragment


def render_example(splits) -> None:
    """The first calibration example of ``splits`` as the model reads it: the prompt, then each choice as scored
    after it (the right one marked) or the accepted answers and how a generated one is read, so that a column
    mapping or a prompt template can be checked before anything runs."""
    ex = splits.examples("calib")[0]
    with st.expander("An example as the model reads it (the first of the calibration split)"):
        st.code(ex.prompt, language=None)
        if ex.choices:
            st.markdown("Choices, as scored after the prompt:  \n" + "  \n".join(
                f"`{c!r}`" + (" ← right" if i == ex.answer else "") for i, c in enumerate(ex.choices)))
        else:
            st.markdown("Accepted answers (generation):  \n" + "  \n".join(f"`{t!r}`" for t in ex.targets))
            st.text(f"Generated text: the {splits.spec.max_new_tokens} new tokens, "
                    + answer_rule_words(splits.task, splits.spec.match)
                    + ("" if splits.task.answer_format.is_set else " (its first line)"))


def job_progress(job: Job) -> None:
    """A running job's progress bar: its label, phase, steps, time so far and left, and what it is on."""
    eta = job.eta
    left = f" · about {human_seconds(eta)} left" if eta is not None else ""
    st.progress(min(1.0, job.done / max(1, job.total)),
                text=f"{job.label} — {job.phase} {job.done}/{job.total} · {job.elapsed:.0f} s{left} · {job.message}")


def job_outcome(job: Job) -> tuple[Callable[[str], Any], str]:
    """How an ended job is reported: (``st.success``, ``st.warning`` or ``st.error``, its line)."""
    if job.status == "done":
        return st.success, f"{job.label}: finished in {job.elapsed:.1f} s"
    if job.status == "cancelled":
        kept = f"{len(job.rows)} finished candidate{'s' * (len(job.rows) != 1)} kept" if job.kind == "search" else \
            "what it had finished is kept in the cache"  # evaluations that report no candidate rows
        return st.warning, f"{job.label}: cancelled after {job.elapsed:.1f} s; {kept}"
    return st.error, f"{job.label} failed: {job.error}"


def render_job(job: Job | None, table: bool = True) -> None:
    """Progress bar, elapsed time, a Cancel button and (``table``) the rows so far of ``job``."""
    if job is None:
        return
    if job.status == "running":
        job_progress(job)
        if st.button("Cancel", key=f"cancel-{job.id}"):
            job.cancel.cancel()
            st.info("Cancelling: stops after the current step; finished candidates are kept.")
    else:
        show, text = job_outcome(job)
        show(text)
    for note in job.warnings[:5]:
        st.warning(note)
    if len(job.warnings) > 5:
        st.caption(f"... and {len(job.warnings) - 5} more warnings in the server log")
    if job.rows and table:
        st.dataframe(candidates_frame(job.rows), hide_index=True, width="stretch", column_config=CANDIDATE_COLUMNS)


def render_search_job(job: Job | None, lm) -> None:
    """A search job: its progress and, while it runs, :func:`render_search_rows` of the candidates so far (once it
    ends, the page draws its report instead)."""
    running = job is not None and job.status == "running"
    render_job(job, table=running or (job is not None and job.result is None))
    if running and job.rows:
        render_search_rows(lm, job.rows, job.base)


def render_search_rows(lm, rows: list[dict], base: dict | None) -> None:
    """The best of a search's ``rows`` so far against the ``base`` result, and each matrix's best on the
    layers x types heatmap."""
    best = best_by_matrix(rows)
    if best:
        b = max(best, key=merit)
        vs = f" (base {base['accuracy']:.3f})" if base else ""
        st.caption(f"Best so far: `{b['name']}` {k_label(b['k'], b.get('grouping'))}, ρ={b['rho']:g}: {b['split']} accuracy "
                   f"{b['accuracy']:.3f}{vs} · {len(best)} matri{'ces' if len(best) != 1 else 'x'} evaluated")
    st.plotly_chart(accuracy_heatmap(lm, rows, base["accuracy"] if base else None))


def score_inputs(lm) -> tuple[str, float, int]:
    """Score rule, trailing fraction and q: the same three settings on Layer scores and on Explore."""
    c1, c2, c3 = st.columns(3)
    score = c1.selectbox("Score", ["paper", "first_order"], key="score", persist_state="session",
                         help="paper: the push toward zero over the trailing part of the spectrum; first_order: the "
                              "predicted loss decrease of the best (K, ρ) reduction")
    tail = c2.slider("Trailing fraction (paper score)", 0.05, 1.0, step=0.05, key="tail", disabled=score != "paper",
                     persist_state="session")
    st.session_state["q"] = min(st.session_state["q"], min(30, len(lm.matrices)))  # a smaller model than before
    q = c3.slider("q (top-scored matrices to try)", 1, min(30, len(lm.matrices)), key="q", persist_state="session")
    return score, tail if score == "paper" else SearchConfig.tail_fraction, q


def render_c2i_matrices(lm, splits, cfg: SearchConfig) -> int | None:
    """Which matrices a C2I search with ``cfg`` tries, and the K each is too small for, where the scores are cached
    (else when they come). Returns the number of candidates where known; a grid that fits none stops the page."""
    from laser_core.scores import c2i_matrices, c2i_plan, cached_spectra, score_table, spectra_needed
    found = cached_spectra(lm, splits, store(), **spectra_needed(cfg))
    if found is None:
        own = cfg.score == "first_order" and tuple(sorted(cfg.ks)) != score_ks(cfg.score)  # grouping: the same setting
        st.caption(f"Tries the top {cfg.q} matrices by the {cfg.score} score: the run computes the scores first "
                   + (f"(Layer scores computes them for the K grid {', '.join(map(str, PAPER_KS))}, not this one)." if own
                      else "(or compute them on Layer scores to see which)."))
        return None
    table = score_table(lm, found[0], cfg.score, cfg)
    refs = [lm.ref(n) for n in c2i_matrices(table, cfg.q)]
    st.caption(f"Tries the top {cfg.q} by the {cfg.score} score: " + ", ".join(f"layer {r.layer} {r.type}" for r in refs))
    try:
        plan, unfit = c2i_plan(lm, cfg, found[0], table)
    except ConfigError as e:
        user_error(str(e))
    if unfit:
        st.info("Left out, K larger than the matrix's rows: "
                + "; ".join(f"layer {u['layer']} {u['type']} K={u['k']}" for u in unfit))
    return len(plan)


def render_skipped(report: dict) -> None:
    """What a search report left out (a K too large for a matrix, an edit or gradient with NaN/inf), and why."""
    from laser_core.scores import skip_text
    skipped = report.get("skipped") or []
    if skipped:
        with st.expander(f"{len(skipped)} left out of this search"):
            st.markdown("\n".join(f"- `{skip_text(s)}`" for s in skipped))


def cli_command(lm, splits, cfg: SearchConfig) -> str:
    """The shell command that runs ``cfg`` on this model and task."""
    from laser_core.cli_args import search_command
    return search_command(lm.spec, splits.spec, cfg)


def render_estimate(est) -> None:
    """The run time a search would take here (a ``laser_core.estimate.SearchEstimate``, or None: no basis yet)."""
    if est is None:
        st.caption("Run time: compute the baseline accuracy on Model & task (or run any search) and this page "
                   "estimates it from that timing.")
        return
    text = f"Estimated run time here: {est.summary()}."
    if est.seconds > 3600:
        st.warning(text + " Narrow the layers, types or grids, or run it on a GPU.")
    else:
        st.caption(text)


ONE_RHOS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.25, 0.3, 0.4, 0.5, 0.75, 0.9, 1.0)


def scores_cost_text(lm, splits, ks, grouping: str) -> str:
    """Layer scores, before they are computed: what they take, and about how long here where spectra of this model
    were computed before (``laser_core.scores.spectra_time``)."""
    from laser_core.estimate import spectra_words
    from laser_core.scores import spectra_time
    text = (f"Scores need one forward+backward over the {len(splits.calib)} calibration examples and an SVD of all "
            f"{len(lm.matrices)} matrices")
    grad, grad_from, svd, svd_from = spectra_time(lm, splits, store(), ks, grouping)
    if grad is None:
        return text + "."
    words = spectra_words(grad, grad_from, svd, svd_from, ks)
    return f"{text}. About {human_seconds(grad + (svd or 0.0))} here: {words}."


def score_ks(score: str) -> tuple[int, ...]:
    """The K whose spectra a score needs: the paper's grid for ``first_order`` (it scores each (K, ρ)), else K=1."""
    return PAPER_KS if score == "first_order" else (1,)


def session_scores(lm, splits) -> tuple[list[dict], SearchConfig] | None:
    """Every matrix's score under the session's score settings (Layer scores'), and those settings as a search
    config; None where the scores are not in the cache."""
    from laser_core.scores import cached_spectra, score_table
    score = st.session_state.get("score", "paper")
    grouping = st.session_state.get("grouping", CONTIGUOUS) if score == "first_order" else CONTIGUOUS
    cfg = SearchConfig(score=score, tail_fraction=st.session_state.get("tail", SearchConfig.tail_fraction)
                       if score == "paper" else SearchConfig.tail_fraction, grouping=grouping)
    found = cached_spectra(lm, splits, store(), score_ks(score), grouping)
    return (score_table(lm, found[0], score, cfg), cfg) if found else None


def top_scored(lm, splits) -> str | None:
    """The matrix ranked first under the session's score settings (as Layer scores ranks them), or None where the
    scores are not in the cache."""
    from laser_core.scores import c2i_matrices
    found = session_scores(lm, splits)
    return c2i_matrices(found[0], 1)[0] if found else None


SCORE_CHECKS = {"accuracy gain": ("accuracy", 1), "log-loss decrease": ("log_loss", -1)}  # measure: key, sign


def render_score_vs_change(lm, splits, rows: list[dict], base: dict | None, split: str) -> None:
    """Results: does the score pick the matrices whose reduction helps? Each evaluated matrix's score (Layer scores'
    settings; the rule can be switched here too) against the most its candidates on ``split`` gained over the base
    (in accuracy, or log-loss), with their rank correlation. Shown where at least three matrices were evaluated
    against a base; where that rule's scores are not computed yet, says where to compute them. Candidates stopped
    early are left out: their numbers cover only the examples they saw."""
    from laser_core.estimate import SPLIT_WORDS
    done = [r for r in rows if r["name"] and not r.get("stopped_early")]
    if base is None or len({r["name"] for r in done}) < 3:
        return
    words = SPLIT_WORDS.get(split, split)
    st.subheader("Does the score pick the matrices that help?")
    c1, c2 = st.columns(2)
    c1.selectbox("Score", ["paper", "first_order"], key="score", persist_state="session",
                 help="The same setting as on Layer scores and Explore (the paper score's trailing fraction is set "
                      "there)")
    measure = c2.radio("Gain measured as", list(SCORE_CHECKS), horizontal=True, key="score_check",
                       persist_state="session",
                       help="Per matrix, the most any of its candidates on this split gained over the base model: in "
                            "accuracy (what a search ranks by first), or in log-loss (the loss the score is the "
                            "gradient of, finer-grained on a small split)")
    found = session_scores(lm, splits)
    if found is None:
        st.info(f"The {st.session_state['score']} scores are not computed for this task yet: **Layer scores** computes "
                "them (one forward and backward pass on the calibration split).")
        return
    table, cfg = found
    scored = {m["name"]: m for m in table if m["rank"] is not None}  # no rank: a matrix skipped (NaN score)
    done = [r for r in done if r["name"] in scored]
    if len({r["name"] for r in done}) < 3:
        st.caption("Fewer than three of the matrices evaluated here have a score (the others' gradients were not "
                   "finite).")
        return
    key, sign = SCORE_CHECKS[measure]
    gains: dict[str, dict] = {}
    for r in done:
        gain = sign * (r[key] - base[key])
        if r["name"] not in gains or gain > gains[r["name"]]["gain"]:
            m = scored[r["name"]]
            gains[r["name"]] = {"matrix": r["name"], "type": r["type"], "layer": r["layer"], "score": m["score"],
                                "rank": m["rank"] + 1, "gain": gain, "K": k_text(r["k"], r.get("grouping")),
                                "ρ": r["rho"]}
    points = pd.DataFrame(list(gains.values()))
    rank_corr = points["score"].rank().corr(points["gain"].rank())  # Spearman's: Pearson's of the ranks (ties: mean)
    fig = px.scatter(points, x="score", y="gain", color="type", **type_colors(lm),
                     hover_data=["matrix", "layer", "rank", "K", "ρ"],
                     labels={"score": f"{cfg.score} score (calibration gradient)",
                             "gain": f"best {measure} over the base ({words})"}, height=360)
    fig.add_hline(y=0, line_dash="dot", annotation_text="base")
    st.plotly_chart(fig, key="score_vs_change")
    value = "n/a (every gain is the same)" if rank_corr != rank_corr else f"{rank_corr:+.2f}"
    st.caption(f"Rank correlation (Spearman) of the {cfg.score} score with each matrix's best {measure} on the "
               f"{words} split: {value}, over the {len(points)} matrices evaluated there (of {len(scored)} scored; "
               "the score's settings are Layer scores'). A C2I search evaluates only its top q, all scored high: a "
               "LASER sweep over many layers shows more of the range.")


class _ModelBusy(Exception):
    """A job holds the model: its weights are not the base model's now."""


@st.cache_data(show_spinner=False, max_entries=64)
def _block_spectrum(fingerprint: str, name: str, k: int, grouping: str, _lm) -> list:
    from laser_core.reduction import block_spectrum
    S = block_spectrum(_lm, name, k, store(), blocking=False, grouping=grouping)
    if S is None:
        raise _ModelBusy  # not cached: the next rerun tries again
    return S


def one_spectrum(lm, name: str, k: int, grouping: str = CONTIGUOUS) -> list | None:
    """The singular values of each of the K row blocks (grouped by ``grouping``) of matrix ``name`` (computed once per
    model, matrix, K and grouping; None while a job holds the model)."""
    try:
        return _block_spectrum(lm.fingerprint, name, k, grouping, lm)
    except _ModelBusy:
        return None


def block_spectrum_figure(S: list, ranks: list[int], title: str) -> go.Figure:
    """σ_i of each row block against i (log scale): the part a reduction keeps in colour, the part it drops in grey."""
    fig = go.Figure()
    for b, (s, r) in enumerate(zip(S, ranks)):
        values = [float(x) for x in s]
        # the dropped line starts at the last kept value, so that each block's spectrum is one unbroken line
        for part, xs, color in (("kept", range(r), "#c0392b"), ("dropped", range(r - 1, len(values)), "#b3b6b7")):
            fig.add_trace(go.Scatter(x=list(xs), y=values[xs.start:xs.stop], mode="lines", name=part,
                                     legendgroup=part, showlegend=b == 0, line={"color": color, "width": 1.5},
                                     hovertemplate=f"block {b}: σ_%{{x}} = %{{y:.4g}} ({part})<extra></extra>"))
    fig.update_layout(title=title, xaxis_title="singular value index i (in its block)", yaxis_title="σ_i",
                      yaxis={"type": "log", "tickformat": ".3~g"}, height=340, margin={"t": 50},
                      legend={"orientation": "h"})
    return fig


def render_one_candidate(lm, splits) -> None:
    """One (matrix, K, ρ) from sliders: its ranks and size at once, the first-order predicted loss change where
    the scores are cached, and its calibration (and held-out) accuracy against the base, from the cache or from a
    background evaluation. The matrix chosen on Layer scores is preselected; what is evaluated joins Results."""
    from laser_core import Edit
    from laser_core.gradients import first_order_gain
    from laser_core.reduction import energy_kept, params_kept
    from laser_core.scores import cached_spectra

    names = [r.name for r in lm.matrices]
    chosen = st.session_state.get("selected_matrix")  # set by Layer scores; follow it when it changes
    if chosen in names and (chosen != st.session_state.get("one_follows") or "one_matrix" not in st.session_state):
        st.session_state["one_matrix"] = st.session_state["one_follows"] = chosen
    elif st.session_state.get("one_matrix") not in names:
        st.session_state["one_matrix"] = top_scored(lm, splits) or names[0]
    c1, c2, c3 = st.columns([3, 1, 2])
    name = c1.selectbox("Matrix", names, key="one_matrix",
                        help="Preselected: the matrix chosen on Layer scores, else the top-scored one where the scores "
                             "are computed")
    ref = lm.ref(name)
    ks = [k for k in (1, 2, 4, 8, 16, 32, 64) if k <= ref.shape[0]]
    if st.session_state.get("one_k") not in ks:
        st.session_state["one_k"] = 1
    k = c2.select_slider("K (row blocks)", ks, key="one_k")
    rho = c3.select_slider("ρ (fraction of rank kept)", ONE_RHOS, key="one_rho", persist_state="session")
    edit = Edit(name, k, rho, grouping_input(c3, "one_grouping", disabled=k == 1))  # K = 1: contiguous, one block
    short = short_label(ref.layer, ref.type, k, rho, edit.grouping)
    ranks, kept = params_kept(ref, k, rho)
    full = ref.shape[0] * ref.shape[1]
    line = (f"layer {ref.layer}, {ref.type}, {ref.shape[0]}×{ref.shape[1]}: rank kept per block {ranks}; "
            f"{kept:,} of {full:,} parameters in factored form ({kept / full:.1%})")
    spectra = cached_spectra(lm, splits, store(), PAPER_KS, edit.grouping) or cached_spectra(lm, splits, store(), (1,))
    mine = spectra[0][name] if spectra is not None and k in spectra[0][name].S else None  # the gradient's, for this K
    predicted = -first_order_gain(mine, k, rho) if mine is not None else None
    if predicted is not None:
        line += f"; first-order predicted change of the calibration log-loss {predicted:+.4f}"
    S = mine.S[k] if mine is not None else one_spectrum(lm, name, k, edit.grouping)
    if S is not None:
        share = energy_kept(S, rho)
        line += (f"; keeps {share:.1%} of the squared Frobenius norm (relative error of the reduced matrix "
                 f"{math.sqrt(max(0.0, 1 - share)):.3f})")
    st.caption(line + ".")
    if S is not None:
        st.plotly_chart(block_spectrum_figure(S, ranks, f"{short}: singular values of each row block"),
                        key="one_spectrum")
    else:
        st.caption("The spectrum shows once the running job frees the model (its weights hold that job's edit).")
    wanted = {"base": (None, "calib"), "edit": (edit, "calib"), "base_test": (None, "test"), "edit_test": (edit, "test")}
    got = results_of("one", lm, splits, wanted)
    if got["base"] and got["edit"]:
        cols = st.columns(4)
        render_accuracy_pair(cols[:2], "Base (calib)", got["base"], "This edit (calib)", got["edit"], held_out=False)
        if got["base_test"] and got["edit_test"]:
            render_accuracy_pair(cols[2:], "Base (held-out test)", got["base_test"], "This edit (held-out test)",
                                 got["edit_test"])
        st.caption(loss_change_text(got["base"]["log_loss"], got["edit"]["log_loss"], predicted))
    calib = [(key, *wanted[key]) for key in ("base", "edit") if not got[key]]
    test = [(key, *wanted[key]) for key in ("base_test", "edit_test") if not got[key]]
    running = job_running("one", lm, splits)
    if calib and st.button(f"Evaluate on calibration ({len(splits.calib)} examples)", type="primary",
                           disabled=running):
        start_eval_job("one", f"{short} (calibration)", lm, splits, calib)
    elif not calib and test and st.button(f"Evaluate on held-out test ({len(splits.test)} examples)",
                                          disabled=running):
        start_eval_job("one", f"{short} (held-out test)", lm, splits, test)
    live_job("one", lm, splits)


def rho_figure(rows: pd.DataFrame, title: str, base: float | None) -> go.Figure:
    """Results' accuracy vs ρ of one matrix's candidates (``rows``, sorted by K and ρ): a line per K (and per K
    clustered), on a log ρ axis (:func:`rho_ticks`), the base model's accuracy dotted where known."""
    fig = px.line(rows, x="rho", y="accuracy", color=k_column(rows), markers=True, log_x=True,
                  labels={"color": "K", "rho": "ρ"}, title=title).update_xaxes(**rho_ticks(rows["rho"]))
    if base is not None:  # labelled at small ρ: lines meet the base near ρ = 1
        fig.add_hline(y=base, line_dash="dot", annotation_text="base", annotation_position="top left")
    return fig


def rho_ticks(rhos) -> dict:
    """A log-scale ρ axis labelled at the ρ values it shows (slanted where there are many), for Results' accuracy vs ρ
    chart: ticks at each decade alone left a grid within one decade (0.5, 0.1) with one label. A ρ too close to the
    one labelled before it keeps its tick, unlabelled (its value shows on hover)."""
    vals, text, last = sorted(set(float(r) for r in rhos)), [], -math.inf
    for v in vals:  # a label closer than a tenth of a decade to the last one would overlap it (0.75 and 0.9)
        text.append(f"{v:g}" if math.log10(v) - last >= 0.1 else "")
        last = math.log10(v) if text[-1] else last
    return {"tickvals": vals, "ticktext": text, "tickangle": -45 if len(vals) > 4 else 0}


def loss_change_text(base: float, edited: float, predicted: float | None) -> str:
    """One candidate's calibration log-loss, base to edited, beside the first-order prediction made before it was
    evaluated: the prediction is linear in the singular values dropped, and a reduction that drops most of a
    spectrum is far from linear (the demo's layer 11 down at K=1, rho=0.1 on qa_wikidata: predicted -4.39, measured
    +3.69). Before, only the prediction was shown, and only the accuracy was measured."""
    text = f"Calibration log-loss {base:.4f} → {edited:.4f} ({edited - base:+.4f}"
    if predicted is None:
        return text + ")."
    return text + (f"; predicted {predicted:+.4f} to first order: a linear estimate, looser the more of the "
                   "spectrum a reduction drops).")


def render_combination(lm, splits, docs: list[dict], chosen: dict) -> tuple[list, dict] | None:
    """Export: the ``chosen`` candidate's edit applied together with edits of other matrices (``docs``: this task's
    evaluated candidates), as LASER composes reductions across layers. One click evaluates them together on
    held-out test against the base, and then on the other bundled tasks (:func:`render_other_tasks`); the recipe
    downloaded holds them all, with those results (``apply`` re-checks the held-out one). What edits do together is
    not what each did alone, so it is measured, never added up.

    Returns (the edits, their recipe) once the combination picked is evaluated, for the page to save; else None."""
    from laser_core.compose import compose_pool
    from laser_core.config import check_one_per_matrix
    from laser_core.estimate import SPLIT_WORDS
    from laser_core.recipe import make_recipe, recipe_metrics
    from laser_core.saving import recipe_text
    from laser_core.search import SEARCH_SPLIT

    split = chosen["split"]  # each other matrix's best candidate on the chosen one's split: accuracies to compare
    best_of = compose_pool(docs, chosen)
    if not best_of:
        st.caption(f"No other matrix has a candidate evaluated on the {SPLIT_WORDS.get(split, split)} split to "
                   "combine with.")
        return None
    labels = {candidate_label(d): d for d in best_of}
    if split in SEARCH_SPLIT.values():  # choosing on held-out test would spend the split that checks the choice
        render_greedy(lm, splits, docs, chosen, labels)
    picked = st.multiselect("Apply together with (each matrix's best candidate)", list(labels), key="combine_pick",
                            persist_state="session")  # as left on coming back from another page
    if not picked:
        return None
    try:
        edits = check_one_per_matrix([doc_edit(d) for d in (chosen, *(labels[p] for p in picked))])
    except ConfigError as e:
        st.error(str(e))
        return None
    got = results_of("combine", lm, splits, {"base": (None, "test"), "together": (edits, "test")})
    if got["base"] and got["together"]:  # from the cache (this session's or an earlier one's), else this session's job
        base, together = got["base"], got["together"]
        render_accuracy_pair(st.columns(2), "Base (held-out test)", base,
                             f"{len(edits)} edits together (held-out test)", together)
        st.markdown(f"**The {len(edits)} edits together on the other bundled tasks**")
        elsewhere = render_other_tasks(lm, splits, edits, "_combined", "laser_recipe_combined.json")  # into the recipe
        recipe = make_recipe(lm, edits, splits.spec, recipe_metrics("test", None, None, base, together,
                                                                    other_tasks=elsewhere), "composed")
        st.download_button("Download the combined recipe (JSON)", recipe_text(recipe),
                           file_name="laser_recipe_combined.json", mime="application/json", key="combine_download")
        st.code("python -m laser_core apply --recipe laser_recipe_combined.json --out edited-model", language="bash")
        return edits, recipe
    ids = evaluation_id({"edits": [to_dict(e) for e in edits]})
    running = job_running("combine", lm, splits)
    if st.button(f"Evaluate the {len(edits)} edits together on held-out test", key="combine_run", disabled=running):
        st.session_state["combine_of"] = ids
        start_eval_job("combine", "edits together on held-out test", lm, splits,
                       [("base", None, "test"), ("together", edits, "test")])
    if st.session_state.get("combine_of") == ids:
        live_job("combine", lm, splits)
    return None


def render_greedy(lm, splits, docs: list[dict], chosen: dict, labels: dict[str, dict]) -> None:
    """Export's "Find edits to add": greedy composition from the ``chosen`` candidate (``laser_core.compose``) on its
    split, in the background, then the held-out test of the edits kept; once done, the edits kept are picked in the
    combination's box (``labels``: its options), which shows their held-out result, and each step is listed. A
    composition found before (in another session, or by ``search --compose``) is shown from the cache at once."""
    from laser_core.candidates import evaluate_edits
    from laser_core.prefix_states import prefix_reuse_applies
    from laser_core.compose import cached_composition, compose_greedy, compose_pool, composition_estimate
    from laser_core.estimate import SPLIT_WORDS

    split = chosen["split"]
    words = SPLIT_WORDS.get(split, split)
    base = cached_result(lm, splits, split)
    pool = compose_pool(docs, chosen, base) if base else None
    limit = None
    if pool and len(pool) > 1:  # a LASER sweep's pool can hold a matrix per layer: each try is a full evaluation
        cap = st.session_state.get("greedy_max")
        if cap is None or cap > len(pool) or cap == st.session_state.get("greedy_pool"):
            st.session_state["greedy_max"] = len(pool)  # "all" of another candidate's pool stays all; a cap, at most all
        st.session_state["greedy_pool"] = len(pool)
        limit = int(st.number_input("Edits to try at most", 1, len(pool), key="greedy_max", persist_state="session",
                                    help="The best alone are tried first; each try evaluates the edits together on "
                                         f"the {words} split"))
    job = session_job("combine", lm, splits)
    running = job is not None and job.status == "running"
    comp = (job.result or {}).get("composition") if job is not None and job.status == "done" else None
    source = job.id if job is not None else None
    if comp is not None and (candidate_id(comp["start"]) != candidate_id(chosen) or job.result.get("limit") != limit):
        comp = None  # found from another candidate, or with another limit
    if comp is None and base and not running:  # found before: every evaluation it made is in the cache
        found = cached_composition(lm, splits, chosen, docs, store(), base, limit=limit)
        comp, source = (found.to_dict(), ("cache", candidate_id(chosen), limit)) if found else (None, None)
    if comp is not None and st.session_state.get("greedy_applied") != source:  # once: the user may change the pick
        st.session_state["greedy_applied"] = source
        kept = {candidate_id(e) for e in comp["edits"][1:]}
        st.session_state["combine_pick"] = [label for label, d in labels.items() if candidate_id(d) in kept]
    tries = ""
    if pool is not None:  # the time from the base's evaluation of the split, and the blocks each try runs
        to_try, each, reuse = pool[:limit], base.get("seconds"), prefix_reuse_applies(lm, splits)
        about = f", {composition_estimate(lm, to_try, chosen, each, reuse)}" if to_try and each else ""
        tries = f" ({len(to_try)} to try{about})"
    if st.button(f"Find edits to add, greedily on the {words} split{tries}", key="greedy_run", disabled=running,
                 help=f"Each other matrix's best candidate that beats the base model alone on the {words} split, "
                      "best first, is applied together with this edit and those kept so far, and kept where the edits "
                      f"together score better on the {words} split (accuracy, then log-loss), as LASER composes "
                      "reductions; then the edits kept are evaluated on held-out test"):
        st.session_state["greedy_of"] = candidate_id(chosen)

        def work(j: Job) -> dict:
            base = evaluate_edits(lm, [], splits, split, store(), j.cancel)
            c = compose_greedy(lm, splits, chosen, docs, store(), base, cancel=j.cancel, progress=j.on_progress,
                               limit=limit)
            return {"base": c.base_test, "together": c.result_test, "composition": c.to_dict(), "limit": limit}
        start_job("combine", "greedy composition", lm, splits, work)
    if comp is not None:
        mark_seen("combine", lm, splits, st.session_state.get("greedy_of") == candidate_id(chosen))
        steps = comp["steps"]
        st.caption(f"Greedy on the {words} split: {len(steps)} tried, {len(comp['edits']) - 1} kept"
                   + (f", {comp['left']} more not tried (raise the limit to try them)" if comp.get("left") else "")
                   + ("" if steps else " (no other matrix's best beats the base alone there)")
                   + (" — from the cache" if isinstance(source, tuple) else "") + ".")
        if steps:
            st.dataframe([{"edit added": edit_short(lm, r), "alone": r["alone"],
                           "together": r["accuracy"], "log_loss": r["log_loss"],
                           "kept": "yes" if r["kept"] else ("no: " + r["error"] if r.get("error") else "")}
                          for r in steps], hide_index=True, key="greedy_steps")
    elif st.session_state.get("greedy_of") == candidate_id(chosen):
        live_job("combine", lm, splits)


def k_text(k: int, grouping: str | None = None) -> str:
    """'8', and the rows' grouping where it is not contiguous: '8 clustered' (a K column's value)."""
    return f"{k}" + (f" {grouping}" if grouping and grouping != CONTIGUOUS else "")


def k_label(k: int, grouping: str | None = None) -> str:
    """'K=8', or 'K=8 clustered' (see :func:`k_text`)."""
    return f"K={k_text(k, grouping)}"


def short_label(layer: int, type_: str, k: int, rho: float, grouping: str | None = None) -> str:
    """An edit as tables and captions show it: 'L2.down K=8 ρ=0.1' ('L2.down K=8 clustered ρ=0.1')."""
    return f"L{layer}.{type_} {k_label(k, grouping)} ρ={rho:g}"


def edit_short(lm, edit: dict) -> str:
    """:func:`short_label` of ``edit`` (a dict with its name, k, rho and any grouping) of a matrix of ``lm``."""
    ref = lm.ref(edit["name"])
    return short_label(ref.layer, ref.type, edit["k"], edit["rho"], edit.get("grouping"))


def edits_short(lm, edits: list) -> str:
    """Edits (``Edit`` objects) as jobs and captions name them: 'L2.down K=8 ρ=0.1 + L11.down K=4 ρ=0.25'."""
    return " + ".join(edit_short(lm, to_dict(e)) for e in edits)


def render_save_model(lm, splits, edits: list, recipe: dict) -> None:
    """Export's "Save edited model": the model with ``edits`` applied, ``recipe`` beside it, written into a folder
    (:func:`edited_folder` by default; ``saving.save_model_atomic``) while the loaded model stays unedited. Once saved,
    one click loads that folder as the session's model on Model & task, to evaluate or search it like any other."""
    from laser_core import edited
    from laser_core.saving import save_model_atomic
    default_out = str(edited_folder(lm, splits, edits))
    out = st.text_input("Folder", value=default_out, key=f"out:{default_out}")  # its own box per edit: a name kept each
    overwrite = st.checkbox("Overwrite if it exists", key="overwrite")
    if st.button("Save edited model"):
        try:
            with edited(lm, edits, blocking=False):  # restored on exit: the cached model is never left edited
                st.session_state["saved_model"] = str(save_model_atomic(lm, out, recipe, overwrite=overwrite))
        except (LaserError, OSError) as e:
            st.session_state.pop("saved_model", None)  # what the folder holds is not this save's
            st.error(f"Not saved: {e}")
    saved = st.session_state.get("saved_model")
    if not saved or Path(saved) != Path(out).expanduser().resolve() or not Path(saved, "config.json").is_file():
        return
    st.success(f"Saved to {saved} (loads with AutoModelForCausalLM.from_pretrained; `laser_recipe.json` and a model "
               "card beside it).")
    if st.button("Load the saved model here", help="Makes it the session's model, on the same device and dtype, and "
                                                   "opens Model & task: its baseline is the edited accuracy"):
        st.session_state["model_spec"] = ModelSpec(saved, lm.spec.device, lm.spec.dtype)  # as the session asked
        try:
            st.switch_page(PAGES[0][0])
        except StreamlitPageNotFoundError:  # a page run outside app.py's navigation (a page test)
            st.info("Loaded: Model & task shows it.")


def edited_folder(lm, splits, edits: list) -> Path:
    """Export's default folder for an edited model, under the cache and named by what it holds, so that saving another
    candidate does not meet the last one's folder: the task, the edit ('L2.down-K8-rho0.1', '-clustered' after K for
    clustered blocks) or, for several, their number and a digest of the set, and the weights' fingerprint."""
    if len(edits) == 1:
        e, ref = edits[0], lm.ref(edits[0].name)
        grouping = f"-{e.grouping}" if e.grouping != CONTIGUOUS else ""
        what = f"L{ref.layer}.{ref.type}-K{e.k}{grouping}-rho{e.rho:g}"
    else:
        what = f"{len(edits)}-edits-" + hashlib.sha256(" ".join(sorted(e.label for e in edits)).encode()).hexdigest()[:6]
    return cache_dir() / "edited" / f"{splits.task.name}-{what}-{lm.fingerprint[:8]}"


def candidate_label(d, with_split: bool = True) -> str:
    """An evaluated candidate (a dict or a table row) as Export's boxes and Results' compare box list it: its matrix,
    K, ρ, and accuracy on its split (``with_split``: the split named, where the box mixes them)."""
    where = f"{d['split']} " if with_split else ""
    return (f"{d['name']} {k_label(d['k'], d.get('grouping'))} ρ={d['rho']:g} ({where}acc {d['accuracy']:.3f}"
            + (", stopped early)" if d.get("stopped_early") else ")"))


def render_recipe_check(lm, splits) -> None:
    """Open a recipe file (the CLI's, a colleague's, an earlier export): its edits, whether they fit this model,
    and their held-out test accuracy on this session's task against the base model."""
    from laser_core.recipe import check_recipe_fits, load_recipe, matches_recorded, recipe_task
    up = st.file_uploader("Recipe file (JSON or YAML)", type=["json", "yaml", "yml"], key="recipe_upload")
    if up is None:
        return
    path = saved_upload(up)
    try:
        recipe = load_recipe(path)
        edits = check_recipe_fits(lm, recipe)
        made_on_task = recipe_task(recipe)
    except LaserError as e:
        st.error(f"Cannot use this recipe: {e}")
        return
    st.dataframe([{"matrix": e.name, "K": k_text(e.k, e.grouping), "ρ": e.rho} for e in edits], hide_index=True,
                 key="recipe_edits")
    task = recipe.get("task") or {}
    recorded = (recipe.get("metrics") or {}).get("edited_test")
    same_task = made_on_task == splits.spec
    st.caption((f"Made on task `{task.get('source')}`" if task else "The recipe names no task")
               + (" with this session's splits" if same_task else f"; evaluated here on `{splits.spec.source}`")
               + (f"; it recorded held-out test accuracy {recorded['accuracy']:.3f}" if recorded else "") + ".")
    st.code(f"python -m laser_core apply --recipe {up.name} --out edited-model", language="bash")
    got = results_of("recipe_test", lm, splits, {"base": (None, "test"), "recipe": (list(edits), "test")})
    if got["base"] and got["recipe"]:  # from the cache (evaluated before, here or by ``eval --recipe``), or just now
        base, res = got["base"], got["recipe"]
        render_accuracy_pair(st.columns(2), "Base (held-out test)", base, "With the recipe (held-out test)", res)
        if same_task and recorded:
            agree = matches_recorded(res["accuracy"], recorded)
            (st.success if agree else st.warning)(
                f"The recipe recorded {recorded['accuracy']:.3f} on this task's held-out test split: "
                + ("the same." if agree else "not the same (other weights, another library version or device?)"))
        return
    if st.button("Evaluate the recipe on held-out test", disabled=job_running("recipe_test", lm, splits)):
        st.session_state["recipe_test_of"] = str(path)
        start_eval_job("recipe_test", "recipe on held-out test", lm, splits,
                       [("base", None, "test"), ("recipe", list(edits), "test")])
    if st.session_state.get("recipe_test_of") == str(path):
        live_job("recipe_test", lm, splits)


def render_held_out(lm, splits, tests: dict, wanted: dict) -> None:
    """Export's held-out test of the chosen candidate: base and edited (``tests``, :func:`results_of` of ``wanted``)
    side by side where both are computed, else a button that evaluates them in the background, and its progress."""
    if all(tests.values()):
        render_accuracy_pair(st.columns(2), "Base (held-out test)", tests["base_test"], "Edited (held-out test)",
                             tests["edited_test"])
        return
    st.info(f"The held-out test accuracy of this candidate is not computed yet ({len(splits.test)} examples); "
            "the recipe carries it once it is, and `apply` then re-checks the saved model against it.")
    if st.button("Evaluate on held-out test", disabled=job_running("export_test", lm, splits)):
        start_eval_job("export_test", f"{edits_short(lm, [wanted['edited_test'][0]])} on held-out test", lm, splits,
                       [(k, *v) for k, v in wanted.items()])  # named: another candidate picked meanwhile shows it
    job = session_job("export_test", lm, splits)
    if job is not None and job.status != "done":  # once done, the page reruns and reads the result
        live_job("export_test", lm, splits)


def render_other_tasks(lm, splits, edits: list, key: str = "", recipe_file: str = "laser_recipe.json") -> list[dict]:
    """What ``edits`` (applied together) do beyond this session's task: the base model and the edited one on the
    held-out test split of every other bundled task (``laser_core.other_tasks``), paired. Results in the cache show
    at once; the rest are evaluated in a background job on request (and cached under those tasks), one such job at a
    time: another set of edits' running job is named, and this one's can start when it ends. ``key`` tells the
    widgets of two such views on one page apart; ``recipe_file`` is the download the CLI command names. Returns those
    measured, as a recipe's ``metrics.other_tasks`` holds them."""
    import shlex

    from laser_core.cli_args import spec_args
    from laser_core.other_tasks import effects_metrics, effects_table, other_task_effects, other_task_specs
    others, left_out = [], []
    for spec in other_task_specs(splits.spec):  # with the session's sizes, a smaller task may not split
        try:
            others.append(_cached_splits(canonical_json(spec), _path_stamp(spec.source))[0])
        except LaserError as e:
            left_out.append(f"{spec.source} ({e})")
    if left_out:
        st.caption("Left out, as they cannot be split with this session's sizes: " + "; ".join(left_out))
    if not others:
        return []
    rows = other_task_effects(lm, edits, others, store(), compute=False)
    job, asked = session_job("other_tasks", lm, splits), evaluation_id({"edits": [to_dict(e) for e in edits]})
    if job is not None and job.status == "done" and st.session_state.get("other_tasks_of") == asked:
        mine = {r["task"]: r for r in job.result}  # where the cache has none (switched off or unwritable)
        rows = [r if r["change"] is not None or r.get("error") else mine.get(r["task"], r) for r in rows]
    df = pd.DataFrame(effects_table(rows))
    accuracy = st.column_config.NumberColumn(format="%.3f")
    noise = st.column_config.TextColumn(help="yes: p < 0.05, and still so read with the other tasks (Holm's "
                                             "correction); alone only: p < 0.05 for this task looked at alone")
    st.dataframe(df if df["note"].any() else df.drop(columns="note"), hide_index=True, width="stretch",
                 key=f"other_tasks_rows{key}", column_config={**CHANGE_COLUMNS, "base": accuracy,
                                                              "edited": accuracy, "beyond_noise": noise})
    st.caption("The same from the command line, with the recipe downloaded below: `" + shlex.join(
        ["python", "-m", "laser_core", "eval", "--recipe", recipe_file, *spec_args(lm.spec, splits.spec),
         "--other-tasks"]) + "`")
    left = [r["task"] for r in rows if r["change"] is None and not r.get("error")]
    if not left:
        mark_seen("other_tasks", lm, splits, st.session_state.get("other_tasks_of") == asked)
        st.caption("Each other task's held-out questions, as a session on that task with these split sizes and seed "
                   "has them. An edit chosen on one task can cost others: a loss here is the price of the gain. The "
                   "recipe and a saved model's card carry these results.")
        return effects_metrics(rows)
    st.caption(f"Not evaluated yet: {', '.join(left)} (base and edited, each on its held-out test split; cached, so "
               "the base runs once per task).")
    running = job is not None and job.status == "running"
    if st.button("Evaluate on the other tasks", disabled=running, key=f"other_tasks_go{key}"):
        st.session_state["other_tasks_of"] = asked
        start_job("other_tasks", f"{edits_short(lm, edits)} on the other tasks", lm, splits,
                  lambda j: other_task_effects(lm, list(edits), others, store(), cancel=j.cancel, progress=j.on_progress))
    if job is not None and st.session_state.get("other_tasks_of") == asked:  # (start_job reruns the page: no new
        live_job("other_tasks", lm, splits)  # job can be here that ``job`` above does not name)
    elif running:  # another set of edits': named, and polled to free the button
        live_job("other_tasks", lm, splits, show=lambda j: j is not None and j.status == "running" and st.caption(
            f"Running: {j.label}. This check can start when it ends."))
    return effects_metrics(rows)  # those measured so far (a task whose base alone is cached has no change yet)


def shortfall(doc: dict, base: dict | None) -> str | None:
    """Where the candidate result ``doc`` does not beat the base model's ``base`` on their split (accuracy, then
    log-loss, as a search ranks them), by how much, in words: "accuracy 0.160 against the base model's 0.200"; else
    None. Explore and Export warn with it: before, Explore headed such a result "Best candidate" with nothing but red
    deltas, and Export offered its recipe without a word (the CLI said "does not beat the base model")."""
    from laser_core.candidates import better
    if base is None or better(doc, base):
        return None
    text = f"accuracy {doc['accuracy']:.3f} against the base model's {base['accuracy']:.3f}"
    if doc["accuracy"] == base["accuracy"]:
        text += f", log-loss {doc['log_loss']:.4f} against {base['log_loss']:.4f}"
    return text


def render_accuracy_pair(cols, label_a: str, a: dict, label_b: str, b: dict, held_out: bool = True,
                         base_first: bool = True) -> None:
    """Two evaluations' accuracies in ``cols[0]`` and ``cols[1]``, the second with its change from the first; each
    metric's help gives its log-loss (the search's tie-breaker). For two ``held_out`` evaluations, a caption below
    says whether the change is more than noise, from the questions each got right (``laser_core.significance``):
    on the split a search chose on, its best looks better than it is, and no test of the change is fair. Where the
    first is the base model (``base_first``) and the edit's change is a real loss, a warning says so: a gain on the
    split an edit was chosen on does not carry to questions it never saw."""
    cols[0].metric(label_a, f"{a['accuracy']:.3f}", help=f"log-loss {a['log_loss']:.4f}")
    cols[1].metric(label_b, f"{b['accuracy']:.3f}", f"{b['accuracy'] - a['accuracy']:+.3f}",
                   help=f"log-loss {b['log_loss']:.4f}")
    change = change_between(a, b) if held_out else None
    if change is not None:
        st.caption(f"Change on the same held-out questions: {change.summary()}. A change is called real when the "
                   "McNemar test gives p < 0.05; the interval is Newcombe's for paired accuracies.")
        if base_first and change.significant and change.change < 0:
            st.warning(f"On held-out test this is a real loss ({change.broken} questions broken, {change.fixed} "
                       "fixed): applied, it makes the model worse on questions the search never saw. Keep the base "
                       "model, or choose another edit.")


CHANGE_COLUMNS = {  # how Results shows the columns that candidates_frame adds on held-out test
    "vs_base": st.column_config.NumberColumn(
        format="%+.3f", help="Held-out accuracy minus the base model's, on the same questions"),
    "ci95": st.column_config.TextColumn(width="medium",  # '-0.287 to -0.111' whole, beside eight other columns
                                        help="95% interval of that change (Newcombe, for paired accuracies)"),
    "p": st.column_config.NumberColumn(  # two significant digits: 1.7e-24, not 0.0000000000000000000000017
        format="%.2g", help="McNemar mid-p: how likely answers flip at least this unevenly if the edit changed "
                            "nothing"),
    "beyond_noise": st.column_config.TextColumn(help="yes: p < 0.05, a change that chance explains badly"),
}


CANDIDATE_COLUMNS = {  # how tables of candidates (candidates_frame, combinations_frame) name and explain their columns
    "k": st.column_config.NumberColumn("K", help="Row blocks: the matrix's rows split into K, each reduced alone"),
    "rho": st.column_config.NumberColumn("ρ", help="Fraction of each row block's rank kept"),
    "accuracy": st.column_config.NumberColumn(format="%.3f"),  # 0.600, not 0.6 above 0.59
    "log_loss": st.column_config.NumberColumn("log-loss", format="%.4f"),
    "ranks": st.column_config.TextColumn(help="The rank kept in each row block"),
    "params_kept": st.column_config.NumberColumn("params kept", help=(
        "Parameters of the reduced matrix in factored form: each block's rank × (its rows + the matrix's columns)")),
    "params_full": st.column_config.NumberColumn("params (full)", help="Parameters of the matrix as it is"),
    "predicted_gain": st.column_config.NumberColumn("predicted gain", format="%+.4f", help=(
        "The first-order predicted decrease of the calibration log-loss, from the scores' gradient")),
    "same_as_rho": st.column_config.TextColumn("same as ρ", help=(
        "Not run: its block ranks are those of this ρ, whose result it takes")),
    "cached": st.column_config.CheckboxColumn(help="Read from the cache: evaluated by an earlier run"),
    "n_edits": st.column_config.NumberColumn("edits together"),
    **CHANGE_COLUMNS,
}


def family_caption(df: pd.DataFrame) -> str | None:
    """Under Results' held-out table (a ``candidates_frame`` with ``p``) of two rows or more: each p is for its edit
    alone, and which of them stay beyond noise read together (``significance.holm``)."""
    rows = df[df["p"].notna()] if "p" in df.columns else df.iloc[:0]
    if len(rows) < 2:
        return None
    return ("Each p is for its edit looked at alone, as a search's best is tested; picking among these rows by their "
            "held-out results picks on the test split. " + family_summary(
                [(short_label(r.layer, r.type, r.k, r.rho, getattr(r, "grouping", None)), r.p)
                 for r in rows.itertuples()]))


def _with_changes(df: pd.DataFrame, rows: list[dict], base: dict | None) -> pd.DataFrame:
    """``df`` (a row per evaluation in ``rows``) with, after its log_loss, each row's paired change from the
    ``base`` model on the same held-out questions: ``vs_base``, its 95% interval, McNemar ``p``, ``beyond_noise``."""
    return _insert_changes(df, [change_between(base, r) for r in rows] if base else [])


def _insert_changes(df: pd.DataFrame, changes: list) -> pd.DataFrame:
    """``df`` with paired changes (``PairedChange`` or None per row) as the columns of :data:`CHANGE_COLUMNS` after
    its ``log_loss``; as it is where no row has one."""
    if any(changes):
        at = df.columns.get_loc("log_loss") + 1
        for i, (col, values) in enumerate({
                "vs_base": [c.change if c else None for c in changes],
                "ci95": [f"{c.low:+.3f} to {c.high:+.3f}" if c else "" for c in changes],
                "p": [c.p_value if c else None for c in changes],
                "beyond_noise": ["yes" if c and c.significant else "" for c in changes]}.items()):
            df.insert(at + i, col, values)
    return df


def k_column(df: pd.DataFrame) -> list[str]:
    """Each row's K as :func:`k_text` gives it (with its rows' grouping where not contiguous), for a chart's legend."""
    groupings = df["grouping"] if "grouping" in df.columns else [None] * len(df)
    return [k_text(k, g) for k, g in zip(df["k"], groupings)]


def candidates_frame(rows: list[dict], base: dict | None = None) -> pd.DataFrame:
    """Candidates' evaluations as a table. With the ``base`` model's evaluation of the same held-out questions,
    each row also gets its paired change from it: ``vs_base``, its 95% interval and McNemar ``p``, and
    ``beyond_noise`` (see ``laser_core.significance``); pass it for held-out test only."""
    cols = ["layer", "type", "k", "grouping", "rho", "accuracy", "log_loss", "split", "ranks", "params_kept",
            "params_full", "predicted_gain", "same_as_rho", "cached", "name"]
    df = _with_changes(pd.DataFrame([{c: r.get(c) for c in cols} for r in rows]), rows, base)
    df = df[[c for c in df.columns if c in ("layer", "name") or df[c].notna().any()]]  # drop per-run columns not known here
    if "grouping" in df.columns:  # some rows' blocks are clustered: say the others' are contiguous
        df["grouping"] = df["grouping"].fillna(CONTIGUOUS)
    if any(r.get("stopped_early") for r in rows):  # their accuracy counts only the examples seen before the stop
        df.insert(df.columns.get_loc("accuracy") + 1, "stopped_early",
                  ["yes" if r.get("stopped_early") else "" for r in rows])
    if not df.empty:
        df["ranks"] = df["ranks"].astype(str)
    if "same_as_rho" in df.columns:  # text, blank on the rows that ran (a float column shows them as a grey None)
        df["same_as_rho"] = df["same_as_rho"].map(lambda v: "" if pd.isna(v) else f"{v:g}")
    return df


def combinations_frame(lm, rows: list[dict], base: dict | None = None) -> pd.DataFrame:
    """Evaluations of several edits applied together (``candidates.cached_combinations``) as a table, best first: the
    edits in short, accuracy, log-loss and, with the ``base`` on the same held-out questions, the paired change
    (as :func:`candidates_frame`)."""
    rows = sorted(rows, key=merit, reverse=True)
    df = pd.DataFrame([{"edits": " + ".join(edit_short(lm, e)
                                            for e in sorted(r["edits"], key=lambda e: lm.ref(e["name"]).layer)),
                        "n_edits": len(r["edits"]), "accuracy": r["accuracy"], "log_loss": r["log_loss"],
                        "split": r["split"]} for r in rows])
    return _with_changes(df, rows, base)


def _layer_type_grid(cells: list[dict], value: str) -> tuple[list, list, list, list]:
    """(layers, types, z, names): ``cells`` (dicts with layer, type, name and ``value``) laid out layers x types."""
    types = sorted({r["type"] for r in cells}, key=lambda t: (TYPE_ORDER + [t]).index(t))
    layers = sorted({r["layer"] for r in cells})
    z = [[None] * len(types) for _ in layers]
    names = [[""] * len(types) for _ in layers]
    for r in cells:
        z[layers.index(r["layer"])][types.index(r["type"])] = r[value]
        names[layers.index(r["layer"])][types.index(r["type"])] = r["name"]
    return layers, types, z, names


def _layer_type_layout(fig: go.Figure, layers: list, types: list) -> go.Figure:
    fig.update_layout(height=max(350, 18 * len(layers)), yaxis_title="layer", xaxis_title="matrix type",
                      margin={"t": 30, "b": 40},  # explicit ranges: markers on the cells would pad the autorange
                      xaxis={"range": [-0.5, len(types) - 0.5]},
                      yaxis={"range": [layers[-1] + 0.5, layers[0] - 0.5], "dtick": 1 if len(layers) <= 40 else 2})
    return fig


def score_heatmap(table: list[dict], selected: str | None = None) -> go.Figure:
    """Layers x matrix types coloured by score: diverging, centred at 0, values on hover."""
    layers, types, z, names = _layer_type_grid(table, "score")
    fig = go.Figure(go.Heatmap(z=z, x=types, y=layers, colorscale="RdBu_r", zmid=0, customdata=names,
                               hovertemplate="layer %{y} · %{x}<br>score %{z:.4g}<br>%{customdata}<extra></extra>",
                               colorbar={"title": "score"}))
    # Streamlit returns no selection for heatmap clicks (streamlit#8760): a transparent marker on every
    # cell carries the click instead.
    fig.add_trace(go.Scatter(x=[r["type"] for r in table], y=[r["layer"] for r in table], mode="markers",
                             customdata=[r["name"] for r in table], text=[f"{r['score']:.4g}" for r in table],
                             marker={"size": 14, "opacity": 0.0, "symbol": "square"}, showlegend=False,
                             hovertemplate="layer %{y} · %{x}<br>score %{text}<br>%{customdata}<extra></extra>"))
    if selected:
        for r in table:
            if r["name"] == selected:
                fig.add_trace(go.Scatter(x=[r["type"]], y=[r["layer"]], mode="markers", hoverinfo="skip",
                                         marker={"symbol": "square-open", "size": 18, "color": "black", "line": {"width": 3}},
                                         showlegend=False))
    return _layer_type_layout(fig, layers, types)


def accuracy_heatmap(lm, rows: list[dict], base_accuracy: float | None) -> go.Figure:
    """Every matrix of ``lm``, layers x types, coloured by its best accuracy among ``rows`` minus the base model's
    (green: better; blank: not evaluated), with that candidate's K and ρ on hover: LASER's layer-by-layer view."""
    best = {r["name"]: r for r in best_by_matrix(rows)}
    base = base_accuracy or 0.0
    cells = [{"layer": m.layer, "type": m.type, "name": m.name,
              "gain": best[m.name]["accuracy"] - base if m.name in best else None} for m in lm.matrices]
    layers, types, z, _ = _layer_type_grid(cells, "gain")
    hover = [[""] * len(types) for _ in layers]
    for r in best.values():
        hover[layers.index(r["layer"])][types.index(r["type"])] = \
            f"accuracy {r['accuracy']:.3f} at {k_label(r['k'], r.get('grouping'))}, ρ={r['rho']:g}<br>{r['name']}"
    label = "accuracy − base" if base_accuracy is not None else "accuracy"
    # Against the base: a symmetric scale of at least ±5 points, so that a gain of an example or two stays pale
    span = max([0.05] + [abs(v) for line in z for v in line if v is not None]) if base_accuracy is not None else None
    fig = go.Figure(go.Heatmap(z=z, x=types, y=layers, colorscale="RdYlGn", zmid=0 if span else None,
                               zmin=-span if span else None, zmax=span, customdata=hover, colorbar={"title": label},
                               hoverongaps=False,
                               hovertemplate=f"layer %{{y}} · %{{x}}<br>{label} %{{z:+.3f}}<br>%{{customdata}}<extra></extra>"))
    return _layer_type_layout(fig, layers, types)


def type_colors(lm) -> dict:
    """``color_discrete_map`` and ``category_orders`` for a chart coloured by matrix type: each of ``lm``'s types one
    colour, in the model's order (the heatmaps' columns), whatever types a chart's points happen to hold. Plotly
    otherwise colours by order of appearance, so that one type had one colour on the Pareto chart and another on
    the score chart of the same page."""
    types = list(dict.fromkeys(r.type for r in lm.matrices))
    palette = px.colors.qualitative.Plotly
    return {"color_discrete_map": {t: palette[i % len(palette)] for i, t in enumerate(types)},
            "category_orders": {"type": types}}


def pareto_figure(lm, df: pd.DataFrame, base_accuracy: float | None = None) -> go.Figure:
    """Candidates (a ``candidates_frame``) by the share of ``lm``'s parameters kept and accuracy, with the base model
    (all parameters kept, ``base_accuracy``) as a star, and the front of those that nothing smaller beats: the base
    counts, a candidate stopped early does not (its accuracy counts only the examples it saw), and each point of
    the front is ringed, so that a front of one point shows."""
    total = sum(p.numel() for p in lm.model.parameters())
    df = df.assign(**{"params_kept_%": 100 * (total - df["params_full"] + df["params_kept"].clip(upper=df["params_full"]))
                      / total})
    stopped = df["stopped_early"] == "yes" if "stopped_early" in df.columns else pd.Series(False, index=df.index)
    ran = df[~stopped]
    fig = px.scatter(ran, x="params_kept_%", y="accuracy", color="type", **type_colors(lm),
                     hover_data=["layer", "k", *(["grouping"] if "grouping" in ran.columns else []), "rho"],
                     title="Accuracy vs parameters kept (Pareto front)",
                     labels={"params_kept_%": "parameters kept (% of the model)"})
    if stopped.any():
        fig.add_scatter(x=df[stopped]["params_kept_%"], y=df[stopped]["accuracy"], mode="markers",
                        name="stopped early (of the examples seen)", marker={"color": "grey", "symbol": "x-thin-open"})
    points = list(zip(ran["params_kept_%"], ran["accuracy"]))
    if base_accuracy is not None:
        points.append((100.0, base_accuracy))
        fig.add_scatter(x=[100.0], y=[base_accuracy], mode="markers", name="base model",
                        marker={"color": "black", "symbol": "star", "size": 12})
    front, best_acc = [], float("-inf")
    for x, y in sorted(points, key=lambda p: (p[0], -p[1])):  # smallest first; of equal size, the best first
        if y > best_acc:
            front.append((x, y))
            best_acc = y
    if front:
        fig.add_scatter(x=[x for x, _ in front], y=[y for _, y in front], mode="lines+markers", name="Pareto front",
                        line={"color": "black", "dash": "dash"},
                        marker={"color": "black", "symbol": "circle-open", "size": 13})
    return fig


def apply_pending_matrix(names: list[str]) -> None:
    """Layer scores: a table row, a heatmap cell and the select box all choose the matrix; a choice made in the
    table or on the heatmap (``pending_matrix``) is applied to the select box (``matrix_pick``) before it is drawn
    on the next run. A pick that is not among ``names`` falls back to the first."""
    pending = st.session_state.pop("pending_matrix", None)
    if pending in names:
        st.session_state["matrix_pick"] = pending
    if st.session_state.get("matrix_pick") not in names:
        st.session_state["matrix_pick"] = names[0]


def scores_frame(table: list[dict]) -> pd.DataFrame:
    """Every matrix of a ``score_table`` by rank (1 = best), the skipped (NaN/inf) ones last."""
    by_rank = sorted(table, key=lambda r: (r["rank"] is None, r["rank"]))
    return pd.DataFrame([{"rank": None if r["rank"] is None else r["rank"] + 1, "layer": r["layer"], "type": r["type"],
                          "rows × cols": "×".join(map(str, r["shape"])), "score": r["score"], "name": r["name"]}
                         for r in by_rank])


def candidate_id(doc: dict | None) -> tuple:
    """The edit a cached evaluation or report row is of: (matrix name, K, rho, row grouping); all None for the base."""
    return (doc["name"], doc["k"], doc["rho"], doc.get("grouping") or CONTIGUOUS) if doc else (None,) * 4


def search_that_found(lm, splits, doc: dict, shown: dict | None) -> dict | None:
    """A search report (``SearchReport.to_dict()``) whose candidates on its split include the evaluation ``doc``:
    ``shown`` (the one on Explore) where it does, else a complete one in the cache for this model and these splits,
    one whose best it is first; None where no search in the cache tried it (One candidate's)."""
    ident = candidate_id(doc)

    def tried(r: dict | None) -> bool:
        return bool(r) and r.get("search_split") == doc["split"] and any(
            candidate_id(c) == ident for c in r.get("candidates", ()))
    if tried(shown):
        return shown
    found = [r for r in cached_searches(lm, splits) if tried(r)]
    return max(found, key=lambda r: candidate_id(r.get("best")) == ident, default=None)


def cached_searches(lm, splits) -> list[dict]:
    """Every complete search in the cache for this model and these splits (``searches.cached_reports``)."""
    from laser_core.searches import cached_reports
    return cached_reports(store(), lm, splits)


def searches_frame(lm, rows: list[dict]) -> pd.DataFrame:
    """Searches side by side (``searches.search_rows``), numbered from 1, the best edit as :func:`edit_short` and its
    paired change from the base as :func:`candidates_frame`'s columns; the "less than LASER" column only where a C2I
    search is compared with a sweep (``searches.beside_laser``), the "less than full LASER" one only where a full
    sweep could be estimated, the gradient + SVD column only with a C2I search."""
    from laser_core.searches import beside_laser
    df = pd.DataFrame([{"#": i + 1, **{k: v for k, v in r.items() if k not in ("change", "config")},
                        "best": edit_short(lm, r["best"]) if r["best"] else ""} for i, r in enumerate(rows)])
    df = _insert_changes(df, [r["change"] for r in rows])
    gone = ["less_than_laser"] * (not beside_laser(rows)) + ["spectra_s"] * all(r["method"] != "C2I" for r in rows) \
        + ["less_than_full_laser"] * all(r["less_than_full_laser"] is None for r in rows)
    return df.drop(columns=gone)


def render_searches(lm, splits) -> None:
    """Results' table of every search in the cache for this model and task (:func:`searches_frame`): C2I searches
    and LASER sweeps side by side, their time and their best on held-out test."""
    from laser_core.searches import beside_laser_text, full_sweep_of, full_sweep_text, search_rows
    if forgot := st.session_state.pop("_forgot", None):  # set by render_open_search's Forget
        label, why = forgot
        st.toast(f"Search {label} was not deleted: {why}" if why else
                 f"Forgot search {label}: its candidates' results stay in the cache")
    reports = cached_searches(lm, splits)
    if not reports:
        return
    rows = search_rows(reports, full := full_sweep_of(lm, splits, store()))
    st.subheader("Searches in the cache")
    number = st.column_config.NumberColumn
    st.dataframe(searches_frame(lm, rows), hide_index=True, width="stretch", key="searches", column_config={
        **CHANGE_COLUMNS, "time_s": number("time (s)", format="%.1f", help=(
            "What the search takes from scratch, as its parts took when they ran (a candidate or a gradient from the "
            "cache: when it was computed): its candidates' evaluations and, for C2I, the gradient step and SVDs "
            "behind its scores")),
        "spectra_s": number("of which gradient + SVD (s)", format="%.1f", help=(
            "C2I: the gradient step and SVDs its scores came from. None: not recorded (computed by a version before "
            "these were kept), so the time is its candidates' alone")),
        "less_than_laser": number("× less than LASER", format="%.1f×", help=(
            "The time of the largest LASER sweep here (named below the table) divided by this search's (each on its "
            "own split: LASER on validation, C2I on calibration)")),
        "less_than_full_laser": number("× less than full LASER (est.)", format="%.1f×", help=(
            "The time LASER's sweep of every matrix over this search's ρ grid would take here, estimated from the "
            "cache's timings (as Explore estimates a run), divided by this search's")),
        "best_on_split": number("best on its split", format="%.3f",
                                help="The best candidate's accuracy on the split it was chosen on"),
        "accuracy": number("held-out", format="%.3f", help="The best candidate's accuracy on held-out test"),
        "log_loss": number("held-out log-loss", format="%.4f"),
    })
    st.caption("Each search's best edit on held-out test, paired with the base model on the same questions. A "
               "search of other settings on this model and task is listed once it has run (Explore, or the CLI's "
               "search and laser)." + (f" × less than LASER: {beside}." if (beside := beside_laser_text(rows)) else "")
               + (f" × less than full LASER (est.): {text}." if (text := full_sweep_text(rows, full)) else ""))
    render_open_search(lm, splits, reports, rows)


def explore_settings(cfg: dict, types: list[str]) -> dict:
    """The Explore widgets' values (session-state keys) that make its search the search ``cfg`` (a report's
    ``config``): method, grids, score and early stop; a LASER sweep's layer range and matrix types (``types``: the
    model's, for a sweep of all). Speed-only settings stay as the user left them: they change no result."""
    out = {"rhos": sorted(cfg["rhos"], reverse=True), "early": bool(cfg.get("early_stop"))}
    if cfg["method"] == "c2i":
        return {**out, "method": "C2I (gradient-selected)", "q": cfg["q"], "ks": sorted(cfg["ks"]),
                "score": cfg["score"], "tail": cfg["tail_fraction"], "grouping": cfg.get("grouping") or CONTIGUOUS}
    layers = cfg.get("layers")
    return {**out, "method": "LASER sweep (brute force)", "types": list(cfg.get("types") or types),
            **({"laser_layers": (min(layers), max(layers))} if layers else {"laser_layers": ()})}


def render_open_search(lm, splits, reports: list[dict], rows: list[dict]) -> None:
    """Pick one of Results' searches (``rows``: ``searches.search_rows`` of ``reports``, numbered as in its table) and
    open it on Explore, its settings set there and its report shown (from the cache: nothing runs), to look at it
    whole or re-run it with one setting changed; or forget it (``searches.forget``: off the table, its candidates'
    results kept), e.g. a trial run whose row only crowds the table."""
    labels = {f"{i + 1}. {r['method']} · {r['settings']}": r["config"] for i, r in enumerate(rows)}
    c1, c2, c3 = st.columns([4, 1, 1], vertical_alignment="bottom")
    pick = c1.selectbox("Open a search on Explore, or forget it", list(labels), index=None, key="open_search",
                        placeholder="Choose a search (numbered as in the table)",
                        help="Open on Explore: Explore's settings are set to its grid and its report is shown, from "
                             "the cache. Forget this search: it leaves this table (its report is deleted from the "
                             "cache); its candidates' results stay, so running it again lists it again in seconds")

    def open_it() -> None:  # a callback: it runs before the rerun, before this page makes the widgets it sets
        cfg = labels[st.session_state["open_search"]]
        st.session_state.pop("layer_range", None)  # the range slider takes "laser_layers" where it has no value
        st.session_state.update(explore_settings(cfg, sorted({r.type for r in lm.matrices})))
        keep_report(next(r for r in reports if r["config"] == cfg))
        st.session_state["_open_explore"] = True

    def forget_it() -> None:
        from laser_core.searches import forget
        label = st.session_state["open_search"]
        st.session_state["_forgot"] = (label, forget(store(), lm, splits, labels[label]))
        st.session_state["open_search"] = None

    c2.button("Open on Explore", key="open_search_go", disabled=pick is None, on_click=open_it)
    c3.button("Forget this search", key="forget_search", disabled=pick is None, on_click=forget_it)
    if st.session_state.pop("_open_explore", False):
        st.switch_page("pages/3_Explore.py")


def export_options(docs: list[dict], report: dict | None) -> tuple[list[dict], int]:
    """The candidates Export offers (one per edit: calibration results first, best first) and the index of the one
    to preselect: the best of the ``report`` shown on Explore, where it is among them."""
    seen, options = set(), []
    for d in sorted(docs, key=lambda d: (d["split"] != "calib", -d["accuracy"], d["log_loss"])):
        if candidate_id(d) not in seen:
            seen.add(candidate_id(d))
            options.append(d)
    best = (report or {}).get("best")
    return options, next((i for i, d in enumerate(options) if best and candidate_id(d) == candidate_id(best)), 0)


def export_pick(options: list[dict], default: int, report: dict | None) -> int:
    """Export's Candidate box on arriving: the candidate picked when the page was last left (:func:`keep_export_pick`),
    where Explore still shows the search it showed then; else ``default`` (that search's best). Before, the box went
    back to the best on every visit, and a candidate picked, then checked on Results, had to be found again."""
    kept = st.session_state.get("_export_kept")
    if kept and kept[0] == candidate_id((report or {}).get("best")):
        return next((i for i, d in enumerate(options) if candidate_id(d) == kept[1]), default)
    return default


def keep_export_pick(report: dict | None, doc: dict) -> None:
    """Remember Export's pick ``doc`` with the search Explore shows (``report``) for :func:`export_pick`."""
    st.session_state["_export_kept"] = (candidate_id((report or {}).get("best")), candidate_id(doc))


def render_model_facts(lm, splits) -> None:
    """The loaded model's facts (architecture, size, device) as metrics, and the task's splits in a caption."""
    facts = lm.facts()
    st.subheader("Model facts")
    f = st.columns(6)
    f[0].metric("Architecture", facts["model_type"], help=f"{facts['architecture']} (transformers)")  # fits its column
    f[1].metric("Layers", facts["layers"])
    f[2].metric("Matrices", facts["matrices"])
    n_params = facts["parameters"]
    f[3].metric("Parameters", f"{n_params / 1e6:.1f} M" if n_params >= 1e5 else f"{n_params:,}")
    free = device_memory(lm.device)  # a GPU's, now: what a search's cached states, stacks and batches can use
    f[4].metric("Device", facts["device"], help=f"The weights take {human_bytes(facts['weights_bytes'])}" + (
        f"; {human_bytes(free[0])} of the device's {human_bytes(free[1])} are free now (for a search's cached states, "
        "candidates run together and batches: see Explore's Speed settings)" if free else "") + ".")
    f[5].metric("dtype", facts["dtype"])
    st.caption(f"Matrix types: {', '.join(facts['matrix_types'])} · fingerprint `{facts['fingerprint']}` · "
               f"task `{splits.task.name}` ({splits.task.kind}, {len(splits.task)} examples): calibration "
               f"{len(splits.calib)}, validation {len(splits.val)}, held-out test {len(splits.test)}, seed {splits.spec.seed}"
               + (f", {splits.spec.shots}-shot (the solved examples are kept out of every split)" if splits.spec.shots
                  else ""))


def render_search_report(report: dict, lm) -> None:
    """A finished (or cancelled) search's report (``SearchReport.to_dict()``): its best candidate against the base
    on the searched split and on held-out test, where its time went (the CLI's ``time:`` line; before, the dashboard
    never said how long a search took), the heatmap of every matrix's best, all candidates, and what was left out;
    or, where no candidate finished, why."""
    from laser_core.saving import json_text
    from laser_core.search import time_summary
    if not report.get("best"):
        if report.get("status") == "complete" and report.get("skipped"):
            st.warning("No candidate of this search finished: each was left out (below).")
            render_skipped(report)
        return
    b = report["best"]
    st.subheader(f"Best candidate · {'C2I search' if report['method'] == 'c2i' else 'LASER sweep'}"
                 + (" (cancelled: of the candidates it finished)" if report.get("status") == "partial" else ""))
    m = st.columns(4)
    split = report["search_split"]
    render_accuracy_pair(m[:2], f"Base ({split})", report["base"], f"Best ({split})", b, held_out=False)
    if short := shortfall(b, report["base"]):
        from laser_core.estimate import SPLIT_WORDS
        words, done = SPLIT_WORDS.get(split, split), len(report["candidates"])
        who = "The one candidate this search finished before its cancel does not beat" if done == 1 else \
            f"None of the {done} candidates this search finished before its cancel beats"
        st.warning(f"{who} the base model on the {words} split (the best: {short}). Run it again to try the rest: "
                   "those finished come from the cache." if report.get("status") == "partial" else
                   f"No candidate of this search beats the base model on the {words} split (the best: {short}). Keep "
                   "the base model, or search wider: a larger q, other K or ρ, or a LASER sweep.")
    if report.get("best_test"):
        render_accuracy_pair(m[2:], "Base (held-out test)", report["base_test"], "Best (held-out test)",
                             report["best_test"])
    st.write(f"`{b['name']}` — layer {b['layer']}, {b['type']}, {k_label(b['k'], b.get('grouping'))}, ρ={b['rho']:g}, "
             f"ranks {b['ranks']}")
    if report.get("timings"):  # the run that made the report (shown from the cache: an earlier one, maybe the CLI's)
        st.caption(f"Last run: {time_summary(report, 'ρ')}.")
    st.plotly_chart(accuracy_heatmap(lm, report["candidates"], report["base"]["accuracy"]), key="best_map")
    with st.expander(f"All {len(report['candidates'])} candidates of this search"):
        st.dataframe(candidates_frame(report["candidates"]), hide_index=True, width="stretch", key="report_rows",
                     column_config=CANDIDATE_COLUMNS)
        st.download_button("Download the search's report (JSON)", json_text(report),
                           file_name=f"laser_search_{report['method']}.json", mime="application/json",
                           key="report_download", help="Its settings, the base, every candidate, the best, the "
                                                       "held-out test and the timings, as the CLI's --report-out")
    render_skipped(report)
    if report.get("status") == "complete":
        next_page(_EXPORT, "the best candidate's recipe, its check on other tasks, and edits to add to it")
        st.caption("Edits of several matrices may do more together: on Export, \"Combine with edits of other "
                   "matrices\" finds which to add to this one, greedily on this search's split (from the CLI: "
                   "`--compose`). What this edit does to the other bundled tasks: Export, \"On the other bundled "
                   "tasks\" (from the CLI: `eval --recipe … --other-tasks`).")


def render_compare_two(lm, splits, df: pd.DataFrame) -> None:
    """Results: any two of the candidates in ``df`` (or the base) evaluated on held-out test in the background, then
    compared question by question (:func:`render_comparison`)."""
    st.subheader("Compare two on held-out test")
    labels = ["base"] + [candidate_label(r, with_split=False) for _, r in df.iterrows()]
    pick = st.columns(2)
    a = pick[0].selectbox("A", labels, index=0, key="cmp_a", persist_state="session")
    b = pick[1].selectbox("B", labels, index=min(1, len(labels) - 1), key="cmp_b", persist_state="session")

    def edit_of(label: str):
        return None if label == "base" else doc_edit(df.iloc[labels.index(label) - 1])

    if st.button("Compare on held-out test", type="primary", disabled=job_running("compare", lm, splits)):
        start_eval_job("compare", "compare on test", lm, splits, [("A", edit_of(a), "test"), ("B", edit_of(b), "test")])
    live_job("compare", lm, splits, lambda job: render_comparison(job, splits))


def render_comparison(job, splits) -> None:
    """A Results comparison job's two held-out evaluations ("A", "B"): their accuracies, whether the change is
    beyond noise, and the examples whose prediction flipped."""
    render_job(job)
    if job is None or job.status != "done":
        return
    ra, rb = job.result["A"], job.result["B"]
    render_accuracy_pair(st.columns(2), "A accuracy (test)", ra, "B accuracy (test)", rb,
                         base_first=ra.get("name") is None)  # A the base: a real loss of B is the edit's
    flips = []
    for i, e in enumerate(splits.examples("test")):
        if ra["correct"][i] != rb["correct"][i]:
            show = (lambda p: e.choices[p].strip() if e.choices else p)
            gold = e.choices[e.answer].strip() if e.choices else " | ".join(t.strip() for t in e.targets)  # every accepted
            flips.append({"prompt": e.prompt[-200:], "gold": gold,
                          "A": show(ra["predictions"][i]), "B": show(rb["predictions"][i]),
                          "now": "fixed" if rb["correct"][i] else "broken"})
    if flips:  # how many each way: the caption above says
        st.write(f"The {len(flips)} examples whose answer flipped from A to B:")
        st.dataframe(flips, hide_index=True, width="stretch")
    else:
        st.write("No example's answer flipped from A to B.")


def gradient_profile(S, g, tail_fraction: float, name: str) -> go.Figure:
    """g_i against i (sigma_i on a second axis), the trailing part shaded."""
    n = len(g)
    start = int((1 - tail_fraction) * n + 1e-9)
    fig = go.Figure()
    fig.add_trace(go.Bar(x=list(range(n)), y=[float(x) for x in g], name="g_i = dL/dσ_i",
                         marker_color=["#c0392b" if float(x) > 0 else "#2e86c1" for x in g]))
    fig.add_trace(go.Scatter(x=list(range(n)), y=[float(x) for x in S], name="σ_i", yaxis="y2",
                             line={"color": "gray"}))
    fig.add_vrect(x0=start - 0.5, x1=n - 0.5, fillcolor="orange", opacity=0.12, line_width=0,
                  annotation_text="trailing part (scored)", annotation_position="top left")
    fig.update_layout(title=name, xaxis_title="singular value index i", yaxis_title="g_i (>0: pushed toward 0)",
                      yaxis2={"overlaying": "y", "side": "right", "title": "σ_i", "showgrid": False},
                      height=380, margin={"t": 50}, legend={"orientation": "h"})
    return fig


K_CHOICES = (1, 2, 4, 8, 16, 32, 64)


def _as_numbers(values, kind: type) -> tuple[list, list]:
    """(the ``values`` that read as ``kind`` (int or float), converted; the ones that do not)."""
    good, bad = [], []
    for v in values:
        try:
            good.append(kind(v))
        except (TypeError, ValueError):
            bad.append(v)
    return good, bad


def _number_grid(where, label: str, key: str, presets, kind: type, descending: bool = False) -> list:
    """A multiselect of numbers that also takes values typed in (a K or ρ the presets lack): a value typed on an
    earlier run becomes an option like the presets; one that is no ``kind`` is shown as an error."""
    kept, bad = _as_numbers(st.session_state.get(key, []), kind)  # a typed value is a string until here
    st.session_state[key] = sorted(set(kept), reverse=descending)
    options = sorted(set(presets) | set(kept), reverse=descending)
    chosen = where.multiselect(label, options, key=key, accept_new_options=True,  # the numbers just set above
                               persist_state="session",
                               help="Pick values, or type one and press Enter.")
    if bad:
        what = "a whole number" if kind is int else "a number"
        user_error(f"{label}: {', '.join(map(repr, bad))} is not {what}.")
    return sorted(set(chosen), reverse=descending)


def grid_inputs(ks: bool = True) -> dict:
    """The K and ρ grids of the Explore page, side by side; ``ks=False`` (LASER: whole matrices) asks for the ρ
    grid only and says K=1. Values other than the presets can be typed in (the CLI takes any)."""
    if ks:
        c1, c2 = st.columns(2)
        k_grid = _number_grid(c1, "K grid (row blocks)", "ks", K_CHOICES, int)
        grouping = grouping_input(c1, "grouping")
    else:
        c2, k_grid, grouping = st.container(), [1], CONTIGUOUS
    rhos = _number_grid(c2, "ρ grid (fraction of rank kept)", "rhos", set(PAPER_RHOS) | {1.0}, float, descending=True)
    if not ks:
        st.caption("K = 1: LASER reduces each matrix as a whole (one block).")
    return {"ks": k_grid, "rhos": rhos, "grouping": grouping}


def speed_inputs(lm, splits) -> dict:
    """Explore's speed settings, in an expander: early stop, prefix reuse, the memory its cached states may take
    and how many candidates run together. None changes which candidate is best; only early stop changes the rest of
    the table (a candidate that stopped early shows the accuracy it had then). What the CLI's ``--early-stop``,
    ``--no-prefix-reuse``, ``--prefix-budget-mb`` and ``--stack`` set, as ``SearchConfig`` fields. Before, only early stop could
    be set here: a GPU short of memory had no way to take less from the dashboard."""
    from laser_core.stacking import stack_size
    with st.expander("Speed settings (exact: the search finds the same best edit)", key="speed_box"):
        early = st.checkbox("Early stop (exact: skip the rest of a candidate that cannot win)", key="early",
                            persist_state="session")
        c1, c2, c3 = st.columns(3)
        reuse = c1.checkbox("Prefix reuse", key="prefix_reuse", persist_state="session",
                            help="Run a candidate from its layer on, from hidden states cached once per layer, instead "
                                 "of the whole model (exact within 1e-4 in log-prob). Off: every candidate runs the full "
                                 "forward, and nothing is cached.")
        budget = c2.number_input(f"Memory for cached states (MB, on {lm.device})", 0, 2**20, step=256,
                                 key="prefix_budget_mb", disabled=not reuse, persist_state="session",
                                 help="The least recently used layers' states are dropped beyond it (and built again "
                                      "when needed); the layer in use is always kept (for none, turn prefix reuse "
                                      "off). Lower it where the device runs out of memory.")
        auto = stack_size(lm, SearchConfig(early_stop=early), splits)
        stack = c3.number_input("Candidates run together (0: auto)", 0, 64, step=1, key="stack",
                                persist_state="session",
                                help="The ρ grid of one matrix and K as one forward, each candidate its own rows "
                                     "(exact). Saves time where a GPU waits on kernel launches, little on a CPU; takes "
                                     "that many times the activations' memory (a stack that does not fit is halved). "
                                     f"Auto here: {auto}{' (one at a time)' if auto == 1 else ''}.")
        if early and stack > 1:
            st.caption("Early stop follows one candidate at a time: with it on, candidates are not run together.")
    return {"early_stop": early, "prefix_reuse": reuse, "prefix_budget_mb": int(budget), "stack": int(stack)}


def grouping_input(where, key: str, disabled: bool = False) -> str:
    """How a matrix's rows form its K blocks (``laser_core.grouping``): contiguous, as the paper, or clustered
    (``disabled`` where K = 1, one block of every row)."""
    from laser_core.grouping import GROUPING_HELP
    return where.radio("Row blocks", list(GROUPING_HELP), key=key, horizontal=True, disabled=disabled,
                       persist_state="session",
                       help="; ".join(f"**{name}**: {text}" for name, text in GROUPING_HELP.items())
                            + ". K = 1 is one block of every row either way.")


def laser_inputs(layers: list[int], types: list[str]) -> tuple[int, int, list[str]]:
    """A LASER sweep's layer range and matrix types (first layer, last layer, types), as left on the last visit
    where they fit this model's ``layers`` and ``types``, else all of them."""
    kept = st.session_state.get("laser_layers", ())  # a range slider takes its default from value= only
    if not set(st.session_state.get("types", ["?"])) <= set(types):  # none yet, or another model's
        st.session_state["types"] = types
    lo, hi = st.select_slider("Layers", options=layers, key="layer_range",
                              value=kept if kept and set(kept) <= set(layers) else (layers[0], layers[-1]))
    st.session_state["laser_layers"] = (lo, hi)
    return lo, hi, st.multiselect("Matrix types", types, key="types", persist_state="session")


def cached_results(lm, splits, failed: bool = False) -> list[dict]:
    """Every evaluation for this model on the session's splits in the cache, earlier sessions included (``failed``:
    with the candidates that broke the model's numerics, which carry an ``error`` and no result)."""
    from laser_core.candidates import cached_results as _cached
    return _cached(store(), lm, splits, failed=failed)


def render_failed(lm, failed: list[dict], split: str) -> None:
    """Results: the candidates of ``split`` that broke the model's numerics (``failed``: cached entries with an
    ``error``), which the table cannot list (they have no accuracy), so that a missing ρ or K is explained."""
    rows = [{"edit": edit_short(lm, d), "name": d["name"], "error": d["error"]}
            for d in failed if d["split"] == split]
    if rows:
        with st.expander(f"{len(rows)} candidate{'s' * (len(rows) != 1)} broke the model's numerics: no result"):
            st.dataframe(rows, hide_index=True, width="stretch", key="failed_rows")
            st.caption("Their output overflowed (NaN or infinite), most often in float16; float32 avoids most. This is "
                       "cached: a search skips them without running them again.")


def _as_edits(edit) -> list:
    """An evaluation's edits as a list: ``edit`` is None (the base), one Edit, or a list of edits applied together."""
    return edit if isinstance(edit, list) else [] if edit is None else [edit]


def evaluation_id(doc: dict) -> tuple:
    """The edits a cached evaluation or a job's result is of, as sorted :func:`candidate_id`: () for the base."""
    rows = doc.get("edits") or ([doc] if doc.get("name") else [])
    return tuple(sorted(candidate_id(r) for r in rows))


def cached_combinations(lm, splits) -> list[dict]:
    """Every evaluation of several edits applied together for this model on the session's splits in the cache."""
    from laser_core.candidates import cached_combinations as _cached
    return _cached(store(), lm, splits)


def cached_result(lm, splits, split: str, edit=None) -> dict | None:
    """One cached evaluation of ``edit`` (None for the base, an Edit, or a list of edits applied together); None:
    not computed yet, or only up to an early stop, whose accuracy counts only the examples it saw."""
    from laser_core.candidates import cached_edits
    return cached_edits(store(), lm, splits, split, _as_edits(edit))


def results_of(kind: str, lm, splits, wanted: dict[str, tuple[Any, str]]) -> dict[str, dict | None]:
    """Per name in ``wanted`` (name -> (edit: None for the base, an Edit, or a list applied together; split)): its
    cached evaluation, else, where the cache has none (switched off or unwritable), the result under that name of
    this session's finished ``kind`` evaluation job (:func:`start_eval_job`) if it is of those edits; None when
    neither has it. Where all are found and that job evaluated them, the page draws its results: its end is seen
    (:func:`mark_seen`), though they may come from the cache it wrote."""
    got = {key: cached_result(lm, splits, split, e) for key, (e, split) in wanted.items()}
    job = session_job(kind, lm, splits)
    if job is None or job.status != "done":
        return got
    ours = [key for key, doc in job.result.items() if key in wanted and doc["split"] == wanted[key][1]
            and evaluation_id(doc) == evaluation_id({"edits": [to_dict(x) for x in _as_edits(wanted[key][0])]})]
    for key in ours:
        got[key] = got[key] or job.result[key]
    mark_seen(kind, lm, splits, bool(ours) and all(got.values()))
    return got


def keep_report(report: dict) -> None:
    """Make ``report`` (``SearchReport.to_dict()``) the one Explore shows and Export preselects its best from."""
    st.session_state["last_report"] = report


def kept_report(lm, splits) -> dict | None:
    """The report kept by :func:`keep_report`, where it was made on this model and these splits. Before, after
    loading another task (or seed, or split sizes) Explore went on showing the previous task's search, and Export
    offered to re-run it for this task."""
    report = st.session_state.get("last_report")
    if not report:
        return None
    on = _made_on((report.get("model") or {}).get("fingerprint"), report.get("task") or {})
    return report if on == made_on(lm, splits) else None


def report_key(lm, splits, cfg: SearchConfig) -> str:
    """Cache key of this configuration's complete search report."""
    from laser_core.search import report_key as _key
    return _key(store(), lm, splits, cfg)


def cache_dir() -> Path:
    return cache_root()
