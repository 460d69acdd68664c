// Waiting for coglet's prediction slot instead of passing its 409 on, within a bound.

import records from 'records.js';

const BUSY_TEXT = 'At capacity';

const DEFAULT_QUEUE_WAIT_S = 60;

// How often a waiting request asks coglet whether the slot is free: after 50 ms at first, so that a
// short wait stays short, then twice as long each time, up to 500 ms (small next to a prediction).
// Each ask costs: its subrequest's memory stays in the waiting request's pool until that request
// ends, and coglet runs the predictor's GPU check for it.
const FIRST_POLL_MS = 50;
const MAX_POLL_MS = 500;

// States in which waiting cannot help: only a restart does.
const DEAD_STATES = ['SETUP_FAILED', 'DEFUNCT', 'UNHEALTHY'];

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

// Wait until coglet says READY; 'READY', a dead state, 'CANCELED' (by the owner, records.js), or
// 'TIMEOUT' at the deadline.
async function waitForReady(r, id, deadline) {
    let pollMs = FIRST_POLL_MS;
    for (;;) {
        if (records.isCanceled(r, id)) {
            return 'CANCELED';
        }
        const status = await healthStatus(r);
        if (status === 'READY' || DEAD_STATES.indexOf(status) >= 0) {
            return status;
        }
        const left = deadline - Date.now();
        if (left <= 0) {
            return 'TIMEOUT';
        }
        await sleep(Math.min(pollMs, left));
        pollMs = Math.min(pollMs * 2, MAX_POLL_MS);
    }
}

function isBusy(reply) {
    return reply.status === 409 && reply.responseText.indexOf(BUSY_TEXT) >= 0;
}

// PUT the prediction to coglet; while it says it is busy, wait for READY and send it again, until
// the wait bound. The body is the parent request's (kept in memory) unless `body` replaces it.
// { canceled: true } if the owner canceled it while it waited (it never reached coglet).
async function forwardWhenFree(r, id, target, body) {
    const waitMs = queueWaitMs();
    const deadline = Date.now() + waitMs;
    const options = { method: 'PUT' };
    if (body !== undefined) {
        options.body = body;
    }
    for (;;) {
        const reply = await r.subrequest(target, options);
        if (!isBusy(reply)) {
            return reply;
        }
        records.setQueued(r, id, true);
        const status = Date.now() >= deadline ? 'TIMEOUT' : await waitForReady(r, id, deadline);
        // Off the queue before it is sent again: from then on, coglet answers its cancel.
        if (records.setQueued(r, id, false)) {
            return { canceled: true };
        }
        if (status === 'TIMEOUT') {
            return { refusal: 'Server busy: the prediction slot did not free up within ' + waitMs / 1000 + ' s' };
        }
        if (status !== 'READY') {
            return { refusal: 'The model server is ' + status + ' and needs a restart' };
        }
    }
}

export default { forwardWhenFree };
