/**
 * A small LRU cache of promises, bounded by entry count. Caching the promise
 * (not the value) makes concurrent loads of the same table share one read.
 * Loaded values can also be looked up synchronously (peek), for the callers
 * that answer at once when everything they need is in memory.
 */
export class LruCache<K, V> {
  private readonly map = new Map<K, Promise<V>>();
  /** The entries of `map` whose load has finished, by key. */
  private readonly ready = new Map<K, V>();

  constructor(private readonly capacity: number) {}

  get(key: K, load: () => Promise<V>): Promise<V> {
    const hit = this.map.get(key);
    if (hit !== undefined) {
      // Re-insert to mark as most recently used.
      this.map.delete(key);
      this.map.set(key, hit);
      return hit;
    }
    const p = load();
    this.map.set(key, p);
    p.then(
      (v) => {
        if (this.map.get(key) === p) this.ready.set(key, v);
      },
      () => {
        if (this.map.get(key) === p) this.map.delete(key);
      },
    );
    while (this.map.size > this.capacity) {
      const oldest = this.map.keys().next().value as K;
      this.map.delete(oldest);
      this.ready.delete(oldest);
    }
    return p;
  }

  /** The loaded value for key, if there is one now (marks it recently used); never loads. */
  peek(key: K): V | undefined {
    const v = this.ready.get(key);
    if (v !== undefined) {
      const p = this.map.get(key) as Promise<V>;
      this.map.delete(key);
      this.map.set(key, p);
    }
    return v;
  }

  delete(key: K): void {
    this.map.delete(key);
    this.ready.delete(key);
  }

  clear(): void {
    this.map.clear();
    this.ready.clear();
  }

  get size(): number {
    return this.map.size;
  }
}
