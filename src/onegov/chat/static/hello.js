// The demo's minimal client: fetch a one-time token, connect, report.
const status = document.getElementById('status');

async function connect() {
  const response = await fetch('/chat/token', {credentials: 'same-origin'});
  if (!response.ok) {
    status.textContent = 'Could not get a token (' + response.status + ').';
    return;
  }
  const {url} = await response.json();
  const socket = new WebSocket(url);
  socket.addEventListener('message', (event) => {
    const message = JSON.parse(event.data);
    if (message.type === 'hello') {
      status.textContent = 'Connected: admitted as ' + message.role + '.';
    }
  });
  socket.addEventListener('close', (event) => {
    status.textContent = 'Disconnected (close code ' + event.code + ').';
  });
}

connect();
