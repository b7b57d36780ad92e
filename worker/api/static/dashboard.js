// Live progress: poll the page's JSON endpoint every data-poll-ms and update the counts.
// No library, no other host: the page works offline.
(function () {
  "use strict";
  const pollMs = Number(document.body.dataset.pollMs || 1500);
  const table = document.querySelector("table.jobs[data-poll]");
  const job = document.querySelector("section.job[data-poll]");

  function show(row, data) {
    const bar = row.querySelector("progress");
    if (bar) { bar.max = data.total || 1; bar.value = data.done; }
    const done = row.querySelector(".done");
    if (done) { done.textContent = data.done + "/" + data.total; }
    for (const name of ["failed", "succeeded", "cancelled", "total"]) {
      const cell = row.querySelector("." + name);
      if (cell) { cell.textContent = data[name]; }
    }
    const status = row.querySelector(".status");
    if (status) { status.textContent = data.status; status.className = "status status-" + data.status; }
  }

  async function poll(url, apply) {
    try {
      const response = await fetch(url, { credentials: "same-origin", cache: "no-store" });
      if (response.ok) { apply(await response.json()); }
    } catch (error) {
      // The API is away for a moment: the next poll tries again.
    }
    setTimeout(() => poll(url, apply), pollMs);
  }

  if (table) {
    poll(table.dataset.poll, (body) => {
      for (const data of body.data) {
        const row = table.querySelector('tr[data-job="' + data.id + '"]');
        if (row) { show(row, data); }
      }
    });
  }
  if (job) {
    poll(job.dataset.poll, (data) => show(job, data));
  }
})();
