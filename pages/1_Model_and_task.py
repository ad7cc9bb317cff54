"""Model & task: pick a model and a task, see the model's facts and its baseline accuracy."""
from __future__ import annotations

import streamlit as st

import laser_ui as ui
from laser_core.tasks import MATCH_HELP, MATCH_RULES

ui.use_app_navigation()
st.set_page_config(page_title="LASER Lab", layout="wide")
st.title("LASER Lab · Model & task")
st.caption("Gradient-guided low-rank reduction (Compress to Impress) and the LASER baseline.")

ui.seed_setup_form()
with st.form("setup"):  # every widget has a key: ui.load_setup_form reads them from the session state
    c1, c2 = st.columns(2)
    with c1:
        st.subheader("Model")
        st.radio("Source", ui.MODEL_KINDS, horizontal=True, key="model_kind")
        st.text_input("Folder, .gguf file or hub id (not needed for demo)", key="model_path")
        st.selectbox("Device", ui.DEVICES, key="device")
        st.selectbox("dtype", ["float32", "bfloat16", "float16"], key="dtype",
                     help="On CPU keep float32: bf16 matmul is ~100x slower there.")
    with c2:
        st.subheader("Task")
        st.radio("Task source", ui.TASK_KINDS, horizontal=True, key="task_kind")
        st.selectbox("Bundled task", ui.BUNDLED, key="bundled")
        st.text_input("Task file path (BIG-bench task.json or its folder, .jsonl, .csv/.tsv, .parquet, .json records), or HF "
                      "dataset name[:split] or name:config:split", key="task_path")
        st.file_uploader("Task file", type=["jsonl", "csv", "tsv", "parquet", "json"], key="upload",
                         help="JSONL, CSV/TSV, Parquet, or JSON: a BIG-bench task.json or an array of records")
        for col, key in zip(st.columns(4), ui.TASK_COLUMNS):
            col.text_input(f"{key.removesuffix('_col')} column", key=key)
        t1, t2 = st.columns([3, 2])
        t1.text_input("Prompt template (optional)", key="prompt_template", placeholder="Question: {question}\\nAnswer:",
                      help="Builds each prompt from the file's or dataset's columns, in place of the prompt column; "
                           "\\n is a line break. Not for BIG-bench tasks, whose task.json sets the prompt.")
        t2.text_input("Fixed choices (optional)", key="fixed_choices", placeholder="no|yes",
                      help="The same choices for every row (BoolQ, SST-2), in place of the choices column; the answer "
                           "column gives an index or the text of one (true/false: the second/first of two). Choices "
                           "held one per column are named in the choices column instead: sol1,sol2.")
        s1, s2, s3, s4 = st.columns(4)
        s1.number_input("calibration", 1, 5000, key="n_calib", help="gradients and C2I's search")
        s2.number_input("held-out test", 1, 20000, key="n_test", help="reported, never searched on")
        s3.number_input("validation", 1, 20000, None, key="n_val", placeholder="20%",
                        help="LASER's search split; blank: 20% of the task")
        s4.number_input("seed", 0, 10**6, key="seed", help="shuffles the task before it is split")
        g1, g2, g3 = st.columns([2, 2, 3], vertical_alignment="bottom")
        g1.number_input("max new tokens", 1, 1024, key="max_new_tokens", help="generation tasks: tokens decoded per "
                        "answer; an answer longer than this is never right")
        g2.selectbox("Answer match", list(MATCH_RULES), key="match", help="generation tasks: when an answer is right. "
                     + MATCH_HELP)
        g3.checkbox("Answers count from 1", key="answer_base", help="the answer column gives the first choice as 1 "
                    "(Winogrande, Social IQa); a choice's text or label is read as it is")
    if st.form_submit_button("Load model and task", type="primary"):
        ui.load_setup_form()  # on a bad model or task: an error, and the previous ones stay loaded

ui.render_sidebar_status()
lm = ui.current_model()
splits = ui.current_splits()

ui.render_model_facts(lm, splits)
ui.render_example(splits.examples("calib")[0])
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
else:
    if st.button("Compute baseline accuracy"):
        ui.start_eval_job("baseline", "baseline", lm, splits, [("calib", None, "calib"), ("test", None, "test")])
    ui.live_job("baseline", lm, splits)

st.info("Next: **Layer scores** in the sidebar computes the singular-value gradients of every matrix.")
if store.disabled_reason:
    st.warning(store.disabled_reason)
