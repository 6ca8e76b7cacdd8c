"""Benchmarks: every test here is marked `bench` (run by `make bench`, never by `make test`).

Each benchmark records its best time; at the end the session prints, and writes to
reports/benchmarks.json, every implementation's time as a ratio to diffusers' measured in the same run.
"""
import json
import os
import re
import subprocess
from collections import defaultdict
from pathlib import Path

import pytest

RESULTS: dict = defaultdict(dict)
REPORT = Path(__file__).resolve().parents[2] / "reports" / "benchmarks.json"


def pytest_collection_modifyitems(items):
    for item in items:
        if Path(str(item.fspath)).parent == Path(__file__).parent:
            item.add_marker(pytest.mark.bench)


def record(case: str, impl: str, seconds: float, **extra) -> None:
    RESULTS[case][impl] = {"seconds": seconds, **extra}


def disk_rates(folder: Path, mib: int = 512) -> dict[str, float]:
    """The disk's own rates under `folder`, in GB/s, measured with dd: writing `mib` MiB through to the disk
    (conv=fdatasync) and reading it back past the page cache (iflag=direct)."""
    scratch = folder / "dd.bin"
    rates = {}
    try:
        for name, args in (("write", ["if=/dev/zero", f"of={scratch}", "conv=fdatasync"]),
                           ("read", [f"if={scratch}", "of=/dev/null", "iflag=direct"])):
            done = subprocess.run(["dd", *args, "bs=16M", f"count={mib // 16}"], capture_output=True, text=True)
            seconds = float(re.search(r"copied, ([0-9.]+) s", done.stderr).group(1))
            rates[f"disk_{name}_gb_per_s"] = mib * 2**20 / seconds / 1e9
    finally:
        scratch.unlink(missing_ok=True)
    return rates


def load_average() -> float:
    return os.getloadavg()[0]


def pytest_sessionfinish(session):
    if not RESULTS:
        return
    rows = []
    for case, impls in sorted(RESULTS.items()):
        base = impls.get("diffusers", {}).get("seconds")
        base_cpu = impls.get("diffusers", {}).get("cpu_seconds")
        for impl, values in sorted(impls.items()):
            ratio = values["seconds"] / base if base else None
            row = {"case": case, "impl": impl, **values, "ratio_to_diffusers": ratio}
            if base_cpu and "cpu_seconds" in values:
                row["cpu_ratio_to_diffusers"] = values["cpu_seconds"] / base_cpu
            rows.append(row)
    REPORT.parent.mkdir(exist_ok=True)
    REPORT.write_text(json.dumps(rows, indent=1) + "\n")
    print("\n\nbenchmark                          impl        seconds   x diffusers   x diffusers (CPU time)")
    for row in rows:
        ratio = f"{row['ratio_to_diffusers']:.2f}" if row["ratio_to_diffusers"] is not None else "-"
        cpu = f"{row['cpu_ratio_to_diffusers']:.2f}" if "cpu_ratio_to_diffusers" in row else "-"
        print(f"{row['case']:34s} {row['impl']:10s} {row['seconds']:9.4f}   {ratio:11s}   {cpu}")
