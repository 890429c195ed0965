// Runs follow() against a real tokenstream server over HTTP/2 gRPC (connect-node):
//   node dist/test/follow.smoke.js 127.0.0.1:PORT
// Prints the answer and exits 0 when it matches the prompt (echo model).
import { createGrpcTransport } from "@connectrpc/connect-node";
import { clientOver, follow } from "../src/follow.js";

const target = process.argv[2] ?? "127.0.0.1:50051";
const client = clientOver(createGrpcTransport({ baseUrl: `http://${target}` }));
const prompt = "typescript follows the stream";
const { streamId } = await client.submitPrompt({ prompt, model: "echo", requestId: crypto.randomUUID() });
let text = "";
let ended = false;
for await (const item of follow(client, streamId, 0n, { heartbeatTimeoutMs: 5_000 })) {
  if (item.kind === "chunk") {
    text += item.text;
  } else {
    ended = true;
  }
}
console.log(JSON.stringify({ text, ended }));
process.exit(text === prompt && ended ? 0 : 1);
