// The landing page: what runs here, where everything is, and (with --dev) tokens to try it.
import { fill, h, header, mintForm, serverInfo } from "/static/pages.js";

document.getElementById("top").replaceWith(header("Real-time collaboration server", null));

function seconds(s) {
  if (s < 90) return `${Math.round(s)} s`;
  if (s < 5400) return `${Math.round(s / 60)} min`;
  return `${(s / 3600).toFixed(1)} h`;
}

async function showInfo() {
  const info = await serverInfo();
  const rows = [
    ["Server", `${info.name} ${info.version}`],
    ["Protocol", `version ${info.protocol}`],
    ["Mode", info.dev ? "development (--dev)" : "production"],
    ["Up for", seconds(info.uptime_s)],
    ["WebSocket", `ws://${location.host}${info.websocket}`],
  ];
  fill(document.getElementById("info"), rows.map(([k, v]) => [h("dt", {}, k), h("dd", { dataset: { key: k.toLowerCase() } }, v)]));
  if (info.dev) showDev();
}

async function probe(badge) {
  try {
    const response = await fetch(badge.dataset.probe);
    badge.className = `badge ${response.ok ? "good" : "bad"}`;
    badge.textContent = response.ok ? "ok" : `${response.status}`;
  } catch {
    badge.className = "badge bad";
    badge.textContent = "unreachable";
  }
}

function showDev() {
  const section = document.getElementById("dev");
  section.hidden = false;
  const minted = document.getElementById("minted");
  const form = mintForm({
    project: document.getElementById("demo-project").value || "p1",
    role: "owner",
    onToken: (token, data) => {
      const fragment = `#token=${encodeURIComponent(token)}`;
      fill(
        minted,
        h("p", {}, `Token for ${data.user} (${data.role}) in ${data.project}:`),
        h("div", { class: "row" },
          h("a", { class: "button primary", href: `/demo?project=${encodeURIComponent(data.project)}${fragment}` }, "Open the demo"),
          h("a", { class: "button", href: `/dashboard${fragment}` }, "Open the dashboard"),
          h("a", { class: "button", href: `/security${fragment}` }, "Open the security page"),
        ),
        h("label", { for: "minted-token" }, "The token", h("textarea", { id: "minted-token", rows: 3, readonly: true }, token)),
      );
    },
  });
  form.querySelector("input[name=project]").removeAttribute("readonly");
  fill(document.getElementById("mint"), form);
}

document.getElementById("demo-form").addEventListener("submit", (event) => {
  event.preventDefault();
  const project = document.getElementById("demo-project").value.trim() || "p1";
  location.href = `/demo?project=${encodeURIComponent(project)}`;
});

showInfo();
document.querySelectorAll("[data-probe]").forEach(probe);
