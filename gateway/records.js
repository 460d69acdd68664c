// Who owns each prediction id: one small file per id in the gateway's store, created atomically
// (O_EXCL), so the rule holds across nginx reloads and worker restarts and two keys that claim an id
// at the same moment cannot both get it. A record is kept for RETENTION_MS after its prediction's
// last news, so an id used by one key cannot be taken by another within that time.
//
//   <store>/ids/<id>            {"owner": "key:<sha256 of the key>", "secret": "<hex>" (tracked only)}
//   <store>/states/<id>.json    an async prediction's latest state (tracking.js)
//   <store>/files/<id>.<n>.<ext> its outputs (outputs.js)

import keys from 'keys.js';

const fs = require('fs');

// Long enough to collect an async prediction's result, short enough that records do not pile up.
const RETENTION_MS = 3600 * 1000;

// Forgetting expired records lists the store: at most once a minute.
const SWEEP_INTERVAL_MS = 60 * 1000;

function store(r) {
    return r.variables.sdxl_store;
}

function recordPath(r, id) {
    return store(r) + '/ids/' + id;
}

function statePath(r, id) {
    return store(r) + '/states/' + id + '.json';
}

function writeAtomically(path, text) {
    fs.writeFileSync(path + '.tmp', text);
    fs.renameSync(path + '.tmp', path);
}

// When the id last had news: its record written, or its state.
function lastNewsMs(r, id) {
    return Math.max(modifiedMs(recordPath(r, id)), modifiedMs(statePath(r, id)));
}

function expired(r, id) {
    return Date.now() - lastNewsMs(r, id) > RETENTION_MS;
}

// The id's record; null if there is none, or it has expired. One that cannot be read (a claim cut
// short) owns the id for nobody, so it is refused to everyone until it expires.
function read(r, id) {
    if (expired(r, id)) {
        return null;
    }
    let text;
    try {
        text = fs.readFileSync(recordPath(r, id), 'utf8');
    } catch (e) {
        return null;
    }
    try {
        return JSON.parse(text);
    } catch (e) {
        return { owner: '' };
    }
}

function isOwner(r, record) {
    return record !== null && record.owner === keys.ownerToken(r);
}

// Claim `id` for this request's key: { record, fresh } if it is free or already this key's, else null.
function claim(r, id) {
    const record = { owner: keys.ownerToken(r) };
    if (expired(r, id)) {
        release(r, id);
    }
    let fd;
    try {
        fd = fs.openSync(recordPath(r, id), 'wx');
    } catch (e) {
        if (e.code !== 'EEXIST') {
            throw e;
        }
        const existing = read(r, id);
        return isOwner(r, existing) ? { record: existing, fresh: false } : null;
    }
    fs.writeSync(fd, JSON.stringify(record));
    fs.closeSync(fd);
    return { record: record, fresh: true };
}

function update(r, id, record) {
    writeAtomically(recordPath(r, id), JSON.stringify(record));
}

// A prediction waiting in the gateway for coglet's slot has not reached coglet, which answers 404 to
// its cancel: its record says so while it waits (slot.js), and its owner's cancel marks it there
// (gateway.js). Marks the id as waiting (queued true) or no longer (false), and says whether it was
// canceled meanwhile. One worker runs all njs code, without a pause between reading and writing.
function setQueued(r, id, queued) {
    const record = read(r, id);
    if (record === null) {
        return false;
    }
    const canceled = record.canceled === true;
    delete record.canceled;
    if (queued) {
        record.queued = true;
    } else {
        delete record.queued;
    }
    update(r, id, record);
    return canceled;
}

// Cancel the prediction if it is waiting for the slot; whether it was.
function cancelQueued(r, id) {
    const record = read(r, id);
    if (record === null || record.queued !== true) {
        return false;
    }
    record.canceled = true;
    update(r, id, record);
    return true;
}

function isCanceled(r, id) {
    const record = read(r, id);
    return record !== null && record.canceled === true;
}

// Give up a claim, and the state and outputs kept for it (its prediction was never started, or nobody
// can ask for it again). The outputs go too: whoever claims the id next would be served them.
function release(r, id) {
    forgetFiles(r, id);
    removeIfThere(statePath(r, id));
    removeIfThere(recordPath(r, id));
}

// Remove the id's outputs (<store>/files/<id>.<n>.<ext>): when it is released, or when its owner
// starts a new prediction under it.
function forgetFiles(r, id) {
    const dir = store(r) + '/files';
    fs.readdirSync(dir).forEach(function (name) {
        if (name.split('.')[0] === id) {
            removeIfThere(dir + '/' + name);
        }
    });
}

function modifiedMs(path) {
    try {
        return fs.statSync(path).mtimeMs;
    } catch (e) {
        return 0;
    }
}

function exists(path) {
    return modifiedMs(path) > 0;
}

function removeIfThere(path) {
    try {
        fs.unlinkSync(path);
    } catch (e) {
        // already gone
    }
}

// Forget ids whose last news (the record, or its state) is older than the retention time, and
// whatever is kept for ids without a record.
function sweep(r) {
    const marker = store(r) + '/.swept';
    const now = Date.now();
    if (now - modifiedMs(marker) < SWEEP_INTERVAL_MS) {
        return;
    }
    fs.writeFileSync(marker, '');
    fs.readdirSync(store(r) + '/ids').forEach(function (id) {
        if (expired(r, id)) {
            release(r, id);
        }
    });
    ['states', 'files'].forEach(function (kind) {
        fs.readdirSync(store(r) + '/' + kind).forEach(function (name) {
            const id = name.split('.')[0];
            if (!exists(recordPath(r, id))) {
                removeIfThere(store(r) + '/' + kind + '/' + name);
            }
        });
    });
}

export default {
    RETENTION_MS, read, isOwner, claim, update, setQueued, cancelQueued, isCanceled, release, forgetFiles, sweep,
    exists, statePath, writeAtomically,
};
