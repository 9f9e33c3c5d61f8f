'use strict';
/**
 * End-to-end check of every GapService RPC from Node.js against a running server.
 *
 *   node test/e2e.js --server 127.0.0.1:50051 --model ppocr_cls --tensor x.f32 --shape 1,3,48,192 --image line.png
 *
 * --tensor is a file of raw little-endian float32 values. Asserts what it can by itself (levels in
 * order, the stream assembles to the Explain tree, Expand equals the subtree, status codes) and
 * prints a JSON summary (with SHA-256 of every map) on stdout for the caller to compare with the
 * in-process engine. Exits 1 on the first failed check.
 */
const assert = require('assert/strict');
const crypto = require('crypto');
const fs = require('fs');
const { GapClient, fieldViolations, tensorValues, grpc } = require('../src/client');

function parseArgs(argv) {
  const args = {};
  for (let i = 0; i < argv.length; i += 2) args[argv[i].replace(/^--/, '')] = argv[i + 1];
  for (const required of ['server', 'model', 'tensor', 'shape', 'image']) {
    if (!args[required]) throw new Error(`missing --${required}`);
  }
  return args;
}

function summary(node) {
  return {
    id: node.id,
    parent: node._parent === 'parent' ? node.parent : null,
    level: node.level,
    layer: node.layer,
    channel: node.channel,
    score: node.score,
    share: node.share,
    children: node.children,
    path: node.path,
    map_shape: node.map ? node.map.shape : null,
    map_sha256: node.map ? crypto.createHash('sha256').update(node.map.data).digest('hex') : null,
  };
}

async function expectError(promise, code) {
  try {
    await promise;
  } catch (error) {
    assert.equal(error.code, code, `expected status ${code}, got ${error.code}: ${error.details}`);
    return error;
  }
  throw new Error(`expected status ${code}, the call succeeded`);
}

async function main() {
  const args = parseArgs(process.argv.slice(2));
  const shape = args.shape.split(',').map(Number);
  const tensor = { dtype: 'DATA_TYPE_FLOAT32', shape, data: fs.readFileSync(args.tensor), name: '' };
  const image = fs.readFileSync(args.image);
  const client = new GapClient(args.server, { deadlineMs: 60000 });
  const out = {};

  out.health = await client.health();
  assert.equal(out.health, 'SERVING');

  const models = await client.listModels();
  out.models = models.models.map((m) => m.name);
  assert.ok(out.models.includes(args.model));

  const info = await client.getModel(args.model);
  out.model = {
    name: info.model.name,
    providers: info.model.providers,
    inputs: info.inputs.map((i) => ({ name: i.name, dtype: i.dtype, shape: i.shape })),
    layers: info.layers.map((l) => l.name),
    labels: info.labels,
    max_response_bytes: info.limits.max_response_bytes,
  };
  assert.deepEqual(info.inputs[0].shape, shape);

  const prediction = await client.predict({ model: args.model, input: { tensor }, top_k: 2 });
  out.predict = {
    logits: Array.from(tensorValues(prediction.logits)),
    classes: prediction.classes.map((c) => ({ index: c.index, label: c.label, logit: c.logit, probability: c.probability })),
  };

  const request = { model: args.model, input: { tensor }, options: { depth: 3, top_k: 3 }, output: { cams: true } };
  const explained = await client.explain(request);
  const tree = explained.explanation;
  out.explain = { target: tree.target, label: tree.label, logit: tree.logit, probability: tree.probability,
    layers: tree.layers, nodes: tree.nodes.map(summary), engine_seconds: explained.engine_seconds };

  // ExplainStream: levels in order; the assembled tree equals Explain's.
  const levels = [];
  let assembled = null;
  for await (const item of client.explainStream({ ...request })) {
    if (!item.done) levels.push(item.level);
    assembled = item.tree;
  }
  out.stream = { levels };
  assert.deepEqual(levels, [0, 1, 2, 3]);
  assert.equal(assembled.nodes.length, tree.nodes.length);
  assert.equal(assembled.probability, tree.probability);
  for (let i = 0; i < tree.nodes.length; i += 1) {
    const a = summary(assembled.nodes[i]);
    const b = summary(tree.nodes[i]);
    assert.deepEqual(a, b, `stream node ${i}`);
  }

  // Expand: a node's subtree equals the same nodes of the full tree.
  out.expand = [];
  for (const id of [0, tree.nodes[0].children[1], tree.nodes[tree.nodes[0].children[0]].children[0]]) {
    const node = tree.nodes[id];
    const expanded = await client.expand({ ...request, options: { depth: 3 - node.level, top_k: 3 } }, node.path);
    const byPath = new Map(tree.nodes.map((n) => [n.path.join('/'), n]));
    for (const sub of expanded.explanation.nodes) {
      const full = byPath.get(sub.path.join('/'));
      assert.ok(full, `expanded node ${sub.path} not in the full tree`);
      const a = summary(sub);
      const b = summary(full);
      for (const key of ['level', 'layer', 'channel', 'score', 'share', 'map_sha256']) assert.deepEqual(a[key], b[key], key);
    }
    out.expand.push({ path: node.path, nodes: expanded.explanation.nodes.map((n) => n.path) });
  }

  // An image input: the server applies the model's preprocessing.
  const fromImage = await client.explain({ model: args.model, input: { image }, options: { depth: 2, top_k: 2 },
    output: { heatmaps: true, picture: true } });
  out.image = { target: fromImage.explanation.target, nodes: fromImage.explanation.nodes.map(summary),
    picture_shape: fromImage.explanation.picture.shape,
    heatmap_png: fromImage.explanation.nodes[0].heatmap_png.subarray(1, 4).toString() };

  // Several inputs per call: a tensor, its negation and the image; each result equals the same
  // input's single call, and the stream assembles every input's tree to the same.
  const negated = Buffer.from(tensor.data);
  for (let i = 3; i < negated.length; i += 4) negated[i] ^= 0x80; // flips the sign of each float32
  const inputs = [{ tensor }, { tensor: { ...tensor, data: negated } }, { image }];
  const predictions = await client.predictMany({ model: args.model, inputs, top_k: 2 });
  assert.equal(predictions.length, 3);
  for (let i = 0; i < inputs.length; i += 1) {
    const single = await client.predict({ model: args.model, input: inputs[i], top_k: 2 });
    assert.deepEqual(Array.from(tensorValues(predictions[i].logits)), Array.from(tensorValues(single.logits)), `predict ${i}`);
    assert.deepEqual(predictions[i].classes, single.classes, `predict ${i} classes`);
  }
  const batchRequest = { model: args.model, inputs, options: { depth: 3, top_k: 3 } };
  const trees = await client.explainMany(batchRequest);
  assert.equal(trees.length, 3);
  for (let i = 0; i < inputs.length; i += 1) {
    const single = (await client.explain({ model: args.model, input: inputs[i], options: { depth: 3, top_k: 3 } })).explanation;
    assert.deepEqual(trees[i].nodes.map(summary), single.nodes.map(summary), `explainMany tree ${i}`);
  }
  const streamed = new Map();
  const streamLevels = [[], [], []];
  for await (const item of client.explainStream(batchRequest)) {
    if (item.done) streamed.set(item.input, item.tree); else streamLevels[item.input].push(item.level);
  }
  assert.deepEqual(streamLevels, [[0, 1, 2, 3], [0, 1, 2, 3], [0, 1, 2, 3]]);
  for (let i = 0; i < inputs.length; i += 1) {
    assert.deepEqual(streamed.get(i).nodes.map(summary), trees[i].nodes.map(summary), `streamed tree ${i}`);
  }
  const badInput = await expectError(client.explainMany({ ...batchRequest,
    inputs: [inputs[0], { tensor: { ...tensor, data: tensor.data.subarray(4) } }, inputs[2]] }), grpc.status.INVALID_ARGUMENT);
  const both = await expectError(client.explain({ ...batchRequest, input: inputs[0] }), grpc.status.INVALID_ARGUMENT);
  out.batch = {
    predict: predictions.map((p) => Array.from(tensorValues(p.logits))),
    trees: trees.map((t) => ({ target: t.target, nodes: t.nodes.map(summary) })),
    bad_input: fieldViolations(badInput).map((v) => v.field),
    both: fieldViolations(both).map((v) => v.field),
  };
  assert.deepEqual(out.batch.bad_input, ['inputs[1].tensor.data']);
  assert.deepEqual(out.batch.both, ['input', 'inputs']);

  // Errors: the status codes and field violations.
  const status = grpc.status;
  await expectError(client.explain({ ...request, model: 'no_such_model' }), status.NOT_FOUND);
  const badTopK = await expectError(client.explain({ ...request, options: { top_k: 0 } }), status.INVALID_ARGUMENT);
  const bytes = await expectError(client.explain({ ...request, input: { tensor: { ...tensor, data: tensor.data.subarray(8) } } }),
    status.INVALID_ARGUMENT);
  await expectError(client.explain(request, 1), status.DEADLINE_EXCEEDED);
  out.errors = { top_k: fieldViolations(badTopK), bytes: fieldViolations(bytes) };
  assert.deepEqual(out.errors.top_k.map((v) => v.field), ['options.top_k']);
  assert.deepEqual(out.errors.bytes.map((v) => v.field), ['input.tensor.data']);

  // Cancelling mid-stream.
  const call = client.explainStreamCall({ ...request, options: { depth: 4, top_k: 4 } });
  const cancelled = await new Promise((resolve) => {
    call.on('data', () => call.cancel());
    call.on('error', (error) => resolve(error.code));
    call.on('end', () => resolve('end'));
  });
  assert.equal(cancelled, status.CANCELLED);
  out.health_after = await client.health();
  assert.equal(out.health_after, 'SERVING');

  client.close();
  process.stdout.write(`${JSON.stringify(out)}\n`);
}

main().catch((error) => {
  process.stderr.write(`${error.stack || error}\n`);
  process.exit(1);
});
