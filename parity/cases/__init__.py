"""Cases: a reference run, a candidate's runs, their comparison and report, end to end (case.py);
`parity run` and `parity suite` are lists of cases."""
