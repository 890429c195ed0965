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

// Re-sending the same request can succeed after these; other codes are final. A
// subscription is a read, so a torn connection (`Unknown`, `Internal` from a proxy) is
// retried too.
const RETRYABLE = new Set<Code>([
  Code.Unavailable,
  Code.DeadlineExceeded,
  Code.ResourceExhausted,
  Code.Aborted,
  Code.Unknown,
  Code.Internal,
]);

/** An error that a retry cannot fix (the stream broke its sequence guarantee). */
class Final extends Error {
  constructor(readonly error: ConnectError) {
    super(error.message);
  }
}

/**
 * Yields the stream's chunks from `fromSeq` on, then its end. After a failure it
 * re-subscribes from the last `endSeq + 1`, so nothing is lost or repeated.
 */
export async function* follow(
  client: TokenStreamClient,
  streamId: string,
  fromSeq = 0n,
  { maxAttempts = 12, heartbeatTimeoutMs = 30_000 }: FollowOptions = {},
): AsyncGenerator<Piece | End> {
  let next = fromSeq;
  let attempt = 0;
  for (;;) {
    const abort = new AbortController();
    let silent = false;
    let timer: ReturnType<typeof setTimeout> | undefined;
    // The silence timer runs only while waiting for the server, not while the caller
    // holds an item.
    const arm = () => {
      timer = setTimeout(() => {
        silent = true;
        abort.abort();
      }, heartbeatTimeoutMs);
    };
    let failure: ConnectError;
    try {
      arm();
      for await (const message of client.subscribe(
        { streamId, fromSeq: next },
        { signal: abort.signal },
      )) {
        clearTimeout(timer);
        const event = message.event;
        if (event.case === "chunk") {
          const { startSeq, endSeq, text } = event.value;
          if (startSeq !== next || endSeq < startSeq) {
            throw new Final(
              new ConnectError(`expected seq ${next}, got ${startSeq}..${endSeq}`, Code.DataLoss),
            );
          }
          next = endSeq + 1n;
          attempt = 0; // progress: the retry budget starts over
          yield { kind: "chunk", startSeq, endSeq, text };
        } else if (event.case === "end") {
          if (event.value.finalSeq >= next) {
            throw new Final(
              new ConnectError(`the stream ended at ${event.value.finalSeq} before seq ${next}`, Code.DataLoss),
            );
          }
          yield {
            kind: "end",
            state: event.value.state,
            finalSeq: event.value.finalSeq,
            reason: event.value.reason,
            error: event.value.error,
          };
          return;
        }
        arm();
      }
      failure = new ConnectError("the stream closed without its end", Code.Unavailable);
    } catch (caught) {
      if (caught instanceof Final) {
        throw caught.error;
      }
      failure = silent
        ? new ConnectError("no message or heartbeat in time", Code.Unavailable)
        : ConnectError.from(caught);
    } finally {
      clearTimeout(timer);
      abort.abort();
    }
    attempt += 1;
    if (!RETRYABLE.has(failure.code) || attempt >= maxAttempts) {
      throw failure;
    }
    await sleep(backoffMs(attempt));
  }
}

/** Exponential backoff with jitter: in [cap / 2, cap], cap = min(5 s, 100 ms * 2^(n-1)). */
export function backoffMs(attempt: number): number {
  const cap = Math.min(5_000, 100 * 2 ** Math.min(attempt - 1, 64));
  return cap / 2 + Math.random() * (cap / 2);
}

function sleep(ms: number): Promise<void> {
  return new Promise((resolve) => setTimeout(resolve, ms));
}
