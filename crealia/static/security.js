// The security dashboard (owners): security alerts, the audit log, GDPR export and erasure.
import { api, claimsOf, download, fill, h, header, obtainToken, when } from "/static/pages.js";

const PAGE = 25;
const ACTIONS = ["join", "leave", "edit", "comment", "conflict_resolution", "strategy_change", "permission_refused", "rate_limited", "token_refused", "origin_refused", "dev_origin_refused", "dev_token", "abuse_closed", "export", "erasure", "alert_resolution", "live_start", "live_join", "live_leave", "live_stop"];

let token;
let project;
const audit = { events: [], page: 0, filter: {} };

function problem(message) {
  const el = document.getElementById("problem");
  el.hidden = !message;
  el.textContent = message ?? "";
}

async function loadAlerts() {
  const status = document.getElementById("alert-status").value;
  const query = new URLSearchParams({ projectId: project });
  if (status) query.set("status", status);
  const { alerts } = await api(`/api/collaboration/security/alerts?${query}`, { token });
  const el = document.getElementById("security-alerts");
  if (alerts.length === 0) return fill(el, h("p", { class: "empty" }, status ? `No ${status} security alert.` : "No security alert."));
  fill(
    el,
    h("table", {},
      h("thead", {}, h("tr", {}, ["Severity", "Type", "What", "Subject", "Count", "Raised", ""].map((c) => h("th", { scope: "col" }, c)))),
      h("tbody", {},
        alerts.map((alert) =>
          h("tr", { dataset: { alert: alert.id } },
            h("td", {}, h("span", { class: `badge ${alert.severity}` }, alert.severity)),
            h("td", {}, alert.type),
            h("td", {}, alert.message),
            h("td", { class: "mono" }, alert.subject),
            h("td", {}, alert.count),
            h("td", {}, when(alert.timestamp)),
            h("td", {}, alert.resolved ? `resolved ${when(alert.resolvedAt)} by ${alert.resolvedBy ?? "?"}` : h("button", { type: "button", onclick: () => resolveAlert(alert) }, "Resolve")),
          ),
        ),
      ),
    ),
  );
}

async function resolveAlert(alert) {
  try {
    await api(`/api/collaboration/security/alerts/${encodeURIComponent(alert.id)}/resolve`, { token, method: "POST", body: { projectId: project, note: "resolved from the security page" } });
    await loadAlerts();
  } catch (error) {
    problem(`Could not resolve the alert: ${error.message}`);
  }
}

function auditQuery(extra = {}) {
  const query = new URLSearchParams({ projectId: project, limit: "1000" });
  for (const [key, value] of Object.entries({ ...audit.filter, ...extra })) {
    if (value && key !== "severity") query.set(key, value);
  }
  return query;
}

async function loadAudit() {
  const { events } = await api(`/api/collaboration/audit?${auditQuery()}`, { token });
  const severity = audit.filter.severity;
  audit.events = severity ? events.filter((e) => e.severity === severity) : events;
  audit.page = 0;
  renderAudit();
}

function renderAudit() {
  const { events, page } = audit;
  const pages = Math.max(1, Math.ceil(events.length / PAGE));
  const shown = events.slice(page * PAGE, (page + 1) * PAGE);
  const el = document.getElementById("audit");
  fill(
    el,
    shown.length === 0
      ? h("p", { class: "empty" }, "No audit event matches.")
      : h("table", {},
          h("thead", {}, h("tr", {}, ["When", "User", "Action", "Resource", "Severity", "Risk", "Address", "Details"].map((c) => h("th", { scope: "col" }, c)))),
          h("tbody", {},
            shown.map((event) =>
              h("tr", { dataset: { action: event.action } },
                h("td", {}, when(event.timestamp)),
                h("td", {}, event.userId ?? "–"),
                h("td", {}, event.action),
                h("td", { class: "mono" }, event.resource),
                h("td", {}, h("span", { class: `badge ${event.severity}` }, event.severity)),
                h("td", {}, event.riskScore),
                h("td", { class: "mono" }, event.ipAddress || "–"),
                h("td", { class: "mono" }, Object.keys(event.details ?? {}).length ? JSON.stringify(event.details).slice(0, 160) : ""),
              ),
            ),
          ),
        ),
  );
  document.getElementById("page-label").textContent = `page ${page + 1} of ${pages} · ${events.length} events`;
  document.getElementById("prev").disabled = page === 0;
  document.getElementById("next").disabled = page + 1 >= pages;
}

async function exportAudit() {
  const body = { projectId: project, format: "csv" };
  for (const key of ["userId", "action", "startDate", "endDate"]) if (audit.filter[key]) body[key] = audit.filter[key];
  try {
    const response = await api("/api/collaboration/audit/export", { token, method: "POST", body, accept: "text/csv" });
    download(await response.blob(), `crealia-audit-${project}.csv`);
  } catch (error) {
    problem(`The export failed: ${error.message}`);
  }
}

function gdprUser() {
  const input = document.getElementById("gdpr-user");
  if (!input.reportValidity()) return null;
  return input.value.trim();
}

async function gdprExport(format) {
  const userId = gdprUser();
  if (!userId) return;
  try {
    const body = { userId, projectId: project, format };
    if (format === "json") {
      const data = await api("/api/collaboration/gdpr/export", { token, method: "POST", body });
      download(new Blob([JSON.stringify(data, null, 2)], { type: "application/json" }), `crealia-gdpr-${userId}.json`);
      fill(document.getElementById("gdpr-result"), `Exported ${data.comments.length} comments, ${data.edits.length} edits, ${data.conflicts.length} conflicts and ${data.audit.length} audit events of ${userId}.`);
    } else {
      const response = await api("/api/collaboration/gdpr/export", { token, method: "POST", body, accept: "text/csv" });
      download(await response.blob(), `crealia-gdpr-${userId}.csv`);
      fill(document.getElementById("gdpr-result"), `Exported ${userId}'s data as CSV.`);
    }
  } catch (error) {
    problem(`The export failed: ${error.message}`);
  }
}

function askErase() {
  const userId = gdprUser();
  if (!userId) return;
  const box = document.getElementById("erase-confirm");
  box.hidden = false;
  box.dataset.user = userId;
  document.getElementById("erase-project").textContent = project;
  const typed = document.getElementById("erase-typed");
  typed.value = "";
  document.getElementById("erase-go").disabled = true;
  typed.focus();
}

async function erase(event) {
  event.preventDefault();
  const box = document.getElementById("erase-confirm");
  const userId = box.dataset.user;
  if (document.getElementById("erase-typed").value.trim() !== userId) return;
  try {
    const result = await api("/api/collaboration/gdpr/erase", { token, method: "POST", body: { userId, projectId: project } });
    const counts = Object.entries(result.erased).map(([table, n]) => `${n} ${table}`).join(", ");
    fill(document.getElementById("gdpr-result"), `Erased ${userId} (now ${result.pseudonym}): ${counts || "nothing stored"}.`);
    box.hidden = true;
    await loadAudit();
  } catch (error) {
    problem(`The erasure failed: ${error.message}`);
  }
}

async function main() {
  document.getElementById("top").replaceWith(header("Security", null));
  token = await obtainToken({ role: "owner", minRole: "owner" });
  const claims = claimsOf(token);
  project = claims.project;
  document.querySelector("header.top").replaceWith(header("Security", claims));
  const select = document.getElementById("f-action");
  for (const action of ACTIONS) select.append(h("option", { value: action }, action));
  try {
    await Promise.all([loadAlerts(), loadAudit()]);
  } catch (error) {
    problem(error.status === 403 || error.status === 401 ? `This page is for owners: ${error.message}` : error.message);
    return;
  }
  document.getElementById("alert-status").addEventListener("change", () => loadAlerts().catch((e) => problem(e.message)));
  document.getElementById("audit-filter").addEventListener("submit", (event) => {
    event.preventDefault();
    audit.filter = Object.fromEntries([...new FormData(event.target)].filter(([, v]) => v));
    loadAudit().catch((e) => problem(e.message));
  });
  document.getElementById("prev").addEventListener("click", () => {
    audit.page = Math.max(0, audit.page - 1);
    renderAudit();
  });
  document.getElementById("next").addEventListener("click", () => {
    audit.page += 1;
    renderAudit();
  });
  document.getElementById("audit-export").addEventListener("click", exportAudit);
  document.getElementById("gdpr-json").addEventListener("click", () => gdprExport("json"));
  document.getElementById("gdpr-csv").addEventListener("click", () => gdprExport("csv"));
  document.getElementById("gdpr-erase").addEventListener("click", askErase);
  document.getElementById("erase-typed").addEventListener("input", (event) => {
    document.getElementById("erase-go").disabled = event.target.value.trim() !== document.getElementById("erase-confirm").dataset.user;
  });
  document.getElementById("erase-form").addEventListener("submit", erase);
  document.getElementById("erase-cancel").addEventListener("click", () => {
    document.getElementById("erase-confirm").hidden = true;
  });
  setInterval(() => loadAlerts().catch(() => {}), 10000);
}

main();
