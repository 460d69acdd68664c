// Async predictions the gateway follows for its clients. A request with Prefer: respond-async and no
// webhook of its own gets the gateway's events listener as its webhook, with the prediction's id and
// a secret made for this start in the URL; coglet's events land in <store>/states/<id>.json (outputs
// as files, outputs.js), which GET /predictions/{id} serves to the key that started it.

import common from 'common.js';
import datauris from 'datauris.js';
import records from 'records.js';
import outputs from 'outputs.js';

const fs = require('fs');

const TERMINAL_STATUSES = ['succeeded', 'failed', 'canceled'];

// No "output" events: each would carry every output made so far as base64, and the final event
// carries them all once. The step lines arrive as "logs" events.
const EVENTS = ['start', 'logs', 'completed'];

const EVENT_PATH = /^\/events\/([A-Za-z0-9_-]{1,64})\/([0-9a-f]{32})$/;

// An async request without a webhook of its own.
function tracksAsync(r, body) {
    const prefer = r.headersIn.Prefer || '';
    return prefer.indexOf('respond-async') >= 0 && (body.webhook === undefined || body.webhook === null);
}

function readState(r, id) {
    try {
        return JSON.parse(fs.readFileSync(records.statePath(r, id), 'utf8'));
    } catch (e) {
        return null;
    }
}

function isTerminal(state) {
    return state !== null && TERMINAL_STATUSES.indexOf(state.status) >= 0;
}

// Before the body goes to coglet: the webhook with this start's secret, and a first state. A record
// already tracked keeps its secret while its prediction runs (coglet answers a repeated PUT with the
// running prediction and ignores the new webhook); once it has finished, the id starts afresh.
function start(r, id, claimed, body) {
    const record = claimed.record;
    const running = record.secret && !isTerminal(readState(r, id));
    if (!running) {
        record.secret = common.randomToken();
        records.update(r, id, record);
        records.forgetFiles(r, id);
        records.writeAtomically(records.statePath(r, id), JSON.stringify({ id: id, status: 'starting' }));
    }
    body.webhook = r.variables.sdxl_events_url + '/' + id + '/' + record.secret;
    body.webhook_events_filter = EVENTS;
}

// The state of a prediction that coglet did not take (invalid input, busy past the wait bound).
function notStarted(r, id, answer) {
    const state = { id: id, status: 'failed', error: 'Not started: ' + String(answer).slice(0, 2000) };
    records.writeAtomically(records.statePath(r, id), JSON.stringify(state));
}

// What a state keeps of a data: URI other than an output (an input image or mask: up to 48 MB).
function described(uri) {
    return 'data: URI of ' + uri.length + ' bytes (not kept by the gateway)';
}

// The access check of the events listener: a webhook URL the gateway gave coglet for this start.
function checkEvent(r) {
    const match = EVENT_PATH.exec(common.rawPath(r));
    const method = r.variables.request.split(' ')[0];
    const record = match ? records.read(r, match[1]) : null;
    const valid = method === 'POST' && record !== null && typeof record.secret === 'string' &&
        common.sameSecret(record.secret, match[2]);
    if (!valid) {
        r.warn('gateway: refused a webhook event that no prediction started here was given');
    }
    r.return(valid ? 204 : 403);
}

// POST /events/<id>/<secret> on the internal listener: coglet's webhook, the whole prediction each time.
function storeEvent(r) {
    const id = EVENT_PATH.exec(common.rawPath(r))[1];
    const parts = datauris.split(r.requestBuffer || Buffer.from(''));
    let prediction;
    try {
        prediction = JSON.parse(parts.text);
    } catch (e) {
        return r.return(400);
    }
    if (!prediction || prediction.id !== id) {
        return r.return(400);
    }
    // Events may overtake each other; a finished prediction stays finished.
    if (isTerminal(readState(r, id)) && !isTerminal(prediction)) {
        return r.return(200);
    }
    prediction.output = outputs.store(r, id, prediction.output, parts);
    const state = JSON.stringify(prediction, function (key, value) {
        const uri = datauris.uriOf(parts, value);
        return uri ? described(uri) : value;
    });
    records.writeAtomically(records.statePath(r, id), state);
    r.return(200);
}

export default { tracksAsync, start, notStarted, checkEvent, storeEvent };
