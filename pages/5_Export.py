"""Export: the chosen candidate as a recipe (JSON/YAML), the CLI command, and the edited model on disk."""
from __future__ import annotations

import json
import shlex

import streamlit as st
import yaml

import laser_ui as ui
from laser_core import Edit, LaserError, edited
from laser_core.recipe import make_recipe, save_model_atomic

st.set_page_config(page_title="LASER Lab · Export", layout="wide")
st.title("Export")
ui.render_sidebar_status()
lm, splits = ui.current_model(), ui.current_splits()
docs = [d for d in ui.cached_results(lm, splits) if d["name"]]
if not docs:
    ui.user_error("Nothing to export yet: run a search on the Explore page first.")

docs.sort(key=lambda d: (d["split"] != "calib", -d["accuracy"], d["log_loss"]))
seen, options = set(), []
for d in docs:
    key = (d["name"], d["k"], d["rho"])
    if key not in seen:
        seen.add(key)
        options.append(d)
report = st.session_state.get("last_report")
default = 0
if report and report.get("best"):
    b = report["best"]
    default = next((i for i, d in enumerate(options) if (d["name"], d["k"], d["rho"]) == (b["name"], b["k"], b["rho"])), 0)
choice = st.selectbox("Candidate", range(len(options)), index=default, key="export_pick",
                      format_func=lambda i: f"{options[i]['name']} K={options[i]['k']} ρ={options[i]['rho']} "
                                            f"({options[i]['split']} acc {options[i]['accuracy']:.3f})")
d = options[choice]
edit = Edit(d["name"], int(d["k"]), float(d["rho"]))
base = ui.cached_result(lm, splits, d["split"])
pick = lambda r: None if r is None else {"accuracy": r["accuracy"], "log_loss": r["log_loss"], "n": r["n"]}  # noqa: E731
recipe = make_recipe(lm, [edit], splits.spec, {"search_split": d["split"], "base": pick(base), "edited": pick(d)})

fmt = st.radio("Format", ["JSON", "YAML"], horizontal=True, key="fmt")
text = json.dumps(recipe, indent=2, sort_keys=True) if fmt == "JSON" else yaml.safe_dump(recipe, sort_keys=True)
st.download_button(f"Download recipe ({fmt})", text, file_name=f"laser_recipe.{fmt.lower()}",
                   mime="application/json" if fmt == "JSON" else "application/yaml", type="primary")
st.code(text, language=fmt.lower())
st.subheader("Equivalent CLI command")
st.code(f"python -m laser_core apply --recipe laser_recipe.{fmt.lower()} --out edited-model", language="bash")
st.caption("or re-run the search: " + " ".join(["python -m laser_core search", "--model", shlex.quote(lm.spec.source),
                                               "--task", shlex.quote(splits.spec.source), "--n-calib",
                                               str(splits.spec.n_calib), "--seed", str(splits.spec.seed)]))

st.subheader("Save the edited model")
out = st.text_input("Folder", value=str(ui.cache_dir() / "edited" / f"{splits.task.name}-{lm.fingerprint[:8]}"), key="out")
overwrite = st.checkbox("Overwrite if it exists", key="overwrite")
if st.button("Save edited model"):
    try:
        with edited(lm, [edit], blocking=False):  # restored on exit: the cached model is never left edited
            path = save_model_atomic(lm, out, recipe, overwrite=overwrite)
        st.success(f"Saved to {path} (loads with AutoModelForCausalLM.from_pretrained).")
    except (LaserError, OSError) as e:
        st.error(f"Not saved: {e}")
