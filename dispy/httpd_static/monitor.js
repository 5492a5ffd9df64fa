// dispy monitor: polls /api/status and draws it; no libraries.
// Every value from the server goes into the page as text (textContent), never as HTML.
(() => {
  "use strict";

  const meta = (name) => {
    const el = document.querySelector(`meta[name="${name}"]`);
    return el ? el.content : "";
  };
  const TOKEN = meta("dispy-token");
  const POLL_MS = Math.max(200, parseInt(meta("dispy-poll-ms"), 10) || 1000);
  const $ = (id) => document.getElementById(id);

  // -- formatting ---------------------------------------------------------------------
  const fmtBytes = (n) => {
    if (n === null || n === undefined) return "–";
    const units = ["B", "KB", "MB", "GB", "TB"];
    let i = 0;
    while (n >= 1024 && i < units.length - 1) {
      n /= 1024;
      i += 1;
    }
    return (i === 0 ? n.toFixed(0) : n.toFixed(1)) + " " + units[i];
  };
  const fmtPct = (x) => (x === null || x === undefined ? "–" : x.toFixed(1) + " %");
  const fmtSecs = (s) => {
    if (s === null || s === undefined) return "–";
    if (s < 60) return s.toFixed(1) + " s";
    if (s < 3600) return Math.floor(s / 60) + " min " + Math.floor(s % 60) + " s";
    return Math.floor(s / 3600) + " h " + Math.floor((s % 3600) / 60) + " min";
  };
  const fmtClock = (t) => (t ? new Date(t * 1000).toLocaleTimeString() : "–");

  const setText = (el, text) => {
    text = String(text);
    if (el.textContent !== text) el.textContent = text;
  };
  const make = (tag, cls, text) => {
    const el = document.createElement(tag);
    if (cls) el.className = cls;
    if (text !== undefined) el.textContent = text;
    return el;
  };

  // Keyed rows: existing rows (and their buttons) stay in place, only changed text is
  // rewritten, so a click is never lost to a redraw.
  function syncChildren(parent, items, keyOf, create, update) {
    const old = new Map();
    for (const el of Array.from(parent.children)) old.set(el.dataset.key, el);
    let prev = null;
    for (const item of items) {
      const key = String(keyOf(item));
      let el = old.get(key);
      if (el) old.delete(key);
      else {
        el = create(item);
        el.dataset.key = key;
      }
      update(el, item);
      const want = prev ? prev.nextElementSibling : parent.firstElementChild;
      if (el !== want) parent.insertBefore(el, want);
      prev = el;
    }
    for (const el of old.values()) el.remove();
  }

  // -- header ---------------------------------------------------------------------------
  function renderCounts(name, counts) {
    setText($("cluster-name"), name);
    document.title = `dispy monitor – ${name}`;
    for (const key of ["submitted", "ended", "failed", "running", "pending"]) {
      setText($("count-" + key), counts[key] ?? "–");
    }
  }

  // -- nodes ----------------------------------------------------------------------------
  function nodeRow(n) {
    const tr = document.createElement("tr");
    tr.dataset.node = n.node;
    const name = make("td");
    name.append(make("span", "mono node-name"), make("span", "sub node-addr"));
    tr.append(name);
    for (let i = 0; i < 8; i++) tr.append(make("td", "num"));
    const actions = make("td", "actions");
    const dealloc = make("button", "node-action", "deallocate");
    dealloc.type = "button";
    dealloc.dataset.action = "deallocate";
    dealloc.dataset.node = n.node;
    dealloc.title = "Stop sending new jobs to this node (running jobs go on)";
    const close = make("button", "node-action danger", "close");
    close.type = "button";
    close.dataset.action = "close";
    close.dataset.node = n.node;
    close.title = "Close the computation on this node: it runs no more jobs of this cluster";
    actions.append(dealloc, close);
    tr.append(actions);
    return tr;
  }

  function updateNodeRow(tr, n) {
    const c = tr.cells;
    setText(c[0].querySelector(".node-name"), n.name);
    setText(c[0].querySelector(".node-addr"), n.name === n.node ? "" : n.node);
    const a = n.avail_info || {};
    const vals = [
      n.cpus,
      n.busy,
      n.jobs_done,
      fmtSecs(n.cpu_time),
      fmtPct(a.cpu),
      fmtBytes(a.memory),
      fmtBytes(a.disk),
      fmtPct(a.swap),
    ];
    vals.forEach((v, i) => setText(c[i + 1], v));
  }

  // -- running jobs -----------------------------------------------------------------------
  function jobRow(j) {
    const tr = document.createElement("tr");
    tr.dataset.uid = j.uid;
    tr.append(make("td", "num mono"), make("td", "mono"), make("td", "mono"));
    const st = make("td");
    st.append(make("span", "status"));
    tr.append(st, make("td"), make("td", "num"));
    const actions = make("td", "actions");
    const btn = make("button", "cancel", "cancel");
    btn.type = "button";
    btn.dataset.uid = j.uid;
    btn.title = "Cancel this job (its process on the node is terminated)";
    actions.append(btn);
    tr.append(actions);
    return tr;
  }

  function updateJobRow(tr, j, now) {
    const c = tr.cells;
    setText(c[0], j.uid);
    setText(c[1], j.id === null ? "–" : j.id);
    setText(c[2], j.node);
    setText(c[3].firstChild, j.status);
    setText(c[4], fmtClock(j.start_time));
    setText(c[5], j.start_time ? fmtSecs(Math.max(0, now - j.start_time)) : "–");
  }

  // -- failures ---------------------------------------------------------------------------
  function failureItem(f) {
    const li = make("li");
    li.dataset.uid = f.uid;
    const head = make("div", "head");
    head.append(
      make("span", "status", f.status),
      make("span", "mono", "uid " + f.uid),
      make("span", "mono", "id " + (f.id === null ? "–" : f.id)),
      make("span", "muted", (f.ip_addr ? f.ip_addr + " · " : "") + fmtClock(f.end_time)),
    );
    li.append(head, make("pre", "exception", f.exception || "(no exception text)"));
    return li;
  }

  // -- throughput chart (canvas, hand drawn) -----------------------------------------------
  let lastHistory = [];
  function drawChart(history) {
    lastHistory = history;
    const canvas = $("chart");
    const dpr = window.devicePixelRatio || 1;
    const w = canvas.clientWidth;
    const h = canvas.clientHeight;
    if (!w || !h) return;
    if (canvas.width !== Math.round(w * dpr) || canvas.height !== Math.round(h * dpr)) {
      canvas.width = Math.round(w * dpr);
      canvas.height = Math.round(h * dpr);
    }
    const ctx = canvas.getContext("2d");
    ctx.setTransform(dpr, 0, 0, dpr, 0, 0);
    ctx.clearRect(0, 0, w, h);
    const css = getComputedStyle(document.documentElement);
    const fg = css.getPropertyValue("--muted").trim() || "#888";
    const line = css.getPropertyValue("--line").trim() || "#ddd";
    const accent = css.getPropertyValue("--accent").trim() || "#2563eb";
    const pad = { l: 44, r: 10, t: 10, b: 20 };
    const pw = w - pad.l - pad.r;
    const ph = h - pad.t - pad.b;
    const maxRate = Math.max(1, ...history.map((p) => p[1]));
    const yMax = niceCeil(maxRate);
    const span = POLL_MS / 1000 * 300;
    const tEnd = history.length ? history[history.length - 1][0] : Date.now() / 1000;
    const tStart = tEnd - span;
    const x = (t) => pad.l + ((t - tStart) / span) * pw;
    const y = (r) => pad.t + ph - (r / yMax) * ph;

    ctx.font = "11px system-ui, sans-serif";
    ctx.fillStyle = fg;
    ctx.strokeStyle = line;
    ctx.lineWidth = 1;
    ctx.textAlign = "right";
    ctx.textBaseline = "middle";
    for (let i = 0; i <= 4; i++) {
      const v = (yMax * i) / 4;
      const yy = Math.round(y(v)) + 0.5;
      ctx.beginPath();
      ctx.moveTo(pad.l, yy);
      ctx.lineTo(w - pad.r, yy);
      ctx.stroke();
      ctx.fillText(v % 1 ? v.toFixed(1) : String(v), pad.l - 6, yy);
    }
    ctx.textAlign = "center";
    ctx.textBaseline = "top";
    const marks = 5;
    for (let i = 0; i <= marks; i++) {
      const t = tStart + (span * i) / marks;
      const ago = Math.round(tEnd - t);
      const label = ago === 0 ? "now" : ago >= 60 ? `-${(ago / 60).toFixed(ago % 60 ? 1 : 0)} min` : `-${ago} s`;
      ctx.fillText(label, Math.min(Math.max(x(t), pad.l + 14), w - pad.r - 14), h - pad.b + 5);
    }
    const pts = history.filter((p) => p[0] >= tStart);
    if (pts.length < 2) {
      ctx.textBaseline = "middle";
      ctx.fillText("collecting samples…", pad.l + pw / 2, pad.t + ph / 2);
      return;
    }
    ctx.beginPath();
    ctx.moveTo(x(pts[0][0]), y(0));
    for (const [t, r] of pts) ctx.lineTo(x(t), y(r));
    ctx.lineTo(x(pts[pts.length - 1][0]), y(0));
    ctx.closePath();
    ctx.globalAlpha = 0.15;
    ctx.fillStyle = accent;
    ctx.fill();
    ctx.globalAlpha = 1;
    ctx.beginPath();
    pts.forEach(([t, r], i) => (i ? ctx.lineTo(x(t), y(r)) : ctx.moveTo(x(t), y(r))));
    ctx.strokeStyle = accent;
    ctx.lineWidth = 1.8;
    ctx.lineJoin = "round";
    ctx.stroke();
  }

  function niceCeil(v) {
    const p = Math.pow(10, Math.floor(Math.log10(v)));
    for (const m of [1, 2, 2.5, 5, 10]) if (v <= m * p) return m * p;
    return 10 * p;
  }

  window.addEventListener("resize", () => drawChart(lastHistory));

  // -- messages and connection state ---------------------------------------------------------
  let messageTimer = null;
  function showMessage(text, sticky, info) {
    const el = $("message");
    el.textContent = text;
    el.className = info ? "message info" : "message";
    el.hidden = false;
    clearTimeout(messageTimer);
    if (!sticky) messageTimer = setTimeout(() => (el.hidden = true), 6000);
  }
  function setConn(state, text) {
    const el = $("conn");
    el.className = "conn " + state;
    setText(el, text);
  }

  // -- one refresh ---------------------------------------------------------------------------
  function render(s) {
    renderCounts(s.name, s.counts);
    const now = s.time;

    syncChildren($("nodes"), s.nodes, (n) => n.node, nodeRow, updateNodeRow);
    $("nodes-empty").hidden = s.nodes.length > 0;

    const jobs = [];
    for (const n of s.nodes) for (const j of n.jobs) jobs.push(Object.assign({ node: n.node }, j));
    jobs.sort((a, b) => a.uid - b.uid);
    syncChildren($("jobs"), jobs, (j) => j.uid, jobRow, (tr, j) => updateJobRow(tr, j, now));
    $("jobs-empty").hidden = jobs.length > 0;

    syncChildren($("failures"), s.failures, (f) => f.uid, failureItem, () => {});
    $("failures-empty").hidden = s.failures.length > 0;

    const last = s.history.length ? s.history[s.history.length - 1][1] : 0;
    setText($("rate-now"), `${last.toFixed(1)} jobs/s`);
    drawChart(s.history);
  }

  async function poll() {
    try {
      const r = await fetch("/api/status", { credentials: "same-origin", cache: "no-store" });
      if (r.status === 401) {
        setConn("down", "not authorized");
        showMessage(
          "Not authorized: open the monitor with the URL (including ?token=…) that dispy logged when it started.",
          true,
        );
        return; // no point retrying without the token
      }
      if (!r.ok) throw new Error(`HTTP ${r.status}`);
      render(await r.json());
      setConn("live", "live");
    } catch (err) {
      setConn("down", "disconnected – retrying");
    }
    setTimeout(poll, POLL_MS);
  }

  // -- actions ---------------------------------------------------------------------------------
  async function post(path, body) {
    try {
      const r = await fetch(path, {
        method: "POST",
        credentials: "same-origin",
        headers: { "Content-Type": "application/json", "X-Dispy-Token": TOKEN },
        body: JSON.stringify(body),
      });
      let data = {};
      try {
        data = await r.json();
      } catch (e) {
        data = {};
      }
      return { ok: r.ok && data.ok !== false, data, status: r.status };
    } catch (err) {
      return { ok: false, data: { error: String(err) }, status: 0 };
    }
  }

  document.addEventListener("click", async (ev) => {
    const btn = ev.target.closest("button");
    if (!btn || btn.disabled) return;
    if (btn.classList.contains("cancel")) {
      const uid = Number(btn.dataset.uid);
      btn.disabled = true;
      btn.textContent = "cancelling…";
      const res = await post("/api/cancel", { uid });
      if (!res.ok) {
        btn.disabled = false;
        btn.textContent = "cancel";
        showMessage(`Cancelling job ${uid} failed: ${res.data.error || "HTTP " + res.status}`);
      }
    } else if (btn.classList.contains("node-action")) {
      const { node, action } = btn.dataset;
      if (action === "close" && !window.confirm(`Close node ${node}? It will run no more jobs of this cluster.`)) {
        return;
      }
      btn.disabled = true;
      const res = await post("/api/node", { node, action });
      btn.disabled = false;
      if (!res.ok) showMessage(`${action} ${node} failed: ${res.data.error || "HTTP " + res.status}`);
      else {
        const note = res.data.pending ? " (closing after its running jobs)" : "";
        showMessage(`${action} ${node}: done${note}`, false, true);
      }
    }
  });

  poll();
})();
