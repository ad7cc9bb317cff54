"""The main path in a real browser: Debian chromium driven by Playwright against `streamlit run app.py`."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from conftest import write_mc_jsonl

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM = os.environ.get("LASER_LAB_CHROMIUM", "/usr/bin/chromium")
SHOTS = Path(os.environ.get("LASER_LAB_SCREENSHOTS", ROOT / "artifacts" / "screenshots"))
pytestmark = pytest.mark.skipif(not Path(CHROMIUM).exists(),
                                reason=f"no chromium at {CHROMIUM}: `apt-get install chromium` (.ci/run does)")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tiny_dirs, tmp_path_factory):
    d = tmp_path_factory.mktemp("browser")
    port = free_port()
    env = {**os.environ,
           "LASER_LAB_DEFAULT_MODEL": os.environ.get("LASER_LAB_BROWSER_MODEL", str(tiny_dirs["llama"])),
           "LASER_LAB_DEFAULT_TASK": os.environ.get("LASER_LAB_BROWSER_TASK", str(write_mc_jsonl(d / "even.jsonl", 500))),
           "LASER_LAB_CACHE": os.environ.get("LASER_LAB_BROWSER_CACHE", str(d / "cache"))}
    log = d / "server.log"  # a file, not a pipe nobody reads: a full pipe would stall the server mid-search
    proc = subprocess.Popen([sys.executable, "-m", "streamlit", "run", str(ROOT / "app.py"), "--server.headless", "true",
                             "--server.port", str(port), "--server.address", "127.0.0.1",
                             "--browser.gatherUsageStats", "false"],
                            cwd=ROOT, env=env, stdout=(out := log.open("w")), stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    for _ in range(120):
        try:
            urllib.request.urlopen(url + "/_stcore/health", timeout=1)
            break
        except OSError:
            time.sleep(0.5)
    else:
        proc.kill()
        raise RuntimeError("streamlit did not start: " + log.read_text()[-2000:])
    yield url
    proc.terminate()
    proc.wait(10)
    out.close()


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, headless=True,
                              args=["--no-sandbox", "--disable-gpu", "--disable-background-networking"])
        yield b
        b.close()


def idle(page) -> None:
    """Wait until the page's script has finished its run (Streamlit's running icon is gone). The icon shows a
    moment after a run starts: called right then, this returns at once, so check what a run draws with ``expect``."""
    page.locator('[data-testid="stStatusWidgetRunningIcon"], [data-testid="stStatusWidgetRunningManIcon"]') \
        .first.wait_for(state="hidden")


def rendered(page) -> None:
    """Wait until the browser has drawn what the page changed and run what it does after drawing (two animation
    frames): Streamlit enables a form's submit button as an upload ends, but sends the file's entry only once the
    next frame is drawn, so a click in between submits the form without the file."""
    page.evaluate("() => new Promise(done => requestAnimationFrame(() => requestAnimationFrame(() => done())))")


def shot(page, name: str) -> None:
    SHOTS.mkdir(parents=True, exist_ok=True)
    idle(page)  # no "Stop" mid-capture
    page.screenshot(path=str(SHOTS / f"{name}.png"), full_page=True)


def nav(page, label: str) -> None:
    page.get_by_test_id("stSidebarNav").get_by_text(label, exact=True).click()


def click_if_there(page, name: str, done) -> None:
    """Click button ``name`` unless its result ``done`` (a locator) is already shown (cached)."""
    button = page.get_by_role("button", name=name)
    button.or_(done).first.wait_for()
    if not done.count():
        button.click()


def pick(page, label: str, option: str) -> None:
    """Choose the option of the selectbox ``label`` that contains ``option``. A click while the page still finishes
    its run can leave the list closed (seen once: the box focused, no list): then it is opened again, up to five
    times."""
    from playwright.sync_api import TimeoutError as Timeout
    for _ in range(5):
        page.get_by_role("combobox", name=label).click()
        try:
            page.get_by_role("option").filter(has_text=option).first.click(timeout=5000)
            return
        except Timeout:
            continue
    raise AssertionError(f"the options of {label!r} never opened")


def test_a_link_straight_to_a_page_on_a_fresh_server_gets_the_apps_navigation(server, browser):
    # First in this module: nobody has opened the home page of this server yet (that is what used to matter).
    page = browser.new_page(viewport={"width": 1400, "height": 900})
    page.set_default_timeout(120_000)
    page.goto(server + "/Explore")
    page.get_by_text("candidates, each evaluated").wait_for()
    sidebar = page.get_by_test_id("stSidebarNav")
    sidebar.get_by_text("Model & task", exact=True).wait_for()
    assert page.locator("h1").first.inner_text() == "Explore"
    assert sidebar.get_by_text("app", exact=True).count() == 0  # the file-name sidebar of a bare pages/ folder
    page.close()


def test_load_scores_search_results_export_in_a_real_browser(server, browser, tmp_path):
    from dataclasses import asdict

    from playwright.sync_api import expect

    from laser_core import SearchConfig
    from laser_core.searches import settings_text

    timeout = float(os.environ.get("LASER_LAB_BROWSER_TIMEOUT", 120)) * 1000
    page = browser.new_page(viewport={"width": 1400, "height": 1000}, accept_downloads=True)
    page.set_default_timeout(timeout)
    page.goto(server)
    page.get_by_text("Model facts").wait_for()
    click_if_there(page, "Compute baseline accuracy", page.get_by_text("Held-out test accuracy"))
    page.get_by_text("Held-out test accuracy").wait_for()
    shot(page, "1_model_and_task")

    nav(page, "Layer scores")
    click_if_there(page, "Compute scores", page.locator(".js-plotly-plot"))
    page.locator(".js-plotly-plot .main-svg").first.wait_for()
    page.wait_for_function("document.querySelectorAll('.js-plotly-plot').length >= 2")
    shot(page, "2_layer_scores")

    nav(page, "Explore")
    page.get_by_text("candidates, each evaluated").wait_for()
    if page.get_by_role("button", name="Run").is_enabled():  # disabled when this config is in the cache
        page.get_by_role("button", name="Run").click()
        page.get_by_text("C2I search: finished").wait_for()
    page.get_by_role("heading", name="Best candidate").wait_for()  # not the Next link that names it
    # the report's elements arrive one by one after its heading: expect retries (CI once counted 0 right after it)
    expect(page.get_by_test_id("stMetric").filter(has_text="Best (held-out test)")).to_have_count(1)
    page.locator(".js-plotly-plot .main-svg").first.wait_for()  # each matrix's best against the base
    shot(page, "3_explore")

    nav(page, "Results")
    page.get_by_role("heading", name="Results", exact=True).wait_for()  # not Explore's elements while they fade out
    page.locator(".js-plotly-plot .main-svg").first.wait_for()
    page.wait_for_function("document.querySelectorAll('.js-plotly-plot').length >= 2")
    page.get_by_test_id("stDataFrame").first.wait_for()  # the sortable table of result rows
    shot(page, "4_results")
    # the search just run (Explore's default grid), from the cache; a cache of earlier sessions lists others too
    pick(page, "Open a search on Explore, or forget it", f"C2I · {settings_text(asdict(SearchConfig()))}")
    page.get_by_role("button", name="Open on Explore").click()
    page.get_by_role("heading", name="Explore", exact=True).wait_for()  # st.switch_page, which AppTest does not follow
    page.get_by_text("This configuration is already in the cache").wait_for()

    nav(page, "Export")
    page.get_by_role("button", name="Download recipe (JSON)").wait_for()
    with page.expect_download() as dl:
        page.get_by_role("button", name="Download recipe (JSON)").click()
    path = tmp_path / "recipe.json"
    dl.value.save_as(path)
    recipe = json.loads(path.read_text())
    assert recipe["laser_lab_recipe"] == 1 and recipe["edits"][0]["name"].startswith("model.layers.")
    shot(page, "5_export")
    assert not page.get_by_test_id("stException").count()


def test_a_bad_model_path_shows_a_message_not_a_traceback(server, browser):
    from playwright.sync_api import expect

    page = browser.new_page(viewport={"width": 1400, "height": 900})
    page.set_default_timeout(60_000)
    page.goto(server)
    page.get_by_text("Model facts").wait_for()
    page.get_by_text("local folder").click()
    box = page.get_by_label("Model folder (a Hugging Face folder with config.json)")  # shown once the source is picked
    box.fill("/no/such/model")
    page.get_by_role("button", name="Load model and task").click()
    error = page.get_by_test_id("stAlertContentError").filter(has_text="model not found")
    error.wait_for()
    error.scroll_into_view_if_needed()
    assert not page.get_by_test_id("stException").count()
    # stopped at the error: the facts of the model shown before fade out once the rerun ends (expect retries)
    expect(page.get_by_test_id("stMetric").filter(has_text="Architecture")).to_have_count(0)
    shot(page, "6_error_bad_model_path")
    page.get_by_test_id("stSidebarNav").get_by_text("Layer scores", exact=True).click()
    page.get_by_role("heading", name="Layer scores").wait_for()  # the previous model is still the session's
    expect(page.get_by_test_id("stAlertContentError")).to_have_count(0)  # retries past the old page's fade-out


def test_an_uploaded_task_stays_the_sessions_task_when_another_session_uploads_a_file_of_its_name(server, browser,
                                                                                                 tmp_path):
    from playwright.sync_api import expect

    # uploads used to be saved under their file name alone: a later upload of that name in another session
    # replaced the file this session's task was read from
    def upload(n: int):
        page = browser.new_page(viewport={"width": 1400, "height": 900})
        page.set_default_timeout(120_000)
        page.goto(server)
        page.get_by_text("Model facts").wait_for()
        page.get_by_text("upload a file").click()  # the source shows its uploader once the page has run again
        page.get_by_test_id("stFileUploader").wait_for()
        idle(page)
        (tmp_path / str(n)).mkdir()
        task = write_mc_jsonl(tmp_path / str(n) / "mine.jsonl", n, seed=n)
        with page.expect_response(lambda r: "upload_file" in r.url and r.request.method == "PUT"):  # on the server
            page.locator('[data-testid="stFileUploader"] input[type="file"]').set_input_files(str(task))
        page.get_by_test_id("stFileUploader").get_by_text("mine.jsonl").wait_for()  # as a user sees it picked
        expect(page.get_by_role("button", name="Load model and task")).to_be_enabled()  # disabled while uploading
        rendered(page)
        page.get_by_role("button", name="Load model and task").click()
        loaded = page.get_by_text(f"task mine (mc, {n} examples)")  # `mine` is set as code
        refused = page.get_by_test_id("stAlertContentError").or_(page.get_by_test_id("stException"))
        loaded.or_(refused).first.wait_for()
        assert not refused.count(), refused.first.inner_text()  # why, rather than a time-out
        return page

    first = upload(500)
    upload(450).close()
    nav(first, "Layer scores")
    first.get_by_role("heading", name="Layer scores").wait_for()
    nav(first, "Model & task")
    first.get_by_text("task mine (mc, 500 examples)").wait_for()
    assert not first.get_by_test_id("stException").count()
    shot(first, "7_uploaded_task")


def test_the_explore_settings_survive_a_look_at_another_page_while_a_search_runs(server, browser, tmp_path):
    """Streamlit drops a value kept across pages once a fragment that polls has rerun (streamlit#10805): after a
    look at Results during a LASER sweep, Explore came back on C2I with its default grids. The settings widgets
    now keep their values for the session (``persist_state``)."""
    from playwright.sync_api import expect

    big = write_mc_jsonl(tmp_path / "big.jsonl", 20000)  # LASER's validation split: 4000 examples, minutes of sweep
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    page.set_default_timeout(120_000)
    page.goto(server)
    page.get_by_text("Model facts").wait_for()
    page.get_by_text("task file path", exact=True).click()
    page.get_by_role("textbox", name="Task file path").fill(str(big))
    page.get_by_role("button", name="Load model and task").click()
    page.get_by_test_id("stSidebar").get_by_text(str(big)).wait_for()
    nav(page, "Explore")
    page.get_by_text("LASER sweep (brute force)").click()
    page.get_by_text("Matrix types").wait_for()
    idle(page)
    page.get_by_role("button", name="Run").click()
    bar = page.get_by_test_id("stMain").get_by_test_id("stProgress")
    try:
        bar.wait_for()
        first = bar.inner_text()  # its elapsed seconds change when the polling fragment redraws it
        page.wait_for_function("t => { const b = document.querySelector('[data-testid=stMain] "
                               "[data-testid=stProgress]'); return b && b.innerText !== t; }", arg=first)
        nav(page, "Results")
        page.get_by_role("heading", name="Results").wait_for()
        idle(page)
        nav(page, "Explore")
        page.get_by_role("heading", name="Explore").wait_for()
        idle(page)
        # expect retries: idle() can return before the running icon shows, with the page half drawn (CI once
        # counted neither setting there). Lost settings would bring C2I back: its trailing fraction, no matrix types
        expect(page.get_by_text("Matrix types")).to_have_count(1)
        expect(page.get_by_text("Trailing fraction")).to_have_count(0)
    finally:
        page.get_by_role("button", name="Cancel").first.click()
        page.get_by_text("LASER sweep: cancelled").wait_for()
        page.close()
