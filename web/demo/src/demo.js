// callflow's demo page: the reference browser client.
//
// The flow every client follows (docs/CLIENTS.md shows the same with supabase-js):
//   1. sign in            -> a Supabase access token (locally: POST /api/dev/session)
//   2. start a call       -> POST /api/calls (or insert call_invitations rows with supabase-js)
//   3. follow invitations -> GET /api/calls/events (Server-Sent Events; or Supabase Realtime)
//   4. join the room      -> POST /api/livekit/token, then Room.connect(server_url, token)
//   5. hang up            -> room.disconnect(); callflow ends the call and writes the history
import { Room, RoomEvent, Track } from 'livekit-client';

const $ = (id) => document.getElementById(id);
const LIVE = ['pending', 'ringing'];

const state = {
  token: null, // the signed-in user's access token
  me: null, // their user id (the token's `sub`, also their LiveKit identity)
  names: {}, // user id -> display name (development user list)
  invitations: new Map(), // id -> the latest invitation row seen
  room: null, // the LiveKit Room while in a call
  roomName: null,
  events: null, // the EventSource
};
window.callflowDemo = state; // for tests and for poking around in the console

// ---- HTTP ---------------------------------------------------------------------------------------

async function api(path, { method = 'GET', body } = {}) {
  const headers = { 'Content-Type': 'application/json' };
  if (state.token) headers.Authorization = `Bearer ${state.token}`;
  const resp = await fetch(path, { method, headers, body: body && JSON.stringify(body) });
  const data = await resp.json().catch(() => ({}));
  if (!resp.ok) {
    const error = new Error(data.error?.message || `HTTP ${resp.status}`);
    error.code = data.error?.code;
    throw error;
  }
  return data;
}

function status(text, isError = false) {
  $('status').textContent = text;
  $('status').className = isError ? 'error' : '';
}

const nameOf = (id) => state.names[id] || id.slice(0, 8);

// ---- 1. sign in ---------------------------------------------------------------------------------

async function showSignIn() {
  const config = await api('/demo/config.json');
  if (!config.development && !config.supabase_anon_key) {
    // The development user list answers a browser on the server's own machine only (loopback),
    // and never next to a real Supabase project; that one needs SUPABASE_ANON_KEY to sign in.
    status('No sign-in here: the development user list answers only a browser on the server\'s own machine, '
      + 'against a local Supabase; for a real project set SUPABASE_ANON_KEY.', true);
  }
  if (config.development) {
    const { users } = await api('/api/dev/users');
    for (const user of users) {
      state.names[user.id] = user.name || user.email;
      $('people').append(new Option(user.name || user.email, user.id));
    }
    const devSignIn = async (userId) => signedIn((await api('/api/dev/session', { method: 'POST', body: { user_id: userId } })).access_token);
    // /demo?user=<id>: sign straight in (handy for a second window, and for tests)
    const wanted = new URLSearchParams(location.search).get('user');
    if (wanted) return devSignIn(wanted);
    for (const user of users.slice(0, 12)) {
      const button = Object.assign(document.createElement('button'), { textContent: user.name || user.email });
      button.onclick = () => devSignIn(user.id);
      $('dev-users').append(button);
    }
  }
  if (config.supabase_anon_key) {
    // A real Supabase project: Auth's password grant with the public anon key (never the service key).
    const form = $('supabase-sign-in');
    form.hidden = false;
    form.onsubmit = async (event) => {
      event.preventDefault();
      const resp = await fetch(`${config.supabase_url}/auth/v1/token?grant_type=password`, {
        method: 'POST',
        headers: { apikey: config.supabase_anon_key, 'Content-Type': 'application/json' },
        body: JSON.stringify({ email: form.email.value, password: form.password.value }),
      });
      const data = await resp.json();
      if (!resp.ok) return status(data.error_description || data.msg || 'sign-in failed', true);
      signedIn(data.access_token);
    };
  }
}

function signedIn(token) {
  state.token = token;
  state.me = JSON.parse(atob(token.split('.')[1].replace(/-/g, '+').replace(/_/g, '/'))).sub;
  $('whoami').textContent = `signed in as ${nameOf(state.me)}`;
  $('sign-in').hidden = true;
  $('sign-out').hidden = false;
  $('place-call').hidden = false;
  status('Ready.');
  followInvitations();
  showHistory();
}

// ---- 2. start a call ----------------------------------------------------------------------------

async function placeCall(callType) {
  try {
    const { room_name, invitations } = await api('/api/calls', {
      method: 'POST', body: { callee_ids: [$('callee').value.trim()], call_type: callType },
    });
    invitations.forEach(rememberInvitation);
    status(`Calling ${nameOf(invitations[0].callee_id)}…`);
    await joinRoom({ room_name }, callType); // the caller waits in the room while it rings
  } catch (error) {
    status(`Cannot call: ${error.message}`, true);
  }
}

// ---- 3. follow invitations and calls ------------------------------------------------------------

function followInvitations() {
  // EventSource sends no headers: the token goes in the query string (never logged by callflow).
  state.events = new EventSource(`/api/calls/events?access_token=${encodeURIComponent(state.token)}`);
  state.events.addEventListener('invitation', (e) => onInvitation(JSON.parse(e.data)));
  state.events.addEventListener('call', () => showHistory());
}

function rememberInvitation(row) {
  state.invitations.set(row.id, row);
}

function onInvitation(row) {
  rememberInvitation(row);
  showIncoming();
  if (row.caller_id === state.me) {
    if (row.status === 'accepted') status(`${nameOf(row.callee_id)} answered.`);
    else if (!LIVE.includes(row.status)) status(`${nameOf(row.callee_id)}: ${row.status}.`);
    if (row.room_name === state.roomName && outgoingCallOver(row.room_name)) leaveRoom(false, $('status').textContent);
  }
  if (!LIVE.includes(row.status)) showHistory();
}

// Nobody left to ring in a room we called from, and nobody answered.
function outgoingCallOver(roomName) {
  const mine = [...state.invitations.values()].filter((i) => i.room_name === roomName && i.caller_id === state.me);
  return mine.length > 0 && mine.every((i) => !LIVE.includes(i.status)) && !mine.some((i) => i.status === 'accepted');
}

function showIncoming() {
  const ringing = [...state.invitations.values()].filter((i) => i.callee_id === state.me && LIVE.includes(i.status));
  $('incoming-section').hidden = ringing.length === 0;
  $('incoming').replaceChildren(...ringing.map((inv) => {
    const div = document.createElement('div');
    div.className = 'ringing row';
    div.dataset.testid = 'incoming-call';
    div.dataset.invitationId = inv.id;
    div.append(`${nameOf(inv.caller_id)} is calling (${inv.call_type})`);
    const accept = Object.assign(document.createElement('button'), { className: 'primary', textContent: 'Accept' });
    accept.dataset.testid = 'accept';
    accept.onclick = () => answer(inv, 'accept');
    const decline = Object.assign(document.createElement('button'), { className: 'danger', textContent: 'Decline' });
    decline.dataset.testid = 'decline';
    decline.onclick = () => answer(inv, 'decline');
    div.append(accept, decline);
    return div;
  }));
}

async function answer(invitation, action) {
  try {
    rememberInvitation(await api(`/api/calls/${invitation.id}/${action}`, { method: 'POST' }));
    showIncoming();
    if (action === 'accept') await joinRoom({ invitation_id: invitation.id }, invitation.call_type);
    else status('Declined.');
  } catch (error) {
    status(`Cannot ${action}: ${error.message}`, true);
  }
}

// ---- 4. join the room ---------------------------------------------------------------------------

async function joinRoom(which, callType) {
  if (state.room) await leaveRoom(false);
  let grant;
  try {
    grant = await api('/api/livekit/token', { method: 'POST', body: which });
  } catch (error) {
    status(`Cannot join: ${error.message}`, true);
    return;
  }
  const room = new Room({ adaptiveStream: true, dynacast: true });
  state.room = room;
  room
    .on(RoomEvent.TrackSubscribed, (track, _publication, participant) => {
      const element = track.attach();
      element.classList.add('remote');
      element.dataset.identity = participant.identity;
      if (track.kind === Track.Kind.Video) {
        element.dataset.testid = 'remote-video';
        $('videos').append(element);
      } else {
        document.body.append(element); // remote audio plays from a hidden <audio>
        element.hidden = true;
      }
    })
    .on(RoomEvent.TrackUnsubscribed, (track) => track.detach().forEach((el) => el.remove()))
    .on(RoomEvent.Disconnected, () => {
      if (state.room === room) cleanUp('Call ended.');
    });
  // The call can end while we connect or start the devices (a decline, a hang-up, LiveKit removing
  // us): then this room is no longer ours, and whatever the page says about the call stands (an
  // error here would overwrite "declined" with "Cannot call").
  const left = () => state.room !== room;
  try {
    await room.connect(grant.server_url, grant.token);
  } catch (error) {
    if (left()) return;
    throw error;
  }
  if (left()) return;
  state.roomName = room.name;
  if (outgoingCallOver(room.name)) return leaveRoom(false, $('status').textContent); // declined while we connected
  $('room-name').textContent = room.name;
  $('call').hidden = false;
  try {
    if (callType === 'audio') await room.localParticipant.setMicrophoneEnabled(true);
    else await room.localParticipant.enableCameraAndMicrophone();
  } catch (error) {
    if (left()) return;
    throw error;
  }
  if (left()) return;
  const camera = room.localParticipant.getTrackPublication(Track.Source.Camera)?.track;
  if (camera) camera.attach($('local-video'));
  const mic = room.localParticipant.getTrackPublication(Track.Source.Microphone)?.track;
  if (mic) showMicLevel(mic.mediaStreamTrack);
  if (which.invitation_id) status(`In call (${room.name}).`); // a caller's status follows the ringing
}

function showMicLevel(mediaStreamTrack) {
  const audio = new AudioContext();
  const analyser = audio.createAnalyser();
  audio.createMediaStreamSource(new MediaStream([mediaStreamTrack])).connect(analyser);
  const samples = new Uint8Array(analyser.fftSize);
  const tick = () => {
    if (!state.room) return audio.close();
    analyser.getByteTimeDomainData(samples);
    const peak = samples.reduce((max, v) => Math.max(max, Math.abs(v - 128)), 0) / 128;
    $('mic-level').style.width = `${Math.round(peak * 100)}%`;
    requestAnimationFrame(tick);
  };
  tick();
}

// ---- 5. hang up ---------------------------------------------------------------------------------

async function leaveRoom(cancelRinging = true, message = 'Call ended.') {
  const roomName = state.roomName;
  if (cancelRinging) {
    // Still ringing? Cancel our invitations so the callees stop ringing at once.
    const ringing = [...state.invitations.values()].filter((i) => i.room_name === roomName && i.caller_id === state.me && LIVE.includes(i.status));
    await Promise.all(ringing.map((i) => api(`/api/calls/${i.id}/cancel`, { method: 'POST' }).then(rememberInvitation, () => {})));
  }
  const room = state.room;
  cleanUp(message);
  if (room) await room.disconnect();
}

function cleanUp(message) {
  state.room = null;
  state.roomName = null;
  $('call').hidden = true;
  document.querySelectorAll('.remote').forEach((el) => el.remove());
  $('local-video').srcObject = null;
  status(message);
  showHistory();
}

// ---- the call history ---------------------------------------------------------------------------

async function showHistory() {
  if (!state.token) return;
  const { calls } = await api('/api/calls?limit=20');
  $('history').replaceChildren(...calls.map((call) => {
    const others = new Set(call.invitations.flatMap((i) => [i.caller_id, i.callee_id]).filter((id) => id !== state.me));
    const tr = document.createElement('tr');
    tr.dataset.testid = 'history-row';
    tr.dataset.callId = call.id;
    tr.dataset.status = call.status;
    tr.dataset.duration = call.duration_seconds;
    for (const text of [new Date(call.created_at).toLocaleTimeString(), [...others].map(nameOf).join(', '), call.call_type,
      call.status, LIVE.includes(call.status) || call.status === 'active' ? '…' : `${call.duration_seconds} s`]) {
      tr.append(Object.assign(document.createElement('td'), { textContent: text }));
    }
    return tr;
  }));
}

// ---- wiring -------------------------------------------------------------------------------------

$('call-video').onclick = () => placeCall('video');
$('call-audio').onclick = () => placeCall('audio');
$('join-room').onclick = () => joinRoom({ room_name: $('room-to-join').value }, 'video');
$('hang-up').onclick = () => leaveRoom(true);
$('sign-out').onclick = () => { location.href = '/demo'; };
showSignIn().catch((error) => status(`Cannot load: ${error.message}`, true));
