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

import common from 'common.js';
import keys from 'keys.js';
import checks from 'checks.js';
import slot from 'slot.js';
import tracking from 'tracking.js';

const PREDICTION_PATH = /^\/predictions\/([^/?]*)$/;

const CANCEL_PATH = /^\/predictions\/([^/?]*)\/cancel$/;

const QUEUE_RETRY_AFTER_S = 5;

// -- handlers -------------------------------------------------------------------------------------

// POST /predictions and PUT /predictions/{id}.
async function predict(r) {
    if (!keys.authorize(r)) {
        return;
    }
    let pathId = '';
    if (r.uri !== '/predictions') {
        const match = PREDICTION_PATH.exec(common.rawPath(r));
        if (!match || !common.ID_PATTERN.test(match[1])) {
            return common.badId(r, 'path');
        }
        if (r.method === 'GET') {
            return tracking.readPrediction(r, match[1]);
        }
        if (r.method !== 'PUT') {
            return common.sendJson(r, 405, 'Use PUT /predictions/{id} (or POST /predictions)');
        }
        pathId = match[1];
    } else if (r.method !== 'POST') {
        return common.sendJson(r, 405, 'Use POST /predictions');
    }
    let body;
    try {
        body = JSON.parse(r.requestText || '');
    } catch (e) {
        return common.sendJson(r, 400, 'The body is not valid JSON: ' + e.message);
    }
    const problem = await checks.bodyProblem(r, body, pathId);
    if (problem) {
        return common.sendJson(r, 400, problem);
    }
    const tracked = tracking.tracksAsync(r, body);
    let forwarded;  // the parent's own body, unless the gateway adds its webhook
    if (tracked) {
        tracking.forgetOldStates(r);
        body.webhook = r.variables.sdxl_events_url;
        body.webhook_events_filter = ['start', 'output', 'logs', 'completed'];
        forwarded = JSON.stringify(body);
    }
    const target = '/_coglet' + (pathId ? '/predictions/' + pathId : '/predictions');
    const reply = await slot.forwardWhenFree(r, target, forwarded);
    if (reply.refusal) {
        return common.sendJson(r, 503, reply.refusal, { 'Retry-After': String(QUEUE_RETRY_AFTER_S) });
    }
    if (tracked && reply.status === 202) {
        tracking.recordOwner(r, reply);
    }
    r.headersOut['Content-Type'] = reply.headersOut['Content-Type'] || 'application/json';
    r.return(reply.status, reply.responseText);
}

// POST /predictions/{id}/cancel
function cancel(r) {
    if (!keys.authorize(r)) {
        return;
    }
    const match = CANCEL_PATH.exec(common.rawPath(r));
    if (!match || !common.ID_PATTERN.test(match[1])) {
        return common.badId(r, 'path');
    }
    r.internalRedirect('@coglet');
}

// GET /openapi.json
function passThrough(r) {
    if (keys.authorize(r)) {
        r.internalRedirect('@coglet');
    }
}

function notFound(r) {
    if (common.rawPath(r).startsWith('/predictions')) {
        return common.badId(r, 'path');
    }
    common.sendJson(r, 404, 'Not found. The API: GET /health-check, GET /openapi.json, POST /predictions, ' +
        'PUT /predictions/{id}, POST /predictions/{id}/cancel; pages: / and /docs/');
}

export default { clientId: keys.clientId, predict, cancel, passThrough, notFound, storeEvent: tracking.storeEvent };
