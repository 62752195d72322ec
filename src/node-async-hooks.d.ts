// The slice of node:async_hooks that workerd provides under nodejs_compat and that we use.
// Declared here rather than pulling @types/node (and Node's globals) into Worker code.
declare module "node:async_hooks" {
  export class AsyncLocalStorage<T> {
    getStore(): T | undefined;
    run<R>(store: T, fn: () => R): R;
    disable(): void;
    /** A function that runs its argument in the async context current at this call. */
    static snapshot(): <R>(fn: () => R) => R;
  }
}
