'use strict';
/**
 * Node.js client of gap.v1.GapService, built from the same .proto files as the server
 * (protos/ at the repository root) with @grpc/grpc-js and @grpc/proto-loader.
 *
 *   const { GapClient, tensorFromFloat32 } = require('./src/client');
 *   const client = new GapClient('localhost:50051');
 *   const { explanation } = await client.explain({ model: 'ppocr_cls', input: { image: pngBuffer } });
 *
 *   // TLS (the server's CA), mTLS (a client certificate) and an API key (docs/security.md):
 *   new GapClient('gap.example.com:8443', { rootCerts: fs.readFileSync('ca.crt'), clientCert: fs.readFileSync('client.crt'),
 *     clientKey: fs.readFileSync('client.key'), token: process.env.GAP_TOKEN });
 *
 * Messages are plain objects with the proto's field names (snake_case); bytes are Buffers,
 * enums are strings, 64-bit integers are Numbers. Tensors travel as raw little-endian bytes:
 * use tensorFromFloat32() to send one and tensorValues() to read one.
 *
 * Several inputs per call: give `inputs` (an array of Inputs, at most the model's
 * limits.max_batch_inputs) instead of `input`. predictMany() and explainMany() return one
 * result per input, in order; explainStream() with `inputs` yields each input's levels as they
 * are computed, `item.input` saying whose:
 *
 *   const trees = await client.explainMany({ model: 'ppocr_cls', inputs: [{ image: a }, { image: b }] });
 */
const path = require('path');
const grpc = require('@grpc/grpc-js');
const protoLoader = require('@grpc/proto-loader');
const protobuf = require('protobufjs');

const PROTO_ROOT = process.env.GAP_PROTO_ROOT || path.resolve(__dirname, '..', '..', '..', 'protos');
const HEALTH_ROOT = path.resolve(__dirname, '..', 'proto');

const LOADER_OPTIONS = { keepCase: true, longs: Number, enums: String, bytes: Buffer, defaults: true, oneofs: true };

function loadPackages() {
  const definition = protoLoader.loadSync(['gap/v1/gap_service.proto', 'grpc/health/v1/health.proto'], {
    ...LOADER_OPTIONS,
    includeDirs: [PROTO_ROOT, HEALTH_ROOT],
  });
  const loaded = grpc.loadPackageDefinition(definition);
  return { gap: loaded.gap.v1, health: loaded.grpc.health.v1 };
}

const CHANNEL_OPTIONS = {
  'grpc.max_receive_message_length': -1,
  'grpc.max_send_message_length': -1,
  // Keepalive that survives load balancers: ping every 30 s (the server accepts down to 10 s).
  'grpc.keepalive_time_ms': 30000,
  'grpc.keepalive_timeout_ms': 10000,
  'grpc.keepalive_permit_without_calls': 1,
};

// google.rpc.Status and google.rpc.BadRequest, to read field violations of INVALID_ARGUMENT.
const STATUS_ROOT = protobuf.Root.fromJSON({
  nested: {
    google: {
      nested: {
        protobuf: { nested: { Any: { fields: { type_url: { type: 'string', id: 1 }, value: { type: 'bytes', id: 2 } } } } },
        rpc: {
          nested: {
            Status: {
              fields: {
                code: { type: 'int32', id: 1 },
                message: { type: 'string', id: 2 },
                details: { rule: 'repeated', type: 'google.protobuf.Any', id: 3 },
              },
            },
            BadRequest: {
              fields: { field_violations: { rule: 'repeated', type: 'FieldViolation', id: 1 } },
              nested: {
                FieldViolation: { fields: { field: { type: 'string', id: 1 }, description: { type: 'string', id: 2 } } },
              },
            },
          },
        },
      },
    },
  },
});
const Status = STATUS_ROOT.lookupType('google.rpc.Status');
const BadRequest = STATUS_ROOT.lookupType('google.rpc.BadRequest');

/** Field violations [{field, description}] of a gRPC error (google.rpc.BadRequest details). */
function fieldViolations(error) {
  const raw = error && error.metadata && error.metadata.get('grpc-status-details-bin');
  if (!raw || !raw.length) return [];
  const status = Status.decode(raw[0]);
  const violations = [];
  for (const detail of status.details) {
    if (detail.type_url.endsWith('google.rpc.BadRequest')) {
      const request = BadRequest.decode(detail.value);
      for (const v of request.field_violations) violations.push({ field: v.field, description: v.description });
    }
  }
  return violations;
}

const DTYPE_SIZES = {
  DATA_TYPE_FLOAT32: 4, DATA_TYPE_FLOAT16: 2, DATA_TYPE_FLOAT64: 8, DATA_TYPE_UINT8: 1,
  DATA_TYPE_INT8: 1, DATA_TYPE_INT32: 4, DATA_TYPE_INT64: 8,
};

/** A Tensor message from float32 values (written little-endian whatever the platform). */
function tensorFromFloat32(values, shape, name = '') {
  const data = Buffer.alloc(values.length * 4);
  for (let i = 0; i < values.length; i += 1) data.writeFloatLE(values[i], i * 4);
  return { dtype: 'DATA_TYPE_FLOAT32', shape, data, name };
}

function halfToFloat(bits) {
  const sign = bits & 0x8000 ? -1 : 1;
  const exponent = (bits >> 10) & 0x1f;
  const fraction = bits & 0x3ff;
  if (exponent === 0) return sign * 2 ** -14 * (fraction / 1024);
  if (exponent === 31) return fraction ? NaN : sign * Infinity;
  return sign * 2 ** (exponent - 15) * (1 + fraction / 1024);
}

/** The values of a Tensor message as a Float64Array (float32/float16/float64/integer types). */
function tensorValues(tensor) {
  const size = DTYPE_SIZES[tensor.dtype];
  if (!size) throw new Error(`unsupported dtype ${tensor.dtype}`);
  const count = tensor.shape.reduce((a, b) => a * b, 1);
  if (tensor.data.length !== count * size) throw new Error(`tensor has ${tensor.data.length} bytes, expected ${count * size}`);
  const out = new Float64Array(count);
  const buffer = tensor.data;
  for (let i = 0; i < count; i += 1) {
    const offset = i * size;
    switch (tensor.dtype) {
      case 'DATA_TYPE_FLOAT32': out[i] = buffer.readFloatLE(offset); break;
      case 'DATA_TYPE_FLOAT16': out[i] = halfToFloat(buffer.readUInt16LE(offset)); break;
      case 'DATA_TYPE_FLOAT64': out[i] = buffer.readDoubleLE(offset); break;
      case 'DATA_TYPE_UINT8': out[i] = buffer.readUInt8(offset); break;
      case 'DATA_TYPE_INT8': out[i] = buffer.readInt8(offset); break;
      case 'DATA_TYPE_INT32': out[i] = buffer.readInt32LE(offset); break;
      default: out[i] = Number(buffer.readBigInt64LE(offset));
    }
  }
  return out;
}

/**
 * The channel credentials: plaintext when no option is given; any option means TLS, the server checked
 * against rootCerts (a PEM Buffer; default: Node's CAs). clientCert and clientKey (PEM Buffers) answer a
 * server that requires mTLS; token, an API key, goes as `authorization: Bearer` with every call, over
 * TLS only (gRPC never sends call credentials in cleartext).
 */
function channelCredentials({ tls = false, rootCerts = null, clientCert = null, clientKey = null, token = null } = {}) {
  if (!(tls || rootCerts || clientCert || clientKey || token)) return grpc.credentials.createInsecure();
  if (!clientCert !== !clientKey) throw new Error('clientCert and clientKey go together (mTLS)');
  const ssl = grpc.credentials.createSsl(rootCerts, clientKey, clientCert);
  if (!token) return ssl;
  const bearer = grpc.credentials.createFromMetadataGenerator((_params, callback) => {
    const metadata = new grpc.Metadata();
    metadata.set('authorization', `Bearer ${token}`);
    callback(null, metadata);
  });
  return grpc.credentials.combineChannelCredentials(ssl, bearer);
}

class GapClient {
  /**
   * @param {string} address host:port
   * @param {{deadlineMs?: number, tls?: boolean, rootCerts?: Buffer, clientCert?: Buffer, clientKey?: Buffer,
   *          token?: string, credentials?: grpc.ChannelCredentials}} options
   *   tls ... token: see channelCredentials; credentials: ready-made ones instead
   */
  constructor(address, { deadlineMs = 120000, credentials = null, ...security } = {}) {
    const { gap, health } = loadPackages();
    this.deadlineMs = deadlineMs;
    credentials = credentials || channelCredentials(security);
    this.stub = new gap.GapService(address, credentials, CHANNEL_OPTIONS);
    this.healthStub = new health.Health(address, credentials, CHANNEL_OPTIONS);
  }

  close() {
    this.stub.close();
    this.healthStub.close();
  }

  _deadline(deadlineMs) {
    return new Date(Date.now() + (deadlineMs === undefined ? this.deadlineMs : deadlineMs));
  }

  _unary(stub, method, request, deadlineMs) {
    return new Promise((resolve, reject) => {
      stub[method](request, { deadline: this._deadline(deadlineMs) }, (error, response) => {
        if (error) reject(error); else resolve(response);
      });
    });
  }

  /** 'SERVING', 'NOT_SERVING', ... of grpc.health.v1 ('' = the whole server). */
  async health(service = '', deadlineMs = 5000) {
    const response = await this._unary(this.healthStub, 'Check', { service }, deadlineMs);
    return response.status;
  }

  listModels(deadlineMs) { return this._unary(this.stub, 'ListModels', {}, deadlineMs); }

  getModel(model, version = 0, deadlineMs) { return this._unary(this.stub, 'GetModel', { model, version }, deadlineMs); }

  /**
   * What a node's channel responds to, from the server's atlas: {layer, channel, stats: {mean,
   * fire_rate, image_rate, max}, patches: [{image, unit, box, activation}], strip_png, patch_size,
   * sheet, row}. strip_png (a Buffer: the patches side by side) is empty unless patches is true.
   */
  getChannel(model, layer, channel, { patches = false, version = 0 } = {}, deadlineMs) {
    return this._unary(this.stub, 'GetChannel', { model, version, layer, channel, patches }, deadlineMs);
  }

  /** request: {model, input: {image: Buffer} | {tensor}, top_k?} */
  predict(request, deadlineMs) { return this._unary(this.stub, 'Predict', request, deadlineMs); }

  /**
   * One Predict call for several inputs. request: {model, inputs: [{image} | {tensor}, ...], top_k?}.
   * Resolves to the predictions, one per input in order: [{logits, classes, engine_seconds, detections}].
   */
  async predictMany(request, deadlineMs) {
    const response = await this._unary(this.stub, 'Predict', request, deadlineMs);
    return response.results;
  }

  /**
   * request: {model, input, options: {layers, target, output, seed, top_k, depth, min_share, score}, output: {...}}.
   * target: {class_index} | {detection: {index, class_index?, spread}} | {region: {channel, box?, mask?}} |
   * {element: {index}}; seed: a tensor shaped like options.output (docs/targets.md). Unset: the model's task default.
   */
  explain(request, deadlineMs) { return this._unary(this.stub, 'Explain', request, deadlineMs); }

  /**
   * One Explain call for several inputs, the same options for all. request: as for explain(), with
   * inputs: [{image} | {tensor}, ...] instead of input. Resolves to the trees (Explanation messages),
   * one per input in order, each what explain() returns for that input alone.
   */
  async explainMany(request, deadlineMs) {
    const response = await this._unary(this.stub, 'Explain', request, deadlineMs);
    return response.explanations;
  }

  /**
   * The subtree below one node. request: the ExplainRequest that produced the tree (its
   * options.top_k and options.depth apply to the subtree); path: channels from the root to the node.
   */
  expand(request, path, deadlineMs) { return this._unary(this.stub, 'Expand', { request, path }, deadlineMs); }

  /**
   * The raw server stream (a Readable of ExplainStreamResponse; call.cancel() stops the server).
   * request: an ExplainRequest, as for explain().
   */
  explainStreamCall(request, deadlineMs) {
    return this.stub.ExplainStream({ request }, { deadline: this._deadline(deadlineMs) });
  }

  /**
   * Async iterator over the levels; each item is {input, level, nodes, tree, done}. The tree is
   * assembled as levels arrive (children rebuilt from parents); breaking out of the loop cancels the
   * call. With request.inputs, every input's tree is assembled on its own: `input` is the item's
   * index into request.inputs (0 with a single input), and each input ends with its `done` item.
   */
  async *explainStream(request, deadlineMs) {
    const call = this.explainStreamCall(request, deadlineMs);
    const trees = new Map();
    try {
      for await (const message of call) {
        const input = message.input || 0;
        if (message.header) trees.set(input, { ...message.header, nodes: [] });
        const tree = trees.get(input);
        if (!tree) throw new Error(`stream out of order: input ${input}'s first message has no header`);
        if (message.root) tree.nodes[0] = { ...message.root };
        if (message.summary) {
          tree.probability = message.summary.probability;
          tree.cams = message.summary.cams;
          yield { input, level: message.level, nodes: [], tree, done: true };
          continue;
        }
        for (const node of message.nodes) {
          if (node.id !== tree.nodes.length) throw new Error(`stream out of order: node ${node.id} after ${tree.nodes.length}`);
          tree.nodes.push(node);
          if (node._parent === 'parent' && !tree.nodes[node.parent].children.includes(node.id)) {
            tree.nodes[node.parent].children.push(node.id);
          }
        }
        yield { input, level: message.level, nodes: message.nodes, tree, done: false };
      }
    } finally {
      call.cancel();
    }
  }
}

module.exports = { GapClient, channelCredentials, fieldViolations, tensorFromFloat32, tensorValues, loadPackages, grpc };
