// An async prediction's outputs as files in the gateway's store, not as base64 in its state: coglet's
// final webhook carries them as data: URIs; they are decoded to <store>/files/<id>.<n>.<ext> and the
// state lists /predictions/<id>/outputs/<n>.<ext> instead, served by nginx to the owner's key only.
// The files together stay within SDXL_GATEWAY_STORE_MAX: the oldest files go first to make room.

import datauris from 'datauris.js';

const fs = require('fs');

// What coglet sends for this server's output formats, and the extension nginx serves each type by.
const EXTENSIONS = { 'image/png': 'png', 'image/jpeg': 'jpg', 'image/webp': 'webp' };

function filesDir(r) {
    return r.variables.sdxl_store + '/files';
}

// The store's files, oldest first, with their sizes.
function storedFiles(r) {
    const dir = filesDir(r);
    const files = [];
    fs.readdirSync(dir).forEach(function (name) {
        try {
            const stat = fs.statSync(dir + '/' + name);
            files.push({ name: name, size: stat.size, mtimeMs: stat.mtimeMs });
        } catch (e) {
            // removed meanwhile
        }
    });
    return files.sort(function (a, b) { return a.mtimeMs - b.mtimeMs; });
}

// Remove the oldest files of other predictions until `bytes` more fit within the bound.
function makeRoom(r, id, bytes) {
    const limit = Number(r.variables.sdxl_store_max);
    const files = storedFiles(r);
    let total = files.reduce(function (sum, file) { return sum + file.size; }, 0);
    for (let i = 0; i < files.length && total + bytes > limit; i++) {
        if (files[i].name.split('.')[0] !== id) {
            fs.unlinkSync(filesDir(r) + '/' + files[i].name);
            total -= files[i].size;
            r.log('gateway: removed output ' + files[i].name + ' to keep the store within ' + limit + ' bytes');
        }
    }
    return total + bytes <= limit;
}

// Store one output; what the state lists in its place.
function storeOne(r, id, index, value, parts) {
    const uri = datauris.uriOf(parts, value);
    const file = uri ? datauris.decode(uri) : null;
    if (!file) {
        // Not a file: a URL (from a webhook of the client's own), a number, text; or a data: URI
        // that is not base64, kept as it came.
        return uri ? uri.toString() : value;
    }
    const extension = EXTENSIONS[file.type] || 'bin';
    const name = id + '.' + index + '.' + extension;
    if (!makeRoom(r, id, file.bytes.length)) {
        r.error('gateway: output ' + name + ' (' + file.bytes.length + ' bytes) does not fit SDXL_GATEWAY_STORE_MAX');
        return null;
    }
    const path = filesDir(r) + '/' + name;
    fs.writeFileSync(path + '.tmp', file.bytes);
    fs.renameSync(path + '.tmp', path);
    return '/predictions/' + id + '/outputs/' + index + '.' + extension;
}

// `output` (one value or a list; data: URIs as placeholders of `parts`, datauris.js) with each file
// stored and replaced by its URL.
function store(r, id, output, parts) {
    if (Array.isArray(output)) {
        return output.map(function (value, index) { return storeOne(r, id, index, value, parts); });
    }
    return output === null || output === undefined ? output : storeOne(r, id, 0, output, parts);
}

// The stored file for an output URL's last segment ("<n>.<ext>"), or '' if it names none.
function fileName(id, segment) {
    return /^\d{1,2}\.(png|jpg|webp|bin)$/.test(segment) ? id + '.' + segment : '';
}

function path(r, name) {
    return filesDir(r) + '/' + name;
}

export default { store, fileName, path };
