// Waiting for coglet's prediction slot instead of passing its 409 on, within a bound.

const BUSY_TEXT = 'At capacity';

const DEFAULT_QUEUE_WAIT_S = 60;

// How often a waiting request asks coglet whether the slot is free: small next to any prediction.
const POLL_MS = 50;

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

// PUT the prediction to coglet; while it says it is busy, wait for READY and send it again, until
// the wait bound. The body is the parent request's (kept in memory) unless `body` replaces it.
async function forwardWhenFree(r, target, body) {
    const waitMs = queueWaitMs();
    const deadline = Date.now() + waitMs;
    for (;;) {
        const options = { method: 'PUT' };
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

export default { forwardWhenFree };
