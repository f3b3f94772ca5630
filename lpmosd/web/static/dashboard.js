// lpmosd dashboard: live updates from /events (server-sent events).
// Served as a file so the Content-Security-Policy needs no 'unsafe-inline'. Everything that
// came from agents or users is put into the page with textContent, never as HTML.
(function () {
  "use strict";

  var body = document.body;
  var page = body.dataset.page;

  // Filters apply as soon as a select changes (the Filter button does it without JS).
  document.querySelectorAll("select[data-autosubmit]").forEach(function (sel) {
    sel.addEventListener("change", function () { sel.form.submit(); });
  });

  if (page !== "index" && page !== "task") {
    return;
  }

  // Which actions each status allows (lpmosd.lifecycle's state machine; the server decides).
  var ALLOWED = {
    pending: ["approve", "cancel", "enrolment"],
    approved: ["cancel", "enrolment"],
    installing: ["cancel", "enrolment"],
    failed: ["retry", "delete"],
    completed: ["delete"],
    cancelled: ["delete"]
  };
  var STATUSES = ["pending", "approved", "installing", "completed", "failed", "cancelled"];

  function el(tag, cls, text) {
    var node = document.createElement(tag);
    if (cls) { node.className = cls; }
    if (text !== undefined && text !== null) { node.textContent = String(text); }
    return node;
  }

  function setBadge(node, status) {
    node.className = node.className.replace(/\bstatus-[a-z]+\b/g, "").trim() + " status-" + status;
    node.textContent = status;
  }

  function setProgress(bar, text, percent) {
    bar.value = percent;
    // The attribute too: CSS colours a finished bar by [value="100"].
    bar.setAttribute("value", String(percent));
    bar.textContent = percent + "%";
    if (text) { text.textContent = percent + "%"; }
  }

  var live = document.getElementById("live");
  function setLive(cls, text) {
    if (!live) { return; }
    live.className = "live " + cls;
    live.textContent = text;
  }

  var url = "/events?since=" + encodeURIComponent(body.dataset.since || "");
  if (body.dataset.machine) {
    url += "&machine=" + encodeURIComponent(body.dataset.machine);
  }
  // The tasks table is paged: the server sends the changes of this page's rows only.
  if (body.dataset.from) { url += "&from=" + encodeURIComponent(body.dataset.from); }
  if (body.dataset.to) { url += "&to=" + encodeURIComponent(body.dataset.to); }
  var source = new EventSource(url);
  // The first thing every stream says: whether the server itself follows etcd right now.
  source.addEventListener("hello", function (ev) {
    if (JSON.parse(ev.data).live) {
      setLive("live-on", "live");
    } else {
      setLive("live-off", "etcd unreachable");
    }
  });
  source.addEventListener("error", function () {
    if (source.readyState === EventSource.CLOSED) {
      setLive("live-off", "disconnected — reload");
    } else {
      setLive("live-wait", "reconnecting…");
    }
  });
  // The server cannot resume us (we were too far behind, or it has a new snapshot).
  source.addEventListener("reset", function () {
    source.close();
    window.location.reload();
  });

  function data(ev) { return JSON.parse(ev.data); }

  // ------------------------------------------------------------------ tasks table
  function indexPage() {
    var table = document.getElementById("tasks");
    var tbody = table.tBodies[0];
    var filterIdc = table.dataset.idc || "";
    var filterStatus = table.dataset.status || "";
    var taskUrl = table.dataset.taskUrl || "/tasks/";
    var empty = document.getElementById("empty");

    function rowOf(key) {
      var rows = tbody.rows;
      for (var i = 0; i < rows.length; i++) {
        if (rows[i].dataset.key === key) { return rows[i]; }
      }
      return null;
    }

    function field(row, name) { return row.querySelector("[data-field='" + name + "']"); }

    function newRow(s) {
      var tr = el("tr");
      tr.dataset.key = s.key;
      tr.appendChild(el("td", "", s.idc));
      var snCell = el("td");
      var link = el("a", "", s.sn);
      link.href = taskUrl + encodeURIComponent(s.idc) + "/" + encodeURIComponent(s.sn);
      snCell.appendChild(link);
      var agent = el("span", "agent", "●");
      agent.dataset.field = "agent";
      agent.title = "agent online";
      snCell.appendChild(agent);
      tr.appendChild(snCell);
      tr.appendChild(el("td", "mono", s.mac));
      tr.appendChild(el("td", "", s.os));
      var statusCell = el("td");
      var badge = el("span", "badge");
      badge.dataset.field = "status";
      statusCell.appendChild(badge);
      tr.appendChild(statusCell);
      var step = el("td");
      step.dataset.field = "step";
      tr.appendChild(step);
      var progCell = el("td", "progress-cell");
      var bar = el("progress");
      bar.max = 100;
      bar.dataset.field = "percent";
      var pct = el("span", "pct");
      pct.dataset.field = "percent-text";
      progCell.appendChild(bar);
      progCell.appendChild(pct);
      tr.appendChild(progCell);
      var timeCell = el("td");
      var time = el("time");
      time.dataset.field = "updated_at";
      timeCell.appendChild(time);
      tr.appendChild(timeCell);
      // Keep the server's order (by IDC, then SN).
      var before = null;
      for (var i = 0; i < tbody.rows.length; i++) {
        if (tbody.rows[i].dataset.key > s.key) { before = tbody.rows[i]; break; }
      }
      tbody.insertBefore(tr, before);
      return tr;
    }

    function fill(tr, s) {
      tr.dataset.status = s.status;
      setBadge(field(tr, "status"), s.status);
      field(tr, "step").textContent = s.step;
      setProgress(field(tr, "percent"), field(tr, "percent-text"), s.percent);
      var time = field(tr, "updated_at");
      time.textContent = s.updated_at;
      time.setAttribute("datetime", s.updated_at);
      setRowAgent(tr, !!s.agent, !!s.unreachable);
      tr.classList.remove("flash");
      void tr.offsetWidth; // restart the highlight animation
      tr.classList.add("flash");
    }

    function setRowAgent(tr, online, unreachable) {
      var node = field(tr, "agent");
      node.classList.toggle("agent-on", online);
      node.classList.toggle("agent-unreachable", unreachable && !online);
      node.title = online ? "agent online" : (unreachable ? "agent unreachable" : "agent offline");
    }

    function updateCounts(counts) {
      var totals = {};
      var all = 0;
      STATUSES.forEach(function (s) { totals[s] = 0; });
      Object.keys(counts).forEach(function (idc) {
        if (filterIdc && idc !== filterIdc) { return; }
        STATUSES.forEach(function (s) {
          totals[s] += counts[idc][s] || 0;
          all += counts[idc][s] || 0;
        });
      });
      STATUSES.forEach(function (s) {
        var node = document.querySelector("[data-count='" + s + "']");
        if (node) { node.textContent = totals[s]; }
      });
      var total = document.querySelector("[data-count='total']");
      if (total) { total.textContent = all; }
      // "101–200 of 20,000": the matching tasks move with the counts.
      var matching = filterStatus ? totals[filterStatus] || 0 : all;
      document.querySelectorAll(".pager").forEach(function (nav) {
        var range = nav.querySelector("[data-field='range']");
        var offset = parseInt(nav.dataset.offset || "0", 10);
        var rows = tbody.rows.length;
        range.textContent = rows ? (offset + 1).toLocaleString("en-US") + "–" +
          (offset + rows).toLocaleString("en-US") + " of " + matching.toLocaleString("en-US") : "";
      });
    }

    function syncEmpty() { empty.hidden = tbody.rows.length > 0; }

    source.addEventListener("task", function (ev) {
      var d = data(ev);
      var s = d.summary;
      var row = rowOf(d.key);
      var wanted = (!filterIdc || s.idc === filterIdc) && (!filterStatus || s.status === filterStatus);
      if (wanted) {
        fill(row || newRow(s), s);
      } else if (row) {
        row.remove();
      }
      if (d.counts) { updateCounts(d.counts); }
      syncEmpty();
    });
    source.addEventListener("deleted", function (ev) {
      var d = data(ev);
      var row = rowOf(d.key);
      if (row) { row.remove(); }
      if (d.counts) { updateCounts(d.counts); }
      syncEmpty();
    });
    // Counts of every page (at most one a second): changes on other pages move them too.
    source.addEventListener("counts", function (ev) { updateCounts(data(ev).counts); });
    source.addEventListener("agent", function (ev) {
      var d = data(ev);
      var row = rowOf(d.key);
      if (row) { setRowAgent(row, !!d.online, !!d.unreachable); }
    });
  }

  // ------------------------------------------------------------------ task page
  function taskPage() {
    var logs = document.getElementById("logs");
    var logEnd = parseInt(logs.dataset.end || "0", 10);
    var MAX_LINES = 500;

    function scrollLogsDown() { logs.scrollTop = logs.scrollHeight; }
    scrollLogsDown();

    function setAgent(online, unreachable) {
      var node = document.getElementById("agent");
      node.classList.toggle("agent-on", online);
      node.classList.toggle("agent-unreachable", !!unreachable && !online);
      node.textContent = online ? "agent online" : (unreachable ? "agent unreachable" : "agent offline");
    }

    function showActions(status) {
      var allowed = ALLOWED[status] || [];
      document.querySelectorAll("form[data-action]").forEach(function (form) {
        form.hidden = allowed.indexOf(form.dataset.action) < 0;
      });
    }

    function renderSteps(progress) {
      var list = document.getElementById("steps");
      progress.forEach(function (p) {
        var li = null;
        for (var i = 0; i < list.children.length; i++) {
          if (list.children[i].dataset.step === p.step) { li = list.children[i]; break; }
        }
        if (!li) {
          li = el("li");
          li.dataset.step = p.step;
          li.appendChild(el("span", "step-name", p.step));
          var bar = el("progress");
          bar.max = 100;
          li.appendChild(bar);
          li.appendChild(el("span", "pct"));
          li.appendChild(el("span", "msg"));
          list.appendChild(li);
        }
        setProgress(li.querySelector("progress"), li.querySelector(".pct"), p.percent);
        li.querySelector(".msg").textContent = p.message;
      });
      document.getElementById("no-steps").hidden = progress.length > 0;
    }

    function renderHistory(history) {
      var list = document.getElementById("history");
      while (list.firstChild) { list.removeChild(list.firstChild); }
      history.forEach(function (c) {
        var li = el("li");
        var badge = el("span", "badge");
        setBadge(badge, c.status);
        li.appendChild(badge);
        li.appendChild(document.createTextNode(" "));
        li.appendChild(el("time", "", c.timestamp));
        if (c.actor) {
          li.appendChild(document.createTextNode(" "));
          li.appendChild(el("span", "actor", "by " + c.actor));
        }
        if (c.reason) {
          li.appendChild(document.createTextNode(" "));
          li.appendChild(el("span", "reason", c.reason));
        }
        list.appendChild(li);
      });
    }

    function renderApproval(a) {
      var box = document.getElementById("approval");
      box.hidden = !a;
      document.getElementById("no-approval").hidden = !!a;
      if (!a) { return; }
      box.querySelector("[data-field='approved_by']").textContent = a.approved_by;
      box.querySelector("[data-field='approved_at']").textContent = a.approved_at;
      box.querySelector("[data-field='notes']").textContent = a.notes;
    }

    function appendLogs(delta) {
      var atBottom = logs.scrollHeight - logs.scrollTop - logs.clientHeight < 40;
      if (delta.replace) {
        while (logs.firstChild) { logs.removeChild(logs.firstChild); }
        logEnd = delta.start;
      }
      delta.lines.forEach(function (line, i) {
        var index = delta.start + i;
        if (index < logEnd) { return; } // already shown (a replayed event)
        logs.appendChild(el("div", delta.replace ? "log-line" : "log-line new", line));
        logEnd = index + 1;
      });
      while (logs.children.length > MAX_LINES) { logs.removeChild(logs.firstChild); }
      var dropped = logEnd - logs.children.length;
      var note = document.getElementById("logs-dropped");
      note.hidden = dropped <= 0;
      note.querySelector("[data-field='dropped']").textContent = dropped;
      if (atBottom || delta.replace) { scrollLogsDown(); }
    }

    function renderMeta(m) {
      var box = document.getElementById("hardware");
      while (box.firstChild) { box.removeChild(box.firstChild); }
      if (!m) {
        box.appendChild(el("p", "muted", "The agent has not reported yet."));
        return;
      }
      var dl = el("dl", "facts");
      function fact(name, value, cls) {
        dl.appendChild(el("dt", "", name));
        dl.appendChild(el("dd", cls || "", value));
      }
      var dmi = m.dmi || {};
      fact("CPU", m.cpu_model + " (" + m.cpu_cores + " cores)");
      fact("Memory", bytes(m.memory_bytes));
      fact("Vendor", (dmi.vendor || "—") + " " + (dmi.product || ""));
      fact("Serial", dmi.serial || "—", "mono");
      fact("Reported", m.reported_at);
      box.appendChild(dl);
      box.appendChild(table(["Disk", "Size", "Model", "Type"], m.disks.map(function (d) {
        return [d.name, bytes(d.size_bytes), d.model, d.rotational ? "HDD" : "SSD"];
      })));
      box.appendChild(table(["NIC", "MAC", "Speed"], m.nics.map(function (n) {
        return [n.name, n.mac, n.speed_mbps ? n.speed_mbps + " Mb/s" : "—"];
      })));
    }

    function table(heads, rows) {
      var t = el("table", "small");
      var tr = el("tr");
      heads.forEach(function (h) { tr.appendChild(el("th", "", h)); });
      t.appendChild(el("thead")).appendChild(tr);
      var tb = el("tbody");
      rows.forEach(function (r) {
        var row = el("tr");
        r.forEach(function (c) { row.appendChild(el("td", "", c)); });
        tb.appendChild(row);
      });
      t.appendChild(tb);
      return t;
    }

    function bytes(n) {
      var units = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
      var v = n;
      for (var i = 0; i < units.length; i++) {
        if (v < 1024 || i === units.length - 1) {
          return i === 0 ? v.toFixed(0) + " B" : v.toFixed(1) + " " + units[i];
        }
        v /= 1024;
      }
      return String(n);
    }

    source.addEventListener("task", function (ev) {
      var d = data(ev);
      var s = d.summary;
      var t = d.detail;
      setBadge(document.getElementById("status"), s.status);
      setAgent(!!s.agent, !!s.unreachable);
      var err = document.getElementById("task-error");
      err.hidden = !(t.error && s.status === "failed");
      err.querySelector("[data-field='error']").textContent = t.error || "";
      document.getElementById("updated-at").textContent = t.updated_at;
      document.getElementById("resume-from").textContent = t.resume_from || "—";
      document.getElementById("first-boot-at").textContent =
        t.first_boot_at || (s.status === "completed" ? "not yet (installed, never booted)" : "—");
      document.getElementById("netboot").textContent = t.netboot
        ? "on: PXE boots the installer"
        : "off: PXE boots the disk";
      document.getElementById("deleted").hidden = true;
      showActions(s.status);
      renderApproval(t.approval);
      renderSteps(t.progress);
      renderHistory(t.history);
      appendLogs(d.logs);
    });
    source.addEventListener("deleted", function () {
      document.getElementById("deleted").hidden = false;
      showActions("deleted");
      setAgent(false);
    });
    source.addEventListener("meta", function (ev) { renderMeta(data(ev).meta); });
    source.addEventListener("agent", function (ev) {
      var d = data(ev);
      setAgent(!!d.online, !!d.unreachable);
    });
  }

  if (page === "index") {
    indexPage();
  } else {
    taskPage();
  }
}());
