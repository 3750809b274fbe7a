// The monitoring dashboard (owners): figures and charts from the live feed, alerts as they fire
// and resolve, live sessions and their statistics, health checks, reports.
import { api, claimsOf, download, fill, format, h, header, obtainToken, readEvents, when } from "/static/pages.js";

const FIGURES = [
  ["activeUsers", "Active users", ""],
  ["websocketConnections", "WebSocket connections", ""],
  ["activeProjects", "Active projects", ""],
  ["webrtcStreams", "WebRTC streams", ""],
  ["averageLatency", "Average latency", "ms"],
  ["cpuUsage", "CPU", "%"],
  ["memoryUsage", "Memory", "%"],
  ["networkBandwidth", "Bandwidth", "bytes/s"],
  ["errorRate", "Error rate", "%"],
  ["conflictRate", "Conflict rate", "%"],
  ["resolutionRate", "Resolution rate", "%"],
  ["messagesIn", "Messages in", "/s"],
];
const CHARTS = [
  ["activeUsers", "Active users", ""],
  ["averageLatency", "Average latency", "ms"],
  ["cpuUsage", "CPU", "%"],
  ["memoryUsage", "Memory", "%"],
  ["networkBandwidth", "Bandwidth", "bytes/s"],
  ["conflictRate", "Conflict rate", "%"],
  ["errorRate", "Error rate", "%"],
];
const KEPT = 120;

const state = { server: [], project: [], alerts: new Map(), scope: "server" };
let token;
let project;

function problem(message) {
  const el = document.getElementById("problem");
  el.hidden = !message;
  el.textContent = message ?? "";
}

function series() {
  return state.scope === "server" ? state.server : state.project;
}

function renderFigures() {
  const latest = series().at(-1) ?? {};
  fill(
    document.getElementById("figures"),
    FIGURES.filter(([key]) => key in latest || state.scope === "server").map(([key, label, unit]) =>
      h("div", { class: "card", dataset: { metric: key } }, h("h3", {}, label), h("div", { class: "figure" }, format(latest[key], unit), unit === "/s" ? h("small", {}, " /s") : null)),
    ),
  );
  document.getElementById("updated").textContent = latest.at ? `sample of ${new Date(latest.at).toLocaleTimeString()}` : "no sample yet";
}

function chart(key, label, unit, samples) {
  const points = samples.filter((s) => typeof s[key] === "number").map((s) => [s.at, s[key]]);
  const width = 320;
  const height = 110;
  const svg = document.createElementNS("http://www.w3.org/2000/svg", "svg");
  svg.setAttribute("viewBox", `0 0 ${width} ${height}`);
  svg.setAttribute("role", "img");
  const latest = points.at(-1)?.[1];
  svg.setAttribute("aria-label", `${label}: ${points.length} samples, latest ${format(latest, unit)}`);
  const add = (name, attrs) => {
    const el = document.createElementNS("http://www.w3.org/2000/svg", name);
    for (const [k, v] of Object.entries(attrs)) el.setAttribute(k, v);
    svg.append(el);
    return el;
  };
  for (const y of [10, height / 2, height - 14]) add("line", { x1: 0, x2: width, y1: y, y2: y, class: "grid" });
  if (points.length > 1) {
    const [t0, t1] = [points[0][0], points.at(-1)[0]];
    const top = Math.max(...points.map((p) => p[1]), unit === "%" ? 10 : 1) * 1.15;
    const x = (t) => ((t - t0) / Math.max(1, t1 - t0)) * (width - 4) + 2;
    const y = (v) => height - 14 - (v / top) * (height - 24);
    const line = points.map(([t, v], i) => `${i ? "L" : "M"}${x(t).toFixed(1)},${y(v).toFixed(1)}`).join(" ");
    add("path", { d: `${line} L${x(t1).toFixed(1)},${height - 14} L${x(t0).toFixed(1)},${height - 14} Z`, class: "area" });
    add("path", { d: line, class: "line" });
    const axis = add("text", { x: 2, y: 9, class: "axis" });
    axis.textContent = format(top, unit);
  }
  return h("figure", { class: "card chart", dataset: { metric: key } }, h("header", {}, h("h3", {}, label), h("span", { class: "figure-small" }, format(latest, unit))), svg);
}

function renderCharts() {
  const samples = series();
  fill(document.getElementById("charts"), CHARTS.map(([key, label, unit]) => chart(key, label, unit, samples)));
}

function renderAlerts() {
  const list = [...state.alerts.values()].sort((a, b) => (b.updatedAt ?? 0) - (a.updatedAt ?? 0));
  fill(
    document.getElementById("alerts"),
    list.length === 0
      ? h("li", { class: "empty" }, "No alert has fired since this page opened.")
      : list.slice(0, 30).map((alert) =>
          h("li", { class: alert.state, dataset: { alert: alert.id, rule: alert.rule } },
            h("div", { class: "row" }, h("span", { class: `badge ${alert.state === "resolved" ? "resolved" : alert.level}` }, alert.state === "resolved" ? "resolved" : alert.level), h("strong", {}, alert.message)),
            h("div", { class: "meta" }, `${alert.rule}${alert.projectId ? " · project " + alert.projectId : " · server"} · since ${when(alert.startedAt)}${alert.resolvedAt ? " · resolved " + when(alert.resolvedAt) : ""}`),
          ),
        ),
  );
}

function addSample(sample) {
  const target = sample.projectId ? state.project : state.server;
  target.push(sample);
  if (target.length > KEPT) target.splice(0, target.length - KEPT);
  renderFigures();
  renderCharts();
}

function renderHealth(health) {
  fill(
    document.getElementById("health"),
    Object.entries(health ?? {}).map(([name, check]) => h("span", { class: `badge ${check.ok ? "good" : "bad"}`, title: check.detail ?? "" }, `${name}: ${check.ok ? "ok" : check.detail}`)),
  );
}

async function refreshLive() {
  try {
    const { sessions } = await api(`/api/collaboration/live?projectId=${encodeURIComponent(project)}`, { token });
    const el = document.getElementById("live");
    if (sessions.length === 0) return fill(el, h("p", { class: "empty" }, `No live session in project ${project}.`));
    fill(
      el,
      h("table", {},
        h("thead", {}, h("tr", {}, ["Session", "Member", "Role", "Quality", "Bitrate", "RTT", "Loss", "FPS", "Size"].map((c) => h("th", { scope: "col" }, c)))),
        h("tbody", {},
          sessions.flatMap((session) =>
            session.members.map((member) => {
              const stats = member.stats ?? {};
              const link = member.link ?? {};
              return h("tr", {},
                h("td", {}, `${session.kind} · ${session.mode}`),
                h("td", {}, member.user_id),
                h("td", {}, member.role),
                h("td", {}, member.quality ?? "–"),
                h("td", {}, stats.bitrate_kbps != null ? `${Math.round(stats.bitrate_kbps)} kbps` : "–"),
                h("td", {}, format(stats.rtt_ms ?? link.rtt_ms, "ms")),
                h("td", {}, stats.packet_loss != null ? `${(stats.packet_loss * 100).toFixed(1)} %` : "–"),
                h("td", {}, stats.fps != null ? stats.fps.toFixed(0) : "–"),
                h("td", {}, stats.width ? `${stats.width}×${stats.height}` : "–"),
              );
            }),
          ),
        ),
      ),
    );
  } catch (error) {
    fill(document.getElementById("live"), h("p", { class: "form-error" }, error.message));
  }
}

async function report(kind) {
  const end = Date.now();
  const body = { startDate: end - 3600_000, endDate: end, format: kind };
  if (state.scope === "project") body.projectId = project;
  try {
    if (kind === "json") {
      const data = await api("/api/collaboration/performance/report", { token, method: "POST", body });
      download(new Blob([JSON.stringify(data, null, 2)], { type: "application/json" }), `crealia-report-${state.scope}.json`);
    } else {
      const response = await api("/api/collaboration/performance/report", { token, method: "POST", body, accept: "text/csv" });
      download(await response.blob(), `crealia-report-${state.scope}.csv`);
    }
  } catch (error) {
    problem(`The report failed: ${error.message}`);
  }
}

async function main() {
  document.getElementById("top").replaceWith(header("Monitoring", null));
  token = await obtainToken({ role: "owner", minRole: "owner" });
  const claims = claimsOf(token);
  project = claims.project;
  document.querySelector("header.top").replaceWith(header("Monitoring", claims));
  document.querySelector("#scope option[value=project]").textContent = `project ${project}`;
  let initial;
  try {
    initial = await api(`/api/collaboration/performance/metrics?projectId=${encodeURIComponent(project)}`, { token });
  } catch (error) {
    problem(error.status === 403 || error.status === 401 ? `This page is for owners: ${error.message}` : error.message);
    return;
  }
  state.server = [...initial.global.series];
  state.project = [...initial.series];
  for (const alert of initial.alerts) state.alerts.set(alert.id, alert);
  renderFigures();
  renderCharts();
  renderAlerts();
  renderHealth(initial.health);
  document.getElementById("scope").addEventListener("change", (event) => {
    state.scope = event.target.value;
    renderFigures();
    renderCharts();
  });
  document.getElementById("report-csv").addEventListener("click", () => report("csv"));
  document.getElementById("report-json").addEventListener("click", () => report("json"));
  const badge = document.getElementById("feed");
  readEvents(`/api/collaboration/performance/stream?projectId=${encodeURIComponent(project)}`, {
    token,
    onStatus: (status, error) => {
      badge.className = `badge ${status === "open" ? "connected" : "error"}`;
      badge.textContent = status === "open" ? "live" : `feed lost${error ? ": " + error.message : ""}; retrying`;
    },
    onEvent: (type, data) => {
      if (type === "metrics") addSample(data);
      else if (type === "alert") {
        state.alerts.set(data.id, data);
        renderAlerts();
      }
    },
  });
  refreshLive();
  setInterval(refreshLive, 3000);
  setInterval(async () => {
    try {
      renderHealth((await api(`/api/collaboration/performance/metrics?projectId=${encodeURIComponent(project)}`, { token })).health);
    } catch {
      // the feed's badge says the server is gone
    }
  }, 30000);
}

main();
