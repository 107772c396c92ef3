// LZ4 frame format decoder (decompression only): what a Python producer with
// compression on puts in a frame with flag 0x01. Spec: lz4/doc/lz4_Frame_format.md.

import { DecodeError } from "./types.js";

const P1 = 2654435761;
const P2 = 2246822519;
const P3 = 3266489917;
const P4 = 668265263;
const P5 = 374761393;

const rotl = (x, r) => (x << r) | (x >>> (32 - r));
const u32le = (b, p) => (b[p] | (b[p + 1] << 8) | (b[p + 2] << 16) | (b[p + 3] << 24)) >>> 0;
const round = (acc, input) => Math.imul(rotl((acc + Math.imul(input, P2)) | 0, 13), P1);

/** xxHash32 of b[start:end]. */
export function xxh32(b, start = 0, end = b.length, seed = 0) {
  let p = start;
  let h;
  if (end - start >= 16) {
    let v1 = (seed + P1 + P2) | 0;
    let v2 = (seed + P2) | 0;
    let v3 = seed | 0;
    let v4 = (seed - P1) | 0;
    const limit = end - 16;
    do {
      v1 = round(v1, u32le(b, p));
      v2 = round(v2, u32le(b, p + 4));
      v3 = round(v3, u32le(b, p + 8));
      v4 = round(v4, u32le(b, p + 12));
      p += 16;
    } while (p <= limit);
    h = (rotl(v1, 1) + rotl(v2, 7) + rotl(v3, 12) + rotl(v4, 18)) | 0;
  } else {
    h = (seed + P5) | 0;
  }
  h = (h + (end - start)) | 0;
  while (p + 4 <= end) {
    h = Math.imul(rotl((h + Math.imul(u32le(b, p), P3)) | 0, 17), P4);
    p += 4;
  }
  while (p < end) {
    h = Math.imul(rotl((h + Math.imul(b[p], P5)) | 0, 11), P1);
    p += 1;
  }
  h ^= h >>> 15;
  h = Math.imul(h, P2);
  h ^= h >>> 13;
  h = Math.imul(h, P3);
  h ^= h >>> 16;
  return h >>> 0;
}

const BLOCK_MAX = { 4: 1 << 16, 5: 1 << 18, 6: 1 << 20, 7: 1 << 22 };

class Output {
  constructor(size, limit) {
    this.buf = new Uint8Array(Math.max(64, Math.min(size, limit)));
    this.len = 0;
    this.limit = limit;
  }
  reserve(n) {
    const need = this.len + n;
    if (need > this.limit) throw new DecodeError(`lz4 body inflates beyond ${this.limit} bytes`);
    if (need > this.buf.length) {
      const grown = new Uint8Array(Math.min(this.limit, Math.max(need, this.buf.length * 2)));
      grown.set(this.buf.subarray(0, this.len));
      this.buf = grown;
    }
  }
}

function decodeBlock(src, ip, end, out) {
  const fail = (why) => {
    throw new DecodeError(`bad lz4 block: ${why}`);
  };
  while (ip < end) {
    const token = src[ip++];
    let lit = token >>> 4;
    if (lit === 15) {
      let b;
      do {
        if (ip >= end) fail("literal length runs past the block");
        b = src[ip++];
        lit += b;
      } while (b === 255);
    }
    if (ip + lit > end) fail("literals run past the block");
    out.reserve(lit);
    out.buf.set(src.subarray(ip, ip + lit), out.len);
    out.len += lit;
    ip += lit;
    if (ip === end) return; // the last sequence has literals only
    if (ip + 2 > end) fail("offset runs past the block");
    const offset = src[ip] | (src[ip + 1] << 8);
    ip += 2;
    if (offset === 0 || offset > out.len) fail(`offset ${offset} points before the output`);
    let len = token & 15;
    if (len === 15) {
      let b;
      do {
        if (ip >= end) fail("match length runs past the block");
        b = src[ip++];
        len += b;
      } while (b === 255);
    }
    len += 4;
    out.reserve(len);
    const buf = out.buf;
    let from = out.len - offset;
    if (offset >= len) {
      buf.copyWithin(out.len, from, from + len);
      out.len += len;
    } else {
      for (let i = 0; i < len; i++) buf[out.len++] = buf[from++]; // overlapping copy
    }
  }
  fail("empty block");
}

/** Decompress one LZ4 frame holding exactly `src` (no trailing bytes), at most `limit` bytes. */
export function lz4FrameDecompress(src, limit = 2 ** 31 - 1) {
  const fail = (why) => {
    throw new DecodeError(`bad lz4 body: ${why}`);
  };
  if (src.length < 7) fail("shorter than an lz4 frame header");
  if (u32le(src, 0) !== 0x184d2204) fail("not an lz4 frame (bad magic)");
  const flg = src[4];
  const bd = src[5];
  if (flg >>> 6 !== 1) fail(`lz4 frame version ${flg >>> 6} is not 1`);
  if (flg & 0x02 || bd & 0x8f) fail("reserved lz4 descriptor bits are set");
  if (flg & 0x01) fail("lz4 dictionaries are not supported");
  const blockChecksum = (flg & 0x10) !== 0;
  const contentChecksum = (flg & 0x04) !== 0;
  const blockMax = BLOCK_MAX[(bd >>> 4) & 7];
  if (!blockMax) fail("bad lz4 block size code");
  let p = 6;
  let size = -1;
  if (flg & 0x08) {
    if (src.length < p + 9) fail("truncated lz4 header");
    const hi = u32le(src, p + 4);
    size = hi * 2 ** 32 + u32le(src, p);
    if (size > limit) fail(`content size ${size} exceeds the limit ${limit}`);
    p += 8;
  }
  if (((xxh32(src, 4, p) >>> 8) & 0xff) !== src[p]) fail("lz4 header checksum mismatch");
  p += 1;
  const out = new Output(size >= 0 ? size : 1 << 16, limit);
  for (;;) {
    if (p + 4 > src.length) fail("truncated: no end mark");
    const word = u32le(src, p);
    p += 4;
    if (word === 0) break;
    const n = word & 0x7fffffff;
    if (n > blockMax) fail(`block of ${n} bytes exceeds the frame's block size`);
    if (p + n > src.length) fail("truncated block");
    if (word & 0x80000000) {
      out.reserve(n);
      out.buf.set(src.subarray(p, p + n), out.len);
      out.len += n;
    } else {
      decodeBlock(src, p, p + n, out);
    }
    if (blockChecksum) {
      if (p + n + 4 > src.length) fail("truncated block checksum");
      if (xxh32(src, p, p + n) !== u32le(src, p + n)) fail("block checksum mismatch");
      p += 4;
    }
    p += n;
  }
  if (contentChecksum) {
    if (p + 4 > src.length) fail("truncated content checksum");
    if (xxh32(out.buf, 0, out.len) !== u32le(src, p)) fail("content checksum mismatch");
    p += 4;
  }
  if (p !== src.length) fail(`${src.length - p} bytes after the lz4 frame`);
  if (size >= 0 && out.len !== size) fail(`content is ${out.len} bytes, header says ${size}`);
  return out.buf.subarray(0, out.len);
}
