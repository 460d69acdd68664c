// What every part of the gateway shares: JSON answers, digests, random tokens, prediction ids.

const crypto = require('crypto');

const ID_PATTERN = /^[A-Za-z0-9_-]{1,64}$/;

// Ids the gateway hands out and the secrets in its webhook URLs: 128 random bits, as hex.
const TOKEN_BYTES = 16;

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

// Whether two secrets are equal, in a time that says nothing about how much of them matched.
function sameSecret(a, b) {
    return sha256(a) === sha256(b);
}

function randomToken() {
    const bytes = new Uint8Array(TOKEN_BYTES);
    globalThis.crypto.getRandomValues(bytes);
    return Buffer.from(bytes).toString('hex');
}

// The path as the client sent it, before nginx decoded %2F or resolved dot segments. In an
// auth_request subrequest this is still the client's request.
function rawPath(r) {
    return r.variables.request_uri.split('?')[0];
}

const BAD_ID = 'Invalid prediction id in the path: use 1 to 64 letters, digits, "_" or "-"';

export default { ID_PATTERN, BAD_ID, sendJson, sha256, sameSecret, randomToken, rawPath };
