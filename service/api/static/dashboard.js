/* zsad dashboard: polls the REST API and draws the latest results per line, their heatmap overlays, the anomaly
 * rate over time, the serving model and the thresholds. Plain browser JavaScript, no build step, no libraries.
 *
 * Query parameters: ?interval=<ms> (poll period, default 5000), ?per_line=<n> (cards per line, default 6),
 * ?window=15m|1h|6h|24h (initial window).
 *
 * API key: when a call answers 401 the page asks once (window.prompt) and keeps the key in sessionStorage, so it
 * lives as long as this tab. Every data call sends it as X-API-Key; heatmap PNGs are fetched the same way and shown
 * through blob: URLs (an <img src> cannot carry a header).
 */
(function () {
  'use strict';

  var KEY_STORAGE = 'zsad.apiKey';
  var WINDOWS = { '15m': 900, '1h': 3600, '6h': 21600, '24h': 86400 };
  var BUCKETS = { '15m': 30, '1h': 60, '6h': 600, '24h': 1800 }; // chart bucket width in seconds
  var PAGE = 200;            // rows per /v1/results page
  var MAX_ROWS = 2000;       // results kept in memory (the chart's input)
  var MAX_LINE_STATS = 12;   // lines that get their own /v1/stats call per poll
  var MAX_SERIES = 6;        // lines drawn in the chart besides "all"
  var COLORS = ['#2f5fb3', '#c0362c', '#23784a', '#b7791f', '#7b4bb7', '#0f8a8a'];

  var params = new URLSearchParams(window.location.search);
  var POLL_MS = clamp(Number(params.get('interval')) || 5000, 500, 600000);
  var PER_LINE = clamp(Number(params.get('per_line')) || 6, 1, 48);

  var state = {
    window: WINDOWS[params.get('window')] ? params.get('window') : '1h',
    results: new Map(),      // id -> result record (ResultRecord of /v1/results)
    newestId: 0,
    cards: new Map(),        // id -> <figure> (kept so images are not reloaded at every poll)
    heatmaps: new Map(),     // id -> {url: blob URL | null, failed: message | null, promise}
    paused: false,
    busy: false,
    timer: null,
    keyDeclined: false,
    truncated: false,
    lastError: null
  };

  var $ = function (id) { return document.getElementById(id); };

  function clamp(v, lo, hi) { return Math.min(hi, Math.max(lo, v)); }

  function el(tag, attrs, children) {
    var node = document.createElement(tag);
    Object.keys(attrs || {}).forEach(function (k) {
      if (k === 'class') node.className = attrs[k];
      else if (k === 'text') node.textContent = attrs[k];
      else node.setAttribute(k, attrs[k]);
    });
    (children || []).forEach(function (c) { if (c != null) node.appendChild(typeof c === 'string' ? document.createTextNode(c) : c); });
    return node;
  }

  function svg(tag, attrs, text) {
    var node = document.createElementNS('http://www.w3.org/2000/svg', tag);
    Object.keys(attrs || {}).forEach(function (k) { node.setAttribute(k, attrs[k]); });
    if (text != null) node.textContent = text;
    return node;
  }

  function pct(x) { return x == null || isNaN(x) ? '–' : (100 * x).toFixed(x < 0.1 ? 2 : 1) + ' %'; }
  function num(x, d) { return x == null || isNaN(x) ? '–' : Number(x).toFixed(d == null ? 3 : d); }
  function time(ts) { return new Date(ts).toLocaleTimeString([], { hour: '2-digit', minute: '2-digit', second: '2-digit' }); }
  function hm(ts) { return new Date(ts).toLocaleTimeString([], { hour: '2-digit', minute: '2-digit' }); }
  function lineName(line) { return line == null || line === '' ? '(no line)' : line; }
  // API paths are relative to the page's folder, so the dashboard works behind a path prefix too.
  function rel(path) { return path.replace(/^\/+/, ''); }

  // --- API calls ------------------------------------------------------------------------------------------------------
  function getKey() {
    try { return window.sessionStorage.getItem(KEY_STORAGE) || ''; } catch (e) { return ''; }
  }

  function setKey(key) {
    try {
      if (key) window.sessionStorage.setItem(KEY_STORAGE, key);
      else window.sessionStorage.removeItem(KEY_STORAGE);
    } catch (e) { /* storage disabled: the key lasts until the page is left */ }
  }

  // Asks for the key: true when one was entered (and stored). Cancel or an empty answer stops the automatic asking
  // until the "API key…" button is used.
  function askKey(message) {
    var answer = window.prompt(message + '\nAPI key (kept in this browser tab only):', '');
    answer = answer == null ? '' : answer.trim();
    if (!answer) {
      state.keyDeclined = true;
      return false;
    }
    state.keyDeclined = false;
    setKey(answer);
    return true;
  }

  function ApiError(status, message) {
    this.status = status;
    this.message = message;
  }

  // One API call. On 401 it asks for the key once: calls that were already in flight with the old key see that a
  // new key was stored meanwhile and simply retry with it, so parallel calls never prompt twice.
  function api(path, as) {
    var sentKey = getKey();
    var headers = { Accept: as === 'blob' ? 'image/png' : 'application/json' };
    if (sentKey) headers['X-API-Key'] = sentKey;
    return fetch(rel(path), { headers: headers, cache: 'no-store', credentials: 'same-origin' }).then(function (res) {
      if (res.status === 401) {
        if (getKey() !== sentKey) return api(path, as);
        if (state.keyDeclined) throw new ApiError(401, 'an API key is needed: use the "API key…" button');
        if (askKey(sentKey ? 'The API key was not accepted.' : 'This service needs an API key.')) return api(path, as);
        throw new ApiError(401, 'an API key is needed: use the "API key…" button');
      }
      if (!res.ok) {
        return res.text().then(function (body) {
          var message = res.status + ' ' + res.statusText;
          try { message = res.status + ': ' + JSON.parse(body).error.message; } catch (e) { /* not our JSON */ }
          throw new ApiError(res.status, path.split('?')[0] + ' → ' + message);
        });
      }
      return as === 'blob' ? res.blob() : res.json();
    });
  }

  // --- results --------------------------------------------------------------------------------------------------------
  function windowStart() { return Date.now() / 1000 - WINDOWS[state.window]; }

  function resetResults() {
    state.results.clear();
    state.newestId = 0;
    state.truncated = false;
  }

  // New results since the last poll: pages newest first until a known id (or the window start, or MAX_ROWS).
  function loadResults() {
    var since = Math.floor(windowStart());
    var fresh = [];
    var known = state.newestId;

    function page(cursor, first) {
      var q = new URLSearchParams({ limit: String(PAGE), since: String(since) });
      if (cursor) q.set('cursor', cursor);
      return api('/v1/results?' + q.toString()).then(function (body) {
        var items = body.items || [];
        if (first && items.length && items[0].id < known) {  // the store was replaced: start over
          resetResults();
          known = 0;
        }
        for (var i = 0; i < items.length; i++) {
          if (items[i].id <= known) return fresh;
          fresh.push(items[i]);
        }
        if (!body.next_cursor) return fresh;
        if (fresh.length + state.results.size >= MAX_ROWS) { state.truncated = true; return fresh; }
        return page(body.next_cursor, false);
      });
    }

    return page(null, true).then(function (rows) {
      rows.forEach(function (r) {
        r.ts = Date.parse(r.created_at);
        state.results.set(r.id, r);
        if (r.id > state.newestId) state.newestId = r.id;
      });
      var cut = since * 1000;
      var ids = Array.from(state.results.keys()).sort(function (a, b) { return b - a; });
      ids.forEach(function (id, i) {
        if (i >= MAX_ROWS || state.results.get(id).ts < cut) state.results.delete(id);
      });
    });
  }

  function byLine() {
    var groups = new Map();
    state.results.forEach(function (r) {
      var key = lineName(r.line);
      if (!groups.has(key)) groups.set(key, { line: r.line, rows: [] });
      groups.get(key).rows.push(r);
    });
    groups.forEach(function (g) { g.rows.sort(function (a, b) { return b.id - a.id; }); });
    return Array.from(groups.keys()).sort().map(function (k) { return groups.get(k); });
  }

  // --- heatmaps -------------------------------------------------------------------------------------------------------
  function heatmap(record) {
    var entry = state.heatmaps.get(record.id);
    if (entry) return entry.promise;
    entry = { url: null, failed: null, promise: null };
    entry.promise = api(record.heatmap_url, 'blob').then(function (blob) {
      entry.url = URL.createObjectURL(blob);
      return entry;
    }, function (err) {
      entry.failed = err.status === 404 ? 'heatmap no longer stored' : 'heatmap: ' + err.message;
      return entry;
    });
    state.heatmaps.set(record.id, entry);
    return entry.promise;
  }

  function dropCard(id) {
    var entry = state.heatmaps.get(id);
    if (entry && entry.url) URL.revokeObjectURL(entry.url);
    state.heatmaps.delete(id);
    state.cards.delete(id);
  }

  function card(r) {
    var existing = state.cards.get(r.id);
    if (existing) return existing;
    var frame = el('div', { class: 'frame' });
    var fig = el('figure', {
      class: 'result ' + r.label, 'data-result-id': String(r.id), 'data-line': lineName(r.line), 'data-label': r.label
    }, [
      frame,
      el('figcaption', {}, [
        el('div', { class: 'row' }, [
          el('span', { class: 'badge ' + r.label, text: r.label }),
          r.calibrated === false ? el('span', {
            class: 'badge uncalibrated', text: 'uncalibrated',
            title: 'threshold from ' + r.threshold_source + ', not calibrated for this product: do not trust this label'
          }) : null,
          r.mode === 'few_shot' ? el('span', {
            class: 'badge fewshot', text: r.shots + '-shot',
            title: 'scored against the product\'s reference memory of ' + r.shots + ' good parts (few-shot mode)'
          }) : null,
          el('span', { title: r.score_name + ' score vs threshold (' + r.threshold_source + ')',
            text: num(r.score) + ' / ' + num(r.threshold) })
        ]),
        el('div', { class: 'row meta' }, [
          el('span', { text: '#' + r.id + ' ' + time(r.ts) }),
          el('span', { text: r.product || '' })
        ]),
        el('div', { class: 'meta', title: r.filename || '', text: (r.filename || '') +
          (r.model ? ' · ' + r.model.name + '@' + r.model.version : '') })
      ])
    ]);
    if (!r.heatmap_url) {
      frame.appendChild(el('span', { class: 'placeholder', text: 'no heatmap (heatmap=none)' }));
    } else {
      frame.appendChild(el('span', { class: 'placeholder', text: 'loading heatmap…' }));
      heatmap(r).then(function (entry) {
        if (entry.url) {
          var img = el('img', { class: 'heatmap', alt: 'heatmap overlay of result ' + r.id });
          img.addEventListener('load', function () { img.setAttribute('data-loaded', '1'); });
          img.addEventListener('error', function () { img.setAttribute('data-loaded', 'error'); });
          img.src = entry.url;
          frame.replaceChildren(img);
        } else {
          frame.replaceChildren(el('span', { class: 'placeholder', text: entry.failed }));
        }
      });
    }
    state.cards.set(r.id, fig);
    return fig;
  }

  // --- rendering ------------------------------------------------------------------------------------------------------
  function renderLines(groups, lineStats) {
    var host = $('lines');
    var shown = new Set();
    if (!groups.length) {
      host.replaceChildren(el('p', { class: 'empty', text: 'no results in this window yet' }));
    } else {
      host.replaceChildren.apply(host, groups.map(function (g) {
        var name = lineName(g.line);
        var s = lineStats.get(name);
        var rows = g.rows.slice(0, PER_LINE);
        rows.forEach(function (r) { shown.add(r.id); });
        var summary = s ? s.count + ' results · ' + s.anomalous + ' anomalous (' + pct(s.anomaly_rate) + ')' +
          (s.score ? ' · p95 score ' + num(s.score.p95) : '') : g.rows.length + ' results';
        return el('section', { class: 'line', 'data-line': name }, [
          el('h3', {}, [el('span', { text: name }), el('span', { class: 'stats', text: summary })]),
          el('div', { class: 'cards' }, rows.map(card))
        ]);
      }));
    }
    Array.from(state.cards.keys()).forEach(function (id) { if (!shown.has(id)) dropCard(id); });
  }

  function renderSummary(stats, thresholds) {
    $('s-count').textContent = stats ? String(stats.count) : '–';
    $('s-anomalous').textContent = stats ? String(stats.anomalous) : '–';
    $('s-rate').textContent = stats ? pct(stats.anomaly_rate) : '–';
    $('s-p95').textContent = stats && stats.score ? num(stats.score.p95) : '–';
    $('s-latency').textContent = stats && stats.latency_ms ? num(stats.latency_ms.p95, 1) + ' ms' : '–';
    var d = thresholds && thresholds.default;
    $('s-threshold').textContent = d ? num(d.threshold) + ' (' + d.score + ')' : '–';
    if (d) $('s-threshold').title = 'source: ' + d.source;
    renderUncalibrated(stats);
  }

  // Products scored against a default threshold in the window (from /v1/stats), each with the one thing to do.
  function renderUncalibrated(stats) {
    var panel = $('uncalibrated');
    var list = $('uncalibrated-list');
    var items = (stats && stats.uncalibrated_products) || [];
    list.textContent = '';
    panel.hidden = items.length === 0;
    items.forEach(function (it) {
      var name = it.product == null ? '(no product)' : it.product;
      var how = it.product == null
        ? 'send product= with each image, then calibrate that product'
        : 'calibrate it: POST /v1/calibrate/' + it.product + ' with 30 or more good parts (or PUT /v1/thresholds/' +
          it.product + ')';
      list.appendChild(el('li', { 'data-product': name }, [
        el('strong', { text: name }),
        ' · ' + it.count + ' result' + (it.count === 1 ? '' : 's') + ' against the default threshold: ' + how
      ]));
    });
  }

  function renderModel(models) {
    var node = $('model');
    node.setAttribute('data-state', models.status || 'unknown');
    var m = models.model;
    if (m) {
      node.textContent = 'model ' + m.name + '@' + m.version + ' · CLIP ' + m.clip + ' · ' + m.device + ' · ' + models.status;
    } else {
      node.textContent = 'no model serving (' + models.status + ')' + (models.error ? ': ' + models.error : '');
    }
    node.title = (models.available || []).map(function (a) {
      return a.name + ': ' + a.versions.join(', ') + ' (current ' + a.current + ')';
    }).join('\n');
  }

  // zero-shot / few-shot (N shots), and whether the reference memory is stale (made by another model).
  function modeCell(v) {
    var ref = v.reference;
    if (v.mode !== 'few_shot' && !ref) return el('td', { text: v.mode === 'zero_shot' ? 'zero-shot' : '' });
    var shots = ref && ref.shots != null ? ref.shots : v.shots;
    var text = 'few-shot, ' + shots + (shots === 1 ? ' shot' : ' shots') + (ref && ref.stale ? ' (stale)' : '');
    return el('td', { text: text, title: ref && ref.note ? ref.note : 'reference memory: ' + JSON.stringify(ref && ref.rows) });
  }

  function renderThresholds(t) {
    var body = $('thresholds').tBodies[0];
    var rows = [];
    var d = t.default || {};
    rows.push(el('tr', { class: 'default' }, [
      el('td', { text: '(default)' }), el('td', { text: '' }), el('td', { class: 'num', text: num(d.threshold) }),
      el('td', { text: d.score || '' }), el('td', { text: '' }), el('td', { text: d.source || '' }), el('td', { text: '' })
    ]));
    Object.keys(t.products || {}).sort().forEach(function (product) {
      var p = t.products[product];
      var entries = [[product, '', p]];
      Object.keys(p.lines || {}).sort().forEach(function (line) { entries.push([product, line, p.lines[line]]); });
      entries.forEach(function (e) {
        var v = e[2] || {};
        rows.push(el('tr', {}, [
          el('td', { text: e[0] }), el('td', { text: e[1] }),
          el('td', { class: 'num', text: v.threshold == null ? '–' : num(v.threshold) }),
          el('td', { text: v.score || '' }), modeCell(v), el('td', { text: v.source || '' }),
          el('td', { text: v.updated_at ? new Date(v.updated_at).toLocaleString() : '' })
        ]));
      });
    });
    body.replaceChildren.apply(body, rows);
  }

  // Anomaly rate per time bucket, for all results and for the busiest lines: lines for the rate (left axis, 0-100 %),
  // grey bars for the number of results per bucket (scaled to the tallest bar).
  function renderChart() {
    var chart = $('chart');
    var W = 900, H = 240, L = 44, R = 10, T = 10, B = 24;
    var pw = W - L - R, ph = H - T - B;
    var bucket = BUCKETS[state.window];
    var end = Date.now() / 1000;
    var start = end - WINDOWS[state.window];
    var n = Math.ceil((end - start) / bucket);
    var nodes = [];
    var legend = [];

    [0, 0.25, 0.5, 0.75, 1].forEach(function (f) {
      var y = T + ph * (1 - f);
      nodes.push(svg('line', { class: 'grid', x1: L, x2: W - R, y1: y, y2: y }));
      nodes.push(svg('text', { class: 'axis', x: L - 6, y: y + 4, 'text-anchor': 'end' }, Math.round(f * 100) + '%'));
    });
    for (var i = 0; i <= 4; i++) {
      var t = start + (end - start) * i / 4;
      nodes.push(svg('text', { class: 'axis', x: L + pw * i / 4, y: H - 6, 'text-anchor': i === 0 ? 'start' : i === 4 ? 'end' : 'middle' }, hm(t * 1000)));
    }

    function counts(filter) {
      var total = new Array(n).fill(0), bad = new Array(n).fill(0);
      state.results.forEach(function (r) {
        if (!filter(r)) return;
        var b = Math.floor((r.ts / 1000 - start) / bucket);
        if (b < 0 || b >= n) return;
        total[b] += 1;
        if (r.label === 'anomalous') bad[b] += 1;
      });
      return { total: total, bad: bad };
    }

    var all = counts(function () { return true; });
    var maxCount = Math.max.apply(null, all.total.concat([1]));
    var bw = pw / n;
    all.total.forEach(function (c, b) {
      if (!c) return;
      var h = ph * 0.35 * c / maxCount;
      var bar = svg('rect', { class: 'count', x: L + b * bw + 1, y: T + ph - h, width: Math.max(1, bw - 2), height: h });
      bar.appendChild(svg('title', {}, hm((start + b * bucket) * 1000) + ': ' + c + ' results, ' + all.bad[b] + ' anomalous'));
      nodes.push(bar);
    });

    var series = [{ name: 'all lines', data: all, color: '#1d2330' }];
    var lines = byLine().sort(function (a, b) { return b.rows.length - a.rows.length; }).slice(0, MAX_SERIES);
    if (lines.length > 1) {
      lines.forEach(function (g, k) {
        series.push({ name: lineName(g.line), color: COLORS[k % COLORS.length],
          data: counts(function (r) { return lineName(r.line) === lineName(g.line); }) });
      });
    }

    series.forEach(function (s) {
      var d = '';
      var pen = false;
      s.data.total.forEach(function (c, b) {
        if (!c) { pen = false; return; }
        var x = L + (b + 0.5) * bw, y = T + ph * (1 - s.data.bad[b] / c);
        d += (pen ? 'L' : 'M') + x.toFixed(1) + ' ' + y.toFixed(1) + ' ';
        pen = true;
        var dot = svg('circle', { cx: x, cy: y, r: 2.5, fill: s.color });
        dot.appendChild(svg('title', {}, s.name + ' ' + hm((start + b * bucket) * 1000) + ': ' + pct(s.data.bad[b] / c) + ' of ' + c));
        nodes.push(dot);
      });
      if (d) nodes.push(svg('path', { class: 'series', d: d, stroke: s.color, 'data-series': s.name }));
      var swatch = el('span', { class: 'swatch' });
      swatch.style.background = s.color;  // CSSOM, not a style attribute: allowed by the page's CSP
      legend.push(el('li', {}, [swatch, s.name]));
    });

    if (!state.results.size) {
      nodes.push(svg('text', { class: 'empty', x: L + pw / 2, y: T + ph / 2, 'text-anchor': 'middle' }, 'no results in this window'));
    }
    chart.replaceChildren.apply(chart, nodes);
    $('legend').replaceChildren.apply($('legend'), legend);
    $('chart-note').textContent = '(' + bucket / 60 + ' min buckets' +
      (state.truncated ? ', newest ' + MAX_ROWS + ' results only' : '') + ')';
  }

  function setStatus(text, isError) {
    var s = $('status');
    s.textContent = text;
    s.classList.toggle('error', !!isError);
  }

  // --- the poll loop --------------------------------------------------------------------------------------------------
  function poll() {
    if (state.busy) return Promise.resolve();
    state.busy = true;
    var win = state.window;
    var models, thresholds, stats;
    // /v1/models first and alone: if the service wants a key, the user is asked once before the other calls start.
    return api('/v1/models').then(function (m) {
      models = m;
      renderModel(models);
      return Promise.all([
        api('/v1/thresholds'),
        api('/v1/stats?' + new URLSearchParams({ window: win }).toString()),
        loadResults()
      ]);
    }).then(function (out) {
      thresholds = out[0];
      stats = out[1];
      var groups = byLine();
      var named = groups.filter(function (g) { return g.line != null && g.line !== ''; }).slice(0, MAX_LINE_STATS);
      return Promise.all(named.map(function (g) {
        return api('/v1/stats?' + new URLSearchParams({ window: win, line: g.line }).toString())
          .then(function (s) { return [lineName(g.line), s]; }, function () { return null; });
      })).then(function (pairs) {
        if (win !== state.window) return;  // the window changed meanwhile: the next poll redraws
        var lineStats = new Map(pairs.filter(Boolean));
        renderSummary(stats, thresholds);
        renderThresholds(thresholds);
        renderLines(groups, lineStats);
        renderChart();
        state.lastError = null;
        setStatus('updated ' + time(Date.now()) + ' · ' + state.results.size + ' results in the window · every ' +
          POLL_MS / 1000 + ' s' + (state.paused ? ' · paused' : ''));
      });
    }).catch(function (err) {
      state.lastError = err;
      setStatus((err && err.message) || String(err), true);
    }).then(function () {
      state.busy = false;
    });
  }

  function schedule() {
    clearTimeout(state.timer);
    if (state.paused) return;
    state.timer = setTimeout(function () {
      if (document.hidden) { schedule(); return; }
      poll().then(schedule);
    }, POLL_MS);
  }

  function init() {
    $('window').value = state.window;
    $('window').addEventListener('change', function (e) {
      state.window = e.target.value;
      resetResults();
      poll().then(schedule);
    });
    $('pause').addEventListener('click', function () {
      state.paused = !state.paused;
      $('pause').textContent = state.paused ? 'Resume' : 'Pause';
      if (state.paused) { clearTimeout(state.timer); setStatus('paused'); } else { poll().then(schedule); }
    });
    $('key').addEventListener('click', function () {
      var answer = window.prompt('API key for this service (kept in this browser tab only; empty: forget it):', '');
      if (answer == null) return;  // cancelled: keep what there is
      answer = answer.trim();
      setKey(answer);
      state.keyDeclined = !answer;
      poll().then(schedule);
    });
    document.addEventListener('visibilitychange', function () {
      if (!document.hidden && !state.paused) poll().then(schedule);
    });
    window.zsadDashboard = { state: state, poll: poll };  // for debugging from the console
    poll().then(schedule);
  }

  if (document.readyState === 'loading') document.addEventListener('DOMContentLoaded', init);
  else init();
})();
