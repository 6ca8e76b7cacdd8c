"""The HTML report in headless Chromium, opened from file:// as a person would: no network, no console
errors, every part drawn, the table sorts and filters, markup from run files stays inert.

Screenshots go to reports/ (screenshot-report.png, screenshot-drilldown.png, screenshot-index.png).
"""
import re
import shutil
import tempfile
from pathlib import Path

import pytest

from sd_parity.reports.html import REPORT_FILE, write_index_html, write_report
from sd_parity.reports.html.values import rounded, sort_key
from sd_parity.reports.summary import load_summary
from test_report import FAULTED, PAYLOADS, faulty_tiny_case, malicious_case  # pytest puts tests/ on sys.path

pytestmark = pytest.mark.browser

CHROMIUM = shutil.which("chromium")
FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync"]
SCREENSHOTS = Path(__file__).resolve().parents[1] / "reports"


@pytest.fixture(scope="module")
def browser():
    if CHROMIUM is None:
        pytest.skip("no chromium on PATH (apt-get install chromium); the report's browser checks need it")
    from playwright.sync_api import sync_playwright

    # a persistent context is how Playwright takes --user-data-dir: a fresh profile per run
    with sync_playwright() as playwright, tempfile.TemporaryDirectory() as profile:
        context = playwright.chromium.launch_persistent_context(
            profile, executable_path=CHROMIUM, headless=True, args=FLAGS, viewport={"width": 1400, "height": 900})
        yield context
        context.close()


def open_page(browser, path: Path, scripted: bool = True):
    """The page at `path` (once its script has run, for a report) and a list that collects anything
    that went wrong: console errors and warnings, script errors, dialogs, requests off file:/data:."""
    page = browser.new_page()
    problems = []
    page.on("console", lambda message: message.type in ("error", "warning")
            and problems.append(f"console {message.type}: {message.text}"))
    page.on("pageerror", lambda error: problems.append(f"page error: {error}"))
    page.on("request", lambda request: request.url.startswith(("file:", "data:"))
            or problems.append(f"network request: {request.url}"))
    page.on("dialog", lambda dialog: (problems.append(f"dialog: {dialog.message}"), dialog.dismiss()))
    page.goto(path.resolve().as_uri())
    if scripted:
        page.wait_for_selector("body[data-ready='1']", timeout=15_000)
    return page, problems


@pytest.fixture(scope="module")
def tiny_report(tmp_path_factory, reference_run):
    with pytest.MonkeyPatch.context() as monkeypatch:
        return faulty_tiny_case(tmp_path_factory.mktemp("tiny"), reference_run, monkeypatch, steps=2)


def table_state(page):
    return page.evaluate("""() => ({
        matching: Number(document.getElementById('table-count').dataset.matching),
        rows: [...document.querySelectorAll('#tensor-table tbody tr')].map(tr => Number(tr.dataset.index))})""")


def test_report_draws_everything_and_the_table_sorts_and_filters(browser, tiny_report):
    summary = load_summary(tiny_report / "summary.json")
    page, problems = open_page(browser, tiny_report / REPORT_FILE)
    first_key = f"unet/step_000/{FAULTED}"
    assert "DIVERGENCE" in page.locator("#verdict").inner_text()
    assert first_key in page.locator("#first-divergence").inner_text()
    assert page.locator("#first-divergence").bounding_box()["y"] < 900  # on the first screen

    # error along depth: one chart per component, with points; hover names the tensor
    components = list(dict.fromkeys(r["component"] for r in summary["tensors"]))
    charts = page.evaluate("""() => [...document.querySelectorAll('#depth-charts canvas')].map(c => {
        const chart = Chart.getChart(c);
        return chart.data.datasets.reduce((n, d) => n + d.data.length, 0); })""")
    assert len(charts) == len(components) and all(n > 0 for n in charts)
    unet = page.locator('#depth-charts [data-component="unet"] canvas')
    unet.scroll_into_view_if_needed()
    star = page.evaluate("""() => {
        const chart = Chart.getChart(document.querySelector('#depth-charts [data-component="unet"] canvas'));
        const k = chart.data.datasets.findIndex(d => d.label === 'first divergence');
        const p = chart.getDatasetMeta(k).data[0];
        return {x: p.x, y: p.y}; }""")
    box = unet.bounding_box()
    page.mouse.move(box["x"] + star["x"], box["y"] + star["y"])
    tooltip = page.evaluate("""() => {
        const chart = Chart.getChart(document.querySelector('#depth-charts [data-component="unet"] canvas'));
        return chart.tooltip.body ? chart.tooltip.body.flatMap(b => b.lines) : []; }""")
    assert any(first_key in line for line in tooltip) and any("rel-L2" in line for line in tooltip)
    page.click('#depth-mode button[data-mode="sqnr"]')
    assert page.evaluate("() => Chart.getChart(document.querySelector('#depth-charts canvas')).options.scales.y.type") \
        == "linear"
    page.click('#depth-mode button[data-mode="rel_l2"]')

    # heatmap: free and isolated, a cell per block and step
    cells = page.evaluate("() => [...document.querySelectorAll('#heatmaps canvas')]"
                          ".map(c => Chart.getChart(c).data.datasets[0].data.length)")
    assert len(cells) == 2 and cells[0] >= 2 * 8

    # drill-down of the first divergence: open, with its charts drawn
    card = f"#dd-free-{summary['first_divergence']['index']}"
    drill = page.locator(card)
    assert drill.get_attribute("open") is not None
    assert page.evaluate(f"() => [...document.querySelectorAll('{card} canvas')].every(c => Chart.getChart(c))")
    assert page.locator("#images img").count() >= 3 and page.locator("#images img").first.is_visible()

    # the table: sort by ratio (worst first), then filter by name and status
    rows = summary["tensors"]
    state = table_state(page)
    assert state["matching"] == len(rows) and state["rows"] == list(range(100))
    page.click('#tensor-table th[data-sort="ratio"]')
    worst_first = sorted(range(len(rows)), key=lambda i: (-sort_key(rounded(rows[i]["ratio"])), i))
    assert table_state(page)["rows"] == worst_first[:100]
    assert page.get_attribute('#tensor-table th[data-sort="ratio"]', "aria-sort") == "descending"
    page.fill("#f-text", "norm1")
    named = [i for i in worst_first if "norm1" in rows[i]["key"].lower()]
    assert table_state(page) == {"matching": len(named), "rows": named[:100]}
    page.select_option("#f-status", "fail")
    failing = [i for i in named if rows[i]["status"] == "fail"]
    assert table_state(page)["matching"] == len(failing) > 0

    assert_new_parts(page, summary)

    SCREENSHOTS.mkdir(exist_ok=True)
    page.fill("#f-text", "")
    page.select_option("#f-status", "")
    page.screenshot(path=SCREENSHOTS / "screenshot-report.png", full_page=True)
    drill.screenshot(path=SCREENSHOTS / "screenshot-drilldown.png")
    assert problems == []


def rgb(color: str) -> tuple[int, ...]:
    return tuple(int(x) for x in re.findall(r"\d+", color)[:3])


def assert_new_parts(page, summary):
    """Next steps, reproduce box, healthy pass colours, readable log ticks, true-scale image difference."""
    steps = page.locator("#next-steps li")
    assert steps.count() >= 2 and "unet_block_1_down" in steps.first.inner_text()
    assert steps.first.locator("a").get_attribute("href").startswith("#dd-isolated-")
    box = page.locator("#next-steps").bounding_box()
    assert box["height"] > 40 and page.locator("#next-steps").is_visible()
    repro = page.locator("#repro").inner_text()
    assert "parity compare /" in repro and "DIR" not in repro
    assert ("pytest -k" in repro) == (summary["runs"]["candidate"]["metadata"]["impl"] in ("numpy", "torch"))
    # heatmap: every passing cell is green-ish (not a warning colour), failing cells are red-ish
    colors = page.evaluate("""() => { const chart = Chart.getChart(document.querySelector('#heatmaps canvas'));
        const ds = chart.data.datasets[0]; const ctx = {chart: chart};
        return ds.data.map(raw => ({status: raw.status, color: ds.backgroundColor({...ctx, raw: raw})})); }""")
    passing = [rgb(c["color"]) for c in colors if c["status"] == "pass"]
    failing = [rgb(c["color"]) for c in colors if c["status"] == "fail"]
    assert passing and failing
    assert all(g >= r and g >= b for r, g, b in passing), passing  # green dominates: healthy
    assert all(r > g and r > b for r, g, b in failing), failing
    # log axes label powers of ten only
    ticks = page.evaluate("""() => { const chart = Chart.getChart(document.querySelector('#depth-charts canvas'));
        return chart.scales.y.ticks.map(t => t.label).filter(l => l !== ''); }""")
    assert ticks and all(re.fullmatch(r"1e-?\d+|0\.0*1|1|10+", label) for label in ticks), ticks
    # the decoded image: amplified and true-scale differences, and the pixels per level of difference
    assert page.locator('#images img[alt="true-scale difference"]').is_visible()
    levels = page.evaluate("() => Chart.getChart(document.getElementById('level-histogram')).data.datasets[0].data")
    assert levels[0] == summary["drilldowns"]["images"]["level_counts"][0]


def test_index_links_the_case_report(browser, tiny_report):
    summary = load_summary(tiny_report / "summary.json")
    index = {"title": "parity suite (tiny-sd1)", "status": "divergence", "cases": [{
        "name": "txt2img-ddim-numpy-fp32", "status": summary["verdict"]["status"], "passed": False,
        "verdict": summary["verdict"]["text"],
        "first_divergence": summary["first_divergence"], "culprits": summary["culprits"], "candidate": "numpy",
        "dtype": "fp32", "scheduler": "ddim", "pipeline": "txt2img", "mode": "both", "calibrated": False,
        "seconds": 1.0, "summary": str(tiny_report / "summary.json"), "report": str(tiny_report / REPORT_FILE),
        "repro": "parity run --model tiny-sd1 --candidate numpy"}]}
    page, problems = open_page(browser, write_index_html(index, tiny_report.parent / "parity.html"), scripted=False)
    assert "DIVERGENCE" in page.locator("#verdict").inner_text()
    page.screenshot(path=SCREENSHOTS / "screenshot-index.png", full_page=True)
    page.click("text=txt2img-ddim-numpy-fp32")
    page.wait_for_selector("body[data-ready='1']", timeout=15_000)
    assert FAULTED in page.locator("#first-divergence").inner_text()
    assert problems == []


def test_markup_in_names_and_prompt_stays_text(browser, tmp_path):
    path = write_report(malicious_case(tmp_path), tmp_path / REPORT_FILE)
    page, problems = open_page(browser, path)
    assert page.evaluate("() => document.querySelectorAll('img[src=\"x\"], img[onerror]').length") == 0
    assert page.evaluate("() => document.scripts.length") == 4  # the data block and the three inlined scripts
    assert PAYLOADS[0] in page.locator("#facts").inner_text()  # shown, as text
    page.fill("#f-text", "onerror")
    assert table_state(page)["matching"] >= 1
    assert PAYLOADS[1] in page.locator("#tensor-table tbody").inner_text()
    assert problems == []
