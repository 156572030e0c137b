// The ops page: plain JavaScript over the ops API, no build step, no network but this service.
// Everything a receiver or a producer wrote is put on the page as text, never as HTML.
"use strict";

const $ = (id) => document.getElementById(id);
const state = {
  view: "overview", next: null, query: null, selected: null, busy: false, following: null,
  listings: 0,
};
const FOLLOW_EVERY_MS = 1000;
const FOLLOW_FOR_MS = 120000;
// A replayed delivery is followed while it is in one of these; then it has settled.
const OPEN_STATES = ["accepted", "pending", "retrying"];

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
    const failure = new Error(detail || data.error || "HTTP " + response.status);
    failure.errors = data.errors || [];  // [{field, message}]: shown next to each field
    throw failure;
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
  td.title = td.textContent; // the list cuts long cells to one line: the whole on hover
  if (className) td.className = className;
  row.appendChild(td);
  return td;
}

function time(value) { return value ? value.slice(0, 19).replace("T", " ") : "-"; }

// Pending with a reason: not tried yet, put off until next_attempt_at by its callback's delay.
function delayed(d) { return d.state === "pending" && Boolean(d.reason) && Boolean(d.next_attempt_at); }

// Why a delivery is as it is, worded as `postback deliveries` words it (ops/console.py, why).
function why(d) {
  if (delayed(d)) return "due " + time(d.next_attempt_at) + " UTC (" + d.reason + ")";
  if (d.reason) return d.reason;
  if (d.blocked_by) return "waiting for delivery " + d.blocked_by + ", earlier in its order";
  if (d.create_wait_until) {
    return "waiting for its order.created, not received yet; goes without it at "
      + time(d.create_wait_until) + " UTC";
  }
  return d.order_note || "";
}

// Which callback a delivery went to, in a word, as `postback deliveries list` says it.
function callbackUsed(d) {
  if (d.callback_id === null || d.callback_id === undefined) return "-";
  if (d.callback_store_wide === null) return "removed";
  return d.callback_store_wide ? "store-wide" : "own";
}

// The same in the detail: "#12 (store-wide)", as `postback deliveries show` says it.
function callbackLine(d) {
  const used = callbackUsed(d);
  if (used === "-") return "none";
  return "#" + d.callback_id + " (" + (used === "removed" ? "removed since" : used) + ")";
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
    callbackChoices(spec);
  } catch (error) {
    say("cannot read the filters' choices: " + error.message, true);
  }
}

// A list's filters in words, named as the form labels them: "affiliate ann, order #1001".
function inWords(query) {
  const words = [];
  for (const [name, value] of new URLSearchParams(query)) {
    const field = $("filters").querySelector("[name=" + name + "]");
    const label = field && field.closest("label");
    if (label) words.push(label.firstChild.textContent.trim().toLowerCase() + " " + value);
  }
  return words.join(", ");
}

// Why a list is empty: its filters, or nothing there at all.
function empty(query) {
  const words = inWords(query);
  const noun = state.view === "dead" ? "dead letters" : "deliveries";
  if (words) return "No " + noun + " match " + words + ".";
  return state.view === "dead"
    ? "No dead letters: nothing has failed, or every failure was replayed or discarded."
    : "No deliveries yet: no event has been received.";
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
  const ticket = ++state.listings;
  try {
    const page = await call("GET", path + "?" + query);
    // Only the latest listing is shown: one asked before (by a replay being followed, say)
    // and answered after must not overwrite it.
    if (ticket !== state.listings) return;
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
      cell(row, callbackUsed(item));
      cell(row, why(item));
      row.addEventListener("click", () => openDelivery(item.id));
      if (item.id === state.selected) row.classList.add("selected");
      rows.appendChild(row);
    }
    state.next = page.next;
    $("more").hidden = !page.next;
    const count = rows.children.length;
    if (!count) {
      $("count").textContent = empty(state.query);
      return;
    }
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
  if (state.selected === id) showDelivery(d);
}

function showDelivery(d) {
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
  fact("Callback", callbackLine(d));
  // A delayed one's state says when it is due.
  if (d.next_attempt_at && !delayed(d)) fact("Next try", time(d.next_attempt_at) + " UTC");
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
  let answer;
  try {
    const path = "/v1/dead-letters/" + encodeURIComponent(id) + "/replay";
    answer = await call("POST", path, { mode, actor: actor() });
  } catch (error) {
    say(error.message, true);
    return;
  }
  const said = await replayed(answer.queued);
  say(said);
  await loadList(false);
  await openDelivery(id);
  follow(id, said); // not awaited: the buttons are free again meanwhile
}

// What a replay did, in words: the API's answer says whether its job is in Redis, and
// /healthz whether a worker is alive to run it.
async function replayed(queued) {
  if (!queued) {
    return "Replayed, but Redis is unreachable: the delivery is reopened, " +
      "and the sweep queues it within a minute.";
  }
  const checked = await health();
  if (checked && !checked.checks.worker.ok) {
    return "Replayed and queued, but no worker is alive to send it: " +
      "it goes when one starts.";
  }
  return "Replayed: the delivery is queued again.";
}

const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

// After a replay, the detail and the list follow the delivery until it settles, as one
// would by opening it again and again; for two minutes at most, and only while it is the
// delivery open.
async function follow(id, said) {
  const ends = Date.now() + FOLLOW_FOR_MS;
  const mine = {};
  state.following = mine; // a later replay's follow takes over from this one
  const followed = () => state.selected === id && state.following === mine;
  let seen = null;
  for (;;) {
    await sleep(FOLLOW_EVERY_MS);
    if (!followed()) return;
    let d;
    try {
      d = await call("GET", "/v1/deliveries/" + encodeURIComponent(id));
    } catch (error) {
      say(error.message, true);
      return;
    }
    if (!followed()) return;
    const now = d.state + " " + d.attempts.length;
    if (now !== seen) {
      seen = now;
      showDelivery(d);
      await loadList(false);
    }
    // The outcome is told unless the page has said something else since.
    const told = $("message").textContent === said;
    if (!OPEN_STATES.includes(d.state)) {
      const now = " Now " + d.state + (d.reason ? ": " + d.reason : "") + ".";
      if (told) say(said + now, d.state === "dead");
      return;
    }
    if (Date.now() > ends) {
      if (told) {
        say(said + " Still " + d.state + " after " + FOLLOW_FOR_MS / 60000 + " minutes; " +
          "the page stopped following it: open it again to look.");
      }
      return;
    }
  }
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
  const query = filters();
  query.delete("state");
  const filter = Object.fromEntries(query);
  const all = Object.keys(filter).length === 0;
  let matching;
  try {
    // Counted by the API as the replay will select them, so the question quotes the number.
    const body = { filter, all, dry_run: true };
    ({ matching } = await call("POST", "/v1/dead-letters/replay", body));
  } catch (error) {
    say(error.message, true);
    return;
  }
  const words = inWords(query);
  if (!matching) {
    say(empty(query));
    return;
  }
  const what = matching === 1 ? "1 dead letter" : matching + " dead letters";
  const question = words
    ? "Replay " + what + " of " + words + "?"
    : "Replay " + what + ": every dead letter there is?";
  if (!confirm(question)) return;
  try {
    const s = await call("POST", "/v1/dead-letters/replay", { filter, all, actor: actor() });
    say("Replayed " + s.replayed + ", skipped " + s.skipped + ", failed " + s.failed + ".");
  } catch (error) {
    say(error.message, true);
    return;
  }
  await loadList(false);
}

// --- The Callbacks tab: list, create, edit, enable, disable, remove, test fire --------------
// Every check is the API's (the same as `postback callbacks set`); the page only puts each
// refusal next to its field, worded as the API words it. A stored secret is never shown:
// only whether there is one.

const callbacksTab = { editing: null, previewRun: 0, previewTimer: null };
const PREVIEW_HINT = "Type a URL template to see the request for a sample order.";

function callbackPath(affiliate, eventType) {
  return "/v1/callbacks/" + encodeURIComponent(affiliate) + "/" + encodeURIComponent(eventType);
}

function callbackName(cb) {
  if (cb.store_wide) return "the store-wide " + cb.event_type + " callback";
  return "the " + cb.event_type + " callback of affiliate " + cb.affiliate_id;
}

// What a callback waits for and fires for, as the table shows them.
function statusesText(cb) { return cb.statuses ? cb.statuses.join(", ") : "all"; }
function delayText(cb) { return cb.delay_seconds ? cb.delay : "none"; }

// The form's choices, as the API's preview body lists them in /openapi.json.
function callbackChoices(spec) {
  const fields = spec.components.schemas.PreviewBody.properties;
  const form = $("callback-form");
  for (const name of ["event_type", "method"]) {
    for (const value of fields[name].enum) form.elements[name].appendChild(new Option(value));
  }
}

async function loadCallbacks() {
  try {
    const { items } = await call("GET", "/v1/callbacks");
    const rows = $("callback-rows");
    rows.replaceChildren(...items.flatMap(callbackRows));
    $("count").textContent = items.length
      ? items.length + " callback" + (items.length === 1 ? "" : "s")
      : "No callbacks yet: set one up with the form above.";
  } catch (error) {
    say(error.message, true);
  }
}

function isEditing(affiliate, eventType) {
  const cb = callbacksTab.editing;
  return Boolean(cb) && cb.affiliate_id === affiliate && cb.event_type === eventType;
}

function markEditing() {
  for (const row of $("callback-rows").children) {
    row.classList.toggle("selected", isEditing(row.dataset.affiliate, row.dataset.event));
  }
}

// Who disabled a callback, when and why, as `postback callbacks list` says it.
function disabledText(cb) {
  const off = cb.disabled;
  if (!off) return "Disabled.";
  return "Disabled by " + off.actor + " at " + time(off.at) + " UTC" +
    (off.note ? ": " + off.note : "") + ".";
}

function letters(count) { return count === 1 ? "1 dead letter" : count + " dead letters"; }

// A callback's row, and under a disabled one's a row saying who disabled it and why.
function callbackRows(cb) {
  const rows = [callbackRow(cb)];
  if (!cb.enabled) {
    const why = document.createElement("tr");
    why.className = "why-off";
    why.dataset.affiliate = cb.affiliate_id;
    why.dataset.event = cb.event_type;
    const td = cell(why, disabledText(cb));
    td.colSpan = 10;
    rows.push(why);
  }
  return rows;
}

function callbackRow(cb) {
  const row = document.createElement("tr");
  row.dataset.affiliate = cb.affiliate_id;
  row.dataset.event = cb.event_type;
  row.classList.toggle("selected", isEditing(cb.affiliate_id, cb.event_type));
  cell(row, cb.store_wide ? cb.affiliate_id + " (store-wide)" : cb.affiliate_id);
  cell(row, cb.event_type);
  cell(row, cb.method);
  cell(row, cb.enabled ? "yes" : "no", cb.enabled ? "" : "off");
  cell(row, cb.has_secret ? "set" : "none");
  cell(row, statusesText(cb));
  cell(row, delayText(cb));
  cell(row, cb.url_template, "excerpt");
  cell(row, cb.dead_streak || "-", cb.dead_streak ? "off" : "");
  const td = cell(row, "", "row-actions");
  const button = (label, work) => {
    const b = document.createElement("button");
    b.type = "button";
    b.textContent = label;
    b.addEventListener("click", work);
    td.appendChild(b);
  };
  button("Edit", () => editCallback(cb));
  button(cb.enabled ? "Disable" : "Enable", () => busy(() => switchCallback(cb, !cb.enabled)));
  if (!cb.enabled && cb.dead_letters) {
    button("Enable and replay its " + letters(cb.dead_letters),
      () => busy(() => switchCallback(cb, true, true)));
  }
  button("Test fire", () => busy(() => testFire(cb)));
  button("Remove", () => busy(() => removeCallback(cb)));
  return row;
}

// The form for a new callback, or for editing `cb` (its affiliate and event are its key).
function fillCallbackForm(cb) {
  callbacksTab.editing = cb;
  const f = $("callback-form").elements;
  f.affiliate_id.value = cb ? cb.affiliate_id : "";
  f.event_type.value = cb ? cb.event_type : f.event_type.options[0]?.value || "";
  f.method.value = cb ? cb.method : "GET";
  f.url.value = cb ? cb.url_template : "";
  f.statuses.value = cb && cb.statuses ? cb.statuses.join(",") : "";
  f.delay.value = cb && cb.delay_seconds ? cb.delay : "";
  f.affiliate_id.readOnly = Boolean(cb);
  f.event_type.disabled = Boolean(cb);
  f.secret.value = "";
  f.secret_action.value = "keep";
  const hasSecret = Boolean(cb && cb.has_secret);
  $("cb-secret-now").textContent = hasSecret ? "set" : "none";
  f.secret_action.options[0].textContent = hasSecret ? "keep it" : "none";
  const remove = f.secret_action.querySelector("option[value=remove]");
  remove.hidden = remove.disabled = !hasSecret;
  $("cb-secret-field").hidden = true;
  $("cb-title").textContent = cb ? "Edit " + callbackName(cb) : "New callback";
  $("cb-save").textContent = cb ? "Save changes" : "Save";
  $("cb-secret-shown").hidden = true;
  $("cb-secret-value").textContent = "";  // a generated secret is shown once, then gone
  showFieldErrors([]);
  $("cb-preview").textContent = PREVIEW_HINT;
  $("cb-preview").classList.remove("stale");
  markEditing();
  if (cb) previewCallback();
}

function editCallback(cb) {
  fillCallbackForm(cb);
  $("callback-form").elements.url.focus();
}

// Each refusal under its field; one for no field on the form goes under the buttons.
function showFieldErrors(errors, fallback) {
  const form = $("callback-form");
  const placed = new Set();
  for (const span of form.querySelectorAll(".field-error")) {
    const mine = errors.filter((e) => fieldOf(e) === span.dataset.field);
    span.textContent = mine.map((e) => e.message).join("; ");
    const input = form.elements[span.dataset.field];
    if (input) input.classList.toggle("invalid", mine.length > 0);
    for (const e of mine) placed.add(e);
  }
  const rest = errors.filter((e) => !placed.has(e)).map((e) => e.field + ": " + e.message);
  $("cb-error").textContent = rest.join("; ") || (errors.length ? "" : fallback || "");
}

function fieldOf(error) {
  // A PUT names the affiliate by its path parameter; the form by the callback's field.
  if (error.field === "affiliate") return "affiliate_id";
  return error.field.replace(/^statuses\.\d+$/, "statuses");  // one status of the list
}

// The form as the API's preview body: the callback it would save, bar the secret. Empty
// statuses are every status (null), an empty delay none; what is typed goes as typed, for
// the API to check (each status of the list as `postback callbacks set --statuses` would).
function callbackDraft() {
  const f = $("callback-form").elements;
  const statuses = f.statuses.value.trim();
  const delay = f.delay.value.trim();
  return {
    affiliate_id: f.affiliate_id.value,
    event_type: f.event_type.value,
    method: f.method.value,
    url: f.url.value,
    statuses: statuses ? statuses.split(",") : null,
    delay: delay || null,
  };
}

function previewSoon() {
  clearTimeout(callbacksTab.previewTimer);
  callbacksTab.previewTimer = setTimeout(() => previewCallback(), 250);
}

// The request for the sample order a test fire sends, as the template is typed; an answer
// that comes back after a later one was asked for is dropped. `always`: even with no
// template yet, for the API to say what is missing.
async function previewCallback(always) {
  clearTimeout(callbacksTab.previewTimer);
  const run = ++callbacksTab.previewRun;
  const out = $("cb-preview");
  const draft = callbackDraft();
  if (!draft.url && always !== true) {
    out.textContent = PREVIEW_HINT;
    out.classList.remove("stale");
    showFieldErrors([]);
    return;
  }
  try {
    const request = await call("POST", "/v1/callbacks/preview", draft);
    if (run !== callbacksTab.previewRun) return;
    showFieldErrors([]);
    out.textContent = "Sample order TEST-1001: " + request.method + " " + request.url +
      (request.body ? " (the order as a JSON body)" : "");
    out.classList.remove("stale");
  } catch (error) {
    if (run !== callbacksTab.previewRun) return;
    showFieldErrors(error.errors || [], error.message);
    out.textContent = "No request until what is marked is fixed.";
    out.classList.add("stale");
  }
}

async function saveCallback() {
  const f = $("callback-form").elements;
  const draft = callbackDraft();
  if (!draft.affiliate_id) {
    await previewCallback(true);  // the API says what the affiliate must be, next to it
    return;
  }
  const body = {
    url: draft.url, method: draft.method, statuses: draft.statuses, delay: draft.delay,
  };
  const secret = f.secret_action.value;
  if (secret === "set") body.secret = f.secret.value;
  if (secret === "generate") body.secret = "generate";
  if (secret === "remove") body.secret = null;
  let saved;
  try {
    saved = await call("PUT", callbackPath(draft.affiliate_id, draft.event_type), body);
  } catch (error) {
    showFieldErrors(error.errors || [], error.message);
    return;
  }
  fillCallbackForm(saved);
  say("Saved " + callbackName(saved) + ": " + saved.method + " " + saved.url_template +
    (saved.statuses ? "; statuses " + statusesText(saved) : "") +
    (saved.delay_seconds ? "; delay " + saved.delay : "") +
    "; secret " + (saved.has_secret ? "set" : "none") + ".");
  if (saved.secret) {
    $("cb-secret-value").textContent = saved.secret;  // the API answers it this once
    $("cb-secret-shown").hidden = false;
  }
  await loadCallbacks();
}

async function switchCallback(cb, enabled, replay) {
  try {
    const path = callbackPath(cb.affiliate_id, cb.event_type);
    const body = { actor: actor() };
    if (replay) body.replay = true;
    const now = await call("POST", path + (enabled ? "/enable" : "/disable"), body);
    const s = now.replayed;
    say(enabled
      ? "Enabled " + callbackName(cb) + "." + (s
        ? " Replayed " + s.replayed + " of its " + letters(s.matching) + ", skipped " +
          s.skipped + ", failed " + s.failed + "."
        : "")
      : "Disabled " + callbackName(cb) + ": its events are skipped and its dead letters " +
        "cannot be replayed until it is enabled again.");
  } catch (error) {
    say(error.message, true);
  }
  await loadCallbacks();
}

async function removeCallback(cb) {
  if (!confirm("Remove " + callbackName(cb) + "?")) return;
  try {
    await call("DELETE", callbackPath(cb.affiliate_id, cb.event_type));
    say("Removed " + callbackName(cb) + "; its past deliveries stay recorded.");
  } catch (error) {
    say(error.message, true);
  }
  if (isEditing(cb.affiliate_id, cb.event_type)) fillCallbackForm(null);
  await loadCallbacks();
}

async function testFire(cb) {
  const path = callbackPath(cb.affiliate_id, cb.event_type) + "/test";
  const out = $("fire-result");
  out.hidden = false;
  const to = cb.store_wide ? "the store-wide callback" : cb.affiliate_id;
  out.textContent = "Sending a sample " + cb.event_type + " to " + to + "…";
  try {
    const r = await call("POST", path, { actor: actor() });
    const got = r.response
      ? "HTTP " + r.response.status + "\n" +
        Object.entries(r.response.headers).map(([k, v]) => k + ": " + v).join("\n") +
        "\n\n" + r.response.body_excerpt
      : r.error_class + ": " + r.error;
    const disabled = r.enabled ? "" : "This callback is disabled: its real events are skipped " +
      "until it is enabled. The test was sent all the same.\n\n";
    out.textContent = disabled + r.request.method + " " + r.request.url + "\n" +
      (r.request.body ? JSON.stringify(r.request.body, null, 2) + "\n" : "") +
      "\n→ " + Math.round(r.duration_ms) + " ms, " + got;
  } catch (error) {
    out.textContent = error.message;
  }
}

function startCallbacks() {
  const form = $("callback-form");
  form.addEventListener("submit", (event) => { event.preventDefault(); busy(saveCallback); });
  for (const name of ["affiliate_id", "url", "statuses", "delay"]) {
    form.elements[name].addEventListener("input", previewSoon);
  }
  for (const name of ["event_type", "method"]) {
    form.elements[name].addEventListener("change", () => previewCallback());
  }
  form.elements.secret_action.addEventListener("change", () => {
    $("cb-secret-field").hidden = form.elements.secret_action.value !== "set";
  });
  $("cb-new").addEventListener("click", () => fillCallbackForm(null));
  fillCallbackForm(null);
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
  const isOverview = view === "overview";  // overview.js
  $("filters").hidden = isCallbacks || isOverview;
  $("list").hidden = isCallbacks || isOverview;
  $("callbacks").hidden = !isCallbacks;
  $("overview").hidden = !isOverview;
  $("detail").hidden = true;
  $("app").classList.remove("with-detail");
  $("state-filter").hidden = view !== "deliveries";
  $("replay-all").hidden = view !== "dead";
  if (isOverview) loadOverview(); else if (isCallbacks) loadCallbacks(); else loadList(false);
}

// The badge, from /healthz; its answer too, or null when the service did not give one.
async function health() {
  const badge = $("health");
  try {
    const response = await fetch("/healthz");
    const body = await response.json();
    badge.textContent = body.down.length ? "down: " + body.down.join(", ") : "all up";
    badge.className = body.down.length ? "down" : "ok";
    return body;
  } catch (error) {
    badge.textContent = "service unreachable";
    badge.className = "down";
    return null;
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
  startCallbacks();
  for (const tab of document.querySelectorAll(".tab")) {
    tab.addEventListener("click", () => show(tab.dataset.view));
  }
  loadChoices();
  health();
  setInterval(health, 15000);
  if (token()) {
    $("app").hidden = false;
    show(state.view);
  } else {
    showLogin();
  }
}

start();
