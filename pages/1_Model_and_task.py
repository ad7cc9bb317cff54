"""Model & task: pick a model and a task, see the model's facts and its baseline accuracy."""
from __future__ import annotations

import tempfile
from pathlib import Path

import streamlit as st

import laser_ui as ui
from laser_core import ConfigError, ModelSpec, TaskSpec

ui.use_app_navigation()
st.set_page_config(page_title="LASER Lab", layout="wide")
st.title("LASER Lab · Model & task")
st.caption("Gradient-guided low-rank reduction (Compress to Impress) and the LASER baseline.")

ui.seed_setup_form()
with st.form("setup"):
    c1, c2 = st.columns(2)
    with c1:
        st.subheader("Model")
        kind = st.radio("Source", ui.MODEL_KINDS, horizontal=True, key="model_kind")
        path = st.text_input("Folder, .gguf file or hub id (not needed for demo)", key="model_path")
        device = st.selectbox("Device", ui.DEVICES, key="device")
        dtype = st.selectbox("dtype", ["float32", "bfloat16", "float16"], key="dtype",
                             help="On CPU keep float32: bf16 matmul is ~100x slower there.")
    with c2:
        st.subheader("Task")
        tkind = st.radio("Task source", ui.TASK_KINDS, horizontal=True, key="task_kind")
        bundled = st.selectbox("Bundled task", ui.BUNDLED, key="bundled")
        tpath = st.text_input("Task file path (BIG-bench task.json, .jsonl, .csv), or HF dataset name[:split]",
                              key="task_path")
        upload = st.file_uploader("JSONL / CSV file", type=["jsonl", "csv"], key="upload")
        m1, m2, m3, m4 = st.columns(4)
        cols = {"prompt_col": m1.text_input("prompt column", key="prompt_col"),
                "choices_col": m2.text_input("choices column", key="choices_col"),
                "answer_col": m3.text_input("answer column", key="answer_col"),
                "targets_col": m4.text_input("targets column", key="targets_col")}
        s1, s2, s3, s4 = st.columns(4)
        n_calib = s1.number_input("calibration", 1, 5000, key="n_calib", help="gradients and C2I's search")
        n_test = s2.number_input("held-out test", 1, 20000, key="n_test", help="reported, never searched on")
        n_val = s3.number_input("validation", 1, 20000, None, key="n_val", placeholder="20%",
                                help="LASER's search split; blank: 20% of the task")
        seed = s4.number_input("seed", 0, 10**6, key="seed", help="shuffles the task before it is split")
    submitted = st.form_submit_button("Load model and task", type="primary")

if submitted:
    source = "demo" if kind.startswith("demo") else path.strip()
    if not source:
        ui.user_error("Give a folder, a .gguf file or a hub id for this model source.", status=True)
    if tkind == "bundled":
        tsource = bundled
    elif tkind == "upload JSONL/CSV":
        if upload is None:
            ui.user_error("Choose a JSONL or CSV file to upload first.", status=True)
        dest = Path(tempfile.gettempdir()) / "laser-lab-uploads" / upload.name
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_bytes(upload.getvalue())
        tsource = str(dest)
    elif tkind == "HF dataset":
        tsource = "hf:" + tpath.strip() if tpath.strip() else ""
    else:
        tsource = tpath.strip()
    if not tsource:
        ui.user_error("Give a task: a task.json path or a dataset name.", status=True)
    try:
        new_model = ModelSpec(source, device, dtype)
        new_task = TaskSpec(tsource, int(n_calib), int(n_test), None if n_val is None else int(n_val), int(seed),
                            **cols)
    except ConfigError as e:
        ui.user_error(str(e), status=True)
    ui.switch_to(new_model, new_task)  # on a bad model or task: an error, and the previous ones stay loaded

ui.render_sidebar_status()
lm = ui.current_model()
splits = ui.current_splits()

facts = lm.facts()
st.subheader("Model facts")
f = st.columns(6)
f[0].metric("Architecture", facts["architecture"])
f[1].metric("Layers", facts["layers"])
f[2].metric("Matrices", facts["matrices"])
n_params = facts["parameters"]
f[3].metric("Parameters", f"{n_params / 1e6:.1f} M" if n_params >= 1e5 else f"{n_params:,}")
f[4].metric("Device", facts["device"])
f[5].metric("dtype", facts["dtype"])
st.caption(f"Matrix types: {', '.join(facts['matrix_types'])} · fingerprint `{facts['fingerprint']}` · "
           f"task `{splits.task.name}` ({splits.task.kind}, {len(splits.task)} examples): calibration "
           f"{len(splits.calib)}, validation {len(splits.val)}, held-out test {len(splits.test)}, seed {splits.spec.seed}")

st.subheader("Baseline")
store = ui.store()
cached = {s: ui.cached_result(lm, splits, s) for s in ("calib", "test")}
job = ui.session_job("baseline")
if not all(cached.values()) and job is not None and job.status == "done":
    cached = job.result  # cache switched off or unwritable: show the job's own result
if all(cached.values()):
    b = st.columns(2)
    b[0].metric("Calibration accuracy", f"{cached['calib']['accuracy']:.3f}", help=f"log-loss {cached['calib']['log_loss']:.4f}")
    b[1].metric("Held-out test accuracy", f"{cached['test']['accuracy']:.3f}", help=f"log-loss {cached['test']['log_loss']:.4f}")
else:
    if st.button("Compute baseline accuracy"):
        ui.start_eval_job("baseline", "baseline", lm, splits, [("calib", None, "calib"), ("test", None, "test")])
    ui.live_job("baseline")

st.info("Next: **Layer scores** in the sidebar computes the singular-value gradients of every matrix.")
if store.disabled_reason:
    st.warning(store.disabled_reason)
