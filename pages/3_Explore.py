"""Explore: run a C2I search or a LASER sweep in the background and watch candidates arrive."""
from __future__ import annotations

import streamlit as st

import laser_ui as ui
from laser_core import ConfigError, LaserError, SearchConfig, run_search
from laser_core.config import to_dict
from laser_core.estimate import SPLIT_WORDS, estimate_search
from laser_core.search import SEARCH_SPLIT

ui.use_app_navigation()
st.set_page_config(page_title="LASER Lab · Explore", layout="wide")
st.title("Explore")
ui.render_sidebar_status()
lm, splits = ui.current_model(), ui.current_splits()
layers = sorted({r.layer for r in lm.matrices})
types = sorted({r.type for r in lm.matrices})

method = st.radio("Method", ["C2I (gradient-selected)", "LASER sweep (brute force)", "One candidate (sliders)"],
                  horizontal=True, key="method", persist_state="session")
if method.startswith("One"):
    ui.render_one_candidate(lm, splits)
    st.stop()
if method.startswith("C2I"):
    score, tail, q = ui.score_inputs(lm)  # shared with Layer scores: its top q are the matrices tried here
    grid = ui.grid_inputs(ks=True)
else:
    c1, c2 = st.columns(2)
    with c1:
        grid = ui.grid_inputs(ks=False)
    with c2:
        lo, hi, sel_types = ui.laser_inputs(layers, types)
speed = ui.speed_inputs(lm, splits)  # early stop, prefix reuse, its memory, candidates run together
try:
    if method.startswith("C2I"):
        cfg = SearchConfig("c2i", score, q, tuple(sorted(grid["ks"])), tuple(sorted(grid["rhos"], reverse=True)),
                           tail, grouping=grid["grouping"], **speed)
        n = q * len(grid["ks"]) * len(grid["rhos"])
    else:
        cfg = SearchConfig("laser", ks=(1,), rhos=tuple(sorted(grid["rhos"], reverse=True)),
                           layers=tuple(x for x in layers if lo <= x <= hi), types=tuple(sel_types), **speed)
        n = len([r for r in lm.matrices if lo <= r.layer <= hi and r.type in sel_types]) * len(grid["rhos"])
except ConfigError as e:
    ui.user_error(str(e))
if method.startswith("LASER") and not sel_types:
    ui.user_error("Choose at least one matrix type.")
if cfg.method == "c2i":
    n = ui.render_c2i_matrices(lm, splits, cfg) or n
searched = SEARCH_SPLIT[cfg.method]
st.caption(f"{n} candidate{'' if n == 1 else 's, each'} evaluated on the {SPLIT_WORDS[searched]} split ({len(splits.examples(searched))} examples).")

cached = ui.store().get_json(ui.report_key(lm, splits, cfg))
if cached:
    st.success("This configuration is already in the cache — shown without running anything.")
    ui.keep_report(cached)
else:
    try:
        ui.render_estimate(estimate_search(lm, splits, cfg, ui.store()))
    except LaserError as e:  # e.g. a LASER range that matches no matrix: say so before a run would
        ui.user_error(str(e))
with st.expander("The same search from the command line"):
    st.code(ui.cli_command(lm, splits, cfg), language="bash")
if st.button("Run", type="primary", disabled=bool(cached) or ui.job_running("search", lm, splits)):
    ui.start_job("search", "C2I search" if cfg.method == "c2i" else "LASER sweep", lm, splits,
                 lambda job: run_search(lm, splits, cfg, ui.store(), job.on_progress, job.cancel))


job = ui.session_job("search", lm, splits)
if job is not None and job.status in ("done", "cancelled") and job.result is not None \
        and st.session_state.get("shown_job") != job.id:  # once: its report replaces the one shown
    ui.keep_report(job.result.to_dict())
    st.session_state["shown_job"] = job.id
ui.live_job("search", lm, splits, lambda job: ui.render_search_job(job, lm))
report = cached or ui.kept_report(lm, splits)  # kept: None where the last one was made on another model or task
running = job is not None and job.status == "running"
if report and not running:  # running: the live view instead
    if not cached and report.get("config") != to_dict(cfg):
        st.caption("Below: the last search of this session, run with other settings than those above.")
    ui.render_search_report(report, lm)
