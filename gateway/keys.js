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

// 'ok', 'open' (no keys, SDXL_OPEN_ACCESS=1), or why not: 'missing', 'wrong', 'no keys configured',
// 'file unreadable'.
function keyCheck(r) {
    let keys;
    try {
        keys = configuredKeys();
    } catch (e) {
        r.error('gateway: cannot read SDXL_API_KEYS_FILE: ' + e.message);
        return 'file unreadable';
    }
    if (keys.length === 0) {
        return process.env.SDXL_OPEN_ACCESS === '1' ? 'open' : 'no keys configured';
    }
    const key = presentedKey(r);
    if (!key) {
        return 'missing';
    }
    // Compare digests, so the time taken says nothing about how much of a key was right.
    const digest = common.sha256(key);
    return keys.some(function (k) { return common.sha256(k) === digest; }) ? 'ok' : 'wrong';
}

// Who a request counts against (js_set $sdxl_client): a valid key's digest, else the address.
function clientId(r) {
    const verdict = keyCheck(r);
    if (verdict === 'ok') {
        return 'key:' + common.sha256(presentedKey(r)).slice(0, 16);
    }
    return (verdict === 'open' ? 'open:' : 'anon:') + r.remoteAddress;
}

// Whom a prediction belongs to: the digest of the key that started it (the address without keys).
function ownerToken(r) {
    const key = presentedKey(r);
    return key ? 'key:' + common.sha256(key) : 'open:' + r.remoteAddress;
}

export default { keyCheck, clientId, ownerToken };
