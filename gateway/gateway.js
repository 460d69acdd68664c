// Request checks of the SDXL gateway (njs, loaded by nginx.conf.template). Written for njs 0.7.9
// (Debian bookworm) and later: no optional chaining, no shared dictionaries.
//
// What coglet does not check and this does, before a request reaches it:
//   - the API key (Authorization: Bearer KEY, or the bare KEY older SDXL servers used);
//   - prediction ids: coglet joins them into /tmp/coglet/predictions/<id>/ unsanitised;
//   - file inputs (Path inputs in the schema): coglet downloads any URL given for them, from any host,
//     and passes any other string to the predictor as a server path;
//   - webhooks, which make the server call out.
// And what coglet does wrong for a client that waits its turn: it answers 409 while its only slot
// is busy, even in the moment after it sent the previous response. The gateway waits for the slot
// (bounded) instead. coglet also has no GET /predictions/{id}: for an async request without a
// webhook the gateway gives coglet its own events listener as the webhook, keeps the latest state
// in a file and answers GET /predictions/{id} from it (to the key that started it).

const crypto = require('crypto');
const fs = require('fs');

const ID_PATTERN = /^[A-Za-z0-9_-]{1,64}$/;
const PREDICTION_PATH = /^\/predictions\/([^/?]*)$/;
const CANCEL_PATH = /^\/predictions\/([^/?]*)\/cancel$/;
const BUSY_TEXT = 'At capacity';
// Used when the schema cannot be read (coglet serves none without .cog/openapi_schema.json).
const FALLBACK_FILE_INPUTS = ['image', 'mask'];
// Host names that resolve inside a network by convention, never on the public internet.
const PRIVATE_SUFFIXES = ['localhost', 'local', 'internal', 'intranet', 'lan', 'home.arpa', 'corp', 'svc',
    'cluster.local', 'arpa'];
const DEFAULT_QUEUE_WAIT_S = 60;
// How often a waiting request asks coglet whether the slot is free: small next to any prediction.
const POLL_MS = 50;
const QUEUE_RETRY_AFTER_S = 5;
// States in which waiting cannot help: only a restart does.
const DEAD_STATES = ['SETUP_FAILED', 'DEFUNCT', 'UNHEALTHY'];
const TERMINAL_STATUSES = ['succeeded', 'failed', 'canceled'];
// How long an async prediction's state stays readable: long enough to collect, short enough that
// images do not pile up in the gateway's run directory.
const STATE_KEEP_MS = 3600 * 1000;

function sendJson(r, status, error, headers) {
    r.headersOut['Content-Type'] = 'application/json';
    if (headers) {
        Object.keys(headers).forEach(function (name) { r.headersOut[name] = headers[name]; });
    }
    r.return(status, JSON.stringify({ error: error }));
}

// -- keys -----------------------------------------------------------------------------------------

function sha256(text) {
    return crypto.createHash('sha256').update(text).digest('hex');
}

function configuredKeys() {
    const keys = [];
    const fromEnv = process.env.SDXL_API_KEYS || '';
    fromEnv.split(',').forEach(function (key) { keys.push(key.trim()); });
    const file = process.env.SDXL_API_KEYS_FILE;
    if (file) {
        fs.readFileSync(file, 'utf8').split('\n').forEach(function (line) {
            const key = line.trim();
            if (!key.startsWith('#')) {
                keys.push(key);
            }
        });
    }
    return keys.filter(function (key) { return key.length > 0; });
}

function presentedKey(r) {
    const header = r.headersIn.Authorization;
    if (!header) {
        return '';
    }
    const match = /^Bearer\s+(.*)$/i.exec(header);
    return (match ? match[1] : header).trim();
}

// 'ok', or why not: 'missing', 'wrong', 'no keys configured', 'file unreadable'.
function keyCheck(r) {
    let keys;
    try {
        keys = configuredKeys();
    } catch (e) {
        r.error('gateway: cannot read SDXL_API_KEYS_FILE: ' + e.message);
        return 'file unreadable';
    }
    if (keys.length === 0) {
        return process.env.SDXL_OPEN_ACCESS === '1' ? 'ok' : 'no keys configured';
    }
    const key = presentedKey(r);
    if (!key) {
        return 'missing';
    }
    // Compare digests, so the time taken says nothing about how much of a key was right.
    const digest = sha256(key);
    return keys.some(function (k) { return sha256(k) === digest; }) ? 'ok' : 'wrong';
}

function authorize(r) {
    const verdict = keyCheck(r);
    if (verdict === 'ok') {
        return true;
    }
    // Logged without the key: who, what, and why it was refused.
    r.warn('gateway: refused ' + r.method + ' ' + r.uri + ' from ' + r.remoteAddress + ': key ' + verdict);
    if (verdict === 'file unreadable') {
        sendJson(r, 503, 'The gateway cannot read its key file (SDXL_API_KEYS_FILE); see its error log');
    } else if (verdict === 'no keys configured') {
        sendJson(r, 503, 'The gateway has no API keys configured (SDXL_API_KEYS or SDXL_API_KEYS_FILE); ' +
            'set one, or SDXL_OPEN_ACCESS=1 for an open server');
    } else {
        sendJson(r, 401, verdict === 'missing'
            ? 'Missing API key: send "Authorization: Bearer <key>"'
            : 'Invalid API key', { 'WWW-Authenticate': 'Bearer' });
    }
    return false;
}

// The rate-limit key: a valid key's digest, or the client's address.
function clientId(r) {
    const key = presentedKey(r);
    if (key && keyCheck(r) === 'ok') {
        return 'key:' + sha256(key).slice(0, 16);
    }
    return 'addr:' + r.remoteAddress;
}

// Who may read an async prediction back: the digest of the key that started it.
function ownerToken(r) {
    return 'key:' + sha256(presentedKey(r));
}

// -- ids ------------------------------------------------------------------------------------------

// The path as the client sent it, before nginx decoded %2F or resolved dot segments.
function rawPath(r) {
    return r.variables.request_uri.split('?')[0];
}

function badId(r, where) {
    sendJson(r, 400, 'Invalid prediction id in the ' + where + ': use 1 to 64 letters, digits, "_" or "-"');
}

// -- URLs -----------------------------------------------------------------------------------------

function envFlag(name) {
    return process.env[name] === '1';
}

// Why `url` may not be fetched by the server, or '' if it may: http(s) to a public host name on the
// default port. Names are judged as written (njs cannot resolve them as coglet will): IP literals,
// single-label names and private suffixes are refused; a public name that resolves to a private
// address needs the network's egress policy.
function publicUrlProblem(url) {
    const match = /^(https?):\/\/([^/?#]*)/i.exec(url);
    if (!match) {
        return 'not an http(s) URL';
    }
    const authority = match[2];
    if (authority.indexOf('@') >= 0) {
        return 'user names in URLs are not accepted';
    }
    const hostPort = /^([^:]*)(?::(\d*))?$/.exec(authority);
    if (!hostPort) {
        return 'IP address literals are not accepted; use a public host name';
    }
    const host = hostPort[1].toLowerCase().replace(/\.$/, '');
    const port = hostPort[2];
    if (port && port !== '80' && port !== '443') {
        return 'only the default ports 80 and 443 are accepted';
    }
    const labels = host.split('.');
    const tld = labels[labels.length - 1];
    if (labels.length < 2 || !/^[a-z][a-z0-9-]*[a-z0-9]$/.test(tld)) {
        return 'IP address literals and single-label names are not accepted; use a public host name';
    }
    const internal = PRIVATE_SUFFIXES.some(function (suffix) {
        return host === suffix || host.endsWith('.' + suffix);
    });
    return internal ? 'host ' + host + ' is internal' : '';
}

// -- the request body -----------------------------------------------------------------------------

async function fileInputNames(r) {
    const reply = await r.subrequest('/_coglet/openapi.json', { method: 'GET' });
    if (reply.status !== 200) {
        return FALLBACK_FILE_INPUTS;
    }
    try {
        const properties = JSON.parse(reply.responseText).components.schemas.Input.properties;
        return Object.keys(properties).filter(function (name) { return properties[name].format === 'uri'; });
    } catch (e) {
        return FALLBACK_FILE_INPUTS;
    }
}

function fileInputProblem(name, value) {
    if (typeof value !== 'string') {
        return '';  // coglet's own validation answers for wrong types
    }
    if (value.startsWith('data:')) {
        return '';
    }
    if (!/^https?:\/\//i.test(value)) {
        return 'Input "' + name + '" must be a data: URI (the file\'s bytes, base64-encoded)' +
            (envFlag('SDXL_GATEWAY_ALLOW_URL_INPUTS') ? ' or an http(s) URL on a public host' : '');
    }
    if (!envFlag('SDXL_GATEWAY_ALLOW_URL_INPUTS')) {
        return 'Input "' + name + '" is a URL, and this server does not download URLs for file inputs: ' +
            'send the file as a data: URI (data:image/png;base64,...) instead';
    }
    const problem = publicUrlProblem(value);
    return problem ? 'Input "' + name + '" URL refused: ' + problem : '';
}

function webhookProblem(body) {
    if (body.webhook === undefined || body.webhook === null) {
        return '';
    }
    if (!envFlag('SDXL_GATEWAY_ALLOW_WEBHOOKS')) {
        return 'Webhooks are not enabled on this server (they make it call out); ' +
            'make a synchronous request, or ask the operator to set SDXL_GATEWAY_ALLOW_WEBHOOKS=1';
    }
    const problem = typeof body.webhook === 'string' ? publicUrlProblem(body.webhook) : 'not a string';
    return problem ? 'Webhook URL refused: ' + problem : '';
}

// The first reason to refuse the body, or ''.
async function bodyProblem(r, body, pathId) {
    if (body === null || typeof body !== 'object' || Array.isArray(body)) {
        return 'The body must be a JSON object: {"input": {...}}';
    }
    if (body.id !== undefined && body.id !== null) {
        if (typeof body.id !== 'string' || !ID_PATTERN.test(body.id)) {
            return 'Invalid prediction id in the body: use 1 to 64 letters, digits, "_" or "-"';
        }
        if (pathId && body.id !== pathId) {
            return 'The body\'s id differs from the id in the path';
        }
    }
    const webhook = webhookProblem(body);
    if (webhook) {
        return webhook;
    }
    const input = body.input;
    if (input !== null && typeof input === 'object') {
        const names = await fileInputNames(r);
        for (let i = 0; i < names.length; i++) {
            const problem = fileInputProblem(names[i], input[names[i]]);
            if (problem) {
                return problem;
            }
        }
    }
    return '';
}

// -- waiting for the slot -------------------------------------------------------------------------

function sleep(ms) {
    return new Promise(function (resolve) { setTimeout(resolve, ms); });
}

function queueWaitMs() {
    const seconds = Number(process.env.SDXL_GATEWAY_QUEUE_WAIT_S || DEFAULT_QUEUE_WAIT_S);
    return (isFinite(seconds) && seconds >= 0 ? seconds : DEFAULT_QUEUE_WAIT_S) * 1000;
}

async function healthStatus(r) {
    const reply = await r.subrequest('/_coglet/health-check', { method: 'GET' });
    try {
        return JSON.parse(reply.responseText).status;
    } catch (e) {
        return 'NO ANSWER';
    }
}

// Wait until coglet says READY; 'READY', a dead state, or 'TIMEOUT' at the deadline.
async function waitForReady(r, deadline) {
    for (;;) {
        const status = await healthStatus(r);
        if (status === 'READY' || DEAD_STATES.indexOf(status) >= 0) {
            return status;
        }
        if (Date.now() >= deadline) {
            return 'TIMEOUT';
        }
        await sleep(POLL_MS);
    }
}

function isBusy(reply) {
    return reply.status === 409 && reply.responseText.indexOf(BUSY_TEXT) >= 0;
}

// Send the prediction to coglet; while it says it is busy, wait for READY and send it again, until
// the wait bound. The body is the parent request's (kept in memory) unless `body` replaces it.
async function forwardWhenFree(r, target, body) {
    const waitMs = queueWaitMs();
    const deadline = Date.now() + waitMs;
    for (;;) {
        const options = { method: r.method };
        if (body !== undefined) {
            options.body = body;
        }
        const reply = await r.subrequest(target, options);
        if (!isBusy(reply)) {
            return reply;
        }
        if (Date.now() >= deadline) {
            return { refusal: 'Server busy: the prediction slot did not free up within ' + waitMs / 1000 + ' s' };
        }
        const status = await waitForReady(r, deadline);
        if (status === 'TIMEOUT') {
            return { refusal: 'Server busy: the prediction slot did not free up within ' + waitMs / 1000 + ' s' };
        }
        if (status !== 'READY') {
            return { refusal: 'The model server is ' + status + ' and needs a restart' };
        }
    }
}

// -- async predictions the gateway tracks ------------------------------------------------------------

function statePath(r, id, suffix) {
    return r.variables.sdxl_state_dir + '/' + id + suffix;
}

function exists(path) {
    try {
        fs.statSync(path);
        return true;
    } catch (e) {
        return false;
    }
}

function writeAtomically(path, text) {
    fs.writeFileSync(path + '.tmp', text);
    fs.renameSync(path + '.tmp', path);
}

// An async request without a webhook gets the gateway's own, with every event, so that its
// progress (the step lines in its logs) can be read back.
function tracksAsync(r, body) {
    const prefer = r.headersIn.Prefer || '';
    return prefer.indexOf('respond-async') >= 0 && (body.webhook === undefined || body.webhook === null);
}

function forgetOldStates(r) {
    const dir = r.variables.sdxl_state_dir;
    const now = Date.now();
    fs.readdirSync(dir).forEach(function (name) {
        try {
            if (now - fs.statSync(dir + '/' + name).mtimeMs > STATE_KEEP_MS) {
                fs.unlinkSync(dir + '/' + name);
            }
        } catch (e) {
            // already gone
        }
    });
}

function recordOwner(r, reply) {
    let accepted;
    try {
        accepted = JSON.parse(reply.responseText);
    } catch (e) {
        return;
    }
    if (!accepted || typeof accepted.id !== 'string' || !ID_PATTERN.test(accepted.id)) {
        return;
    }
    // The first owner stays: a PUT that repeats someone's id must not make their prediction its own.
    if (!exists(statePath(r, accepted.id, '.owner'))) {
        fs.writeFileSync(statePath(r, accepted.id, '.owner'), ownerToken(r));
    }
    if (!exists(statePath(r, accepted.id, '.json'))) {
        writeAtomically(statePath(r, accepted.id, '.json'), reply.responseText);  // no event yet
    }
}

// POST /events on the internal listener: coglet's webhook, the whole prediction each time.
function storeEvent(r) {
    let prediction;
    try {
        prediction = JSON.parse(r.requestText || '');
    } catch (e) {
        return r.return(400);
    }
    if (!prediction || typeof prediction.id !== 'string' || !ID_PATTERN.test(prediction.id)) {
        return r.return(400);
    }
    const path = statePath(r, prediction.id, '.json');
    try {
        // Events may overtake each other; a finished prediction stays finished.
        const known = JSON.parse(fs.readFileSync(path, 'utf8'));
        if (TERMINAL_STATUSES.indexOf(known.status) >= 0 && TERMINAL_STATUSES.indexOf(prediction.status) < 0) {
            return r.return(200);
        }
    } catch (e) {
        // first event
    }
    writeAtomically(path, r.requestText);
    r.return(200);
}

// GET /predictions/{id}: the latest state of an async prediction this gateway started.
function readPrediction(r, id) {
    let owner = '';
    let state = '';
    try {
        owner = fs.readFileSync(statePath(r, id, '.owner'), 'utf8');
        state = fs.readFileSync(statePath(r, id, '.json'), 'utf8');
    } catch (e) {
        owner = '';
    }
    // Someone else's prediction reads as unknown, not as forbidden.
    if (!state || owner !== ownerToken(r)) {
        return sendJson(r, 404, 'No async prediction ' + id + ' started with this key (states are kept for ' +
            STATE_KEEP_MS / 60000 + ' minutes)');
    }
    r.headersOut['Content-Type'] = 'application/json';
    r.return(200, state);
}

// -- handlers -------------------------------------------------------------------------------------

// POST /predictions and PUT /predictions/{id}.
async function predict(r) {
    if (!authorize(r)) {
        return;
    }
    let pathId = '';
    if (r.uri !== '/predictions') {
        const match = PREDICTION_PATH.exec(rawPath(r));
        if (!match || !ID_PATTERN.test(match[1])) {
            return badId(r, 'path');
        }
        if (r.method === 'GET') {
            return readPrediction(r, match[1]);
        }
        if (r.method !== 'PUT') {
            return sendJson(r, 405, 'Use PUT /predictions/{id} (or POST /predictions)');
        }
        pathId = match[1];
    } else if (r.method !== 'POST') {
        return sendJson(r, 405, 'Use POST /predictions');
    }
    let body;
    try {
        body = JSON.parse(r.requestText || '');
    } catch (e) {
        return sendJson(r, 400, 'The body is not valid JSON: ' + e.message);
    }
    const problem = await bodyProblem(r, body, pathId);
    if (problem) {
        return sendJson(r, 400, problem);
    }
    const tracked = tracksAsync(r, body);
    let forwarded;  // the parent's own body, unless the gateway adds its webhook
    if (tracked) {
        forgetOldStates(r);
        body.webhook = r.variables.sdxl_events_url;
        body.webhook_events_filter = ['start', 'output', 'logs', 'completed'];
        forwarded = JSON.stringify(body);
    }
    const target = '/_coglet' + (pathId ? '/predictions/' + pathId : '/predictions');
    const reply = await forwardWhenFree(r, target, forwarded);
    if (reply.refusal) {
        return sendJson(r, 503, reply.refusal, { 'Retry-After': String(QUEUE_RETRY_AFTER_S) });
    }
    if (tracked && reply.status === 202) {
        recordOwner(r, reply);
    }
    r.headersOut['Content-Type'] = reply.headersOut['Content-Type'] || 'application/json';
    r.return(reply.status, reply.responseText);
}

// POST /predictions/{id}/cancel
function cancel(r) {
    if (!authorize(r)) {
        return;
    }
    const match = CANCEL_PATH.exec(rawPath(r));
    if (!match || !ID_PATTERN.test(match[1])) {
        return badId(r, 'path');
    }
    r.internalRedirect('@coglet');
}

// GET /openapi.json
function passThrough(r) {
    if (authorize(r)) {
        r.internalRedirect('@coglet');
    }
}

function notFound(r) {
    if (rawPath(r).startsWith('/predictions')) {
        return badId(r, 'path');
    }
    sendJson(r, 404, 'Not found. The API: GET /health-check, GET /openapi.json, POST /predictions, ' +
        'PUT /predictions/{id}, POST /predictions/{id}/cancel; pages: / and /docs/');
}

export default { clientId, predict, cancel, passThrough, notFound, storeEvent };
