"""Results: every evaluated candidate for this model and task, read from the cache."""
from __future__ import annotations

import streamlit as st

import laser_ui as ui
from laser_core.candidates import merit
from laser_core.estimate import SPLIT_WORDS

ui.use_app_navigation()
st.set_page_config(page_title="LASER Lab · Results", layout="wide")
st.title("Results")
ui.render_sidebar_status()
lm, splits = ui.current_model(), ui.current_splits()
docs = ui.cached_results(lm, splits, failed=True)
docs, failed = [d for d in docs if not d.get("error")], [d for d in docs if d.get("error")]
combined = ui.cached_combinations(lm, splits)  # several edits applied together (Export, eval --recipe)
if not docs and not failed:
    ui.user_error("No results for this model and task yet: run a search on the Explore page.")

split = st.radio("Split", sorted({d["split"] for d in docs + combined + failed}), horizontal=True, key="res_split",
                 persist_state="session", format_func=lambda s: SPLIT_WORDS.get(s, s),
                 help="calibration: C2I's search; validation: LASER's; held-out test: each row also paired with the "
                      "base on the same questions (vs_base, its 95% interval, McNemar p)")
rows = [d for d in docs if d["split"] == split]
base = next((d for d in rows if d["name"] is None), None)
df = ui.candidates_frame([d for d in rows if d["name"]], base if split == "test" else None)  # paired on held-out only
if base:
    st.metric(f"Base accuracy ({split})", f"{base['accuracy']:.3f}", help=f"log-loss {base['log_loss']:.4f}")
together = [d for d in combined if d["split"] == split]


def show_together() -> None:
    if together:
        st.subheader("Edits applied together")
        st.dataframe(ui.combinations_frame(lm, together, base if split == "test" else None), hide_index=True,
                     width="stretch", key="together_rows", column_config=ui.CANDIDATE_COLUMNS)
        st.caption("Combinations evaluated on Export (\"Combine with edits of other matrices\", \"Open a recipe "
                   "file\") or by `eval --recipe`, best first. What edits do together is measured, not added up.")


if df.empty:
    ui.render_failed(lm, failed, split)
    if not together:
        broke = any(d["split"] == split for d in failed)
        ui.user_error(f"No candidate has a result on the {split} split" + ("." if broke else
                                                                           ": only the base model was evaluated there."))
    show_together()
    st.stop()
df = df.sort_values(["accuracy", "log_loss"], ascending=[False, True])
st.dataframe(df, hide_index=True, width="stretch", key="all_rows", column_config=ui.CANDIDATE_COLUMNS)
if family := ui.family_caption(df):
    st.caption(family)
ui.render_failed(lm, failed, split)

c1, c2 = st.columns(2)
with c1:
    best_of = {b["name"]: f"best {b['accuracy']:.3f}" for b in sorted(ui.best_by_matrix(rows), key=merit, reverse=True)}
    best_of.update({n: "stopped early only" for n in df["name"] if n not in best_of})
    # plain names, the best in the chart's title: Streamlit keeps showing a selected option's label from the last run
    matrix = st.selectbox("Accuracy vs ρ for matrix", list(best_of), key="res_matrix", persist_state="session",
                          help="Matrices in order of their best accuracy on this split (of candidates that ran to "
                               "the end: one stopped early counts only the examples it saw)")
    sub = df[df["name"] == matrix].sort_values(["k", "rho"])  # the legend in K order, each line in ρ order
    st.plotly_chart(ui.rho_figure(sub, f"{matrix} ({best_of[matrix]})", base["accuracy"] if base else None),
                    key="acc_vs_rho")
with c2:
    st.plotly_chart(ui.pareto_figure(lm, df, base["accuracy"] if base else None), key="pareto")
st.plotly_chart(ui.accuracy_heatmap(lm, rows, base["accuracy"] if base else None), key="best_map")
st.caption(f"Each matrix's best candidate on the {split} split (blank: not evaluated); hover for its K and ρ.")
ui.render_score_vs_change(lm, splits, rows, base, split)

show_together()

ui.render_compare_two(lm, splits, df)
ui.render_searches(lm, splits)
