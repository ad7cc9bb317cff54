"""Export: the chosen candidate as a recipe (JSON/YAML), the CLI command, and the edited model on disk; and a
recipe file opened to check its edits on the session's model and task."""
from __future__ import annotations

import streamlit as st

import laser_ui as ui
from laser_core import SearchConfig
from laser_core.candidates import doc_edit
from laser_core.cli_args import command_defaults
from laser_core.estimate import SPLIT_WORDS
from laser_core.recipe import make_recipe, recipe_metrics
from laser_core.saving import recipe_text
from laser_core.search import SEARCH_SPLIT

ui.use_app_navigation()
st.set_page_config(page_title="LASER Lab · Export", layout="wide")
st.title("Export")
ui.render_sidebar_status()
lm, splits = ui.current_model(), ui.current_splits()
with st.expander("Open a recipe file: check its edits on this model and task"):
    ui.render_recipe_check(lm, splits)
docs = [d for d in ui.cached_results(lm, splits) if d["name"]]
if not docs:
    ui.user_error("Nothing to export yet: run a search on the Explore page first.")

report = ui.kept_report(lm, splits)
options, default = ui.export_options(docs, report)
choice = st.selectbox("Candidate", range(len(options)), index=ui.export_pick(options, default, report),
                      key="export_pick", format_func=lambda i: ui.candidate_label(options[i]))
d = options[choice]
ui.keep_export_pick(report, d)  # the pick stays on coming back, while Explore shows the same search
edit = doc_edit(d)
base = ui.cached_result(lm, splits, d["split"])
if short := ui.shortfall(d, base):
    st.warning(f"This candidate does not beat the base model on the {SPLIT_WORDS[d['split']]} split ({short}): "
               "applied, its recipe makes the model worse there.")
wanted = {"base_test": (None, "test"), "edited_test": (edit, "test")}
tests = ui.results_of("export_test", lm, splits, wanted)  # from the cache, or the finished job's own results
method = next((m for m, s in SEARCH_SPLIT.items() if s == d["split"]), None)

ui.render_held_out(lm, splits, tests, wanted)
with st.expander("On the other bundled tasks: what else does this edit change?"):
    elsewhere = ui.render_other_tasks(lm, splits, [edit])  # those measured go into the recipe and the model card
found_by = ui.search_that_found(lm, splits, d, report)  # Explore's, else one in the cache
recipe = make_recipe(lm, [edit], splits.spec, recipe_metrics(d["split"], base, d, **tests, other_tasks=elsewhere),
                     method=method, search=found_by["config"] if found_by else None)
with st.expander("Combine with edits of other matrices (applied together)"):
    combined = ui.render_combination(lm, splits, docs, d)  # (edits, recipe) once a combination is evaluated
fmt = st.radio("Format", ["JSON", "YAML"], horizontal=True, key="fmt", persist_state="session")
text = recipe_text(recipe, fmt)
st.download_button(f"Download recipe ({fmt})", text, file_name=f"laser_recipe.{fmt.lower()}",
                   mime="application/json" if fmt == "JSON" else "application/yaml", type="primary")
with st.expander(f"The recipe ({fmt})"):
    st.code(text, language=fmt.lower())
st.subheader("From the command line")
st.code(f"python -m laser_core apply --recipe laser_recipe.{fmt.lower()} --out edited-model", language="bash")
cfg = SearchConfig(**found_by["config"]) if found_by else command_defaults(method or "c2i")
st.caption(("or re-run the search that found it: " if found_by else "or run a search: ") + f"`{ui.cli_command(lm, splits, cfg)}`")

st.subheader("Save the edited model")
save_edits, save_recipe = [edit], recipe
if combined is not None:
    together = f"the {len(combined[0])} edits combined above, together"
    if st.radio("Apply", ["this candidate's edit alone", together], horizontal=True, key="save_what") == together:
        save_edits, save_recipe = combined
ui.render_save_model(lm, splits, save_edits, save_recipe)
