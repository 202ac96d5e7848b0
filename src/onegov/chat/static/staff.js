// The staff dashboard: waiting requests with a Take button, the staff
// member's own chats, and a conversation pane for each of them.
import {
  Connection,
  MessageList,
  Outbox,
  newClientId,
  showConnection,
  submitOnEnter,
} from './client.js';

const waitingList = document.getElementById('waiting');
const waitingCount = document.getElementById('waiting-count');
const activeList = document.getElementById('active');
const conversations = document.getElementById('conversations');
const paneTemplate = document.getElementById('pane-template');
const notice = document.getElementById('notice');
const connectionText = document.getElementById('connection');

const panes = new Map();
let staffName = 'Staff';
let focusOnAccept = null;
let noticeTimer = null;

function say(text) {
  notice.textContent = text;
  notice.hidden = false;
  clearTimeout(noticeTimer);
  noticeTimer = setTimeout(() => {
    notice.hidden = true;
  }, 8000);
}

function refresh() {
  const waiting = waitingList.children.length;
  waitingCount.textContent = String(waiting);
  for (const [name, empty] of [
    ['waiting', waiting === 0],
    ['active', activeList.children.length === 0],
    ['conversations', panes.size === 0],
  ]) {
    document.querySelector(`[data-empty="${name}"]`).hidden = !empty;
  }
}

function itemOf(list, chatId) {
  for (const item of list.children) {
    if (item.dataset.chat === chatId) {
      return item;
    }
  }
  return null;
}

function summary(chat) {
  const who = document.createElement('span');
  who.className = 'who';
  who.textContent = chat.customer_name;
  const topic = document.createElement('span');
  topic.className = 'topic';
  topic.textContent = chat.topic;
  return [who, ' ', topic];
}

// Waiting requests ---------------------------------------------------

function addRequest(chat) {
  if (itemOf(waitingList, chat.id) !== null || panes.has(chat.id)) {
    return;
  }
  const item = document.createElement('li');
  item.className = 'request';
  item.dataset.chat = chat.id;

  const text = document.createElement('span');
  text.className = 'summary';
  text.append(...summary(chat));

  const button = document.createElement('button');
  button.type = 'button';
  button.className = 'take';
  button.dataset.chat = chat.id;
  const hidden = document.createElement('span');
  hidden.className = 'visually-hidden';
  hidden.textContent = ` the chat with ${chat.customer_name}`;
  button.append('Take', hidden);

  item.append(text, ' ', button);
  waitingList.append(item);
  refresh();
}

function removeRequest(chatId) {
  const item = itemOf(waitingList, chatId);
  if (item === null) {
    return;
  }
  const hadFocus = item.contains(document.activeElement);
  item.remove();
  refresh();
  if (hadFocus) {
    document.getElementById('waiting-heading').focus();
  }
}

waitingList.addEventListener('click', (event) => {
  const button = event.target.closest('button.take');
  if (button === null) {
    return;
  }
  const chatId = button.dataset.chat;
  if (connection.send({type: 'accept', chat_id: chatId})) {
    button.disabled = true;
    focusOnAccept = chatId;
  } else {
    say('Not connected: try again once the dashboard is connected.');
  }
});

// Own chats and their panes ------------------------------------------

function addActive(chat) {
  if (itemOf(activeList, chat.id) !== null) {
    return;
  }
  const item = document.createElement('li');
  item.dataset.chat = chat.id;
  const link = document.createElement('a');
  link.href = `#chat-${chat.id}`;
  link.append(...summary(chat));
  item.append(link);
  activeList.append(item);
  refresh();
}

function removeActive(chatId) {
  itemOf(activeList, chatId)?.remove();
  refresh();
}

class Pane {
  constructor(section) {
    this.section = section;
    this.chatId = section.dataset.chat;
    this.messages = new MessageList(
      section.querySelector('.messages'), 'staff'
    );
    this.form = section.querySelector('form.compose');
    this.textarea = this.form.querySelector('textarea');
    this.endButton = section.querySelector('button.end');
    this.ended = false;

    this.form.addEventListener('submit', (event) => {
      event.preventDefault();
      this.send();
    });
    submitOnEnter(this.textarea, this.form);
    this.endButton.addEventListener('click', () => {
      if (connection.send({type: 'end', chat_id: this.chatId})) {
        this.endButton.disabled = true;
      } else {
        say('Not connected: try again once the dashboard is connected.');
      }
    });
  }

  static create(chat) {
    const section = paneTemplate.content.firstElementChild.cloneNode(true);
    const id = chat.id;
    section.id = `chat-${id}`;
    section.dataset.chat = id;
    section.setAttribute('aria-labelledby', `title-${id}`);
    const title = section.querySelector('.pane-title');
    title.id = `title-${id}`;
    title.replaceChildren(...summary(chat));
    section.querySelector('label').htmlFor = `text-${id}`;
    section.querySelector('textarea').id = `text-${id}`;
    conversations.insertBefore(
      section, document.querySelector('[data-empty="conversations"]')
    );
    return new Pane(section);
  }

  send() {
    const text = this.textarea.value;
    if (!text.trim() || this.ended) {
      return;
    }
    const clientId = newClientId();
    this.messages.compose(clientId, staffName, text);
    outbox.add({
      type: 'message', chat_id: this.chatId, text, client_id: clientId,
    });
    this.textarea.value = '';
    this.textarea.focus();
  }

  join() {
    connection.send({
      type: 'join', chat_id: this.chatId, last_seq: this.messages.lastSeq,
    });
  }

  update(chat) {
    if (chat.state === 'ended') {
      this.end();
    }
  }

  end(text = 'This chat has ended.') {
    if (this.ended) {
      return;
    }
    this.ended = true;
    this.section.classList.add('ended');
    for (const clientId of outbox.dropChat(this.chatId)) {
      this.messages.fail(clientId, 'the chat has ended');
    }
    removeActive(this.chatId);

    const hadFocus = this.section.contains(document.activeElement);
    this.form.hidden = true;
    const closing = document.createElement('p');
    closing.className = 'pane-end';
    const transcript = document.createElement('a');
    transcript.href = `/chat/archive/${this.chatId}`;
    transcript.textContent = 'Read the transcript';
    const close = document.createElement('button');
    close.type = 'button';
    close.className = 'secondary';
    close.textContent = 'Close';
    close.addEventListener('click', () => this.close());
    closing.append(text, ' ', transcript, ' ', close);
    this.section.querySelector('.pane-state').textContent = text;
    this.section.append(closing);
    if (hadFocus) {
      close.focus();
    }
  }

  close() {
    this.section.remove();
    panes.delete(this.chatId);
    refresh();
    document.getElementById('active-heading').focus();
  }
}

function ensurePane(chat) {
  let pane = panes.get(chat.id);
  if (pane === undefined) {
    pane = Pane.create(chat);
    panes.set(chat.id, pane);
    refresh();
  }
  return pane;
}

function paneOfMessage(clientId) {
  const frame = outbox.pending.get(clientId);
  return frame ? panes.get(frame.chat_id) : undefined;
}

// The connection ------------------------------------------------------

function failed(error) {
  const ref = error.ref;
  switch (error.code) {
    case 'rate_limited':
      outbox.later((error.retry_after || 1) * 1000);
      return;
    case 'unavailable':
      outbox.later(2000);
      for (const button of document.querySelectorAll('button:disabled')) {
        button.disabled = false;
      }
      say('The chat is busy: try again in a moment.');
      return;
    case 'conflict':
      removeRequest(ref);
      say('Someone else took that chat.');
      return;
  }
  if (ref && outbox.has(ref)) {
    const pane = paneOfMessage(ref);
    if (error.code === 'chat_ended' && pane) {
      pane.end();
    } else {
      outbox.remove(ref);
      pane?.messages.fail(ref, error.message);
    }
    return;
  }
  if (ref && panes.has(ref)) {
    panes.get(ref).end(error.code === 'chat_ended' ?
      'This chat has ended.' : 'This chat is no longer yours.');
    return;
  }
  if (ref) {
    removeRequest(ref);
  }
  say(`The chat refused that: ${error.message}`);
}

const connection = new Connection({
  ready(hello) {
    if (hello.role !== 'staff') {
      connection.stop(4000);
      return;
    }
    staffName = hello.name || staffName;

    // The server announces every waiting chat after each hello.
    waitingList.replaceChildren();
    const active = new Set();
    for (const chat of hello.active || []) {
      active.add(chat.id);
      addActive(chat);
      ensurePane(chat);
    }
    for (const [chatId, pane] of panes) {
      if (!active.has(chatId)) {
        pane.end();
      }
    }
    for (const pane of panes.values()) {
      if (!pane.ended) {
        pane.endButton.disabled = false;
        pane.join();
      }
    }
    outbox.flush();
    refresh();
  },

  frame(frame) {
    switch (frame.type) {
      case 'request':
        addRequest(frame.chat);
        break;
      case 'taken':
        removeRequest(frame.chat_id);
        break;
      case 'accepted': {
        const chat = frame.chat;
        removeRequest(chat.id);
        addActive(chat);
        const pane = ensurePane(chat);
        pane.join();
        if (focusOnAccept === chat.id) {
          focusOnAccept = null;
          pane.textarea.focus();
        }
        break;
      }
      case 'joined':
      case 'state':
        panes.get(frame.chat.id)?.update(frame.chat);
        break;
      case 'ended':
        panes.get(frame.chat.id)?.end();
        break;
      case 'message':
        panes.get(frame.chat_id)?.messages.show(frame);
        break;
      case 'ack':
        outbox.remove(frame.client_id);
        panes.get(frame.chat_id)?.messages.ack(frame.client_id, frame.seq);
        break;
      case 'error':
        failed(frame);
        break;
    }
  },

  status(state, text, code) {
    const link = state === 'stopped' && code === 4000 ?
      {href: '/chat/login', text: 'Log in again'} : null;
    showConnection(connectionText, state, text, link);
  },
});

const outbox = new Outbox(connection);

for (const section of conversations.querySelectorAll('section.pane')) {
  panes.set(section.dataset.chat, new Pane(section));
}
refresh();
connection.start();
