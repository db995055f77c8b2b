#!/usr/bin/env node
// apeserve from Node.js: encode documents, stream an answer.
//   cd clients/node && npm install && node client.js --encoder 127.0.0.1:50051 \
//     --decoder 127.0.0.1:50052 --prefix "..." --doc a.txt --doc b.txt --query "..."
// Loads ../../proto at run time with @grpc/proto-loader (no generated code).
// --chat wraps prefix (system text), documents and query in the model's chat
// template (the request's `chat` field; encode and generate agree on it).
// TLS with --tls-ca (or --tls for the system roots); mutual TLS adds
// --tls-cert and --tls-key. `node client.js --help` lists every flag.
'use strict';
const fs = require('fs');
const path = require('path');
const grpc = require('@grpc/grpc-js');
const protoLoader = require('@grpc/proto-loader');

const USAGE = `usage: node client.js --query Q [flags]
Encodes --doc files on the encoder (cached under content keys), then asks the
decoder with those keys and streams the answer to stdout (usage to stderr).

  --encoder ADDR         ape-encoder address (default 127.0.0.1:50051); ADDR may
                         be a comma-separated list or dns:///name:port
  --decoder ADDR         ape-decoder address (default 127.0.0.1:50052)
  --round-robin          balance calls over every address of ADDR (on for a
                         list; with dns:///name, every address it resolves to)
  --prefix TEXT          shared prefix text (default "")
  --doc FILE             a document, UTF-8 (repeat)
  --query TEXT           the question (required)
  --mode M               ape, parallel or sequential (default ape)
  --max-tokens N         generated tokens, at most (default 64)
  --stop TEXT            a stop string (repeat)
  --chat                 wrap prefix (the system text), documents and query
                         in the model's chat template (llama3, chatml,
                         mistral-inst): the answer is the assistant's reply
TLS (default: plaintext):
  --tls                  TLS, verifying the servers with the system roots
  --tls-ca PEM           TLS, verifying the servers with this CA bundle
  --tls-cert PEM         client certificate, for servers started with
                         --tls_client_ca (mutual TLS; with --tls-key)
  --tls-key PEM          private key of --tls-cert
  --tls-server-name NAME name to verify in the servers' certificates
                         (default: the address's host)
  --help                 this text
`;

function parseArgs(argv) {
  const a = {encoder: '127.0.0.1:50051', decoder: '127.0.0.1:50052', prefix: '', doc: [], query: '',
             mode: 'ape', maxTokens: 64, stop: [], chat: false, tls: false, tlsCa: '', tlsCert: '', tlsKey: '',
             tlsServerName: '', roundRobin: false};
  const valued = {'encoder': 'encoder', 'decoder': 'decoder', 'prefix': 'prefix', 'query': 'query', 'mode': 'mode',
                  'tls-ca': 'tlsCa', 'tls-cert': 'tlsCert', 'tls-key': 'tlsKey', 'tls-server-name': 'tlsServerName'};
  for (let i = 2; i < argv.length; i++) {
    let k = argv[i].replace(/^--/, ''), v;
    const eq = k.indexOf('=');
    if (eq >= 0) [k, v] = [k.slice(0, eq), k.slice(eq + 1)];
    if (k === 'help' || k === 'h') return null;
    if (k === 'tls') { a.tls = true; continue; }
    if (k === 'chat') { a.chat = true; continue; }
    if (k === 'round-robin') { a.roundRobin = true; continue; }
    if (v === undefined) {
      if (i + 1 >= argv.length) throw new Error(`--${k} needs a value`);
      v = argv[++i];
    }
    if (k === 'doc') a.doc.push(v);
    else if (k === 'stop') a.stop.push(v);
    else if (k === 'max-tokens') a.maxTokens = parseInt(v, 10);
    else if (k in valued) a[valued[k]] = v;
    else throw new Error(`unknown flag --${k} (see --help)`);
  }
  if (!a.query) throw new Error('--query is required (see --help)');
  if (!['ape', 'parallel', 'sequential'].includes(a.mode)) throw new Error('--mode must be ape, parallel or sequential');
  if (!a.tlsCert !== !a.tlsKey) throw new Error('--tls-cert and --tls-key go together');
  return a;
}

// Plaintext, or TLS when any --tls* flag is given; the channel options
// carry --tls-server-name.
function credentials(a) {
  if (!(a.tls || a.tlsCa || a.tlsCert)) return {creds: grpc.credentials.createInsecure(), options: {}};
  const read = (f) => (f ? fs.readFileSync(f) : null);
  return {creds: grpc.credentials.createSsl(read(a.tlsCa), read(a.tlsKey), read(a.tlsCert)),
          options: a.tlsServerName ? {'grpc.ssl_target_name_override': a.tlsServerName,
                                      'grpc.default_authority': a.tlsServerName} : {}};
}

// "h1:p1,h2:p2" as gRPC's static address list "ipv4:h1:p1,h2:p2" (a
// target with a scheme, or one address, as it is); a list, or
// --round-robin, balances calls round-robin over the addresses.
function channel(Client, address, creds, options, roundRobin) {
  const list = address.includes(',') && !/^(ipv4|ipv6|dns|unix):/.test(address);
  const target = list ? (address.startsWith('[') ? 'ipv6:' : 'ipv4:') + address : address;
  const opts = Object.assign({}, options);
  if (list || roundRobin) opts['grpc.service_config'] = JSON.stringify({loadBalancingConfig: [{round_robin: {}}]});
  return new Client(target, creds, opts);
}

// Request text goes as UTF-8 bytes: the API's text fields are `bytes`, and
// protobufjs would read a JS string given to a bytes field as base64.
const utf8 = (s) => Buffer.from(s, 'utf8');

function loadApi() {
  const root = path.join(__dirname, '..', '..', 'proto');
  const def = protoLoader.loadSync(['ape/v1/encoder.proto', 'ape/v1/decoder.proto'],
                                   {includeDirs: [root], keepCase: true, longs: Number, enums: String,
                                    defaults: true, oneofs: true});
  return grpc.loadPackageDefinition(def).ape.v1;
}

async function main() {
  const args = parseArgs(process.argv);
  if (args === null) {
    process.stdout.write(USAGE);
    return;
  }
  const {creds, options} = credentials(args);
  const api = loadApi();
  const docs = args.doc.map((f) => fs.readFileSync(f, 'utf8').replace(/[\r\n]+$/, ''));
  const encoder = channel(api.Encoder, args.encoder, creds, options, args.roundRobin);
  const resp = await new Promise((resolve, reject) => encoder.Encode(
      {prefix: {text: utf8(args.prefix)}, contexts: docs.map((text) => ({text: utf8(text)})), chat: args.chat},
      {deadline: Date.now() + 600000}, (err, r) => (err ? reject(err) : resolve(r))));
  resp.contexts.forEach((c, i) => process.stderr.write(
      `${c.key}\t${c.num_tokens} tokens\t${c.already_cached ? 'cached' : 'new'}\t${args.doc[i]}\n`));
  const decoder = channel(api.Decoder, args.decoder, creds, options, args.roundRobin);
  const mode = {ape: 'MODE_APE', parallel: 'MODE_PARALLEL', sequential: 'MODE_SEQUENTIAL'}[args.mode];
  const call = decoder.Generate({prefix: utf8(args.prefix), contexts: resp.contexts.map((c) => ({key: utf8(c.key)})),
                                 query: utf8(args.query), mode, max_tokens: args.maxTokens,
                                 stop: args.stop.map(utf8), chat: args.chat},
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
