"use strict";
// Draws the report from the JSON embedded once in the page: a page of cards at a time (so 100,000 rows stay fast),
// filtered by score range and path, sorted by score, std, name or human score. The state lives in the URL's
// fragment (#min=5&max=8&sort=std&order=asc&q=cat&page=2), so a view can be bookmarked and tests can open it.
(function () {
  const data = JSON.parse(document.getElementById("report-data").textContent);
  const count = data.path.length;
  const pageSize = data.pageSize || 120;
  const byId = (id) => document.getElementById(id);
  const inputs = { min: byId("min"), max: byId("max"), q: byId("query"), sort: byId("sort"), order: byId("order") };
  const defaults = { min: "", max: "", q: "", sort: "score", order: "desc", page: 1 };
  let state = Object.assign({}, defaults);
  const orders = {};  // per sort key, the row indices in ascending order (computed once)

  function make(tag, className, text) {
    const node = document.createElement(tag);
    if (className) node.className = className;
    if (text !== undefined) node.textContent = text;
    return node;
  }

  function fixed(value, digits) { return value === null || value === undefined ? "n/a" : value.toFixed(digits); }

  function topLevel(i) {
    const probs = data.probs ? data.probs[i] : null;
    if (!probs) return null;
    let best = -1;
    probs.forEach((p, k) => { if (p !== null && (best < 0 || p > probs[best])) best = k; });
    return best < 0 ? null : best;
  }

  function sortKey(name) {
    if (name === "name") return (i) => data.path[i];
    if (name === "human") return (i) => data.human[i];
    return (i) => data[name][i];
  }

  function ascending(name) {
    if (!orders[name]) {
      const key = sortKey(name);
      const indices = Array.from({ length: count }, (_, i) => i);
      if (name === "name") {
        const collator = new Intl.Collator(undefined, { numeric: true });
        indices.sort((a, b) => collator.compare(key(a), key(b)) || a - b);
      } else {  // missing values (null) last in both directions, see visibleRows
        indices.sort((a, b) => (key(a) === null) - (key(b) === null) || key(a) - key(b) || a - b);
      }
      orders[name] = indices;
    }
    return orders[name];
  }

  function visibleRows() {
    const low = state.min === "" ? -Infinity : Number(state.min);
    const high = state.max === "" ? Infinity : Number(state.max);
    const query = state.q.toLowerCase();
    let rows = ascending(state.sort);
    if (state.order === "desc") {
      const key = sortKey(state.sort);
      const present = rows.filter((i) => key(i) !== null).reverse();
      rows = present.concat(rows.filter((i) => key(i) === null));
    }
    return rows.filter((i) => data.score[i] >= low && data.score[i] <= high &&
      (!query || (data.pathPrefix + data.path[i]).toLowerCase().includes(query)));
  }

  function bars(i) {
    const box = make("div", "bars");
    const top = topLevel(i);
    box.appendChild(make("div", null, "level probabilities"));
    data.levels.forEach((level, k) => {
      const p = data.probs[i][k];
      const row = make("div", k === top ? "bar top" : "bar");
      const fill = make("div", "fill");
      fill.style.width = ((p || 0) * 100).toFixed(1) + "%";
      const track = make("div", "track");
      track.appendChild(fill);
      row.append(make("span", "name", level), track, make("span", "value", fixed(p, 3)));
      box.appendChild(row);
    });
    return box;
  }

  function card(i, rank) {
    const figure = make("figure", "card");
    figure.dataset.index = i;
    figure.dataset.score = data.score[i];
    const frame = make("div", "frame");
    if (data.thumb[i]) {
      const image = make("img");
      image.loading = "lazy";
      image.decoding = "async";
      image.alt = data.pathPrefix + data.path[i];
      image.src = "thumbs/" + data.thumb[i] + ".jpg";
      frame.appendChild(image);
    } else {
      frame.appendChild(make("div", "placeholder", "no image file"));
    }
    figure.appendChild(frame);
    const caption = make("figcaption");
    caption.appendChild(make("span", "rank", "#" + rank));
    caption.appendChild(make("span", "score", fixed(data.score[i], 3) + " \u00b1 " + fixed(data.std[i], 3)));
    const top = topLevel(i);
    if (top !== null) caption.appendChild(make("span", "level", data.levels[top]));
    if (data.human && data.human[i] !== null) caption.appendChild(make("div", "human", "human score " + fixed(data.human[i], 3)));
    const path = make("div", "path");
    path.title = data.pathPrefix + data.path[i];
    if (data.link && data.link[i] !== null) {
      const link = make("a", null, data.path[i]);
      link.href = data.linkBase + data.link[i];
      link.addEventListener("click", (event) => event.stopPropagation());
      path.appendChild(link);
    } else {
      path.textContent = data.path[i];
    }
    caption.appendChild(path);
    if (data.description && data.description[i]) caption.appendChild(make("div", "description", data.description[i]));
    figure.appendChild(caption);
    if (data.probs && data.levels.length) figure.appendChild(bars(i));
    figure.addEventListener("click", () => figure.classList.toggle("open"));
    return figure;
  }

  function shadeHistogram() {
    const low = state.min === "" ? -Infinity : Number(state.min);
    const high = state.max === "" ? Infinity : Number(state.max);
    document.querySelectorAll("svg .bin").forEach((bin) => {
      const outside = Number(bin.dataset.hi) <= low || Number(bin.dataset.lo) > high;
      bin.classList.toggle("out", outside);
    });
  }

  function render() {
    const rows = visibleRows();
    const pages = Math.max(1, Math.ceil(rows.length / pageSize));
    state.page = Math.min(Math.max(1, Math.floor(Number(state.page)) || 1), pages);
    const first = (state.page - 1) * pageSize;
    const grid = byId("grid");
    const fragment = document.createDocumentFragment();
    rows.slice(first, first + pageSize).forEach((i, k) => fragment.appendChild(card(i, first + k + 1)));
    grid.replaceChildren(fragment);
    if (!rows.length) grid.appendChild(make("p", "empty", "No scored image matches these filters."));
    const filtered = rows.length < count ? " (" + count.toLocaleString() + " scored in all)" : "";
    const shown = rows.length ? (first + 1) + "\u2013" + (first + Math.min(pageSize, rows.length - first)) + " of " : "0 of ";
    document.querySelectorAll(".pager").forEach((pager) => {
      pager.querySelector(".counts").textContent = shown + rows.length.toLocaleString() + filtered + ", page " + state.page + " of " + pages;
      pager.querySelector("[data-step='-1']").disabled = state.page <= 1;
      pager.querySelector("[data-step='1']").disabled = state.page >= pages;
    });
    shadeHistogram();
  }

  function readFragment() {
    const params = new URLSearchParams(location.hash.replace(/^#/, ""));
    state = Object.assign({}, defaults);
    for (const name of Object.keys(defaults)) if (params.has(name)) state[name] = params.get(name);
    if (!inputs.sort.querySelector("option[value='" + state.sort + "']")) state.sort = defaults.sort;
    if (state.order !== "asc") state.order = "desc";
    for (const name of ["min", "max"]) if (state[name] !== "" && !isFinite(Number(state[name]))) state[name] = "";
    for (const name of Object.keys(inputs)) inputs[name].value = state[name];
  }

  function writeFragment() {
    const params = new URLSearchParams();
    for (const name of Object.keys(defaults)) if (String(state[name]) !== String(defaults[name])) params.set(name, state[name]);
    try { history.replaceState(null, "", "#" + params.toString()); } catch (error) { /* some file:// settings refuse */ }
  }

  function update(changes) {
    Object.assign(state, changes);
    writeFragment();
    render();
  }

  for (const name of ["min", "max", "q"]) inputs[name].addEventListener("input", () => update({ [name]: inputs[name].value, page: 1 }));
  inputs.sort.addEventListener("change", () => {
    inputs.order.value = inputs.sort.value === "name" ? "asc" : "desc";  // names read A to Z, numbers best first
    update({ sort: inputs.sort.value, order: inputs.order.value, page: 1 });
  });
  inputs.order.addEventListener("change", () => update({ order: inputs.order.value, page: 1 }));
  byId("reset").addEventListener("click", () => { location.hash = ""; readFragment(); update({}); });
  document.querySelectorAll(".pager button").forEach((button) => button.addEventListener("click", () => {
    update({ page: Number(state.page) + Number(button.dataset.step) });
    byId("controls").scrollIntoView();
  }));
  document.querySelectorAll("svg .bin").forEach((bin) => bin.addEventListener("click", () => {
    inputs.min.value = bin.dataset.lo;
    inputs.max.value = bin.dataset.hi;
    update({ min: bin.dataset.lo, max: bin.dataset.hi, page: 1 });
  }));
  window.addEventListener("hashchange", () => { readFragment(); render(); });

  const failures = data.failures || [];
  if (failures.length) {
    byId("failures").hidden = false;
    byId("failure-count").textContent = "(" + failures.length.toLocaleString() + ")";
    const body = byId("failures").querySelector("tbody");
    failures.forEach(([path, error]) => {
      const row = make("tr");
      row.append(make("td", null, path), make("td", null, error));
      body.appendChild(row);
    });
  }
  readFragment();
  render();
})();
