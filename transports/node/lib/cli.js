// Command-line options shared by produce.js and consume.js: reliable mode (PROTOCOL.md section 5).

/** parseArgs option specs for --reliable and its timing settings. */
export const RELIABLE_OPTIONS = {
  reliable: { type: "boolean", default: false },
  "heartbeat-interval": { type: "string" },
  liveness: { type: "string" },
  "ack-timeout": { type: "string" },
  "reconnect-initial": { type: "string" },
  "reconnect-max": { type: "string" },
};

export const RELIABLE_USAGE =
  "[--reliable [--heartbeat-interval S] [--liveness N] [--ack-timeout S] " +
  "[--reconnect-initial S] [--reconnect-max S]]";

const NAMES = {
  "heartbeat-interval": "heartbeatInterval",
  liveness: "liveness",
  "ack-timeout": "ackTimeout",
  "reconnect-initial": "reconnectInitial",
  "reconnect-max": "reconnectMax",
};

/** The reliability options given (as numbers), or calls `usage` naming a bad or stray one. */
export function reliableOptions(values, usage) {
  const out = {};
  for (const [flag, name] of Object.entries(NAMES)) {
    if (values[flag] === undefined) continue;
    if (!values.reliable) usage(`--${flag} needs --reliable`);
    const n = Number(values[flag]);
    if (!Number.isFinite(n) || n <= 0) usage(`--${flag} must be a number > 0`);
    if (flag === "liveness" && !Number.isInteger(n)) usage("--liveness must be an integer >= 1");
    out[name] = n;
  }
  return out;
}
