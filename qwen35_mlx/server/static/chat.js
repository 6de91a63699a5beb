// The chat page. It speaks the server's OpenAI route (POST /v1/chat/completions, streamed as
// server-sent events), keeps the conversation in OpenAI message form, and renders model output
// as DOM nodes built with textContent: a small markdown subset, never HTML.
"use strict";

const CHAT_URL = "/v1/chat/completions";
const MODELS_URL = "/v1/models";

let history = []; // this conversation's messages, as the API takes them
let attachments = []; // [{name, url}]: images waiting for the next message, as data: URLs
let running = null; // the AbortController of the reply being streamed, or null
let modelId = null; // from GET /v1/models; left out of requests until known

const byId = (id) => document.getElementById(id);

// ---- markdown subset: paragraphs, fenced code, headings, lists, code spans, bold, italic, links

const FENCE = /^ {0,3}(`{3,}|~{3,})/;
const HEADING = /^ {0,3}(#{1,6})\s+(.*?)(?:\s+#+)?\s*$/;
const LIST_ITEM = /^\s*(?:[-*+]|(\d{1,9})[.)])\s+(.*)$/;
const BLANK = /^\s*$/;
// One alternative per inline form; at each position the first alternative that matches wins.
const INLINE = new RegExp(
  [
    /(`+)([^`]|[^`].*?[^`])\1(?!`)/.source, // 1, 2: code span
    /\*\*(?=\S)(.*?\S)\*\*/.source, // 3: bold
    /(?<!\w)__(?=\S)(.*?\S)__(?!\w)/.source, // 4: bold
    /\*(?=[^\s*])(.*?[^\s*])\*/.source, // 5: italic
    /(?<!\w)_(?=[^\s_])(.*?[^\s_])_(?!\w)/.source, // 6: italic, never inside snake_case words
    /\[([^\]]+)\]\(\s*([^\s)]+)\s*\)/.source, // 7, 8: link label and target
  ].join("|"),
  "g",
);

function renderMarkdown(text) {
  const fragment = document.createDocumentFragment();
  const lines = text.replace(/\r\n?/g, "\n").split("\n");
  let i = 0;
  while (i < lines.length) {
    if (BLANK.test(lines[i])) i += 1;
    else if (FENCE.test(lines[i])) i = appendCodeBlock(fragment, lines, i);
    else if (HEADING.test(lines[i])) i = appendHeading(fragment, lines, i);
    else if (LIST_ITEM.test(lines[i])) i = appendList(fragment, lines, i);
    else i = appendParagraph(fragment, lines, i);
  }
  return fragment;
}

function startsBlock(line) {
  return BLANK.test(line) || FENCE.test(line) || HEADING.test(line) || LIST_ITEM.test(line);
}

function isClosingFence(line, fence) {
  const mark = line.trim();
  return mark.length >= fence.length && mark === fence[0].repeat(mark.length);
}

// Returns the index of the first line after the block (the end while a reply still streams in).
function appendCodeBlock(parent, lines, start) {
  const fence = lines[start].match(FENCE)[1];
  let end = start + 1;
  while (end < lines.length && !isClosingFence(lines[end], fence)) end += 1;
  const code = document.createElement("code");
  code.textContent = lines.slice(start + 1, end).join("\n");
  const pre = document.createElement("pre");
  pre.append(code);
  parent.append(pre);
  return end + 1;
}

function appendHeading(parent, lines, start) {
  const [, marks, title] = lines[start].match(HEADING);
  // h1 is the page's title: a reply's "#" becomes h3, down to h6.
  const heading = document.createElement(`h${Math.min(marks.length + 2, 6)}`);
  appendInline(heading, title);
  parent.append(heading);
  return start + 1;
}

function appendList(parent, lines, start) {
  const first = lines[start].match(LIST_ITEM);
  const ordered = first[1] !== undefined;
  const list = document.createElement(ordered ? "ol" : "ul");
  if (ordered) list.start = Number(first[1]);
  let i = start;
  for (; i < lines.length; i += 1) {
    const item = lines[i].match(LIST_ITEM);
    if (!item || (item[1] !== undefined) !== ordered) break;
    const li = document.createElement("li");
    appendInline(li, item[2]);
    list.append(li);
  }
  parent.append(list);
  return i;
}

// A paragraph runs to the next blank line or block; its line breaks are kept, as chat replies mean them.
function appendParagraph(parent, lines, start) {
  const paragraph = document.createElement("p");
  let i = start;
  for (; i < lines.length && (i === start || !startsBlock(lines[i])); i += 1) {
    if (i > start) paragraph.append(document.createElement("br"));
    appendInline(paragraph, lines[i]);
  }
  parent.append(paragraph);
  return i;
}

// Element.append(string) inserts a Text node: the string is never parsed as HTML.
function appendInline(parent, text) {
  let last = 0;
  for (const match of text.matchAll(INLINE)) {
    parent.append(text.slice(last, match.index), inlineNode(match));
    last = match.index + match[0].length;
  }
  parent.append(text.slice(last));
}

function inlineNode(match) {
  const [whole, , code, bold, boldUnderscores, italic, italicUnderscore, label, target] = match;
  if (code !== undefined) {
    const element = document.createElement("code");
    element.textContent = code;
    return element;
  }
  if (bold !== undefined || boldUnderscores !== undefined) {
    return inlineElement("strong", bold ?? boldUnderscores);
  }
  if (italic !== undefined || italicUnderscore !== undefined) {
    return inlineElement("em", italic ?? italicUnderscore);
  }
  if (isWebAddress(target)) {
    const link = inlineElement("a", label);
    link.href = target;
    link.rel = "noopener noreferrer";
    link.target = "_blank";
    return link;
  }
  return document.createTextNode(whole); // a link to anything but http(s) stays text
}

function inlineElement(tag, text) {
  const element = document.createElement(tag);
  appendInline(element, text);
  return element;
}

function isWebAddress(target) {
  try {
    const { protocol } = new URL(target);
    return protocol === "http:" || protocol === "https:";
  } catch {
    return false; // relative or malformed
  }
}

// ---- the transcript

function scrollToEndIfFollowing(update) {
  const following = window.innerHeight + window.scrollY >= document.body.scrollHeight - 40;
  update();
  if (following) window.scrollTo(0, document.body.scrollHeight);
}

function appendUserMessage(text, images) {
  const message = document.createElement("article");
  message.className = "message user";
  message.setAttribute("aria-label", "You");
  if (images.length > 0) {
    const strip = document.createElement("div");
    strip.className = "images";
    strip.append(...images.map(thumbnail));
    message.append(strip);
  }
  message.append(text);
  byId("transcript").append(message);
  window.scrollTo(0, document.body.scrollHeight);
  return message;
}

function thumbnail(image) {
  const img = document.createElement("img");
  img.className = "thumbnail";
  img.src = image.url;
  img.alt = image.name;
  return img;
}

// A reply's view: a folded <details> for thinking, the answer, a note; and the text received.
function appendReply() {
  const element = document.createElement("article");
  element.className = "message assistant";
  element.setAttribute("aria-label", "Assistant");
  element.setAttribute("aria-busy", "true");
  const thinkingBox = document.createElement("details");
  thinkingBox.className = "thinking";
  thinkingBox.hidden = true;
  const summary = document.createElement("summary");
  summary.textContent = "Thinking…";
  const thoughts = document.createElement("div");
  thoughts.className = "thoughts";
  thinkingBox.append(summary, thoughts);
  const answer = document.createElement("div");
  answer.className = "answer";
  const note = document.createElement("p");
  note.className = "note";
  note.hidden = true;
  element.append(thinkingBox, answer, note);
  byId("transcript").append(element);
  const parts = { element, thinkingBox, summary, thoughts, answer, note };
  return { ...parts, thinking: "", text: "", finishReason: null, done: false, drawPending: false };
}

function drawReply(reply) {
  reply.drawPending = false;
  scrollToEndIfFollowing(() => {
    if (reply.thinking) {
      reply.thinkingBox.hidden = false;
      reply.summary.textContent = reply.done || reply.text ? "Thoughts" : "Thinking…";
      reply.thoughts.textContent = reply.thinking.trim();
    }
    reply.answer.replaceChildren(renderMarkdown(reply.text));
  });
}

// Redraw at most once per frame however fast tokens arrive.
function scheduleDraw(reply) {
  if (reply.drawPending) return;
  reply.drawPending = true;
  requestAnimationFrame(() => drawReply(reply));
}

function finishReply(reply, note) {
  reply.done = true;
  drawReply(reply);
  reply.element.setAttribute("aria-busy", "false");
  const noteText =
    note ??
    (reply.finishReason === "length" ? "Stopped at the token limit." : null) ??
    (reply.text || reply.thinking ? null : "The reply was empty.");
  if (noteText) {
    reply.note.textContent = noteText;
    reply.note.hidden = false;
  }
}

function showError(reply, message) {
  reply.element.classList.add("error");
  reply.element.setAttribute("role", "alert");
  finishReply(reply, message);
}

// ---- talking to the server

function requestHeaders() {
  const headers = { "Content-Type": "application/json" };
  const key = byId("api-key").value.trim();
  if (key) headers.Authorization = `Bearer ${key}`;
  return headers;
}

function requestBody(messages) {
  const maxTokens = byId("max-tokens").valueAsNumber;
  const temperature = byId("temperature").valueAsNumber;
  return {
    ...(modelId ? { model: modelId } : {}),
    messages,
    stream: true,
    ...(maxTokens > 0 ? { max_tokens: maxTokens } : {}),
    ...(Number.isFinite(temperature) ? { temperature } : {}),
    chat_template_kwargs: { enable_thinking: byId("thinking").checked },
  };
}

async function describeFailure(response) {
  let detail = response.statusText;
  try {
    const body = await response.json();
    detail = body.error?.message ?? body.detail ?? JSON.stringify(body);
  } catch {
    // not JSON: the status line says it
  }
  if (response.status === 401) {
    byId("settings").open = true;
    detail += " Enter the server's API key above.";
  }
  return `Error ${response.status}: ${detail}`;
}

// The data of one server-sent event ("data:" lines joined), or null for a comment or keep-alive.
function eventData(event) {
  const lines = event.split(/\r?\n/).filter((line) => line.startsWith("data:"));
  if (lines.length === 0) return null;
  return lines.map((line) => line.slice(line.startsWith("data: ") ? 6 : 5)).join("\n");
}

function applyChunk(reply, chunk) {
  if (chunk.error) throw new Error(`Error: ${chunk.error.message ?? JSON.stringify(chunk.error)}`);
  const choice = chunk.choices?.[0];
  if (!choice) return; // a usage-only chunk
  reply.thinking += choice.delta?.reasoning_content ?? "";
  reply.text += choice.delta?.content ?? "";
  reply.finishReason = choice.finish_reason ?? reply.finishReason;
  scheduleDraw(reply);
}

async function streamReply(reply, messages, signal) {
  if (!modelId) await loadModelName(); // the page may be used before its first look-up returned
  const response = await fetch(CHAT_URL, {
    method: "POST",
    headers: requestHeaders(),
    body: JSON.stringify(requestBody(messages)),
    signal,
  });
  if (!response.ok) throw new Error(await describeFailure(response));
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffered = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    const events = (buffered + value).split(/\r?\n\r?\n/);
    buffered = events.pop(); // an event still arriving
    for (const event of events) {
      const data = eventData(event);
      if (data === "[DONE]") return;
      if (data !== null) applyChunk(reply, JSON.parse(data));
    }
  }
}

async function loadModelName() {
  try {
    const response = await fetch(MODELS_URL, { headers: requestHeaders() });
    if (!response.ok) return;
    modelId = (await response.json()).data?.[0]?.id ?? null;
    const name = byId("model-name");
    name.textContent = modelId?.replace(/\/+$/, "").split("/").pop() ?? ""; // a path's last part
    name.title = modelId ?? "";
  } catch {
    // the first reply will show what is wrong
  }
}

// ---- composing and sending

function setBusy(busy, status) {
  byId("send").disabled = busy;
  byId("stop").hidden = !busy;
  byId("status").textContent = status;
}

function userContent(text, images) {
  if (images.length === 0) return text;
  const parts = images.map((image) => ({ type: "image_url", image_url: { url: image.url } }));
  return text ? [...parts, { type: "text", text }] : parts;
}

async function sendMessage(event) {
  event.preventDefault();
  const input = byId("message");
  const text = input.value.trim();
  if (running || (!text && attachments.length === 0)) return;
  const conversation = history; // "New chat" mid-reply starts another one
  const images = attachments;
  conversation.push({ role: "user", content: userContent(text, images) });
  const sent = appendUserMessage(text, images);
  input.value = "";
  input.focus(); // the next message can be written while this one is answered
  setAttachments([]);
  const reply = appendReply();
  running = new AbortController();
  setBusy(true, "Generating…");
  let status = "Ready";
  try {
    await streamReply(reply, conversation, running.signal);
    finishReply(reply);
  } catch (error) {
    if (error.name === "AbortError") {
      finishReply(reply, "Stopped.");
      status = "Stopped";
    } else {
      // Not part of the conversation: take the message back so it can be edited and resent.
      conversation.pop();
      sent.classList.add("unsent");
      if (!input.value) input.value = text;
      if (attachments.length === 0) setAttachments(images);
      showError(reply, error.message);
      status = "Error";
    }
  }
  if (reply.text && status !== "Error") conversation.push({ role: "assistant", content: reply.text });
  running = null;
  setBusy(false, conversation === history ? status : "Ready");
}

function stopReply() {
  running?.abort();
}

function startNewChat() {
  stopReply();
  history = [];
  byId("transcript").replaceChildren();
  byId("message").value = "";
  setAttachments([]);
  setBusy(Boolean(running), "Ready");
  byId("message").focus();
}

function setAttachments(images) {
  attachments = images;
  const items = images.map((image) => {
    const item = document.createElement("li");
    const remove = document.createElement("button");
    remove.type = "button";
    remove.className = "remove";
    remove.textContent = "×";
    remove.setAttribute("aria-label", `Remove ${image.name}`);
    remove.addEventListener("click", () => setAttachments(attachments.filter((i) => i !== image)));
    item.append(thumbnail(image), remove);
    return item;
  });
  byId("attachments").replaceChildren(...items);
}

function readAsDataUrl(file) {
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(reader.result);
    reader.onerror = () => reject(reader.error);
    reader.readAsDataURL(file);
  });
}

async function attachImages(files) {
  const images = [...files].filter((file) => file.type.startsWith("image/"));
  const refused = [...files].filter((file) => !images.includes(file)).map((file) => file.name);
  const read = await Promise.all(
    images.map(async (file) => ({ name: file.name, url: await readAsDataUrl(file) })),
  );
  setAttachments([...attachments, ...read]);
  if (refused.length > 0) {
    byId("status").textContent = `Only images can be attached; left out: ${refused.join(", ")}`;
  }
}

function hasFiles(event) {
  return event.dataTransfer?.types.includes("Files");
}

function wirePage() {
  const composer = byId("composer");
  const input = byId("message");
  composer.addEventListener("submit", sendMessage);
  byId("stop").addEventListener("click", stopReply);
  byId("new-chat").addEventListener("click", startNewChat);
  byId("image-input").addEventListener("change", async (event) => {
    await attachImages(event.target.files);
    event.target.value = ""; // the same file may be picked again
  });
  input.addEventListener("keydown", (event) => {
    if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
      event.preventDefault();
      composer.requestSubmit();
    } else if (event.key === "Escape") {
      stopReply();
    }
  });
  input.addEventListener("paste", (event) => {
    if (event.clipboardData.files.length > 0) attachImages(event.clipboardData.files);
  });
  // Images may be dropped anywhere on the page.
  document.addEventListener("dragover", (event) => {
    if (!hasFiles(event)) return;
    event.preventDefault();
    composer.classList.add("dropping");
  });
  document.addEventListener("dragleave", () => composer.classList.remove("dropping"));
  document.addEventListener("drop", (event) => {
    if (!hasFiles(event)) return;
    event.preventDefault();
    composer.classList.remove("dropping");
    attachImages(event.dataTransfer.files);
  });

  const thinking = byId("thinking");
  thinking.checked = localStorage.getItem("qwen35-mlx.thinking") === "on";
  thinking.addEventListener("change", () =>
    localStorage.setItem("qwen35-mlx.thinking", thinking.checked ? "on" : "off"),
  );
  for (const id of ["max-tokens", "temperature"]) {
    const setting = byId(id);
    setting.value = localStorage.getItem(`qwen35-mlx.${id}`) ?? "";
    setting.addEventListener("change", () => localStorage.setItem(`qwen35-mlx.${id}`, setting.value));
  }
  const key = byId("api-key");
  key.value = sessionStorage.getItem("qwen35-mlx.api-key") ?? "";
  key.addEventListener("change", () => {
    sessionStorage.setItem("qwen35-mlx.api-key", key.value);
    loadModelName();
  });
  loadModelName();
  input.focus();
}

document.addEventListener("DOMContentLoaded", wirePage);
