// Reads DLLM's ledger with standard Polkadot tooling (@polkadot/api), independently of the Python client.
// Usage: node read_ledger.mjs <ws-url> <address>...   -> JSON on stdout:
//   { chain, specVersion, head, accounts: {address: {free, reserved, nonce}}, remarks: [...] }
// `remarks` lists every System.remark_with_event payload starting with "dllm:v1:" found in blocks 1..head,
// whose blake2-256 matches a System.Remarked event of the same extrinsic (the same rule the Python index uses).
import { ApiPromise, WsProvider } from '@polkadot/api';
import { blake2AsHex } from '@polkadot/util-crypto';
import { u8aToString } from '@polkadot/util';

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

const api = await ApiPromise.create({ provider: new WsProvider(url), noInitWarn: true });
try {
  const head = (await api.rpc.chain.getHeader()).number.toNumber();
  const accounts = {};
  for (const address of addresses) {
    const info = await api.query.system.account(address);
    accounts[address] = { free: info.data.free.toString(), reserved: info.data.reserved.toString(), nonce: info.nonce.toNumber() };
  }
  const remarks = [];
  for (let n = 1; n <= head; n++) {
    const hash = await api.rpc.chain.getBlockHash(n);
    const [block, events] = await Promise.all([api.rpc.chain.getBlock(hash), api.query.system.events.at(hash)]);
    block.block.extrinsics.forEach((ext, index) => {
      const remarked = events
        .filter((e) => e.phase.isApplyExtrinsic && e.phase.asApplyExtrinsic.toNumber() === index)
        .filter((e) => api.events.system.Remarked.is(e.event))
        .map((e) => ({ sender: e.event.data[0].toString(), hash: e.event.data[1].toHex() }));
      if (remarked.length === 0) return;
      const payloads = [];
      collectRemarks(ext.method, payloads);
      for (const payload of payloads) {
        const text = u8aToString(payload);
        if (!text.startsWith('dllm:v1:')) continue;
        const match = remarked.find((r) => r.hash === blake2AsHex(payload, 256));
        if (match) remarks.push({ block: n, sender: match.sender, remark: text });
      }
    });
  }
  const chain = (await api.rpc.system.chain()).toString();
  console.log(JSON.stringify({ chain, specVersion: api.runtimeVersion.specVersion.toNumber(), head, accounts, remarks }));
} finally {
  await api.disconnect();
}
