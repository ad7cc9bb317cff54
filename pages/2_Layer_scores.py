"""Layer scores: which matrices the calibration gradient says to reduce."""
from __future__ import annotations

import pandas as pd
import streamlit as st

import laser_ui as ui
from laser_core import SearchConfig
from laser_core.config import CONTIGUOUS
from laser_core.scores import load_spectra, score_table

ui.use_app_navigation()
st.set_page_config(page_title="LASER Lab · Layer scores", layout="wide")
st.title("Layer scores")
st.caption("g_i = ∂L/∂σ_i for every singular value (L: calibration log-loss). **g_i > 0 means gradient descent "
           "shrinks σ_i** — the paper's \"negative gradient\". The *paper* score sums that push over the trailing "
           "part of each spectrum; *first_order* is the predicted loss decrease of the best (K, ρ) reduction.")
ui.render_sidebar_status()
lm, splits = ui.current_model(), ui.current_splits()

score, tail, q = ui.score_inputs(lm)
grouping = ui.grouping_input(st, "grouping") if score == "first_order" else CONTIGUOUS  # it scores each block's tail
ks, label = ui.score_ks(score), f"scores ({score}" + (f", {grouping} rows)" if grouping != CONTIGUOUS else ")")
cfg = SearchConfig(score=score, q=q, tail_fraction=tail, grouping=grouping)

found = ui.found_scores(lm, splits, ks, grouping, label)
if found is None:
    st.info(ui.scores_cost_text(lm, splits, ks, grouping))
    if st.button("Compute scores", type="primary", disabled=ui.job_running("scores", lm, splits)):
        ui.start_job("scores", label, lm, splits,
                     lambda job: load_spectra(lm, splits, ui.store(), ks, job.cancel, job.on_progress, grouping=grouping))
    ui.live_job("scores", lm, splits)
    st.stop()
spectra, loss = found
table = score_table(lm, spectra, score, cfg)
ranked = sorted([r for r in table if r["rank"] is not None], key=lambda r: r["rank"])
names = [r["name"] for r in ranked]
skipped = [r["name"] for r in table if not r["finite"]]
if skipped:
    st.warning(f"Skipped (NaN/inf gradient): {', '.join(skipped)}")

ui.apply_pending_matrix(names)  # a choice made in the table or on the heatmap, before the select box is drawn


def choose(name: str | None, source: str) -> None:
    """React to a new table/heatmap selection only when it changes (the widgets keep theirs across runs)."""
    if name and name != st.session_state.get(f"last_{source}"):
        st.session_state[f"last_{source}"] = name
        if name != st.session_state["matrix_pick"]:
            st.session_state["pending_matrix"] = name
            st.rerun()


left, right = st.columns([3, 2])
with right:
    st.subheader(f"Top {q}")
    top = pd.DataFrame([{"rank": r["rank"] + 1, "layer": r["layer"], "type": r["type"], "score": r["score"],
                         "name": r["name"]} for r in ranked[:q]])
    sel = st.dataframe(top.drop(columns="name"), hide_index=True, on_select="rerun", selection_mode="single-row",
                       key="top_table")  # the name, cut short in this column, is the Matrix box's below
    choose(top.iloc[sel.selection.rows[0]]["name"] if sel.selection.rows else None, "table")
    st.selectbox("Matrix", names, key="matrix_pick")
    st.session_state["selected_matrix"] = st.session_state["matrix_pick"]
    st.metric("Calibration log-loss", f"{loss:.4f}")
with left:
    event = st.plotly_chart(ui.score_heatmap(table, st.session_state["selected_matrix"]), key="heatmap",
                            on_select="rerun", selection_mode="points")
    clicked = [p.get("customdata") for p in (event.selection.points if event else []) if p.get("customdata")]
    choose(clicked[0] if clicked else None, "heatmap")
    st.caption("Click a cell, pick a row of the top-q table, or use the Matrix box.")
sp = spectra[st.session_state["selected_matrix"]]
st.plotly_chart(ui.gradient_profile(sp.S[1][0], sp.g[1][0], tail, st.session_state["selected_matrix"]), key="profile")
with st.expander(f"All {len(table)} matrices by score (sortable; the table's toolbar downloads it as CSV)"):
    st.dataframe(ui.scores_frame(table), hide_index=True, key="all_scores")
st.session_state["top_q"] = names[:q]
ui.next_page("Explore", f"try the top {q} with K and ρ grids, or one matrix with sliders")
