// pglease console: the few things plain HTML cannot do. Pages work without it.
// - [data-live]: replace the element's content with each "sessions" server-sent event.
// - time[data-countdown]: show the time left, every second.
// - time[data-ago]: show how long ago, every second.
'use strict';

function short(seconds) {
  if (seconds <= 0) return 'ended';
  if (seconds < 60) return seconds + ' s';
  if (seconds < 3600) return Math.floor(seconds / 60) + ' min ' + (seconds % 60) + ' s';
  const h = Math.floor(seconds / 3600), m = Math.floor((seconds % 3600) / 60);
  return m ? h + ' h ' + m + ' min' : h + ' h';
}

function ago(seconds) {
  if (seconds < 0) seconds = 0;
  if (seconds < 60) return seconds + ' s ago';
  if (seconds < 3600) return Math.floor(seconds / 60) + ' min ago';
  return Math.floor(seconds / 3600) + ' h ' + Math.floor((seconds % 3600) / 60) + ' min ago';
}

function tick() {
  for (const t of document.querySelectorAll('time[data-ago]')) {
    t.textContent = ago(Math.round((Date.now() - Date.parse(t.dataset.ago)) / 1000));
  }
  for (const t of document.querySelectorAll('time[data-countdown]')) {
    const left = Math.round((Date.parse(t.dataset.countdown) - Date.now()) / 1000);
    t.textContent = short(left);
    t.classList.toggle('soon', left > 0 && left < 600);
  }
}

function live(element) {
  const status = document.getElementById('live-status');
  const source = new EventSource(element.dataset.live);
  source.addEventListener('sessions', (event) => {
    // The server renders and escapes the rows; this only puts them in place.
    element.innerHTML = event.data;
    tick();
    const rows = element.querySelectorAll('tr:not(.empty)').length;
    if (status) status.textContent = rows + (rows === 1 ? ' live session' : ' live sessions') + ', updated ' + new Date().toLocaleTimeString() + '. This list updates by itself.';
  });
  source.addEventListener('error', () => {
    if (status) status.textContent = 'Live updates paused; retrying…';
  });
}

document.addEventListener('DOMContentLoaded', () => {
  document.querySelectorAll('[data-live]').forEach(live);
  tick();
  setInterval(tick, 1000);
});
