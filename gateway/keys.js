// API keys: SDXL_API_KEYS (comma-separated) and SDXL_API_KEYS_FILE (one per line), read at each
// request, so a rotated key file takes effect without a restart.

import common from 'common.js';

const fs = require('fs');

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
    const digest = common.sha256(key);
    return keys.some(function (k) { return common.sha256(k) === digest; }) ? 'ok' : 'wrong';
}

function authorize(r) {
    const verdict = keyCheck(r);
    if (verdict === 'ok') {
        return true;
    }
    // Logged without the key: who, what, and why it was refused.
    r.warn('gateway: refused ' + r.method + ' ' + r.uri + ' from ' + r.remoteAddress + ': key ' + verdict);
    if (verdict === 'file unreadable') {
        common.sendJson(r, 503, 'The gateway cannot read its key file (SDXL_API_KEYS_FILE); see its error log');
    } else if (verdict === 'no keys configured') {
        common.sendJson(r, 503, 'The gateway has no API keys configured (SDXL_API_KEYS or SDXL_API_KEYS_FILE); ' +
            'set one, or SDXL_OPEN_ACCESS=1 for an open server');
    } else {
        common.sendJson(r, 401, verdict === 'missing'
            ? 'Missing API key: send "Authorization: Bearer <key>"'
            : 'Invalid API key', { 'WWW-Authenticate': 'Bearer' });
    }
    return false;
}

// The rate-limit key: a valid key's digest, or the client's address.
function clientId(r) {
    const key = presentedKey(r);
    if (key && keyCheck(r) === 'ok') {
        return 'key:' + common.sha256(key).slice(0, 16);
    }
    return 'addr:' + r.remoteAddress;
}

// Who may read an async prediction back: the digest of the key that started it.
function ownerToken(r) {
    return 'key:' + common.sha256(presentedKey(r));
}

export default { authorize, clientId, ownerToken, presentedKey };
