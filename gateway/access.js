// The access phase of every API request (auth_request /_access): it sees the request's headers and
// raw path, never its body, and runs before any body is read or any queue place is used for work.
// It answers 204 to let the request through; otherwise 401 (no valid key) or 403 with the status
// nginx is to answer (X-Sdxl-Status) and the JSON body (X-Sdxl-Error), see @refused in the config.
//
// Every prediction belongs to the key that started it: another key's GET, cancel or output request
// for it is answered exactly as one for an id that does not exist; its PUT, that the id is taken.

import common from 'common.js';
import keys from 'keys.js';
import records from 'records.js';
import outputs from 'outputs.js';

const KEPT_MINUTES = records.RETENTION_MS / 60000;

// With a body, so that nginx sends this answer as it is: without one, the subrequest would get the
// server's error page for its status instead, and lose these headers.
function refuse(r, status, error) {
    r.headersOut['X-Sdxl-Status'] = String(status);
    r.headersOut['X-Sdxl-Error'] = JSON.stringify({ error: error });
    r.return(status === 401 ? 401 : 403, 'refused');
}

function allow(r, file) {
    if (file) {
        r.headersOut['X-Sdxl-File'] = file;
    }
    r.return(204, '');
}

function unknown(r, id) {
    refuse(r, 404, 'No prediction ' + id + ' for this key (the gateway keeps ids and async results for ' +
        KEPT_MINUTES + ' minutes)');
}

// -- what each route asks of the key beyond being valid ------------------------------------------------

function anyKey(r) {
    allow(r);
}

// PUT /predictions/{id}: the id must be free or this key's (gateway.js claims it for good once the body is read).
function claimable(r, id) {
    const record = records.read(r, id);
    if (record !== null && !records.isOwner(r, record)) {
        return refuse(r, 404, takenMessage(id));
    }
    allow(r);
}

function takenMessage(id) {
    return 'Prediction id ' + id + ' cannot be used with this key: an id belongs to the key that used it for ' +
        KEPT_MINUTES + ' minutes. Choose another id, or send none and the gateway makes one';
}

// POST /predictions/{id}/cancel
function owned(r, id) {
    return records.isOwner(r, records.read(r, id)) ? allow(r) : unknown(r, id);
}

// GET /predictions/{id}: the state file, if the gateway follows this prediction.
function ownedState(r, id) {
    if (!records.isOwner(r, records.read(r, id))) {
        return unknown(r, id);
    }
    if (!records.exists(records.statePath(r, id))) {
        return refuse(r, 404, 'Prediction ' + id + ' is not followed by the gateway: only an async request ' +
            '(Prefer: respond-async) without a webhook of its own can be read back with GET');
    }
    allow(r, id + '.json');
}

// GET /predictions/{id}/outputs/{n}.{ext}
function ownedOutput(r, id, segment) {
    if (!records.isOwner(r, records.read(r, id))) {
        return unknown(r, id);
    }
    const file = outputs.fileName(id, segment);
    if (!file || !records.exists(outputs.path(r, file))) {
        return refuse(r, 404, 'Output ' + segment + ' of prediction ' + id + ' is not kept: GET /predictions/' + id +
            ' lists its outputs; the gateway keeps them for ' + KEPT_MINUTES + ' minutes at most, and removes ' +
            'the oldest first when its store is full (SDXL_GATEWAY_STORE_MAX)');
    }
    allow(r, file);
}

// Path (as sent), then the check for each method; an id is group 1, an output's name group 2.
const ROUTES = [
    { path: /^\/predictions$/, methods: { POST: anyKey } },
    { path: /^\/openapi\.json$/, methods: { GET: anyKey, HEAD: anyKey } },
    { path: /^\/predictions\/([^/]*)$/, methods: { PUT: claimable, GET: ownedState, HEAD: ownedState } },
    { path: /^\/predictions\/([^/]*)\/cancel$/, methods: { POST: owned } },
    { path: /^\/predictions\/([^/]*)\/outputs\/([^/]*)$/, methods: { GET: ownedOutput, HEAD: ownedOutput } },
];

const KEY_REFUSALS = {
    missing: [401, 'Missing API key: send "Authorization: Bearer <key>"'],
    wrong: [401, 'Invalid API key'],
    'file unreadable': [503, 'The gateway cannot read its key file (SDXL_API_KEYS_FILE); see its error log'],
    'no keys configured': [503, 'The gateway has no API keys configured (SDXL_API_KEYS or SDXL_API_KEYS_FILE); ' +
        'set one, or SDXL_OPEN_ACCESS=1 for an open server'],
};

const NOT_FOUND = 'Not found. The API: GET /health-check, GET /openapi.json, POST /predictions, ' +
    'PUT /predictions/{id}, GET /predictions/{id}, POST /predictions/{id}/cancel; pages: / and /docs/';

function checkAccess(r) {
    // The client's request line: this subrequest's own method is always GET.
    const method = r.variables.request.split(' ')[0];
    const path = common.rawPath(r);
    const route = ROUTES.filter(function (candidate) { return candidate.path.test(path); })[0];
    if (!route) {
        // Any other path: nothing there for anyone, key or not. One that nginx decoded into a
        // prediction path (%2F and the like) names no id anyone may use.
        return path.startsWith('/predictions') ? refuse(r, 400, common.BAD_ID) : refuse(r, 404, NOT_FOUND);
    }
    const verdict = keys.keyCheck(r);
    if (verdict !== 'ok' && verdict !== 'open') {
        // Logged without the key: who, what, and why it was refused.
        r.warn('gateway: refused ' + method + ' ' + path + ' from ' + r.remoteAddress + ': key ' + verdict);
        return refuse(r, KEY_REFUSALS[verdict][0], KEY_REFUSALS[verdict][1]);
    }
    const check = route.methods[method];
    if (!check) {
        return refuse(r, 405, 'Method ' + method + ' is not allowed for this path; it takes ' +
            Object.keys(route.methods).join(', '));
    }
    const match = route.path.exec(path);
    if (match[1] !== undefined && !common.ID_PATTERN.test(match[1])) {
        return refuse(r, 400, common.BAD_ID);
    }
    check(r, match[1], match[2]);
}

export default { checkAccess, takenMessage };
