// Usage charts: cost and tokens per day, one series per model (uPlot, vendored).
(function () {
  "use strict";
  var source = document.getElementById("usage-data");
  if (!source || typeof uPlot === "undefined") { return; }
  var data = JSON.parse(source.textContent);
  var palette = ["#3b5bdb", "#e8590c", "#2b8a3e", "#ae3ec9", "#1098ad", "#f08c00", "#c92a2a"];
  var xs = data.days.map(function (day) { return Date.parse(day + "T00:00:00Z") / 1000; });

  function draw(elementId, values, label, format) {
    var element = document.getElementById(elementId);
    var series = [{}];
    var columns = [xs];
    data.models.forEach(function (model, i) {
      series.push({ label: model, stroke: palette[i % palette.length], width: 2,
                    fill: palette[i % palette.length] + "22", points: { show: true, size: 5 },
                    value: function (u, v) { return v == null ? "" : format(v); } });
      columns.push(values[model]);
    });
    if (data.models.length === 0) {
      series.push({ label: "no usage", stroke: "#ced4da" });
      columns.push(xs.map(function () { return 0; }));
    }
    var width = Math.max(320, element.clientWidth || 480);
    element.setAttribute("data-series", String(data.models.length));
    new uPlot({
      width: width, height: 240, series: series,
      scales: { x: { time: true } },
      axes: [{}, { label: label, size: 70, values: function (u, ticks) { return ticks.map(format); } }],
    }, columns, element);
  }
  draw("chart-cost", data.cost, "USD", function (v) { return "$" + Number(v).toPrecision(3); });
  draw("chart-tokens", data.tokens, "tokens", function (v) { return String(Math.round(v)); });
})();
