"""Reports: what a comparison leaves behind.

summary.py (summary.json, junit.xml, the terminal table), index.py (one index over a suite's
cases), html/ (the self-contained HTML report and index page).
"""
