"""Model & task: pick a model and a task, see the model's facts and its baseline accuracy."""
from __future__ import annotations

import streamlit as st

import laser_ui as ui

ui.use_app_navigation()
st.set_page_config(page_title="LASER Lab", layout="wide")
st.title("LASER Lab · Model & task")
st.caption("Gradient-guided low-rank reduction (Compress to Impress) and the LASER baseline.")

ui.render_setup_form()  # on a bad model or task: an error, and the previous ones stay loaded

ui.render_sidebar_status()
lm = ui.current_model()
splits = ui.current_splits()

ui.render_model_facts(lm, splits)
ui.render_example(splits)
for note in ui.load_warnings():
    st.warning(note)

st.subheader("Baseline")
store = ui.store()
cached = {s: ui.cached_result(lm, splits, s) for s in ("calib", "test")}
job = ui.session_job("baseline", lm, splits)
if not all(cached.values()) and job is not None and job.status == "done":
    cached = job.result  # cache switched off or unwritable: show the job's own result
if all(cached.values()):
    b = st.columns(2)
    b[0].metric("Calibration accuracy", f"{cached['calib']['accuracy']:.3f}", help=f"log-loss {cached['calib']['log_loss']:.4f}")
    b[1].metric("Held-out test accuracy", f"{cached['test']['accuracy']:.3f}", help=f"log-loss {cached['test']['log_loss']:.4f}")
    ui.mark_seen("baseline", lm, splits)  # the job's results, read from the cache once it ended
else:
    if st.button("Compute baseline accuracy", disabled=ui.job_running("baseline", lm, splits)):
        ui.start_eval_job("baseline", "baseline", lm, splits, [("calib", None, "calib"), ("test", None, "test")])
    ui.live_job("baseline", lm, splits)

ui.next_page("Layer scores", "the singular-value gradients of every matrix, scored")
if store.disabled_reason:
    st.warning(store.disabled_reason)
