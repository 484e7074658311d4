// Child process of sdk_js.JsSdkProcess: the scenarios of sdk_scenarios.py, written with the official JavaScript
// SDK (@anthropic-ai/sdk, installed by sdk_js.py into tests/.js-sdk/) and its own API.
//
//     node runner.mjs SDK_DIR CONSTANTS_JSON
//
// SDK_DIR is the folder whose node_modules holds the SDK; CONSTANTS_JSON carries sdk_scenarios' DEFAULT_MODEL,
// PNG_1X1, PDF_TINY and WEATHER_TOOL, so the two implementations cannot drift apart on them.
//
// Protocol, one JSON object per line, as legacy_sdk_runner.py: first ``{"hello": {"anthropic": VERSION,
// "scenarios": [...]}}``; then for each request line ``{"id", "mode": "async", "name", "args"}`` the reply
// ``{"id", "result"}`` (the scenario's outcome, SDK errors included, in the shape sdk_scenarios.py documents) or
// ``{"id", "crash": stack}`` (a bug in the scenario or harness). Requests run concurrently, answered in completion
// order. stdout carries the protocol only: console output goes to stderr.
import { readFileSync } from 'node:fs';
import { join } from 'node:path';
import { createInterface } from 'node:readline';
import { pathToFileURL } from 'node:url';

const [sdkDir, constantsJson] = process.argv.slice(2);
const C = JSON.parse(constantsJson);
const sdkRoot = join(sdkDir, 'node_modules', '@anthropic-ai', 'sdk');
const VERSION = JSON.parse(readFileSync(join(sdkRoot, 'package.json'), 'utf8')).version;
const { default: Anthropic, AnthropicError } = await import(pathToFileURL(join(sdkRoot, 'index.mjs')).href);

const protocolOut = process.stdout;
for (const name of ['log', 'info', 'warn', 'debug']) console[name] = (...a) => console.error(...a);

function reply(message) {
  protocolOut.write(JSON.stringify(message) + '\n');
}

// -- scenarios (mirroring sdk_scenarios.py: same defaults, same calls, same outcomes) ---------------------------

// A scenario is an async function (call, kw) => outcome; `call(kind, body, options)` runs one SDK call.
function params(messages, { model = C.DEFAULT_MODEL, max_tokens = 256, headers, extra_body, ...rest } = {}) {
  const body = { model, max_tokens, messages, ...rest, ...(extra_body ?? {}) };
  return [body, headers ? { headers } : {}];
}

function user(text, ...blocks) {
  return { role: 'user', content: blocks.length ? [...blocks, { type: 'text', text }] : text };
}

const SCENARIOS = {
  async plain(call, { text = 'Hello, mock', ...kw }) {
    return call('create', ...params([user(text)], kw));
  },

  async system_prompt(call, { text = 'Who are you?', system = 'You are a terse test assistant.', ...kw }) {
    return call('create', ...params([user(text)], { system, ...kw }));
  },

  async multi_turn(call, { text = 'First question', follow_up = 'Second question', ...kw }) {
    const first = await call('create', ...params([user(text)], kw));
    const history = [user(text), { role: 'assistant', content: first.message.content }, user(follow_up)];
    const second = await call('create', ...params(history, kw));
    return { first, second };
  },

  async stream_text(call, { text = 'Stream to me', ...kw }) {
    return call('text_stream', ...params([user(text)], kw));
  },

  async raw_stream(call, { text = 'Raw events please', ...kw }) {
    return call('raw_stream', ...params([user(text)], kw));
  },

  async tool_use_stream(call, { text = 'What is the weather? Use the tool.', tools = [C.WEATHER_TOOL], ...kw }) {
    kw = { tools, ...kw };
    const first = await call('event_stream', ...params([user(text)], kw));
    const toolUse = first.message.content.find((b) => b.type === 'tool_use') ?? null;
    if (toolUse === null) return { call: first, tool_use: null };
    const history = [user(text), { role: 'assistant', content: first.message.content },
      { role: 'user', content: [{ type: 'tool_result', tool_use_id: toolUse.id, content: 'Sunny, 21 C' }] }];
    const answer = await call('create', ...params(history, kw));
    return { call: first, tool_use: toolUse, answer };
  },

  async thinking_stream(call, { text = 'Think first', budget_tokens = 1024, max_tokens = 2048, ...kw }) {
    kw = { max_tokens, ...kw };
    const thinking = { type: 'enabled', budget_tokens };
    const first = await call('event_stream', ...params([user(text)], { thinking, ...kw }));
    const history = [user(text), { role: 'assistant', content: first.message.content }, user('And then?')];
    const follow_up = await call('create', ...params(history, { thinking, ...kw }));
    return { call: first, follow_up };
  },

  async image(call, { text = 'Describe this image', ...kw }) {
    const block = { type: 'image', source: { type: 'base64', media_type: 'image/png', data: C.PNG_1X1 } };
    return call('create', ...params([user(text, block)], kw));
  },

  async pdf(call, { text = 'Summarise this document', ...kw }) {
    const block = { type: 'document', source: { type: 'base64', media_type: 'application/pdf', data: C.PDF_TINY } };
    return call('create', ...params([user(text, block)], kw));
  },

  async beta_message(call, { text = 'Beta hello', betas = ['mock-beta-2025-01-01'], ...kw }) {
    return call('beta_create', ...params([user(text)], { betas: [...betas], ...kw }));
  },

  async count_tokens(call, { text = 'Count me', model = C.DEFAULT_MODEL, headers, ...kw }) {
    return call('count_tokens', { model, messages: [user(text)], ...kw }, headers ? { headers } : {});
  },

  async list_models(call, { limit = 1, headers, ...rest }) {
    if (Object.keys(rest).length) throw new TypeError(`list_models: unexpected ${Object.keys(rest)}`);
    return call('list_models', { limit }, headers ? { headers } : {});
  },
};

// -- executing calls -------------------------------------------------------------------------------------------

function plain(value) {
  return JSON.parse(JSON.stringify(value)); // the message as JSON: what the SDK would send back
}

function headersOf(headers) {
  return Object.fromEntries([...headers.entries()].map(([k, v]) => [k.toLowerCase(), v]));
}

function text(message) {
  return message.content.filter((b) => b.type === 'text').map((b) => b.text ?? '').join('');
}

function messageOutcome(message, headers) {
  const data = plain(message);
  return { message: data, text: text(data), request_id: headers.get('request-id'), headers: headersOf(headers) };
}

class EventSummary {
  // What a MessageStream's events showed (named as the Python SDK names them), kept also when the stream fails.
  constructor() {
    this.events = []; this.pieces = []; this.input_json = []; this.thinking = []; this.signature = null;
  }

  listen(stream) {
    stream.on('streamEvent', (event) => this.events.push(event.type));
    stream.on('text', (delta) => { this.events.push('text'); this.pieces.push(delta); });
    stream.on('inputJson', (partial) => { this.events.push('input_json'); this.input_json.push(partial); });
    stream.on('thinking', (delta) => { this.events.push('thinking'); this.thinking.push(delta); });
    stream.on('signature', (signature) => { this.events.push('signature'); this.signature = signature; });
    stream.on('citation', () => this.events.push('citation'));
  }

  asDict() {
    const { events, pieces, input_json, thinking, signature } = this;
    return { events, pieces, input_json, thinking, signature };
  }
}

class Failure extends Error {
  // An SDK or transport error with what the call had produced before it (`partial`).
  constructor(error, partial) {
    super(error.message);
    this.error = error;
    this.partial = partial;
  }
}

async function withPartial(partialOf, body) {
  try {
    return await body();
  } catch (error) {
    if (isFailure(error)) throw new Failure(error, partialOf());
    throw error;
  }
}

async function runCall(client, kind, body, options) {
  if (kind === 'create' || kind === 'beta_create') {
    const api = kind === 'create' ? client.messages : client.beta.messages;
    const { data, response } = await api.create(body, options).withResponse();
    return messageOutcome(data, response.headers);
  }
  if (kind === 'text_stream' || kind === 'event_stream') {
    const summary = new EventSummary();
    return withPartial(() => summary.asDict(), async () => {
      const stream = client.messages.stream(body, options);
      if (kind === 'text_stream') stream.on('text', (delta) => summary.pieces.push(delta));
      else summary.listen(stream);
      const message = await stream.finalMessage();
      return { ...messageOutcome(message, stream.response.headers), ...summary.asDict(),
               text: summary.pieces.join('') };
    });
  }
  if (kind === 'raw_stream') {
    const events = [];
    return withPartial(() => ({ events }), async () => {
      const { data: stream, response } = await client.messages.create({ ...body, stream: true }, options)
        .withResponse();
      for await (const event of stream) events.push(plain(event));
      const joined = events.filter((e) => e.type === 'content_block_delta').map((e) => e.delta.text ?? '').join('');
      return { events, text: joined, request_id: response.headers.get('request-id'),
               headers: headersOf(response.headers) };
    });
  }
  if (kind === 'count_tokens') {
    return plain(await client.messages.countTokens(body, options));
  }
  if (kind === 'list_models') {
    const ids = [];
    for await (const model of client.models.list(body, options)) ids.push(model.id);
    return { ids };
  }
  throw new TypeError(`unknown call kind ${kind}`);
}

// -- clients, errors and the driver ----------------------------------------------------------------------------

function clientOptions(base_url, api_key, auth = 'default', options = null) {
  // As sdk_scenarios.client_kwargs: the key always goes in as apiKey; `null` headers are ones the SDK must omit.
  const styles = {
    default: {},
    'x-api-key': { Authorization: null, 'X-Api-Key': api_key },
    bearer: { 'X-Api-Key': null, Authorization: `Bearer ${api_key}` },
    both: { 'X-Api-Key': api_key, Authorization: `Bearer ${api_key}` },
    none: { 'X-Api-Key': null, Authorization: null },
  };
  if (!(auth in styles)) throw new TypeError(`unknown auth style ${auth}`);
  const { default_headers = {}, max_retries = 0, timeout, ...unknown } = options ?? {};
  if (Object.keys(unknown).length) throw new TypeError(`client option(s) not mapped for JS: ${Object.keys(unknown)}`);
  return {
    baseURL: base_url, apiKey: api_key, maxRetries: max_retries,
    defaultHeaders: { ...styles[auth], ...default_headers },
    ...(timeout != null ? { timeout: timeout * 1000 } : {}),  // seconds in Python, milliseconds here
  };
}

function isTransportError(error) {
  // A connection lost mid-body surfaces from fetch (undici) as TypeError('terminated') with a socket-level cause.
  for (let e = error, depth = 0; e && depth < 5; e = e.cause, depth++) {
    if (typeof e.code === 'string' && /^(UND_ERR|E[A-Z]+$)/.test(e.code)) return true;
    if (e instanceof TypeError && e.message === 'terminated') return true;
  }
  return false;
}

function isFailure(error) {
  return error instanceof AnthropicError || isTransportError(error);
}

function describe(error, partial = null) {
  // As sdk_scenarios._describe: the SDK's class, the HTTP status, the body's error type, the message.
  const body = error.error;
  const inner = body && typeof body === 'object' ? body.error : undefined;
  return {
    class: error.name || error.constructor.name,
    status: error.status ?? null,
    type: inner && typeof inner === 'object' ? (inner.type ?? null) : null,
    body: body && typeof body === 'object' ? body : null,
    request_id: error.requestID ?? null,
    message: String(error.message).slice(0, 500),
    partial,
  };
}

async function runScenario(name, { base_url, api_key, auth, client_options, ...kw }) {
  const scenario = SCENARIOS[name];
  if (!scenario) throw new TypeError(`no JS scenario ${name}`);
  const client = new Anthropic(clientOptions(base_url, api_key, auth, client_options));
  try {
    return await scenario((kind, body, options) => runCall(client, kind, body, options), kw);
  } catch (error) {
    if (error instanceof Failure) return { error: describe(error.error, error.partial) };
    if (isFailure(error)) return { error: describe(error) };
    throw error;
  }
}

async function handle(request) {
  try {
    if (request.mode !== 'async') throw new TypeError(`the JS SDK has async clients only, not ${request.mode}`);
    reply({ id: request.id, result: await runScenario(request.name, request.args) });
  } catch (error) {
    reply({ id: request.id, crash: String(error?.stack ?? error) });
  }
}

reply({ hello: { anthropic: VERSION, scenarios: Object.keys(SCENARIOS) } });
const inFlight = new Set();
for await (const line of createInterface({ input: process.stdin, crlfDelay: Infinity })) {
  if (!line.trim()) continue;
  const done = handle(JSON.parse(line));
  inFlight.add(done);
  done.finally(() => inFlight.delete(done));
}
await Promise.all(inFlight);  // stdin closed: finish what was asked, then leave (pooled sockets must not hold us)
process.exit(0);
