// Quotopia's dashboard: prices and the system map, pushed by Core.
//
// On load: every symbol's last ten minutes fill the charts, from the history
// database (GET quotes/SYMBOL/history, page after page) when Core has one, and
// from the quotes Core holds itself (GET quotes/SYMBOL/recent), which also cover
// whatever the database does not have yet, or everything when history answers
// 503; then one event stream (GET quotes/stream) brings every quote and every
// change of the feed's state, resumed after the last event the page holds, so
// nothing is missed or shown twice. The map's boxes come from GET system, asked
// every two seconds; the feed's state comes with the stream, at once.
//
// The page reconnects by itself, with exponential backoff and jitter, and says
// so. No library but uPlot (vendored beside Core's other static files).
"use strict";

(() => {
  const WINDOW_SECONDS = 600; // the charts' span: Core holds 600 quotes a symbol
  const SYSTEM_EVERY_MS = 2000;
  const BACKOFF_FIRST_MS = 1000;
  const BACKOFF_CAP_MS = 30000;
  const HISTORY_PAGE = 1000; // the most Core gives per page
  const HISTORY_PAGES = 20; // a bound: 20,000 quotes a chart at most

  const priceFormat = new Intl.NumberFormat("en-US", {
    minimumFractionDigits: 2,
    maximumFractionDigits: 2,
  });
  const percentFormat = new Intl.NumberFormat("en-US", {
    minimumFractionDigits: 3,
    maximumFractionDigits: 3,
    signDisplay: "always",
  });

  const cards = new Map(); // symbol -> {element, times, prices, plot, first, lastTime}
  const page = {
    lastEventId: null,
    stream: null,
    backoff: BACKOFF_FIRST_MS,
    retryTimer: null,
    countdownTimer: null,
    feed: null, // the feed's state, from the stream
    lastQuoteAt: null, // when the page last received a quote (performance.now())
    system: null, // the last GET system answer
    coreReachable: null, // null: not known yet
  };

  const $ = (selector, root = document) => root.querySelector(selector);

  function setText(element, text) {
    if (element.textContent !== text) element.textContent = text;
  }

  function direction(value) {
    if (value > 0) return "up";
    if (value < 0) return "down";
    return "flat";
  }

  function arrow(value) {
    return value > 0 ? "▲ " : value < 0 ? "▼ " : "";
  }

  // --- connection state ----------------------------------------------------------

  function showConnection(state, text) {
    const badge = $("#connection");
    badge.dataset.state = state;
    setText(badge, text);
    $("#reconnect").hidden = state !== "down";
  }

  // --- price cards -------------------------------------------------------------------

  function card(symbol) {
    let entry = cards.get(symbol);
    if (entry) return entry;
    const element = $("#symbol-card").content.firstElementChild.cloneNode(true);
    const titleId = `symbol-${symbol}`;
    element.setAttribute("aria-labelledby", titleId);
    const title = $(".symbol", element);
    title.id = titleId;
    title.textContent = symbol;
    $(".plot", element).setAttribute("aria-label", `${symbol} price over the last 10 minutes`);
    insertSorted($("#symbols"), element, symbol);
    entry = { element, times: [], prices: [], plot: null, first: null, lastTime: null };
    cards.set(symbol, entry);
    return entry;
  }

  function insertSorted(container, element, symbol) {
    element.dataset.symbol = symbol;
    const after = [...container.children].find((child) => child.dataset.symbol > symbol);
    container.insertBefore(element, after || null);
  }

  function makePlot(entry) {
    const holder = $(".plot", entry.element);
    const width = Math.max(200, holder.clientWidth);
    const options = {
      width,
      height: 140,
      legend: { show: false },
      cursor: { show: false },
      scales: { x: { time: true } },
      axes: [
        { stroke: "#4f5b66", grid: { stroke: "#e1e6eb" }, ticks: { stroke: "#c9d1d9" } },
        {
          stroke: "#4f5b66",
          grid: { stroke: "#e1e6eb" },
          ticks: { stroke: "#c9d1d9" },
          size: 86,
          values: (_, ticks) => ticks.map((value) => priceFormat.format(value)),
        },
      ],
      series: [{}, { stroke: "#0b6bcb", width: 2, points: { show: false } }],
    };
    entry.plot = new uPlot(options, [entry.times, entry.prices], holder);
    new ResizeObserver(() => {
      const next = Math.max(200, holder.clientWidth);
      if (next !== entry.plot.width) entry.plot.setSize({ width: next, height: 140 });
    }).observe(holder);
  }

  // Add a quote to its card; ``live`` is false for history (no change since opened).
  function addQuote(quote, live) {
    const entry = card(quote.symbol);
    const seconds = quote.time ? Date.parse(quote.time) / 1000 : Date.now() / 1000;
    if (entry.lastTime !== null && seconds <= entry.lastTime) return; // already shown
    entry.lastTime = seconds;
    entry.times.push(seconds);
    entry.prices.push(quote.price);
    const oldest = seconds - WINDOW_SECONDS;
    while (entry.times.length && entry.times[0] < oldest) {
      entry.times.shift();
      entry.prices.shift();
    }
    if (live && entry.first === null) entry.first = quote.price;
    // The oldest time on the chart, for whoever looks at the page's state.
    entry.element.dataset.since = new Date(Math.round(entry.times[0] * 1000)).toISOString();
    render(entry, quote);
  }

  function render(entry, quote) {
    const price = $(".price data", entry.element);
    price.value = String(quote.price);
    setText(price, priceFormat.format(quote.price));
    const tick = $(".tick", entry.element);
    tick.dataset.direction = direction(quote.change_percent);
    setText(tick, `${arrow(quote.change_percent)}${percentFormat.format(quote.change_percent)}%`);
    const session = $(".session", entry.element);
    if (entry.first !== null) {
      const change = ((quote.price - entry.first) / entry.first) * 100;
      session.dataset.direction = direction(change);
      setText(session, `${arrow(change)}${percentFormat.format(change)}%`);
    }
    if (entry.plot === null) {
      if (typeof uPlot === "function") makePlot(entry);
    } else {
      entry.plot.setData([entry.times, entry.prices]);
    }
  }

  // --- the system map ------------------------------------------------------------------

  function mapItem(kind, key) {
    const map = $("#map");
    let item = map.querySelector(`[data-key="${key}"]`);
    if (!item) {
      item = document.createElement("li");
      item.className = kind;
      item.dataset.key = key;
      map.append(item);
    }
    return item;
  }

  function details(pairs) {
    const list = document.createElement("dl");
    for (const [term, value] of pairs) {
      const dt = document.createElement("dt");
      dt.textContent = term;
      const dd = document.createElement("dd");
      dd.textContent = value;
      list.append(dt, dd);
    }
    return list;
  }

  function sameContent(item, html) {
    if (item.dataset.rendered === html) return true;
    item.dataset.rendered = html;
    return false;
  }

  // FT's ticks per second, from the times FT gave its last quotes (history
  // included, so it is known from the start): any symbol moves every tick.
  function tickRate() {
    let best = null;
    for (const entry of cards.values()) {
      const times = entry.times;
      if (times.length < 2) continue;
      const last = times[times.length - 1];
      let first = times.length - 1;
      while (first > 0 && last - times[first - 1] <= 10) first -= 1;
      const span = last - times[first];
      if (span > 0) {
        const rate = (times.length - 1 - first) / span;
        best = best === null ? rate : Math.max(best, rate);
      }
    }
    return best;
  }

  function age(seconds) {
    if (seconds === null || seconds === undefined) return "–";
    return seconds < 60 ? `${seconds.toFixed(1)} s` : `${Math.floor(seconds / 60)} min`;
  }

  // The state of every box and link, from the last system answer, corrected by
  // what the stream said since (it is faster: a feed loss shows at once).
  function drawMap() {
    const system = page.system;
    if (!system) return;
    const reachable = page.coreReachable !== false;
    const feedUp = page.feed ? page.feed.connected : null;
    const quoteAge =
      page.lastQuoteAt === null ? null : (performance.now() - page.lastQuoteAt) / 1000;
    const nodes = new Map(system.nodes.map((node) => [node.id, node]));
    // Core's feed: from FT's stream, or from Kafka when Core reads the topic.
    const feedLink = system.links.find((link) => link.to === "core");
    const feedFrom = feedLink ? feedLink.from : null;
    const order = [];
    // Follow the links from the first node, so that the map reads left to right.
    const targets = new Set(system.links.map((link) => link.to));
    let current = system.nodes.find((node) => !targets.has(node.id)) || system.nodes[0];
    const seen = new Set();
    while (current && !seen.has(current.id)) {
      seen.add(current.id);
      order.push({ node: current });
      const link = system.links.find((each) => each.from === current.id);
      if (!link) break;
      order.push({ link });
      current = nodes.get(link.to);
    }
    const keys = new Set();
    for (const entry of order) {
      if (entry.node) {
        const node = entry.node;
        let up = reachable ? node.up : null;
        // Fed by FT's stream, Core knows FT's state first hand, as soon as it changes.
        if (node.id === "ft" && feedFrom === "ft" && reachable && feedUp !== null) up = feedUp;
        const pairs = [];
        if (node.id === "ft") {
          const rate = up ? tickRate() : null;
          // Fed from Kafka, Core never talks to FT, so it knows no address of FT's.
          if (node.address) pairs.push(["Address", node.address]);
          pairs.push(["Tick rate", rate === null ? "–" : `${rate.toFixed(1)} /s`]);
        } else if (node.id === "kafka") {
          pairs.push(["Address", node.address || "–"]);
        } else if (node.id === "core") {
          pairs.push(["Requests", `${(node.requests_per_second ?? 0).toFixed(1)} /s`]);
          pairs.push(["Symbols", String(node.symbols ?? "–")]);
        } else if (node.push_connections) {
          const push = node.push_connections;
          pairs.push(["Event streams", String(push.sse ?? 0)]);
          pairs.push(["WebSockets", String(push.ws ?? 0)]);
        }
        drawBox(mapItem("node", node.id), node.name, node.role, up, pairs);
        keys.add(node.id);
      } else {
        const link = entry.link;
        const key = `${link.from}->${link.to}`;
        let up = reachable ? link.up : null;
        const pairs = [];
        if (link === feedLink) {
          if (reachable && feedUp !== null) up = feedUp;
          const reconnects = page.feed ? page.feed.reconnects : link.reconnects;
          pairs.push(["Last quote", age(quoteAge ?? link.last_quote_age_seconds)]);
          pairs.push(["Reconnects", String(reconnects ?? 0)]);
        } else if (link.push_connections !== undefined && link.push_connections !== null) {
          pairs.push(["Push clients", String(link.push_connections)]);
        }
        let words = up ? "open" : "down";
        if (link === feedLink) words = up ? "connected" : "retrying";
        else if (link.from === "ft") words = up ? "publishing" : "silent";
        if (up === null) words = "unknown";
        drawLink(mapItem("link", key), link.kind, up, words, pairs);
        keys.add(key);
      }
    }
    for (const item of [...$("#map").children]) {
      if (!keys.has(item.dataset.key)) item.remove();
    }
  }

  function drawBox(item, name, role, up, pairs) {
    const state = up === null ? "unknown" : up ? "up" : "down";
    const words = up === null ? "unknown" : up ? "up" : "down";
    item.dataset.state = state;
    item.setAttribute("aria-label", `${name}: ${words}`);
    const html = JSON.stringify([name, role, words, pairs]);
    if (sameContent(item, html)) return;
    const title = document.createElement("h3");
    const label = document.createElement("span");
    label.textContent = name;
    const badge = document.createElement("span");
    badge.className = "state";
    badge.textContent = words;
    title.append(label, badge);
    const roleLine = document.createElement("p");
    roleLine.className = "role";
    roleLine.textContent = role;
    item.replaceChildren(title, roleLine, details(pairs));
  }

  function drawLink(item, kind, up, words, pairs) {
    item.dataset.state = up === null ? "unknown" : up ? "up" : "down";
    item.setAttribute("aria-label", `${kind}: ${words}`);
    const html = JSON.stringify([kind, words, pairs]);
    if (sameContent(item, html)) return;
    const name = document.createElement("span");
    name.textContent = kind;
    const line = document.createElement("span");
    line.className = "arrow";
    line.setAttribute("aria-hidden", "true");
    const state = document.createElement("span");
    state.className = "state";
    state.textContent = words;
    const extras = pairs.map(([term, value]) => {
      const extra = document.createElement("span");
      extra.className = "extra";
      extra.textContent = `${term}: ${value}`;
      return extra;
    });
    item.replaceChildren(name, line, state, ...extras);
  }

  async function pollSystem() {
    try {
      const response = await fetch("system", { cache: "no-store" });
      if (!response.ok) throw new Error(`GET system: ${response.status}`);
      page.system = await response.json();
      page.coreReachable = true;
    } catch {
      page.coreReachable = false;
    }
    drawMap();
  }

  // --- the event stream --------------------------------------------------------------

  function onFeed(feed) {
    page.feed = feed;
    if (!feed.connected) page.lastQuoteAt = performance.now() - 1000 * (feed.last_update_age_seconds || 0);
    drawMap();
  }

  function connect() {
    clearTimeout(page.retryTimer);
    clearInterval(page.countdownTimer);
    if (page.stream) page.stream.close();
    const query = page.lastEventId ? `?last_event_id=${encodeURIComponent(page.lastEventId)}` : "";
    const stream = new EventSource(`quotes/stream${query}`);
    page.stream = stream;
    showConnection("connecting", "Connecting to Core…");
    stream.addEventListener("open", () => {
      page.backoff = BACKOFF_FIRST_MS;
      page.coreReachable = true;
      showConnection("live", "Live");
    });
    stream.addEventListener("snapshot", (event) => {
      page.lastEventId = event.lastEventId || page.lastEventId;
      for (const quote of JSON.parse(event.data).quotes) addQuote(quote, true);
    });
    stream.addEventListener("quote", (event) => {
      page.lastEventId = event.lastEventId;
      const quote = JSON.parse(event.data);
      page.lastQuoteAt = performance.now();
      addQuote(quote, true);
    });
    stream.addEventListener("feed", (event) => onFeed(JSON.parse(event.data)));
    stream.addEventListener("reset", () => {
      // Core no longer holds what came after our last event: the snapshot that
      // follows starts us afresh (the charts keep what they have).
      page.lastEventId = null;
    });
    stream.addEventListener("error", () => {
      // The browser would retry on its own at a fixed pace; we back off instead.
      stream.close();
      page.coreReachable = false;
      drawMap();
      scheduleReconnect();
    });
  }

  function scheduleReconnect() {
    const delay = page.backoff * (0.8 + 0.4 * Math.random());
    page.backoff = Math.min(page.backoff * 2, BACKOFF_CAP_MS);
    const due = performance.now() + delay;
    const tell = () => {
      const left = Math.max(0, Math.ceil((due - performance.now()) / 1000));
      showConnection("down", `Core unreachable · retrying in ${left} s`);
    };
    tell();
    page.countdownTimer = setInterval(tell, 250);
    page.retryTimer = setTimeout(connect, delay);
  }

  // The stored quotes of ``symbol`` since ``since`` (a Date), oldest first, from
  // Core's history database; null when Core has none to give (a 503: no database,
  // or none reachable), and the page then does with what Core holds.
  async function storedQuotes(symbol, since) {
    const quotes = [];
    let cursor = null;
    for (let pages = 0; pages < HISTORY_PAGES; pages += 1) {
      const query = new URLSearchParams({
        from: since.toISOString(),
        order: "asc",
        limit: String(HISTORY_PAGE),
      });
      if (cursor) query.set("cursor", cursor);
      const response = await fetch(`quotes/${encodeURIComponent(symbol)}/history?${query}`, {
        cache: "no-store",
      });
      if (!response.ok) return pages === 0 ? null : quotes;
      const body = await response.json();
      quotes.push(...body.quotes);
      cursor = body.next_cursor;
      if (!cursor) break;
    }
    return quotes;
  }

  async function loadHistory() {
    // What the charts start from. Without it (Core restarting, say) they start empty.
    try {
      const prices = await (await fetch("quotes", { cache: "no-store" })).json();
      let resumeAfter = null;
      let historyWorks = true; // until it answers 503: then not asked again
      for (const symbol of Object.keys(prices).sort()) {
        const response = await fetch(`quotes/${encodeURIComponent(symbol)}/recent`, { cache: "no-store" });
        if (!response.ok) continue;
        const recent = await response.json();
        resumeAfter = resumeAfter || recent.last_event_id; // the earliest: miss nothing
        if (historyWorks) {
          const since = new Date(Date.now() - WINDOW_SECONDS * 1000);
          const stored = await storedQuotes(symbol, since);
          if (stored === null) historyWorks = false;
          // Oldest first; addQuote skips what is not newer than the chart's last point,
          // so Core's own quotes add only those the database does not have yet.
          for (const quote of stored || []) addQuote(quote, false);
        }
        for (const quote of recent.quotes) addQuote(quote, false);
      }
      page.lastEventId = resumeAfter;
    } catch {
      page.lastEventId = null;
    }
  }

  async function start() {
    $("#reconnect").addEventListener("click", () => {
      page.backoff = BACKOFF_FIRST_MS;
      connect();
    });
    await loadHistory();
    connect();
    await pollSystem();
    setInterval(pollSystem, SYSTEM_EVERY_MS);
    setInterval(drawMap, 250); // ages and rates move between answers
  }

  start();
})();
