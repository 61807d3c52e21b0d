// Draws the report page's plots (hpcray/util/report.py) as SVG from the JSON the page
// embeds; no library and nothing fetched.
(function () {
  "use strict";
  var data = JSON.parse(document.getElementById("hpcray-data").textContent);
  var NS = "http://www.w3.org/2000/svg";
  var WIDTH = 1100, LEFT = 150, RIGHT = 20;
  var wall = Math.max(data.wall, 1e-3);

  function el(name, attrs, parent) {
    var node = document.createElementNS(NS, name);
    for (var key in attrs) node.setAttribute(key, attrs[key]);
    if (parent) parent.appendChild(node);
    return node;
  }
  function text(parent, x, y, s, anchor) {
    var t = el("text", {x: x, y: y, "text-anchor": anchor || "start"}, parent);
    t.textContent = s;
    return t;
  }
  // Task kinds get hues away from red, which marks failed attempts.
  function hue(i) { return "hsl(" + (90 + (i * 137.508) % 220).toFixed(0) + ",55%,55%)"; }
  function xOf(t) { return LEFT + (WIDTH - LEFT - RIGHT) * t / wall; }
  function timeAxis(svg, y) {
    for (var i = 0; i <= 10; i++) {
      var t = wall * i / 10, x = xOf(t);
      el("line", {x1: x, x2: x, y1: 0, y2: y, stroke: "#eee"}, svg);
      text(svg, x, y + 12, t.toFixed(t < 10 ? 2 : 0) + " s", "middle");
    }
  }
  var NODE_COLORS = ["#1f77b4", "#ff7f0e", "#2ca02c", "#9467bd", "#8c564b", "#e377c2",
                     "#7f7f7f", "#bcbd22", "#17becf", "#d62728"];
  function nodeColor(rank) { return NODE_COLORS[rank % NODE_COLORS.length]; }

  function gantt() {
    var rows = {}, order = [];
    data.spans.forEach(function (s) {
      var key = s[0] + ":" + s[1];
      if (!(key in rows)) { rows[key] = order.length; order.push([s[0], s[1]]); }
    });
    order.sort(function (a, b) { return a[0] - b[0] || a[1] - b[1]; });
    order.forEach(function (r, i) { rows[r[0] + ":" + r[1]] = i; });
    var ROW = 16, height = Math.max(1, order.length) * ROW + 20;
    var svg = el("svg", {width: WIDTH, height: height, id: "gantt-svg",
                         "data-spans": data.spans.length});
    timeAxis(svg, height - 20);
    order.forEach(function (r, i) {
      text(svg, 4, i * ROW + 12, "node " + r[0] + " / " + r[1]);
    });
    data.spans.forEach(function (s) {
      var x = xOf(s[2]), w = Math.max(1, xOf(s[2] + s[3]) - x);
      var rect = el("rect", {x: x, y: rows[s[0] + ":" + s[1]] * ROW + 2, width: w,
                             height: ROW - 4, fill: s[6] ? "#e22" : hue(s[4]),
                             "class": s[6] ? "span failed" : "span"}, svg);
      el("title", {}, rect).textContent = data.names[s[4]] + " on node " + s[0] +
        ", worker " + s[1] + ": " + (s[3] * 1000).toFixed(2) + " ms" +
        (s[6] ? " (failed)" : "");
    });
    document.getElementById("gantt").appendChild(svg);
  }

  // A line per node of value(sample) over time, 0..max.
  function lines(target, id, max, value, label) {
    var TOP = 8, HEIGHT = 160, svg = el("svg", {width: WIDTH, height: TOP + HEIGHT + 20,
                                                id: id});
    var g = el("g", {transform: "translate(0," + TOP + ")"}, svg);
    timeAxis(g, HEIGHT);
    for (var i = 0; i <= 4; i++) {
      var y = HEIGHT - HEIGHT * i / 4;
      el("line", {x1: LEFT, x2: WIDTH - RIGHT, y1: y, y2: y, stroke: "#eee"}, g);
      text(g, LEFT - 4, y + 3, label(max * i / 4), "end");
    }
    var drawn = 0, legend = document.createElement("div");
    legend.className = "legend";
    data.nodes.forEach(function (node) {
      var samples = data.samples[node.rank] || [], points = [];
      samples.forEach(function (s) {
        var v = value(s, node);
        if (v !== null && v !== undefined)
          points.push(xOf(s[0]).toFixed(1) + "," +
                      (HEIGHT - HEIGHT * Math.min(v, max) / max).toFixed(1));
      });
      if (points.length === 0) return;
      drawn++;
      el("polyline", {points: points.join(" "), fill: "none", "class": "series",
                      stroke: nodeColor(node.rank), "stroke-width": 1.5}, g);
      var item = document.createElement("span");
      item.style.color = nodeColor(node.rank);
      item.textContent = "\u25a0 node " + node.rank + " (" + node.host + ")";
      legend.appendChild(item);
    });
    svg.setAttribute("data-series", drawn);
    var box = document.getElementById(target);
    if (drawn === 0) {
      box.textContent = "No readings (the job ended before the first one).";
      return;
    }
    box.appendChild(svg);
    box.appendChild(legend);
  }
  function percent(v) { return (v * 100).toFixed(0) + "%"; }
  function bytes(v) {
    var units = ["B", "KiB", "MiB", "GiB", "TiB"], i = 0;
    while (v >= 1024 && i < units.length - 1) { v /= 1024; i++; }
    return v.toFixed(i ? 1 : 0) + " " + units[i];
  }

  gantt();
  lines("cpu", "cpu-svg", 1, function (s) { return s[1]; }, percent);
  var hasGpu = data.nodes.some(function (n) {
    return (data.samples[n.rank] || []).some(function (s) { return s[3].length > 0; });
  });
  if (hasGpu) {
    var section = document.getElementById("gpu-section");
    section.innerHTML = "<h2>GPU use per node (mean of its GPUs)</h2><div id='gpu'></div>";
    lines("gpu", "gpu-svg", 1, function (s) {
      var seen = s[3].filter(function (v) { return v !== null; });
      return seen.length ? seen.reduce(function (a, b) { return a + b; }, 0) / seen.length
                         : null;
    }, percent);
  }
  // Scaled to the most any node used (its capacity is said below), so that a few MiB
  // in a store of many GiB still shows; at least 1 KiB, so that the scale of a store
  // nothing used reads 0 B .. 1.1 KiB, not 0 B, 0 B, 1 B, 1 B, 1 B.
  var used = 1024;
  data.nodes.forEach(function (n) {
    (data.samples[n.rank] || []).forEach(function (s) { used = Math.max(used, s[2]); });
  });
  lines("store", "store-svg", used * 1.1, function (s) { return s[2]; }, bytes);
  var capacities = document.createElement("p");
  capacities.textContent = "Capacity: " + data.nodes.map(function (n) {
    return "node " + n.rank + " " + bytes(n.capacity || 0);
  }).join(", ");
  document.getElementById("store").appendChild(capacities);
  document.body.setAttribute("data-rendered", "1");
})();
