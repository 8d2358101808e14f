// The chat page: a plain client of this server's OpenAI-compatible API (/v1/models, /v1/chat/completions with
// stream=true). No framework and no build step; the model's text is only ever set as textContent.
"use strict";

const $ = (id) => document.getElementById(id);
const KEY_STORE = "monovl-api-key";
const MAX_SIDE = 2048;  // larger images are scaled down before sending (the server tiles them to 448 px anyway)

const state = {
  model: null,       // the served model's id, from /v1/models
  messages: [],      // the conversation sent with every request (the API is stateless)
  pending: [],       // images to send with the next message: {name, url (a data: URL)}
  controller: null,  // the AbortController of the answer being streamed
  key: sessionStorage.getItem(KEY_STORE) || "",
  chat: 0,           // counts "New chat"s: an answer that ends after one is not added to the new conversation
};

class RequestError extends Error {
  constructor(message, status) {
    super(message);
    this.status = status;
  }
}

function authHeaders() {
  const headers = {"Content-Type": "application/json"};
  if (state.key) headers.Authorization = "Bearer " + state.key;
  return headers;
}

// The server's OpenAI-style error message ({"error": {"message": ...}}), else the status line.
async function errorOf(response) {
  let message = `${response.status} ${response.statusText}`.trim();
  try {
    const body = await response.json();
    if (body && body.error && body.error.message) message = body.error.message;
  } catch (e) { /* not JSON: keep the status line */ }
  if (response.status === 429) message = `The server's queue is full; try again in a moment (${message}).`;
  return new RequestError(message, response.status);
}

function showError(message) {
  $("error-text").textContent = message;
  $("error").hidden = false;
}

function clearError() {
  $("error").hidden = true;
  $("error-text").textContent = "";
}

function askForKey(message) {
  $("key-form").hidden = false;
  $("api-key").focus();
  if (message) showError(message);
}

async function connect() {
  let response;
  try {
    response = await fetch("v1/models", {headers: authHeaders()});
  } catch (e) {
    showError("Cannot reach the server: " + e.message);
    return;
  }
  if (response.status === 401) {
    $("model").textContent = "locked";
    askForKey(state.key ? "The server refused this API key." : "");
    return;
  }
  if (!response.ok) {
    showError((await errorOf(response)).message);
    return;
  }
  const body = await response.json();
  state.model = body.data[0].id;
  $("model").textContent = state.model;
  $("key-form").hidden = true;
  clearError();
  $("send").disabled = false;
}

function scrollToEnd() {
  const log = $("log");
  log.scrollTop = log.scrollHeight;
}

function thumbnail(image, index) {
  const img = document.createElement("img");
  img.className = "thumb";
  img.src = image.url;
  img.alt = image.name || `image ${index + 1}`;
  img.title = img.alt;
  return img;
}

// A message in the conversation view; returns the element whose text the answer streams into.
function addMessage(role, text, images) {
  $("empty").hidden = true;
  const box = document.createElement("div");
  box.className = "msg " + role;
  if (images.length) {
    const row = document.createElement("div");
    row.className = "images";
    images.forEach((image, i) => row.appendChild(thumbnail(image, i)));
    box.appendChild(row);
  }
  const body = document.createElement("div");
  body.className = "text";
  body.textContent = text;
  box.appendChild(body);
  $("log").appendChild(box);
  scrollToEnd();
  return body;
}

function note(element, text) {
  const span = document.createElement("span");
  span.className = "note";
  span.textContent = text;
  element.parentElement.appendChild(span);
}

function renderPending() {
  const row = $("pending");
  row.replaceChildren();
  state.pending.forEach((image, i) => {
    const item = document.createElement("span");
    item.className = "pending-item";
    item.appendChild(thumbnail(image, i));
    const remove = document.createElement("button");
    remove.type = "button";
    remove.textContent = "×";
    remove.setAttribute("aria-label", "remove " + (image.name || "image"));
    remove.addEventListener("click", () => {
      state.pending.splice(i, 1);
      renderPending();
    });
    item.appendChild(remove);
    row.appendChild(item);
  });
}

function readAsDataURL(file) {
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(reader.result);
    reader.onerror = () => reject(reader.error);
    reader.readAsDataURL(file);
  });
}

// The image as a data: URL, scaled down to MAX_SIDE when it is larger; one the browser cannot decode goes as it is,
// for the server to judge (and to say why it refuses it).
async function imageURL(file) {
  const url = await readAsDataURL(file);
  const img = new Image();
  img.src = url;
  try {
    await img.decode();
  } catch (e) {
    return url;
  }
  const scale = MAX_SIDE / Math.max(img.naturalWidth, img.naturalHeight);
  if (scale >= 1) return url;
  const canvas = document.createElement("canvas");
  canvas.width = Math.max(1, Math.round(img.naturalWidth * scale));
  canvas.height = Math.max(1, Math.round(img.naturalHeight * scale));
  canvas.getContext("2d").drawImage(img, 0, 0, canvas.width, canvas.height);
  return canvas.toDataURL(file.type === "image/png" ? "image/png" : "image/jpeg", 0.92);
}

async function addFiles(files) {
  for (const file of files) {
    if (!file.type.startsWith("image/")) {
      showError(`${file.name || "the file"} is not an image`);
      continue;
    }
    state.pending.push({name: file.name, url: await imageURL(file)});
  }
  renderPending();
}

function settings() {
  return {temperature: Number($("temperature").value), max_tokens: Number($("max-tokens").value)};
}

// Reads the server-sent events of a streamed completion; calls onText with each piece; returns finish_reason.
async function readStream(response, onText) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "", finish = null;
  for (;;) {
    const {done, value} = await reader.read();
    if (done) return finish;
    buffer += decoder.decode(value, {stream: true});
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      const event = buffer.slice(0, cut);
      buffer = buffer.slice(cut + 2);
      for (const line of event.split("\n")) {
        if (!line.startsWith("data:")) continue;
        const data = line.slice(5).trim();
        if (data === "[DONE]") return finish;
        const chunk = JSON.parse(data);
        if (chunk.error) throw new RequestError(chunk.error.message, 500);
        const choice = (chunk.choices || [])[0];
        if (choice && choice.delta && choice.delta.content) onText(choice.delta.content);
        if (choice && choice.finish_reason) finish = choice.finish_reason;
      }
    }
  }
}

function setStreaming(on) {
  $("send").hidden = on;
  $("stop").hidden = !on;
  document.body.classList.toggle("streaming", on);
}

function userContent(text, images) {
  if (!images.length) return text;
  return [{type: "text", text}, ...images.map((image) => ({type: "image_url", image_url: {url: image.url}}))];
}

async function send() {
  const text = $("input").value.trim();
  const images = state.pending;
  if ((!text && !images.length) || state.controller || !state.model) return;
  clearError();
  const user = {role: "user", content: userContent(text, images)};
  const userText = addMessage("user", text, images);
  const answer = addMessage("assistant", "", []);
  answer.parentElement.classList.add("pending-answer");
  $("input").value = "";
  state.pending = [];
  renderPending();
  const controller = state.controller = new AbortController(), chat = state.chat;
  setStreaming(true);
  let reply = "";
  try {
    const response = await fetch("v1/chat/completions", {
      method: "POST", headers: authHeaders(), signal: controller.signal,
      body: JSON.stringify({model: state.model, messages: [...state.messages, user], stream: true, ...settings()}),
    });
    if (!response.ok) throw await errorOf(response);
    const finish = await readStream(response, (piece) => {
      reply += piece;
      answer.textContent = reply;
      scrollToEnd();
    });
    if (finish === "length") note(answer, "cut at the max tokens setting");
    if (chat === state.chat) state.messages.push(user, {role: "assistant", content: reply});
  } catch (e) {
    if (chat === state.chat) failed(e, user, userText, answer, reply);
  } finally {
    answer.parentElement.classList.remove("pending-answer");
    state.controller = null;
    setStreaming(false);
    $("input").focus();
  }
}

// A stopped answer stays in the conversation as far as it got; a refused turn is left out of it.
function failed(error, user, userText, answer, reply) {
  if (error.name === "AbortError") {
    note(answer, "stopped");
    state.messages.push(user, {role: "assistant", content: reply});
    return;
  }
  answer.parentElement.remove();
  userText.parentElement.classList.add("failed");
  note(userText, "not sent");
  if (error.status === 401) {
    askForKey("The server refused the API key: " + error.message);
  } else {
    showError(error.message);
  }
}

function newChat() {
  if (state.controller) state.controller.abort();
  state.chat += 1;
  state.messages = [];
  state.pending = [];
  renderPending();
  clearError();
  $("log").querySelectorAll(".msg").forEach((el) => el.remove());
  $("empty").hidden = false;
  $("input").focus();
}

function imageFiles(transfer) {
  return transfer ? Array.from(transfer.files || []).filter((f) => f.type.startsWith("image/")) : [];
}

function wireDragAndDrop() {
  let depth = 0;  // dragenter/dragleave fire for every child element
  const hint = (on) => { $("drop-hint").hidden = !on; };
  document.addEventListener("dragenter", (e) => { e.preventDefault(); depth += 1; hint(true); });
  document.addEventListener("dragleave", () => { depth = Math.max(0, depth - 1); if (!depth) hint(false); });
  document.addEventListener("dragover", (e) => e.preventDefault());
  document.addEventListener("drop", (e) => {
    e.preventDefault();
    depth = 0;
    hint(false);
    const files = Array.from((e.dataTransfer && e.dataTransfer.files) || []);
    if (files.length) addFiles(files);
  });
  document.addEventListener("paste", (e) => {
    const files = imageFiles(e.clipboardData);
    if (!files.length) return;  // plain text pastes as usual
    e.preventDefault();
    addFiles(files);
  });
}

function wire() {
  $("composer").addEventListener("submit", (e) => { e.preventDefault(); send(); });
  $("input").addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.shiftKey && !e.isComposing) {
      e.preventDefault();
      send();
    }
  });
  $("stop").addEventListener("click", () => state.controller && state.controller.abort());
  $("new-chat").addEventListener("click", newChat);
  $("error-close").addEventListener("click", clearError);
  $("file").addEventListener("change", (e) => {
    addFiles(Array.from(e.target.files));
    e.target.value = "";
  });
  $("key-form").addEventListener("submit", (e) => {
    e.preventDefault();
    state.key = $("api-key").value.trim();
    sessionStorage.setItem(KEY_STORE, state.key);
    connect();
  });
  wireDragAndDrop();
}

wire();
connect();
