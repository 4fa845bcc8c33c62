// stead web UI: live updates over server-sent events, tree filters and edges, action
// confirmations, logout and the console (xterm.js when the page loads it). Plain JavaScript, no build step; the pages work
// without it (links and GET forms), this only adds to them.
(function () {
  "use strict";

  var csrfMeta = document.querySelector('meta[name="csrf-token"]');
  var csrf = csrfMeta ? csrfMeta.getAttribute("content") : "";

  function $(sel, root) { return (root || document).querySelector(sel); }
  function $all(sel, root) { return Array.prototype.slice.call((root || document).querySelectorAll(sel)); }

  function nodesFor(id) {
    return $all("[data-id]").filter(function (el) { return el.getAttribute("data-id") === id; });
  }

  function setBadge(el, cls, base, text) {
    if (!el) { return; }
    el.className = base + " " + cls;
    el.textContent = text;
  }

  // A resource's status changed: update every element that shows it, in place.
  function applyNode(n) {
    nodesFor(n.id).forEach(function (el) {
      el.setAttribute("data-status", n.status);
      setBadge($(".st", el), "s-" + n.status, "badge st", n.status);
      var reason = $(".reason", el);
      if (reason) { reason.textContent = n.reason || ""; }
      var drift = $(".drift-badge", el);
      if (drift) {
        if (n.drifted) {
          drift.className = "badge drift drift-badge";
          drift.textContent = "drifted";
        } else if (drift.textContent === "drifted" || drift.textContent === "drift found") {
          drift.className = "badge healed drift-badge";
          drift.textContent = "healed";
        }
      }
    });
  }

  // A drift event: mark the resource as drifted until a status update says otherwise.
  function applyEvent(e) {
    if (!e.resource) { return; }
    var list = $("#events-live");
    if (list && (!list.getAttribute("data-resource") || list.getAttribute("data-resource") === e.resource)) {
      var li = document.createElement("li");
      li.textContent = e.reason + ": " + e.message;
      list.insertBefore(li, list.firstChild);
    }
    nodesFor(e.resource).forEach(function (el) {
      var drift = $(".drift-badge", el);
      if (!drift) { return; }
      if (e.kind === "drift") {
        drift.className = "badge drift drift-badge";
        drift.textContent = "drift found";
        drift.title = e.message;
      } else if (e.kind === "drift-repaired") {
        drift.className = "badge healed drift-badge";
        drift.textContent = "healed";
        drift.title = e.message;
      }
    });
  }

  // Pages that are not the tree re-render their main part after a reconcile: at once
  // when a resource changed, else at most every 5 s; never within 10 s of an action
  // (its answer stays readable) nor while a field of the page has the focus.
  var refreshTimer = null;
  var lastSwap = 0;
  var holdUntil = 0;
  function refreshMain(urgent) {
    var main = $("main[data-live='swap']");
    if (!main || refreshTimer) { return; }
    var now = Date.now();
    var wait = Math.max(urgent ? 300 : lastSwap + 5000 - now, holdUntil - now, 300);
    refreshTimer = setTimeout(function () {
      refreshTimer = null;
      var active = document.activeElement;
      if (active && main.contains(active) && /INPUT|SELECT|TEXTAREA/.test(active.tagName)) { return; }
      lastSwap = Date.now();
      fetch(window.location.href, { credentials: "same-origin" }).then(function (r) {
        return r.ok ? r.text() : null;
      }).then(function (text) {
        if (!text || Date.now() < holdUntil) { return; }
        var doc = new DOMParser().parseFromString(text, "text/html");
        var fresh = doc.querySelector("main");
        if (fresh && fresh.innerHTML !== main.innerHTML) { main.innerHTML = fresh.innerHTML; wire(main); }
      }).catch(function () {});
    }, wait);
  }

  var lastRevision = null;
  function live() {
    var flag = $("#live");
    if (!window.EventSource || !flag) { return; }
    var es = new EventSource("/api/v1/stream");
    // Close the stream when the page goes: otherwise the browser may keep it (and one of
    // its few connections to this server) open after the navigation.
    window.addEventListener("pagehide", function () { es.close(); });
    es.addEventListener("open", function () { flag.textContent = "live"; flag.className = "live on"; });
    es.addEventListener("error", function () { flag.textContent = "reconnecting"; flag.className = "live off"; });
    es.addEventListener("status", function (m) {
      var u;
      try { u = JSON.parse(m.data); } catch (err) { return; }
      (u.changed || []).forEach(applyNode);
      document.body.setAttribute("data-reconciles", String(u.reconciles || 0));
      var moved = (u.changed || []).length > 0 || (lastRevision !== null && u.revision !== lastRevision);
      lastRevision = u.revision;
      refreshMain(moved);
    });
    es.addEventListener("event", function (m) {
      var e;
      try { e = JSON.parse(m.data); } catch (err) { return; }
      applyEvent(e);
    });
    es.addEventListener("resync", function () { refreshMain(true); });
  }

  // Tree: filter nodes as the user types (the form still works without JS).
  function filters() {
    var form = $("form.filters");
    if (!form) { return; }
    function apply() {
      var kind = (form.elements.kind.value || "").toLowerCase();
      var status = (form.elements.status.value || "").toLowerCase();
      var name = (form.elements.name.value || "").toLowerCase();
      $all(".node").forEach(function (el) {
        var ok = (!kind || el.getAttribute("data-kind").toLowerCase() === kind) &&
          (!status || el.getAttribute("data-status").toLowerCase() === status) &&
          (!name || el.getAttribute("data-name").toLowerCase().indexOf(name) >= 0);
        el.classList.toggle("hidden", !ok);
      });
      drawEdges();
    }
    form.addEventListener("input", apply);
    form.addEventListener("change", apply);
  }

  // Tree: curves from each node to the nodes it depends on.
  function drawEdges() {
    var tree = $(".tree");
    var svg = tree && $("svg.edges", tree);
    if (!svg) { return; }
    while (svg.firstChild) { svg.removeChild(svg.firstChild); }
    var box = tree.getBoundingClientRect();
    svg.setAttribute("width", String(tree.scrollWidth));
    svg.setAttribute("height", String(tree.scrollHeight));
    $all(".node", tree).forEach(function (from) {
      if (from.classList.contains("hidden")) { return; }
      (from.getAttribute("data-deps") || "").split(" ").forEach(function (dep) {
        if (!dep) { return; }
        var to = nodesFor(decodeURIComponent(dep)).filter(function (el) { return el.closest(".tree") === tree; })[0];
        if (!to || to.classList.contains("hidden")) { return; }
        var a = to.getBoundingClientRect(), b = from.getBoundingClientRect();
        var x1 = a.right - box.left + tree.scrollLeft, y1 = a.top + a.height / 2 - box.top;
        var x2 = b.left - box.left + tree.scrollLeft, y2 = b.top + b.height / 2 - box.top;
        var mid = (x1 + x2) / 2;
        var p = document.createElementNS("http://www.w3.org/2000/svg", "path");
        p.setAttribute("d", "M" + x1 + "," + y1 + " C" + mid + "," + y1 + " " + mid + "," + y2 + " " + x2 + "," + y2);
        svg.appendChild(p);
      });
    });
  }

  // Actions: confirm, then POST with the CSRF token; the answer is shown in place.
  function actions(root) {
    $all("form[data-action]", root).forEach(function (form) {
      form.addEventListener("submit", function (ev) {
        ev.preventDefault();
        var what = form.getAttribute("data-confirm") || "Run this action?";
        if (!window.confirm(what)) { return; }
        holdUntil = Date.now() + 10000;
        var body = {};
        var target = form.elements.resource;
        if (target) { body.resource = target.value; }
        var out = $(".action-result", form.parentNode) || form;
        fetch(form.getAttribute("data-action"), {
          method: "POST",
          credentials: "same-origin",
          headers: { "Content-Type": "application/json", "X-CSRF-Token": csrf },
          body: JSON.stringify(body)
        }).then(function (r) {
          return r.json().catch(function () { return {}; }).then(function (j) {
            var msg = r.ok ? "accepted: " + ((j.event && j.event.message) || "") : "refused (" + r.status + "): " + (j.error || "");
            out.textContent = msg;
            out.className = "action-result notice" + (r.ok ? "" : " error");
          });
        }).catch(function () {
          out.textContent = "request failed";
          out.className = "action-result notice error";
        });
      });
    });
    $all("form.logout", root).forEach(function (form) {
      form.addEventListener("submit", function (ev) {
        ev.preventDefault();
        fetch("/api/v1/logout", { method: "POST", credentials: "same-origin", headers: { "X-CSRF-Token": csrf } })
          .then(function () { window.location.href = "/login"; });
      });
    });
  }

  // Console: a websocket to the workload's serial console. With xterm.js loaded, a
  // terminal shows it (keys go straight to the workload, the terminal fits its box);
  // else a plain text view. The line field sends a whole line either way. The server
  // closes long connections; the page attaches again unless the user detached.
  function plainView(screen) {
    var decoder = new TextDecoder();
    return {
      reset: function () { screen.textContent = ""; decoder = new TextDecoder(); },
      write: function (data) {
        screen.textContent += typeof data === "string" ? data : decoder.decode(data, { stream: true });
        if (screen.textContent.length > 200000) { screen.textContent = screen.textContent.slice(-150000); }
        screen.scrollTop = screen.scrollHeight;
      },
      onInput: function () {}
    };
  }

  function terminalView(box, screen) {
    var term = new window.Terminal({
      convertEol: true,
      cursorBlink: true,
      fontFamily: getComputedStyle(screen).fontFamily,
      fontSize: 14,
      scrollback: 5000,
      theme: { background: "#101418", foreground: "#d7dde4", cursor: "#d7dde4" }
    });
    box.classList.remove("hidden");
    screen.classList.add("hidden");
    term.open(box);
    // Fit the terminal to its box: the cell size is the rendered screen's over its grid.
    function fit() {
      var el = $(".xterm-screen", box);
      if (!el || !el.clientWidth || !el.clientHeight) { return; }
      var cw = el.clientWidth / term.cols, ch = el.clientHeight / term.rows;
      var cols = Math.max(20, Math.floor((box.clientWidth - 24) / cw));
      var rows = Math.max(5, Math.floor((box.clientHeight - 8) / ch));
      if (cols !== term.cols || rows !== term.rows) { term.resize(cols, rows); }
    }
    fit();
    window.addEventListener("resize", fit);
    box.setAttribute("data-ready", "true");
    return {
      reset: function () { term.reset(); },
      write: function (data) { term.write(data); },
      onInput: function (send) { term.onData(send); },
      focus: function () { term.focus(); }
    };
  }

  function consolePage() {
    var screen = $("#console-screen");
    if (!screen || !window.WebSocket) { return; }
    var box = $("#console-term");
    var form = $("form.console-input");
    var state = $("#console-state");
    var toggle = $("#console-detach");
    var replays = screen.getAttribute("data-replays") === "true";
    var view = box && window.Terminal ? terminalView(box, screen) : plainView(screen);
    var ws = null;
    var wanted = true;
    function send(data) { if (ws && ws.readyState === 1) { ws.send(data); } }
    view.onInput(send);
    function attach() {
      // A VM replays its recent output on every attach: start from a clean screen.
      if (replays) { view.reset(); }
      var proto = window.location.protocol === "https:" ? "wss://" : "ws://";
      ws = new WebSocket(proto + window.location.host + screen.getAttribute("data-ws"));
      ws.binaryType = "arraybuffer";
      ws.onopen = function () {
        state.textContent = "attached";
        toggle.textContent = "Detach";
        if (view.focus) { view.focus(); }
      };
      ws.onclose = function () {
        ws = null;
        state.textContent = "detached";
        toggle.textContent = "Attach";
        if (wanted) { setTimeout(function () { if (wanted && !ws) { attach(); } }, 1000); }
      };
      ws.onmessage = function (m) {
        view.write(typeof m.data === "string" ? m.data : new Uint8Array(m.data));
      };
    }
    window.addEventListener("pagehide", function () { wanted = false; if (ws) { ws.close(); } });
    toggle.addEventListener("click", function () {
      if (ws) { wanted = false; ws.close(); } else { wanted = true; attach(); }
    });
    form.addEventListener("submit", function (ev) {
      ev.preventDefault();
      var input = form.elements.line;
      send(input.value + "\n");
      input.value = "";
    });
    attach();
  }

  // Screen: noVNC's RFB client (an ES module of this server, imported on demand) on the
  // VM's VNC websocket; it draws into a canvas it puts in #screen.
  function screenPage() {
    var box = $("#screen");
    if (!box || !window.WebSocket) { return; }
    var state = $("#screen-state");
    var toggle = $("#screen-detach");
    var cad = $("#screen-cad");
    var proto = window.location.protocol === "https:" ? "wss://" : "ws://";
    var url = proto + window.location.host + box.getAttribute("data-ws");
    var RFB = null;
    var rfb = null;
    function connect() {
      rfb = new RFB(box, url, {});
      rfb.scaleViewport = true;
      rfb.focusOnClick = true;
      rfb.addEventListener("connect", function () {
        state.textContent = "connected";
        toggle.textContent = "Disconnect";
        box.setAttribute("data-connected", "true");
      });
      rfb.addEventListener("disconnect", function (e) {
        rfb = null;
        state.textContent = e.detail && e.detail.clean ? "disconnected" : "disconnected (the VM's screen is not reachable)";
        toggle.textContent = "Connect";
        box.setAttribute("data-connected", "false");
      });
      rfb.addEventListener("securityfailure", function (e) {
        state.textContent = "refused: " + ((e.detail && e.detail.reason) || "security failure");
      });
    }
    toggle.addEventListener("click", function () {
      if (rfb) { rfb.disconnect(); } else if (RFB) { connect(); }
    });
    cad.addEventListener("click", function () { if (rfb) { rfb.sendCtrlAltDel(); } });
    window.addEventListener("pagehide", function () { if (rfb) { rfb.disconnect(); } });
    import(box.getAttribute("data-rfb")).then(function (m) {
      RFB = m.default;
      connect();
    }).catch(function (err) {
      state.textContent = "noVNC failed to load: " + err;
    });
  }

  function wire(root) { actions(root); }

  document.addEventListener("DOMContentLoaded", function () {
    wire(document);
    filters();
    drawEdges();
    window.addEventListener("resize", drawEdges);
    consolePage();
    screenPage();
    live();
    // When the page became usable (read by the browser tests' timing).
    document.documentElement.setAttribute("data-ui-ready", String(Math.round(performance.now())));
  });
})();
