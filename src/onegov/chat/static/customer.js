// The customer's conversation page: one chat, bound to this browser's
// session by the server (which ignores the chat id the page sends).
import {
  Connection,
  MessageList,
  Outbox,
  newClientId,
  showConnection,
  submitOnEnter,
} from './client.js';

// Module scripts have no document.currentScript: find the page's chat.
const page = document.querySelector('.chat[data-chat]');
const chatId = page.dataset.chat;
const stateText = document.getElementById('chat-state');
const connectionText = document.getElementById('connection');
const form = document.getElementById('compose');
const textarea = document.getElementById('text');
const endedNotice = document.getElementById('ended');

// The page scrolls, not the list: one scroll area is easier on a phone.
const messages = new MessageList(
  document.getElementById('messages'), 'customer', true
);
let customerName = page.dataset.name || 'You';
let ended = stateText.dataset.state === 'ended';

function showChat(chat) {
  if (!chat) {
    return;
  }
  customerName = chat.customer_name;
  stateText.dataset.state = chat.state;
  if (chat.state === 'waiting') {
    stateText.textContent = 'Waiting for a member of staff…';
  } else if (chat.state === 'active') {
    stateText.textContent = `You are talking to ${chat.staff_name}.`;
  } else {
    end();
  }
}

function end() {
  ended = true;
  stateText.dataset.state = 'ended';
  stateText.textContent = 'This chat has ended.';
  for (const clientId of outbox.dropChat(chatId)) {
    messages.fail(clientId, 'the chat has ended');
  }
  form.hidden = true;
  endedNotice.hidden = false;
}

const connection = new Connection({
  ready(hello) {
    if (!hello.chat || hello.chat.id !== chatId) {
      connection.stop(4000, 'This chat is no longer open in this browser.');
      return;
    }
    showChat(hello.chat);
    if (ended) {
      return;
    }
    connection.send({type: 'join', last_seq: messages.lastSeq});
    outbox.flush();
  },

  frame(frame) {
    switch (frame.type) {
      case 'joined':
      case 'state':
        showChat(frame.chat);
        break;
      case 'message':
        messages.show(frame);
        break;
      case 'ack':
        outbox.remove(frame.client_id);
        messages.ack(frame.client_id, frame.seq);
        break;
      case 'error':
        failed(frame);
        break;
    }
  },

  status(state, text, code) {
    if (state === 'stopped' && code === 4001) {
      // The page says so already; the connection just went with it.
      end();
      showConnection(connectionText, 'closed', 'Disconnected.');
      return;
    }
    let link = null;
    if (state === 'stopped' && (code === 4000 || code === undefined)) {
      link = {href: '/chat', text: 'Start a new chat'};
    }
    showConnection(connectionText, state, text, link);
  },
});

const outbox = new Outbox(connection);

function failed(error) {
  if (error.code === 'rate_limited') {
    outbox.later((error.retry_after || 1) * 1000);
  } else if (error.code === 'unavailable') {
    outbox.later(2000);
  } else if (error.code === 'chat_ended') {
    end();
  } else if (error.ref && outbox.remove(error.ref)) {
    messages.fail(error.ref, error.message);
  }
}

form.addEventListener('submit', (event) => {
  event.preventDefault();
  const text = textarea.value;
  if (!text.trim() || ended) {
    return;
  }
  const clientId = newClientId();
  messages.compose(clientId, customerName, text);
  outbox.add({
    type: 'message', chat_id: chatId, text, client_id: clientId,
  });
  textarea.value = '';
  textarea.focus();
});
submitOnEnter(textarea, form);

if (ended) {
  showConnection(connectionText, 'closed', 'Disconnected.');
} else {
  connection.start();
}
