// popgate lab dashboard: follows /events (server-sent events) and draws the flow.
// Everything shown comes from the server already masked; text is always escaped here.
"use strict";

const state = { sessions: new Map(), recent: [], mailboxes: [], seen: new Map(), ghosts: [] };
const openDetails = new Set();
const $ = (id) => document.getElementById(id);
const esc = (s) => String(s ?? "").replace(/[&<>"']/g,
  (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" })[c]);
const isPop3 = (s) => s.protocol === "POP3";
const POP3_STATES = ["AUTHORIZATION", "TRANSACTION", "UPDATE"];
const FRESH = 1400;  // ms: how long a newly arrived file slides in
const GHOST = 4000;  // ms: how long a file that left stays as a fading ghost

function connect() {
  const events = new EventSource("events");
  events.onopen = () => setStatus(true);
  events.onerror = () => setStatus(false);
  events.addEventListener("snapshot", (e) => {
    const snap = JSON.parse(e.data);
    state.sessions = new Map(snap.open.map((s) => [s.id, s]));
    state.recent = snap.recent;
    updateMailboxes(snap.mailboxes);
    render();
  });
  events.addEventListener("session", (e) => {
    const s = JSON.parse(e.data);
    if (s.open) {
      state.sessions.set(s.id, s);
    } else {
      state.sessions.delete(s.id);
      state.recent = [s, ...state.recent.filter((r) => r.id !== s.id)].slice(0, 15);
    }
    render();
  });
  events.addEventListener("mailboxes", (e) => {
    updateMailboxes(JSON.parse(e.data).mailboxes);
    render();
  });
  events.addEventListener("flow", (e) => animateFlow(JSON.parse(e.data)));
}

function setStatus(up) {
  const el = $("status");
  el.className = "status " + (up ? "up" : "down");
  el.textContent = up ? "live" : "reconnecting…";
}

// Files are keyed by UIDL (it survives new/ -> cur/), tmp/ files by name.
function fileKey(dir, f) { return dir === "tmp" ? "tmp:" + f.name : f.uidl; }

function updateMailboxes(boxes) {
  const now = Date.now();
  const before = new Map();
  for (const box of state.mailboxes) {
    for (const dir of ["tmp", "new", "cur"]) {
      for (const f of box[dir]) before.set(box.user + "|" + fileKey(dir, f), { box: box.user, dir, f });
    }
  }
  const after = new Set();
  for (const box of boxes) {
    for (const dir of ["tmp", "new", "cur"]) {
      for (const f of box[dir]) {
        const key = box.user + "|" + fileKey(dir, f);
        after.add(key);
        const where = key + "@" + dir;
        if (!state.seen.has(where)) state.seen.set(where, state.mailboxes.length ? now : 0);
      }
    }
  }
  for (const [key, old] of before) {
    if (!after.has(key)) state.ghosts.push({ ...old, since: now });
  }
  state.mailboxes = boxes;
}

function render() {
  const now = Date.now();
  state.ghosts = state.ghosts.filter((g) => now - g.since < GHOST);
  const open = [...state.sessions.values()];
  fill($("smtp-sessions"), open.filter((s) => !isPop3(s)).map(smtpCard),
    'No SMTP session open.<br>Try: <code>swaks --to alice@example.org</code>');
  fill($("pop3-sessions"), open.filter(isPop3).map(pop3Card),
    'No POP3 session open.<br>Try: <code>curl pop3://…</code>');
  fill($("mailboxes"), state.mailboxes.map((b) => mailboxCard(b, open, now)),
    'No users yet.<br>Try: <code>popgate user add alice@example.org</code>');
  renderRecent();
  drawWires(open);
  if (state.ghosts.length) setTimeout(render, 1000);
}

function fill(el, cards, emptyHtml) {
  el.innerHTML = cards.length ? cards.join("") : '<p class="empty">' + emptyHtml + "</p>";
}

function who(s) {
  const tls = s.tls ? ' <span class="tls">🔒 ' + esc(s.tls) + "</span>" : "";
  return '<div class="who"><b>' + esc(s.protocol) + " " + esc(s.client) + "</b><span>session " +
    esc(s.id) + tls + "</span></div>";
}

function transcript(s, lines) {
  const shown = lines ? s.transcript.slice(-lines) : s.transcript;
  const dropped = s.dropped + s.transcript.length - shown.length;
  const head = dropped ? '<div class="more">… ' + dropped + " earlier lines</div>" : "";
  return '<div class="transcript">' + head + shown.map(([, dir, line]) =>
    '<div class="' + dir + '">' + dir + ": " + esc(line) + "</div>").join("") + "</div>";
}

function octets(n) { return (n ?? 0).toLocaleString("en") + " o"; }

function smtpCard(s) {
  const now = s.doing ? "now: " + s.doing : "connected";
  const to = s.targets.length ? " → " + s.targets.join(", ") : "";
  const delivered = s.delivered.map((d) => "✉ " + esc(d.id) + " → " + esc((d.users || []).join(", ")) +
    ": " + octets(d.octets) + " stored, " + octets(d.list_octets) + " as LIST").join("<br>");
  return '<div class="card smtp" data-session="' + esc(s.id) + '">' + who(s) +
    '<div class="big">' + esc(now) + esc(to) + "</div>" +
    (delivered ? '<div class="deliveries">' + delivered + "</div>" : "") +
    transcript(s, 6) + "</div>";
}

function pop3Card(s) {
  const states = POP3_STATES.map((name) =>
    '<span class="' + (name === (s.state || "AUTHORIZATION") ? "now" : "") + '">' + name + "</span>").join("");
  const marked = Object.entries(s.marked);
  const marks = marked.length ? '<div class="marks">DELE marked: ' +
    marked.map(([, n]) => "#" + esc(n)).join(", ") + " (removed at QUIT)</div>" : "";
  const user = s.user ? esc(s.user) : "not logged in";
  const retr = s.retrieved.length ? " · " + s.retrieved.length + " retrieved" : "";
  return '<div class="card pop3" data-session="' + esc(s.id) + '">' + who(s) +
    '<div class="big">' + user + retr + "</div>" +
    '<div class="states">' + states + "</div>" + marks + transcript(s, 6) + "</div>";
}

function markedBy(open) {
  const marks = new Map();
  for (const s of open) {
    if (!isPop3(s)) continue;
    for (const [uidl, n] of Object.entries(s.marked)) marks.set(s.user + "|" + uidl, { n, id: s.id });
  }
  return marks;
}

// An empty tmp/ file is a spare, unless an SMTP session is receiving a message for this
// user: that message has taken over the oldest spare and stays empty until its end.
function receiving(box, open) {
  return open.filter((s) => !isPop3(s) && ["DATA", "BDAT"].includes(s.doing) &&
    s.targets.includes(box.user)).length;
}

function mailboxCard(box, open, now) {
  const marks = markedBy(open);
  let taken = receiving(box, open);
  const dirs = ["tmp", "new", "cur"].map((dir, i) => {
    const chips = box[dir].map((f) => {
      const empty = dir === "tmp" && f.kind === "empty";
      const kind = empty ? (taken-- > 0 ? "receiving" : "spare") : f.kind;
      return chip(box, dir, { ...f, kind }, marks, now);
    });
    for (const g of state.ghosts) {
      if (g.box === box.user && g.dir === dir) chips.push(ghostChip(g, now));
    }
    const hidden = box.counts[i] - box[dir].length;
    if (hidden > 0) chips.unshift('<span class="more">+' + hidden + " older</span>");
    return '<div class="dir"><div class="label"><span>' + dir + "/</span><span>" + box.counts[i] +
      "</span></div>" + chips.join("") + "</div>";
  }).join("");
  return '<div class="card mailbox" data-user="' + esc(box.user) + '"><div class="who"><b>' +
    esc(box.user) + "</b></div><div class=\"totals\">" + box.messages + " message" +
    (box.messages === 1 ? "" : "s") + ", " + octets(box.octets) + " (as LIST counts)</div>" +
    '<div class="dirs">' + dirs + "</div></div>";
}

function arrival(key, dir, now) {
  const since = state.seen.get(key + "@" + dir) || 0;
  const age = now - since;
  return age < FRESH ? ' arrived" style="animation-delay:-' + age + "ms" : "";
}

function chip(box, dir, f, marks, now) {
  const key = box.user + "|" + fileKey(dir, f);
  const title = ' title="' + esc(dir + "/" + f.name) + '"';
  if (dir === "tmp") {
    const label = { spare: "spare: empty, made ahead", writing: "writing: " + octets(f.octets),
      receiving: "receiving: in memory until its end" }[f.kind] || f.kind;
    const kind = f.kind === "receiving" ? "writing" : f.kind;
    return '<span class="chip ' + kind + arrival(key, dir, now) + '"' + title + ">" + esc(label) + "</span>";
  }
  const mark = marks.get(box.user + "|" + f.uidl);
  const when = fileTime(f.name);
  const text = esc(when) + "<br>" + octets(f.stored) + " · LIST " + octets(f.octets);
  if (mark) {
    return '<span class="chip marked"' + title + '><span class="what">' + text + '</span><span class="why">DELE #' +
      esc(mark.n) + " by " + esc(mark.id) + "</span></span>";
  }
  return '<span class="chip ' + dir + arrival(key, dir, now) + '"' + title + ">" + text + "</span>";
}

function ghostChip(g, now) {
  return '<span class="chip gone" style="animation-delay:-' + (now - g.since) + 'ms">' +
    esc(g.dir === "tmp" ? "left tmp/" : "gone: " + fileTime(g.f.name)) + "</span>";
}

function fileTime(name) {
  const secs = parseInt(name, 10);
  if (!secs) return name.slice(0, 14);
  return new Date(secs * 1000).toLocaleTimeString("en-GB");
}

function renderRecent() {
  const el = $("recent-sessions");
  if (!state.recent.length) { el.innerHTML = '<p class="empty">None yet.</p>'; return; }
  el.innerHTML = state.recent.map((s) => {
    const c = s.closed || {};
    let what = "";
    if (isPop3(s)) {
      const failed = s.logins.filter((l) => l.result !== "ok").map((l) => l.result + ": " + l.user);
      const user = s.user || c.user || (failed.length ? "login " + failed.join(", ") : "no login");
      what = user + " · retr=" + (c.retrieved ?? s.retrieved.length) + "/" +
        octets(c.retrieved_octets) + " del=" + (c.deleted ?? 0) + "/" + octets(c.deleted_octets);
    } else {
      what = (c.messages ?? s.delivered.length) + " message(s) delivered";
    }
    const duration = c.duration !== undefined ? Number(c.duration).toFixed(1) + " s" : "";
    return '<details data-session="' + esc(s.id) + '"' + (openDetails.has(s.id) ? " open" : "") +
      ' class="' + (isPop3(s) ? "pop3" : "smtp") + '"><summary><span class="proto">' + esc(s.protocol) +
      "</span> " + esc(s.client) + " · " + esc(s.id) + " · " + esc(what) +
      " · " + esc(duration) + " · " + esc(c.reason || "") + "</summary>" + transcript(s, 0) + "</details>";
  }).join("");
  for (const d of el.querySelectorAll("details")) {
    d.addEventListener("toggle", () => {
      if (d.open) openDetails.add(d.dataset.session); else openDetails.delete(d.dataset.session);
    });
  }
}

// -- the wires: SMTP card -> mailbox -> POP3 card ------------------------------------

function anchor(el, side) {
  const base = $("flow").getBoundingClientRect();
  const r = el.getBoundingClientRect();
  return { x: (side === "right" ? r.right : r.left) - base.left, y: r.top + Math.min(r.height / 2, 40) - base.top };
}

function curve(a, b) {
  const mid = (a.x + b.x) / 2;
  return "M" + a.x + "," + a.y + " C" + mid + "," + a.y + " " + mid + "," + b.y + " " + b.x + "," + b.y;
}

function cardOf(attr, value) {
  return document.querySelector("[" + attr + '="' + CSS.escape(value) + '"]');
}

function drawWires(open) {
  const paths = [];
  for (const s of open) {
    const card = cardOf("data-session", s.id);
    if (!card) continue;
    if (isPop3(s)) {
      const box = s.user && cardOf("data-user", s.user);
      if (box) paths.push('<path class="pull" d="' + curve(anchor(box, "right"), anchor(card, "left")) + '"/>');
      continue;
    }
    const delivered = new Set(s.delivered.flatMap((d) => d.users || []));
    for (const user of new Set([...s.targets, ...delivered])) {
      const box = cardOf("data-user", user);
      if (!box) continue;
      const cls = delivered.has(user) ? "push" : "push pending";
      paths.push('<path class="' + cls + '" d="' + curve(anchor(card, "right"), anchor(box, "left")) + '"/>');
    }
  }
  $("wires").innerHTML = paths.join("");
}

function animateFlow(flow) {
  // A session of a few milliseconds (swaks, curl) may be over before its card is drawn:
  // the envelope then starts from (or flies to) its column's heading.
  const column = flow.kind === "push" ? "#push h2" : "#pull h2";
  const session = cardOf("data-session", flow.session) || document.querySelector(column);
  const box = cardOf("data-user", flow.user);
  if (!box) return;
  const [from, to] = flow.kind === "push"
    ? [anchor(session, "right"), anchor(box, "left")]
    : [anchor(box, "right"), anchor(session, "left")];
  const env = document.createElement("div");
  env.className = "envelope";
  env.textContent = "✉";
  env.style.left = from.x - 16 + "px";
  env.style.top = from.y - 20 + "px";
  $("flow").appendChild(env);
  requestAnimationFrame(() => requestAnimationFrame(() => {
    env.style.transform = "translate(" + (to.x - from.x) + "px," + (to.y - from.y) + "px)";
  }));
  setTimeout(() => env.remove(), 1600);
}

window.addEventListener("resize", () => drawWires([...state.sessions.values()]));
connect();
