/**
 * The byte stream under JSON-RPC: a sequence of JSON values on a TCP or Unix
 * socket, each handled as soon as it is complete, whether or not a newline
 * follows (so `echo -n '{...}' | nc host port` works, also when nc
 * half-closes after sending). Replies are written one per line.
 *
 * JsonSplitter finds where each top-level value ends without parsing it: it
 * tracks strings (and their escapes) and bracket depth byte by byte, so
 * multi-byte UTF-8 never confuses it (all its bytes are >= 0x80). A value
 * nested deeper than the limit is skipped and reported as a parse error; one
 * larger than the size limit ends the connection.
 */

/** What the splitter hands on: a complete value's bytes, or a value refused. */
export type SplitEvent = { kind: 'value'; bytes: Buffer } | { kind: 'too-deep'; depth: number } | { kind: 'too-large'; limit: number };

const WS = new Set([0x20, 0x09, 0x0a, 0x0d]);
const QUOTE = 0x22;
const BACKSLASH = 0x5c;
const OPEN = new Set([0x7b, 0x5b]); // { [
const CLOSE = new Set([0x7d, 0x5d]); // } ]

type Mode = 'between' | 'nested' | 'string' | 'scalar';

export class JsonSplitter {
  private mode: Mode = 'between';
  /** Bracket depth inside a nested value. */
  private depth = 0;
  /** A string inside a nested value (as opposed to a top-level string). */
  private stringInNested = false;
  private escape = false;
  private tooDeep = false;
  private maxSeen = 0;
  private pieces: Buffer[] = [];
  private size = 0;

  constructor(
    readonly maxBytes: number,
    readonly maxDepth: number,
  ) {}

  /** True while part of a value has arrived but not its end. */
  get partial(): boolean {
    return this.mode !== 'between';
  }

  /** Feed bytes; returns the values completed by them, in order. */
  push(chunk: Buffer): SplitEvent[] {
    const out: SplitEvent[] = [];
    let start = 0; // where the current value begins in this chunk (when one is open)
    let i = 0;
    const finish = (end: number): void => {
      // end is exclusive
      const tail = chunk.subarray(start, end);
      const total = this.size + tail.length;
      if (total > this.maxBytes) {
        out.push({ kind: 'too-large', limit: this.maxBytes });
      } else if (this.tooDeep) {
        out.push({ kind: 'too-deep', depth: this.maxSeen });
      } else {
        out.push({ kind: 'value', bytes: this.pieces.length === 0 ? Buffer.from(tail) : Buffer.concat([...this.pieces, tail], total) });
      }
      this.reset();
    };
    while (i < chunk.length) {
      const b = chunk[i] as number;
      switch (this.mode) {
        case 'between':
          if (WS.has(b)) {
            i++;
            continue;
          }
          start = i;
          if (OPEN.has(b)) {
            this.mode = 'nested';
            this.depth = 1;
            this.maxSeen = 1;
          } else if (b === QUOTE) {
            this.mode = 'string';
            this.stringInNested = false;
          } else if (CLOSE.has(b)) {
            // A stray closing bracket is a value of its own: JSON.parse refuses it (parse error).
            i++;
            finish(i);
            continue;
          } else this.mode = 'scalar';
          i++;
          break;
        case 'nested':
          if (b === QUOTE) {
            this.mode = 'string';
            this.stringInNested = true;
          } else if (OPEN.has(b)) {
            this.depth++;
            if (this.depth > this.maxSeen) this.maxSeen = this.depth;
            if (this.depth > this.maxDepth) this.tooDeep = true;
          } else if (CLOSE.has(b)) {
            this.depth--;
            if (this.depth === 0) {
              i++;
              finish(i);
              if (out[out.length - 1]?.kind === 'too-large') return out;
              continue;
            }
          }
          i++;
          break;
        case 'string':
          if (this.escape) this.escape = false;
          else if (b === BACKSLASH) this.escape = true;
          else if (b === QUOTE) {
            if (this.stringInNested) this.mode = 'nested';
            else {
              i++;
              finish(i);
              if (out[out.length - 1]?.kind === 'too-large') return out;
              continue;
            }
          }
          i++;
          break;
        case 'scalar':
          // A number, true, false, null (or garbage): it ends where whitespace or another value begins.
          if (WS.has(b) || OPEN.has(b) || CLOSE.has(b) || b === QUOTE) {
            finish(i);
            if (out[out.length - 1]?.kind === 'too-large') return out;
            continue;
          }
          i++;
          break;
      }
      if ((this.mode as Mode) !== 'between' && this.size + (i - start) > this.maxBytes) {
        // Past the limit before the end: refuse now rather than buffer more.
        this.reset();
        out.push({ kind: 'too-large', limit: this.maxBytes });
        return out;
      }
    }
    if (this.mode !== 'between') {
      const rest = chunk.subarray(start);
      this.pieces.push(Buffer.from(rest));
      this.size += rest.length;
    }
    return out;
  }

  /** The peer sent its last byte: a scalar still open is complete; anything else is cut short. */
  end(): SplitEvent[] {
    if (this.mode === 'scalar') {
      const bytes = Buffer.concat(this.pieces, this.size);
      this.reset();
      return [{ kind: 'value', bytes }];
    }
    if (this.mode !== 'between') {
      // Hand on what came: JSON.parse reports it as a parse error.
      const bytes = Buffer.concat(this.pieces, this.size);
      const deep = this.tooDeep;
      const maxSeen = this.maxSeen;
      this.reset();
      return [deep ? { kind: 'too-deep', depth: maxSeen } : { kind: 'value', bytes }];
    }
    return [];
  }

  private reset(): void {
    this.mode = 'between';
    this.depth = 0;
    this.escape = false;
    this.tooDeep = false;
    this.maxSeen = 0;
    this.pieces = [];
    this.size = 0;
  }
}

const utf8 = new TextDecoder('utf-8', { fatal: true });

/** Decode a value's bytes as UTF-8 and parse it; throws a SyntaxError naming what is wrong. */
export function parseValue(bytes: Buffer): unknown {
  let text: string;
  try {
    text = utf8.decode(bytes);
  } catch {
    throw new SyntaxError('the message is not valid UTF-8');
  }
  return JSON.parse(text) as unknown;
}

/** JSON.stringify that writes bigints as numbers when safe, else as hex strings (as `inspect --output json`). */
export function stringifyReply(v: unknown): string {
  return JSON.stringify(v, (_k, x: unknown) =>
    typeof x === 'bigint' ? (x <= BigInt(Number.MAX_SAFE_INTEGER) ? Number(x) : '0x' + x.toString(16)) : x,
  );
}
