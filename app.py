"""LASER Lab dashboard: `streamlit run app.py`. The pages live in pages/; this file only names them."""
from __future__ import annotations

import streamlit as st

from laser_ui import PAGES

st.set_page_config(page_title="LASER Lab", layout="wide")
pages = [st.Page(path, title=title, icon=icon, default=not i) for i, (path, title, icon) in enumerate(PAGES)]
page = st.navigation(pages)
st.session_state["_page"] = page.title  # which page a job's progress is drawn on (laser_ui.render_sidebar_jobs)
page.run()
