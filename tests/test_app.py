"""Every dashboard page under streamlit.testing.v1.AppTest, on a tiny random model."""
from __future__ import annotations

import contextlib
import json
import os
import re
import threading
import time
from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest

from conftest import write_jsonl, write_mc_jsonl
from laser_core.significance import family_summary, paired_change

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def app_env(tiny_dirs, tmp_path_factory):
    """Point the app's defaults at a tiny model, a 500-example task and a private cache."""
    d = tmp_path_factory.mktemp("app")
    env = {"LASER_LAB_DEFAULT_MODEL": str(tiny_dirs["llama"]),
           "LASER_LAB_DEFAULT_TASK": str(write_mc_jsonl(d / "even.jsonl", 500)),
           "LASER_LAB_CACHE": str(d / "cache")}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    import laser_ui
    laser_ui.DEFAULT_MODEL, laser_ui.DEFAULT_TASK = env["LASER_LAB_DEFAULT_MODEL"], env["LASER_LAB_DEFAULT_TASK"]
    laser_ui.store.clear()
    yield env
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    laser_ui.DEFAULT_MODEL, laser_ui.DEFAULT_TASK = "demo", "fever"
    laser_ui.store.clear()


def app_model(app_env):
    """(model, task spec, splits) of the app's defaults, loaded and split as the app does: the same cache keys."""
    from laser_core import ModelSpec, TaskSpec, load_model, load_task, make_splits
    ts = TaskSpec(app_env["LASER_LAB_DEFAULT_TASK"])
    return load_model(ModelSpec(app_env["LASER_LAB_DEFAULT_MODEL"], device="cpu")), ts, make_splits(load_task(ts), ts)


def kept(app_env, report: dict, **spec) -> dict:
    """``report`` as a search leaves it for Explore: made on the app's model and task (``spec``: other TaskSpec
    fields of that task, e.g. another seed)."""
    import dataclasses

    from laser_core import load_task, make_splits
    from laser_core.search import report_task
    lm, ts, _ = app_model(app_env)
    ts = dataclasses.replace(ts, **spec)
    return {**report, "model": {"fingerprint": lm.fingerprint}, "task": report_task(make_splits(load_task(ts), ts))}


@pytest.fixture
def searched(app_env):
    """A C2I search's candidates in the app's cache, as Explore's search test leaves them (then this is read from
    the cache at once), so that the Results and Export tests also pass when run alone."""
    from laser_core import SearchConfig, Store, run_search
    lm, _, splits = app_model(app_env)
    run_search(lm, splits, SearchConfig(q=2, ks=(1, 2), rhos=(0.5, 0.1)), Store())


def session(name: str) -> AppTest:
    """A new session of page ``name``, not run yet, named as app.py names it (the sidebar leaves the page's own jobs
    to it); of app.py itself, which names the page it runs."""
    from laser_ui import PAGES
    at = AppTest.from_file(str(ROOT / name), default_timeout=120)
    for path, title, _ in PAGES:
        if path == name:
            at.session_state["_page"] = title
    return at


def page(name: str) -> AppTest:
    """A new session of page ``name`` (:func:`session`), run once."""
    return page_as(name)


def page_as(name: str, **state) -> AppTest:
    """A new session of page ``name`` (:func:`session`) with ``state`` set, run once."""
    at = session(name)
    for k, v in state.items():
        at.session_state[k] = v
    at.run()
    assert not at.exception, [e.value for e in at.exception]
    return at


def wait_for(at: AppTest, cond, timeout: float = 60) -> AppTest:
    """Re-run the page until ``cond(at)`` holds (background jobs finish in their own thread)."""
    end = time.time() + timeout
    while time.time() < end:
        at.run()
        assert not at.exception, [e.value for e in at.exception]
        if cond(at):
            return at
        time.sleep(0.3)
    raise AssertionError("condition not reached; errors: " + str([e.value for e in at.error]))


def heatmap_z(at: AppTest, colorbar: str = "accuracy − base") -> list[list]:
    """The z grid of the page's plotly heatmap whose colour bar reads ``colorbar``."""
    for chart in at.get("plotly_chart"):
        trace = json.loads(chart.proto.spec)["data"][0]
        if trace.get("type") == "heatmap" and trace.get("colorbar", {}).get("title", {}).get("text") == colorbar:
            return trace["z"]
    raise AssertionError(f"no heatmap with colour bar {colorbar!r}")


def click(at: AppTest, label: str) -> AppTest:
    next(b for b in at.button if b.label == label).click().run()
    return at


def metrics(at: AppTest) -> dict:
    return {m.label: m.value for m in at.metric}


def seen(at: AppTest, kind: str) -> bool:
    """Whether this session's ended ``kind`` job counts as seen (the page drew its results): the sidebar then no
    longer reports its end on other pages."""
    return "_jobs_seen" in at.session_state and at.session_state[f"job_{kind}"] in at.session_state["_jobs_seen"]


@contextlib.contextmanager
def held(monkeypatch, owner, fn: str, gate=lambda *a, **k: True, cancel: bool = False):
    """``owner.fn`` waits (60 s at most) until the block ends, on the calls where ``gate(*args, **kwargs)``: a job
    that calls it stays running meanwhile. On the way out, also on a failure (else a job, and the device, would
    stay busy for the next tests), the block cancels every running job where ``cancel``, then lets the calls go."""
    import laser_ui
    release, real = threading.Event(), getattr(owner, fn)
    monkeypatch.setattr(owner, fn, lambda *a, **k: (not gate(*a, **k) or release.wait(60)) and real(*a, **k))
    try:
        yield
    finally:
        for job in list(laser_ui.job_manager().jobs.values()) if cancel else ():
            if job.status == "running":
                job.cancel.cancel()
        release.set()


def test_model_page_shows_facts_and_computes_the_baseline(app_env):
    at = page("pages/1_Model_and_task.py")
    m = metrics(at)
    assert m["Architecture"] == "llama" and m["Layers"] == "2" and m["Matrices"] == "14"
    assert next(x for x in at.metric if x.label == "Architecture").help == "LlamaForCausalLM (transformers)"
    from laser_core import ModelSpec, load_model
    tiny = load_model(ModelSpec(app_env["LASER_LAB_DEFAULT_MODEL"], device="cpu")).model
    size = sum(p.numel() * 4 for p in tiny.parameters())  # float32
    assert next(x for x in at.metric if x.label == "Device").help == f"The weights take {size / 2**10:.1f} KiB."
    click(at, "Compute baseline accuracy")
    wait_for(at, lambda a: "Held-out test accuracy" in metrics(a))
    assert 0.0 <= float(metrics(at)["Held-out test accuracy"]) <= 1.0


@pytest.mark.parametrize("name, label, kind, module, fn", [
    ("pages/1_Model_and_task.py", "Compute baseline accuracy", "baseline", "laser_core.candidates", "evaluate_edits"),
    ("pages/2_Layer_scores.py", "Compute scores", "scores", "laser_core.scores", "load_spectra"),
    ("pages/3_Explore.py", "Run", "search", "laser_core", "run_search")])
def test_a_jobs_button_is_disabled_from_the_click_until_the_job_ends(app_env, tmp_path, monkeypatch, name, label,
                                                                      kind, module, fn):
    """Before, the button stayed enabled while its job ran, and a second click got "... is still running"."""
    import importlib

    import laser_ui
    from laser_core import TaskSpec
    at = session(name)
    at.session_state["task_spec"] = TaskSpec(str(write_mc_jsonl(tmp_path / "fresh.jsonl", 300, seed=7)))
    with held(monkeypatch, importlib.import_module(module), fn, cancel=True):  # the job waits, then is cancelled
        at.run()
        assert not next(b for b in at.button if b.label == label).disabled
        click(at, label)
        job = laser_ui.job_manager().jobs[at.session_state[f"job_{kind}"]]
        assert job.status == "running" and at.get("progress") and not [w for w in at.warning if "running" in w.value]
        assert next(b for b in at.button if b.label == label).disabled
    wait_for(at, lambda a: job.status != "running" and not a.get("progress"))
    assert job.status == "cancelled" and not next(b for b in at.button if b.label == label).disabled


def test_the_sidebar_draws_a_job_the_page_does_not_live_and_cancels_it_and_names_another_sessions(
        app_env, tmp_path, monkeypatch):
    """Before, the sidebar named the first running job with its progress as of the page's last run, and a job could
    be cancelled only on its own page, on the model and task it ran on."""
    import laser_core
    import laser_ui
    from laser_core import TaskSpec
    task = TaskSpec(str(write_mc_jsonl(tmp_path / "fresh.jsonl", 300, seed=8)))

    def session(name: str, **state) -> AppTest:
        return page_as(name, task_spec=task, **state)
    with held(monkeypatch, laser_core, "run_search", cancel=True):
        at = session("pages/3_Explore.py")
        click(at, "Run")
        job = laser_ui.job_manager().jobs[at.session_state["job_search"]]
        assert "Running: C2I search (below)" in [c.value for c in at.sidebar.caption]  # Explore draws it
        assert len(at.get("progress")) == 1 and not at.sidebar.get("progress")
        other = page("pages/3_Explore.py")  # another browser session
        assert "Running for another session: C2I search. This device takes no other job until it ends." in \
            [c.value for c in other.sidebar.caption] and not other.sidebar.button
        at = session("pages/4_Results.py", job_search=job.id)  # its page does not draw it: the sidebar
        assert at.sidebar.get("progress")[0].proto.text.startswith("C2I search — ")  # does, with Cancel
        assert "Its results show on Explore." in [c.value for c in at.sidebar.caption]
        next(b for b in at.sidebar.button if b.label == "Cancel").click().run()
        assert job.cancel.cancelled
    wait_for(at, lambda a: job.status != "running" and not a.sidebar.get("progress"))
    assert job.status == "cancelled" and not [c for c in at.sidebar.caption if c.value.startswith("Running")]


def test_a_job_that_ends_while_its_page_runs_reruns_the_page_rather_than_leave_its_button_disabled(app_env,
                                                                                                  monkeypatch):
    """The Run button reads the job running; it ends before its live view reads it. Before, the view showed it
    ended, nothing polled any more, and the button stayed disabled until the next click."""
    import laser_ui
    lm, _, splits = app_model(app_env)
    job = laser_ui.Job("ends-mid-run", "search", "C2I search", "cpu", made_on=laser_ui.made_on(lm, splits))
    laser_ui.job_manager().jobs[job.id] = job
    real, reads = laser_ui.job_running, []

    def job_running(*a):  # the button's read, the first time: running, and the job ends right after
        reads.append(real(*a))
        if len(reads) == 1:
            job.status, job.finished = "done", time.time()
        return reads[-1]
    monkeypatch.setattr(laser_ui, "job_running", job_running)
    at = session("pages/3_Explore.py")
    at.session_state["job_search"] = job.id
    try:
        at.run()
        assert not at.exception, [e.value for e in at.exception]
        assert reads == [True, False]  # the page ran again once, and then read it ended
        assert not next(b for b in at.button if b.label == "Run").disabled
        assert any(s.value.startswith("C2I search: finished") for s in at.success)
    finally:
        del laser_ui.job_manager().jobs[job.id]


def test_a_job_that_ends_away_from_its_page_is_reported_in_the_sidebar_until_its_page_shows_it(app_env):
    """Before, a job that ended while another page was shown left no word of it: the sidebar dropped it once it
    stopped running, and the page being looked at said nothing."""
    import laser_ui
    lm, _, splits = app_model(app_env)
    job = laser_ui.Job("ended-away", "search", "C2I search", "cpu", status="done", made_on=laser_ui.made_on(lm, splits))
    job.started, job.finished = job.started - 12.0, job.started  # ended before the pages below run
    laser_ui.job_manager().jobs[job.id] = job

    def session(name: str, **state) -> AppTest:
        return page_as(name, job_search=job.id, **state)

    def said(at: AppTest) -> list[str]:
        return [e.value for e in at.sidebar.success] + [c.value for c in at.sidebar.caption if "results show" in c.value]
    try:
        at = session("pages/4_Results.py")
        assert said(at) == ["C2I search: finished in 12.0 s", "Its results show on Explore."]
        next(b for b in at.sidebar.button if b.label == "Dismiss").click().run()
        assert said(at) == [] and job.id in at.session_state["_jobs_seen"]
        at = session("pages/5_Export.py")  # another session: not dismissed there
        assert said(at) == ["C2I search: finished in 12.0 s", "Its results show on Explore."]
        at = session("pages/3_Explore.py")  # its page shows it, the sidebar does not
        assert "C2I search: finished in 12.0 s" in [e.value for e in at.success] and said(at) == []
        at = session("pages/5_Export.py", _jobs_seen=at.session_state["_jobs_seen"])  # seen there
        assert said(at) == []
        job.status, job.error = "error", "out of memory"  # a failed one says so
        at = session("pages/1_Model_and_task.py")
        assert [e.value for e in at.sidebar.error] == ["C2I search failed: out of memory"]
    finally:
        del laser_ui.job_manager().jobs[job.id]


def test_a_job_watched_to_its_end_on_its_page_is_not_reported_on_the_next_pages(app_env, tmp_path):
    """Model & task and Layer scores read a finished job's results from the cache, not from the job: the sidebar
    took their end as unseen, and reported "finished" on every page visited next until dismissed."""
    from laser_core import TaskSpec
    spec = TaskSpec(str(write_mc_jsonl(tmp_path / "watched.jsonl", 300, seed=11)))

    def visit(name: str, last: AppTest) -> AppTest:  # the next page, with the session's state (AppTest's switch_page
        kept = ("job_baseline", "job_scores", "_jobs_seen")  # under app.py's navigation clicks no button)
        return page_as(name, task_spec=spec, **{k: last.session_state[k] for k in kept if k in last.session_state})

    def said(a: AppTest) -> list[str]:
        return [e.value for e in a.sidebar.success] + [c.value for c in a.sidebar.caption if "results show" in c.value]

    at = page_as("pages/1_Model_and_task.py", task_spec=spec)
    click(at, "Compute baseline accuracy")
    wait_for(at, lambda a: "Held-out test accuracy" in metrics(a))
    at = visit("pages/2_Layer_scores.py", at)
    assert said(at) == []
    click(at, "Compute scores")
    wait_for(at, lambda a: "Calibration log-loss" in metrics(a))
    for name in ("pages/4_Results.py", "pages/3_Explore.py", "pages/1_Model_and_task.py"):
        assert said(visit(name, at)) == [], name
    assert {at.session_state["job_baseline"], at.session_state["job_scores"]} <= at.session_state["_jobs_seen"]


def test_streamlit_does_not_collect_garbage_after_every_script_run():
    """A job's live view reruns its fragment every few seconds, and Streamlit by default runs a full garbage
    collection after every run: with torch and a model in memory ~0.4 s of the interpreter each time, which slowed
    a search watched on Explore to 1.56x its CLI time on 2 cores (1.16x without it). The setting lives in
    .streamlit/config.toml, read by `streamlit run app.py` from the repository root."""
    import tomllib

    from streamlit import config
    assert "runner.postScriptGC" in config.get_config_options()  # still an option of this Streamlit
    assert tomllib.loads((ROOT / ".streamlit" / "config.toml").read_text())["runner"]["postScriptGC"] is False


def test_pages_show_a_finished_job_only_on_the_model_and_task_it_ran_on(app_env, tmp_path):
    """Before, a page fell back on this session's finished job where the cache had no result, whatever task the job
    ran on: after loading another task, the Model page showed the previous task's baseline as this one's, and Layer
    scores the previous task's scores."""
    import laser_ui
    from laser_core import TaskSpec, load_task, make_splits
    from laser_core.candidates import evaluate_candidate
    from laser_core.scores import load_spectra
    from laser_core.store import null_store
    lm, _, splits = app_model(app_env)
    mine = TaskSpec(str(write_mc_jsonl(tmp_path / "mine.jsonl", 300, seed=5)))  # nothing of it in the cache
    done = {"baseline": {s: evaluate_candidate(lm, None, splits, s, null_store()) for s in ("calib", "test")},
            "scores": load_spectra(lm, splits, null_store(), (1,))}
    jobs = laser_ui.job_manager().jobs
    for kind, result in done.items():  # finished on the app's default task
        jobs[kind] = laser_ui.Job(kind, kind, kind, "cpu", status="done", result=result,
                                  made_on=laser_ui.made_on(lm, splits))
    try:
        for name, kind, button in (("pages/1_Model_and_task.py", "baseline", "Compute baseline accuracy"),
                                   ("pages/2_Layer_scores.py", "scores", "Compute scores")):
            for spec, shown in ((mine, False), (None, True)):
                at = session(name)
                at.session_state[f"job_{kind}"] = kind
                if spec is not None:
                    at.session_state["task_spec"] = spec
                with pytest.MonkeyPatch.context() as mp:  # as if the cache were off: only the job can answer
                    mp.setattr(laser_ui, "cached_result", lambda *a, **k: None)
                    mp.setattr("laser_core.scores.cached_spectra", lambda *a, **k: None)
                    at.run()
                assert not at.exception, [e.value for e in at.exception]
                assert any(b.label == button for b in at.button) != shown, (name, spec)
                assert ("Held-out test accuracy" in metrics(at) or bool(at.get("plotly_chart"))) == shown, (name, spec)
    finally:
        for kind in done:
            del jobs[kind]
    assert make_splits(load_task(mine), mine).task.digest != splits.task.digest


def test_model_page_reports_a_bad_path_without_a_traceback(app_env):
    at = page("pages/1_Model_and_task.py")
    at.radio(key="model_kind").set_value("local folder")
    at.text_input(key="model_path").set_value("/no/such/model")
    at.button[0].click().run()
    assert not at.exception
    assert any("model not found" in e.value and "still using" in e.value for e in at.error)
    assert "model_spec" not in at.session_state  # the working default stays the session's model
    status = " ".join(c.value for c in at.sidebar.caption)
    assert f"Model: `{app_env['LASER_LAB_DEFAULT_MODEL']}`" in status  # the sidebar still says what is loaded


def test_sidebar_says_the_split_sizes_the_task_has_not_the_ones_asked(app_env):
    from laser_core import TaskSpec
    at = session("pages/2_Layer_scores.py")
    at.session_state["task_spec"] = TaskSpec(app_env["LASER_LAB_DEFAULT_TASK"], n_test=1000)  # 500 examples
    at.run()
    assert "(calib 100, val 100, test 300, seed 0)" in " ".join(c.value for c in at.sidebar.caption)


def load_task_file(at: AppTest, path, **sizes) -> AppTest:
    """Fill the Model & task form with a task file path and split sizes, and press Load."""
    at.radio(key="task_kind").set_value("task file path")
    at.text_input(key="task_path").set_value(str(path))
    for key, value in sizes.items():
        at.number_input(key=key).set_value(value)
    at.button[0].click().run()
    return at


def test_model_page_shows_what_loading_the_task_warned_about(app_env, tmp_path):
    rows = [f'"Q{i}?",2|1|0,2\n' for i in range(3)] + ['"Q0?",2|1|0,2\n']  # answers read as text; one repeat
    task = tmp_path / "numbers.csv"
    task.write_text("prompt,choices,answer\n" + "".join(rows))
    at = load_task_file(page("pages/1_Model_and_task.py"), task, n_calib=1, n_test=1)
    assert not at.exception
    notes = [w.value for w in at.warning]
    assert any("4 answers could name two choices" in w for w in notes), notes
    assert any("1 duplicate examples dropped" in w for w in notes), notes
    at = page("pages/1_Model_and_task.py")  # a task that warns about nothing shows no warning
    assert not [w for w in at.warning if "answers" in w.value or "dropped" in w.value]


def test_model_page_says_how_a_bigbench_files_answers_are_cut_and_which_match_bigbench_scores_by(app_env, tmp_path):
    task = tmp_path / "sums" / "task.json"
    task.parent.mkdir()
    task.write_text(json.dumps({"name": "sums", "output_regex": r"[-+]?\d+", "preferred_score": "exact_str_match",
                                "examples": [{"input": f"{i}+1=", "target": str(i + 1)} for i in range(6)]}))
    at = load_task_file(page("pages/1_Model_and_task.py"), task, n_calib=2, n_test=2)
    assert not at.exception
    assert any("BIG-bench scores this task by exact match" in w.value for w in at.warning), [w.value for w in at.warning]
    said = [t.value for t in at.text]
    assert r"Generated text: the 12 new tokens, answers cut by the task file's output_regex [-+]?\d+, then matched by " \
        "the 'contains' rule" in said, said


def test_model_page_loads_a_task_few_shot_and_says_so(app_env, tmp_path):
    from conftest import write_mc_jsonl
    task = write_mc_jsonl(tmp_path / "even.jsonl", 40)
    at = load_task_file(page("pages/1_Model_and_task.py"), task, n_calib=10, n_test=10, shots=2)
    assert not at.exception and at.session_state["task_spec"].shots == 2
    assert any("2-shot (the solved examples are kept out of every split)" in c.value for c in at.caption)
    assert any(", 2-shot)" in c.value for c in at.sidebar.caption)
    prompt = at.code[0].value  # the example as the model reads it: two solved questions, then its own
    assert prompt.count("Is the number") == 3 and prompt.count("Answer: ") == 2
    spec = at.session_state["task_spec"]
    at = session("pages/1_Model_and_task.py")
    at.session_state["task_spec"] = spec  # on coming back from another page: the form shows what is loaded
    at.run()
    assert at.number_input(key="shots").value == 2


def test_model_page_warns_that_half_precision_is_slow_on_a_cpu(app_env):
    at = page("pages/1_Model_and_task.py")
    assert not [w for w in at.warning if "slower than float32" in w.value]
    at.selectbox(key="device").set_value("cpu")
    at.selectbox(key="dtype").set_value("bfloat16")
    at.button[0].click().run()
    assert not at.exception and metrics(at)["dtype"] == "bfloat16"
    assert any(w.value.startswith("bfloat16 on the CPU: its matrix products run about 100x slower") for w in at.warning)


def test_a_task_file_changed_on_disk_is_read_again_when_loaded(app_env, tmp_path):
    task = write_mc_jsonl(tmp_path / "grows.jsonl", 40)
    at = load_task_file(page("pages/1_Model_and_task.py"), task, n_calib=10, n_test=10)
    assert "grows` (mc, 40 examples)" in " ".join(c.value for c in at.caption)
    assert not at.toast
    write_mc_jsonl(task, 60)  # the user fixes the file (or uploads a new one of that name) and loads it again
    at.button[0].click().run()
    assert not at.exception
    assert "grows` (mc, 60 examples)" in " ".join(c.value for c in at.caption)
    assert [t.value for t in at.toast] == ["`grows.jsonl` changed on disk since it was last read: its examples were "
                                           "read again."]  # said: the page's numbers changed under the user
    at.run()
    assert not at.toast  # once


def test_a_model_folder_saved_again_is_loaded_again(app_env, tiny_dirs, tmp_path):
    import shutil

    import torch
    from transformers import AutoModelForCausalLM
    folder = tmp_path / "exported"
    shutil.copytree(tiny_dirs["llama"], folder)
    at = page("pages/1_Model_and_task.py")
    at.radio(key="model_kind").set_value("local folder")
    at.text_input(key="model_path").set_value(str(folder))
    at.button[0].click().run()
    before = " ".join(c.value for c in at.caption)
    model = AutoModelForCausalLM.from_pretrained(folder)  # another edit exported to the same folder
    with torch.no_grad():
        model.model.layers[0].mlp.down_proj.weight.mul_(0.5)
    model.save_pretrained(folder)
    at.button[0].click().run()
    assert not at.exception
    after = " ".join(c.value for c in at.caption)
    fingerprint = lambda text: text.split("fingerprint `")[1].split("`")[0]  # noqa: E731
    assert fingerprint(before) != fingerprint(after)


def test_the_dashboard_keeps_the_models_used_last_and_frees_older_ones(app_env, tiny_dirs):
    """Before, every model a session had loaded (and every save of a folder) stayed in memory until the server
    stopped: trying a few models on a GPU ran it out of memory."""
    import gc
    import weakref

    import laser_ui
    from laser_core import LaserError, ModelSpec

    assert laser_ui.MODELS_KEPT == 2
    laser_ui.model_shelf().clear()
    llama, gpt2, roberta = (ModelSpec(str(tiny_dirs[a]), "cpu") for a in ("llama", "gpt2", "roberta"))
    first = weakref.ref(laser_ui._model_of(llama).model)
    second = weakref.ref(laser_ui._model_of(gpt2).model)
    assert laser_ui._model_of(llama).model is first()  # kept: used again, it is now the newest
    real_load, alive_at_load = laser_ui.load_model, []

    def load_model(spec, make_room=None):  # what is still in memory when the new model's weights load
        def room():
            make_room()
            alive_at_load.append((first() is not None, second() is not None))
        return real_load(spec, make_room=room)
    laser_ui.load_model = load_model
    try:
        with pytest.raises(LaserError, match="no config.json"):  # a wrong source drops nothing
            laser_ui._model_of(ModelSpec(str(tiny_dirs["llama"].parent), "cpu"))
        assert alive_at_load == [] and second() is not None
        laser_ui._model_of(roberta)  # a third model: gpt2, used longest ago, is dropped before it loads
    finally:
        laser_ui.load_model = real_load
    assert alive_at_load == [(True, False)]  # before: all three were in memory at once, the oldest dropped after
    gc.collect()
    assert first() is not None and laser_ui._model_of(llama).model is first() and second() is None
    laser_ui.model_shelf().clear()


def test_model_page_reports_a_malformed_task_file(app_env, tmp_path):
    bad = tmp_path / "task.json"
    bad.write_text("{not json")
    at = load_task_file(page("pages/1_Model_and_task.py"), bad)
    assert not at.exception
    assert any("not valid JSON" in e.value for e in at.error)


def test_model_page_prompt_template_and_fixed_choices_build_the_task_and_stay_in_the_form(app_env, tmp_path):
    task = tmp_path / "bare.csv"  # bare questions and a label, as hub datasets hold them
    task.write_text("question,answer\n" + "".join(f'"Is {i} even?",{i % 2}\n' for i in range(8)))
    at = page("pages/1_Model_and_task.py")
    at.text_input(key="prompt_template").set_value("Question: {question}\\nAnswer:")
    at.text_input(key="fixed_choices").set_value(" yes|no ")
    at.text_input(key="answer_col").set_value("answer ")  # spaces typed around a name or choices are dropped
    at = load_task_file(at, task, n_calib=3, n_test=3)
    assert not at.exception and not at.error, [e.value for e in at.error]
    spec = at.session_state["task_spec"]
    assert (spec.prompt_template, spec.fixed_choices, spec.answer_col) == ("Question: {question}\\nAnswer:", "yes|no",
                                                                           "answer")
    assert "Prompt: `Question: {question}\\nAnswer:`  \nChoices: `yes|no`" in at.sidebar.caption[0].value  # which task
    from laser_core import load_task, make_splits
    shown = next(e for e in at.expander if e.label.startswith("An example as the model reads it"))
    task = load_task(spec)
    first = task.examples[make_splits(task, spec).calib[0]]
    assert shown.code[0].value == first.prompt and first.prompt.startswith("Question: Is ")  # the template, filled
    marks = ["`' yes'`" + (" ← right" if first.answer == 0 else "  \n"), "`' no'`" + (" ← right" if first.answer else "")]
    assert all(m in shown.markdown[0].value for m in marks), shown.markdown[0].value
    ex = task.examples[1]
    assert (ex.prompt, ex.choices, ex.answer) == ("Question: Is 1 even?\nAnswer:", (" yes", " no"), 1)
    at = session("pages/1_Model_and_task.py")
    at.session_state["task_spec"] = spec  # as on coming back from another page: the form shows what is loaded
    at.run()
    assert at.text_input(key="prompt_template").value == "Question: {question}\\nAnswer:"
    assert at.text_input(key="fixed_choices").value == "yes|no"
    at.text_input(key="prompt_template").set_value("Question: {query}")
    at.button[0].click().run()  # a template naming no column of the file: an error, the task stays loaded
    assert any("names 'query', not a column" in e.value for e in at.error), [e.value for e in at.error]
    assert at.session_state["task_spec"] == spec


def test_model_page_reads_choices_from_several_columns_and_answers_counted_from_one(app_env, tmp_path):
    """Winogrande's shape: option1, option2 and the answer "1" or "2"."""
    task = tmp_path / "wino.jsonl"
    write_jsonl(task, [{"sentence": f"Row {i}: _ fits.", "option1": f"a{i}", "option2": f"b{i}", "answer": str(1 + i % 2)}
                       for i in range(10)])
    at = page("pages/1_Model_and_task.py")
    at.text_input(key="choices_col").set_value("option1,option2")
    at.text_input(key="prompt_template").set_value("{sentence}\\n_ is")
    at.checkbox(key="answer_base").check()
    at = load_task_file(at, task, n_calib=4, n_test=3)
    assert not at.exception and not at.error, [e.value for e in at.error]
    spec = at.session_state["task_spec"]
    assert (spec.choices_col, spec.answer_base) == ("option1,option2", 1)
    assert "Answers: `count from 1`" in at.sidebar.caption[0].value
    from laser_core import load_task
    assert [(e.choices, e.answer) for e in load_task(spec).examples[:2]] == [((" a0", " b0"), 0), ((" a1", " b1"), 1)]
    at = session("pages/1_Model_and_task.py")
    at.session_state["task_spec"] = spec  # on coming back from another page: the form shows what is loaded
    at.run()
    assert at.checkbox(key="answer_base").value and at.text_input(key="choices_col").value == "option1,option2"


def test_model_page_shows_the_fields_of_the_chosen_sources_only(app_env, tmp_path):
    """The form showed every field for every source: a path box beside the demo model, and file columns, a prompt
    template and fixed choices beside a bundled BIG-bench task, whose task.json sets them (and which refuses a
    template). A source now shows its own fields as soon as it is chosen, and hidden fields count as their defaults."""
    import laser_ui as ui
    labels = lambda at: {w.label for kind in ("text_input", "selectbox", "checkbox") for w in at.get(kind)}  # noqa: E731
    at = page("pages/1_Model_and_task.py")  # app_env: a local model folder and a task file
    shown = labels(at)
    assert {"prompt column", "Prompt template (optional)", "Answers count from 1", ui.TASK_PATH_LABELS["task file path"],
            ui.MODEL_PATH_LABELS["local folder"]} <= shown and "Bundled task" not in shown
    assert not [c for c in at.caption if c.value.startswith("Still loaded")]
    at.radio(key="model_kind").set_value(ui.MODEL_KINDS[0]).run()
    still = [c.value for c in at.caption if c.value.startswith("Still loaded")]  # picked is not loaded: it says so
    assert still == [f"Still loaded: the model `{app_env['LASER_LAB_DEFAULT_MODEL']}`. Fill in the form and press "
                     "**Load model and task** to switch."]
    at.radio(key="task_kind").set_value("bundled").run()
    assert [c.value for c in at.caption if c.value.startswith("Still loaded")] == [
        f"Still loaded: the model `{app_env['LASER_LAB_DEFAULT_MODEL']}` and the task "
        f"`{app_env['LASER_LAB_DEFAULT_TASK']}`. Fill in the form and press **Load model and task** to switch."]
    shown = labels(at)
    assert "Bundled task" in shown and not shown & {"prompt column", "Prompt template (optional)", "Answers count from 1",
                                                     *ui.TASK_PATH_LABELS.values(), *ui.MODEL_PATH_LABELS.values()}
    assert at.selectbox(key="bundled").value == "fever"  # multiple choice: it decodes nothing
    assert {"Device", "dtype"} <= shown and "Answer match" not in shown and "max new tokens" not in \
        {w.label for w in at.number_input}
    assert "multiple choice, 6612 examples (BIG-bench)" in [c.value for c in at.caption]
    at.selectbox(key="bundled").set_value("qa_wikidata").run()  # the fields follow the pick, before any Load
    assert "Answer match" in labels(at) and "max new tokens" in {w.label for w in at.number_input}
    assert any(c.value.startswith("generation, ") for c in at.caption)
    at.radio(key="task_kind").set_value("HF dataset").run()
    assert ui.TASK_PATH_LABELS["HF dataset"] in labels(at) and "prompt column" in labels(at)
    at.radio(key="model_kind").set_value(".gguf file").run()
    assert ui.MODEL_PATH_LABELS[".gguf file"] in labels(at)

    task = tmp_path / "bare.csv"  # a template typed for a file, left behind on switching to a bundled task
    task.write_text("question,answer\n" + "".join(f'"Is {i} even?",{i % 2}\n' for i in range(8)))
    at = page("pages/1_Model_and_task.py")
    at.text_input(key="prompt_template").set_value("Question: {question}\\nAnswer:")
    at.text_input(key="fixed_choices").set_value("yes|no")
    at.number_input(key="max_new_tokens").set_value(20)  # a file's task may be a generation task: shown
    at = load_task_file(at, task, n_calib=3, n_test=3)
    assert at.session_state["task_spec"].prompt_template and at.session_state["task_spec"].max_new_tokens == 20
    at.radio(key="task_kind").set_value("bundled").run()
    at.selectbox(key="bundled").set_value("epistemic_reasoning").run()
    at.button[0].click().run()
    assert not at.exception and not at.error, [e.value for e in at.error]  # before: "a prompt template" was refused
    spec = at.session_state["task_spec"]
    assert (spec.source, spec.prompt_template, spec.fixed_choices, spec.answer_col) == ("epistemic_reasoning", "", "",
                                                                                       "answer")
    assert (spec.n_calib, spec.n_test) == (3, 3)  # the fields both share are kept
    assert spec.max_new_tokens == ui.TaskSpec.max_new_tokens  # hidden for multiple choice: the default, not the 20
    assert not [c for c in at.caption if c.value.startswith("Still loaded")]  # what is picked is what is loaded
    at.selectbox(key="bundled").set_value("truthful_qa").run()  # another bundled task picked, not loaded yet
    assert [c.value for c in at.caption if c.value.startswith("Still loaded")] == [
        "Still loaded: the task `epistemic_reasoning`. Fill in the form and press **Load model and task** to switch."]


def test_model_page_loads_an_uploaded_bigbench_task_and_shows_its_listed_choices(app_env):
    """Uploads took JSONL and CSV only: a BIG-bench task.json (or a JSON array of records) had to be given by path."""
    examples = [{"input": f"Is {i} even?", "target_scores": {"yes": int(i % 2 == 0), "no": int(i % 2)}}
                for i in range(12)]
    at = page("pages/1_Model_and_task.py")
    at.radio(key="task_kind").set_value("upload a file").run()  # the source shows its field at once
    at.file_uploader(key="upload").set_value(("task.json", json.dumps({"name": "parity", "examples": examples}).encode(),
                                               "application/json"))
    for key, value in {"n_calib": 4, "n_test": 4}.items():
        at.number_input(key=key).set_value(value)
    at.button[0].click().run()
    assert not at.exception and not at.error, [e.value for e in at.error]
    spec = at.session_state["task_spec"]
    assert not [c for c in at.caption if c.value.startswith("Still loaded")]  # loaded: an upload, as a file path
    assert spec.source.endswith("/task.json")
    shown = next(e for e in at.expander if e.label.startswith("An example as the model reads it"))
    assert shown.code[0].value.endswith("even?\n  choice: yes\n  choice: no\nA:")  # in BIG-bench's order


def test_model_page_says_before_a_run_when_a_masked_lm_cannot_tell_choices_apart(app_env, tiny_dirs, tmp_path):
    """Before, the warning came only once a job ran (and from the CLI): a whole search could be set up first."""
    from laser_core import ModelSpec, TaskSpec
    task = tmp_path / "claims.csv"  # every question's choices start with " true": a masked LM sees one token for both
    task.write_text("prompt,choices,answer\n" + "".join(f'"Claim {i}?",true claim|true false,{i % 2}\n' for i in range(8)))
    at = session("pages/1_Model_and_task.py")
    at.session_state["model_spec"] = ModelSpec(str(tiny_dirs["roberta"]), "cpu")
    at.session_state["task_spec"] = TaskSpec(str(task), n_calib=3, n_test=3)
    at.run()
    assert not at.exception, [e.value for e in at.exception]
    assert any(w.value.startswith("8 of 8 questions have choices that start with the same token") for w in at.warning), \
        [w.value for w in at.warning]
    at.session_state["model_spec"] = ModelSpec(str(tiny_dirs["llama"]), "cpu")  # a causal LM scores whole choices
    at.run()
    assert not [w for w in at.warning if "same token" in w.value]


def test_model_page_says_when_answers_are_longer_than_max_new_tokens_and_its_fields_set_decoding_and_matching(
        app_env, tmp_path):
    long = " the capital of France is Paris and the capital of Italy is Rome"
    task = write_jsonl(tmp_path / "gen.jsonl", [{"prompt": f"Name capitals {i}:", "targets": [long]} for i in range(6)])
    at = load_task_file(page("pages/1_Model_and_task.py"), task, n_calib=2, n_test=2, max_new_tokens=3)
    assert not at.exception, [e.value for e in at.exception]
    assert at.session_state["task_spec"].max_new_tokens == 3
    assert any(w.value.startswith("5 of 5 questions have no accepted answer that fits in 3 generated tokens")  # 2 + 2 + 1 split
               for w in at.warning), [w.value for w in at.warning]
    assert at.selectbox(key="match").value == "contains" and "match" not in at.sidebar.caption[0].value  # LASER's
    at.number_input(key="max_new_tokens").set_value(64)
    at.selectbox(key="match").set_value("starts")
    at.button[0].click().run()
    spec = at.session_state["task_spec"]
    assert (spec.max_new_tokens, spec.match) == (64, "starts")
    assert ", 64 new tokens, starts match, seed 0" in at.sidebar.caption[0].value
    assert not [w for w in at.warning if "generated tokens" in w.value]
    at = session("pages/1_Model_and_task.py")
    at.session_state["task_spec"] = spec  # on coming back from another page: the form shows what is loaded
    at.run()
    assert at.selectbox(key="match").value == "starts"


def test_model_page_says_before_a_run_which_questions_are_longer_than_the_models_context(app_env, tmp_path):
    rows = [{"prompt": f"Is {i} even?", "choices": [" yes", " no"], "answer": i % 2} for i in range(5)]
    rows[3]["prompt"] = "Is it" + " so" * 300 + "?"  # past the tiny model's 256 positions
    at = load_task_file(page("pages/1_Model_and_task.py"), write_jsonl(tmp_path / "long.jsonl", rows), n_calib=2,
                        n_test=2)
    assert not at.exception, [e.value for e in at.exception]
    assert any(w.value.startswith("1 of 5 questions are longer than the model's context of 256 tokens")
               for w in at.warning), [w.value for w in at.warning]  # 5: the examples of the splits (2 + 2 + 1)


def test_model_page_form_shows_what_is_loaded_so_load_changes_only_what_the_user_edits(app_env):
    from laser_core import ModelSpec, TaskSpec
    loaded = (ModelSpec(app_env["LASER_LAB_DEFAULT_MODEL"], "cpu"),
              TaskSpec(app_env["LASER_LAB_DEFAULT_TASK"], n_calib=30, n_test=40, n_val=50, seed=3))
    at = session("pages/1_Model_and_task.py")
    at.session_state["model_spec"], at.session_state["task_spec"] = loaded  # as after a visit to another page
    at.run()
    assert not at.exception, [e.value for e in at.exception]
    assert (at.radio(key="model_kind").value, at.text_input(key="model_path").value,
            at.selectbox(key="device").value) == ("local folder", app_env["LASER_LAB_DEFAULT_MODEL"], "cpu")
    assert (at.radio(key="task_kind").value, at.text_input(key="task_path").value) == \
        ("task file path", app_env["LASER_LAB_DEFAULT_TASK"])
    assert [at.number_input(key=k).value for k in ("n_calib", "n_test", "n_val", "seed")] == [30, 40, 50, 3]
    assert "validation 50" in " ".join(c.value for c in at.caption)
    at.number_input(key="seed").set_value(4)
    at.button[0].click().run()
    assert not at.exception, [e.value for e in at.exception]
    assert at.session_state["model_spec"] == loaded[0]
    assert at.session_state["task_spec"] == TaskSpec(loaded[1].source, n_calib=30, n_test=40, n_val=50, seed=4)
    at.number_input(key="n_val").set_value(None)  # blank: LASER's split is 20% of the task again
    at.button[0].click().run()
    assert at.session_state["task_spec"].n_val is None and "validation 100" in " ".join(c.value for c in at.caption)


def test_layer_scores_page_computes_scores_and_draws_heatmap_and_profile(app_env):
    at = page("pages/2_Layer_scores.py")
    if any(b.label == "Compute scores" for b in at.button):
        click(at, "Compute scores")
    wait_for(at, lambda a: len(a.get("plotly_chart")) == 2)
    assert len(at.selectbox(key="matrix_pick").options) == 14
    at.selectbox(key="matrix_pick").set_value("model.layers.1.mlp.down_proj.weight").run()
    assert at.session_state["selected_matrix"] == "model.layers.1.mlp.down_proj.weight"
    at.slider(key="q").set_value(3).run()
    assert len(at.session_state["top_q"]) == 3
    every = next(d.value for d in at.dataframe if len(d.value) == 14)  # every matrix, best score first
    assert list(every["rank"]) == list(range(1, 15)) and list(every["name"][:3]) == at.session_state["top_q"]
    assert every["score"].is_monotonic_decreasing and set(every["rows × cols"]) >= {"32×32"}


def test_layer_scores_first_order_scores_the_row_blocks_explore_would_reduce(app_env):
    from laser_core import SearchConfig
    from laser_core.config import PAPER_KS
    from laser_core.scores import load_spectra, score_table
    from laser_core.store import null_store
    import laser_ui
    from laser_core.scores import _record_spectra_time
    lm, _, splits = app_model(app_env)
    at = page("pages/2_Layer_scores.py")
    at.selectbox(key="score").set_value("first_order").run()
    _record_spectra_time(laser_ui.store(), lm, splits, PAPER_KS, "clustered", [40.0, 7.0])  # as if timed before
    at.radio(key="grouping").set_value("clustered").run()
    assert at.info[0].value == (f"Scores need one forward+backward over the {len(splits.calib)} calibration examples "
                                f"and an SVD of all {len(lm.matrices)} matrices. About 47 s here: the gradient step "
                                "(about 40 s, as on this calibration split) and the SVDs (about 7 s, as on this task).")
    click(at, "Compute scores")
    wait_for(at, lambda a: len(a.get("plotly_chart")) == 2)
    shown = next(d.value for d in at.dataframe if "rows × cols" in d.value.columns)
    cfg = SearchConfig(score="first_order", grouping="clustered")
    want = score_table(lm, load_spectra(lm, splits, null_store(), PAPER_KS, grouping="clustered")[0], "first_order", cfg)
    assert dict(zip(shown["name"], shown["score"])) == pytest.approx({r["name"]: r["score"] for r in want})
    contiguous = score_table(lm, load_spectra(lm, splits, null_store(), PAPER_KS)[0], "first_order",
                             SearchConfig(score="first_order"))
    assert [r["score"] for r in want] != pytest.approx([r["score"] for r in contiguous])  # the blocks matter
    explore = page("pages/3_Explore.py")  # the same settings: the matrices it names are Layer scores' top q
    explore.session_state["score"], explore.session_state["grouping"] = "first_order", "clustered"
    explore.run()
    assert explore.radio(key="grouping").value == "clustered"
    top = sorted(want, key=lambda r: -r["score"])[:explore.slider(key="q").value]
    assert any(c.value.startswith("Tries the top") and all(f"layer {r['layer']} {r['type']}" in c.value for r in top)
               for c in explore.caption)


def _small_grid(at: AppTest) -> AppTest:
    at.multiselect(key="ks").set_value([1, 2])
    at.multiselect(key="rhos").set_value([0.5, 0.1])
    return at


def test_explore_runs_a_search_in_the_background_then_shows_it_from_cache(app_env):
    at = page("pages/3_Explore.py")
    at.slider(key="q").set_value(2)
    _small_grid(at).run()
    assert "8 candidates, each evaluated on the calibration split (100 examples)." in [c.value for c in at.caption]
    assert at.code[0].value == ("python -m laser_core search --q 2 --ks 1,2 --rhos 0.5,0.1 --model "
                                f"{app_env['LASER_LAB_DEFAULT_MODEL']} --task {app_env['LASER_LAB_DEFAULT_TASK']}")
    click(at, "Run")
    wait_for(at, lambda a: any("finished" in s.value for s in a.success))
    assert "Best (held-out test)" in metrics(at)
    assert [h.value for h in at.subheader] == ["Best candidate · C2I search"]
    timed = [c.value for c in at.caption if c.value.startswith("Last run: ")]  # as the CLI's time line
    assert len(timed) == 1 and ", search " in timed[0] and "; candidates from cache " in timed[0], timed
    assert any("Combine with edits of other matrices" in c.value and "`--compose`" in c.value
               and "On the other bundled tasks" in c.value and "--other-tasks" in c.value for c in at.caption)
    assert [b.proto.label for b in at.get("download_button")] == ["Download the search's report (JSON)"]  # --report-out's
    shown = metrics(at)
    z = [v for line in heatmap_z(at) for v in line if v is not None]  # each of the q=2 matrices' best vs the base
    assert len(z) == 2 and max(z) == pytest.approx(float(shown["Best (calib)"]) - float(shown["Base (calib)"]), abs=1e-3)
    again = page("pages/3_Explore.py")
    again.slider(key="q").set_value(2)
    _small_grid(again).run()
    assert any("already in the cache" in s.value for s in again.success)
    assert "Best (calib)" in metrics(again)
    # one more matrix: its 4 candidates are priced from the timings of the 8 in the cache, before any run
    again.slider(key="q").set_value(3).run()
    estimate = next(c.value for c in again.caption if c.value.startswith("Estimated run time here: "))
    assert "4 to run, 8 in the cache" in estimate and "8 candidates already timed on this split" in estimate


def test_explore_shows_a_generation_tasks_report_cached_before_reports_named_the_decoding_length(app_env, tmp_path):
    """Reports now carry a generation task's max_new_tokens; one cached before (same key) is still this
    configuration's report, and Explore shows it."""
    from laser_core import ModelSpec, SearchConfig, Store, TaskSpec, load_model, load_task, make_splits, run_search
    from laser_core.search import report_key
    ts = TaskSpec(str(write_jsonl(tmp_path / "say.jsonl", [{"prompt": f"Say {i}:", "targets": [f" {i}"]}
                                                           for i in range(30)])), n_calib=10, n_test=10)
    splits = make_splits(load_task(ts), ts)
    lm = load_model(ModelSpec(app_env["LASER_LAB_DEFAULT_MODEL"], device="cpu"))
    cfg = SearchConfig(q=1, ks=(1, 2), rhos=(0.5, 0.1))
    report = run_search(lm, splits, cfg, Store()).to_dict()
    del report["task"]["max_new_tokens"]  # as it was cached before
    Store().put_json(report_key(Store(), lm, splits, cfg), report)
    at = session("pages/3_Explore.py")
    at.session_state["task_spec"] = ts
    at.run()
    at.slider(key="q").set_value(1)
    _small_grid(at).run()
    assert not at.exception, [e.value for e in at.exception]
    assert any("already in the cache" in s.value for s in at.success)
    assert [h.value for h in at.subheader] == ["Best candidate · C2I search"]


def test_explore_takes_a_k_or_rho_typed_in_and_names_one_that_is_no_number(app_env):
    """The grids offered only the presets (K up to 16, LASER's ρ values), where the CLI takes any value."""
    at = page("pages/3_Explore.py")
    at.slider(key="q").set_value(2)
    at.multiselect(key="ks").set_value([1, "32"])  # typed in, as the box lets one do
    at.multiselect(key="rhos").set_value([0.5, "0.3"]).run()
    assert not at.exception and not at.error, [e.value for e in at.error]
    assert at.code[0].value.startswith("python -m laser_core search --q 2 --ks 1,32 --rhos 0.5,0.3 --model ")
    at.run()  # typed values are options from now on, kept like the presets
    assert (at.multiselect(key="ks").value, at.multiselect(key="rhos").value) == ([1, 32], [0.5, 0.3])
    assert "32" in at.multiselect(key="ks").options and "0.3" in at.multiselect(key="rhos").options
    at.multiselect(key="rhos").set_value([0.5, "a third"]).run()
    assert [e.value for e in at.error] == ["ρ grid (fraction of rank kept): 'a third' is not a number."]
    at.multiselect(key="rhos").set_value([0.5, "1.5"]).run()
    assert [e.value for e in at.error] == ["rho must be in (0, 1], got 1.5"]


def test_settings_survive_a_visit_to_another_page_and_layer_scores_shares_them_with_explore(app_env):
    at = session("app.py").run()
    at.switch_page("pages/2_Layer_scores.py").run()
    at.slider(key="tail").set_value(0.3)
    at.slider(key="q").set_value(2).run()
    at.switch_page("pages/3_Explore.py").run()
    assert not at.exception, [e.value for e in at.exception]
    assert (at.slider(key="tail").value, at.slider(key="q").value) == (0.3, 2)  # the same settings here
    at.multiselect(key="ks").set_value([1])
    at.multiselect(key="rhos").set_value([0.5]).run()
    at.switch_page("pages/4_Results.py").run()  # a page without these widgets: Streamlit drops their values
    at.switch_page("pages/3_Explore.py").run()
    assert (at.multiselect(key="ks").value, at.multiselect(key="rhos").value, at.slider(key="q").value,
            at.slider(key="tail").value) == ([1], [0.5], 2, 0.3)
    at.radio(key="method").set_value("LASER sweep (brute force)").run()
    at.select_slider(key="layer_range").set_value((1, 1))
    at.multiselect(key="types").set_value(["up"]).run()
    at.switch_page("pages/5_Export.py").run()
    at.switch_page("pages/3_Explore.py").run()
    assert (at.radio(key="method").value, at.select_slider(key="layer_range").value,
            at.multiselect(key="types").value) == ("LASER sweep (brute force)", (1, 1), ["up"])
    assert "1 candidate evaluated on the validation split (100 examples)." in [c.value for c in at.caption]
    at.switch_page("pages/2_Layer_scores.py").run()
    assert (at.slider(key="tail").value, at.slider(key="q").value) == (0.3, 2)


def test_each_step_links_to_the_next_page_of_the_workflow(app_env, searched):
    """Model & task named the next page in words ("in the sidebar"); Layer scores and a finished search named none."""
    def link(a: AppTest) -> tuple[str, str]:
        assert not a.exception, [e.value for e in a.exception]
        (one,) = a.get("page_link")  # one link, to the page after this one
        return one.proto.label, one.proto.page_script_hash

    at = session("app.py").run()
    label, to_scores = link(at)
    assert label == "Next: Layer scores — the singular-value gradients of every matrix, scored"
    at.switch_page("pages/2_Layer_scores.py").run()
    at.slider(key="q").set_value(2).run()  # the fixture's search tried the top 2 (scores from the cache)
    label, to_explore = link(at)
    assert label == "Next: Explore — try the top 2 with K and ρ grids, or one matrix with sliders"
    at.switch_page("pages/3_Explore.py").run()
    _small_grid(at).run()
    assert any("already in the cache" in s.value for s in at.success)  # the fixture's search, shown whole
    label, to_export = link(at)
    assert label.startswith("Next: Export — the best candidate's recipe")
    assert len({to_scores, to_explore, to_export}) == 3 and all((to_scores, to_explore, to_export))
    alone = page("pages/1_Model_and_task.py")  # outside app.py's navigation there is no page to link to
    assert not alone.get("page_link") and any(i.value.startswith("Next: **Layer scores** in the sidebar — ")
                                              for i in alone.info)


def test_explore_speed_settings_reach_the_command_stay_across_pages_and_find_the_same_search_cached(app_env, searched):
    """Prefix reuse, its memory and the candidates run together could be set on the CLI only: a GPU short of
    memory had no way to take less from the dashboard. They change no result: the search the fixture cached with the
    defaults is this one; early stop's report is its own."""
    at = session("app.py").run()
    at.switch_page("pages/3_Explore.py").run()
    at.slider(key="q").set_value(2)
    _small_grid(at).run()
    assert any("already in the cache" in s.value for s in at.success)
    assert "Auto here: 1 (one at a time)." in at.number_input(key="stack").help  # a CPU: none run together
    at.checkbox(key="prefix_reuse").uncheck()
    at.number_input(key="prefix_budget_mb").set_value(64)
    at.number_input(key="stack").set_value(2).run()
    at.switch_page("pages/4_Results.py").run()  # a page without these widgets: Streamlit drops their values
    at.switch_page("pages/3_Explore.py").run()
    assert not at.exception, [e.value for e in at.exception]
    assert (at.checkbox(key="prefix_reuse").value, at.number_input(key="prefix_budget_mb").value,
            at.number_input(key="stack").value) == (False, 64, 2)
    assert at.number_input(key="prefix_budget_mb").disabled  # no states are cached without prefix reuse
    assert at.code[0].value.startswith("python -m laser_core search --q 2 --ks 1,2 --rhos 0.5,0.1 "
                                       "--prefix-budget-mb 64 --stack 2 --no-prefix-reuse --model ")
    assert any("already in the cache" in s.value for s in at.success)  # the same search, run faster or leaner
    at.checkbox(key="early").check().run()
    assert not any("already in the cache" in s.value for s in at.success)
    assert "Early stop follows one candidate at a time: with it on, candidates are not run together." in \
        [c.value for c in at.caption]


def test_a_c2i_search_on_explore_tries_the_top_q_that_layer_scores_lists_under_its_settings(app_env):
    scores = page("pages/2_Layer_scores.py")
    if any(b.label == "Compute scores" for b in scores.button):
        click(scores, "Compute scores")
    wait_for(scores, lambda a: len(a.get("plotly_chart")) == 2)
    scores.slider(key="q").set_value(3).run()
    top_default = scores.session_state["top_q"]
    scores.slider(key="tail").set_value(0.1).run()
    top = scores.session_state["top_q"]
    assert top != top_default  # else this test could not tell which trailing fraction Explore used
    at = session("pages/3_Explore.py")
    for key in ("score", "tail", "q"):  # as Layer scores leaves them
        at.session_state[key] = scores.session_state[key]
    at.run()
    _small_grid(at)
    at.multiselect(key="ks").set_value([1])
    at.multiselect(key="rhos").set_value([0.5]).run()
    said = ", ".join("layer {} {}".format(*n.split(".")[2:5:2]).replace("_proj", "") for n in top)
    assert f"Tries the top 3 by the paper score: {said}" in [c.value for c in at.caption]
    click(at, "Run")
    wait_for(at, lambda a: any("finished" in s.value for s in a.success))
    assert [c["name"] for c in at.session_state["last_report"]["candidates"]] == top


def test_explore_shows_a_running_searchs_best_so_far_and_hides_the_previous_report(app_env):
    import laser_ui
    name = "model.layers.1.mlp.down_proj.weight"
    rows = [{"name": name, "layer": 1, "type": "down", "k": 1, "rho": rho, "accuracy": acc, "log_loss": 1.0,
             "split": "val", "ranks": [1]} for rho, acc in ((0.5, 0.52), (0.1, 0.58))]
    lm, _, splits = app_model(app_env)
    job = laser_ui.Job("running-search", "laser search", "search", "elsewhere", rows=rows,
                       base={"name": None, "accuracy": 0.5, "log_loss": 1.0}, made_on=laser_ui.made_on(lm, splits))
    jobs = laser_ui.job_manager().jobs
    jobs[job.id] = job
    try:
        at = session("pages/3_Explore.py")
        at.session_state["job_search"] = job.id
        at.session_state["last_report"] = kept(app_env, {"best": {"name": "an earlier search's best"}, "method": "c2i"})
        at.run()
        assert not at.exception, [e.value for e in at.exception]
        assert not [h.value for h in at.subheader]  # no "Best candidate" of the earlier search under the live one
        assert any(c.value.startswith(f"Best so far: `{name}` K=1, ρ=0.1: val accuracy 0.580 (base 0.500)")
                   for c in at.caption)
        assert [v for line in heatmap_z(at) for v in line if v is not None] == [pytest.approx(0.08)]
    finally:
        del jobs[job.id]


def test_explore_says_what_a_search_left_out_and_why_and_only_on_the_model_and_task_it_searched(app_env, tmp_path):
    left = [{"name": "model.layers.0.self_attn.k_proj.weight", "layer": 0, "type": "k", "k": 32, "rho": None,
             "error": "K=32 is larger than its 16 rows: not tried (K <= 16 fits it)"},
            {"name": "model.layers.1.mlp.up_proj.weight", "layer": 1, "type": "up", "k": 1, "rho": 0.5,
             "error": "the log-loss is NaN or infinite"}]
    at = session("pages/3_Explore.py")
    report = {"method": "c2i", "status": "complete", "best": None, "candidates": [], "skipped": left}
    at.session_state["last_report"] = kept(app_env, report)
    at.run()
    assert not at.exception, [e.value for e in at.exception]
    assert any("No candidate of this search finished" in w.value for w in at.warning)
    assert "Below: the last search of this session, run with other settings than those above." in \
        [c.value for c in at.caption]
    assert [e.label for e in at.expander if "left out" in e.label] == ["2 left out of this search"]
    said = "\n".join(m.value for m in at.markdown)
    assert ("`model.layers.0.self_attn.k_proj.weight K=32: K=32 is larger than its 16 rows: not tried (K <= 16 fits it)`"
            in said)
    assert "`model.layers.1.mlp.up_proj.weight K=1 rho=0.5: the log-loss is NaN or infinite`" in said
    # made on another seed's splits, or another task: not this session's search (before, it was shown all the same)
    for other in (kept(app_env, report, seed=1), {**kept(app_env, report), "task": {"digest": "another task"}}):
        at.session_state["last_report"] = other
        at.run()
        assert not at.exception and not [w for w in at.warning if "No candidate" in w.value]
    from laser_core import TaskSpec
    at.session_state["last_report"] = kept(app_env, report)
    at.session_state["task_spec"] = TaskSpec(str(write_mc_jsonl(tmp_path / "other.jsonl", 300, seed=3)))
    at.run()
    assert not at.exception and not [w for w in at.warning if "No candidate" in w.value]


def test_explore_laser_sweep_refuses_an_empty_type_selection(app_env):
    at = page("pages/3_Explore.py")
    at.radio(key="method").set_value("LASER sweep (brute force)").run()
    assert "ks" not in [m.key for m in at.multiselect]  # LASER reduces whole matrices: no K grid to pick
    assert any(c.value.startswith("K = 1") for c in at.caption)
    assert any(" candidates, each evaluated on the validation split (100 examples)." in c.value for c in at.caption)
    at.multiselect(key="types").set_value([]).run()
    assert any("at least one matrix type" in e.value for e in at.error)
    at.multiselect(key="types").set_value(["up"]).run()
    at.multiselect(key="rhos").set_value([]).run()
    assert any("rho grid is empty" in e.value for e in at.error)


def test_explore_one_candidate_from_sliders_evaluates_it_against_the_base(app_env):
    from laser_core import Edit, edited
    from laser_core.evaluate import evaluate
    from laser_core.reduction import block_ranks, block_svd, block_truncate

    name = "model.layers.1.mlp.up_proj.weight"
    at = session("pages/3_Explore.py")
    at.session_state["selected_matrix"] = name  # as the Layer scores page leaves it
    at.run()
    at.radio(key="method").set_value("One candidate (sliders)").run()
    assert at.selectbox(key="one_matrix").value == name
    at.select_slider(key="one_k").set_value(2)
    at.select_slider(key="one_rho").set_value(0.25).run()
    lm, _, splits = app_model(app_env)
    assert f"rank kept per block {block_ranks(lm.ref(name).shape, 2, 0.25)}" in at.caption[0].value
    w = lm.model.get_parameter(name).detach()  # what the edit keeps of the matrix, from the reduced matrix itself
    share = 1 - float(((w - block_truncate(block_svd(w, 2), 0.25)) ** 2).sum() / (w ** 2).sum())
    assert f"keeps {share:.1%} of the squared Frobenius norm (relative error of the reduced matrix " \
           f"{(1 - share) ** 0.5:.3f})" in at.caption[0].value
    (chart,) = [json.loads(c.proto.spec) for c in at.get("plotly_chart")]
    assert chart["layout"]["title"]["text"] == "L1.up K=2 ρ=0.25: singular values of each row block"
    kept = [t for t in chart["data"] if t["name"] == "kept"]  # per block, its kept singular values in colour
    assert [len(t["y"]) for t in kept] == block_ranks(lm.ref(name).shape, 2, 0.25)
    with pytest.MonkeyPatch.context() as mp:  # a job holds the model (its edit is in the weights): no spectrum yet
        mp.setattr("laser_core.reduction.block_spectrum", lambda *a, **k: None)
        import laser_ui
        laser_ui._block_spectrum.clear()  # spectra are kept per model, matrix and K across sessions
        at.select_slider(key="one_k").set_value(8).run()
        assert not at.get("plotly_chart")
        assert any("The spectrum shows once the running job frees the model" in c.value for c in at.caption)
    at.run()  # the job is done: the spectrum comes
    assert len(at.get("plotly_chart")) == 1 and "keeps" in at.caption[0].value
    at.select_slider(key="one_k").set_value(2).run()
    click(at, "Evaluate on calibration (100 examples)")
    wait_for(at, lambda a: "This edit (calib)" in metrics(a))
    click(at, "Evaluate on held-out test (300 examples)")
    wait_for(at, lambda a: "This edit (held-out test)" in metrics(a))
    with edited(lm, [Edit(name, 2, 0.25)]):  # the same edit, evaluated here without the app or its cache
        calib, test = evaluate(lm, splits.examples("calib")), evaluate(lm, splits.examples("test"))
    shown = metrics(at)
    assert shown["This edit (calib)"] == f"{calib.accuracy:.3f}"
    assert shown["This edit (held-out test)"] == f"{test.accuracy:.3f}"
    base = evaluate(lm, splits.examples("calib")).log_loss
    measured = f"Calibration log-loss {base:.4f} → {calib.log_loss:.4f} ({calib.log_loss - base:+.4f}"
    assert any(c.value.startswith(measured) for c in at.caption)
    from laser_core.config import PAPER_KS
    from laser_core.gradients import first_order_gain
    from laser_core.scores import load_spectra
    from laser_core.store import null_store
    spectra = load_spectra(lm, splits, null_store(), PAPER_KS)
    with pytest.MonkeyPatch.context() as mp:  # scores cached: the prediction beside it (not cached for the tests after)
        mp.setattr("laser_core.scores.cached_spectra", lambda *a, **k: spectra)
        at.run()
    predicted = -first_order_gain(spectra[0][name], 2, 0.25)
    assert f"{measured}; predicted {predicted:+.4f} to first order: a linear estimate, looser the more of the " \
           "spectrum a reduction drops)." in [c.value for c in at.caption]
    base_test = evaluate(lm, splits.examples("test"))
    change = paired_change(base_test.correct, test.correct)  # held-out only: calibration gets no such verdict
    assert [c.value for c in at.caption if "held-out questions" in c.value] == [
        f"Change on the same held-out questions: {change.summary()}. A change is called real when the McNemar test "
        "gives p < 0.05; the interval is Newcombe's for paired accuracies."]


def test_explore_searches_and_slides_with_clustered_row_blocks_and_results_tell_them_apart(app_env):
    from laser_core import Edit, edited
    from laser_core.evaluate import evaluate
    from laser_core.grouping import row_order
    from laser_core.reduction import block_svd, block_truncate

    at = page("pages/3_Explore.py")
    at.slider(key="q").set_value(1)
    at.multiselect(key="ks").set_value([2])
    at.multiselect(key="rhos").set_value([0.5])
    at.radio(key="grouping").set_value("clustered").run()
    assert at.code[0].value.startswith("python -m laser_core search --q 1 --ks 2 --grouping clustered --rhos 0.5 ")
    at.selectbox(key="score").set_value("first_order").run()  # over another K grid than Layer scores computes
    assert any("Layer scores computes them for the K grid 1, 2, 4, 8, not this one" in c.value for c in at.caption)
    at.selectbox(key="score").set_value("paper").run()
    click(at, "Run")
    wait_for(at, lambda a: any("finished" in s.value for s in a.success))
    lm, _, splits = app_model(app_env)
    (best,) = [m.value for m in at.markdown if "clustered" in m.value and "ranks" in m.value]
    name = best.split("`")[1]
    with edited(lm, [Edit(name, 2, 0.5, "clustered")]):  # the same edit, evaluated without the app or its cache
        assert metrics(at)["Best (calib)"] == f"{evaluate(lm, splits.examples('calib')).accuracy:.3f}"
    results = page("pages/4_Results.py")
    table = next(d.value for d in results.dataframe if "grouping" in d.value.columns)
    assert "clustered" in set(table["grouping"])
    at.radio(key="method").set_value("One candidate (sliders)").run()
    assert at.radio(key="one_grouping").disabled  # K = 1: one block of every row
    at.selectbox(key="one_matrix").set_value(name)
    at.select_slider(key="one_k").set_value(2)
    at.select_slider(key="one_rho").set_value(0.5).run()  # K = 1 left its row blocks disabled: one block either way
    at.radio(key="one_grouping").set_value("clustered").run()
    w = lm.model.get_parameter(name).detach()
    share = 1 - float(((w - block_truncate(block_svd(w, 2, "clustered"), 0.5)) ** 2).sum() / (w ** 2).sum())
    assert f"keeps {share:.1%} of the squared Frobenius norm" in at.caption[0].value
    (chart,) = [json.loads(c.proto.spec) for c in at.get("plotly_chart")]
    assert chart["layout"]["title"]["text"].endswith("K=2 clustered ρ=0.5: singular values of each row block")
    assert "This edit (calib)" in metrics(at)  # the search evaluated this very edit: from the cache
    export = page("pages/5_Export.py")
    pick = export.selectbox(key="export_pick")
    pick.set_value(next(i for i, label in enumerate(pick.options) if "K=2 clustered ρ=0.5 (calib" in label)).run()
    recipe = json.loads(next(c.value for c in export.code if c.language == "json"))
    assert [(e["name"], e["grouping"]) for e in recipe["edits"]] == [(name, "clustered")]
    assert recipe["edits"][0]["row_order"] == row_order(w, 2, "clustered").tolist()  # the blocks apply will reduce
    assert any("re-run the search that found it" in c.value and "--grouping clustered" in c.value
               for c in export.caption)
    folder = next(t for t in export.text_input if t.label == "Folder").value
    assert folder.endswith(f"-K2-clustered-rho0.5-{lm.fingerprint[:8]}")


def test_export_keeps_the_candidate_picked_on_coming_back_until_explore_shows_another_search(app_env, searched):
    """Leaving Export drops its box's widget state (Streamlit forgets a widget not drawn): on coming back the box
    shows the candidate picked then, not the best again; once Explore shows another search, that search's best."""
    import laser_ui
    at = page("pages/5_Export.py")
    pick = at.selectbox(key="export_pick")
    assert pick.value == 0 and len(pick.options) > 2
    pick.set_value(2).run()
    label = at.selectbox(key="export_pick").options[2]
    shown, picked = at.session_state["_export_kept"]
    assert shown == laser_ui.candidate_id(None)  # no search on Explore in this session
    back = page_as("pages/5_Export.py", _export_kept=(shown, picked))  # no widget state: as on coming back
    assert back.selectbox(key="export_pick").value == 2 and back.selectbox(key="export_pick").options[2] == label
    other = ("model.layers.0.mlp.up_proj.weight", 1, 0.5, "contiguous")  # Explore has shown another search since
    assert page_as("pages/5_Export.py", _export_kept=(other, picked)).selectbox(key="export_pick").value == 0


def test_explore_one_candidate_preselects_the_top_scored_matrix_when_layer_scores_chose_none(app_env, searched):
    from laser_core import SearchConfig, Store
    from laser_core.scores import c2i_matrices, cached_spectra, score_table
    lm, _, splits = app_model(app_env)
    spectra, _ = cached_spectra(lm, splits, Store())  # the search left them in the cache
    top = c2i_matrices(score_table(lm, spectra, "paper", SearchConfig()), 1)[0]
    assert top != lm.matrices[0].name  # else this test could not tell it from the first matrix
    at = page("pages/3_Explore.py")
    at.radio(key="method").set_value("One candidate (sliders)").run()
    assert at.selectbox(key="one_matrix").value == top


def test_explore_one_candidate_runs_an_edit_that_a_search_stopped_early_instead_of_showing_its_part(app_env):
    from laser_core import Edit, Store
    from laser_core.candidates import evaluate_candidate
    from laser_core.store import null_store
    name = "model.layers.0.mlp.down_proj.weight"
    lm, _, splits = app_model(app_env)
    assert evaluate_candidate(lm, Edit(name, 2, 0.3), splits, "calib", Store(), beat=(0.99, 0.0))["stopped_early"]
    at = session("pages/3_Explore.py")
    at.session_state["selected_matrix"] = name
    at.run()
    at.radio(key="method").set_value("One candidate (sliders)").run()
    at.select_slider(key="one_k").set_value(2)
    at.select_slider(key="one_rho").set_value(0.3).run()
    assert "This edit (calib)" not in metrics(at)  # a stopped candidate's accuracy counts only what it saw
    click(at, "Evaluate on calibration (100 examples)")
    wait_for(at, lambda a: "This edit (calib)" in metrics(a))
    full = evaluate_candidate(lm, Edit(name, 2, 0.3), splits, "calib", null_store())
    assert metrics(at)["This edit (calib)"] == f"{full['accuracy']:.3f}"


def test_a_cancelled_job_says_what_it_kept_as_its_kind_keeps_it():
    """A search keeps its finished candidates; an evaluation job (other tasks, held-out test) its finished
    evaluations. Before, every cancelled job said "0 finished candidates kept"."""
    def script():
        import laser_ui
        for kind, rows in (("search", [{}, {}]), ("other_tasks", [])):
            laser_ui.render_job(laser_ui.Job(kind, kind, f"{kind} job", "cpu", status="cancelled", rows=rows,
                                             started=0.0, finished=1.5), table=False)

    at = AppTest.from_function(script, default_timeout=60)
    at.run()
    assert not at.exception, [e.value for e in at.exception]
    assert [w.value for w in at.warning] == ["search job: cancelled after 1.5 s; 2 finished candidates kept",
                                             "other_tasks job: cancelled after 1.5 s; what it had finished is kept "
                                             "in the cache"]


def test_a_comparison_on_a_generation_task_names_every_accepted_answer():
    """The flipped examples' "gold" of a generation task lists its accepted answers; before, the first alone."""
    def script():
        import laser_ui
        from laser_core.tasks import Example

        class Splits:
            def examples(self, split):
                return [Example("The capital of France is", targets=(" Paris", " paris, France")),
                        Example("Two and two make", targets=(" four", " 4"))]

        def doc(correct, said):
            return {"accuracy": sum(correct) / 2, "log_loss": 1.0, "correct": correct, "predictions": said}
        laser_ui.render_comparison(laser_ui.Job("j", "compare", "compare", "cpu", status="done", result={
            "A": doc([True, True], ["Paris.", "four"]), "B": doc([False, True], ["Lyon.", "four"])}), Splits())

    at = AppTest.from_function(script, default_timeout=60)
    at.run()
    assert not at.exception, [e.value for e in at.exception]
    flips = next(d.value for d in at.dataframe if "now" in d.value.columns)
    assert flips.to_dict("records") == [{"prompt": "The capital of France is", "gold": "Paris | paris, France",
                                         "A": "Paris.", "B": "Lyon.", "now": "broken"}]


def test_rho_axis_labels_every_rho_but_one_crowding_the_last_label():
    """LASER's rho grid (0.9, 0.75, ...) put 0.75 and 0.9 within a tenth of a decade: their labels overlapped."""
    import laser_ui
    ticks = laser_ui.rho_ticks([0.9, 0.75, 0.5, 0.33, 0.25, 0.1, 0.05, 0.01, 0.005, 0.5])
    assert ticks["tickvals"] == [0.005, 0.01, 0.05, 0.1, 0.25, 0.33, 0.5, 0.75, 0.9]  # each rho keeps its tick
    assert ticks["ticktext"] == ["0.005", "0.01", "0.05", "0.1", "0.25", "0.33", "0.5", "0.75", ""]
    assert ticks["tickangle"] == -45 and laser_ui.rho_ticks([0.5, 0.1])["tickangle"] == 0


def test_results_page_lists_cached_candidates_and_compares_on_test(app_env, searched):
    at = page("pages/4_Results.py")
    assert not at.error, [e.value for e in at.error]
    scored = any("Rank correlation (Spearman)" in c.value for c in at.caption)  # where other tests' rows make 3
    assert len(at.get("plotly_chart")) == 3 + scored
    assert at.radio(key="res_split").value == "calib" and "calibration" in at.radio(key="res_split").options
    table = at.dataframe[0].value
    base = float(metrics(at)["Base accuracy (calib)"])
    z = [v for line in heatmap_z(at) for v in line if v is not None]  # one cell per evaluated matrix
    assert len(z) == table["name"].nunique() and max(z) == pytest.approx(table["accuracy"].max() - base)
    assert at.selectbox(key="res_matrix").value == table.iloc[0]["name"]  # the best row's matrix is shown first
    # plain names: Streamlit (1.67) keeps showing a selected option's old label when a rerun changes it
    assert set(at.selectbox(key="res_matrix").options) == set(table["name"])
    titles = [json.loads(c.proto.spec)["layout"].get("title", {}).get("text") for c in at.get("plotly_chart")]
    assert f"{table.iloc[0]['name']} (best {table.iloc[0]['accuracy']:.3f})" in titles  # its best, in its chart
    (rho_axis,) = [json.loads(c.proto.spec)["layout"]["xaxis"] for c in at.get("plotly_chart")
                   if json.loads(c.proto.spec)["layout"].get("title", {}).get("text", "").endswith(")")
                   and json.loads(c.proto.spec)["layout"]["xaxis"].get("type") == "log"]
    rhos = sorted(set(table[table["name"] == table.iloc[0]["name"]]["rho"]))  # searched 0.5 and 0.1: one decade
    assert (rho_axis["tickvals"], rho_axis["ticktext"]) == (rhos, [f"{r:g}" for r in rhos])  # each labelled
    assert table["accuracy"].is_monotonic_decreasing
    at.selectbox(key="cmp_b").set_value(at.selectbox(key="cmp_b").options[-1])  # the worst: some answers flip
    click(at, "Compare on held-out test")
    wait_for(at, lambda a: "B accuracy (test)" in metrics(a))
    said = next(c.value for c in at.caption if "held-out questions" in c.value)
    fixed, broken = map(int, re.search(r"(\d+) fixed, (\d+) broken of 300", said).groups())
    flips = [list(d.value["now"]) for d in at.dataframe if "now" in d.value.columns]  # as the caption counts them
    assert fixed + broken > 0 and [(f.count("fixed"), f.count("broken")) for f in flips] == [(fixed, broken)]
    at.radio(key="res_split").set_value("test").run()  # held-out rows: each paired with the base's answers
    table, base = at.dataframe[0].value, float(metrics(at)["Base accuracy (test)"])
    assert (table["vs_base"] - (table["accuracy"] - base)).abs().max() < 1e-9
    assert json.loads(at.dataframe[0].proto.columns)["vs_base"]["type_config"]["format"] == "%+.3f"  # shown signed
    assert list(table["beyond_noise"]) == ["yes" if p < 0.05 else "" for p in table["p"]]
    family = [c.value for c in at.caption if "Read together" in c.value]  # the search's best and B: two tests
    assert len(table) >= 2 and len(family) == 1 and family[0].endswith(family_summary(
        [(f"L{r.layer}.{r.type} K={r.k} ρ={r.rho:g}", r.p) for r in table.itertuples()]))
    b_row = table[table["name"] == at.selectbox(key="cmp_b").value.split(" K=")[0]]
    assert any(abs(v - (fixed - broken) / 300) < 1e-9 for v in b_row["vs_base"])
    at.radio(key="res_split").set_value("calib").run()  # the split the search chose on: no such columns
    assert "vs_base" not in at.dataframe[0].value.columns


def test_export_page_offers_the_recipe_and_saves_the_edited_model(app_env, searched, tmp_path):
    at = page("pages/5_Export.py")
    assert len(at.get("download_button")) == 1
    assert '"laser_lab_recipe": 1' in at.code[0].value
    spec_flags = f"--model {app_env['LASER_LAB_DEFAULT_MODEL']} --task {app_env['LASER_LAB_DEFAULT_TASK']}"
    said = next(c.value for c in at.caption if "python -m laser_core search" in c.value)  # a session without Explore:
    assert said.startswith("or re-run the search that found it: `") and said.endswith(f"{spec_flags}`")  # the cache's
    from laser_core import ModelSpec, SearchConfig, Store
    from laser_core.cli_args import parser, search_config_of
    from laser_core.config import to_dict
    from laser_core.search import report_key
    cmd = said.split("`")[1].split()[3:]  # after "python -m laser_core"
    lm, _, splits = app_model(app_env)
    cached = Store().get_json(report_key(Store(), lm, splits, search_config_of(parser().parse_args(cmd), "c2i")))
    e = json.loads(at.code[0].value)["edits"][0]
    assert any((c["name"], c["k"], c["rho"]) == (e["name"], e["k"], e["rho"]) for c in cached["candidates"])
    assert json.loads(at.code[0].value)["search"] == cached["config"]  # the recipe says how it was found
    found = {"name": e["name"], "k": e["k"], "rho": e["rho"]}
    found_by = session("pages/5_Export.py")
    found_by.session_state["last_report"] = kept(app_env, {  # as Explore leaves a search that found this candidate
        "search_split": "calib", "best": found, "candidates": [found],
        "config": to_dict(SearchConfig(q=2, ks=(1, 2), rhos=(0.5, 0.1), tail_fraction=0.3))})
    found_by.run()
    assert ("or re-run the search that found it: `python -m laser_core search --q 2 --ks 1,2 --tail-fraction 0.3 "
            f"--rhos 0.5,0.1 {spec_flags}`") in [c.value for c in found_by.caption]
    assert json.loads(found_by.code[0].value)["search"]["tail_fraction"] == 0.3
    at.radio(key="fmt").set_value("YAML").run()
    assert "laser_lab_recipe: 1" in at.code[0].value
    folder = next(t for t in at.text_input if t.label == "Folder")  # named by the candidate, so that saving another
    ref, task = lm.ref(e["name"]), splits.task.name  # candidate does not meet its folder
    assert Path(folder.value).name == f"{task}-L{ref.layer}.{ref.type}-K{e['k']}-rho{e['rho']:g}-{lm.fingerprint[:8]}"
    folder.set_value(str(tmp_path / "edited"))
    click(at, "Save edited model")
    assert any("Saved to" in s.value for s in at.success)
    assert (tmp_path / "edited" / "model.safetensors").exists()
    click(at, "Load the saved model here")  # the session's model from now on (app.py then opens Model & task)
    spec = at.session_state["model_spec"]
    assert (spec.source, spec.device, spec.dtype) == (str(tmp_path / "edited"), "auto", "float32")  # as loaded
    loaded = page_as("pages/1_Model_and_task.py", model_spec=spec)
    assert f"Model: `{tmp_path / 'edited'}`" in loaded.sidebar.caption[0].value
    assert loaded.text_input(key="model_path").value == str(tmp_path / "edited")  # the form shows it loaded
    at.session_state["model_spec"] = ModelSpec(app_env["LASER_LAB_DEFAULT_MODEL"])
    click(at, "Save edited model")  # second time: the folder exists
    assert any("already exists" in e.value for e in at.error) and not any("Saved to" in s.value for s in at.success)


def test_export_computes_held_out_accuracy_into_a_recipe_that_apply_confirms(app_env, searched, tmp_path):
    from laser_core.recipe import apply_recipe
    at = page("pages/5_Export.py")
    for i in range(len(at.selectbox(key="export_pick").options)):  # a candidate without a cached held-out result
        at.selectbox(key="export_pick").set_value(i).run()
        if any(b.label == "Evaluate on held-out test" for b in at.button):
            break
    else:
        pytest.fail("every candidate already has a held-out result; the test needs one without")
    recipe = json.loads(at.code[0].value)
    assert recipe["method"] == "c2i" and recipe["metrics"]["edited_test"] is None
    click(at, "Evaluate on held-out test")
    import laser_ui
    e, ref = recipe["edits"][0], app_model(app_env)[0].ref(recipe["edits"][0]["name"])
    job = laser_ui.job_manager().jobs[at.session_state["job_export_test"]]  # named: its candidate, if another is picked
    blocks = f"{e['k']}" + (f" {e['grouping']}" if e.get("grouping", "contiguous") != "contiguous" else "")
    assert job.label == f"L{ref.layer}.{ref.type} K={blocks} ρ={e['rho']:g} on held-out test"
    wait_for(at, lambda a: "Edited (held-out test)" in metrics(a))
    assert seen(at, "export_test")
    recipe = json.loads(at.code[0].value)
    assert metrics(at)["Edited (held-out test)"] == f"{recipe['metrics']['edited_test']['accuracy']:.3f}"
    assert recipe["metrics"]["base_test"]["n"] == recipe["metrics"]["edited_test"]["n"] == recipe["task"]["n_test"]
    change = recipe["metrics"]["held_out_change"]  # paired on the same questions, as the page says below the metrics
    assert change["n"] == recipe["task"]["n_test"] and change["change"] == pytest.approx(
        recipe["metrics"]["edited_test"]["accuracy"] - recipe["metrics"]["base_test"]["accuracy"])
    assert any(f"{change['fixed']} fixed, {change['broken']} broken of {change['n']}" in c.value for c in at.caption)
    check = apply_recipe(recipe, tmp_path / "edited")["check"]
    assert check["matches"] and check["expected"] == recipe["metrics"]["edited_test"]


def test_export_evaluates_the_chosen_edit_on_the_other_tasks_in_the_background(app_env, searched, tmp_path,
                                                                                 monkeypatch):
    """An edit chosen on one task can cost others: Export measures it on them, paired with the base."""
    from laser_core import Edit, TaskSpec, load_task, make_splits
    from laser_core import other_tasks
    from laser_core.candidates import evaluate_edits
    from laser_core.store import null_store
    others = [str(write_mc_jsonl(tmp_path / f"{name}.jsonl", 500, seed=i + 1)) for i, name in enumerate("ab")]
    small = str(write_mc_jsonl(tmp_path / "small.jsonl", 60))  # too few for the session's 100 calibration examples
    monkeypatch.setattr(other_tasks, "BUNDLED", dict.fromkeys([app_env["LASER_LAB_DEFAULT_TASK"], *others, small]))
    at = page("pages/5_Export.py")  # named as app.py names it: the sidebar leaves Export's jobs to it
    assert any(c.value.startswith(f"Left out, as they cannot be split with this session's sizes: {small} (task "
                                  "'small' has 60 distinct examples, too few for 100 calibration") for c in at.caption)

    def table(a):
        return next(d.value for d in a.dataframe if "beyond_noise" in d.value.columns and "task" in d.value.columns)
    assert list(table(at)["task"]) == ["a", "b"] and table(at)["edited"].isna().all()  # the session's own left out
    assert any(c.value.startswith("Not evaluated yet: a, b") for c in at.caption)
    assert any(c.value.endswith(f"--task {app_env['LASER_LAB_DEFAULT_TASK']} --other-tasks`") for c in at.caption)
    # the job's call (the one that can be cancelled) waits
    with held(monkeypatch, other_tasks, "other_task_effects", gate=lambda *a, **k: k.get("cancel") is not None):
        click(at, "Evaluate on the other tasks")
        e = json.loads(at.code[0].value)["edits"][0]
        edit, ref = Edit(e["name"], e["k"], e["rho"]), app_model(app_env)[0].ref(e["name"])
        named = f"L{ref.layer}.{ref.type} K={e['k']} ρ={e['rho']:g} on the other tasks"
        # another candidate picked meanwhile: the running check names its own, and this one's waits for it
        at.selectbox(key="export_pick").set_value(at.selectbox(key="export_pick").value + 1).run()
        assert not at.get("progress") and f"Running: {named}. This check can start when it ends." in \
            [c.value for c in at.caption]
        assert next(b for b in at.button if b.label == "Evaluate on the other tasks").disabled
    wait_for(at, lambda a: not any(c.value.startswith("Running: ") for c in a.caption))
    at.run()  # and after the run that saw it end (unnamed, the sidebar reported it from then on: a flaky failure)
    assert not [m for m in at.success if "on the other tasks" in m.value]  # nor its end shown as this one's
    assert table(at)["edited"].isna().all()
    at.selectbox(key="export_pick").set_value(at.selectbox(key="export_pick").value - 1).run()
    wait_for(at, lambda a: table(a)["edited"].notna().all())
    assert not any(b.label == "Evaluate on the other tasks" for b in at.button) and seen(at, "other_tasks")
    for task, row in zip(others, table(at).itertuples()):  # computed afresh, not read from the app's cache
        spec = TaskSpec(task)
        splits = make_splits(load_task(spec), spec)
        base, after = (evaluate_edits(app_model(app_env)[0], e, splits, "test", null_store()) for e in ([], [edit]))
        assert (row.n, row.base, row.edited) == (300, base["accuracy"], after["accuracy"])
        assert row.vs_base == pytest.approx(after["accuracy"] - base["accuracy"])
    assert page("pages/5_Export.py") and table(page("pages/5_Export.py"))["edited"].notna().all()  # from the cache
    carried = json.loads(at.code[0].value)["metrics"]["other_tasks"]  # the recipe (and a saved model's card) has them
    assert [(t["task"], t["edited"], t["change"]["change"]) for t in carried] == \
        [(row.task, row.edited, pytest.approx(row.vs_base)) for row in table(at).itertuples()]


def test_export_combines_edits_of_other_matrices_and_measures_them_together(app_env, searched, tmp_path,
                                                                             monkeypatch):
    """LASER composes reductions of several matrices; before, the dashboard exported one edit only."""
    from laser_core import Edit, Store, TaskSpec, load_task, make_splits, other_tasks
    from laser_core.candidates import evaluate_edits
    from laser_core.store import null_store
    other = str(write_mc_jsonl(tmp_path / "other.jsonl", 500, seed=4))
    monkeypatch.setattr(other_tasks, "BUNDLED", dict.fromkeys([app_env["LASER_LAB_DEFAULT_TASK"], other]))
    at = page("pages/5_Export.py")
    chosen = at.selectbox(key="export_pick")
    name = chosen.format_func(chosen.value).split(" K=")[0]
    options = at.multiselect(key="combine_pick").options
    matrices = [o.split(" K=")[0] for o in options]  # each other matrix once, with its best candidate
    assert options and name not in matrices and len(set(matrices)) == len(matrices)
    at.multiselect(key="combine_pick").set_value([options[0]]).run()
    click(at, "Evaluate the 2 edits together on held-out test")
    wait_for(at, lambda a: "2 edits together (held-out test)" in metrics(a))
    assert seen(at, "combine")
    lm, _, splits = app_model(app_env)

    def edit_of(label):
        n, k, grouping, rho = re.match(r"(\S+) K=(\d+)(?: (\w+))? ρ=([\d.]+)", label).groups()
        return Edit(n, int(k), float(rho), grouping or "contiguous")
    edits = [edit_of(chosen.format_func(chosen.value)), edit_of(options[0])]
    together = evaluate_edits(lm, edits, splits, "test", null_store())  # computed afresh, not read from the app's cache
    assert metrics(at)["2 edits together (held-out test)"] == f"{together['accuracy']:.3f}"
    assert any("held-out questions" in c.value for c in at.caption)  # paired with the base: beyond noise or not
    assert [b.proto.label for b in at.get("download_button")
            if b.proto.label == "Download the combined recipe (JSON)"]
    assert evaluate_edits(lm, edits[::-1], splits, "test", Store())["cached"]  # kept, whatever the edits' order
    # a new session (or a visit after a restart) shows the combination from the cache at once, with no job to run;
    # before, it lasted as long as the session and was re-evaluated on every visit
    again = page("pages/5_Export.py")
    again.multiselect(key="combine_pick").set_value([options[0]]).run()
    assert metrics(again)["2 edits together (held-out test)"] == f"{together['accuracy']:.3f}"
    assert "Evaluate the 2 edits together on held-out test" not in [b.label for b in again.button]
    assert [b for b in again.get("download_button") if b.proto.label == "Download the combined recipe (JSON)"]
    results = page("pages/4_Results.py")  # listed on Results with the other held-out results, paired with the base
    results.radio(key="res_split").set_value("test").run()
    row = next(d.value for d in results.dataframe if "edits" in d.value.columns).iloc[0]
    from laser_ui import short_label
    shown = {short_label(lm.ref(e.name).layer, lm.ref(e.name).type, e.k, e.rho, e.grouping) for e in edits}
    assert set(row["edits"].split(" + ")) == shown and row["n_edits"] == 2
    assert row["accuracy"] == together["accuracy"] and row["vs_base"] == pytest.approx(
        together["accuracy"] - float(metrics(results)["Base accuracy (test)"]))
    # the combination on the other tasks, beside the chosen edit's own check: into its recipe and its model card
    assert len([b for b in again.button if b.label == "Evaluate on the other tasks"]) == 2
    again.button(key="other_tasks_go_combined").click().run()
    wait_for(again, lambda a: [d.value["edited"].notna().all() for d in a.dataframe if "beyond_noise" in d.value.columns]
             == [False, True])  # the chosen edit's own left as it was
    spec = TaskSpec(other)
    base_other, both_other = (evaluate_edits(lm, e, make_splits(load_task(spec), spec), "test", null_store())
                              for e in ([], edits))
    # saved as one model: both edits in its weights and in its recipe (before, Save took the chosen edit alone)
    again.radio(key="save_what").set_value("the 2 edits combined above, together").run()
    folder = next(t for t in again.text_input if t.label == "Folder")
    assert re.fullmatch(r".*-2-edits-[0-9a-f]{6}-[0-9a-f]{8}", folder.value)
    folder.set_value(str(tmp_path / "both"))
    click(again, "Save edited model")
    assert any("Saved to" in m.value for m in again.success), [e.value for e in again.error]
    import torch
    from safetensors.torch import load_file

    from laser_core import edited
    from laser_core.recipe import load_recipe
    saved = load_file(tmp_path / "both" / "model.safetensors")
    params = dict(lm.model.named_parameters())
    with edited(lm, edits):
        want = {e.name: params[e.name].detach().clone() for e in edits}
    for e in edits:
        assert torch.equal(saved[e.name], want[e.name]) and not torch.equal(saved[e.name], params[e.name])
    recipe = load_recipe(tmp_path / "both" / "laser_recipe.json")
    assert sorted((r["name"], r["k"], r["rho"]) for r in recipe["edits"]) == sorted((e.name, e.k, e.rho) for e in edits)
    assert [(t["task"], t["base"], t["edited"]) for t in recipe["metrics"]["other_tasks"]] == \
        [("other", base_other["accuracy"], both_other["accuracy"])]
    assert "## On other tasks" in (tmp_path / "both" / "README.md").read_text()


def test_export_finds_edits_to_add_greedily_on_the_search_split_and_picks_them(app_env, searched):
    """LASER composes reductions greedily; before, the user had to guess which matrices to combine."""
    from laser_core import SearchConfig, Store, run_search
    from laser_core.candidates import cached_results, doc_edit, evaluate_edits
    from laser_core.compose import compose_greedy
    from laser_core.store import null_store
    lm, _, splits = app_model(app_env)
    run_search(lm, splits, SearchConfig(q=6, ks=(1,), rhos=(0.5, 0.1)), Store())  # more matrices to add from
    at = page("pages/5_Export.py")
    chosen = at.selectbox(key="export_pick")
    start = next(d for d in cached_results(Store(), lm, splits)
                 if d["split"] == "calib" and d["name"] and chosen.format_func(chosen.value).startswith(
                     f"{d['name']} K={d['k']} ρ={d['rho']:g} "))
    docs = cached_results(Store(), lm, splits)
    want = compose_greedy(lm, splits, start, docs, null_store(), evaluate_edits(lm, [], splits, "calib", null_store()))
    find = next(b for b in at.button if b.label.startswith("Find edits to add"))
    assert re.fullmatch(rf"Find edits to add, greedily on the calibration split \({len(want.steps)} to try, about \d+ s(, longer where an edit below layer \d+ is kept)?\)",
                        find.label), find.label  # its time: from the base's evaluation and the blocks each try runs
    find.click().run()
    wait_for(at, lambda a: any(c.value.startswith("Greedy on the calibration split") for c in a.caption))
    assert seen(at, "combine")  # the composition shown from the cache: its job's end, seen
    said = next(c.value for c in at.caption if c.value.startswith("Greedy on the calibration split"))
    assert said.startswith(f"Greedy on the calibration split: {len(want.steps)} tried, {want.added} kept")
    assert want.steps, "the test needs edits to try: every other matrix's best is below the base"
    steps = next(d.value for d in at.dataframe if "edit added" in d.value.columns)
    assert list(steps["kept"] == "yes") == [s["kept"] for s in want.steps]
    assert list(steps["together"]) == pytest.approx([s["accuracy"] for s in want.steps])
    picked = at.multiselect(key="combine_pick").value  # the edits kept, picked for the combination below
    assert sorted(p.split(" (")[0] for p in picked) == sorted(f"{e.name} K={e.k} ρ={e.rho:g}" for e in want.edits[1:])
    if want.added:  # their held-out result is shown at once: the search for them evaluated it
        assert metrics(at)[f"{len(want.edits)} edits together (held-out test)"] == f"{want.result_test['accuracy']:.3f}"
    assert doc_edit(start) == want.edits[0]


def test_export_shows_a_composition_found_before_from_the_cache_and_caps_the_edits_tried(app_env, searched):
    """Before, a greedy composition lasted as long as the session that ran it, and --compose's was never shown;
    a LASER sweep's pool (a matrix per layer) could not be cut short."""
    import laser_ui
    from laser_core import SearchConfig, Store, run_search
    from laser_core.candidates import cached_results, evaluate_edits
    from laser_core.compose import compose_greedy, compose_pool
    lm, _, splits = app_model(app_env)
    run_search(lm, splits, SearchConfig(q=6, ks=(1,), rhos=(0.5, 0.1)), Store())  # more matrices to add from
    at = page("pages/5_Export.py")
    chosen = at.selectbox(key="export_pick")
    docs = cached_results(Store(), lm, splits)
    start = next(d for d in docs if d["name"] and chosen.format_func(chosen.value) == laser_ui.candidate_label(d))
    base = evaluate_edits(lm, [], splits, "calib", Store())
    pool = compose_pool(docs, start, base)
    assert len(pool) >= 2 and at.number_input(key="greedy_max").value == len(pool)

    def greedy_caption(a):
        return next((c.value for c in a.caption if c.value.startswith("Greedy on the calibration split")), None)
    for limit in (1, len(pool)):  # as ``search --compose-max 1`` and ``--compose`` leave them in the cache
        want = compose_greedy(lm, splits, start, docs, Store(), base, limit=limit)
        at.number_input(key="greedy_max").set_value(limit).run()
        left = len(pool) - limit
        assert greedy_caption(at) == (f"Greedy on the calibration split: {limit} tried, {want.added} kept"
                                      + (f", {left} more not tried (raise the limit to try them)" if left else "")
                                      + " — from the cache."), [c.value for c in at.caption]
        assert any(b.label.startswith(f"Find edits to add, greedily on the calibration split ({limit} to try, about ")
                   for b in at.button)
        steps = next(d.value for d in at.dataframe if "edit added" in d.value.columns)
        assert list(steps["together"]) == pytest.approx([s["accuracy"] for s in want.steps])
        assert sorted(p.split(" (")[0] for p in at.multiselect(key="combine_pick").value) == \
            sorted(f"{e.name} {laser_ui.k_label(e.k, e.grouping)} ρ={e.rho:g}" for e in want.edits[1:])  # kept, picked
    fresh = page("pages/5_Export.py")  # another session: the same, with no job run
    assert greedy_caption(fresh) == greedy_caption(at) and "job_combine" not in fresh.session_state
    # "all" stays all on another candidate, whose pool holds the first one's matrix: one more edit to try
    pick = fresh.selectbox(key="export_pick")
    other, label = next((i, lab) for i, lab in enumerate(pick.options) if " (calib acc" in lab and
                        lab.split(" K=")[0] not in {start["name"], *(c["name"] for c in pool)})
    pick.set_value(other).run()
    second = next(d for d in docs if d["name"] and label == laser_ui.candidate_label(d))
    assert len(compose_pool(docs, second, base)) == len(pool) + 1
    assert fresh.number_input(key="greedy_max").value == len(pool) + 1


def test_export_keeps_the_greedy_cap_and_the_edits_picked_to_combine_on_coming_back(app_env, searched):
    """Leaving Export dropped both boxes (Streamlit forgets a widget not drawn): the cap went back to all, which
    hid a composition found with the cap and offered to try them all; the edits picked were gone."""
    from laser_core import SearchConfig, Store, run_search
    lm, _, splits = app_model(app_env)
    run_search(lm, splits, SearchConfig(q=6, ks=(1,), rhos=(0.5, 0.1)), Store())  # more matrices to add from
    at = session("app.py").run()
    at.switch_page("pages/5_Export.py").run()
    assert at.number_input(key="greedy_max").value >= 2
    at.number_input(key="greedy_max").set_value(1).run()
    options = at.multiselect(key="combine_pick").options
    want = [o for o in options if o not in at.multiselect(key="combine_pick").value][-1:]  # not greedy's pick
    at.multiselect(key="combine_pick").set_value(want).run()
    at.switch_page("pages/4_Results.py").run()  # a page without these widgets
    at.switch_page("pages/5_Export.py").run()
    assert not at.exception, [e.value for e in at.exception]
    assert (at.number_input(key="greedy_max").value, at.multiselect(key="combine_pick").value) == (1, want)
    assert want and any(b.label.startswith("Find edits to add, greedily on the calibration split (1 to try, ")
                        for b in at.button)


def test_explore_and_export_warn_where_the_best_candidate_does_not_beat_the_base_model(app_env, searched):
    """Explore headed a search whose every candidate scored below the base "Best candidate" with only red deltas,
    and Export offered its recipe without a word (the CLI said "does not beat the base model")."""
    import laser_ui
    from laser_core import SearchConfig, Store, run_search
    from laser_core.candidates import better
    lm, _, splits = app_model(app_env)
    report = run_search(lm, splits, SearchConfig(q=2, ks=(1, 2), rhos=(0.5, 0.1)), Store()).to_dict()  # cached
    base = report["base"]

    def explore_warnings(status: str = "complete", **best) -> list[str]:
        shown = {**report, "status": status, "best": {**report["best"], **best}}  # the session's last search;
        at = page_as("pages/3_Explore.py", last_report=shown, q=1, rhos=[0.9])  # settings of none cached
        assert [h.value for h in at.subheader] == ["Best candidate · C2I search" + (
            " (cancelled: of the candidates it finished)" if status == "partial" else "")]
        return [w.value for w in at.warning]
    below = base["accuracy"] - 0.1
    assert explore_warnings(accuracy=below) == [
        f"No candidate of this search beats the base model on the calibration split (the best: accuracy {below:.3f} "
        f"against the base model's {base['accuracy']:.3f}). Keep the base model, or search wider: a larger q, other "
        "K or ρ, or a LASER sweep."]
    tied = explore_warnings(accuracy=base["accuracy"], log_loss=base["log_loss"] + 1)  # ranked by log-loss then
    assert len(tied) == 1 and f"log-loss {base['log_loss'] + 1:.4f} against {base['log_loss']:.4f})" in tied[0]
    assert explore_warnings(accuracy=base["accuracy"] + 0.1) == []
    wrong = {**report["best_test"], "correct": [False] * len(report["base_test"]["correct"]), "accuracy": 0.0}
    lost = page_as("pages/3_Explore.py", last_report={**report, "best_test": wrong}, q=1, rhos=[0.9])
    broken = sum(report["base_test"]["correct"])  # the base's right answers, all lost: beyond noise
    assert [w.value for w in lost.warning] == [
        f"On held-out test this is a real loss ({broken} questions broken, 0 fixed): applied, it makes the model worse "
        "on questions the search never saw. Keep the base model, or choose another edit."]
    assert explore_warnings("partial", accuracy=below) == [  # cancelled: searching wider is not the advice yet
        f"None of the {len(report['candidates'])} candidates this search finished before its cancel beats the base "
        f"model on the calibration split (the best: accuracy {below:.3f} against the base model's "
        f"{base['accuracy']:.3f}). Run it again to try the rest: those finished come from the cache."]
    at = page("pages/5_Export.py")
    pick = at.selectbox(key="export_pick")
    docs = {laser_ui.candidate_label(d): d for d in laser_ui.cached_results(lm, splits) if d["name"]}
    seen = set()
    for i, label in enumerate(pick.options):
        d = docs[pick.format_func(label) if isinstance(label, int) else label]
        if d["split"] != "calib":
            continue
        at.selectbox(key="export_pick").set_value(i).run()
        warned = [w.value for w in at.warning if "does not beat the base model" in w.value]
        seen.add(better(d, base))
        assert warned == ([] if better(d, base) else [
            f"This candidate does not beat the base model on the calibration split ({laser_ui.shortfall(d, base)}): "
            "applied, its recipe makes the model worse there."]), laser_ui.candidate_label(d)
    assert seen == {True, False}  # both kinds were checked


def test_export_opens_a_recipe_file_and_checks_it_on_held_out_test(app_env):
    from laser_core import Edit
    from laser_core.candidates import evaluate_edits
    from laser_core.recipe import make_recipe
    from laser_core.store import null_store
    lm, ts, splits = app_model(app_env)
    edits = [Edit(lm.matrices[0].name, 1, 0.5), Edit(lm.matrices[-1].name, 2, 0.25)]  # two edits, applied together
    want = evaluate_edits(lm, edits, splits, "test", null_store())  # not in the app's cache: the page evaluates it
    recipe = make_recipe(lm, edits, ts, {"edited_test": {k: want[k] for k in ("accuracy", "log_loss", "n")}})
    at = page("pages/5_Export.py")
    at.file_uploader(key="recipe_upload").set_value(("mine.json", json.dumps(recipe).encode(), "application/json"))
    at.run()
    assert not at.error, [e.value for e in at.error]
    assert "this session's splits; it recorded held-out test accuracy" in " ".join(c.value for c in at.caption)
    click(at, "Evaluate the recipe on held-out test")
    wait_for(at, lambda a: "With the recipe (held-out test)" in metrics(a))
    assert seen(at, "recipe_test")
    assert metrics(at)["With the recipe (held-out test)"] == f"{want['accuracy']:.3f}"
    assert any("recorded" in s.value and "the same." in s.value for s in at.success)
    again = page("pages/5_Export.py")  # another session opening the same recipe: its result from the cache at once
    again.file_uploader(key="recipe_upload").set_value(("same.json", json.dumps(recipe).encode(), "application/json"))
    again.run()
    assert metrics(again)["With the recipe (held-out test)"] == f"{want['accuracy']:.3f}"
    assert "Evaluate the recipe on held-out test" not in [b.label for b in again.button]
    older = {**recipe, "task": {k: v for k, v in recipe["task"].items() if k not in ("match", "answer_base")}}
    at.file_uploader(key="recipe_upload").set_value(("older.json", json.dumps(older).encode(), "application/json"))
    at.run()  # written before those fields existed, with their defaults: the same task (before: "evaluated here on")
    assert "this session's splits; it recorded held-out test accuracy" in " ".join(c.value for c in at.caption)
    for content, said in ((json.dumps({**recipe, "model": {**recipe["model"], "fingerprint": "0" * 16}}),
                           "the recipe was made on a model with fingerprint 0000000000000000"),
                          (json.dumps({**recipe, "task": {**recipe["task"], "temperature": 0.7}}),
                           "the recipe's task has fields this LASER Lab does not know: temperature; upgrade"),
                          ("{not json", "is not valid JSON")):
        at.file_uploader(key="recipe_upload").set_value(("other.json", content.encode(), "application/json"))
        at.run()
        assert not at.exception and any(e.value.startswith("Cannot use this recipe: ") and said in e.value
                                        for e in at.error), [e.value for e in at.error]


def test_app_entry_point_opens_the_model_and_task_page(app_env):
    at = page("app.py")
    assert at.title[0].value == "LASER Lab · Model & task"
    assert at.session_state["_page"] == "Model & task"  # the sidebar's jobs are drawn by page (render_sidebar_jobs)
    assert metrics(at)["Matrices"] == "14"


def test_the_readme_start_command_does_not_stop_at_streamlits_first_run_email_prompt(tmp_path):
    # a fresh user on a machine with a display: Streamlit's first run asks for an email in the terminal, and the
    # dashboard waits for an answer (.streamlit/config.toml turns that prompt off)
    import pty
    import select
    import socket
    import subprocess
    import sys
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "HOME": str(tmp_path), "DISPLAY": ":0", "BROWSER": "true"}  # BROWSER: open no browser
    env.pop("STREAMLIT_SERVER_HEADLESS", None)
    main, child = pty.openpty()  # a terminal, as a user's
    proc = subprocess.Popen([sys.executable, "-m", "streamlit", "run", "app.py", "--server.port", str(port),
                             "--server.address", "127.0.0.1"], cwd=ROOT, env=env,
                            stdin=child, stdout=child, stderr=child)
    out, deadline = b"", time.time() + 60
    try:
        while time.time() < deadline and b"view your Streamlit app" not in out and b"Email" not in out:
            if select.select([main], [], [], 1)[0]:
                out += os.read(main, 4096)
    finally:
        proc.kill()
        proc.wait()
        os.close(main)
        os.close(child)
    assert b"Email" not in out and b"view your Streamlit app" in out, out.decode(errors="replace")


def test_candidates_table_leaves_same_as_rho_blank_on_rows_that_ran():
    import laser_ui
    ran = {"layer": 0, "type": "k", "k": 1, "rho": 0.05, "accuracy": 0.5, "ranks": [1], "name": "m"}
    same = dict(ran, rho=0.01, same_as_rho=0.05)
    df = laser_ui.candidates_frame([ran, same])
    assert df["same_as_rho"].tolist() == ["", "0.05"]
    assert "same_as_rho" not in laser_ui.candidates_frame([ran]).columns


def test_candidates_table_marks_rows_stopped_early_beside_their_accuracy():
    import laser_ui
    ran = {"layer": 0, "type": "k", "k": 1, "rho": 0.05, "accuracy": 0.5, "ranks": [1], "name": "m",
           "stopped_early": False}
    stopped = dict(ran, rho=0.01, accuracy=0.2, stopped_early=True)
    df = laser_ui.candidates_frame([ran, stopped])
    assert df["stopped_early"].tolist() == ["", "yes"]
    assert list(df.columns).index("stopped_early") == list(df.columns).index("accuracy") + 1
    assert "stopped_early" not in laser_ui.candidates_frame([ran]).columns


def test_pareto_front_counts_the_base_model_rings_a_single_point_and_leaves_out_candidates_stopped_early():
    from types import SimpleNamespace as NS

    import torch

    import laser_ui
    lm = NS(model=NS(parameters=lambda: [torch.zeros(1000)]), matrices=[NS(type="q")])

    def row(kept, acc, **kw):  # a matrix of 100 parameters: kept% = 90 + kept / 10
        return {"layer": 0, "type": "q", "k": 1, "rho": 0.1, "accuracy": acc, "params_kept": kept, "params_full": 100,
                "ranks": [1], "name": "m", **kw}

    def front(fig):
        line = next(t for t in fig.data if t.name == "Pareto front")
        assert line.mode == "lines+markers"  # ringed points: one point alone still shows
        return list(zip(line.x, line.y))
    df = laser_ui.candidates_frame([row(10, 0.5), row(20, 0.7), row(20, 0.6), row(50, 0.65), row(5, 0.9,
                                                                                                  stopped_early=True)])
    assert front(laser_ui.pareto_figure(lm, df)) == [(91, 0.5), (92, 0.7)]  # of equal size, only the better
    with_base = laser_ui.pareto_figure(lm, df, base_accuracy=0.8)
    assert front(with_base) == [(91, 0.5), (92, 0.7), (100, 0.8)]
    assert [(t.x[0], t.y[0]) for t in with_base.data if t.name == "base model"] == [(100, 0.8)]
    assert [list(t.x) for t in with_base.data if t.name.startswith("stopped early")] == [[90.5]]
    assert front(laser_ui.pareto_figure(lm, df, base_accuracy=0.4)) == [(91, 0.5), (92, 0.7)]
    assert with_base.layout.xaxis.title.text == "parameters kept (% of the model)"  # not the column's raw name


def test_a_matrix_type_keeps_its_colour_whatever_types_a_chart_holds_and_in_which_order():
    from types import SimpleNamespace as NS

    import torch

    import laser_ui
    lm = NS(model=NS(parameters=lambda: [torch.zeros(1000)]),
            matrices=[NS(type=t) for t in ("q", "k", "o", "up", "down")] * 2)

    def colours(types):
        df = laser_ui.candidates_frame([{"layer": 0, "type": t, "k": 1, "rho": 0.1, "accuracy": 0.5, "params_kept": 5,
                                         "params_full": 10, "ranks": [1], "name": t} for t in types])
        fig = laser_ui.pareto_figure(lm, df)
        return {t.name: t.marker.color for t in fig.data if t.name in types}, \
            [t.name for t in fig.data if t.name in types]
    first, order = colours(["down", "up", "o"])
    second, _ = colours(["o", "down"])  # px would give "o" the first colour here, "down" there
    assert first["down"] == second["down"] and first["o"] == second["o"]
    assert len(set(first.values())) == 3
    assert order == ["o", "up", "down"]  # the legend in the model's order, as the heatmaps' columns


def test_score_heatmap_axes_span_exactly_the_layers_and_types_layer_0_on_top():
    import laser_ui
    table = [{"layer": l, "type": t, "score": l - 1.0, "name": f"layers.{l}.{t}"} for l in range(3) for t in ("q", "down")]
    fig = laser_ui.score_heatmap(table, selected="layers.1.q")
    assert tuple(fig.layout.yaxis.range) == (2.5, -0.5) and tuple(fig.layout.xaxis.range) == (-0.5, 1.5)
    assert list(fig.data[0].x) == ["q", "down"] and fig.data[0].zmid == 0


def test_accuracy_heatmap_shows_each_matrixs_best_candidate_against_the_base_and_blanks_the_rest():
    from types import SimpleNamespace as NS

    import laser_ui
    lm = NS(matrices=[NS(layer=l, type=t, name=f"layers.{l}.{t}") for l in range(2) for t in ("q", "down")])

    def row(name, acc, loss, rho, **kw):
        layer, typ = name.split(".")[1:]
        return {"name": name, "layer": int(layer), "type": typ, "k": 1, "rho": rho, "accuracy": acc, "log_loss": loss,
                "split": "calib", **kw}
    rows = [row("layers.0.q", 0.5, 2.0, 0.5), row("layers.0.q", 0.6, 3.0, 0.1), row("layers.0.q", 0.6, 2.5, 0.25),
            row("layers.1.down", 0.9, 1.0, 0.1, stopped_early=True), row("layers.1.down", 0.3, 1.0, 0.5),
            {"name": None, "accuracy": 0.45, "log_loss": 2.0}]  # the base row of a split is not a matrix
    best = {r["name"]: r for r in laser_ui.best_by_matrix(rows)}
    assert (best["layers.0.q"]["rho"], best["layers.1.down"]["rho"]) == (0.25, 0.5)  # accuracy, then log-loss
    fig = laser_ui.accuracy_heatmap(lm, rows, 0.45)
    z = json.loads(fig.to_json())["data"][0]["z"]  # layers x types, types in model order (q before down)
    assert z == [[pytest.approx(0.15), None], [None, pytest.approx(-0.15)]]
    assert "K=1, ρ=0.25" in fig.data[0].customdata[0][0] and fig.data[0].zmid == 0
    assert (fig.data[0].zmin, fig.data[0].zmax) == (pytest.approx(-0.15), pytest.approx(0.15))
    small = laser_ui.accuracy_heatmap(lm, [row("layers.0.q", 0.46, 2.0, 0.5)], 0.45)
    assert (small.data[0].zmin, small.data[0].zmax) == (-0.05, 0.05)  # one example's gain stays pale


def test_a_job_shows_what_laser_core_warned_about_in_its_thread(app_env):
    """Before, a job's warnings (the cache switching itself off on a full disk, a masked LM's tied choices, an SVD
    redone on the CPU) went to the server log only."""
    import logging
    import threading

    import laser_ui

    log = logging.getLogger("laser_core.store")
    release = threading.Event()

    def work(job):
        log.warning("cache write failed (disk full); running without a cache")
        log.warning("cache write failed (disk full); running without a cache")  # said again: shown once
        release.wait(10)
        return None
    lm, _, splits = app_model(app_env)
    job = laser_ui.JobManager().submit("search", "laser search", "cpu", work, laser_ui.made_on(lm, splits))
    log.warning("a page's own warning")  # another thread: not the job's
    release.set()
    for _ in range(100):
        if job.status != "running":
            break
        time.sleep(0.05)
    assert job.status == "done" and job.warnings == ["cache write failed (disk full); running without a cache"]
    jobs = laser_ui.job_manager().jobs
    jobs[job.id] = job
    try:
        at = session("pages/3_Explore.py")
        at.session_state["job_search"] = job.id
        at.run()
        assert not at.exception, [e.value for e in at.exception]
        assert "cache write failed (disk full); running without a cache" in [w.value for w in at.warning]
    finally:
        del jobs[job.id]


def test_job_estimates_time_left_from_the_pace_of_its_current_phase(monkeypatch):
    import laser_ui
    now = [1000.0]
    monkeypatch.setattr(laser_ui.time, "time", lambda: now[0])
    job = laser_ui.Job("id", "search", "search", "cpu")
    job.on_progress({"phase": "gradients", "done": 0, "total": 1})
    now[0] += 50  # a slow first phase must not weigh on the next one's estimate
    job.on_progress({"phase": "search", "done": 1, "total": 11})
    assert job.eta is None  # no step of this phase timed yet
    now[0] += 6
    job.on_progress({"phase": "search", "done": 3, "total": 11})
    assert job.eta == pytest.approx(24.0)  # 3 s a step, 8 steps left
    job.status = "done"
    assert job.eta is None


def test_a_running_job_is_redrawn_every_second_on_4_cores_or_more_and_every_3_s_on_fewer(monkeypatch):
    import laser_ui
    monkeypatch.delenv("LASER_LAB_POLL_S", raising=False)
    assert [laser_ui.poll_seconds(n) for n in (1, 2, 3, 4, 16)] == [3.0, 3.0, 3.0, 1.0, 1.0]
    monkeypatch.setenv("LASER_LAB_POLL_S", "0.5")
    assert laser_ui.poll_seconds(2) == 0.5


@pytest.mark.parametrize("at_start, at_poll, polls, reruns", [
    ("running", "running", 2.5, 0),  # redrawn every poll_seconds() while it runs
    ("running", "cancelled", 2.5, 1),  # ended between two polls: the page reruns once to show the outcome
    ("done", "done", None, 0),  # finished: drawn once, nothing polls any more
    ("error", "error", None, 0),
])
def test_live_job_polls_only_while_the_job_runs(monkeypatch, at_start, at_poll, polls, reruns):
    import laser_ui
    seen = {"run_every": "unset", "reruns": 0, "shown": []}
    states = iter([at_start, at_poll])

    def fragment(run_every=None):
        seen["run_every"] = run_every
        return lambda fn: fn

    monkeypatch.setattr(laser_ui.st, "fragment", fragment)
    monkeypatch.setenv("LASER_LAB_POLL_S", "2.5")
    monkeypatch.setattr(laser_ui.st, "rerun", lambda: seen.__setitem__("reruns", seen["reruns"] + 1))
    monkeypatch.setattr(laser_ui, "session_job",
                        lambda kind, lm, splits: laser_ui.Job("id", kind, kind, "cpu", status=next(states)))
    laser_ui.live_job("search", None, None, lambda job: seen["shown"].append(job.status))
    assert (seen["run_every"], seen["reruns"], seen["shown"]) == (polls, reruns, [at_poll])


def test_results_lists_every_search_of_this_model_and_task_side_by_side(app_env, searched):
    """C2I searches and LASER sweeps in the cache (any settings), each with its time, its best and that best's paired
    held-out change; a search on other splits of the task is not among them. Before, no page compared them."""
    import dataclasses

    from laser_core import SearchConfig, Store, load_task, make_splits, run_search
    lm, ts, splits = app_model(app_env)
    types = tuple(sorted({r.type for r in lm.matrices}))
    run_search(lm, splits, SearchConfig("laser", ks=(1,), rhos=(0.5, 0.05), layers=(0, 1), types=types), Store())
    c2i = run_search(lm, splits, SearchConfig(q=2, ks=(1, 2), rhos=(0.5, 0.1)), Store()).to_dict()  # the fixture's
    seeded = dataclasses.replace(ts, seed=1)
    run_search(lm, make_splits(load_task(seeded), seeded), SearchConfig(q=1, ks=(1,), rhos=(0.3,)), Store())
    at = page("pages/4_Results.py")
    assert "Searches in the cache" in [h.value for h in at.subheader]
    df = next(d.value for d in at.dataframe if "settings" in d.value.columns)
    assert "q=1, K 1, ρ 0.3" not in set(df["settings"])  # made on another seed's splits
    mine = df[(df["method"] == "C2I") & (df["settings"] == "q=2, K 1,2, ρ 0.5, 0.1")].iloc[0]
    assert (mine["candidates"], mine["split"]) == (len(c2i["candidates"]), "calib")
    assert mine["time_s"] == pytest.approx(sum(c["seconds"] for c in c2i["candidates"]) + mine["spectra_s"])
    assert mine["spectra_s"] > 0  # the gradient step and SVDs as they ran (the fixture's search made them), not 0
    best, base = c2i["best_test"], c2i["base_test"]
    assert (mine["accuracy"], mine["best_on_split"]) == (best["accuracy"], c2i["best"]["accuracy"])
    assert mine["vs_base"] == pytest.approx(best["accuracy"] - base["accuracy"]) and 0 < mine["p"] <= 1
    sweeps = df[df["method"] == "LASER"]
    assert f"layers 0–1, types {','.join(types)}, ρ 0.5, 0.05" in set(sweeps["settings"])
    assert set(sweeps["split"]) == {"val"} and sweeps["less_than_laser"].isna().all()
    largest = sweeps.sort_values("candidates").iloc[-1]
    assert mine["less_than_laser"] == pytest.approx(largest["time_s"] / mine["time_s"])
    caption = next(c.value for c in at.caption if "× less than LASER" in c.value)
    assert f"LASER sweep #{largest['#']} ({largest['settings']}; {largest['candidates']} candidates" in caption
    assert mine["less_than_full_laser"] > 0 and sweeps["less_than_full_laser"].isna().all()
    assert "× less than full LASER (est.): the time LASER's sweep of every matrix" in caption


def test_a_search_on_results_opens_on_explore_with_its_settings_and_its_report_from_the_cache(app_env, searched):
    """Results' "Open on Explore" sets Explore's widgets to the search's grid (a C2I search, then a LASER sweep of a
    layer range and two types) and shows its report: "already in the cache", nothing runs. AppTest does not follow
    ``st.switch_page`` (the browser test does): the page is switched here."""
    from laser_core import SearchConfig, Store, run_search
    lm, _, splits = app_model(app_env)
    sweep = run_search(lm, splits, SearchConfig("laser", ks=(1,), rhos=(0.5,), layers=(1,), types=("down", "up")),
                       Store()).to_dict()
    c2i = run_search(lm, splits, SearchConfig(q=2, ks=(1, 2), rhos=(0.5, 0.1)), Store()).to_dict()  # the fixture's
    at = session("app.py").run()
    at.switch_page("pages/3_Explore.py").run()
    at.slider(key="q").set_value(1)
    at.multiselect(key="ks").set_value([4]).run()  # other settings than the search's
    for report, label, method in ((c2i, "C2I · q=2, K 1,2, ρ 0.5, 0.1", "C2I search"),
                                  (sweep, "LASER · layers 1–1, types down,up, ρ 0.5", "LASER sweep")):
        at.switch_page("pages/4_Results.py").run()
        box = at.selectbox(key="open_search")
        assert at.button(key="open_search_go").disabled
        box.select(next(o for o in box.options if o.split(". ", 1)[1] == label)).run()
        at.button(key="open_search_go").click().run()
        assert not at.exception, [e.value for e in at.exception]
        at.switch_page("pages/3_Explore.py").run()
        assert "This configuration is already in the cache — shown without running anything." in [
            x.value for x in at.success]
        assert f"Best candidate · {method}" in [h.value for h in at.subheader]
        assert metrics(at)["Best (held-out test)"] == f"{report['best_test']['accuracy']:.3f}"
    assert (at.radio(key="method").value, at.select_slider(key="layer_range").value,
            sorted(at.multiselect(key="types").value)) == ("LASER sweep (brute force)", (1, 1), ["down", "up"])
    at.radio(key="method").set_value("C2I (gradient-selected)").run()  # q and K as the C2I search set them; the
    assert (at.slider(key="q").value, at.multiselect(key="ks").value, at.multiselect(key="rhos").value) == \
        (2, [1, 2], [0.5])  # rho grid is both methods' own, last set by the sweep


def test_forget_on_results_takes_a_search_off_its_table_and_keeps_its_candidates(app_env, searched):
    """Results' "Forget this search": the chosen search leaves "Searches in the cache" (its report is deleted), a
    toast says so, and its candidates' rows stay in the table of every result."""
    from laser_core import SearchConfig, Store, run_search
    from laser_core.searches import cached_reports
    lm, _, splits = app_model(app_env)
    run_search(lm, splits, SearchConfig("laser", ks=(1,), rhos=(0.5,), layers=(1,), types=("down",)), Store())
    at = page("pages/4_Results.py")
    rows = len(next(d.value for d in at.dataframe if "settings" in d.value.columns))
    candidates = len(at.dataframe[0].value)
    assert at.button(key="forget_search").disabled
    before = cached_reports(Store(), lm, splits)  # the module's cache: other tests' searches too
    box = at.selectbox(key="open_search")
    label = next(o for o in box.options if o.endswith(". LASER · layers 1–1, types down, ρ 0.5"))
    box.select(label).run()
    at.button(key="forget_search").click().run()
    assert not at.exception, [e.value for e in at.exception]
    assert [t.value for t in at.toast] == [f"Forgot search {label}: its candidates' results stay in the cache"]
    left = next(d.value for d in at.dataframe if "settings" in d.value.columns)
    assert len(left) == rows - 1 and "layers 1–1, types down, ρ 0.5" not in set(left["settings"])
    after = cached_reports(Store(), lm, splits)
    assert [r for r in before if r not in after] == [r for r in before if r["method"] == "laser" and
                                                     (r["config"]["types"], r["config"]["layers"]) == (["down"], [1])]
    assert len(at.dataframe[0].value) == candidates and at.selectbox(key="open_search").value is None


def test_results_page_sets_each_matrixs_score_against_the_change_it_made(app_env):
    """A LASER sweep on validation: every matrix's score (Layer scores' settings) against the most its candidates
    gained there over the base, in accuracy or in log-loss, and their rank correlation, checked against ranks
    computed here."""
    import numpy as np

    from laser_core import SearchConfig, Store, run_search
    from laser_core.candidates import cached_results
    from laser_core.scores import load_spectra, score_table
    lm, _, splits = app_model(app_env)
    types = tuple(sorted({r.type for r in lm.matrices}))
    run_search(lm, splits, SearchConfig("laser", ks=(1,), rhos=(0.5, 0.05), layers=(0, 1), types=types), Store())
    spectra, _ = load_spectra(lm, splits, Store())  # the scores, as Layer scores computes them
    score = {m["name"]: m["score"] for m in score_table(lm, spectra, "paper", SearchConfig())}
    rows = [d for d in cached_results(Store(), lm, splits) if d["split"] == "val"]
    base = next(d for d in rows if d["name"] is None)
    at = page("pages/4_Results.py")
    at.radio(key="res_split").set_value("val").run()
    assert any(h.value == "Does the score pick the matrices that help?" for h in at.subheader)
    for measure, gain in (("log-loss decrease", lambda d: base["log_loss"] - d["log_loss"]),
                          ("accuracy gain", lambda d: d["accuracy"] - base["accuracy"])):
        at.radio(key="score_check").set_value(measure).run()
        best = {n: max(gain(d) for d in rows if d["name"] == n) for n in score}  # every matrix was swept
        x, y = mean_ranks([score[n] for n in best]), mean_ranks(list(best.values()))
        expected = "n/a (every gain is the same)" if len(set(y)) == 1 else f"{float(np.corrcoef(x, y)[0, 1]):+.2f}"
        chart = next(json.loads(c.proto.spec) for c in at.get("plotly_chart")
                     if "paper score" in json.dumps(json.loads(c.proto.spec)["layout"]["xaxis"]))
        assert sorted(v for t in chart["data"] for v in plotly_values(t["y"])) == pytest.approx(sorted(best.values()))
        said = next(c.value for c in at.caption if "Rank correlation (Spearman)" in c.value)
        assert f"best {measure} on the validation split: {expected}, over the 14 matrices evaluated there (of 14 " \
               "scored" in said, said
    at.selectbox(key="score").set_value("first_order").run()  # its spectra (the K grid) are not computed yet
    assert not [c for c in at.caption if "Rank correlation (Spearman)" in c.value]
    assert [i.value for i in at.info if i.value.startswith("The first_order scores are not computed for this task")]
    load_spectra(lm, splits, Store(), ks=(1, 2, 4, 8))  # as Layer scores computes them for first_order
    at.run()
    said = next(c.value for c in at.caption if "Rank correlation (Spearman)" in c.value)
    assert said.startswith("Rank correlation (Spearman) of the first_order score with each matrix's best accuracy gain")
    at.selectbox(key="score").set_value("paper").run()  # the setting Layer scores and Explore share


def plotly_values(v) -> list:
    """A plotly trace's array as a list: plotly writes a numpy array (a pandas column) as base64 "bdata"."""
    if isinstance(v, dict) and "bdata" in v:
        import base64

        import numpy as np
        return np.frombuffer(base64.b64decode(v["bdata"]), dtype=v["dtype"]).tolist()
    return list(v)


def mean_ranks(values) -> list[float]:
    """Ranks from 1, ties sharing their mean rank (as Spearman's correlation ranks)."""
    order = sorted(values)
    return [sum(i + 1 for i, v in enumerate(order) if v == x) / order.count(x) for x in values]


def test_results_of_takes_the_cache_else_the_finished_jobs_result_for_the_same_edit(monkeypatch):
    from dataclasses import asdict

    import laser_ui
    from laser_core import Edit

    def doc(e, acc=0.5, split="calib"):
        return {"name": e and e.name, "k": e and e.k, "rho": e and e.rho, "accuracy": acc, "split": split}

    mine, other = Edit("m.w", 2, 0.1), Edit("m.w", 2, 0.5)
    job = laser_ui.Job("j1", "one", "eval", "cpu", status="done", result={"base": doc(None), "edit": doc(other)})
    cache = {}
    monkeypatch.setattr(laser_ui, "cached_result",
                        lambda lm, splits, split, edit=None: cache.get((split, tuple(laser_ui._as_edits(edit)))))
    monkeypatch.setattr(laser_ui, "session_job", lambda kind, lm, splits: job)
    wanted = {"base": (None, "calib"), "edit": (mine, "calib")}
    assert laser_ui.results_of("one", None, None, wanted) == {"base": doc(None), "edit": None}  # job: another rho
    job.result["edit"] = doc(mine)
    assert laser_ui.results_of("one", None, None, wanted)["edit"] == doc(mine)
    cache[("calib", (mine,))] = doc(mine, 0.7)  # the cache comes first
    assert laser_ui.results_of("one", None, None, wanted)["edit"]["accuracy"] == 0.7
    job.status = "running"
    cache.clear()
    assert laser_ui.results_of("one", None, None, wanted) == {"base": None, "edit": None}
    job.status = "done"  # edits applied together: the job's result is theirs in any order, on the split asked
    both, two = [mine, Edit("n.w", 1, 0.5)], {"name": None, "edits": [asdict(Edit("n.w", 1, 0.5)), asdict(mine)],
                                              "accuracy": 0.6, "split": "test"}
    job.result = {"together": two}
    assert laser_ui.results_of("c", None, None, {"together": (both, "test")})["together"] == two
    assert laser_ui.results_of("c", None, None, {"together": (both, "calib")})["together"] is None
    assert laser_ui.results_of("c", None, None, {"together": (both[:1], "test")})["together"] is None


def test_results_page_lists_the_candidates_that_broke_the_numerics(app_env, searched, monkeypatch):
    """They have no accuracy, so the table cannot show them: before, a ρ a search had skipped was simply missing."""
    import laser_core.reduction as reduction
    from laser_core import SearchConfig, Store, run_search
    real = reduction.block_truncate
    monkeypatch.setattr(reduction, "block_truncate",  # a ρ no other test uses: the failure is cached in the app's store
                        lambda f, rho: real(f, rho) * (float("inf") if rho == 0.37 else 1.0))
    lm, _, splits = app_model(app_env)
    report = run_search(lm, splits, SearchConfig(q=1, ks=(1,), rhos=(0.37,)), Store(), held_out=False)
    assert len(report.skipped) == 1 and not report.candidates
    at = page("pages/4_Results.py")
    assert at.radio(key="res_split").value == "calib"
    box = next(e for e in at.expander if "broke the model's numerics" in e.label)
    assert box.label == "1 candidate broke the model's numerics: no result"
    listed = box.dataframe[0].value
    assert list(listed["name"]) == [report.skipped[0]["name"]] and "NaN or infinite" in listed["error"][0]
    assert 0.37 not in set(at.dataframe[0].value["rho"])  # the table: candidates with a result only
