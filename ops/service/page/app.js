// The ops page: plain JavaScript over the ops API, no build step, no network but this service.
// Everything a receiver or a producer wrote is put on the page as text, never as HTML.
"use strict";

const $ = (id) => document.getElementById(id);
const state = { view: "dead", next: null, query: null, selected: null, busy: false };

function token() { return sessionStorage.getItem("postback-token") || ""; }
function actor() { return localStorage.getItem("postback-actor") || "ops page"; }

async function call(method, path, body) {
  const options = { method, headers: { Authorization: "Bearer " + token() } };
  if (body !== undefined) {
    options.headers["Content-Type"] = "application/json";
    options.body = JSON.stringify(body);
  }
  const response = await fetch(path, options);
  const data = await response.json().catch(() => ({ error: response.statusText }));
  if (response.status === 401) {
    sessionStorage.removeItem("postback-token");
    showLogin(data.error);
  }
  if (!response.ok) {
    const detail = (data.errors || []).map((e) => e.field + ": " + e.message).join("; ");
    throw new Error(detail || data.error || "HTTP " + response.status);
  }
  return data;
}

function say(text, isError) {
  const message = $("message");
  message.textContent = text;
  message.className = isError ? "error" : "";
}

function cell(row, text, className) {
  const td = document.createElement("td");
  td.textContent = text === null || text === undefined ? "" : String(text);
  if (className) td.className = className;
  row.appendChild(td);
  return td;
}

function time(value) { return value ? value.slice(0, 19).replace("T", " ") : "-"; }

// Why a delivery is as it is, worded as `postback deliveries` words it (ops/console.py, why).
function why(d) {
  if (d.reason) return d.reason;
  if (d.blocked_by) return "waiting for delivery " + d.blocked_by + ", earlier in its order";
  if (d.create_wait_until) {
    return "waiting for its order.created, not received yet; goes without it at "
      + time(d.create_wait_until) + " UTC";
  }
  return d.order_note || "";
}

// The filters' choices, as the API lists them in its OpenAPI document: the page never
// offers a state or an error class that the API would refuse, nor misses a new one.
async function loadChoices() {
  try {
    const spec = await (await fetch("/openapi.json")).json();
    for (const parameter of spec.paths["/v1/deliveries"].get.parameters) {
      const select = $("filters").querySelector("select[name=" + parameter.name + "]");
      for (const value of (select && parameter.schema.enum) || []) {
        select.appendChild(new Option(value));
      }
    }
  } catch (error) {
    say("cannot read the filters' choices: " + error.message, true);
  }
}

function filters() {
  const query = new URLSearchParams();
  for (const [name, value] of new FormData($("filters"))) {
    if (value && !(state.view === "dead" && name === "state")) query.set(name, value);
  }
  return query;
}

async function loadList(append) {
  const path = state.view === "dead" ? "/v1/dead-letters" : "/v1/deliveries";
  // "More" goes on with the filters that made the list, whatever the form says now.
  const query = append && state.query ? new URLSearchParams(state.query) : filters();
  if (!append) state.query = query.toString();
  if (append && state.next) query.set("cursor", state.next);
  try {
    const page = await call("GET", path + "?" + query);
    const rows = $("rows");
    if (!append) rows.replaceChildren();
    for (const item of page.items) {
      const row = document.createElement("tr");
      row.dataset.id = item.id;
      cell(row, time(item.created_at));
      cell(row, item.affiliate_id);
      cell(row, item.event_type);
      cell(row, item.order_number);
      cell(row, item.state, "state-" + item.state);
      cell(row, item.attempts);
      cell(row, item.last_status !== null ? item.last_status : item.error_class || "-");
      cell(row, why(item));
      row.addEventListener("click", () => openDelivery(item.id));
      if (item.id === state.selected) row.classList.add("selected");
      rows.appendChild(row);
    }
    state.next = page.next;
    $("more").hidden = !page.next;
    const count = rows.children.length;
    const noun = state.view === "dead"
      ? (count === 1 ? " dead letter" : " dead letters")
      : (count === 1 ? " delivery" : " deliveries");
    $("count").textContent = count + noun + (page.next ? " shown; more below" : "");
  } catch (error) {
    say(error.message, true);
  }
}

async function openDelivery(id) {
  state.selected = id;
  for (const row of $("rows").children) row.classList.toggle("selected", row.dataset.id === id);
  let d;
  try {
    d = await call("GET", "/v1/deliveries/" + encodeURIComponent(id));
  } catch (error) {
    say(error.message, true);
    return;
  }
  $("app").classList.add("with-detail");
  $("detail").hidden = false;
  $("detail-title").textContent = d.affiliate_id + " · order " + d.order_number + " · " + d.state;
  const facts = $("detail-facts");
  facts.replaceChildren();
  const fact = (name, value) => {
    const dt = document.createElement("dt");
    dt.textContent = name;
    const dd = document.createElement("dd");
    dd.textContent = value === null || value === undefined ? "-" : String(value);
    facts.append(dt, dd);
  };
  fact("Delivery", d.id);
  fact("Event", d.event_id + " (" + d.event_type + ")");
  fact("State", d.state + (why(d) ? ": " + why(d) : ""));
  if (d.order_note && why(d) !== d.order_note) fact("Order", d.order_note);
  fact("Taken", time(d.created_at) + " UTC");
  if (d.next_attempt_at) fact("Next try", time(d.next_attempt_at) + " UTC");
  if (d.request) fact("Request", d.request.method + " " + d.request.url);
  const replayable = d.state === "dead" || d.state === "discarded";
  $("replay-rerender").disabled = !replayable;
  $("replay-resend").disabled = !replayable || !d.request;
  $("discard").disabled = d.state !== "dead";
  $("discard-note").disabled = d.state !== "dead";

  const attempts = $("attempts");
  attempts.replaceChildren();
  for (const a of d.attempts) {
    const row = document.createElement("tr");
    cell(row, a.number);
    cell(row, time(a.started_at));
    cell(row, Math.round(a.duration_ms) + " ms");
    cell(row, a.status_code !== null ? "HTTP " + a.status_code : a.error_class + ": " + a.error);
    cell(row, (a.response_excerpt || "").slice(0, 500), "excerpt");
    attempts.appendChild(row);
  }
  const actions = $("actions");
  actions.replaceChildren();
  for (const a of d.actions) {
    const li = document.createElement("li");
    li.textContent = a.action + (a.mode ? " (" + a.mode + ")" : "") + " by " + a.actor +
      " at " + time(a.at) + " UTC, attempt " + a.attempt + (a.note ? ": " + a.note : "");
    actions.appendChild(li);
  }
  if (!d.actions.length) actions.textContent = "none";
  $("event").textContent = JSON.stringify(d.event, null, 2);
}

// One action at a time: a double click must not send a second replay.
async function busy(work) {
  if (state.busy) return;
  state.busy = true;
  try { await work(); } finally { state.busy = false; }
}

async function replay(mode) {
  const id = state.selected;
  try {
    await call("POST", "/v1/dead-letters/" + id + "/replay", { mode, actor: actor() });
    say("Replayed: the delivery is queued again.");
  } catch (error) {
    say(error.message, true);
    return;
  }
  await loadList(false);
  await openDelivery(id);
}

async function discard() {
  const id = state.selected;
  const note = $("discard-note").value.trim();
  if (!note) { say("Say why it is discarded: the note is kept with the delivery.", true); return; }
  try {
    await call("POST", "/v1/dead-letters/" + id + "/discard", { note, actor: actor() });
    say("Discarded; it stays in the record with your note.");
    $("discard-note").value = "";
  } catch (error) {
    say(error.message, true);
    return;
  }
  await loadList(false);
  await openDelivery(id);
}

async function replayAll() {
  const filter = Object.fromEntries([...filters()].filter(([name]) => name !== "state"));
  const described = Object.keys(filter).length ? JSON.stringify(filter) : "no filter: every one";
  if (!confirm("Replay all dead letters matching " + described + "?")) return;
  const all = Object.keys(filter).length === 0;
  try {
    const s = await call("POST", "/v1/dead-letters/replay", { filter, all, actor: actor() });
    say("Replayed " + s.replayed + ", skipped " + s.skipped + ", failed " + s.failed + ".");
  } catch (error) {
    say(error.message, true);
    return;
  }
  await loadList(false);
}

async function loadCallbacks() {
  try {
    const { items } = await call("GET", "/v1/callbacks");
    const rows = $("callback-rows");
    rows.replaceChildren();
    for (const cb of items) {
      const row = document.createElement("tr");
      cell(row, cb.affiliate_id);
      cell(row, cb.event_type);
      cell(row, cb.method);
      cell(row, cb.enabled ? "yes" : "no");
      cell(row, cb.has_secret ? "yes" : "no");
      cell(row, cb.url_template, "excerpt");
      const td = cell(row, "");
      const fire = document.createElement("button");
      fire.type = "button";
      fire.textContent = "Test fire";
      fire.addEventListener("click", () => testFire(cb));
      td.appendChild(fire);
      rows.appendChild(row);
    }
    $("count").textContent = items.length + " callback" + (items.length === 1 ? "" : "s");
  } catch (error) {
    say(error.message, true);
  }
}

async function testFire(cb) {
  const path = "/v1/callbacks/" + encodeURIComponent(cb.affiliate_id) + "/" + cb.event_type + "/test";
  const out = $("fire-result");
  out.hidden = false;
  out.textContent = "Sending a sample " + cb.event_type + " to " + cb.affiliate_id + "…";
  try {
    const r = await call("POST", path, { actor: actor() });
    const got = r.response
      ? "HTTP " + r.response.status + "\n" +
        Object.entries(r.response.headers).map(([k, v]) => k + ": " + v).join("\n") +
        "\n\n" + r.response.body_excerpt
      : r.error_class + ": " + r.error;
    out.textContent = r.request.method + " " + r.request.url + "\n" +
      (r.request.body ? JSON.stringify(r.request.body, null, 2) + "\n" : "") +
      "\n→ " + Math.round(r.duration_ms) + " ms, " + got;
  } catch (error) {
    out.textContent = error.message;
  }
}

function show(view) {
  state.view = view;
  state.selected = null;
  state.next = null;
  say("");
  for (const tab of document.querySelectorAll(".tab")) {
    tab.classList.toggle("current", tab.dataset.view === view);
  }
  const isCallbacks = view === "callbacks";
  $("filters").hidden = isCallbacks;
  $("list").hidden = isCallbacks;
  $("callbacks").hidden = !isCallbacks;
  $("detail").hidden = true;
  $("app").classList.remove("with-detail");
  $("state-filter").hidden = view !== "deliveries";
  $("replay-all").hidden = view !== "dead";
  if (isCallbacks) loadCallbacks(); else loadList(false);
}

async function health() {
  const badge = $("health");
  try {
    const response = await fetch("/healthz");
    const body = await response.json();
    badge.textContent = body.down.length ? "down: " + body.down.join(", ") : "all up";
    badge.className = body.down.length ? "down" : "ok";
  } catch (error) {
    badge.textContent = "service unreachable";
    badge.className = "down";
  }
}

function showLogin(problem) {
  $("login").hidden = false;
  $("login-error").textContent = problem || "";
  $("app").hidden = true;
  $("actor").value = localStorage.getItem("postback-actor") || "";
}

function start() {
  $("login").addEventListener("submit", (event) => {
    event.preventDefault();
    sessionStorage.setItem("postback-token", $("token").value.trim());
    if ($("actor").value.trim()) localStorage.setItem("postback-actor", $("actor").value.trim());
    $("login").hidden = true;
    $("app").hidden = false;
    show(state.view);
  });
  $("filters").addEventListener("submit", (event) => { event.preventDefault(); loadList(false); });
  $("more").addEventListener("click", () => loadList(true));
  $("replay-rerender").addEventListener("click", () => busy(() => replay("rerender")));
  $("replay-resend").addEventListener("click", () => busy(() => replay("resend")));
  $("discard").addEventListener("click", () => busy(discard));
  $("replay-all").addEventListener("click", () => busy(replayAll));
  for (const tab of document.querySelectorAll(".tab")) {
    tab.addEventListener("click", () => show(tab.dataset.view));
  }
  loadChoices();
  health();
  setInterval(health, 15000);
  if (token()) {
    $("app").hidden = false;
    show("dead");
  } else {
    showLogin();
  }
}

start();
