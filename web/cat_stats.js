// CAT Pruning: a compact view on the CAT Stats node (tokens computed per step, MACs saved,
// speed-up estimate, PSNR from CAT Compare) and a one-line result on the CAT Compare node.
//
// Data comes from the nodes' `ui` output, which the server sends in the "executed" message:
//   CAT Stats   -> {"text": [report], "cat_stats": [summary]}   (cat_core/report.py stats_summary)
//   CAT Compare -> {"text": [report], "cat_compare": [summary]} (cat_core/report.py compare_images)
// While a prompt runs, the Stats view shows a "running" state from the executing/progress events.
import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";

const STATS_CLASS = "CATStats";
const COMPARE_CLASS = "CATCompare";
const STATS_WIDGET = "cat_stats_view";
const COMPARE_WIDGET = "cat_compare_view";
const MODE_COLOURS = { dense: "#7c8594", capture: "#3b82f6", pruned: "#f2c522" };

const runState = { promptId: null, running: false, compare: null };

function injectStyle() {
  if (document.getElementById("cat-pruning-style")) return;
  const style = document.createElement("style");
  style.id = "cat-pruning-style";
  style.textContent = `
  .cat-view { box-sizing: border-box; width: 100%; height: 100%; padding: 6px 8px; display: flex;
    flex-direction: column; gap: 4px; font: 12px/1.3 system-ui, sans-serif; color: var(--fg-color, #ddd);
    background: var(--comfy-input-bg, #222); border-radius: 6px; overflow: hidden; }
  .cat-view .cat-state { font-size: 11px; opacity: 0.85; white-space: nowrap; overflow: hidden; text-overflow: ellipsis; }
  .cat-view[data-state="running"] .cat-state { color: #f2c522; opacity: 1; }
  .cat-view[data-state="error"] .cat-state { color: #f87171; opacity: 1; }
  .cat-view .cat-numbers { display: grid; grid-template-columns: repeat(3, 1fr); gap: 2px 8px; }
  .cat-view .cat-num b { display: block; font-size: 15px; font-weight: 600; }
  .cat-view .cat-num span { font-size: 10px; opacity: 0.7; }
  .cat-view canvas { flex: 1 1 auto; width: 100%; min-height: 60px; }
  .cat-view .cat-legend { font-size: 10px; opacity: 0.8; display: flex; gap: 10px; }
  .cat-view .cat-legend i { display: inline-block; width: 9px; height: 9px; margin-right: 3px; border-radius: 2px; }
  .cat-view details { font-size: 10px; }
  .cat-view pre { margin: 2px 0 0; max-height: 120px; overflow: auto; white-space: pre; font-size: 10px; }
  `;
  document.head.appendChild(style);
}

const pct = (x) => (x == null ? "–" : `${(100 * x).toFixed(1)}%`);
const fixed = (x, d, unit = "") => (x == null ? "–" : `${x.toFixed(d)}${unit}`);

function el(tag, cls, text) {
  const e = document.createElement(tag);
  if (cls) e.className = cls;
  if (text != null) e.textContent = text;
  return e;
}

function isClass(node, name) {
  return (node?.comfyClass ?? node?.constructor?.comfyClass ?? node?.type) === name;
}

class StatsView {
  constructor(node) {
    this.node = node;
    this.summary = null;
    this.report = "";
    this.promptId = null;
    this.state = "idle";
    this.status = "Not run yet: queue the workflow.";

    this.root = el("div", "cat-view");
    this.root.dataset.catView = "stats";
    this.stateLine = el("div", "cat-state");
    this.numbers = el("div", "cat-numbers");
    this.cells = {};
    for (const [key, label] of [["saved", "MACs saved"], ["speedup", "speed-up (MACs)"], ["psnr", "PSNR vs unpatched"],
                                ["cache", "cache peak"], ["time", "sampling time"], ["calls", "pruned / all calls"]]) {
      const cell = el("div", "cat-num");
      const value = el("b", null, "–");
      cell.append(value, el("span", null, label));
      this.numbers.append(cell);
      this.cells[key] = value;
    }
    this.canvas = el("canvas");
    this.legend = el("div", "cat-legend");
    for (const [mode, colour] of Object.entries(MODE_COLOURS)) {
      const item = el("span");
      const swatch = el("i");
      swatch.style.background = colour;
      item.append(swatch, document.createTextNode(mode));
      this.legend.append(item);
    }
    this.legend.append(el("span", null, "bars: image tokens computed per step"));
    this.details = el("details");
    this.details.append(el("summary", null, "report"));
    this.pre = el("pre");
    this.details.append(this.pre);
    this.root.append(this.stateLine, this.numbers, this.canvas, this.legend, this.details);

    if (typeof ResizeObserver !== "undefined") {
      this.resizeObserver = new ResizeObserver(() => this.drawChart());
      this.resizeObserver.observe(this.canvas);
    }
    this.render();
  }

  setState(state, status) {
    this.state = state;
    if (status != null) this.status = status;
    this.render();
  }

  setResult(summary, report, promptId) {
    this.summary = summary ?? null;
    this.report = report ?? "";
    this.promptId = promptId;
    const s = this.summary;
    if (!s || !s.has_run) {
      this.setState("done", "No CAT run recorded: is the sampler's model the CAT Model Patch output?");
    } else if (s.fallback_reason) {
      this.setState("error", `Fell back to full compute: ${s.fallback_reason}`);
    } else if (s.pruned_calls === 0 && s.notes?.length) {  // a sampler CAT leaves unpruned, or reuses steps with
      const reused = s.reused_calls ? ` (${s.reused_calls} calls reused)` : "";
      this.setState("done", s.notes[0].charAt(0).toUpperCase() + s.notes[0].slice(1) + reused);
    } else {
      const st = s.settings ?? {};
      const warmup = st.warmup_steps === 0 ? `${s.warmup_used ?? "–"} (auto)` : (st.warmup_steps ?? "–");
      const reused = s.reused_calls ? `, ${s.reused_calls} calls reused` : "";
      this.setState("done", `Last run: keep ${fixed(st.keep_ratio, 2)}, warm-up ${warmup}, ` +
        `cool-down ${st.cooldown_steps ?? 0}, ${st.num_clusters ?? "–"} clusters, ${s.steps.length} steps${reused}`);
    }
  }

  compareFor() {
    const c = runState.compare;
    return c && this.promptId != null && c.promptId === this.promptId ? c.summary : null;
  }

  render() {
    const s = this.summary;
    const root = this.root;
    root.dataset.state = this.state;
    root.dataset.steps = String(s?.steps?.length ?? 0);
    root.dataset.macsSaved = s?.macs_saved != null ? String(s.macs_saved) : "";
    this.stateLine.textContent = this.status;
    this.cells.saved.textContent = pct(s?.macs_saved);
    this.cells.speedup.textContent = s?.speedup_estimate != null ? `≈${s.speedup_estimate.toFixed(2)}×` : "–";
    this.cells.cache.textContent = fixed(s?.peak_cache_mib, 1, " MiB");
    this.cells.time.textContent = fixed(s?.wall_seconds, 2, " s");
    this.cells.calls.textContent = s?.has_run ? `${s.pruned_calls ?? 0} / ${s.calls ?? 0}` : "–";
    const compare = this.compareFor();
    if (compare) {
      const allSame = compare.identical?.length && compare.identical.every(Boolean);
      this.cells.psnr.textContent = allSame ? "identical" : fixed(compare.psnr_mean, 2, " dB");
      this.cells.psnr.title = `SSIM ${fixed(compare.ssim_mean, 4)} (mean over ${compare.images} image(s))`;
      root.dataset.psnr = compare.psnr_mean != null ? String(compare.psnr_mean) : "";
    } else {
      this.cells.psnr.textContent = "–";
      this.cells.psnr.title = "Connect CAT Compare (patched vs unpatched images of the same seed) to see PSNR.";
      root.dataset.psnr = "";
    }
    this.pre.textContent = this.report || "(no report yet)";
    this.drawChart();
  }

  drawChart() {
    const canvas = this.canvas;
    const dpr = window.devicePixelRatio || 1;
    const w = Math.max(1, Math.round(canvas.clientWidth * dpr));
    const h = Math.max(1, Math.round(canvas.clientHeight * dpr));
    if (canvas.width !== w) canvas.width = w;
    if (canvas.height !== h) canvas.height = h;
    const ctx = canvas.getContext("2d");
    if (!ctx) return;
    ctx.clearRect(0, 0, w, h);
    const steps = this.summary?.steps ?? [];
    canvas.dataset.bars = String(steps.length);
    const pad = { l: 30 * dpr, r: 4 * dpr, t: 6 * dpr, b: 14 * dpr };
    const pw = w - pad.l - pad.r;
    const ph = h - pad.t - pad.b;
    if (pw <= 0 || ph <= 0) return;
    ctx.font = `${10 * dpr}px system-ui, sans-serif`;
    ctx.fillStyle = "rgba(160,160,160,0.9)";
    ctx.strokeStyle = "rgba(160,160,160,0.35)";
    ctx.lineWidth = dpr;
    for (const f of [0, 0.5, 1]) {
      const y = pad.t + ph * (1 - f);
      ctx.beginPath();
      ctx.moveTo(pad.l, y);
      ctx.lineTo(pad.l + pw, y);
      ctx.stroke();
      ctx.textAlign = "right";
      ctx.textBaseline = "middle";
      ctx.fillText(`${Math.round(f * 100)}%`, pad.l - 4 * dpr, y);
    }
    if (!steps.length) {
      ctx.textAlign = "center";
      ctx.fillText(this.state === "running" ? "running…" : "no steps yet", pad.l + pw / 2, pad.t + ph / 2);
      return;
    }
    const slot = pw / steps.length;
    const bw = Math.max(1, slot * 0.8);
    steps.forEach((step, i) => {
      const bh = ph * Math.max(0, Math.min(1, step.fraction ?? 0));
      ctx.fillStyle = MODE_COLOURS[step.mode] ?? "#999";
      ctx.fillRect(pad.l + i * slot + (slot - bw) / 2, pad.t + ph - bh, bw, bh);
    });
    const keep = this.summary?.settings?.keep_ratio;
    if (keep != null) {
      const y = pad.t + ph * (1 - keep);
      ctx.setLineDash([4 * dpr, 3 * dpr]);
      ctx.strokeStyle = "rgba(242,197,34,0.8)";
      ctx.beginPath();
      ctx.moveTo(pad.l, y);
      ctx.lineTo(pad.l + pw, y);
      ctx.stroke();
      ctx.setLineDash([]);
    }
    ctx.fillStyle = "rgba(160,160,160,0.9)";
    ctx.textBaseline = "top";
    ctx.textAlign = "left";
    ctx.fillText(`step ${steps[0].step}`, pad.l, pad.t + ph + 2 * dpr);
    ctx.textAlign = "right";
    ctx.fillText(`${steps[steps.length - 1].step}`, pad.l + pw, pad.t + ph + 2 * dpr);
  }
}

class CompareView {
  constructor(node) {
    this.root = el("div", "cat-view");
    this.root.dataset.catView = "compare";
    this.line = el("div", "cat-numbers");
    this.psnr = el("b", null, "–");
    this.ssim = el("b", null, "–");
    this.maxDiff = el("b", null, "–");
    for (const [value, label] of [[this.psnr, "PSNR (mean)"], [this.ssim, "SSIM (mean)"], [this.maxDiff, "max |difference|"]]) {
      const cell = el("div", "cat-num");
      cell.append(value, el("span", null, label));
      this.line.append(cell);
    }
    this.root.append(this.line);
  }

  setResult(summary) {
    const allSame = summary?.identical?.length && summary.identical.every(Boolean);
    this.psnr.textContent = allSame ? "identical" : fixed(summary?.psnr_mean, 2, " dB");
    this.ssim.textContent = fixed(summary?.ssim_mean, 4);
    this.maxDiff.textContent = fixed(summary?.max_abs_diff, 4);
    this.root.dataset.psnr = summary?.psnr_mean != null ? String(summary.psnr_mean) : "";
  }
}

function addView(node, name, view, minHeight) {
  const widget = node.addDOMWidget(name, "cat_view", view.root, {
    serialize: false,
    hideOnZoom: false,
    getMinHeight: () => minHeight,
  });
  widget.serialize = false; // never part of widgets_values
  view.widget = widget;
  const [w, h] = node.size;
  node.setSize([Math.max(w, 360), Math.max(h, node.computeSize()[1])]);
  const onRemoved = node.onRemoved;
  node.onRemoved = function () {
    view.resizeObserver?.disconnect();
    return onRemoved?.apply(this, arguments);
  };
  return widget;
}

// The views live on their nodes (node ids are only final after a workflow is configured).
function graphNodes() {
  return app.graph?.nodes ?? app.graph?._nodes ?? [];
}

function forEachStatsView(fn) {
  for (const node of graphNodes()) if (node.catStatsView) fn(node.catStatsView);
}

// Views still waiting for this prompt's result (a finished view keeps its numbers while the rest
// of the prompt, e.g. the unpatched reference sampler, runs).
function forEachWaitingView(fn) {
  forEachStatsView((v) => {
    if (v.promptId == null || v.promptId !== runState.promptId) fn(v);
  });
}

function nodeById(id) {
  return id == null ? null : app.graph?.getNodeById?.(Number(id)) ?? app.graph?.getNodeById?.(id) ?? null;
}

app.registerExtension({
  name: "cat.pruning",

  async setup() {
    injectStyle();
    api.addEventListener("execution_start", ({ detail }) => {
      runState.promptId = detail?.prompt_id ?? null;
      runState.running = true;
      forEachStatsView((v) => v.setState("running", "Running: waiting for the sampler…"));
    });
    api.addEventListener("progress", ({ detail }) => {
      if (!runState.running || !detail) return;
      const title = nodeById(detail.node)?.title ?? `node ${detail.node}`;
      forEachWaitingView((v) => v.setState("running", `Running: ${title} ${detail.value}/${detail.max}`));
    });
    api.addEventListener("executing", ({ detail }) => {
      if (detail == null || !runState.running) return; // null: the prompt finished
      const view = nodeById(detail)?.catStatsView;
      if (view) view.setState("running", "Running: collecting CAT stats…");
    });
    const finish = (state, text) => () => {
      runState.running = false;
      forEachWaitingView((v) => {
        if (v.state === "running") v.setState(state, text);
      });
    };
    api.addEventListener("execution_success", finish("done", "Finished (this node was not run)."));
    api.addEventListener("execution_error", finish("error", "The run failed: see the error on the failing node."));
    api.addEventListener("execution_interrupted", finish("error", "The run was interrupted."));
    api.addEventListener("executed", ({ detail }) => {
      const summary = detail?.output?.cat_compare?.[0];
      if (!summary) return;
      runState.compare = { summary, promptId: detail.prompt_id ?? runState.promptId };
      nodeById(detail.display_node ?? detail.node)?.catCompareView?.setResult(summary);
      forEachStatsView((v) => v.render());
    });
  },

  async nodeCreated(node) {
    if (isClass(node, STATS_CLASS)) {
      const view = new StatsView(node);
      node.catStatsView = view;
      addView(node, STATS_WIDGET, view, 200);
      const onExecuted = node.onExecuted;
      node.onExecuted = function (message) {
        onExecuted?.apply(this, arguments);
        view.setResult(message?.cat_stats?.[0], message?.text?.[0], runState.promptId);
      };
    } else if (isClass(node, COMPARE_CLASS)) {
      const view = new CompareView(node);
      node.catCompareView = view;
      addView(node, COMPARE_WIDGET, view, 48);
      const onExecuted = node.onExecuted;
      node.onExecuted = function (message) {
        onExecuted?.apply(this, arguments);
        if (message?.cat_compare?.[0]) view.setResult(message.cat_compare[0]);
      };
    }
  },
});
