// What every part of the gateway shares: JSON answers, digests, and prediction ids.

const crypto = require('crypto');

const ID_PATTERN = /^[A-Za-z0-9_-]{1,64}$/;

function sendJson(r, status, error, headers) {
    r.headersOut['Content-Type'] = 'application/json';
    if (headers) {
        Object.keys(headers).forEach(function (name) { r.headersOut[name] = headers[name]; });
    }
    r.return(status, JSON.stringify({ error: error }));
}

function sha256(text) {
    return crypto.createHash('sha256').update(text).digest('hex');
}

// The path as the client sent it, before nginx decoded %2F or resolved dot segments.
function rawPath(r) {
    return r.variables.request_uri.split('?')[0];
}

function badId(r, where) {
    sendJson(r, 400, 'Invalid prediction id in the ' + where + ': use 1 to 64 letters, digits, "_" or "-"');
}

export default { ID_PATTERN, sendJson, sha256, rawPath, badId };
