/**
 * A minimal ONNX TensorProto codec for the files `onnx.numpy_helper.from_array` writes
 * (ONNX model-zoo test data: input_<i>.pb / output_<i>.pb).
 *
 * onnxruntime-node has no TensorProto parser, and pulling in a protobuf library for four
 * fields is not worth a dependency.  Supported fields (protobuf field numbers of
 * onnx.proto's TensorProto):
 *
 *   1 dims       repeated int64 (packed or not)
 *   2 data_type  int32 (the onnx.TensorProto.DataType enum)
 *   8 name       string
 *   9 raw_data   bytes, little-endian (what from_array writes for every numeric dtype)
 *
 * Anything else (float_data, int64_data, string_data, external_data, segment, ...) is
 * rejected with an error naming the field, the file and the fix; so are unknown data
 * types, truncated files and a raw_data length that does not match the dims.
 *
 * One file for Node.js and the browser (a UMD module): `require('./tensorproto')` in Node
 * (run_bundle.js), `<script src="tensorproto.js">` in a page (window.tensorproto; the
 * onnxruntime-web runner in browser/).  It uses only Uint8Array, TextEncoder and
 * TextDecoder: `decode` takes a Uint8Array (a Node Buffer is one), `encode` returns one.
 */
(function (root, factory) {
  if (typeof module === 'object' && module.exports) module.exports = factory();
  else root.tensorproto = factory();
})(typeof self !== 'undefined' ? self : this, function () {
'use strict';

/** ONNX data_type -> [onnxruntime-node tensor type, typed array class, bytes per element]. */
const DTYPES = {
  1: ['float32', Float32Array, 4],
  2: ['uint8', Uint8Array, 1],
  3: ['int8', Int8Array, 1],
  4: ['uint16', Uint16Array, 2],
  5: ['int16', Int16Array, 2],
  6: ['int32', Int32Array, 4],
  7: ['int64', BigInt64Array, 8],
  9: ['bool', Uint8Array, 1],
  10: ['float16', Uint16Array, 2],
  11: ['float64', Float64Array, 8],
  12: ['uint32', Uint32Array, 4],
  13: ['uint64', BigUint64Array, 8],
};

const DTYPE_NAMES = {
  0: 'UNDEFINED', 8: 'STRING', 14: 'COMPLEX64', 15: 'COMPLEX128', 16: 'BFLOAT16',
  17: 'FLOAT8E4M3FN', 18: 'FLOAT8E4M3FNUZ', 19: 'FLOAT8E5M2', 20: 'FLOAT8E5M2FNUZ',
  21: 'UINT4', 22: 'INT4', 23: 'FLOAT4E2M1',
};

/** onnxruntime-node tensor type -> ONNX data_type. */
const CODE_OF = {};
for (const [code, [type]] of Object.entries(DTYPES)) CODE_OF[type] = Number(code);

const FIELD_NAMES = {
  3: 'segment', 4: 'float_data', 5: 'int32_data', 6: 'string_data', 7: 'int64_data',
  10: 'double_data', 11: 'uint64_data', 12: 'doc_string', 13: 'external_data',
  14: 'data_location', 16: 'metadata_props',
};

const FIX = 'write test data with onnx.numpy_helper.from_array(array, name=...) (raw_data only)';

class TensorProtoError extends Error {}

const UTF8_DECODER = new TextDecoder('utf-8');
const UTF8_ENCODER = new TextEncoder();

function readVarint(buf, pos, what, source) {
  let result = 0;
  let mul = 1;
  for (let i = 0; i < 10; i++) {
    if (pos >= buf.length) throw new TensorProtoError(`${source}: truncated ${what} (file ends inside a varint); ${FIX}`);
    const b = buf[pos++];
    result += (b & 0x7f) * mul;
    mul *= 128;
    if ((b & 0x80) === 0) {
      if (!Number.isSafeInteger(result)) {
        throw new TensorProtoError(`${source}: ${what} ${result} is negative or too large (not a safe integer)`);
      }
      return [result, pos];
    }
  }
  throw new TensorProtoError(`${source}: malformed varint in ${what} (longer than 10 bytes)`);
}

function writeVarint(out, value) {
  if (!Number.isSafeInteger(value) || value < 0) throw new TensorProtoError(`cannot encode ${value} as a varint`);
  while (value >= 128) {
    out.push((value % 128) | 0x80);
    value = Math.floor(value / 128);
  }
  out.push(value);
}

function product(dims) {
  return dims.reduce((a, b) => a * b, 1);
}

/**
 * Decode one serialized TensorProto.
 * @param {Uint8Array} buf the file's bytes (a Node Buffer is one)
 * @param {string} source the file name, for messages
 * @returns {{name: string, dims: number[], type: string, dataType: number, data: ArrayBufferView}}
 */
function decode(buf, source = '<buffer>') {
  let pos = 0;
  const dims = [];
  let dataType = null;
  let name = '';
  let raw = null;
  while (pos < buf.length) {
    let key;
    [key, pos] = readVarint(buf, pos, 'field key', source);
    const field = Math.floor(key / 8);
    const wire = key % 8;
    if (field === 1 && wire === 0) {
      let v;
      [v, pos] = readVarint(buf, pos, 'dims', source);
      dims.push(v);
    } else if (field === 1 && wire === 2) {
      let len;
      [len, pos] = readVarint(buf, pos, 'dims length', source);
      const end = pos + len;
      if (end > buf.length) throw new TensorProtoError(`${source}: truncated dims (packed field runs past the end of the file)`);
      while (pos < end) {
        let v;
        [v, pos] = readVarint(buf, pos, 'dims', source);
        dims.push(v);
      }
      if (pos !== end) throw new TensorProtoError(`${source}: malformed packed dims`);
    } else if (field === 2 && wire === 0) {
      [dataType, pos] = readVarint(buf, pos, 'data_type', source);
    } else if ((field === 8 || field === 9) && wire === 2) {
      let len;
      [len, pos] = readVarint(buf, pos, field === 8 ? 'name length' : 'raw_data length', source);
      if (pos + len > buf.length) {
        throw new TensorProtoError(
          `${source}: truncated ${field === 8 ? 'name' : 'raw_data'} (${len} bytes declared, ${buf.length - pos} left)`,
        );
      }
      const bytes = buf.subarray(pos, pos + len);
      pos += len;
      if (field === 8) name = UTF8_DECODER.decode(bytes);
      else raw = bytes;
    } else {
      const label = FIELD_NAMES[field] || (field === 1 || field === 2 || field === 8 || field === 9 ? `field ${field} with wire type ${wire}` : `unknown field ${field}`);
      throw new TensorProtoError(
        `${source}: TensorProto field '${label}' is not supported; this reader takes only dims, data_type, name and raw_data; ${FIX}`,
      );
    }
  }
  if (dataType === null) throw new TensorProtoError(`${source}: no data_type (not a TensorProto?); ${FIX}`);
  const info = DTYPES[dataType];
  if (!info) {
    const label = DTYPE_NAMES[dataType] || `code ${dataType}`;
    throw new TensorProtoError(
      `${source}: data_type ${label} is not supported by this reader (supported: ${Object.values(DTYPES).map((d) => d[0]).join(', ')})`,
    );
  }
  const [type, Ctor, size] = info;
  const count = product(dims);
  const nbytes = raw ? raw.length : 0;
  if (nbytes !== count * size) {
    const got = raw ? `${nbytes} bytes of raw_data` : 'no raw_data';
    throw new TensorProtoError(
      `${source}: ${got}, expected ${count * size} (${count} ${type} elements for dims [${dims.join(', ')}]); ${FIX}`,
    );
  }
  // Copy into a fresh, aligned buffer (the slice of the file may be unaligned).
  const copy = new ArrayBuffer(count * size);
  if (raw) new Uint8Array(copy).set(raw);
  return { name, dims, type, dataType, data: new Ctor(copy) };
}

/**
 * Encode a tensor as a TensorProto (dims, data_type, name, raw_data): what
 * onnx.numpy_helper.to_array reads back.
 */
function encode(name, type, dims, data) {
  const code = CODE_OF[type];
  if (code === undefined) throw new TensorProtoError(`cannot write tensor '${name}': type ${type} is not supported`);
  const head = [];
  for (const d of dims) {
    head.push(0x08); // field 1, varint
    writeVarint(head, d);
  }
  head.push(0x10); // field 2, varint
  writeVarint(head, code);
  const nameBytes = UTF8_ENCODER.encode(name);
  head.push(0x42); // field 8, length-delimited
  writeVarint(head, nameBytes.length);
  const rawBytes = new Uint8Array(data.buffer, data.byteOffset, data.byteLength);
  const rawHead = [0x4a]; // field 9, length-delimited
  writeVarint(rawHead, rawBytes.length);
  const out = new Uint8Array(head.length + nameBytes.length + rawHead.length + rawBytes.length);
  let at = 0;
  for (const part of [head, nameBytes, rawHead, rawBytes]) {
    out.set(part, at);
    at += part.length;
  }
  return out;
}

return { decode, encode, TensorProtoError, DTYPES, CODE_OF };
});
