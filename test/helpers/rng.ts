/** A small seeded PRNG (mulberry32) so random workloads are reproducible from their seed. */
export function rng(seed: number): () => number {
  let a = seed >>> 0;
  return () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = a;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

/** Deterministic bytes for a write: recognisable, different per seed, not all one value. */
export function pattern(length: number, seed: number): Uint8Array {
  const r = rng(seed);
  const b = new Uint8Array(length);
  const v = Math.floor(r() * 255) + 1;
  for (let i = 0; i < length; i++) b[i] = (v + (i % 251) * (i % 7 === 0 ? 1 : 0)) & 0xff || 1;
  return b;
}

/** Deterministic pseudo-random bytes (xorshift32): incompressible, the same on every run. */
export function pseudoRandom(length: number, seed: number): Buffer {
  const b = Buffer.alloc(Math.ceil(length / 4) * 4);
  let x = seed >>> 0 || 0x9e3779b9;
  for (let i = 0; i < b.length; i += 4) {
    x ^= x << 13;
    x >>>= 0;
    x ^= x >>> 17;
    x ^= x << 5;
    x >>>= 0;
    b.writeUInt32LE(x, i);
  }
  return b.subarray(0, length);
}
