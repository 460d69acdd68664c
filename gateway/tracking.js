// Async predictions the gateway follows for its clients: coglet's webhook events, kept as files in
// the run directory, read back by GET /predictions/{id}.

import common from 'common.js';

import keys from 'keys.js';

const fs = require('fs');

const TERMINAL_STATUSES = ['succeeded', 'failed', 'canceled'];

// How long an async prediction's state stays readable: long enough to collect, short enough that
// images do not pile up in the gateway's run directory.
const STATE_KEEP_MS = 3600 * 1000;

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
    if (!accepted || typeof accepted.id !== 'string' || !common.ID_PATTERN.test(accepted.id)) {
        return;
    }
    // The first owner stays: a PUT that repeats someone's id must not make their prediction its own.
    if (!exists(statePath(r, accepted.id, '.owner'))) {
        fs.writeFileSync(statePath(r, accepted.id, '.owner'), keys.ownerToken(r));
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
    if (!prediction || typeof prediction.id !== 'string' || !common.ID_PATTERN.test(prediction.id)) {
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
    if (!state || owner !== keys.ownerToken(r)) {
        return common.sendJson(r, 404, 'No async prediction ' + id + ' started with this key (states are kept for ' +
            STATE_KEEP_MS / 60000 + ' minutes)');
    }
    r.headersOut['Content-Type'] = 'application/json';
    r.return(200, state);
}

export default { tracksAsync, forgetOldStates, recordOwner, storeEvent, readPrediction };
