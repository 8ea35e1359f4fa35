// The HTML report's page template (internal to src/inspect/report.cc): the
// style sheet, the markup around the data blocks, and the script that draws
// everything from them. Data layout: qkv/inspect/report.h.
//
// Rules the script keeps, so that a hostile token stays text and nothing is
// fetched: tokens go into the page only through textContent and attribute
// values (never innerHTML, which the page does not use at all); SVG elements
// get their namespace from the inline <svg> of the markup, so the page holds
// no URL; the colour bar is drawn as rects, not a url(#gradient) paint.
#ifndef QKV_SRC_INSPECT_REPORT_PAGE_H_
#define QKV_SRC_INSPECT_REPORT_PAGE_H_

namespace qkv::inspect::internal {

// From <!DOCTYPE html> to the opening of <title> (the caller adds the
// escaped title text and kReportStyle).
inline constexpr const char kReportHead[] = R"HTML(<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta http-equiv="Content-Security-Policy" content="default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; img-src data:">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>)HTML";

inline constexpr const char kReportStyle[] = R"HTML(</title>
<style>
* { box-sizing: border-box; }
body { margin: 0; padding: 14px 20px 40px; font: 14px/1.4 system-ui, sans-serif; color: #1d2330;
  background: #f5f6f8; }
header h1 { font-size: 19px; margin: 0 0 2px; overflow-wrap: anywhere; }
header p, .hint { margin: 0; color: #5b6475; font-size: 13px; }
#controls { display: flex; gap: 18px; flex-wrap: wrap; align-items: center; margin: 10px 0 12px; }
#controls select { font: inherit; padding: 2px 4px; max-width: 460px; }
main { display: flex; flex-wrap: wrap; gap: 14px; align-items: flex-start; }
.column { display: flex; flex-direction: column; gap: 14px; }
.panel { background: #fff; border: 1px solid #d8dde6; border-radius: 6px; padding: 10px 12px; }
.panel h2 { font-size: 15px; margin: 0 0 4px; }
.scroll { max-height: 780px; max-width: 92vw; overflow: auto; }
svg text { font: 11px ui-monospace, "DejaVu Sans Mono", Menlo, Consolas, monospace; fill: #1d2330; }
svg text.muted { fill: #5b6475; font-family: system-ui, sans-serif; }
.heat-cell:hover { stroke: #e0301e; stroke-width: 1.5; }
.attn-line { stroke: #2458c6; stroke-width: 1.6; }
.token { cursor: default; }
.token.active text { fill: #c0262d; font-weight: bold; }
.hidden { display: none; }
table { border-collapse: collapse; }
table.grid th { font-size: 12px; color: #5b6475; font-weight: normal; padding: 1px 4px; }
.head-cell { cursor: pointer; min-width: 46px; padding: 3px 4px; text-align: center;
  font-size: 12px; border: 1px solid #fff; }
.head-cell.selected { outline: 2px solid #111; outline-offset: -2px; font-weight: bold; }
.lab-diagonal { background: #c9defc; } .lab-previous { background: #c9eec9; }
.lab-next { background: #e3f3c4; } .lab-cls { background: #ffdcb0; }
.lab-sep { background: #ffcaca; } .lab-punct { background: #ecd6fb; }
.lab-local { background: #cdeee9; } .lab-sparse { background: #fff0a8; }
.lab-broad { background: #e4e7ec; } .lab-mixed { background: #f3f4f6; }
#table-panel { margin-top: 14px; }
#table-wrap { max-height: 420px; overflow: auto; }
#patterns th { position: sticky; top: 0; background: #eef1f5; cursor: help; }
#patterns td, #patterns th { padding: 2px 9px; text-align: right;
  font-variant-numeric: tabular-nums; border-bottom: 1px solid #eef0f3; }
#patterns .label { text-align: left; }
.pattern-row { cursor: pointer; }
.pattern-row:hover { background: #f2f6ff; }
.pattern-row.selected { background: #fff1a6; }
#qkv-errors { color: #b00020; white-space: pre-wrap; margin: 0 0 8px; }
#qkv-errors:empty { display: none; }
</style>
</head>
<body>
<pre id="qkv-errors"></pre>
<script>
// Installed first: any later error, and console.error, lands in #qkv-errors
// (tests read it; a person sees it at the top of the page).
(function () {
  'use strict';
  const box = document.getElementById('qkv-errors');
  const note = (text) => { box.textContent += text + '\n'; };
  window.onerror = (message, source, line) => {
    note('error: ' + message + ' (line ' + line + ')');
  };
  const original = console.error.bind(console);
  console.error = (...args) => { note('console.error: ' + args.join(' ')); original(...args); };
})();
</script>
<header><h1 id="title"></h1><p id="summary"></p></header>
<div id="controls">
<label>Input <select id="sel-input"></select></label>
<label>Layer <select id="sel-layer"></select></label>
<label>Head <select id="sel-head"></select></label>
<span class="hint">or click a head in the grid or the table; the address keeps the selection</span>
</div>
<main>
<section class="panel"><h2 id="heat-title">Heatmap</h2>
<p class="hint">query rows &times; keys; hover a cell for its weight</p>
<div class="scroll"><svg id="heat-svg" width="10" height="10"></svg></div></section>
<div class="column">
<section class="panel"><h2>Head view</h2>
<p class="hint">line opacity = weight; hover a token to isolate its lines</p>
<div class="scroll"><svg id="view-svg" width="10" height="10"></svg></div></section>
<section class="panel"><h2>Head patterns</h2>
<p class="hint">layer &times; head (Clark et al. 2019; docs/inspect.md)</p>
<table class="grid" id="grid"></table></section>
</div>
</main>
<section class="panel" id="table-panel"><h2>Pattern metrics</h2>
<p class="hint">means over the real query rows of every input; hover a column name for its
definition</p>
<div id="table-wrap"><table id="patterns"></table></div></section>
)HTML";

// After the two data blocks: the script, then the end of the page.
inline constexpr const char kReportScript[] = R"HTML(<script>
(function () {
  'use strict';
  const $ = (id) => document.getElementById(id);
  const meta = JSON.parse($('qkv-meta').textContent);
  const blob = JSON.parse($('qkv-weights').textContent);
  const SVG_NS = $('heat-svg').namespaceURI;
  const NL = meta.num_layers, NH = meta.num_heads, NI = meta.num_inputs;
  const lengths = meta.tokens.map((t) => t.length);

  // Weights are ordered layer, input, head, query, key over real tokens:
  // input b's block in a layer starts at NH * (sum of L^2 over inputs < b).
  const inputStart = [];
  let layerSize = 0;
  for (const n of lengths) { inputStart.push(layerSize); layerSize += n * n; }
  if (NL * NH * layerSize !== blob.count ||
      blob.base64.length !== 4 * Math.ceil(2 * blob.count / 3)) {
    throw new Error('qkv-weights: ' + blob.count + ' weights in ' + blob.base64.length +
                    ' base64 characters (expected ' + NL * NH * layerSize + ')');
  }

  // Decodes one head's L x L weights: only the base64 groups that hold them
  // (4 characters per 3 bytes), so a large page opens without decoding it all.
  function Weights(layer, input, head) {
    const n = lengths[input], count = n * n;
    const start = layer * NH * layerSize + NH * inputStart[input] + head * count;
    const byte0 = 2 * start, byte1 = 2 * (start + count);
    const group0 = Math.floor(byte0 / 3), group1 = Math.ceil(byte1 / 3);
    const bytes = atob(blob.base64.substring(4 * group0, 4 * group1));
    const skip = byte0 - 3 * group0;
    const w = new Float64Array(count);
    for (let k = 0; k < count; ++k) {
      w[k] = (bytes.charCodeAt(skip + 2 * k) | (bytes.charCodeAt(skip + 2 * k + 1) << 8)) / 65535;
    }
    return w;
  }

  // WeightColour: linear between the five anchors the C++ side emitted.
  function Colour(w) {
    const x = Math.min(Math.max(w, 0), 1) * 4, i = Math.min(3, Math.floor(x)), t = x - i;
    const a = meta.colours[i], b = meta.colours[i + 1];
    return 'rgb(' + [0, 1, 2].map((k) => Math.round(a[k] + t * (b[k] - a[k]))).join(',') + ')';
  }

  function Svg(tag, attrs, parent, text) {
    const e = document.createElementNS(SVG_NS, tag);
    for (const k in attrs) e.setAttribute(k, attrs[k]);
    if (text !== undefined) e.textContent = text;
    if (parent) parent.appendChild(e);
    return e;
  }
  function Html(tag, attrs, parent, text) {
    const e = document.createElement(tag);
    for (const k in attrs) e.setAttribute(k, attrs[k]);
    if (text !== undefined) e.textContent = text;
    if (parent) parent.appendChild(e);
    return e;
  }
  function Clear(e) { while (e.firstChild) e.removeChild(e.firstChild); }
  // At most n characters (code points, so no surrogate pair is cut).
  function Clip(token, n) {
    const c = Array.from(token);
    return c.length > n ? c.slice(0, n - 1).join('') + '\u2026' : token;
  }
  const Chars = (tokens, cap) =>
      Math.min(cap, Math.max(1, ...tokens.map((t) => Array.from(t).length)));

  const SHORT = {'diagonal': 'diag', 'previous': 'prev', 'next': 'next', 'column:[CLS]': '[CLS]',
                 'column:[SEP]': '[SEP]', 'column:punct': 'punct', 'local block': 'local'};
  const KIND = {'diagonal': 'diagonal', 'previous': 'previous', 'next': 'next',
                'column:[CLS]': 'cls', 'column:[SEP]': 'sep', 'column:punct': 'punct',
                'local block': 'local', 'sparse': 'sparse', 'broad': 'broad'};
  const Pattern = (layer, head) => meta.patterns[layer * NH + head];

  const state = {input: 0, layer: 0, head: 0, hover: null};
  let lines = [], queries = [], keys = [];

  function DrawHeatmap(w, tokens) {
    const svg = $('heat-svg');
    Clear(svg);
    // About 520 px square, but cells of at least 8 px so that the labels
    // stay readable (a long input scrolls).
    const n = tokens.length, cell = Math.max(8, Math.min(28, Math.floor(520 / n)));
    const font = Math.min(11, cell - 1), clip = 14;
    const margin = Math.ceil(Chars(tokens, clip) * font * 0.62) + 10;
    const size = n * cell, barWidth = Math.max(size, 120);
    const width = margin + barWidth + 12, height = margin + size + 44;
    svg.setAttribute('width', width);
    svg.setAttribute('height', height);
    for (let i = 0; i < n; ++i) {
      const y = margin + i * cell + cell / 2, x = margin + i * cell + cell / 2;
      const row = Svg('text', {'x': margin - 4, 'y': y, 'text-anchor': 'end',
                               'dominant-baseline': 'middle', 'font-size': font},
                      svg, Clip(tokens[i], clip));
      Svg('title', {}, row, 'query ' + i + ': ' + tokens[i]);
      const col = Svg('text', {'transform': 'translate(' + x + ',' + (margin - 4) + ') rotate(-90)',
                               'dominant-baseline': 'middle', 'font-size': font},
                      svg, Clip(tokens[i], clip));
      Svg('title', {}, col, 'key ' + i + ': ' + tokens[i]);
    }
    const cells = Svg('g', {'shape-rendering': 'crispEdges'}, svg);
    for (let i = 0; i < n; ++i)
      for (let j = 0; j < n; ++j) {
        const v = w[i * n + j];
        const r = Svg('rect', {'class': 'heat-cell', 'x': margin + j * cell, 'y': margin + i * cell,
                               'width': cell, 'height': cell, 'fill': Colour(v),
                               'data-query': i, 'data-key': j}, cells);
        Svg('title', {}, r, tokens[i] + ' \u2192 ' + tokens[j] + ': ' + v.toFixed(4) +
                            ' (query ' + i + ', key ' + j + ')');
      }
    // The colour scale: 64 steps, ends labelled.
    const barTop = margin + size + 10, steps = 64;
    const bar = Svg('g', {'shape-rendering': 'crispEdges'}, svg);
    for (let k = 0; k < steps; ++k) {
      Svg('rect', {'x': margin + k * barWidth / steps, 'y': barTop, 'width': barWidth / steps + 0.5,
                   'height': 10, 'fill': Colour(k / (steps - 1))}, bar);
    }
    const Label = (x, anchor, text) =>
        Svg('text', {'x': x, 'y': barTop + 24, 'text-anchor': anchor, 'class': 'muted'}, svg, text);
    Label(margin, 'start', '0');
    Label(margin + barWidth / 2, 'middle', 'weight');
    Label(margin + barWidth, 'end', '1');
  }

  // Hides the lines not touching token `index` of `side` ('q' or 'k'); side
  // null shows them all again.
  function Isolate(side, index) {
    const n = queries.length;
    for (let k = 0; k < lines.length; ++k) {
      const i = Math.floor(k / n), j = k - i * n;
      const hide = side === 'q' ? i !== index : side === 'k' ? j !== index : false;
      lines[k].classList.toggle('hidden', hide);
    }
    queries.forEach((e, i) => e.classList.toggle('active', side === 'q' && i === index));
    keys.forEach((e, j) => e.classList.toggle('active', side === 'k' && j === index));
  }

  function DrawHeadView(w, tokens) {
    const svg = $('view-svg');
    Clear(svg);
    const n = tokens.length, row = 18, top = 26, clip = 18;
    const column = Math.max(50, Math.ceil(Chars(tokens, clip) * 7) + 8), gap = 170;
    svg.setAttribute('width', 2 * column + gap);
    svg.setAttribute('height', top + n * row + 6);
    Svg('text', {'x': column, 'y': 12, 'text-anchor': 'end', 'class': 'muted'}, svg, 'queries');
    Svg('text', {'x': column + gap, 'y': 12, 'class': 'muted'}, svg, 'keys');
    const y = (i) => top + i * row + row / 2;
    const group = Svg('g', {}, svg);
    lines = [];
    for (let i = 0; i < n; ++i)
      for (let j = 0; j < n; ++j) {
        lines.push(Svg('line', {'class': 'attn-line', 'x1': column + 6, 'y1': y(i),
                                'x2': column + gap - 6, 'y2': y(j),
                                'stroke-opacity': w[i * n + j].toFixed(4), 'data-query': i,
                                'data-key': j}, group));
      }
    const Token = (side, i) => {
      const left = side === 'q';
      const g = Svg('g', {'class': left ? 'token query' : 'token key', 'data-index': i}, svg);
      // The whole row is the hover target, not only the glyphs ("." is tiny).
      Svg('rect', {'x': left ? 0 : column + gap - 4, 'y': y(i) - row / 2, 'width': column + 4,
                   'height': row, 'fill': 'none', 'pointer-events': 'all'}, g);
      Svg('text', {'x': left ? column : column + gap, 'y': y(i),
                   'text-anchor': left ? 'end' : 'start', 'dominant-baseline': 'middle'},
          g, Clip(tokens[i], clip));
      Svg('title', {}, g, (left ? 'query ' : 'key ') + i + ': ' + tokens[i]);
      g.addEventListener('mouseenter', () => Isolate(side, i));
      g.addEventListener('mouseleave', () => Isolate(null, 0));
      return g;
    };
    queries = tokens.map((t, i) => Token('q', i));
    keys = tokens.map((t, j) => Token('k', j));
  }

  function BuildControls() {
    const input = $('sel-input'), layer = $('sel-layer'), head = $('sel-head');
    meta.tokens.forEach((t, b) => {
      const text = b + ': ' + Clip(t.join(' '), 44) + ' (' + t.length + ' tokens)';
      Html('option', {'value': b}, input, text);
    });
    for (let l = 0; l < NL; ++l) Html('option', {'value': l}, layer, String(l));
    for (let h = 0; h < NH; ++h) Html('option', {'value': h}, head, String(h));
    const Pick = (key, element) => element.addEventListener('change', () => {
      state[key] = Number(element.value);
      state.hover = null;
      Update(true);
    });
    Pick('input', input);
    Pick('layer', layer);
    Pick('head', head);
  }

  function Select(layer, head) {
    state.layer = layer;
    state.head = head;
    state.hover = null;
    Update(true);
  }

  function BuildGrid() {
    const grid = $('grid'), top = Html('tr', {}, grid);
    Html('th', {}, top, 'layer \\ head');
    for (let h = 0; h < NH; ++h) Html('th', {}, top, String(h));
    for (let l = 0; l < NL; ++l) {
      const tr = Html('tr', {}, grid);
      Html('th', {}, tr, String(l));
      for (let h = 0; h < NH; ++h) {
        const p = Pattern(l, h);
        const td = Html('td', {'class': 'head-cell lab-' + (KIND[p.label] || 'mixed'),
                               'data-layer': l, 'data-head': h,
                               'title': 'layer ' + l + ', head ' + h + ': ' + p.label},
                        tr, SHORT[p.label] || p.label);
        td.addEventListener('click', () => Select(l, h));
      }
    }
  }

  const COLUMNS = [
    ['self', 'self', 'a[i]: weight on the query token itself'],
    ['previous', 'prev', 'a[i-1]: the previous token (rows i >= 1)'],
    ['next', 'next', 'a[i+1]: the next token (rows i <= L-2)'],
    ['first', 'first', 'a[0]: the first token ([CLS])'],
    ['last', 'last', 'a[L-1]: the last token ([SEP])'],
    ['punct', 'punct', 'weight on punctuation tokens'],
    ['local', 'local', 'weight within |j - i| <= 2'],
    ['entropy', 'entropy', '-sum a ln a, in nats'],
    ['normalized_entropy', 'norm. ent.', 'entropy / ln L'],
    ['sparse', 'sparse', 'fraction of rows whose 3 largest weights hold >= 90 %'],
  ];

  function BuildTable() {
    const table = $('patterns'), top = Html('tr', {}, table);
    Html('th', {'title': 'layer'}, top, 'layer');
    Html('th', {'title': 'head'}, top, 'head');
    Html('th', {'class': 'label', 'title': 'the first rule that applies (docs/inspect.md)'},
         top, 'label');
    for (const c of COLUMNS) Html('th', {'title': c[2]}, top, c[1]);
    for (const p of meta.patterns) {
      const tr = Html('tr', {'class': 'pattern-row', 'data-layer': p.layer, 'data-head': p.head},
                      table);
      Html('td', {}, tr, String(p.layer));
      Html('td', {}, tr, String(p.head));
      Html('td', {'class': 'label'}, tr, p.label);
      for (const c of COLUMNS) Html('td', {}, tr, p[c[0]].toFixed(2));
      tr.addEventListener('click', () => Select(p.layer, p.head));
    }
  }

  function Update(writeHash) {
    const {input, layer, head} = state;
    $('sel-input').value = input;
    $('sel-layer').value = layer;
    $('sel-head').value = head;
    for (const e of document.querySelectorAll('.head-cell, .pattern-row')) {
      const chosen = Number(e.dataset.layer) === layer && Number(e.dataset.head) === head;
      e.classList.toggle('selected', chosen);
    }
    const row = document.querySelector('.pattern-row.selected'), wrap = $('table-wrap');
    if (row) wrap.scrollTop = Math.max(0, row.offsetTop - wrap.clientHeight / 2);
    $('heat-title').textContent = 'Layer ' + layer + ', head ' + head + ': ' +
                                  Pattern(layer, head).label + ' (input ' + input + ')';
    const tokens = meta.tokens[input], w = Weights(layer, input, head);
    DrawHeatmap(w, tokens);
    DrawHeadView(w, tokens);
    if (state.hover) Isolate(state.hover.side, state.hover.index);
    for (const k of ['input', 'layer', 'head']) document.body.setAttribute('data-' + k, state[k]);
    if (writeHash) {
      // A file:// page may refuse to rewrite its address in some browsers;
      // the page works the same, only the address misses the selection.
      try {
        history.replaceState(null, '', '#input=' + input + '&layer=' + layer + '&head=' + head);
      } catch (e) {
        document.body.setAttribute('data-hash', 'not written');
      }
    }
  }

  // #input=1&layer=2&head=3&hover=q4: values out of range are ignored.
  function ReadHash() {
    const want = {};
    for (const part of location.hash.replace(/^#/, '').split('&')) {
      const eq = part.indexOf('=');
      if (eq > 0) want[part.slice(0, eq)] = part.slice(eq + 1);
    }
    const Index = (text, n) =>
        (/^[0-9]+$/.test(text || '') && Number(text) < n ? Number(text) : null);
    for (const [key, n] of [['input', NI], ['layer', NL], ['head', NH]]) {
      const v = Index(want[key], n);
      if (v !== null) state[key] = v;
    }
    const hover = /^([qk])([0-9]+)$/.exec(want.hover || '');
    const index = hover ? Index(hover[2], lengths[state.input]) : null;
    state.hover = index === null ? null : {side: hover[1], index: index};
  }

  $('title').textContent = meta.title;
  $('summary').textContent = NL + ' layers \u00d7 ' + NH + ' heads, ' + NI +
                             (NI === 1 ? ' input' : ' inputs') +
                             '; weights shown rounded to 1/65535';
  BuildControls();
  BuildGrid();
  BuildTable();
  ReadHash();
  Update(false);
  window.addEventListener('hashchange', () => { ReadHash(); Update(false); });
  document.body.setAttribute('data-ready', '1');
})();
</script>
</body>
</html>
)HTML";

}  // namespace qkv::inspect::internal

#endif  // QKV_SRC_INSPECT_REPORT_PAGE_H_
