// One load-generator worker of `vitalwire bench --generator node` (see load.py).
//
// The same worker as load.py's Python one, in Node.js with no dependencies (only built-ins),
// because at high rates the Python generator saturates before the servers it measures. It reads its
// JSON config from the file named by its argument: {target, shape, devices, clients, clock}. Once
// every connection is open it writes the line `connected` on stdout and reads one line on stdin,
// {"start_at": wall clock s}, the load's start, given when every worker is connected. At the end
// it writes one JSON result on stdout with the fields of load.WorkerResult.
//
// One clock for every process: `clock` is {wall: time.time(), mono: time.monotonic()} taken in the
// parent at one instant; Node's hrtime and Python's monotonic clock are both CLOCK_MONOTONIC on
// Linux, so wall + (hrtime - mono) is the parent's wall clock, as an epoch the server accepts.
//
// Behaviour, as in the Python worker: open every client and wait until each has subscribed, then
// open the devices (one after another), say so, wait until start_at, run each device's send loop at
// rate_hz for duration_s (a random phase within one period, an absolute schedule), wait 2 s for
// the last readings, close everything and print the result.

import crypto from "node:crypto";
import fs from "node:fs";
import net from "node:net";

const LATENCY_SAMPLES = 200_000; // per worker, reservoir
const OPEN_TIMEOUT_S = 10; // as websockets' open_timeout and aiomqtt's timeout
const READY_TIMEOUT_S = 120; // every client subscribed
const MQTT_KEEPALIVE_S = 60;
const EMPTY = Buffer.alloc(0);

// -------------------------------------------------------------------------------------------------
// the one clock
// -------------------------------------------------------------------------------------------------

let WALL = 0;
let MONO_NS = 0n;

/** Seconds on the parent's monotonic clock, counted from the clock pair's instant. */
function mono() {
  return Number(process.hrtime.bigint() - MONO_NS) / 1e9;
}

/** Wall-clock epoch seconds, the same clock in every process of the run. */
function tsNow() {
  return WALL + mono();
}

function sleep(seconds) {
  return new Promise((resolve) => setTimeout(resolve, Math.max(0, seconds * 1000)));
}

function withTimeout(promise, seconds, what) {
  let timer;
  const timeout = new Promise((_, reject) => {
    timer = setTimeout(() => reject(new Error(`timed out after ${seconds} s: ${what}`)), seconds * 1000);
  });
  return Promise.race([promise, timeout]).finally(() => clearTimeout(timer));
}

// xorshift32, for WebSocket masking keys (the mask only has to vary, not to be secret here)
let rngState = crypto.randomBytes(4).readUInt32LE(0) | 1;
function rand32() {
  let x = rngState;
  x ^= x << 13;
  x ^= x >>> 17;
  x ^= x << 5;
  rngState = x;
  return x >>> 0;
}

function hostPort(url, defaultPort) {
  const u = new URL(url);
  return { scheme: u.protocol, host: u.hostname, port: Number(u.port || defaultPort) };
}

// Every socket reads into this one buffer (net's `onread`: no Buffer and no stream event per read).
// Each read is parsed before the next one, so only what must outlive a read is copied out of it.
const READ_BUFFER = Buffer.allocUnsafe(256 * 1024);

/** A TCP connection (Nagle off) whose reads go to `reader.take(bytes)`; `reader` may be set later. */
function connectTcp(host, port) {
  const sock = net.connect({
    host,
    port,
    noDelay: true,
    onread: {
      buffer: READ_BUFFER,
      callback: (n, buf) => {
        if (sock.reader) sock.reader.take(buf.subarray(0, n));
      },
    },
  });
  sock.reader = null;
  return sock;
}

/** One client connection over `sock`: its close state, and incremental parsing of the byte
 * stream into frames/packets (subclasses: `parse`, `onClose`). */
class Incoming {
  constructor(sock) {
    this.sock = sock;
    this.buf = EMPTY; // unparsed bytes (owned: never a view of READ_BUFFER)
    this.queue = []; // copies of the reads that arrived while a large frame is incomplete
    this.queued = 0;
    this.need = 0; // bytes `buf` must hold before parsing again (0: parse at every read)
    this.closing = false; // we started the close
    this.closed = false;
    this.closedPromise = new Promise((resolve) => {
      this.resolveClosed = resolve;
    });
    sock.on("error", (err) => {
      this.error = err;
    });
    sock.on("close", () => this.onClose());
    sock.reader = this;
  }

  /** Resolves once the socket can take more (its "drain") or closes; at once if closed. */
  drained() {
    if (this.closed) return Promise.resolve();
    return new Promise((resolve) => {
      const done = () => {
        this.sock.off("drain", done);
        this.sock.off("close", done);
        resolve();
      };
      this.sock.on("drain", done);
      this.sock.on("close", done);
    });
  }

  /** Take one read (a view of READ_BUFFER, valid until this returns). */
  take(bytes) {
    let buf;
    if (this.need) {
      // a frame bigger than what we hold is incomplete: gather its reads, join them once
      this.queue.push(Buffer.from(bytes));
      this.queued += bytes.length;
      if (this.buf.length + this.queued < this.need) return;
      this.queue.unshift(this.buf);
      buf = Buffer.concat(this.queue, this.buf.length + this.queued);
      this.queue = [];
      this.queued = 0;
      this.need = 0;
    } else if (this.buf.length === 0) {
      buf = bytes;
    } else {
      buf = Buffer.concat([this.buf, bytes]);
    }
    const off = this.parse(buf); // sets this.need when it stops at an incomplete frame
    this.buf = off === buf.length ? EMPTY : Buffer.from(buf.subarray(off));
  }
}

// -------------------------------------------------------------------------------------------------
// a minimal RFC 6455 WebSocket client
// -------------------------------------------------------------------------------------------------

const WS_GUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11";

/** Receives whole messages: `handler(payload)` gets a Buffer valid only during the call; before a
 * handler is set (the request/reply of the handshakes), recv() gives the next message, copied. */
class WebSocket extends Incoming {
  constructor(sock, path) {
    super(sock);
    this.path = path;
    this.handler = null; // (payload: Buffer) => void
    this.inbox = [];
    this.waiters = [];
    this.frags = null; // payloads of a fragmented message
    this.closeSent = false;
    this.closeCode = 0; // from the peer's close frame (1005: none given, 1006: no close frame)
  }

  static connect(url, path, onClose) {
    const { scheme, host, port } = hostPort(url, 80);
    if (scheme !== "ws:" && scheme !== "http:") {
      return Promise.reject(new Error(`unsupported URL ${url} (ws:// or http:// only)`));
    }
    const key = crypto.randomBytes(16).toString("base64");
    const accept = crypto.createHash("sha1").update(key + WS_GUID).digest("base64");
    let sock = null;
    const opening = new Promise((resolve, reject) => {
      sock = connectTcp(host, port);
      let head = EMPTY;
      const fail = (err) => {
        sock.destroy();
        reject(err);
      };
      const onError = (err) => fail(err);
      const onEarlyClose = () => fail(new Error(`${path}: connection closed during the handshake`));
      const handshake = (bytes) => {
        head = Buffer.concat([head, bytes]); // a copy: `bytes` is only valid during this call
        const end = head.indexOf("\r\n\r\n");
        if (end < 0) {
          if (head.length > 65536) fail(new Error(`${path}: handshake reply too long`));
          return;
        }
        sock.reader = null;
        sock.off("error", onError);
        sock.off("close", onEarlyClose);
        const lines = head.toString("latin1", 0, end).split("\r\n");
        if (!/^HTTP\/1\.1 101\b/.test(lines[0])) {
          fail(new Error(`${path}: server answered ${JSON.stringify(lines[0])}`));
          return;
        }
        const headers = new Map();
        for (const line of lines.slice(1)) {
          const colon = line.indexOf(":");
          if (colon > 0) {
            headers.set(line.slice(0, colon).trim().toLowerCase(), line.slice(colon + 1).trim());
          }
        }
        if (headers.get("sec-websocket-accept") !== accept) {
          fail(new Error(`${path}: bad Sec-WebSocket-Accept`));
          return;
        }
        if (headers.get("sec-websocket-extensions")) {
          fail(new Error(`${path}: server chose extensions we did not ask for`));
          return;
        }
        const ws = new WebSocket(sock, path);
        ws.onUnexpectedClose = onClose;
        const rest = head.subarray(end + 4);
        if (rest.length) ws.take(rest);
        resolve(ws);
      };
      sock.reader = { take: handshake };
      sock.on("error", onError);
      sock.on("close", onEarlyClose);
      sock.write(
        `GET ${path} HTTP/1.1\r\nHost: ${host}:${port}\r\nUpgrade: websocket\r\n` +
          `Connection: Upgrade\r\nSec-WebSocket-Key: ${key}\r\nSec-WebSocket-Version: 13\r\n\r\n`,
      );
    });
    return withTimeout(opening, OPEN_TIMEOUT_S, `opening ${url}${path}`).catch((err) => {
      sock.destroy();
      throw err;
    });
  }

  // -- receiving ----------------------------------------------------------------------------------

  /** Frames from `buf`; returns how many bytes they took. */
  parse(buf) {
    let off = 0;
    while (!this.closed && !this.closeCode) {
      const avail = buf.length - off;
      if (avail < 2) break;
      const b0 = buf[off];
      const b1 = buf[off + 1];
      let len = b1 & 0x7f;
      let hdr = 2;
      if (len === 126) {
        if (avail < 4) break;
        len = buf.readUInt16BE(off + 2);
        hdr = 4;
      } else if (len === 127) {
        if (avail < 10) break;
        len = buf.readUInt32BE(off + 2) * 2 ** 32 + buf.readUInt32BE(off + 6);
        hdr = 10;
      }
      const masked = (b1 & 0x80) !== 0; // servers do not mask; tolerated anyway
      const start = off + hdr + (masked ? 4 : 0);
      if (buf.length < start + len) {
        this.need = start + len - off;
        break;
      }
      let payload = buf.subarray(start, start + len);
      if (masked) {
        payload = Buffer.from(payload);
        for (let i = 0; i < len; i++) payload[i] ^= buf[start - 4 + (i & 3)];
      }
      off = start + len;
      this.frame(b0 & 0x80, b0 & 0x0f, payload);
    }
    return off;
  }

  frame(fin, opcode, payload) {
    switch (opcode) {
      case 0x1: // text
      case 0x2: // binary
        if (fin) this.deliver(payload);
        else this.frags = [Buffer.from(payload)];
        return;
      case 0x0: // continuation
        if (!this.frags) return;
        this.frags.push(Buffer.from(payload));
        if (fin) {
          const whole = Buffer.concat(this.frags);
          this.frags = null;
          this.deliver(whole);
        }
        return;
      case 0x8: // close: answer it (echoing the code), then the server closes the TCP connection
        this.closeCode = payload.length >= 2 ? payload.readUInt16BE(0) : 1005;
        if (!this.closeSent) {
          this.closeSent = true;
          this.write(0x8, payload.length >= 2 ? payload.subarray(0, 2) : EMPTY);
        }
        this.sock.end();
        return;
      case 0x9: // ping
        if (!this.closeSent) this.write(0xa, payload);
        return;
      default: // pong and anything else
        return;
    }
  }

  deliver(payload) {
    if (this.handler) this.handler(payload);
    else if (this.waiters.length) this.waiters.shift().resolve(Buffer.from(payload));
    else this.inbox.push(Buffer.from(payload));
  }

  /** The next message, before a handler is set (the handshake replies). */
  recv() {
    if (this.inbox.length) return Promise.resolve(this.inbox.shift());
    if (this.closed) return Promise.reject(this.closedError());
    return new Promise((resolve, reject) => this.waiters.push({ resolve, reject }));
  }

  async recvJson() {
    return JSON.parse((await this.recv()).toString("utf8"));
  }

  onClose() {
    if (this.closed) return;
    this.closed = true;
    if (!this.closeCode) this.closeCode = 1006;
    for (const w of this.waiters.splice(0)) w.reject(this.closedError());
    this.resolveClosed();
    if (!this.closing && this.onUnexpectedClose) this.onUnexpectedClose(this);
  }

  closedError() {
    const why = this.error ? `: ${this.error.message}` : "";
    return new Error(`${this.path}: connection closed (code ${this.closeCode || 1006})${why}`);
  }

  // -- sending ------------------------------------------------------------------------------------

  /** Send a text message; false when the socket's buffer is full (then await drained()). */
  send(text) {
    if (this.closeSent || this.closed) throw this.closedError();
    const len = Buffer.byteLength(text);
    const [frame, at] = this.header(0x1, len);
    frame.write(text, at, len, "utf8");
    this.mask(frame, at, len);
    return this.sock.write(frame);
  }

  write(opcode, payload) {
    const [frame, at] = this.header(opcode, payload.length);
    payload.copy(frame, at);
    this.mask(frame, at, payload.length);
    return this.sock.write(frame);
  }

  /** A masked frame's buffer with its header and key written; the payload goes at `at`. */
  header(opcode, len) {
    const hdr = len < 126 ? 2 : len < 65536 ? 4 : 10;
    const frame = Buffer.allocUnsafe(hdr + 4 + len);
    frame[0] = 0x80 | opcode;
    if (hdr === 2) {
      frame[1] = 0x80 | len;
    } else if (hdr === 4) {
      frame[1] = 0x80 | 126;
      frame.writeUInt16BE(len, 2);
    } else {
      frame[1] = 0x80 | 127;
      frame.writeUInt32BE(Math.floor(len / 2 ** 32), 2);
      frame.writeUInt32BE(len >>> 0, 6);
    }
    frame.writeUInt32BE(rand32(), hdr);
    return [frame, hdr + 4];
  }

  mask(frame, at, len) {
    const k0 = frame[at - 4];
    const k1 = frame[at - 3];
    const k2 = frame[at - 2];
    const k3 = frame[at - 1];
    const end = at + len;
    let i = at;
    for (; i + 3 < end; i += 4) {
      frame[i] ^= k0;
      frame[i + 1] ^= k1;
      frame[i + 2] ^= k2;
      frame[i + 3] ^= k3;
    }
    if (i < end) frame[i++] ^= k0;
    if (i < end) frame[i++] ^= k1;
    if (i < end) frame[i] ^= k2;
  }

  /** The closing handshake: send close (1000), wait for the server to close the connection. */
  async close() {
    this.closing = true;
    if (this.closed) return;
    if (!this.closeSent) {
      this.closeSent = true;
      const code = Buffer.from([0x03, 0xe8]);
      this.write(0x8, code);
    }
    const timer = setTimeout(() => this.sock.destroy(), 2000);
    await this.closedPromise;
    clearTimeout(timer);
  }
}

// -------------------------------------------------------------------------------------------------
// a minimal MQTT 3.1.1 client
// -------------------------------------------------------------------------------------------------

function remainingLength(n) {
  const out = [];
  do {
    let b = n % 128;
    n = Math.floor(n / 128);
    if (n > 0) b |= 0x80;
    out.push(b);
  } while (n > 0);
  return out;
}

/** One packet: the fixed header's first byte and the rest (Buffer parts, written as one). */
function packet(first, parts) {
  let len = 0;
  for (const p of parts) len += p.length;
  const rl = remainingLength(len);
  const out = Buffer.allocUnsafe(1 + rl.length + len);
  out[0] = first;
  for (let i = 0; i < rl.length; i++) out[1 + i] = rl[i];
  let at = 1 + rl.length;
  for (const p of parts) {
    p.copy(out, at);
    at += p.length;
  }
  return out;
}

function mqttString(s) {
  const b = Buffer.from(s, "utf8");
  const out = Buffer.allocUnsafe(2 + b.length);
  out.writeUInt16BE(b.length, 0);
  b.copy(out, 2);
  return out;
}

const PINGREQ = Buffer.from([0xc0, 0x00]);
const DISCONNECT = Buffer.from([0xe0, 0x00]);

/** `handler(topic, payload)` gets each PUBLISH; the payload is valid only during the call. */
class Mqtt extends Incoming {
  constructor(sock, clientId) {
    super(sock);
    this.clientId = clientId;
    this.handler = null; // (topic: string, payload: Buffer) => void
    this.nextId = 0;
    this.pending = new Map(); // packet id -> {resolve, reject} (PUBACK, SUBACK)
    this.connack = null;
    this.lastSent = mono();
    this.pinger = setInterval(
      () => {
        if (!this.closed && mono() - this.lastSent >= MQTT_KEEPALIVE_S / 2) this.write(PINGREQ);
      },
      (MQTT_KEEPALIVE_S / 4) * 1000,
    );
    this.pinger.unref();
  }

  static connect(url, clientId, onClose) {
    const { host, port } = hostPort(url, 1883);
    let sock = null;
    const opening = new Promise((resolve, reject) => {
      sock = connectTcp(host, port);
      const onError = (err) => reject(err);
      sock.once("error", onError);
      sock.once("connect", () => {
        sock.off("error", onError);
        const m = new Mqtt(sock, clientId);
        m.onUnexpectedClose = onClose;
        m.connack = { resolve: () => resolve(m), reject };
        const keepalive = Buffer.from([0x00, 0x04, 0x4d, 0x51, 0x54, 0x54, 0x04, 0x02, 0, 0]);
        keepalive.writeUInt16BE(MQTT_KEEPALIVE_S, 8); // "MQTT", level 4, clean session
        m.write(packet(0x10, [keepalive, mqttString(clientId)]));
      });
    });
    return withTimeout(opening, OPEN_TIMEOUT_S, `connecting ${clientId} to ${url}`).catch((err) => {
      sock.destroy();
      throw err;
    });
  }

  packetId() {
    this.nextId = (this.nextId % 65535) + 1;
    return this.nextId;
  }

  write(buf) {
    this.lastSent = mono();
    return this.sock.write(buf);
  }

  /** Subscribe to each topic (one SUBSCRIBE per topic, sent together); resolves at every SUBACK. */
  subscribe(topics, qos) {
    const acks = topics.map((topic) => {
      const id = this.packetId();
      const pid = Buffer.allocUnsafe(2);
      pid.writeUInt16BE(id, 0);
      const acked = new Promise((resolve, reject) => this.pending.set(id, { resolve, reject }));
      this.write(packet(0x82, [pid, mqttString(topic), Buffer.from([qos])]));
      return acked.then((code) => {
        if (code === 0x80) throw new Error(`subscription to ${topic} refused`);
      });
    });
    return Promise.all(acks);
  }

  /** QoS 0: the socket's write result (false: await drained()). QoS 1: a Promise of the PUBACK. */
  publish(topic, text, qos) {
    if (this.closed || this.closing) throw this.closedError();
    const len = Buffer.byteLength(text);
    const rest = 2 + topic.length + (qos ? 2 : 0) + len;
    const rl = remainingLength(rest);
    const out = Buffer.allocUnsafe(1 + rl.length + rest);
    out[0] = 0x30 | (qos << 1);
    let at = 1;
    for (const b of rl) out[at++] = b;
    out.writeUInt16BE(topic.length, at);
    topic.copy(out, at + 2);
    at += 2 + topic.length;
    let acked = null;
    if (qos) {
      const id = this.packetId();
      out.writeUInt16BE(id, at);
      at += 2;
      acked = new Promise((resolve, reject) => this.pending.set(id, { resolve, reject }));
    }
    out.write(text, at, len, "utf8");
    const ok = this.write(out);
    return qos ? acked : ok;
  }

  /** Packets from `buf`; returns how many bytes they took. */
  parse(buf) {
    let off = 0;
    while (!this.closed) {
      const avail = buf.length - off;
      if (avail < 2) break;
      let len = 0;
      let mult = 1;
      let i = off + 1;
      let complete = false;
      for (; i < buf.length && i <= off + 4; i++) {
        const b = buf[i];
        len += (b & 0x7f) * mult;
        mult *= 128;
        if ((b & 0x80) === 0) {
          complete = true;
          i++;
          break;
        }
      }
      if (!complete) break;
      if (buf.length < i + len) {
        this.need = i + len - off;
        break;
      }
      this.packet(buf[off], buf.subarray(i, i + len));
      off = i + len;
    }
    return off;
  }

  packet(first, body) {
    switch (first >> 4) {
      case 3: {
        // PUBLISH
        const qos = (first >> 1) & 3;
        const tlen = body.readUInt16BE(0);
        const topic = body.toString("utf8", 2, 2 + tlen);
        let at = 2 + tlen;
        if (qos) {
          const id = body.readUInt16BE(at);
          at += 2;
          if (qos === 1) this.write(Buffer.from([0x40, 0x02, id >> 8, id & 0xff]));
          else this.write(Buffer.from([0x50, 0x02, id >> 8, id & 0xff])); // PUBREC
        }
        if (this.handler) this.handler(topic, body.subarray(at));
        return;
      }
      case 2: {
        // CONNACK
        const waiting = this.connack;
        this.connack = null;
        if (!waiting) return;
        if (body[1] === 0) waiting.resolve();
        else waiting.reject(new Error(`${this.clientId}: connection refused (code ${body[1]})`));
        return;
      }
      case 4: // PUBACK
      case 9: {
        // SUBACK
        const id = body.readUInt16BE(0);
        const waiting = this.pending.get(id);
        if (waiting) {
          this.pending.delete(id);
          waiting.resolve(body[2]); // SUBACK: the (one topic's) return code
        }
        return;
      }
      case 6: // PUBREL (QoS 2, not used by the bench): complete it
        this.write(Buffer.from([0x70, 0x02, body[0], body[1]]));
        return;
      default: // PINGRESP and the rest
        return;
    }
  }

  onClose() {
    if (this.closed) return;
    this.closed = true;
    clearInterval(this.pinger);
    const err = this.closedError();
    if (this.connack) this.connack.reject(err);
    for (const w of this.pending.values()) w.reject(err);
    this.pending.clear();
    this.resolveClosed();
    if (!this.closing && this.onUnexpectedClose) this.onUnexpectedClose(this);
  }

  closedError() {
    const why = this.error ? `: ${this.error.message}` : "";
    return new Error(`${this.clientId}: connection closed${why}`);
  }

  /** DISCONNECT, then close the connection. */
  async close() {
    this.closing = true;
    if (this.closed) return;
    this.write(DISCONNECT);
    this.sock.end();
    const timer = setTimeout(() => this.sock.destroy(), 2000);
    await this.closedPromise;
    clearTimeout(timer);
  }
}

// -------------------------------------------------------------------------------------------------
// the worker
// -------------------------------------------------------------------------------------------------

const PONG = '{"type":"pong"}';

function patientName(i) {
  return `P${String(i + 1).padStart(3, "0")}`;
}

function watched(shape, client) {
  const k = Math.min(shape.patients_per_client, shape.devices);
  const out = [];
  for (let j = 0; j < k; j++) out.push((client * k + j) % shape.devices);
  return out;
}

const res = {
  sent: {},
  duplicates: 0,
  seen: 0,
  connect_s: 0,
  cpu_s: 0,
  errors: [],
};

const latencies = new Float64Array(LATENCY_SAMPLES); // the reservoir, filled up to `kept`
/** Per second of the load (by arrival): [timed readings, slower than SLOW_MS, slowest ms]. */
const timeline = new Map();
const SLOW_MS = 50; // as load.py
let START_AT = 0; // the load's start (wall clock, s)
/** Per second of the load: this worker's longest event-loop stall (ms), which a latency measured
 * here includes — so a slow second can be told from a slow generator. */
const stalls = new Map();
const STALL_TICK_MS = 10;

function sampleStalls() {
  let last = tsNow();
  return setInterval(() => {
    const now = tsNow();
    const stall = Math.max(0, (now - last) * 1000 - STALL_TICK_MS);
    last = now;
    const second = Math.floor(now - START_AT);
    if (!(stalls.get(second) >= stall)) stalls.set(second, stall);
  }, STALL_TICK_MS);
}
let kept = 0;

/** Per client and watched device: the highest seq seen and how many distinct arrived. */
class Tracker {
  constructor(client, devices, warmupS) {
    this.client = client;
    // readings sent in the load's first warmupS seconds (by their device timestamp): not in the
    // latencies. By time, not by seq: against a server the bench did not start, a device's seqs
    // go on from an earlier run's.
    this.warmupS = warmupS;
    this.devices = devices; // slot -> device index
    this.highest = new Float64Array(devices.length);
    this.count = new Float64Array(devices.length);
  }

  got(slot, seq, ts) {
    if (slot === undefined) throw new Error("a frame for a device this client does not watch");
    if (seq <= this.highest[slot]) {
      res.duplicates += 1;
      return;
    }
    this.highest[slot] = seq;
    this.count[slot] += 1;
    if (this.warmupS > 0 && ts < START_AT + this.warmupS) return;
    const now = tsNow();
    const latency = (now - ts) * 1000;
    res.seen += 1;
    const second = Math.floor(now - START_AT);
    let bucket = timeline.get(second);
    if (bucket === undefined) {
      bucket = [0, 0, 0];
      timeline.set(second, bucket);
    }
    bucket[0] += 1;
    if (latency > SLOW_MS) bucket[1] += 1;
    if (latency > bucket[2]) bucket[2] = latency;
    if (kept < LATENCY_SAMPLES) {
      latencies[kept++] = latency;
    } else {
      const j = Math.floor(Math.random() * res.seen);
      if (j < LATENCY_SAMPLES) latencies[j] = latency;
    }
  }
}

function errorText(err) {
  return err instanceof Error ? `${err.name}: ${err.message}` : String(err);
}

function closedAbnormally(what) {
  return (conn) => {
    if (conn instanceof WebSocket && (conn.closeCode === 1000 || conn.closeCode === 1001)) return;
    res.errors.push(`${what}: ${errorText(conn.closedError())}`);
  };
}

/** A client's frame handler; a frame it cannot take ends that client (an error), not the worker. */
function guarded(c, conn, handler) {
  return (...args) => {
    try {
      handler(...args);
    } catch (err) {
      res.errors.push(`client ${c}: ${errorText(err)}`);
      conn.handler = () => {};
      conn.close().catch(() => {});
    }
  };
}

/** Several nodes of one cluster (`target.urls`): connection `i` goes to the `i`-th, round robin. */
function urlFor(target, i) {
  return target.urls && target.urls.length ? target.urls[i % target.urls.length] : target.url;
}

/** Client `i`'s node: `target.client_urls` round robin when given (the clients on other nodes
 * than the devices), else as urlFor. */
function clientUrlFor(target, i) {
  const urls = target.client_urls;
  return urls && urls.length ? urls[i % urls.length] : urlFor(target, i);
}

async function openClient(target, shape, c, tracker) {
  const onClose = closedAbnormally(`client ${c}`);
  if (target.kind === "mqtt") {
    const index = new Map(tracker.devices.map((d, j) => [`vitalwire-bench/${patientName(d)}`, j]));
    const m = await Mqtt.connect(target.url, `bench-cli-${process.pid}-${c}`, onClose);
    m.handler = guarded(c, m, (topic, payload) => {
      const msg = JSON.parse(payload.toString("utf8"));
      tracker.got(index.get(topic), msg.seq, msg.ts);
    });
    await m.subscribe([...index.keys()], target.qos);
    return m;
  }
  if (target.kind === "naive") {
    const index = new Map(tracker.devices.map((d, j) => [patientName(d), j]));
    const ws = await WebSocket.connect(target.url, "/client", onClose);
    ws.send(JSON.stringify({ subscribe: [...index.keys()] }));
    await ws.recv();
    ws.handler = guarded(c, ws, (raw) => {
      const msg = JSON.parse(raw.toString("utf8"));
      tracker.got(index.get(msg.patient), msg.seq, msg.ts);
    });
    return ws;
  }
  const index = new Map(tracker.devices.map((d, j) => [`patient:${target.devices[d][2]}`, j]));
  const ws = await WebSocket.connect(clientUrlFor(target, c), "/ws", onClose);
  ws.send(JSON.stringify({ type: "auth", token: target.token }));
  const auth = await ws.recvJson();
  if (auth.type === "error") throw new Error(`auth refused: ${auth.code}: ${auth.message}`);
  ws.send(JSON.stringify({ type: "subscribe", streams: [...index.keys()], batch: true, id: 1 }));
  const handle = (msg) => {
    const kind = msg.type;
    if (kind === "events") {
      for (const item of msg.items) {
        if (item.kind === "reading") tracker.got(index.get(item.stream), item.data.seq, item.data.ts);
      }
    } else if (kind === "event") {
      if (msg.kind === "reading") tracker.got(index.get(msg.stream), msg.data.seq, msg.data.ts);
    } else if (kind === "ping" && !ws.closeSent) {
      ws.send(PONG);
    }
  };
  for (;;) {
    const msg = await ws.recvJson();
    if (msg.type === "subscribed" && msg.id === 1) break;
    if (msg.type === "error") throw new Error(`subscribe refused: ${msg.code}: ${msg.message}`);
    handle(msg);
  }
  ws.handler = guarded(c, ws, (raw) => handle(JSON.parse(raw.toString("utf8"))));
  return ws;
}

async function openDevice(target, d) {
  if (target.kind === "mqtt") {
    const m = await Mqtt.connect(target.url, `bench-dev-${process.pid}-${d}`, () => {});
    const topic = Buffer.from(`vitalwire-bench/${patientName(d)}`);
    const qos = target.qos;
    return {
      conn: m,
      send(seq, ts) {
        const r = m.publish(topic, `{"seq":${seq},"ts":${ts},"spo2":97,"hr":72}`, qos);
        if (qos) return r;
        return r ? undefined : m.drained();
      },
    };
  }
  if (target.kind === "naive") {
    const ws = await WebSocket.connect(target.url, "/device", () => {});
    const patient = patientName(d);
    return {
      conn: ws,
      send(seq, ts) {
        const ok = ws.send(`{"patient":"${patient}","seq":${seq},"ts":${ts},"spo2":97,"hr":72}`);
        return ok ? undefined : ws.drained();
      },
    };
  }
  const [did, secret] = target.devices[d];
  const ws = await WebSocket.connect(urlFor(target, d), "/ws/device", () => {});
  ws.send(JSON.stringify({ type: "hello", device_id: did, secret }));
  const welcome = await ws.recvJson();
  if (welcome.type !== "welcome") {
    throw new Error(`device ${did} refused: ${JSON.stringify(welcome)}`);
  }
  const base = welcome.high_seq;
  ws.handler = (raw) => {
    if (raw.indexOf('"type":"ping"') !== -1 && !ws.closeSent) ws.send(PONG);
  };
  return {
    conn: ws,
    send(seq, ts) {
      const ok = ws.send(`{"type":"reading","seq":${base + seq},"ts":${ts},"spo2":97,"hr":72}`);
      return ok ? undefined : ws.drained();
    },
  };
}

async function sendLoop(shape, d, sender) {
  const period = 1.0 / shape.rate_hz;
  const start = mono() + Math.random() * period; // spread devices over the period
  const end = start + shape.duration_s;
  let seq = 0;
  let nextAt = start;
  for (;;) {
    const now = mono();
    if (now >= end) break;
    if (now < nextAt) await sleep(nextAt - now);
    seq += 1;
    try {
      const pending = sender.send(seq, tsNow());
      if (pending) await pending;
    } catch (err) {
      res.errors.push(`device ${d}: ${errorText(err)}`);
      break;
    }
    nextAt += period;
  }
  res.sent[d] = seq;
}

/** The first line on stdin (the parent writes it once every worker is connected). */
async function readLine() {
  let text = "";
  for await (const chunk of process.stdin) {
    text += chunk.toString("utf8");
    const end = text.indexOf("\n");
    if (end !== -1) return text.slice(0, end);
  }
  return text;
}

async function worker(config) {
  const { target, shape, devices, clients, clock } = config;
  WALL = clock.wall;
  MONO_NS = BigInt(Math.round(clock.mono * 1e9));
  const t0 = mono();
  const trackers = clients.map((c) => new Tracker(c, watched(shape, c), shape.warmup_s || 0));
  const conns = [];
  const opened = trackers.map((tracker) =>
    openClient(target, shape, tracker.client, tracker).then(
      (conn) => conns.push(conn),
      (err) => res.errors.push(`client ${tracker.client}: ${errorText(err)}`),
    ),
  );
  await withTimeout(Promise.all(opened), READY_TIMEOUT_S, "clients subscribing");
  const senders = [];
  for (const d of devices) senders.push(await openDevice(target, d));
  res.connect_s = mono() - t0;
  process.stdout.write("connected\n");
  const startAt = JSON.parse(await readLine()).start_at;
  START_AT = startAt;
  res.start_at = startAt;
  await sleep(startAt - tsNow());
  const sampler = sampleStalls();
  await Promise.all(devices.map((d, i) => sendLoop(shape, d, senders[i])));
  await sleep(2.0); // let the last readings arrive
  clearInterval(sampler);
  await Promise.all(senders.map((s) => s.conn.close().catch(() => {})));
  await Promise.all(conns.map((conn) => conn.close().catch(() => {})));
  const received = [];
  for (const t of trackers) {
    for (let j = 0; j < t.devices.length; j++) {
      if (t.count[j] > 0) received.push([[t.client, t.devices[j]], t.count[j]]);
    }
  }
  const usage = process.cpuUsage();
  res.cpu_s = (usage.user + usage.system) / 1e6;
  return {
    ...res,
    received,
    latencies_ms: Array.from(latencies.subarray(0, kept)),
    timeline: [...timeline.entries()].sort((a, b) => a[0] - b[0]).map(([k, v]) => [k, ...v]),
    stalls: [...stalls.entries()],
  };
}

try {
  const result = await worker(JSON.parse(fs.readFileSync(process.argv[2], "utf8")));
  process.stdout.write(JSON.stringify(result), () => process.exit(0));
} catch (err) {
  process.stderr.write(`load.mjs: ${err && err.stack ? err.stack : err}\n`);
  process.exit(1);
}
