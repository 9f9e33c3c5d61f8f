'use strict';
/**
 * The Node client over TLS, mTLS and API keys, against running servers (tests/test_security.py).
 *
 *   node test/secure.js cases.json
 *
 * cases.json: [{name, server, model, ca?, cert?, key?, token?}] (ca/cert/key: PEM file paths). For each
 * case it connects with those credentials and asks health, ListModels and GetModel(model); it prints
 * one JSON line: [{name, health, models, model, error}], where error is the gRPC status name of the
 * first failed call (null when all answered) and the others are what the server answered.
 */
const fs = require('fs');
const { GapClient, grpc } = require('../src/client');

const STATUS_NAMES = Object.fromEntries(Object.entries(grpc.status).map(([name, code]) => [code, name]));

async function run(spec) {
  const read = (file) => (file ? fs.readFileSync(file) : null);
  const client = new GapClient(spec.server, {
    deadlineMs: 10000, rootCerts: read(spec.ca), clientCert: read(spec.cert), clientKey: read(spec.key), token: spec.token,
  });
  const out = { name: spec.name, health: null, models: null, model: null, error: null };
  try {
    out.health = await client.health();
    out.models = (await client.listModels()).models.map((m) => m.name);
    out.model = (await client.getModel(spec.model)).model.name;
  } catch (error) {
    out.error = STATUS_NAMES[error.code] || String(error);
  } finally {
    client.close();
  }
  return out;
}

async function main() {
  const cases = JSON.parse(fs.readFileSync(process.argv[2], 'utf8'));
  const results = [];
  for (const spec of cases) results.push(await run(spec));
  process.stdout.write(`${JSON.stringify(results)}\n`);
}

main().catch((error) => {
  process.stderr.write(`${error.stack || error}\n`);
  process.exit(1);
});
