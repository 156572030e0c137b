// The Overview tab: the last 24 hours at a glance, from GET /v1/overview. The chart is SVG
// drawn here (no library, nothing loaded from elsewhere), coloured by classes in style.css.
// Every number links to the list it counts: the same filters, on the Deliveries or the
// Dead letters tab. Loaded before app.js, whose `$`, `call`, `say` and `show` it uses once
// the page has started.
"use strict";

const SVG_NS = "http://www.w3.org/2000/svg";
const CHART = { width: 760, height: 210, left: 34, right: 6, top: 10, bottom: 24 };
// Bottom to top in each bar; a state the API adds later goes on top.
const STACK = ["delivered", "skipped", "accepted", "pending", "retrying", "dead", "discarded"];

// Another tab with its filters set to `filter` (and only those).
function openList(view, filter) {
  const form = $("filters");
  form.reset();
  for (const [name, value] of Object.entries(filter)) form.elements[name].value = value;
  show(view);
}

// A number that opens the list it counts. `inSvg`: an SVG <a> around `child`.
function listLink(content, view, filter, inSvg) {
  const a = inSvg ? document.createElementNS(SVG_NS, "a") : document.createElement("a");
  a.setAttribute("href", "#" + view + "?" + new URLSearchParams(filter));
  if (typeof content === "string") a.textContent = content; else a.appendChild(content);
  a.addEventListener("click", (event) => { event.preventDefault(); openList(view, filter); });
  return a;
}

function svg(name, attributes) {
  const node = document.createElementNS(SVG_NS, name);
  for (const [key, value] of Object.entries(attributes || {})) node.setAttribute(key, value);
  return node;
}

function element(name, className, text) {
  const node = document.createElement(name);
  if (className) node.className = className;
  if (text !== undefined) node.textContent = text;
  return node;
}

const hourOf = (iso) => iso.slice(11, 16);  // "09:00", UTC as the API gives it
const addHour = (iso) => new Date(Date.parse(iso) + 3600000).toISOString();
const ms = (value) => value === null ? "-" : (value < 10 ? value.toFixed(1) : Math.round(value)) + " ms";

function stacked(states) {
  return [...STACK, ...Object.keys(states).filter((s) => !STACK.includes(s))];
}

// Deliveries per hour, one stacked bar an hour; each part opens that hour's deliveries in
// that state.
function chart(hours) {
  const { width, height, left, right, top, bottom } = CHART;
  const order = stacked(hours[0].states);
  const totals = hours.map((h) => Object.values(h.states).reduce((a, b) => a + b, 0));
  const most = Math.max(1, ...totals);
  const plot = height - top - bottom;
  const step = (width - left - right) / hours.length;
  const root = svg("svg", {
    viewBox: `0 0 ${width} ${height}`, class: "chart", role: "img",
    "aria-label": "Deliveries per hour over the last 24 hours, by state",
  });
  const axis = (y, label) => {
    root.appendChild(svg("line", { x1: left, x2: width - right, y1: y, y2: y, class: "grid" }));
    const text = svg("text", { x: left - 4, y: y + 4, "text-anchor": "end", class: "axis" });
    text.textContent = label;
    root.appendChild(text);
  };
  axis(top + plot, "0");
  axis(top, String(most));
  hours.forEach((hour, i) => {
    const group = svg("g", { class: "hour", "data-start": hour.start });
    const x = left + i * step + 1;
    let y = top + plot;
    for (const state of order) {
      const n = hour.states[state] || 0;
      if (!n) continue;
      const h = Math.max(1, (n / most) * plot);
      y -= h;
      const rect = svg("rect", {
        x, y, width: Math.max(1, step - 2), height: h, class: "bar o-" + state,
        "data-state": state,
      });
      const title = svg("title");
      title.textContent = `${hourOf(hour.start)} to ${hourOf(addHour(hour.start))} UTC: ${n} ${state}`;
      rect.appendChild(title);
      const filter = { state, since: hour.start, until: addHour(hour.start) };
      group.appendChild(listLink(rect, "deliveries", filter, true));
    }
    if (i % 3 === 0) {
      const label = svg("text", { x: x + step / 2, y: height - 6, "text-anchor": "middle", class: "axis" });
      label.textContent = hourOf(hour.start);
      group.appendChild(label);
    }
    root.appendChild(group);
  });
  return root;
}

// Each state's count over the window, with its colour: the chart's key.
function legend(o) {
  const key = element("p", "legend");
  for (const state of stacked(o.states)) {
    const item = element("span", "key");
    item.append(element("span", "swatch o-" + state), state + " ");
    item.appendChild(listLink(String(o.states[state] || 0), "deliveries", { state, since: o.since }));
    key.appendChild(item);
  }
  return key;
}

function tile(name, value, note) {
  const box = element("div", "tile");
  box.appendChild(element("span", "tile-name", name));
  const shown = element("span", "tile-value");
  shown.append(value);
  box.append(shown, element("span", "tile-note", note));
  return box;
}

function tiles(o) {
  const box = element("div", "tiles");
  box.appendChild(tile("Dead letters", listLink(String(o.dead_letters), "dead", {}),
    "not replayed or discarded, all time"));
  box.appendChild(tile("Retries waiting",
    listLink(String(o.retries_waiting), "deliveries", { state: "retrying" }),
    "failed, next try scheduled, all time"));
  const unknown = "unknown: Redis did not answer (" + o.redis_error + ")";
  box.appendChild(o.queue
    ? tile("Queue", o.queue.due + " due", o.queue.later + " due later (retries, waits); in Redis, not a list")
    : tile("Queue", "?", unknown));
  const d = o.durations;
  box.appendChild(tile("Attempt time p50 / p95",
    listLink(ms(d.p50_ms) + " / " + ms(d.p95_ms), "deliveries", { since: o.since }),
    "of " + d.attempts + " attempt" + (d.attempts === 1 ? "" : "s") + " for these deliveries " +
    "(the newest " + d.of_newest.toLocaleString("en") + " at most)"));
  box.appendChild(o.circuits
    ? tile("Circuits", "opened " + o.circuits.opened + " · closed " + o.circuits.closed,
      o.circuits.put_off + " put-offs for an open one; counted by the workers, " +
      "which alone know which are open now")
    : tile("Circuits", "?", unknown));
  return box;
}

function affiliates(o) {
  const box = element("div", "failing");
  box.appendChild(element("h3", "", "Affiliates failing most"));
  if (!o.affiliates.length) {
    box.appendChild(element("p", "empty", "No dead or retrying deliveries in these 24 hours."));
    return box;
  }
  const table = element("table");
  const head = table.createTHead().insertRow();
  for (const name of ["Affiliate", "Dead", "Retrying"]) head.appendChild(element("th", "", name));
  const body = table.createTBody();
  for (const a of o.affiliates) {
    const row = body.insertRow();
    const mine = { affiliate: a.affiliate_id, since: o.since };
    row.insertCell().appendChild(listLink(a.affiliate_id, "deliveries", mine));
    row.insertCell().appendChild(listLink(String(a.dead), "dead", mine));
    row.insertCell().appendChild(listLink(String(a.retrying), "deliveries", { ...mine, state: "retrying" }));
  }
  box.appendChild(table);
  return box;
}

// What the relay told ops (GET /v1/notifications): the newest few, each with how sending
// it to POSTBACK_OPS_WEBHOOK went.
const NOTIFICATIONS_SHOWN = 10;

function notifications(page) {
  const box = element("div", "notifications");
  box.appendChild(element("h3", "", "Notifications"));
  if (!page.items.length) {
    box.appendChild(element("p", "empty", "The relay has told ops nothing."));
    return box;
  }
  const table = element("table");
  const head = table.createTHead().insertRow();
  for (const name of ["Created (UTC)", "Kind", "State", "Text"]) head.appendChild(element("th", "", name));
  const body = table.createTBody();
  for (const n of page.items) {
    const row = body.insertRow();
    row.dataset.id = n.id;
    row.insertCell().textContent = n.created_at.slice(0, 19).replace("T", " ");
    row.insertCell().textContent = n.kind;
    const sent = row.insertCell();
    sent.textContent = n.state;
    if (n.error) sent.title = n.error;
    row.insertCell().textContent = n.text;
  }
  box.appendChild(table);
  return box;
}

async function loadOverview() {
  const section = $("overview");
  $("count").textContent = "";
  let o;
  try {
    o = await call("GET", "/v1/overview");
  } catch (error) {
    say(error.message, true);
    return;
  }
  const title = element("h2", "", "Deliveries taken per hour, by their state now");
  const at = (iso) => iso.slice(0, 16).replace("T", " ");
  const when = element("p", "window",
    "From " + at(o.since) + " to " + at(o.until) + " UTC: the last 24 hours, to the end of this one.");
  const total = Object.values(o.states).reduce((a, b) => a + b, 0);
  const drawn = total ? chart(o.hours) : element("p", "empty", "No deliveries in the last 24 hours.");
  section.replaceChildren(title, when, drawn, legend(o), tiles(o), affiliates(o));
  try {
    section.appendChild(notifications(await call("GET", "/v1/notifications?limit=" + NOTIFICATIONS_SHOWN)));
  } catch (error) {
    say(error.message, true);
  }
}
