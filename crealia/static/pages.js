// pages.js: what every page of the server shares: the token, REST calls, small DOM helpers.

const TOKEN_KEY = "crealia.token";

/** Build an element: h("button", {class: "x", onclick: fn}, "text", child). Never parses HTML. */
export function h(tag, props = {}, ...children) {
  const el = document.createElement(tag);
  for (const [key, value] of Object.entries(props ?? {})) {
    if (value === undefined || value === null || value === false) continue;
    if (key.startsWith("on") && typeof value === "function") el.addEventListener(key.slice(2), value);
    else if (key === "class") el.className = value;
    else if (key === "dataset") Object.assign(el.dataset, value);
    else if (key === "style" && typeof value === "object") Object.assign(el.style, value);
    else if (value === true) el.setAttribute(key, "");
    else el.setAttribute(key, String(value));
  }
  for (const child of children.flat(Infinity)) {
    if (child === undefined || child === null || child === false) continue;
    el.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return el;
}

/** Replace the children of `el`. */
export function fill(el, ...children) {
  el.replaceChildren();
  for (const child of children.flat(Infinity)) {
    if (child !== undefined && child !== null && child !== false) el.append(child instanceof Node ? child : String(child));
  }
  return el;
}

/** The token in the URL fragment (`#token=…`), which is then removed from the address bar. */
export function tokenFromFragment() {
  const params = new URLSearchParams(location.hash.slice(1));
  const token = params.get("token");
  if (!token) return null;
  params.delete("token");
  const rest = params.toString();
  history.replaceState(null, "", location.pathname + location.search + (rest ? "#" + rest : ""));
  return token;
}

/** The claims of a JWT, decoded but not verified (the server verifies). */
export function claimsOf(token) {
  try {
    const part = token.split(".")[1].replace(/-/g, "+").replace(/_/g, "/");
    const json = decodeURIComponent(
      Array.from(atob(part.padEnd(part.length + ((4 - (part.length % 4)) % 4), "=")), (c) => "%" + c.charCodeAt(0).toString(16).padStart(2, "0")).join(""),
    );
    return JSON.parse(json);
  } catch {
    return null;
  }
}

const RANK = { viewer: 0, commenter: 1, editor: 2, owner: 3 };

/** Whether `role` is at least `least`. */
export function atLeast(role, least) {
  return (RANK[role] ?? -1) >= (RANK[least] ?? 99);
}

let infoPromise = null;
/** GET /api/info, once. */
export function serverInfo() {
  infoPromise ??= fetch("/api/info").then((r) => r.json());
  return infoPromise;
}

/**
 * A token for this page: from the fragment, else the tab's sessionStorage, else asked for in a
 * small form (which, when the server runs with --dev, can also mint one).
 * @param {{project?: string|null, role?: string, minRole?: string|null, mount?: HTMLElement}} [options]
 */
export async function obtainToken({ project = null, role = "editor", minRole = null, mount } = {}) {
  const fromFragment = tokenFromFragment();
  const stored = sessionStorage.getItem(TOKEN_KEY);
  for (const token of [fromFragment, stored]) {
    const claims = token && claimsOf(token);
    if (!claims) continue;
    const fresh = !claims.exp || claims.exp * 1000 > Date.now();
    const fits = (!project || claims.project === project) && (!minRole || atLeast(claims.role, minRole));
    if (fresh && fits) {
      sessionStorage.setItem(TOKEN_KEY, token);
      return token;
    }
  }
  const token = await askForToken({ project, role, minRole, mount });
  sessionStorage.setItem(TOKEN_KEY, token);
  return token;
}

/** Forget the tab's token (a "sign out"). */
export function forgetToken() {
  sessionStorage.removeItem(TOKEN_KEY);
}

async function askForToken({ project, role, minRole, mount }) {
  const info = await serverInfo().catch(() => ({ dev: false }));
  const host = mount ?? document.querySelector("main") ?? document.body;
  return new Promise((resolve) => {
    const problem = h("p", { class: "form-error", role: "alert" });
    const pasted = h("textarea", { id: "token-input", rows: 3, required: true, spellcheck: "false", placeholder: "eyJhbGciOi…" });
    const need = [project && `project ${project}`, minRole && `role ${minRole} or higher`].filter(Boolean).join(", ");
    const paste = h(
      "form",
      { class: "card token-form", "aria-labelledby": "token-title" },
      h("h2", { id: "token-title" }, "Sign in with a token"),
      h("p", { class: "muted" }, "Paste a token from ", h("code", {}, "crealia token"), need ? ` (${need}).` : "."),
      h("label", { for: "token-input" }, "Token"),
      pasted,
      h("button", { type: "submit", class: "primary" }, "Use this token"),
    );
    paste.addEventListener("submit", (event) => {
      event.preventDefault();
      const token = pasted.value.trim();
      const claims = claimsOf(token);
      if (!claims) return fill(problem, "That is not a token (three base64url parts).");
      if (project && claims.project !== project) return fill(problem, `That token is for project ${claims.project}, not ${project}.`);
      if (minRole && !atLeast(claims.role, minRole)) return fill(problem, `That token's role is ${claims.role}; this page needs ${minRole}.`);
      done(token);
    });
    const forms = [paste];
    if (info.dev) forms.unshift(mintForm({ project, role: minRole && !atLeast(role, minRole) ? minRole : role, onToken: done }));
    const box = h("section", { class: "token-box" }, forms, problem);
    host.prepend(box);
    function done(token) {
      box.remove();
      resolve(token);
    }
  });
}

/** A form minting a token (`POST /api/dev/token`, only with `crealia serve --dev`). */
export function mintForm({ project = "p1", role = "editor", user = "", onToken }) {
  const id = (name) => `mint-${name}`;
  const problem = h("p", { class: "form-error", role: "alert" });
  const suggested = user || ["ana", "ben", "chloe", "dev", "emma", "femi"][Math.floor(Math.random() * 6)];
  const form = h(
    "form",
    { class: "card token-form", "aria-labelledby": id("title") },
    h("h2", { id: id("title") }, "Mint a development token"),
    h("p", { class: "muted" }, "This server runs with ", h("code", {}, "--dev"), ": pick who you are."),
    h("div", { class: "grid-2" },
      h("label", { for: id("user") }, "User id", h("input", { id: id("user"), name: "user", required: true, value: suggested, pattern: "[A-Za-z0-9][A-Za-z0-9_.:@\\-]{0,63}" })),
      h("label", { for: id("name") }, "Display name", h("input", { id: id("name"), name: "name", placeholder: "the user id" })),
      h("label", { for: id("project") }, "Project", h("input", { id: id("project"), name: "project", required: true, value: project ?? "p1", readonly: project ? true : undefined })),
      h("label", { for: id("role") }, "Role",
        h("select", { id: id("role"), name: "role" }, ["owner", "editor", "commenter", "viewer"].map((r) => h("option", { value: r, selected: r === role }, r)))),
    ),
    h("button", { type: "submit", class: "primary" }, "Mint token"),
    problem,
  );
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    const data = Object.fromEntries(new FormData(form));
    if (!data.name) delete data.name;
    try {
      const { token } = await api("/api/dev/token", { method: "POST", body: data });
      onToken(token, data);
    } catch (error) {
      fill(problem, error.message);
    }
  });
  return form;
}

/**
 * A REST call: JSON in and out, the token as a Bearer header. Throws an Error carrying the
 * server's `code` and the HTTP `status` when it refuses.
 */
export async function api(path, { token, method = "GET", body, accept = "application/json" } = {}) {
  const headers = { Accept: accept };
  if (token) headers.Authorization = `Bearer ${token}`;
  if (body !== undefined) headers["Content-Type"] = "application/json";
  const response = await fetch(path, { method, headers, body: body === undefined ? undefined : JSON.stringify(body) });
  const type = response.headers.get("Content-Type") ?? "";
  if (!response.ok) {
    let message = `${response.status} ${response.statusText}`;
    let code = "http_error";
    if (type.includes("json")) {
      const data = await response.json().catch(() => null);
      if (data?.error) ({ message, code } = data.error);
    }
    const error = new Error(message);
    error.code = code;
    error.status = response.status;
    throw error;
  }
  if (accept !== "application/json" || !type.includes("json")) return response;
  return response.json();
}

/** Save `blob` as a download named `name`. */
export function download(blob, name) {
  const url = URL.createObjectURL(blob);
  const link = h("a", { href: url, download: name });
  document.body.append(link);
  link.click();
  link.remove();
  setTimeout(() => URL.revokeObjectURL(url), 1000);
}

/**
 * Read a server-sent event stream with fetch (so the token goes in a header, never in a URL),
 * calling `onEvent(type, data)`; reconnects after errors until `signal` aborts.
 */
export async function readEvents(path, { token, onEvent, onStatus = () => {}, signal }) {
  let delay = 1000;
  while (!signal?.aborted) {
    try {
      const response = await fetch(path, { headers: { Authorization: `Bearer ${token}`, Accept: "text/event-stream" }, signal });
      if (!response.ok) {
        const data = await response.json().catch(() => null);
        const error = new Error(data?.error?.message ?? `${response.status}`);
        error.status = response.status;
        throw error;
      }
      onStatus("open");
      delay = 1000;
      const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
      let buffer = "";
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        buffer += value;
        let end;
        while ((end = buffer.indexOf("\n\n")) >= 0) {
          const block = buffer.slice(0, end);
          buffer = buffer.slice(end + 2);
          let type = "message";
          const data = [];
          for (const line of block.split("\n")) {
            if (line.startsWith("event:")) type = line.slice(6).trim();
            else if (line.startsWith("data:")) data.push(line.slice(5).trimStart());
          }
          if (data.length) {
            try {
              onEvent(type, JSON.parse(data.join("\n")));
            } catch (error) {
              console.warn("crealia: a feed event could not be read", error);
            }
          }
        }
      }
    } catch (error) {
      if (signal?.aborted) return;
      onStatus("error", error);
      if (error.status === 401 || error.status === 403) return;
    }
    await new Promise((resolve) => setTimeout(resolve, delay));
    delay = Math.min(delay * 2, 15000);
  }
}

/** A small header bar shared by the pages: the product, the page's title, who is signed in. */
export function header(title, claims) {
  const nav = h(
    "nav",
    { "aria-label": "Pages" },
    [["/", "Home"], ["/demo?project=" + encodeURIComponent(claims?.project ?? "p1"), "Demo"], ["/dashboard", "Dashboard"], ["/security", "Security"]].map(([href, label]) =>
      h("a", { href, "aria-current": location.pathname === href.split("?")[0] ? "page" : undefined }, label),
    ),
  );
  const who = claims ? h("span", { class: "who" }, `${claims.name ?? claims.sub} · ${claims.role} · ${claims.project}`) : null;
  return h("header", { class: "top" }, h("a", { class: "brand", href: "/" }, h("img", { src: "/favicon.ico", alt: "", width: 22, height: 22 }), "crealia"), h("h1", {}, title), nav, who);
}

/** "3.2 s", "12 ms", "1.4 MB/s"... */
export function format(value, unit) {
  if (value === null || value === undefined || Number.isNaN(value)) return "–";
  if (unit === "bytes" || unit === "bytes/s") {
    const units = ["B", "KB", "MB", "GB"];
    let v = value;
    let i = 0;
    while (v >= 1000 && i < units.length - 1) {
      v /= 1000;
      i += 1;
    }
    return `${v.toFixed(v >= 100 || i === 0 ? 0 : 1)} ${units[i]}${unit === "bytes/s" ? "/s" : ""}`;
  }
  if (unit === "%") return `${value.toFixed(value >= 10 ? 0 : 1)} %`;
  if (unit === "ms") return `${value.toFixed(value >= 10 ? 0 : 1)} ms`;
  return String(Math.round(value * 10) / 10);
}

/** A date as local time, from epoch ms or an ISO string. */
export function when(value) {
  if (value === null || value === undefined) return "–";
  const date = new Date(value);
  return Number.isNaN(date.getTime()) ? String(value) : date.toLocaleString();
}
