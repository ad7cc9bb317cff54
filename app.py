"""LASER Lab dashboard: `streamlit run app.py`. The pages live in pages/; this file only names them."""
from __future__ import annotations

import streamlit as st

st.set_page_config(page_title="LASER Lab", layout="wide")
pages = [
    st.Page("pages/1_Model_and_task.py", title="Model & task", icon=":material/memory:", default=True),
    st.Page("pages/2_Layer_scores.py", title="Layer scores", icon=":material/grid_on:"),
    st.Page("pages/3_Explore.py", title="Explore", icon=":material/science:"),
    st.Page("pages/4_Results.py", title="Results", icon=":material/table_chart:"),
    st.Page("pages/5_Export.py", title="Export", icon=":material/download:"),
]
page = st.navigation(pages)
st.session_state["_page"] = page.title  # which page a job's progress is drawn on (laser_ui.render_sidebar_jobs)
page.run()
