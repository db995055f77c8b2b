#!/usr/bin/env node
// apeserve from Node.js: encode documents, stream an answer.
//   cd clients/node && npm install && node client.js --encoder 127.0.0.1:50051 \
//     --decoder 127.0.0.1:50052 --prefix "..." --doc a.txt --doc b.txt --query "..."
// Loads ../../proto at run time with @grpc/proto-loader (no generated code).
'use strict';
const fs = require('fs');
const path = require('path');
const grpc = require('@grpc/grpc-js');
const protoLoader = require('@grpc/proto-loader');

function parseArgs(argv) {
  const a = {encoder: '127.0.0.1:50051', decoder: '127.0.0.1:50052', prefix: '', doc: [], query: '',
             mode: 'ape', maxTokens: 64, stop: []};
  for (let i = 2; i < argv.length; i += 2) {
    const k = argv[i].replace(/^--/, ''), v = argv[i + 1];
    if (k === 'doc') a.doc.push(v);
    else if (k === 'stop') a.stop.push(v);
    else if (k === 'max-tokens') a.maxTokens = parseInt(v, 10);
    else if (k in a) a[k] = v;
    else throw new Error(`unknown flag --${k}`);
  }
  if (!a.query) throw new Error('--query is required');
  return a;
}

function loadApi() {
  const root = path.join(__dirname, '..', '..', 'proto');
  const def = protoLoader.loadSync(['ape/v1/encoder.proto', 'ape/v1/decoder.proto'],
                                   {includeDirs: [root], keepCase: true, longs: Number, enums: String,
                                    defaults: true, oneofs: true});
  return grpc.loadPackageDefinition(def).ape.v1;
}

async function main() {
  const args = parseArgs(process.argv);
  const api = loadApi();
  const docs = args.doc.map((f) => fs.readFileSync(f, 'utf8').replace(/[\r\n]+$/, ''));
  const encoder = new api.Encoder(args.encoder, grpc.credentials.createInsecure());
  const resp = await new Promise((resolve, reject) => encoder.Encode(
      {prefix: {text: args.prefix}, contexts: docs.map((text) => ({text}))},
      {deadline: Date.now() + 600000}, (err, r) => (err ? reject(err) : resolve(r))));
  resp.contexts.forEach((c, i) => process.stderr.write(
      `${c.key}\t${c.num_tokens} tokens\t${c.already_cached ? 'cached' : 'new'}\t${args.doc[i]}\n`));
  const decoder = new api.Decoder(args.decoder, grpc.credentials.createInsecure());
  const mode = {ape: 'MODE_APE', parallel: 'MODE_PARALLEL', sequential: 'MODE_SEQUENTIAL'}[args.mode];
  const call = decoder.Generate({prefix: args.prefix, contexts: resp.contexts.map((c) => ({key: c.key})),
                                 query: args.query, mode, max_tokens: args.maxTokens, stop: args.stop},
                                {deadline: Date.now() + 600000});
  await new Promise((resolve, reject) => {
    call.on('data', (msg) => {
      if (msg.token) process.stdout.write(msg.token.text);
      if (msg.final) {
        const f = msg.final;
        process.stdout.write('\n');
        process.stderr.write(`finish=${f.finish_reason} prompt=${f.usage.prompt_tokens} ` +
                             `cached=${f.usage.cached_tokens} generated=${f.usage.generated_tokens} ` +
                             `ttft=${f.timings.time_to_first_token_ms.toFixed(1)}ms\n`);
      }
    });
    call.on('error', reject);
    call.on('end', resolve);
  });
}

main().catch((e) => {
  process.stderr.write(`client.js: ${e.code !== undefined ? `gRPC ${e.code}: ` : ''}${e.details || e.message}\n`);
  process.exit(1);
});
