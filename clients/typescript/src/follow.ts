// Reading a tokenstream stream from TypeScript (browsers through a grpc-web bridge, or
// Node with @connectrpc/connect-node): every token exactly once, resuming after failures.
import { Code, ConnectError, createClient, type Client, type Transport } from "@connectrpc/connect";
import { createGrpcWebTransport } from "@connectrpc/connect-web";
import {
  StreamState,
  TokenStreamService,
} from "./gen/tokenstream/v1/tokenstream_pb.js";

export type TokenStreamClient = Client<typeof TokenStreamService>;

/** A client over grpc-web (e.g. Envoy's grpc_web filter in front of the server). */
export function connectGrpcWeb(baseUrl: string): TokenStreamClient {
  return clientOver(createGrpcWebTransport({ baseUrl }));
}

export function clientOver(transport: Transport): TokenStreamClient {
  return createClient(TokenStreamService, transport);
}

/** Tokens `startSeq..endSeq` (inclusive), concatenated. */
export interface Piece {
  kind: "chunk";
  startSeq: bigint;
  endSeq: bigint;
  text: string;
}

/** How the stream ended; always the last item. */
export interface End {
  kind: "end";
  state: StreamState;
  finalSeq: bigint;
  reason: string;
  error: string;
}

export interface FollowOptions {
  /** Consecutive failed attempts without progress before giving up. */
  maxAttempts?: number;
  /** Resume when nothing (not even a heartbeat) arrives for this long. */
  heartbeatTimeoutMs?: number;
}

// Re-sending the same request can succeed after these; other codes are final.
const RETRYABLE = new Set<Code>([
  Code.Unavailable,
  Code.DeadlineExceeded,
  Code.ResourceExhausted,
  Code.Aborted,
]);

/**
 * Yields the stream's chunks from `fromSeq` on, then its end. After a failure it
 * re-subscribes from the last `endSeq + 1`, so nothing is lost or repeated.
 */
export async function* follow(
  client: TokenStreamClient,
  streamId: string,
  fromSeq = 0n,
  { maxAttempts = 8, heartbeatTimeoutMs = 30_000 }: FollowOptions = {},
): AsyncGenerator<Piece | End> {
  let next = fromSeq;
  let attempt = 0;
  for (;;) {
    const abort = new AbortController();
    let silent = false;
    let timer = setTimeout(() => ((silent = true), abort.abort()), heartbeatTimeoutMs);
    try {
      for await (const message of client.subscribe(
        { streamId, fromSeq: next },
        { signal: abort.signal },
      )) {
        clearTimeout(timer);
        timer = setTimeout(() => ((silent = true), abort.abort()), heartbeatTimeoutMs);
        attempt = 0;
        const event = message.event;
        if (event.case === "chunk") {
          if (event.value.startSeq !== next) {
            throw new ConnectError(`expected seq ${next}, got ${event.value.startSeq}`, Code.DataLoss);
          }
          next = event.value.endSeq + 1n;
          yield { kind: "chunk", ...pick(event.value) };
        } else if (event.case === "end") {
          yield {
            kind: "end",
            state: event.value.state,
            finalSeq: event.value.finalSeq,
            reason: event.value.reason,
            error: event.value.error,
          };
          return;
        }
      }
      throw new ConnectError("the stream closed without its end", Code.Unavailable);
    } catch (caught) {
      const error = silent
        ? new ConnectError("no message or heartbeat in time", Code.Unavailable)
        : ConnectError.from(caught);
      attempt += 1;
      if (!RETRYABLE.has(error.code) || attempt >= maxAttempts) {
        throw error;
      }
      await sleep(backoffMs(attempt));
    } finally {
      clearTimeout(timer);
      abort.abort();
    }
  }
}

function pick(chunk: { startSeq: bigint; endSeq: bigint; text: string }) {
  return { startSeq: chunk.startSeq, endSeq: chunk.endSeq, text: chunk.text };
}

/** Exponential backoff with jitter: in [cap / 2, cap], cap = min(5 s, 100 ms * 2^(n-1)). */
export function backoffMs(attempt: number): number {
  const cap = Math.min(5_000, 100 * 2 ** (attempt - 1));
  return cap / 2 + Math.random() * (cap / 2);
}

function sleep(ms: number): Promise<void> {
  return new Promise((resolve) => setTimeout(resolve, ms));
}
