// Request handlers of the SDXL gateway (njs, loaded by nginx.conf.template). Written for njs 0.7.9
// (Debian bookworm) and later: no optional chaining, no shared dictionaries.
//
// What coglet does not check and the gateway does, before a request reaches it:
//   - the API key (Authorization: Bearer KEY, or the bare KEY older SDXL servers used), on the
//     headers, before any body is read (access.js, in nginx's access phase);
//   - who owns a prediction id: the key that started it (records.js); the gateway makes a random id
//     for every prediction sent without one, so ids are never guessable;
//   - prediction ids: coglet joins them into /tmp/coglet/predictions/<id>/ unsanitised;
//   - file inputs (Path inputs in the schema): coglet downloads any URL given for them, from any host,
//     and passes any other string to the predictor as a server path;
//   - webhooks, which make the server call out.
// And what coglet does wrong for a client that waits its turn: it answers 409 while its only slot
// is busy, even in the moment after it sent the previous response. The gateway waits for the slot
// (bounded) instead. coglet also has no GET /predictions/{id}: the gateway follows async predictions
// itself (tracking.js) and serves their states and outputs as files.

import common from 'common.js';
import datauris from 'datauris.js';
import keys from 'keys.js';
import access from 'access.js';
import records from 'records.js';
import checks from 'checks.js';
import slot from 'slot.js';
import tracking from 'tracking.js';

const PREDICTION_PATH = /^\/predictions\/([^/]*)$/;
const CANCEL_PATH = /^\/predictions\/([^/]*)\/cancel$/;

const QUEUE_RETRY_AFTER_S = 5;

// What an open /health-check tells a caller without a key: what probes and load balancers need.
const OPEN_HEALTH_FIELDS = ['status'];

// POST /predictions and PUT /predictions/{id}, after access.js has let them through.
async function predict(r) {
    const pathId = r.uri === '/predictions' ? '' : PREDICTION_PATH.exec(common.rawPath(r))[1];
    // The body's data: URIs (image, mask) stay where nginx read them; the rest is parsed.
    const parts = datauris.split(r.requestBuffer || Buffer.from(''));
    let body;
    try {
        body = JSON.parse(parts.text);
    } catch (e) {
        return common.sendJson(r, 400, 'The body is not valid JSON: ' + e.message);
    }
    const problem = await checks.bodyProblem(r, body, pathId);
    if (problem) {
        return common.sendJson(r, 400, problem);
    }
    // 1. The id: the client's, or one nobody can guess; it must be free or this key's.
    const id = pathId || body.id || common.randomToken();
    const claimed = records.claim(r, id);
    if (!claimed) {
        return common.sendJson(r, 404, access.takenMessage(id));
    }
    records.sweep(r);
    // 2. An async prediction without a webhook of its own: the gateway's, and a first state.
    const tracked = tracking.tracksAsync(r, body);
    let forwarded;  // the parent's own body, unless the gateway adds its webhook
    if (tracked) {
        tracking.start(r, id, claimed, body);
        forwarded = datauris.join(JSON.stringify(body), parts);
    }
    // 3. To coglet, always with the id in the path (the body's id, if any, is the same).
    const reply = await slot.forwardWhenFree(r, id, '/_coglet/predictions/' + id, forwarded);
    if (reply.canceled) {
        return answerCanceled(r, id, tracked);
    }
    const started = reply.status === 200 || reply.status === 202;
    // A prediction that never started leaves no claim; nor does a finished sync one under an id
    // the gateway made, which nobody else can know. One that reused its owner's id says it failed.
    if (claimed.fresh && (!started || (reply.status === 200 && !pathId && !body.id))) {
        records.release(r, id);
    } else if (tracked && !started) {
        tracking.notStarted(r, id, reply.refusal || reply.responseText);
    }
    if (reply.refusal) {
        return common.sendJson(r, 503, reply.refusal, { 'Retry-After': String(QUEUE_RETRY_AFTER_S) });
    }
    r.headersOut['Content-Type'] = reply.headersOut['Content-Type'] || 'application/json';
    r.return(reply.status, reply.responseText);
}

// A prediction its owner canceled while it waited for the slot: it never reached coglet. Answered as
// coglet answers a canceled one (200, whether sync or async: it is finished); the id stays the key's,
// and an async one the gateway follows keeps this as its state.
function answerCanceled(r, id, tracked) {
    const prediction = JSON.stringify({ id: id, logs: '', status: 'canceled' });
    if (tracked) {
        records.writeAtomically(records.statePath(r, id), prediction);
    }
    r.headersOut['Content-Type'] = 'application/json';
    r.return(200, prediction);
}

// POST /predictions/{id}/cancel, after access.js has let it through (the id is this key's). coglet
// knows only the prediction it runs (404 for any other); one still waiting here is canceled here.
async function cancel(r) {
    const id = CANCEL_PATH.exec(common.rawPath(r))[1];
    const reply = await r.subrequest('/_coglet/predictions/' + id + '/cancel', { method: 'POST' });
    r.headersOut['Content-Type'] = 'application/json';
    if (reply.status === 404 && records.cancelQueued(r, id)) {
        return r.return(200, '{}');  // coglet's answer to a cancel it carried out
    }
    r.return(reply.status, reply.responseText);
}

// GET /health-check: the status for anyone (probes), coglet's whole answer for a key.
async function health(r) {
    if (r.method !== 'GET' && r.method !== 'HEAD') {
        return common.sendJson(r, 405, 'Use GET /health-check');
    }
    const reply = await r.subrequest('/_coglet/health-check', { method: 'GET' });
    if (reply.status !== 200) {
        return common.sendJson(r, 503, 'The model server is not answering (starting or restarting); retry shortly',
            { 'Retry-After': '5' });
    }
    const verdict = keys.keyCheck(r);
    let text = reply.responseText;
    if (verdict !== 'ok' && verdict !== 'open') {
        let full = {};
        try {
            full = JSON.parse(text);
        } catch (e) {
            // an answer without a status reads as none
        }
        const open = {};
        OPEN_HEALTH_FIELDS.forEach(function (name) { open[name] = full[name]; });
        text = JSON.stringify(open);
    }
    r.headersOut['Content-Type'] = 'application/json';
    r.return(200, text);
}

export default {
    clientId: keys.clientId,
    checkAccess: access.checkAccess,
    checkEvent: tracking.checkEvent,
    storeEvent: tracking.storeEvent,
    predict,
    cancel,
    health,
};
