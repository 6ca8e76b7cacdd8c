"""Reports: what a comparison leaves behind.

summary.py (summary.json + details.json.gz, the terminal table), junit.py (junit.xml: the verdict and
one testcase per block), statuses.py (each status's tone and headline, for every output), index.py
(one index over a suite's cases), html/ (the self-contained HTML report and index page).
"""
