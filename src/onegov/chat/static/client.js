// The browser side of the chat protocol, shared by customer.js and
// staff.js: the connection with its reconnects, the messages not yet
// acknowledged, and the list of a chat's messages.
//
// Chat text only ever reaches the page as textContent: never innerHTML.

// The close codes after which to reconnect (protocol.Close.RETRY).
export const RETRY = new Set([1001, 1006, 1011, 1012, 1013, 4002]);

// Consecutive attempts without a hello after which to give up (about
// seven minutes with the back-off below).
const GIVE_UP = 30;

// What to tell the reader when the server closed for good.
const STOPPED = new Map([
  [1000, 'The connection was closed.'],
  [1003, 'The server refused what this page sent. Reload the page.'],
  [1007, 'The server refused what this page sent. Reload the page.'],
  [1009, 'A message was too large for the server. Reload the page.'],
  [4000, 'Your session has ended.'],
  [4001, 'This chat has ended.'],
  [4003, 'This chat is open in too many windows. Close some of them ' +
    'and reload this page.'],
]);

// Back-off between reconnects: doubling from BASE up to CAP, of which a
// random half is added (jitter), so that many clients that lost the
// same server do not all come back in the same instant.
const BASE = 500;
const CAP = 15000;

// A connection that went silent (a laptop woke up, a network changed)
// may take minutes to close by itself: ask for a pong now and then, and
// give the connection up if none comes.
const HEARTBEAT = 25000;
const PONG_WAIT = 10000;

// How long to wait for a token before trying again.
const TOKEN_TIMEOUT = 10000;

export function backoff(attempt) {
  const ceiling = Math.min(CAP, BASE * 2 ** Math.min(attempt, 16));
  return Math.round(ceiling / 2 + Math.random() * ceiling / 2);
}

// A client message id: 32 random hex digits, as protocol.CLIENT_ID
// wants. crypto.getRandomValues works on plain http:// pages too, where
// crypto.randomUUID is missing.
export function newClientId() {
  const bytes = crypto.getRandomValues(new Uint8Array(16));
  return Array.from(bytes, (b) => b.toString(16).padStart(2, '0')).join('');
}

// Show the connection's state in `element`: its text, a data-state for
// styles (and tests), and, for some stops, a link onward.
export function showConnection(element, state, text, link) {
  element.dataset.state = state;
  element.replaceChildren(document.createTextNode(text));
  if (link) {
    const anchor = document.createElement('a');
    anchor.href = link.href;
    anchor.textContent = link.text;
    element.append(' ', anchor);
  }
}

// The websocket connection: a fresh token before every (re)connect,
// reconnects with back-off on the codes that allow it, a stop with a
// reason on all others.
//
// handlers.ready(hello)    after each hello: join, then flush the outbox
// handlers.frame(frame)    every frame after the hello
// handlers.status(state, text, code)
//                          'connecting', 'connected', 'reconnecting' or
//                          'stopped'
export class Connection {
  constructor(handlers, tokenUrl = '/chat/token') {
    this.handlers = handlers;
    this.tokenUrl = tokenUrl;
    this.socket = null;
    this.ready = false;
    this.stopped = false;
    this.attempt = 0;
    this.timer = null;
    this.heartbeat = null;
    this.pongTimer = null;
    this.everConnected = false;
  }

  start() {
    window.addEventListener('online', () => this.now());
    this.open();
  }

  // Reconnect at once if waiting to: the browser is back online.
  now() {
    if (this.timer !== null && !this.stopped) {
      clearTimeout(this.timer);
      this.timer = null;
      this.open();
    }
  }

  async open() {
    this.timer = null;
    this.status(
      'connecting', this.attempt ? 'Reconnecting…' : 'Connecting…'
    );

    let url;
    try {
      const response = await fetch(this.tokenUrl, {
        credentials: 'same-origin',
        cache: 'no-store',
        headers: {Accept: 'application/json'},
        signal: AbortSignal.timeout(TOKEN_TIMEOUT),
      });
      if (!response.ok) {
        throw new Error('no token: ' + response.status);
      }
      url = (await response.json()).url;
    } catch {
      // The web app is unreachable: try again, as for a lost socket.
      this.retry();
      return;
    }
    if (this.stopped) {
      return;
    }

    let socket;
    try {
      socket = new WebSocket(url);
    } catch {
      // A URL the browser refuses (or the page's policy forbids).
      this.stop(0, 'Cannot connect to the chat server from this page.');
      return;
    }
    this.socket = socket;
    socket.addEventListener('message', (event) => {
      if (socket === this.socket) {
        this.receive(event.data);
      }
    });
    socket.addEventListener('close', (event) => {
      if (socket === this.socket) {
        this.closed(event.code);
      }
    });
  }

  receive(data) {
    let frame;
    try {
      frame = JSON.parse(data);
    } catch {
      return;
    }
    if (frame === null || typeof frame !== 'object') {
      return;
    }
    // Any frame shows the connection is alive.
    clearTimeout(this.pongTimer);
    this.pongTimer = null;
    if (frame.type === 'hello') {
      this.ready = true;
      this.attempt = 0;
      this.everConnected = true;
      this.beat();
      this.status('connected', 'Connected.');
      this.handlers.ready(frame);
      return;
    }
    this.handlers.frame(frame);
  }

  beat() {
    clearInterval(this.heartbeat);
    this.heartbeat = setInterval(() => {
      if (this.pongTimer === null && this.send({type: 'ping'})) {
        this.pongTimer = setTimeout(() => this.lost(), PONG_WAIT);
      }
    }, HEARTBEAT);
  }

  // The connection went silent: leave it behind and reconnect.
  lost() {
    const socket = this.socket;
    if (socket !== null) {
      this.socket = null;
      socket.close();
      this.closed(1006);
    }
  }

  closed(code) {
    this.socket = null;
    this.ready = false;
    clearInterval(this.heartbeat);
    clearTimeout(this.pongTimer);
    this.heartbeat = null;
    this.pongTimer = null;
    if (this.stopped) {
      return;
    }
    if (RETRY.has(code)) {
      this.retry();
    } else {
      this.stop(code);
    }
  }

  retry() {
    // A refused handshake looks like any lost connection (1006) to a
    // page; do not knock for ever on a door that stays shut.
    if (this.attempt >= GIVE_UP) {
      this.stop(0, 'Cannot reach the chat server. Reload the page to ' +
        'try again.');
      return;
    }
    const delay = backoff(this.attempt);
    this.attempt += 1;
    const seconds = Math.max(1, Math.round(delay / 1000));
    const what = this.everConnected ? 'Connection lost' : 'Not connected';
    this.status(
      'reconnecting', `${what}. Trying again in ${seconds} s…`,
    );
    this.timer = setTimeout(() => this.open(), delay);
  }

  // Give up for good, with the reason the close code gives.
  stop(code, text) {
    this.stopped = true;
    this.ready = false;
    clearInterval(this.heartbeat);
    clearTimeout(this.pongTimer);
    if (this.timer !== null) {
      clearTimeout(this.timer);
      this.timer = null;
    }
    if (this.socket !== null) {
      const socket = this.socket;
      this.socket = null;
      socket.close();
    }
    const reason = text || STOPPED.get(code) ||
      `The connection was closed (code ${code}). Reload the page.`;
    this.status('stopped', reason, code);
  }

  status(state, text, code) {
    this.handlers.status(state, text, code);
  }

  // Send `frame` if connected; false if it must wait for the next hello.
  send(frame) {
    if (!this.ready || this.socket === null) {
      return false;
    }
    this.socket.send(JSON.stringify(frame));
    return true;
  }
}

// The messages sent but not acknowledged yet, in the order they were
// written. After every hello (and join), `flush` sends them again with
// their same client ids: the server stores each id once and acknowledges
// a repeat as a duplicate.
export class Outbox {
  constructor(connection) {
    this.connection = connection;
    this.pending = new Map();
    this.timer = null;
  }

  add(frame) {
    this.pending.set(frame.client_id, frame);
    this.connection.send(frame);
  }

  has(clientId) {
    return this.pending.has(clientId);
  }

  remove(clientId) {
    return this.pending.delete(clientId);
  }

  // Drop every message of one chat (it ended); return their ids.
  dropChat(chatId) {
    const dropped = [];
    for (const [clientId, frame] of this.pending) {
      if (frame.chat_id === chatId) {
        this.pending.delete(clientId);
        dropped.push(clientId);
      }
    }
    return dropped;
  }

  flush() {
    for (const frame of this.pending.values()) {
      if (!this.connection.send(frame)) {
        return;
      }
    }
  }

  // Try again after `delay` ms: the server was busy or slowed us down.
  later(delay) {
    if (this.timer === null) {
      this.timer = setTimeout(() => {
        this.timer = null;
        this.flush();
      }, Math.max(250, delay));
    }
  }
}

// Server times come as ISO 8601; SQLite keeps them without a zone, but
// they are UTC all the same.
export function parseTime(value) {
  if (typeof value !== 'string') {
    return null;
  }
  let text = value.replace(/(\.\d{3})\d+/, '$1');
  if (!/(Z|[+-]\d\d:?\d\d)$/.test(text)) {
    text += 'Z';
  }
  const time = new Date(text);
  return Number.isNaN(time.getTime()) ? null : time;
}

export function formatTime(time, withDate = false) {
  const options = {hour: '2-digit', minute: '2-digit'};
  if (withDate) {
    Object.assign(options, {year: 'numeric', month: '2-digit',
      day: '2-digit'});
  }
  return time.toLocaleString([], options);
}

// Show the times of server-rendered <time> elements in local time.
export function localizeTimes(root) {
  for (const element of root.querySelectorAll('time[datetime]')) {
    const time = parseTime(element.getAttribute('datetime'));
    if (time !== null) {
      const withDate = element.textContent.trim().length > 5;
      element.textContent = formatTime(time, withDate);
    }
  }
}

const DELIVERY = {
  pending: 'Sending…',
  delivered: 'Delivered',
  failed: 'Not sent',
};

// The messages of one chat in an <ol>: each shown once, ordered by seq.
// Own messages not yet acknowledged stay at the end, marked "Sending…".
export class MessageList {
  constructor(list, ownRole, followWindow = false) {
    this.list = list;
    this.ownRole = ownRole;
    this.followWindow = followWindow;
    this.seqs = new Set();
    this.lastSeq = 0;
    this.pending = new Map();

    for (const item of list.querySelectorAll('li[data-seq]')) {
      const seq = Number(item.dataset.seq);
      this.seqs.add(seq);
      this.lastSeq = Math.max(this.lastSeq, seq);
    }
    localizeTimes(list);
  }

  // Show a `message` frame, unless its seq is shown already.
  show(message) {
    const seq = message.seq;
    if (!Number.isInteger(seq)) {
      return;
    }
    this.lastSeq = Math.max(this.lastSeq, seq);
    if (this.seqs.has(seq)) {
      return;
    }
    this.seqs.add(seq);

    const own = this.pending.get(message.client_id);
    if (own !== undefined && message.role === this.ownRole) {
      this.pending.delete(message.client_id);
      this.deliver(own, seq);
      return;
    }
    const item = this.build(message.role, message.name, message.text,
      message.time);
    item.dataset.seq = String(seq);
    this.place(item, seq);
  }

  // Show an own message at once, before the server has it.
  compose(clientId, name, text) {
    const item = this.build(this.ownRole, name, text, null);
    item.classList.add('own');
    item.dataset.client = clientId;
    this.setDelivery(item, 'pending');
    this.pending.set(clientId, item);
    this.list.append(item);
    this.scroll();
  }

  // The server stored an own message as `seq`; true if it was ours.
  ack(clientId, seq) {
    const item = this.pending.get(clientId);
    if (item === undefined) {
      return false;
    }
    this.pending.delete(clientId);
    if (this.seqs.has(seq)) {
      // Shown already, from the chat's history after a reconnect.
      item.remove();
      return true;
    }
    this.seqs.add(seq);
    this.deliver(item, seq);
    return true;
  }

  fail(clientId, reason) {
    const item = this.pending.get(clientId);
    if (item === undefined) {
      return false;
    }
    this.pending.delete(clientId);
    this.setDelivery(item, 'failed', reason);
    return true;
  }

  deliver(item, seq) {
    item.dataset.seq = String(seq);
    delete item.dataset.client;
    this.setDelivery(item, 'delivered');
    this.place(item, seq);
  }

  build(role, name, text, time) {
    const item = document.createElement('li');
    item.className = 'message ' + (role === 'staff' ? 'staff' : 'customer');

    const meta = document.createElement('span');
    meta.className = 'meta';
    const who = document.createElement('span');
    who.className = 'who';
    who.textContent = String(name ?? '');
    meta.append(who);

    const stamp = document.createElement('time');
    const parsed = parseTime(time) ?? new Date();
    stamp.dateTime = parsed.toISOString();
    stamp.textContent = formatTime(parsed);
    meta.append(' ', stamp);

    const body = document.createElement('span');
    body.className = 'text';
    body.textContent = String(text ?? '');

    item.append(meta, ' ', body);
    return item;
  }

  setDelivery(item, state, reason) {
    let label = item.querySelector('.delivery');
    if (label === null) {
      label = document.createElement('span');
      label.className = 'delivery';
      item.append(label);
    }
    item.classList.remove('pending', 'delivered', 'failed');
    item.classList.add(state);
    label.textContent = reason ? `${DELIVERY[state]}: ${reason}` :
      DELIVERY[state];
  }

  // Put `item` before the first message with a higher seq, or before
  // the own messages still waiting for their seq.
  place(item, seq) {
    let before = null;
    for (const other of this.list.children) {
      if (other === item) {
        continue;
      }
      const otherSeq = Number(other.dataset.seq);
      if (!(otherSeq < seq)) {
        before = other;
        break;
      }
    }
    const last = this.list.lastElementChild === item && before === null;
    if (!last) {
      this.list.insertBefore(item, before);
    }
    this.scroll();
  }

  // Keep the latest message in view, in the list or in the window.
  scroll() {
    const list = this.list;
    if (list.scrollHeight > list.clientHeight) {
      list.scrollTop = list.scrollHeight;
    } else if (this.followWindow && list.lastElementChild !== null) {
      list.lastElementChild.scrollIntoView({block: 'nearest'});
    }
  }
}

// Send with Enter, new line with Shift+Enter.
export function submitOnEnter(textarea, form) {
  textarea.addEventListener('keydown', (event) => {
    if (event.key === 'Enter' && !event.shiftKey && !event.isComposing) {
      event.preventDefault();
      form.requestSubmit();
    }
  });
}
