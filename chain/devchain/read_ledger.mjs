// Reads DLLM's ledger with standard Polkadot tooling (@polkadot/api), independently of the Python client.
// Usage: node read_ledger.mjs <ws-url> <address>...   -> JSON on stdout:
//   { chain, specVersion, head, accounts: {address: {free, reserved, nonce}}, remarks: [...], compute: {...},
//     lineage: {batches: [...], versions: [...]} }
// `remarks` lists every System.remark_with_event payload starting with "dllm:v" found in blocks 1..head,
// whose blake2-256 matches a System.Remarked event of the same extrinsic (the same rule the Python index uses).
// `compute` totals, per provider address, the compute that clients' v2 settlement records carry
// ({tokens_x_params, requests, receipts}, decimal strings/numbers), with chain/history.py's rules: the record's
// sender is the paying client, its transfers in the same extrinsic cover every provider's payout, and
// each receipt counts once. Providers' self-reported `compute` records are not totalled.
// `lineage` lists the model-lineage records ({batches: [...], versions: [...]}, hashes as lowercase hex) with
// chain/lineage.py's rules: the Remarked sender is the extrinsic's signer, the body passes chain/remarks.py's
// strict check (the same key sets, bounds and caps; a batch's root is the Merkle root of its hashes, leaf =
// sha256(0x00 || hash), node = sha256(0x01 || left || right), an odd node promoted). Skipped records: stderr.
import { ApiPromise, WsProvider } from '@polkadot/api';
import { blake2AsHex, encodeAddress, sha256AsU8a } from '@polkadot/util-crypto';
import { hexToU8a, u8aConcat, u8aToHex, u8aToString } from '@polkadot/util';

const [url, ...addresses] = process.argv.slice(2);
if (!url) {
  console.error('usage: node read_ledger.mjs <ws-url> <address>...');
  process.exit(2);
}

function collectRemarks(call, found) {
  // Walk nested calls (batch_all, as_multi, as_derivative) looking for remark payloads.
  if (call.section === 'system' && (call.method === 'remarkWithEvent' || call.method === 'remark')) {
    found.push(call.args[0].toU8a(true));
  }
  for (const arg of call.args) {
    if (arg.toRawType && arg.toRawType().startsWith('Vec<Call>')) arg.forEach((c) => collectRemarks(c, found));
    else if (arg.section !== undefined && arg.method !== undefined && arg.args !== undefined) collectRemarks(arg, found);
    else if (arg.unwrap && arg.isSome !== undefined && arg.isSome && arg.unwrap().section) collectRemarks(arg.unwrap(), found);
  }
}

function applySettlement(text, client, transfers, compute, settled, ss58) {
  // v1 entries: [receipt, [[provider, planck], ...]] (no compute); v2: [receipt, [[provider, planck, params], ...], tokens, requests]
  const match = /^dllm:v(\d+):settle:/.exec(text);
  if (!match) return;
  const version = Number(match[1]);
  const entries = JSON.parse(text.slice(match[0].length)).receipts;
  const claimed = new Map();
  for (const entry of entries) {
    for (const [provider, amount] of entry[1]) claimed.set(provider, (claimed.get(provider) ?? 0n) + BigInt(amount));
  }
  for (const [provider, amount] of claimed) {
    const paid = transfers.filter((t) => t.from === client && t.to === provider).reduce((sum, t) => sum + t.amount, 0n);
    if (paid < amount) return;
  }
  for (const entry of entries) {
    const receipt = String(entry[0]).toLowerCase();
    if (settled.has(receipt)) continue;
    settled.add(receipt);
    if (version < 2) continue;
    const [, shares, tokens, requests] = entry;
    for (const [provider, , params] of shares) {
      if (BigInt(params) <= 0n) continue;
      const address = encodeAddress(hexToU8a('0x' + provider), ss58);
      const total = compute[address] ?? { tokens_x_params: 0n, requests: 0, receipts: 0 };
      total.tokens_x_params += BigInt(tokens) * BigInt(params);
      total.requests += Number(requests);
      total.receipts += 1;
      compute[address] = total;
    }
  }
}

// ---- lineage records: the bounds of chain/remarks.py ----
const LINEAGE = /^dllm:v(\d+):(data-batch|adapter-version):/;
const MAX = { hashes: 256, roots: 256, replicas: 64, categories: 16, name: 128, spanEnd: 1 << 16, version: 2 ** 31 - 1, body: 24576 };
const HEX32 = /^[0-9a-f]{64}$/;
const CONTROL = /[\x00-\x1f\x7f-\x9f]/;
const strictUtf8 = new TextDecoder('utf-8', { fatal: true });

function bad(why) {
  throw new Error(why);
}
function sameKeys(body, keys) {
  const have = Object.keys(body).sort();
  if (have.length !== keys.length || have.some((k, i) => k !== [...keys].sort()[i])) bad(`keys ${have} are not ${keys}`);
}
function whole(value, what, low, high) {
  if (typeof value !== 'number' || !Number.isInteger(value) || value < low || value > high) bad(`${what} must be an integer in ${low}..${high}`);
  return value;
}
function hex32(value, what) {
  if (typeof value !== 'string' || !HEX32.test(value)) bad(`${what} must be 32 bytes of lowercase hex`);
  return value;
}
function name(value, what) {
  if (typeof value !== 'string' || [...value].length === 0 || [...value].length > MAX.name || CONTROL.test(value)) bad(`${what} must be 1..${MAX.name} printable characters`);
  return value;
}
function span(value) {
  if (!Array.isArray(value) || value.length !== 2) bad('span must be [start, end]');
  const start = whole(value[0], 'span start', 0, MAX.spanEnd - 1);
  return [start, whole(value[1], 'span end', start + 1, MAX.spanEnd)];
}
function hexList(value, what, low, high) {
  if (!Array.isArray(value) || value.length < low || value.length > high) bad(`${what} must list ${low}..${high} hashes`);
  value.forEach((h) => hex32(h, what));
  if (new Set(value).size !== value.length) bad(`${what} lists a hash twice`);
  return value;
}
function losses(value, what) {
  if (value === null || typeof value !== 'object' || Array.isArray(value) || Object.keys(value).length > MAX.categories) bad(`${what} must map categories to losses`);
  for (const [category, loss] of Object.entries(value)) {
    name(category, `${what} category`);
    if (typeof loss !== 'number' || !Number.isFinite(loss)) bad(`${what}[${category}] must be a finite number`);
  }
  return value;
}
function merkleRoot(hexes) {
  let level = hexes.map((h) => sha256AsU8a(u8aConcat(new Uint8Array([0]), hexToU8a('0x' + h))));
  while (level.length > 1) {
    const next = [];
    for (let i = 0; i + 1 < level.length; i += 2) next.push(sha256AsU8a(u8aConcat(new Uint8Array([1]), level[i], level[i + 1])));
    if (level.length % 2) next.push(level[level.length - 1]);
    level = next;
  }
  return u8aToHex(level[0]).slice(2);
}

function lineageRecord(payload, block, sender, sentBySigner) {
  // The record as chain/lineage.py lists it, or null when `payload` is no lineage record; throws when malformed.
  const text = strictUtf8.decode(payload);
  const match = LINEAGE.exec(text);
  if (!match) return null;
  if (match[1] !== '1') bad(`${match[2]} records are read up to v1`);
  if (!sentBySigner) bad('not sent by its extrinsic\'s signer');
  if (payload.length - match[0].length > MAX.body) bad(`record of more than ${MAX.body} bytes`);
  const body = JSON.parse(text.slice(match[0].length));
  if (body === null || typeof body !== 'object' || Array.isArray(body)) bad('record body must be a JSON object');
  name(body.model, 'model');
  if (match[2] === 'data-batch') {
    sameKeys(body, ['model', 'span', 'root', 'count', 'hashes']);
    const hashes = hexList(body.hashes, 'hashes', 1, MAX.hashes);
    if (whole(body.count, 'count', 1, MAX.hashes) !== hashes.length) bad('count differs from the number of hashes');
    if (hex32(body.root, 'root') !== merkleRoot(hashes)) bad('root is not the Merkle root of the hashes');
    return { kind: 'batch', record: { block, sender, model: body.model, span: span(body.span), root: body.root, count: hashes.length, hashes } };
  }
  sameKeys(body, ['model', 'span', 'version', 'parent', 'sha256', 'parent_sha256', 'data_roots', 'replicas', 'canary']);
  const version = whole(body.version, 'version', 1, MAX.version);
  const parent = whole(body.parent, 'parent', 0, version - 1);
  hex32(body.sha256, 'sha256');
  if (body.parent_sha256 !== null) hex32(body.parent_sha256, 'parent_sha256');
  hexList(body.data_roots, 'data_roots', 0, MAX.roots);
  if (!Array.isArray(body.replicas) || body.replicas.length > MAX.replicas) bad('too many replicas');
  body.replicas.forEach((r) => name(r, 'replica'));
  if (new Set(body.replicas).size !== body.replicas.length) bad('replicas lists a peer twice');
  const canary = body.canary;
  if (canary === null || typeof canary !== 'object' || Array.isArray(canary)) bad('canary must be an object');
  sameKeys(canary, ['before', 'after']);
  losses(canary.before, 'canary before');
  losses(canary.after, 'canary after');
  return {
    kind: 'version',
    record: { block, sender, model: body.model, span: span(body.span), version, parent, sha256: body.sha256, parent_sha256: body.parent_sha256, data_roots: body.data_roots, replicas: body.replicas, canary },
  };
}

const api = await ApiPromise.create({ provider: new WsProvider(url), noInitWarn: true });
try {
  const head = (await api.rpc.chain.getHeader()).number.toNumber();
  const accounts = {};
  for (const address of addresses) {
    const info = await api.query.system.account(address);
    accounts[address] = { free: info.data.free.toString(), reserved: info.data.reserved.toString(), nonce: info.nonce.toNumber() };
  }
  const remarks = [];
  const lineage = { batches: [], versions: [] };
  const compute = {};
  const settled = new Set();
  const ss58 = api.registry.chainSS58;
  const accountHex = (account) => Buffer.from(api.createType('AccountId32', account).toU8a()).toString('hex');
  for (let n = 1; n <= head; n++) {
    const hash = await api.rpc.chain.getBlockHash(n);
    const [block, events] = await Promise.all([api.rpc.chain.getBlock(hash), api.query.system.events.at(hash)]);
    block.block.extrinsics.forEach((ext, index) => {
      const remarked = events
        .filter((e) => e.phase.isApplyExtrinsic && e.phase.asApplyExtrinsic.toNumber() === index)
        .filter((e) => api.events.system.Remarked.is(e.event))
        .map((e) => ({ sender: e.event.data[0].toString(), hash: e.event.data[1].toHex() }));
      if (remarked.length === 0) return;
      const transfers = events
        .filter((e) => e.phase.isApplyExtrinsic && e.phase.asApplyExtrinsic.toNumber() === index)
        .filter((e) => api.events.balances.Transfer.is(e.event))
        .map((e) => ({ from: accountHex(e.event.data[0]), to: accountHex(e.event.data[1]), amount: e.event.data[2].toBigInt() }));
      const payloads = [];
      collectRemarks(ext.method, payloads);
      // MultiAddress::Id (variant 0) + the 32-byte account, as chain/history.py's extrinsic_signer reads it.
      const address = ext.isSigned ? ext.signer.toU8a() : null;
      const signer = address && address.length === 33 && address[0] === 0 ? Buffer.from(address.slice(1)).toString('hex') : null;
      for (const payload of payloads) {
        const text = u8aToString(payload);
        if (!text.startsWith('dllm:v')) continue;
        const match = remarked.find((r) => r.hash === blake2AsHex(payload, 256));
        if (!match) continue;
        remarks.push({ block: n, sender: match.sender, remark: text });
        try {
          const found = lineageRecord(payload, n, match.sender, accountHex(match.sender) === signer);
          if (found) (found.kind === 'batch' ? lineage.batches : lineage.versions).push(found.record);
        } catch (error) {
          console.error(`ignoring a malformed lineage record in block ${n}: ${error.message ?? error}`);
        }
        try {
          applySettlement(text, accountHex(match.sender), transfers, compute, settled, ss58);
        } catch (error) {
          console.error(`ignoring a malformed settlement record in block ${n}: ${error}`);
        }
      }
    });
  }
  const chain = (await api.rpc.system.chain()).toString();
  for (const total of Object.values(compute)) total.tokens_x_params = total.tokens_x_params.toString();
  console.log(JSON.stringify({ chain, specVersion: api.runtimeVersion.specVersion.toNumber(), head, accounts, remarks, compute, lineage }));
} finally {
  await api.disconnect();
}
