// Reads DLLM's ledger with standard Polkadot tooling (@polkadot/api), independently of the Python client.
// Usage: node read_ledger.mjs <ws-url> <address>...   -> JSON on stdout:
//   { chain, specVersion, head, accounts: {address: {free, reserved, nonce}}, remarks: [...], compute: {...} }
// `remarks` lists every System.remark_with_event payload starting with "dllm:v" found in blocks 1..head,
// whose blake2-256 matches a System.Remarked event of the same extrinsic (the same rule the Python index uses).
// `compute` totals, per provider address, the compute that clients' v2 settlement records carry
// ({tokens_x_params, requests, receipts}, decimal strings/numbers), with chain/history.py's rules: the record's
// sender is the paying client, its transfers in the same extrinsic cover every provider's payout, and
// each receipt counts once. Providers' self-reported `compute` records are not totalled.
import { ApiPromise, WsProvider } from '@polkadot/api';
import { blake2AsHex, encodeAddress } from '@polkadot/util-crypto';
import { hexToU8a, u8aToString } from '@polkadot/util';

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

const api = await ApiPromise.create({ provider: new WsProvider(url), noInitWarn: true });
try {
  const head = (await api.rpc.chain.getHeader()).number.toNumber();
  const accounts = {};
  for (const address of addresses) {
    const info = await api.query.system.account(address);
    accounts[address] = { free: info.data.free.toString(), reserved: info.data.reserved.toString(), nonce: info.nonce.toNumber() };
  }
  const remarks = [];
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
      for (const payload of payloads) {
        const text = u8aToString(payload);
        if (!text.startsWith('dllm:v')) continue;
        const match = remarked.find((r) => r.hash === blake2AsHex(payload, 256));
        if (!match) continue;
        remarks.push({ block: n, sender: match.sender, remark: text });
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
  console.log(JSON.stringify({ chain, specVersion: api.runtimeVersion.specVersion.toNumber(), head, accounts, remarks, compute }));
} finally {
  await api.disconnect();
}
