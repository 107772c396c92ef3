#!/usr/bin/env node
// Consume a sage-zmq queue until end of stream and report what arrived.
//
//   node consume.js [--bind tcp://127.0.0.1:*] [--maxsize N] [--upstreams N]
//        [--print records|summary] [--check-partition] [--limit N] [--timeout S]
//        [--reliable [--ack-timeout S]]
//
// The first stdout line is {"endpoint": "tcp://127.0.0.1:PORT"} once bound (a handshake for
// whoever starts producers); then, with --print records, one {"record": typed} line per record;
// the last line is {"summary": {...}}. --check-partition recomputes, for every Packet whose
// headers.partition maps parallelism -> instance, this side's instanceForKey and counts
// disagreements. --reliable consumes a `sage` queue (PROTOCOL.md section 5): in-sequence
// acceptance, acks as records are consumed, "who are you?" to unknown producers.
// Exit status: 0 end of stream seen, 3 idle timeout, 64 usage error.

import { parseArgs } from "node:util";
import { RELIABLE_OPTIONS, RELIABLE_USAGE, reliableOptions } from "./lib/cli.js";
import {
  Consumer,
  EmptyError,
  Packet,
  ReliableConsumer,
  instanceForKey,
  toTyped,
} from "./sagezmq.js";

function usage(message) {
  process.stderr.write(`consume.js: ${message}\n`);
  process.stderr.write(
    "usage: node consume.js [--bind ENDPOINT] [--maxsize N] [--upstreams N] " +
      `[--print records|summary] [--check-partition] [--limit N] [--timeout S] ${RELIABLE_USAGE}\n`,
  );
  process.exit(64);
}

let parsed;
try {
  parsed = parseArgs({
    options: {
      bind: { type: "string", default: "tcp://127.0.0.1:*" },
      maxsize: { type: "string", default: "1000" },
      upstreams: { type: "string", default: "1" },
      print: { type: "string", default: "summary" },
      "check-partition": { type: "boolean", default: false },
      limit: { type: "string" },
      timeout: { type: "string", default: "30" },
      ...RELIABLE_OPTIONS,
    },
  });
} catch (err) {
  usage(err.message);
}
const { values } = parsed;
const maxsize = Number(values.maxsize);
const upstreams = Number(values.upstreams);
const timeout = Number(values.timeout);
const limit = values.limit === undefined ? Infinity : Number(values.limit);
if (!Number.isInteger(maxsize) || maxsize < 1) usage("--maxsize must be an integer >= 1");
if (!Number.isInteger(upstreams) || upstreams < 1) usage("--upstreams must be an integer >= 1");
if (!(timeout > 0)) usage("--timeout must be a number of seconds > 0");
if (!["records", "summary"].includes(values.print)) usage("--print is records or summary");

const reliability = reliableOptions(values, usage);
const Kind = values.reliable ? ReliableConsumer : Consumer;
const consumer = new Kind({ ...reliability, maxsize, upstreams, exactFloats: true });
const endpoint = await consumer.bind(values.bind);
process.stdout.write(`${JSON.stringify({ endpoint })}\n`);

const summary = {
  records: 0,
  end_of_stream: false,
  upstreams_ended: 0,
  partition_checked: 0,
  partition_mismatches: 0,
  mismatch_examples: [],
  types: {},
};

function checkPartition(rec) {
  const table = rec.headers?.partition;
  if (rec.partitionKey === null || !table || typeof table !== "object") return;
  for (const [p, expected] of Object.entries(table)) {
    const mine = instanceForKey(rec.partitionKey, Number(p));
    summary.partition_checked += 1;
    if (mine !== Number(expected)) {
      summary.partition_mismatches += 1;
      if (summary.mismatch_examples.length < 5) {
        summary.mismatch_examples.push({ key: toTyped(rec.partitionKey), p: Number(p), expected, mine });
      }
    }
  }
}

let status = 0;
try {
  while (summary.records < limit) {
    const next = await consumer.next({ timeout });
    if (next.done) {
      summary.end_of_stream = true;
      break;
    }
    const rec = next.value;
    summary.records += 1;
    const type = rec?.constructor?.name ?? typeof rec;
    summary.types[type] = (summary.types[type] ?? 0) + 1;
    if (values["check-partition"] && rec instanceof Packet) checkPartition(rec);
    if (values.print === "records") {
      process.stdout.write(`${JSON.stringify({ record: toTyped(rec) })}\n`);
    }
  }
} catch (err) {
  if (!(err instanceof EmptyError)) throw err;
  process.stderr.write(`consume.js: ${err.message}\n`);
  status = 3;
}
summary.upstreams_ended = consumer.upstreamsEnded;
Object.assign(summary, {
  rejected: consumer.stats.rejected,
  duplicates: consumer.stats.duplicates,
  gaps: consumer.stats.gaps,
  prompts: consumer.stats.prompts ?? 0,
  batches: consumer.stats.batches,
  producers: consumer.ups.size,
});
await consumer.close();
process.stdout.write(`${JSON.stringify({ summary })}\n`);
process.exitCode = status;
