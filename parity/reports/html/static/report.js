/* sd-parity report: charts, heatmap, drill-downs and the tensor table, drawn from the page's JSON
 * block (#report-data). Strings from run files are only ever set as textContent or drawn on a
 * canvas, never parsed as HTML. */
"use strict";
(function () {
  const DATA = JSON.parse(document.getElementById("report-data").textContent);
  Chart.defaults.animation = false;
  Chart.defaults.font.size = 11;
  const COLORS = { pass: "#2b7bb9", fail: "#d62728", isolated: "#ff9f1c", isolatedFail: "#8c2d04",
                   threshold: "#666666", first: "#000000" };
  const drillIds = new Set(DATA.drilldowns.map((d) => d.id));

  // ---------------------------------------------------------------------------------------------
  // numbers: summary.json writes non-finite values as the strings "Infinity", "-Infinity", "NaN"

  function num(value) {
    return value === null || value === undefined ? null : Number(value);
  }

  // Log-axis ticks: only powers of ten are labelled (1e-7, 0.01, 1, 100), the minor ticks stay unlabelled.
  function decadeTick(value) {
    const exponent = Math.log10(value);
    if (!(value > 0) || Math.abs(exponent - Math.round(exponent)) > 1e-9) return "";
    const k = Math.round(exponent);
    return k >= -3 && k <= 3 ? String(Number(Math.pow(10, k).toPrecision(1))) : "1e" + k;
  }

  function toneOf(status) {
    return DATA.tones[status] || "neutral";
  }

  function fmt(value) {
    const v = num(value);
    if (v === null) return "-";
    if (Number.isNaN(v)) return "NaN";
    if (!Number.isFinite(v)) return v > 0 ? "∞" : "-∞";
    if (v === 0) return "0";
    const a = Math.abs(v);
    return a >= 1e-3 && a < 1e6 ? String(Number(v.toPrecision(5))) : v.toExponential(3).replace(/\.?0+e/, "e");
  }

  // names are data: characters that are not printable (controls, format characters, separators other
  // than the space) show as escapes, the rule of sd_parity.escaping.printable
  const UNPRINTABLE = /[\p{C}\p{Z}]/gu;

  function visible(text) {
    return String(text).replace(UNPRINTABLE, (ch) => {
      if (ch === " ") return ch;
      const code = ch.codePointAt(0);
      const hex = code.toString(16);
      return code <= 0xff ? "\\x" + hex.padStart(2, "0") : code <= 0xffff ? "\\u" + hex.padStart(4, "0")
        : "\\U" + hex.padStart(8, "0");
    });
  }

  function el(tag, attrs, text) {
    const node = document.createElement(tag);
    for (const [name, value] of Object.entries(attrs || {})) node.setAttribute(name, value);
    if (text !== undefined && text !== null) node.textContent = visible(text);
    return node;
  }

  // ---------------------------------------------------------------------------------------------
  // the tensor columns (parity/report/columns.py): row i of a comparison is position i everywhere

  function Rows(table, source) {
    const c = table.columns;
    const v = table.values;
    return {
      source: source,
      count: table.count,
      columns: c,
      values: v,
      text: (column, i) => (column in v ? v[column][c[column][i]] : c[column][i]),
      num: (column, i) => num(c[column][i]),
      key: (i) => visible(v.component[c.component[i]] + "/" + v.invocation[c.invocation[i]] + "/" + c.name[i]),
      describe: function (i) {
        const lines = [
          this.key(i) + (table.cand_keys[i] ? "  (candidate: " + visible(table.cand_keys[i]) + ")" : ""),
          source + " run · " + this.text("status", i) + " · ratio to threshold " + fmt(this.num("ratio", i)),
          "rel-L2 " + fmt(this.num("rel_l2", i)) + " (tolerance ≈ " + fmt(this.num("tol_rel_l2", i)) + ")" +
            " · SQNR " + fmt(this.num("sqnr_db", i)) + " dB",
          "max |d| " + fmt(this.num("max_abs", i)) + " · max rel " + fmt(this.num("max_rel", i)) +
            " · cos dist " + fmt(this.num("cosine_distance", i)) + " · ULP max " + fmt(this.num("ulp_max", i)),
          this.text("dtype", i) + " " + this.text("shape", i),
        ];
        if (c.reason[i]) lines.push(c.reason[i]);
        return lines;
      },
    };
  }

  const ROWS = { free: Rows(DATA.tables.free, "free") };
  if (DATA.tables.isolated) ROWS.isolated = Rows(DATA.tables.isolated, "isolated");

  function anchorOf(source, index) {
    return "dd-" + source + "-" + index;
  }

  // Go to a tensor: its drill-down when there is one, else the table filtered to it.
  function reveal(source, index) {
    const id = anchorOf(source, index);
    if (drillIds.has(id)) {
      const card = document.getElementById(id);
      card.open = true;
      card.scrollIntoView({ block: "start" });
      return;
    }
    TABLE.show({ run: source, component: "", group: "", status: "", text: ROWS[source].key(index) });
  }

  // ---------------------------------------------------------------------------------------------
  // error along depth

  const Y_MODES = {
    rel_l2: { title: "relative L2 error ‖c − r‖ / ‖r‖", log: true,
              value: (R, i) => R.num("rel_l2", i), limit: (R, i) => R.num("tol_rel_l2", i) },
    sqnr: { title: "SQNR in dB (higher is closer)", log: false,
            value: (R, i) => R.num("sqnr_db", i),
            limit: (R, i) => { const t = R.num("tol_rel_l2", i); return t > 0 ? -20 * Math.log10(t) : null; } },
    ratio: { title: "ratio to threshold (fails above 1)", log: true,
             value: (R, i) => R.num("ratio", i), limit: () => 1 },
  };

  // Values a chart can place: zeros (log axes) and infinities are pinned just beyond the data.
  function placer(values, log) {
    const finite = values.filter((v) => v !== null && Number.isFinite(v) && (!log || v > 0));
    let low = finite.length ? Math.min(...finite) : (log ? 1e-12 : 0);
    let high = finite.length ? Math.max(...finite) : (log ? 1 : 1);
    const pad = log ? 10 : Math.max(10, (high - low) * 0.05);
    const floor = log ? low / pad : low - pad;
    const ceiling = log ? high * pad : high + pad;
    return (v) => {
      if (v === null || Number.isNaN(v)) return null;
      if (v === Infinity) return ceiling;
      if (v === -Infinity || (log && v <= 0)) return floor;
      return v;
    };
  }

  function depthDatasets(chart, mode) {
    const m = Y_MODES[mode];
    const free = ROWS.free;
    const iso = ROWS.isolated;
    const all = chart.free.map((i) => m.value(free, i))
      .concat(iso ? chart.isolated.map((i) => m.value(iso, i)) : [])
      .concat(chart.free.map((i) => m.limit(free, i)));
    const place = placer(all, m.log);
    const point = (R, i, y) => ({ x: R.num("order", i), y: place(y), i: i, src: R.source });
    const sets = { pass: [], fail: [], limit: [], isoPass: [], isoFail: [], first: [] };
    for (const i of chart.free) {
      const p = point(free, i, m.value(free, i));
      if (p.y === null) continue;
      (free.text("status", i) === "fail" ? sets.fail : sets.pass).push(p);
      if (i === DATA.first) sets.first.push(p);
      const limit = place(m.limit(free, i));
      if (limit !== null) sets.limit.push({ x: p.x, y: limit, i: i, src: "free", limit: true });
    }
    if (iso) {
      for (const i of chart.isolated) {
        const p = point(iso, i, m.value(iso, i));
        if (p.y !== null) (iso.text("status", i) === "fail" ? sets.isoFail : sets.isoPass).push(p);
      }
    }
    const ds = (label, data, style) => Object.assign({ label: label, data: data, showLine: false }, style);
    return [
      ds("first divergence", sets.first, { pointStyle: "star", radius: 9, borderColor: COLORS.first, borderWidth: 2 }),
      ds("free-running: divergent", sets.fail, { pointStyle: "crossRot", radius: 5, borderColor: COLORS.fail, borderWidth: 2 }),
      ds("free-running: within threshold", sets.pass, { radius: 2, backgroundColor: COLORS.pass, borderColor: COLORS.pass }),
      ds("isolated: divergent", sets.isoFail, { pointStyle: "crossRot", radius: 5, borderColor: COLORS.isolatedFail, borderWidth: 2, hidden: !iso }),
      ds("isolated: within threshold", sets.isoPass, { radius: 2, backgroundColor: COLORS.isolated, borderColor: COLORS.isolated, hidden: !iso }),
      ds("threshold", sets.limit, { pointStyle: "line", radius: 4, borderColor: COLORS.threshold, borderWidth: 1 }),
    ].filter((d) => d.data.length || d.label.startsWith("free-running"));
  }

  // Dashed lines and labels where each invocation (step_000, call_0, ...) starts.
  const invocationMarks = {
    id: "invocationMarks",
    afterDatasetsDraw(chart, args, options) {
      const marks = options.marks || [];
      if (marks.length < 2) return;
      const { ctx, chartArea, scales } = chart;
      ctx.save();
      ctx.strokeStyle = "#bbbbbb";
      ctx.fillStyle = "#777777";
      ctx.setLineDash([3, 3]);
      ctx.font = "10px sans-serif";
      let lastLabel = -Infinity;
      for (const [order, label] of marks) {
        const x = scales.x.getPixelForValue(order);
        if (x < chartArea.left || x > chartArea.right) continue;
        ctx.beginPath();
        ctx.moveTo(x, chartArea.top);
        ctx.lineTo(x, chartArea.bottom);
        ctx.stroke();
        if (x - lastLabel > 50) {
          ctx.fillText(label, x + 2, chartArea.top + 10);
          lastLabel = x;
        }
      }
      ctx.restore();
    },
  };

  const depthCharts = [];

  function drawDepth(mode) {
    const m = Y_MODES[mode];
    for (const { chart, spec } of depthCharts) {
      chart.data.datasets = depthDatasets(spec, mode);
      chart.options.scales.y.type = m.log ? "logarithmic" : "linear";
      chart.options.scales.y.ticks = m.log ? { callback: decadeTick, autoSkip: false } : {};
      chart.options.scales.y.title.text = m.title;
      chart.update();
    }
  }

  function buildDepth() {
    const box = document.getElementById("depth-charts");
    if (!DATA.depth.length) {
      box.appendChild(el("p", { class: "muted" }, "No float tensors were compared."));
      return;
    }
    for (const spec of DATA.depth) {
      const card = el("div", { class: "card depth", "data-component": spec.component });
      let title = spec.component + " — " + spec.total_free + " tensors";
      if (spec.free.length < spec.total_free) title += " (" + spec.free.length + " drawn: each stretch keeps its extremes)";
      card.appendChild(el("h3", {}, title));
      const holder = el("div", { class: "canvas-box tall" });
      const canvas = el("canvas", { "aria-label": "error along depth, " + spec.component, role: "img" });
      holder.appendChild(canvas);
      card.appendChild(holder);
      box.appendChild(card);
      const chart = new Chart(canvas, {
        type: "scatter",
        data: { datasets: [] },
        plugins: [invocationMarks],
        options: {
          maintainAspectRatio: false,
          parsing: false,
          interaction: { mode: "nearest", intersect: true },
          scales: {
            x: { type: "linear", title: { display: true, text: "execution order" } },
            y: { type: "logarithmic", title: { display: true, text: "" } },
          },
          plugins: {
            invocationMarks: { marks: spec.invocations },
            legend: { position: "bottom", labels: { usePointStyle: true, boxHeight: 6 } },
            tooltip: {
              callbacks: {
                title: () => "",
                label: (ctx) => {
                  const R = ROWS[ctx.raw.src];
                  if (ctx.raw.limit) return ["threshold of " + R.key(ctx.raw.i), "≈ " + fmt(ctx.raw.y)];
                  return R.describe(ctx.raw.i);
                },
              },
            },
          },
          onClick: (event, elements, ch) => {
            if (elements.length) {
              const raw = ch.data.datasets[elements[0].datasetIndex].data[elements[0].index];
              reveal(raw.src, raw.i);
            }
          },
        },
      });
      depthCharts.push({ chart: chart, spec: spec });
    }
    drawDepth("rel_l2");
    toggles("depth-mode", drawDepth);
  }

  function toggles(id, onChange) {
    const group = document.getElementById(id);
    group.addEventListener("click", (event) => {
      const button = event.target.closest("button[data-mode]");
      if (!button) return;
      for (const b of group.querySelectorAll("button")) b.classList.toggle("on", b === button);
      onChange(button.dataset.mode);
    });
  }

  // ---------------------------------------------------------------------------------------------
  // colour scales

  const VIRIDIS = ["#440154", "#482878", "#3e4989", "#31688e", "#26828e", "#1f9e89", "#35b779", "#6ece58", "#b5de2b", "#fde725"];

  function mix(a, b, t) {
    const pa = [1, 3, 5].map((k) => parseInt(a.slice(k, k + 2), 16));
    const pb = [1, 3, 5].map((k) => parseInt(b.slice(k, k + 2), 16));
    return "rgb(" + pa.map((x, k) => Math.round(x + (pb[k] - x) * t)).join(",") + ")";
  }

  function sequential(t) {
    return scale(VIRIDIS, t);
  }

  // Ratio to threshold: within it a sequential green (pale far inside, deeper toward the threshold: all
  // of it healthy), beyond it orange to dark red; the step at 1 is where pass turns to fail.
  const PASS_SCALE = ["#edf8e9", "#bae4b3", "#74c476", "#31a354"];
  const FAIL_SCALE = ["#fd8d3c", "#e6550d", "#a63603", "#67000d"];

  function scale(colors, t) {
    const x = Math.min(1, Math.max(0, t)) * (colors.length - 1);
    const k = Math.min(colors.length - 2, Math.floor(x));
    return mix(colors[k], colors[k + 1], x - k);
  }

  function ratioColor(ratio) {
    if (ratio === null) return "#eeeeee";
    if (Number.isNaN(ratio) || ratio > 1) return scale(FAIL_SCALE, Number.isFinite(ratio) ? Math.log10(ratio) / 2 : 1);
    return scale(PASS_SCALE, ratio > 0 ? (Math.log10(ratio) + 4) / 4 : 0);
  }

  // ---------------------------------------------------------------------------------------------
  // layer x step heatmap

  function buildHeatmap() {
    const H = DATA.heatmap;
    const box = document.getElementById("heatmaps");
    if (!H) {
      box.appendChild(el("p", { class: "muted" }, "No denoising steps were captured."));
      document.getElementById("heatmap-mode").hidden = true;
      return;
    }
    const sides = [["free", "free-running"]].concat(H.isolated ? [["isolated", "isolated (each block fed the reference's inputs)"]] : []);
    const charts = [];
    let mode = "ratio";
    const logErrors = [];
    for (const [side] of sides) for (const row of H[side].rel_l2) for (const v of row) {
      const x = num(v);
      if (x !== null && x > 0 && Number.isFinite(x)) logErrors.push(Math.log10(x));
    }
    const lo = logErrors.length ? Math.min(...logErrors) : -8;
    const hi = logErrors.length ? Math.max(...logErrors) : 0;
    const colorOf = (cell) => {
      if (mode === "ratio") return ratioColor(cell.ratio);
      if (cell.error === null) return "#eeeeee";
      if (!(cell.error > 0)) return sequential(0);
      return Number.isFinite(cell.error) ? sequential(hi > lo ? (Math.log10(cell.error) - lo) / (hi - lo) : 1) : "#ff00ff";
    };
    const stepLabels = H.steps.map((s) => String(s));
    for (const [side, title] of sides) {
      const cells = H[side];
      const data = [];
      H.rows.forEach((row, r) => H.steps.forEach((step, s) => {
        if (cells.status[r][s] === null) return;
        data.push({ x: String(step), y: row, ratio: num(cells.ratio[r][s]), error: num(cells.rel_l2[r][s]),
                    status: cells.status[r][s], worst: cells.worst[r][s], compared: cells.compared[r][s],
                    missing: cells.missing[r][s], side: side, step: step, row: row });
      }));
      const card = el("figure", { class: "card heatmap", "data-side": side });
      card.appendChild(el("figcaption", {}, title));
      const holder = el("div", { class: "canvas-box", style: "height:" + Math.max(160, 26 * H.rows.length + 70) + "px" });
      const canvas = el("canvas", { role: "img", "aria-label": "layer by step heatmap, " + title });
      holder.appendChild(canvas);
      card.appendChild(holder);
      box.appendChild(card);
      charts.push(new Chart(canvas, {
        type: "matrix",
        data: { datasets: [{
          data: data,
          backgroundColor: (ctx) => colorOf(ctx.raw),
          borderColor: (ctx) => (ctx.raw.status === "fail" ? "#67001f" : "rgba(255,255,255,0.8)"),
          borderWidth: 1,
          width: ({ chart }) => (chart.chartArea || {}).width / H.steps.length - 1,
          height: ({ chart }) => (chart.chartArea || {}).height / H.rows.length - 1,
        }] },
        options: {
          maintainAspectRatio: false,
          scales: {
            x: { type: "category", labels: stepLabels, offset: true, grid: { display: false }, title: { display: true, text: "denoising step" } },
            y: { type: "category", labels: H.rows, offset: true, reverse: false, grid: { display: false } },
          },
          plugins: {
            legend: { display: false },
            tooltip: { callbacks: {
              title: (items) => items[0].raw.row + " · step " + items[0].raw.step,
              label: (ctx) => {
                const c = ctx.raw;
                const lines = [c.status + " · worst ratio to threshold " + fmt(c.ratio), "largest rel-L2 " + fmt(c.error),
                               c.compared + " tensors compared" + (c.missing ? ", " + c.missing + " missing" : "")];
                if (c.worst !== null) lines.push("worst: " + ROWS[c.side].key(c.worst));
                return lines;
              },
            } },
          },
          onClick: (event, elements, ch) => {
            if (!elements.length) return;
            const c = ch.data.datasets[0].data[elements[0].index];
            const group = c.row === "pipeline (sampler)" ? "pipeline" : c.row;
            TABLE.show({ run: c.side, component: "", group: group, status: "",
                         text: "/step_" + String(c.step).padStart(3, "0") + "/" });
          },
        },
      }));
    }
    const legend = document.getElementById("heatmap-legend");
    const drawLegend = () => {
      legend.textContent = "";
      const stops = mode === "ratio" ? [1e-4, 1e-2, 0.1, 1, 3, 100].map((r) => [ratioColor(r), (r <= 1 ? "pass ≤ " : "fail ") + fmt(r)])
        : [0, 0.25, 0.5, 0.75, 1].map((t) => [sequential(t), "1e" + (lo + t * (hi - lo)).toFixed(1)]);
      legend.appendChild(el("span", {}, mode === "ratio" ? "ratio to threshold: " : "largest rel-L2: "));
      for (const [color, label] of stops) {
        legend.appendChild(el("span", { class: "swatch", style: "background:" + color }));
        legend.appendChild(el("span", {}, label + " "));
      }
    };
    drawLegend();
    toggles("heatmap-mode", (m) => { mode = m; drawLegend(); for (const c of charts) c.update(); });
  }

  // ---------------------------------------------------------------------------------------------
  // drill-downs: charts are drawn when a card is first opened

  // Ticks on cell centres (at most ~8 of them), labelled with the unpooled pixel index.
  function cellTicks(count) {
    const step = Math.max(1, Math.ceil(count / 8));
    return (axis) => { axis.ticks = []; for (let v = 0; v < count; v += step) axis.ticks.push({ value: v }); };
  }

  function spatialChart(canvas, s) {
    const values = s.values.map(num);
    const finite = values.filter((v) => Number.isFinite(v));
    const high = finite.length ? Math.max(...finite) : 0;
    const data = values.map((v, k) => ({ x: k % s.cols, y: Math.floor(k / s.cols), v: v }));
    const legend = el("div", { class: "legend" });
    legend.appendChild(el("span", {}, "0"));
    for (const t of [0, 0.25, 0.5, 0.75, 1]) legend.appendChild(el("span", { class: "swatch", style: "background:" + sequential(t) }));
    legend.appendChild(el("span", {}, " " + fmt(high) + (finite.length < values.length ? " · magenta: non-finite" : "")));
    canvas.parentElement.after(legend);
    return new Chart(canvas, {
      type: "matrix",
      data: { datasets: [{
        data: data,
        backgroundColor: (ctx) => (Number.isFinite(ctx.raw.v) ? sequential(high > 0 ? ctx.raw.v / high : 0) : "#ff00ff"),
        borderWidth: 0,
        width: ({ chart }) => (chart.chartArea || {}).width / s.cols,
        height: ({ chart }) => (chart.chartArea || {}).height / s.rows,
      }] },
      options: {
        maintainAspectRatio: false,
        scales: {
          x: { type: "linear", min: -0.5, max: s.cols - 0.5, grid: { display: false },
               afterBuildTicks: cellTicks(s.cols), ticks: { callback: (v) => v * s.pool[1] } },
          y: { type: "linear", min: -0.5, max: s.rows - 0.5, reverse: true, grid: { display: false },
               afterBuildTicks: cellTicks(s.rows), ticks: { callback: (v) => v * s.pool[0] } },
        },
        plugins: {
          legend: { display: false },
          tooltip: { callbacks: {
            title: (items) => {
              const c = items[0].raw;
              return "h " + c.y * s.pool[0] + (s.pool[0] > 1 ? "–" + ((c.y + 1) * s.pool[0] - 1) : "") +
                ", w " + c.x * s.pool[1] + (s.pool[1] > 1 ? "–" + ((c.x + 1) * s.pool[1] - 1) : "");
            },
            label: (ctx) => "mean |d| over channels " + fmt(ctx.raw.v),
          } },
        },
      },
    });
  }

  function channelChart(canvas, c) {
    const labels = c.mean_abs.map((_, k) => (c.per_bar > 1 ? k * c.per_bar + "–" + ((k + 1) * c.per_bar - 1) : String(k)));
    const positive = c.mean_abs.map(num).some((v) => v > 0);
    return new Chart(canvas, {
      type: "bar",
      data: { labels: labels, datasets: [{ label: "mean |d|", data: c.mean_abs.map((v) => { const x = num(v); return positive && x <= 0 ? null : x; }),
                                           backgroundColor: COLORS.pass, categoryPercentage: 1, barPercentage: 1 }] },
      options: {
        maintainAspectRatio: false,
        scales: { y: { type: positive ? "logarithmic" : "linear", ticks: positive ? { callback: decadeTick, autoSkip: false } : {} },
                  x: { ticks: { maxTicksLimit: 12 } } },
        plugins: { legend: { display: false }, tooltip: { callbacks: {
          title: (items) => c.label + " " + items[0].label,
          label: (ctx) => ["mean |d| " + fmt(c.mean_abs[ctx.dataIndex]), "rel-L2 " + fmt(c.rel_l2[ctx.dataIndex])],
        } } },
      },
    });
  }

  function histogramChart(canvas, h) {
    const low = num(h.log10_low);
    const width = h.counts.length ? (num(h.log10_high) - low) / h.counts.length : 0;
    const labels = h.counts.map((_, k) => fmt(10 ** (low + (k + 0.5) * width)));
    return new Chart(canvas, {
      type: "bar",
      data: { labels: labels, datasets: [{ label: "elements", data: h.counts, backgroundColor: COLORS.fail, categoryPercentage: 1, barPercentage: 1 }] },
      options: {
        maintainAspectRatio: false,
        scales: { x: { title: { display: true, text: "|d|" }, ticks: { maxTicksLimit: 10 } } },
        plugins: { legend: { display: false }, tooltip: { callbacks: {
          title: (items) => { const k = items[0].dataIndex; return "|d| in [" + fmt(10 ** (low + k * width)) + ", " + fmt(10 ** (low + (k + 1) * width)) + ")"; },
          label: (ctx) => ctx.raw + " elements",
        } } },
      },
    });
  }

  // Pixels per level of difference in the decoded image (0 = identical), on a log scale.
  function buildLevels() {
    const canvas = document.getElementById("level-histogram");
    if (!canvas || !DATA.levels) return;
    const counts = DATA.levels;
    new Chart(canvas, {
      type: "bar",
      data: { labels: counts.map((_, k) => String(k)),
              datasets: [{ label: "pixels", data: counts.map((n) => (n > 0 ? n : null)),
                           backgroundColor: counts.map((_, k) => (k === 0 ? "#31a354" : COLORS.fail)),
                           categoryPercentage: 1, barPercentage: 0.9 }] },
      options: {
        maintainAspectRatio: false,
        scales: { x: { title: { display: true, text: "difference in levels (largest over R, G, B)" },
                       ticks: { maxTicksLimit: 16 } },
                  y: { type: "logarithmic", title: { display: true, text: "pixels" },
                       ticks: { callback: decadeTick, autoSkip: false } } },
        plugins: { legend: { display: false }, tooltip: { callbacks: {
          title: (items) => items[0].label + " level" + (items[0].label === "1" ? "" : "s") + " of difference",
          label: (ctx) => counts[ctx.dataIndex] + " pixels",
        } } },
      },
    });
  }

  function buildDrilldowns() {
    for (const card of document.querySelectorAll("details.drill")) {
      const spec = DATA.drilldowns[Number(card.dataset.drill)];
      let drawn = false;
      const draw = () => {
        if (drawn || !card.open) return;
        drawn = true;
        const canvas = (kind) => card.querySelector('canvas[data-chart="' + kind + '"]');
        if (spec.spatial) spatialChart(canvas("spatial"), spec.spatial);
        if (spec.channels) channelChart(canvas("channels"), spec.channels);
        histogramChart(canvas("histogram"), spec.histogram);
      };
      card.addEventListener("toggle", draw);
      draw();
    }
  }

  // ---------------------------------------------------------------------------------------------
  // the all-tensor table: filtered and sorted in memory, one page of rows in the DOM at a time

  const PAGE = 100;
  const COLUMNS = ["order", "status", "component", "invocation", "group", "name", "dtype", "shape", "ratio",
                   "rel_l2", "sqnr_db", "max_abs", "max_rel", "cosine_distance", "ulp_max", "reason"];
  const NUMERIC = new Set(["order", "ratio", "rel_l2", "sqnr_db", "max_abs", "max_rel", "cosine_distance", "ulp_max"]);

  const TABLE = (function () {
    const state = { run: "free", component: "", group: "", status: "", text: "", sort: "order", dir: 1, page: 0 };
    const body = document.querySelector("#tensor-table tbody");
    const inputs = { run: "f-run", component: "f-component", group: "f-group", status: "f-status", text: "f-text" };
    let matching = [];

    function fillOptions(select, names, keep) {
      select.textContent = "";
      for (const [value, label] of keep) select.appendChild(el("option", { value: value }, label));
      for (const name of names) select.appendChild(el("option", { value: name }, name.replace("_", " ")));
    }

    function refreshOptions() {
      const R = ROWS[state.run];
      fillOptions(document.getElementById("f-component"), R.values.component, [["", "all"]]);
      fillOptions(document.getElementById("f-group"), R.values.group, [["", "all"]]);
      fillOptions(document.getElementById("f-status"), R.values.status, [["", "all"], ["!pass", "not pass"]]);
    }

    function sortValue(R, column, i) {
      if (!NUMERIC.has(column)) return R.text(column, i) || "";
      const v = R.num(column, i);
      if (v === null) return -Infinity;
      return Number.isNaN(v) ? Infinity : v;
    }

    function compute() {
      const R = ROWS[state.run];
      const c = R.columns;
      const v = R.values;
      const want = (column, value) => (value === "" ? -1 : v[column].indexOf(value));
      const comp = want("component", state.component);
      const group = want("group", state.group);
      const notPass = state.status === "!pass";
      const status = notPass ? v.status.indexOf("pass") : want("status", state.status);
      const text = state.text.toLowerCase();
      matching = [];
      for (let i = 0; i < R.count; i++) {
        if (state.component && c.component[i] !== comp) continue;
        if (state.group && c.group[i] !== group) continue;
        if (state.status && (notPass ? c.status[i] === status : c.status[i] !== status)) continue;
        if (text && R.key(i).toLowerCase().indexOf(text) < 0) continue;
        matching.push(i);
      }
      const keys = new Map(matching.map((i) => [i, sortValue(R, state.sort, i)]));
      const dir = state.dir;
      matching.sort((a, b) => {
        const x = keys.get(a);
        const y = keys.get(b);
        return x < y ? -dir : x > y ? dir : a - b;
      });
      state.page = 0;
    }

    function cell(R, column, i) {
      const td = el("td", { class: "c-" + column });
      if (column === "status") {
        td.appendChild(el("span", { class: "badge tone-" + toneOf(R.text("status", i)) }, R.text("status", i).replace("_", " ")));
      } else if (column === "name") {
        const id = anchorOf(R.source, i);
        if (drillIds.has(id)) td.appendChild(el("a", { href: "#" + id, class: "key" }, R.columns.name[i]));
        else td.appendChild(el("span", { class: "key" }, R.columns.name[i]));
      } else if (NUMERIC.has(column) && column !== "order") {
        td.textContent = fmt(R.num(column, i));
      } else {
        td.textContent = R.text(column, i) === null ? "-" : visible(R.text(column, i));
        if (column === "reason") td.title = td.textContent;  // the cell is cut to one line
      }
      return td;
    }

    function render() {
      const R = ROWS[state.run];
      const pages = Math.max(1, Math.ceil(matching.length / PAGE));
      state.page = Math.min(state.page, pages - 1);
      const start = state.page * PAGE;
      const rows = document.createDocumentFragment();
      for (const i of matching.slice(start, start + PAGE)) {
        const tr = el("tr", { "data-index": String(i) });
        if (i === DATA.first && R.source === "free") tr.classList.add("first");
        for (const column of COLUMNS) tr.appendChild(cell(R, column, i));
        rows.appendChild(tr);
      }
      body.textContent = "";
      body.appendChild(rows);
      const count = document.getElementById("table-count");
      count.dataset.matching = String(matching.length);
      count.textContent = matching.length
        ? "rows " + (start + 1) + "–" + Math.min(start + PAGE, matching.length) + " of " + matching.length + " matching (" + R.count + " tensors)"
        : "no tensor matches (" + R.count + " tensors)";
      document.getElementById("page-info").textContent = "page " + (state.page + 1) + " of " + pages;
      document.getElementById("page-prev").disabled = state.page === 0;
      document.getElementById("page-next").disabled = state.page >= pages - 1;
      for (const th of document.querySelectorAll("#tensor-table th[data-sort]")) {
        th.setAttribute("aria-sort", th.dataset.sort === state.sort ? (state.dir > 0 ? "ascending" : "descending") : "none");
      }
    }

    function show(filters) {
      if (filters.run !== state.run) {
        state.run = filters.run;
        refreshOptions();
      }
      Object.assign(state, filters);
      for (const [key, id] of Object.entries(inputs)) document.getElementById(id).value = state[key];
      compute();
      render();
      document.getElementById("tensors").scrollIntoView({ block: "start" });
    }

    function init() {
      const run = document.getElementById("f-run");
      if (ROWS.isolated) run.appendChild(el("option", { value: "isolated" }, "isolated"));
      refreshOptions();
      for (const [key, id] of Object.entries(inputs)) {
        const input = document.getElementById(id);
        input.addEventListener(id === "f-text" ? "input" : "change", () => {
          if (key === "run" && input.value !== state.run) {
            state.run = input.value;
            refreshOptions();
            state.component = state.group = state.status = "";
          } else {
            state[key] = input.value;
          }
          compute();
          render();
        });
      }
      for (const th of document.querySelectorAll("#tensor-table th[data-sort]")) {
        th.addEventListener("click", () => {
          const column = th.dataset.sort;
          // numbers sort worst (largest) first on the first click; text sorts A to Z
          state.dir = column === state.sort ? -state.dir : (NUMERIC.has(column) && column !== "order" ? -1 : 1);
          state.sort = column;
          compute();
          render();
        });
      }
      document.getElementById("page-prev").addEventListener("click", () => { state.page -= 1; render(); });
      document.getElementById("page-next").addEventListener("click", () => { state.page += 1; render(); });
      compute();
      render();
    }

    return { init: init, show: show };
  })();

  // ---------------------------------------------------------------------------------------------

  function copyButtons() {
    for (const button of document.querySelectorAll("button.copy")) {
      button.addEventListener("click", () => {
        const code = button.parentElement.querySelector("code");
        const done = () => { button.textContent = "copied"; setTimeout(() => { button.textContent = "copy"; }, 1500); };
        const select = () => { const range = document.createRange(); range.selectNodeContents(code); const s = getSelection(); s.removeAllRanges(); s.addRange(range); };
        if (navigator.clipboard) navigator.clipboard.writeText(code.textContent).then(done, select);
        else select();
      });
    }
  }

  TABLE.init();
  buildDepth();
  buildHeatmap();
  buildLevels();
  buildDrilldowns();
  copyButtons();
  document.body.dataset.ready = "1";
})();
