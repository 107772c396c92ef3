#!/usr/bin/env node
// Produce COUNT records into a sage-zmq queue, then END and CLOSE.
//
//   node produce.js ENDPOINT COUNT [--maxsize N] [--kind ints|packets|mixed] [--keys N]
//        [--producer-id ID] [--queue NAME] [--batch-size N] [--timeout S] [--start N]
//        [--tag TEXT] [--no-end] [--echo] [--pace N]
//        [--reliable [--heartbeat-interval S] [--liveness N] [--ack-timeout S]
//                    [--reconnect-initial S] [--reconnect-max S]]
//
// --echo prints each record sent as a typed JSON line {"record": ...}; the last line is
// {"done": {...}}. --pace N pauses 5 ms after every N records (so a stream lasts long enough
// for faults to hit it). --reliable speaks to `sage` queues (PROTOCOL.md section 5): frames
// are kept and retransmitted, and close waits until the consumer consumed everything.
// Exit status: 0 delivered, 2 not confirmed or full, 64 usage error.

import { parseArgs } from "node:util";
import { setTimeout as sleep } from "node:timers/promises";
import { DeliveryError, FullError, Producer, ReliableProducer, SzError, toTyped } from "./sagezmq.js";
import { RELIABLE_OPTIONS, RELIABLE_USAGE, reliableOptions } from "./lib/cli.js";
import { KINDS, recordFor } from "./lib/samples.js";

function usage(message) {
  process.stderr.write(`produce.js: ${message}\n`);
  process.stderr.write(
    "usage: node produce.js ENDPOINT COUNT [--maxsize N] [--kind ints|packets|mixed] " +
      "[--keys N] [--producer-id ID] [--queue NAME] [--batch-size N] [--timeout S] " +
      `[--start N] [--tag TEXT] [--no-end] [--echo] [--pace N] ${RELIABLE_USAGE}\n`,
  );
  process.exit(64);
}

function intOption(values, name, fallback, min = 0) {
  if (values[name] === undefined) return fallback;
  const n = Number(values[name]);
  if (!Number.isInteger(n) || n < min) usage(`--${name} must be an integer >= ${min}`);
  return n;
}

let parsed;
try {
  parsed = parseArgs({
    allowPositionals: true,
    options: {
      maxsize: { type: "string" },
      kind: { type: "string", default: "ints" },
      keys: { type: "string" },
      "producer-id": { type: "string" },
      queue: { type: "string", default: "" },
      "batch-size": { type: "string" },
      timeout: { type: "string" },
      start: { type: "string" },
      tag: { type: "string", default: "node" },
      "no-end": { type: "boolean", default: false },
      echo: { type: "boolean", default: false },
      pace: { type: "string" },
      ...RELIABLE_OPTIONS,
    },
  });
} catch (err) {
  usage(err.message);
}
const { values, positionals } = parsed;
if (positionals.length !== 2) usage("expected ENDPOINT and COUNT");
const [endpoint, countText] = positionals;
if (!/^(tcp|ipc):\/\//.test(endpoint)) usage(`endpoint ${endpoint} is not tcp://HOST:PORT`);
const count = Number(countText);
if (!Number.isInteger(count) || count < 0) usage("COUNT must be an integer >= 0");
if (!KINDS.includes(values.kind)) usage(`--kind must be one of ${KINDS.join(", ")}`);
const maxsize = intOption(values, "maxsize", 1000, 1);
const keys = intOption(values, "keys", 50, 1);
const start = intOption(values, "start", 0);
const batchSize = intOption(values, "batch-size", 100, 1);
const pace = intOption(values, "pace", 0, 1);
const reliability = reliableOptions(values, usage);
const timeout = values.timeout === undefined ? 30 : Number(values.timeout);
if (!(timeout > 0)) usage("--timeout must be a number of seconds > 0");

const Kind = values.reliable ? ReliableProducer : Producer;
const producer = new Kind(endpoint, {
  ...reliability,
  maxsize,
  batchSize,
  timeout,
  queue: values.queue,
  ...(values["producer-id"] ? { producerId: values["producer-id"] } : {}),
});
let status = 0;
try {
  for (let i = start; i < start + count; i++) {
    const record = recordFor(values.kind, i, { keys, tag: values.tag });
    if (values.echo) process.stdout.write(`${JSON.stringify({ record: toTyped(record) })}\n`);
    await producer.put(record);
    if (pace && (i - start) % pace === pace - 1) await sleep(5);
  }
  if (!values["no-end"]) await producer.end();
  await producer.close();
} catch (err) {
  if (!(err instanceof SzError)) throw err;
  process.stderr.write(`produce.js: ${err.message}\n`);
  status = err instanceof DeliveryError || err instanceof FullError ? 2 : 1;
  if (!producer.closed) await producer.close({ timeout: 1 }).catch(() => {});
}
const done = {
  producer: producer.producerId,
  sent: producer.stats.sent,
  batches: producer.stats.batches,
  credits: producer.stats.credits,
  credit_waits: producer.stats.creditWaits,
  retransmits: producer.stats.retransmits ?? 0,
  resends: producer.stats.resends ?? 0,
  reconnects: producer.stats.reconnects ?? 0,
};
process.stdout.write(`${JSON.stringify({ done })}\n`);
process.exitCode = status;
