// The MRKD line page: one card per camera, updated from the client's server-sent events (/api/events).
// Plain JavaScript, no build step, no network access beyond the client that serves it.
"use strict";

const STATE_LABELS = {
  starting: "starting",
  running: "running",
  waiting_for_server: "waiting for a server",
  reconnecting: "reconnecting",
  stopped: "stopped",
};
const cards = new Map();  // camera name -> {root, parts, imageUrl, anomaliesKey}
let connected = false;

function fmt(value, digits) {
  return value === null || value === undefined ? "-" : Number(value).toFixed(digits);
}

function clock(epochSeconds) {
  return new Date(epochSeconds * 1000).toLocaleTimeString([], {hour12: false});
}

function setBadge(element, cls, text) {  // keeps the element's own classes (e.g. "state")
  if (element.dataset.badge) element.classList.remove(element.dataset.badge);
  element.classList.add("badge", cls);
  element.dataset.badge = cls;
  element.textContent = text;
}

function card(camera) {
  let entry = cards.get(camera.name);
  if (entry) return entry;
  const root = document.getElementById("camera-card").content.firstElementChild.cloneNode(true);
  root.dataset.camera = camera.name;
  const parts = {};
  for (const name of ["name", "product", "state", "source", "fps", "p50", "p99", "answered", "anomalous", "dropped", "errors",
                      "latest-image", "latest-caption", "score-chart", "chart-span", "problem", "anomalies"]) {
    parts[name] = root.querySelector("." + name);
  }
  parts.name.textContent = camera.name;
  parts.product.textContent = camera.product || "";
  parts.product.hidden = !camera.product;
  root.dataset.product = camera.product || "";
  parts.source.textContent = camera.source + (camera.live ? " (live)" : "");
  parts.source.title = camera.source;
  document.getElementById("cameras").appendChild(root);
  entry = {root, parts, imageUrl: null, anomaliesKey: null};
  cards.set(camera.name, entry);
  return entry;
}

function updateCamera(camera, snapshot) {
  const {parts} = card(camera);
  const entry = cards.get(camera.name);
  setBadge(parts.state, camera.state, STATE_LABELS[camera.state] || camera.state);
  parts.fps.textContent = fmt(camera.fps, 1);
  parts.p50.textContent = fmt(camera.p50_ms, 0);
  parts.p99.textContent = fmt(camera.p99_ms, 0);
  parts.answered.textContent = camera.answered;
  parts.anomalous.textContent = camera.anomalous;
  parts.dropped.textContent = camera.dropped;
  parts.errors.textContent = camera.errors;
  parts.errors.classList.toggle("alert", camera.errors > 0);

  const latest = camera.latest;
  if (latest) {
    if (entry.imageUrl !== latest.image) {  // only a new frame is fetched
      entry.imageUrl = latest.image;
      parts["latest-image"].src = latest.image;
    }
    parts["latest-caption"].textContent =
      `frame ${latest.frame} · score ${fmt(latest.score, 3)} · ${latest.verdict} · ${clock(latest.time)}` +
      (latest.server ? ` · ${latest.server}` : "");
    parts["latest-caption"].classList.toggle("anomalous", latest.verdict === "anomalous");
  }

  const problem = camera.errors > 0 && camera.last_error ? "last error: " + camera.last_error : "";
  parts.problem.hidden = !problem;
  parts.problem.textContent = problem;

  const key = camera.anomalies.map(a => a.frame).join(",");
  if (key !== entry.anomaliesKey) {  // rebuilt only when the list changed
    entry.anomaliesKey = key;
    const items = camera.anomalies.map(a => {
      const li = document.createElement("li");
      const img = document.createElement("img");
      img.src = a.image;
      img.alt = `anomalous frame ${a.frame}`;
      img.title = a.source || "";
      const score = document.createElement("div");
      score.className = "score";
      score.textContent = "score " + fmt(a.score, 3);
      const when = document.createElement("div");
      when.textContent = `#${a.frame} ${clock(a.time)}`;
      li.append(img, score, when);
      return li;
    });
    if (!items.length) {
      const li = document.createElement("li");
      li.className = "empty";
      li.textContent = "none yet";
      items.push(li);
    }
    parts.anomalies.replaceChildren(...items);
  }
  parts["chart-span"].textContent = `${Math.round(snapshot.chart_seconds / 60)} min`;
  drawChart(parts["score-chart"], camera.chart, snapshot);
}

function drawChart(canvas, points, snapshot) {
  const ratio = window.devicePixelRatio || 1;
  const width = Math.max(100, Math.round(canvas.clientWidth * ratio));
  const height = Math.max(60, Math.round(canvas.clientHeight * ratio));
  if (canvas.width !== width || canvas.height !== height) {
    canvas.width = width;
    canvas.height = height;
  }
  const ctx = canvas.getContext("2d");
  const pad = {left: 30 * ratio, right: 8 * ratio, top: 10 * ratio, bottom: 16 * ratio};
  const w = width - pad.left - pad.right, h = height - pad.top - pad.bottom;
  const span = snapshot.chart_seconds, now = snapshot.time;
  const x = t => pad.left + w * (1 - (now - t) / span);
  const y = s => pad.top + h * (1 - Math.min(1, Math.max(0, s)));
  ctx.clearRect(0, 0, width, height);
  ctx.font = `${10 * ratio}px system-ui, sans-serif`;
  ctx.fillStyle = "#5f6368";
  ctx.strokeStyle = "#e3e5e8";
  ctx.lineWidth = ratio;
  for (const s of [0, 0.25, 0.5, 0.75, 1]) {
    ctx.beginPath(); ctx.moveTo(pad.left, y(s)); ctx.lineTo(pad.left + w, y(s)); ctx.stroke();
    ctx.fillText(s.toFixed(2), 2 * ratio, y(s) + 3 * ratio);
  }
  ctx.fillText(`-${Math.round(span / 60)} min`, pad.left, height - 3 * ratio);
  ctx.fillText("now", pad.left + w - 20 * ratio, height - 3 * ratio);
  ctx.save();  // the threshold
  ctx.setLineDash([6 * ratio, 4 * ratio]);
  ctx.strokeStyle = "#b3261e";
  ctx.lineWidth = 1.5 * ratio;
  ctx.beginPath(); ctx.moveTo(pad.left, y(snapshot.threshold)); ctx.lineTo(pad.left + w, y(snapshot.threshold));
  ctx.stroke();
  ctx.restore();
  ctx.strokeStyle = "#1a73e8";
  ctx.lineWidth = 1.5 * ratio;
  ctx.beginPath();
  let previous = null;
  for (const [t, s] of points) {  // a gap of more than 15 s (no answers) breaks the line
    if (now - t > span) continue;
    if (previous === null || t - previous > 15) ctx.moveTo(x(t), y(s)); else ctx.lineTo(x(t), y(s));
    previous = t;
  }
  ctx.stroke();
  for (const [t, s] of points) {  // every second with answers: a dot, red above the threshold
    if (now - t > span) continue;
    ctx.fillStyle = s > snapshot.threshold ? "#b3261e" : "#1a73e8";
    ctx.fillRect(x(t) - 1.5 * ratio, y(s) - 1.5 * ratio, 3 * ratio, 3 * ratio);
  }
}

function updateServers(servers) {
  const list = document.getElementById("servers");
  list.replaceChildren(...servers.map(server => {
    const li = document.createElement("li");
    li.className = "server";
    li.dataset.url = server.url;
    li.dataset.product = server.product || "";
    const url = document.createElement("span");
    url.textContent = server.product ? `${server.url} · ${server.product}` : server.url;
    const badge = document.createElement("span");
    setBadge(badge, server.up ? "up" : "down", server.up ? "up" : "down");
    li.append(url, badge);
    if (server.requests !== undefined) {
      const requests = document.createElement("span");
      requests.textContent = `${server.requests} requests`;
      li.append(requests);
    }
    if (!server.up && server.detail) {
      const detail = document.createElement("span");
      detail.className = "detail";
      detail.textContent = server.detail;
      detail.title = server.detail;
      li.append(detail);
    }
    return li;
  }));
}

function updateMqtt(mqtt) {
  // verdicts to the line over MQTT (client/mqtt.py): what the broker acknowledged, and what was dropped
  const line = document.getElementById("mqtt");
  line.hidden = !mqtt;
  if (!mqtt) return;
  const badge = document.createElement("span");
  setBadge(badge, mqtt.dropped ? "down" : "up", mqtt.dropped ? `${mqtt.dropped} dropped` : "no loss");
  const text = document.createElement("span");
  text.textContent = `MQTT ${mqtt.broker}: ${mqtt.published} verdicts acknowledged, ${mqtt.pending} queued`;
  line.replaceChildren(text, badge);
}

function showBanner(text) {
  const banner = document.getElementById("banner");
  banner.hidden = !text;
  banner.textContent = text || "";
}

function updateSpool(spool) {  // frames waiting on disk for a server, inspected late (null: no spool)
  const element = document.getElementById("spool");
  element.hidden = !spool;
  if (!spool) return;
  element.textContent = `spool: ${spool.frames} frames` + (spool.evicted ? ` (${spool.evicted} evicted)` : "");
  element.classList.toggle("alert", spool.frames > 0 || spool.evicted > 0);
}

function update(snapshot) {
  updateServers(snapshot.servers);
  updateSpool(snapshot.spool);
  updateMqtt(snapshot.mqtt);
  for (const camera of snapshot.cameras) updateCamera(camera, snapshot);
  const anyUp = snapshot.servers.length === 0 || snapshot.servers.some(s => s.up);
  setBadge(document.getElementById("run"), snapshot.finished ? "finished" : "running",
           snapshot.finished ? "run finished" : "running");
  if (!anyUp && !snapshot.finished) showBanner("No server is ready: the cameras are waiting for a server.");
  else if (!anyUp) showBanner("No server is ready.");
  else showBanner("");
  document.body.dataset.updated = String(snapshot.time);
}

function connect() {
  const events = new EventSource("/api/events");
  events.onopen = () => { connected = true; };
  events.onmessage = message => { connected = true; update(JSON.parse(message.data)); };
  events.onerror = () => {
    if (connected) {
      connected = false;
      setBadge(document.getElementById("run"), "lost", "connection lost");
      showBanner("The connection to the client is lost (the run may have ended); retrying.");
    }
  };
}

connect();
