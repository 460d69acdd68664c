// JSON bodies that carry files as data: URIs (images in, images out: tens of MB), handled without
// copying those strings. njs frees nothing before the request ends, so each copy of a body counts
// against the gateway's memory for as long as the request lasts. `split` cuts every string that
// begins with "data:" out of the body (Buffer views, no copy) and leaves a short placeholder in the
// text that is parsed; `join` puts them back into a serialized object, as one Buffer.
//
// A string starts with an unescaped quote: an escaped one (\") is text inside another string, and a
// closing quote is never followed by a letter in JSON. The URIs go back byte for byte, escapes and all.

import common from 'common.js';

const MARK = '"data:';
const BACKSLASH = 0x5c;
// A data: URI's header ("data:image/png;base64") is short; its payload is not.
const MAX_HEADER = 256;

function escaped(buffer, quote) {
    let backslashes = 0;
    while (quote - backslashes - 1 >= 0 && buffer[quote - backslashes - 1] === BACKSLASH) {
        backslashes++;
    }
    return backslashes % 2 === 1;
}

// The closing quote of the string whose contents start at `from`, or -1.
function closingQuote(buffer, from) {
    let quote = buffer.indexOf('"', from);
    while (quote >= 0 && escaped(buffer, quote)) {
        quote = buffer.indexOf('"', quote + 1);
    }
    return quote;
}

function placeholder(nonce, index) {
    return 'data:,sdxl-gateway-' + nonce + '-' + index;
}

// { text, uris, nonce }: `text` is the body with each data: string replaced by placeholder(nonce, i),
// and uris[i] the original string's contents (between its quotes) as a view into `buffer`.
function split(buffer) {
    const nonce = common.randomToken();
    const pieces = [];
    const uris = [];
    let copied = 0;
    let start = buffer.indexOf(MARK, 0);
    while (start >= 0) {
        const end = escaped(buffer, start) ? -1 : closingQuote(buffer, start + 1);
        if (end >= 0) {
            pieces.push(buffer.slice(copied, start + 1).toString(), placeholder(nonce, uris.length));
            uris.push(buffer.slice(start + 1, end));
            copied = end;
        }
        start = buffer.indexOf(MARK, Math.max(start, end) + 1);
    }
    pieces.push(buffer.slice(copied).toString());
    return { text: pieces.join(''), uris: uris, nonce: nonce };
}

// `json` (made by JSON.stringify from what split's text parsed to) with the URIs back in place.
function join(json, parts) {
    const pieces = [];
    let copied = 0;
    parts.uris.forEach(function (uri, index) {
        const at = json.indexOf('"' + placeholder(parts.nonce, index) + '"', copied);
        if (at >= 0) {
            pieces.push(Buffer.from(json.slice(copied, at + 1)), uri);
            copied = at + 1 + placeholder(parts.nonce, index).length;
        }
    });
    pieces.push(Buffer.from(json.slice(copied)));
    return Buffer.concat(pieces);
}

// The URI a placeholder stands for (a Buffer view), or null if `value` is not one of this split's.
function uriOf(parts, value) {
    const prefix = placeholder(parts.nonce, '');
    if (typeof value !== 'string' || !value.startsWith(prefix)) {
        return null;
    }
    return parts.uris[Number(value.slice(prefix.length))] || null;
}

// { type, bytes } of a base64 data: URI (a view as from uriOf), or null if it is not one.
function decode(uri) {
    const comma = uri.indexOf(',');
    const header = comma >= 0 && comma < MAX_HEADER ? uri.slice(0, comma).toString() : '';
    const match = /^data:([^;,]*)(;[^;,]*)*;base64$/.exec(header);
    if (!match) {
        return null;
    }
    let payload = uri.slice(comma + 1).toString();
    if (payload.indexOf('\\') >= 0) {
        payload = JSON.parse('"' + payload + '"');  // a serializer that escapes "/" as "\/"
    }
    return { type: match[1], bytes: Buffer.from(payload, 'base64') };
}

export default { split, join, uriOf, decode };
