#!/usr/bin/env node
// A Node.js upstream of a Python pipeline: sensor readings as keyed Packets.
//
//   node producer.mjs ENDPOINT [COUNT] [MAXSIZE]
//
// ENDPOINT and MAXSIZE come from the Python side's QueueDescriptor (qd.endpoint, maxsize):
// both ends must agree on maxsize, the producer's implicit first credit.

import { Packet, Producer, instanceForKey } from "../../transports/node/sagezmq.js";

const [endpoint, countText = "2000", maxsizeText = "200"] = process.argv.slice(2);
if (!endpoint) {
  process.stderr.write("usage: node producer.mjs ENDPOINT [COUNT] [MAXSIZE]\n");
  process.exit(64);
}
const count = Number(countText);
const producer = new Producer(endpoint, { maxsize: Number(maxsizeText), queue: "readings" });

for (let i = 0; i < count; i++) {
  const sensor = `sensor-${i % 12}`;
  const value = 20 + 5 * Math.sin(i / 50) + (i % 12);
  await producer.put(
    new Packet(
      { sensor, value, unit: "C", n: i },
      // The Python side routes by this key; node says where it expects it to land (3 workers).
      { partitionKey: sensor, headers: { node_worker: instanceForKey(sensor, 3) } },
    ),
  );
}
await producer.end(); // this upstream's END
await producer.close(); // waits until the consumer confirms it received everything
process.stderr.write(`node producer: sent ${producer.stats.sent} readings in ${producer.stats.batches} batches\n`);
