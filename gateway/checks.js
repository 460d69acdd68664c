// What a prediction's body may ask for: its id, webhooks, and the files coglet would fetch or read.

import common from 'common.js';

// predict.py's file inputs, used when the schema cannot be read (coglet serves none without
// .cog/openapi_schema.json). tests/test_gateway.py keeps it equal to predict.py's.
const FALLBACK_FILE_INPUTS = ['image', 'mask', 'controlnet_1_image', 'controlnet_2_image', 'controlnet_3_image',
    'ip_adapter_image'];

// Host names that resolve inside a network by convention, never on the public internet.
const PRIVATE_SUFFIXES = ['localhost', 'local', 'internal', 'intranet', 'lan', 'home.arpa', 'corp', 'svc',
    'cluster.local', 'arpa'];

function envFlag(name) {
    return process.env[name] === '1';
}

// Why `url` may not be fetched by the server, or '' if it may: http(s) to a public host name on the
// default port. Names are judged as written (njs cannot resolve them as coglet will): IP literals,
// single-label names and private suffixes are refused; a public name that resolves to a private
// address needs the network's egress policy.
function publicUrlProblem(url) {
    const match = /^(https?):\/\/([^/?#]*)/i.exec(url);
    if (!match) {
        return 'not an http(s) URL';
    }
    const authority = match[2];
    if (authority.indexOf('@') >= 0) {
        return 'user names in URLs are not accepted';
    }
    const hostPort = /^([^:]*)(?::(\d*))?$/.exec(authority);
    if (!hostPort) {
        return 'IP address literals are not accepted; use a public host name';
    }
    const host = hostPort[1].toLowerCase().replace(/\.$/, '');
    const port = hostPort[2];
    if (port && port !== '80' && port !== '443') {
        return 'only the default ports 80 and 443 are accepted';
    }
    const labels = host.split('.');
    const tld = labels[labels.length - 1];
    if (labels.length < 2 || !/^[a-z][a-z0-9-]*[a-z0-9]$/.test(tld)) {
        return 'IP address literals and single-label names are not accepted; use a public host name';
    }
    const internal = PRIVATE_SUFFIXES.some(function (suffix) {
        return host === suffix || host.endsWith('.' + suffix);
    });
    return internal ? 'host ' + host + ' is internal' : '';
}

// -- the request body -----------------------------------------------------------------------------

async function fileInputNames(r) {
    const reply = await r.subrequest('/_coglet/openapi.json', { method: 'GET' });
    if (reply.status !== 200) {
        return FALLBACK_FILE_INPUTS;
    }
    try {
        const properties = JSON.parse(reply.responseText).components.schemas.Input.properties;
        return Object.keys(properties).filter(function (name) { return properties[name].format === 'uri'; });
    } catch (e) {
        return FALLBACK_FILE_INPUTS;
    }
}

function fileInputProblem(name, value) {
    if (typeof value !== 'string') {
        return '';  // coglet's own validation answers for wrong types
    }
    if (value.startsWith('data:')) {
        return '';
    }
    if (!/^https?:\/\//i.test(value)) {
        return 'Input "' + name + '" must be a data: URI (the file\'s bytes, base64-encoded)' +
            (envFlag('SDXL_GATEWAY_ALLOW_URL_INPUTS') ? ' or an http(s) URL on a public host' : '');
    }
    if (!envFlag('SDXL_GATEWAY_ALLOW_URL_INPUTS')) {
        return 'Input "' + name + '" is a URL, and this server does not download URLs for file inputs: ' +
            'send the file as a data: URI (data:image/png;base64,...) instead';
    }
    const problem = publicUrlProblem(value);
    return problem ? 'Input "' + name + '" URL refused: ' + problem : '';
}

function webhookProblem(body) {
    if (body.webhook === undefined || body.webhook === null) {
        return '';
    }
    if (!envFlag('SDXL_GATEWAY_ALLOW_WEBHOOKS')) {
        return 'Webhooks are not enabled on this server (they make it call out); ' +
            'make a synchronous request, or ask the operator to set SDXL_GATEWAY_ALLOW_WEBHOOKS=1';
    }
    const problem = typeof body.webhook === 'string' ? publicUrlProblem(body.webhook) : 'not a string';
    return problem ? 'Webhook URL refused: ' + problem : '';
}

// The first reason to refuse the body, or ''.
async function bodyProblem(r, body, pathId) {
    if (body === null || typeof body !== 'object' || Array.isArray(body)) {
        return 'The body must be a JSON object: {"input": {...}}';
    }
    if (body.id !== undefined && body.id !== null) {
        if (typeof body.id !== 'string' || !common.ID_PATTERN.test(body.id)) {
            return 'Invalid prediction id in the body: use 1 to 64 letters, digits, "_" or "-"';
        }
        if (pathId && body.id !== pathId) {
            return 'The body\'s id differs from the id in the path';
        }
    }
    const webhook = webhookProblem(body);
    if (webhook) {
        return webhook;
    }
    const input = body.input;
    if (input !== null && typeof input === 'object') {
        const names = await fileInputNames(r);
        for (let i = 0; i < names.length; i++) {
            const problem = fileInputProblem(names[i], input[names[i]]);
            if (problem) {
                return problem;
            }
        }
    }
    return '';
}

export default { bodyProblem };
