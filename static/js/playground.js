"use strict";
// The playground talks to one service through the portal's proxy, as a notebook would:
// chat streams tokens from POST /services/<id>/v1/chat/completions (stream: true, server-sent events read with
// fetch and a ReadableStream), with an attached image as an image_url part holding a base64 data URL when the model
// takes images; speech goes to POST /services/<id>/v1/audio/transcriptions as a multipart upload;
// embeddings of two texts come from one POST /services/<id>/v1/embeddings, compared by their cosine similarity.

(() => {
  let service = PF.initial("initial-service");
  const notices = document.getElementById("playground-alert");
  const v1 = PF.url(`/services/${service.id}/v1`);
  const controls = [];

  function ready() {
    return service.state === "RUNNING";
  }

  function enable() {
    document.getElementById("not-running").hidden = ready();
    PF.setText(document.getElementById("not-running-state"), service.state);
    for (const control of controls) control.disabled = !ready() || control.dataset.busy === "1";
  }

  // Calls onEvent(data) for each `data:` event of a server-sent event stream until it ends or sends [DONE].
  async function readEvents(response, onEvent) {
    const reader = response.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    let finished = false;
    for (;;) {
      const {value, done} = await reader.read();
      if (done) break;
      if (finished) continue;  // read to the end after [DONE]: a body left unread counts as an aborted request
      buffer += decoder.decode(value, {stream: true}).replace(/\r\n/g, "\n");
      let end;
      while ((end = buffer.indexOf("\n\n")) >= 0) {
        const block = buffer.slice(0, end);
        buffer = buffer.slice(end + 2);
        const payload = block.split("\n").filter((line) => line.startsWith("data:"))
          .map((line) => line.slice(5).trimStart()).join("\n");
        if (!payload) continue;
        if (payload === "[DONE]") {
          finished = true;
          break;
        }
        onEvent(JSON.parse(payload));
      }
    }
  }

  // --- chat --------------------------------------------------------------------------------------------

  function setUpChat() {
    const form = document.getElementById("chat-form");
    const prompt = document.getElementById("prompt");
    const log = document.getElementById("chat-log");
    const send = document.getElementById("send-button");
    const stop = document.getElementById("stop-button");
    const stats = document.getElementById("chat-stats");
    const history = [];
    let controller = null;
    controls.push(send, prompt);

    const image = setUpImage();

    function bubble(role, text, imageUrl) {
      const empty = document.getElementById("chat-empty");
      if (empty) empty.remove();
      const body = PF.el("div", {class: "chat-text"}, text);
      const node = PF.el("div", {class: `chat-message from-${role}`},
        PF.el("span", {class: "chat-role"}, role === "user" ? "You" : service.model), body);
      if (imageUrl) {
        const shown = PF.el("img", {class: "chat-image d-block mt-1", alt: "Your image"});
        shown.src = imageUrl;
        shown.style.maxHeight = "8rem";
        node.append(shown);
      }
      log.append(node);
      log.scrollTop = log.scrollHeight;
      return {node, body};
    }

    async function ask(text, imageUrl) {
      history.push({role: "user", content: imageUrl
        ? [{type: "text", text}, {type: "image_url", image_url: {url: imageUrl}}] : text});
      bubble("user", text, imageUrl);
      const answer = bubble("assistant", "");
      answer.node.dataset.state = "streaming";
      const system = document.getElementById("system-prompt").value.trim();
      const messages = system ? [{role: "system", content: system}, ...history] : [...history];
      const request = {model: service.model, messages, stream: true,
        max_tokens: Number(document.getElementById("max-tokens").value) || 256,
        temperature: Number(document.getElementById("temperature").value)};
      controller = new AbortController();
      send.dataset.busy = "1";
      enable();
      stop.hidden = false;
      PF.setText(stats, "Waiting for the first token…");
      const started = performance.now();
      let first = null;
      let chunks = 0;
      try {
        const response = await fetch(`${v1}/chat/completions`, {
          method: "POST", credentials: "same-origin", signal: controller.signal,
          headers: {"Content-Type": "application/json", Accept: "text/event-stream", "X-CSRF-Token": PF.csrf},
          body: JSON.stringify(request),
        });
        if (!response.ok) throw new Error(await PF.errorMessage(response));
        await readEvents(response, (event) => {
          if (event.error) throw new Error(event.error.message || String(event.error));
          const choice = (event.choices || [])[0];
          const piece = choice && choice.delta && choice.delta.content;
          if (!piece) return;
          if (first === null) first = performance.now();
          chunks += 1;
          answer.body.textContent += piece;
          log.scrollTop = log.scrollHeight;
          PF.setText(stats, `${chunks} chunks, first after ${Math.round(first - started)} ms`);
        });
        answer.node.dataset.state = "done";
        const seconds = (performance.now() - (first || started)) / 1000;
        PF.setText(stats, `${chunks} chunks, first after ${Math.round((first || performance.now()) - started)} ms, ` +
          `${seconds > 0 ? (chunks / seconds).toFixed(1) : chunks} chunks/s`);
      } catch (err) {
        answer.node.dataset.state = "stopped";
        if (err.name === "AbortError") {
          PF.setText(stats, "Stopped.");
        } else {
          PF.alert(notices, "danger", `The service did not answer: ${err.message}`);
          PF.setText(stats, "");
        }
      } finally {
        history.push({role: "assistant", content: answer.body.textContent});
        controller = null;
        send.dataset.busy = "0";
        stop.hidden = true;
        enable();
      }
    }

    form.addEventListener("submit", (event) => {
      event.preventDefault();
      const text = prompt.value.trim();
      if (!text || !ready() || controller) return;
      prompt.value = "";
      ask(text, image.take());
    });
    prompt.addEventListener("keydown", (event) => {
      if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
        event.preventDefault();
        form.requestSubmit();
      }
    });
    stop.addEventListener("click", () => controller && controller.abort());
    document.getElementById("clear-button").addEventListener("click", () => {
      if (controller) controller.abort();
      history.length = 0;
      log.replaceChildren(PF.el("p", {class: "text-body-secondary small mb-0", id: "chat-empty"}, "Conversation cleared."));
      PF.setText(stats, "");
    });
  }

  // The image attached to the next message, read as a data URL (the model's node fetches nothing: web image URLs are
  // refused). Without the attach control (a model taking no images), take() is always null.
  function setUpImage() {
    const file = document.getElementById("image-file");
    if (!file) return {take: () => null};
    const preview = document.getElementById("image-preview");
    const remove = document.getElementById("image-remove");
    const maxBytes = Number(file.dataset.maxMb) * 1048576;
    let dataUrl = null;

    function clear() {
      dataUrl = null;
      file.value = "";
      preview.hidden = remove.hidden = true;
      preview.removeAttribute("src");
    }
    file.addEventListener("change", () => {
      const chosen = file.files[0];
      dataUrl = null;
      if (!chosen) return clear();
      if (chosen.size * 4 / 3 > maxBytes) {  // base64 grows it by a third; the portal refuses bigger bodies (413)
        PF.alert(notices, "danger", `The image is ${PF.bytes(chosen.size)}: as a data URL it would exceed the ` +
          `portal's request limit of ${file.dataset.maxMb} MB (max_upload_mb).`);
        return clear();
      }
      const reader = new FileReader();
      reader.addEventListener("load", () => {
        dataUrl = reader.result;
        preview.src = dataUrl;
        preview.hidden = remove.hidden = false;
      });
      reader.addEventListener("error", () => {
        PF.alert(notices, "danger", `The image could not be read: ${reader.error && reader.error.message}`);
        clear();
      });
      reader.readAsDataURL(chosen);
    });
    remove.addEventListener("click", clear);
    return {take() {
      const taken = dataUrl;
      if (taken) clear();
      return taken;
    }};
  }

  // --- speech ------------------------------------------------------------------------------------------

  function setUpAudio() {
    const form = document.getElementById("audio-form");
    const file = document.getElementById("audio-file");
    const record = document.getElementById("record-button");
    const recordStatus = document.getElementById("record-status");
    const player = document.getElementById("recording");
    const transcript = document.getElementById("transcript");
    const submit = document.getElementById("transcribe-button");
    let recorded = null;
    let recorder = null;
    controls.push(submit);

    if (!(navigator.mediaDevices && navigator.mediaDevices.getUserMedia && window.MediaRecorder)) {
      record.disabled = true;
      PF.setText(recordStatus,
        "Recording needs a secure (https) page and a browser that supports it; upload a file instead.");
    }
    file.addEventListener("change", () => {
      recorded = null;
      player.hidden = true;
    });
    record.addEventListener("click", async () => {
      if (recorder) {
        recorder.stop();
        return;
      }
      let stream;
      try {
        stream = await navigator.mediaDevices.getUserMedia({audio: true});
      } catch (err) {
        PF.setText(recordStatus, `No microphone: ${err.message}`);
        return;
      }
      const parts = [];
      recorder = new MediaRecorder(stream);
      recorder.addEventListener("dataavailable", (event) => parts.push(event.data));
      recorder.addEventListener("stop", () => {
        stream.getTracks().forEach((track) => track.stop());
        recorded = new Blob(parts, {type: recorder.mimeType || "audio/webm"});
        recorder = null;
        player.src = URL.createObjectURL(recorded);
        player.hidden = false;
        record.textContent = "Record again";
        record.setAttribute("aria-pressed", "false");
        PF.setText(recordStatus, `Recorded ${PF.bytes(recorded.size)}.`);
      });
      recorder.start();
      record.textContent = "Stop recording";
      record.setAttribute("aria-pressed", "true");
      PF.setText(recordStatus, "Recording…");
    });

    form.addEventListener("submit", async (event) => {
      event.preventDefault();
      const upload = recorded ? new File([recorded], "recording.webm", {type: recorded.type}) : file.files[0];
      if (!upload) {
        PF.alert(notices, "warning", "Choose an audio file or record something first.");
        return;
      }
      const body = new FormData();
      body.append("model", service.model);
      body.append("file", upload, upload.name);
      const language = document.getElementById("audio-language").value.trim();
      if (language) body.append("language", language);
      submit.dataset.busy = "1";
      enable();
      transcript.textContent = "Transcribing…";
      try {
        const response = await fetch(`${v1}/audio/transcriptions`, {
          method: "POST", credentials: "same-origin", body,
          headers: {Accept: "application/json", "X-CSRF-Token": PF.csrf},
        });
        if (!response.ok) throw new Error(await PF.errorMessage(response));
        const answer = await response.json();
        transcript.textContent = answer.text || "(no speech found)";
      } catch (err) {
        transcript.textContent = "";
        PF.alert(notices, "danger", `The service did not answer: ${err.message}`);
      } finally {
        submit.dataset.busy = "0";
        enable();
      }
    });
  }

  // --- embeddings --------------------------------------------------------------------------------------

  function cosine(a, b) {
    let dot = 0;
    let normA = 0;
    let normB = 0;
    for (let i = 0; i < a.length; i += 1) {
      dot += a[i] * b[i];
      normA += a[i] * a[i];
      normB += b[i] * b[i];
    }
    return normA && normB ? dot / Math.sqrt(normA * normB) : 0;
  }

  function setUpEmbeddings() {
    const form = document.getElementById("embedding-form");
    const submit = document.getElementById("compare-button");
    const similarity = document.getElementById("similarity");
    controls.push(submit);
    form.addEventListener("submit", async (event) => {
      event.preventDefault();
      const texts = ["text-a", "text-b"].map((id) => document.getElementById(id).value);
      if (texts.some((text) => !text.trim())) {
        PF.alert(notices, "warning", "Write both texts first.");
        return;
      }
      submit.dataset.busy = "1";
      enable();
      PF.setText(similarity, "Embedding…");
      try {
        const response = await fetch(`${v1}/embeddings`, {
          method: "POST", credentials: "same-origin",
          headers: {"Content-Type": "application/json", Accept: "application/json", "X-CSRF-Token": PF.csrf},
          body: JSON.stringify({model: service.model, input: texts}),
        });
        if (!response.ok) throw new Error(await PF.errorMessage(response));
        const answer = await response.json();
        const vectors = [...answer.data].sort((x, y) => x.index - y.index).map((item) => item.embedding);
        similarity.dataset.value = String(cosine(vectors[0], vectors[1]));
        PF.setText(similarity, cosine(vectors[0], vectors[1]).toFixed(4));
        PF.setText(document.getElementById("dimensions"), String(vectors[0].length));
        PF.setText(document.getElementById("embedding-tokens"), String((answer.usage || {}).prompt_tokens ?? "—"));
      } catch (err) {
        PF.setText(similarity, "—");
        PF.alert(notices, "danger", `The service did not answer: ${err.message}`);
      } finally {
        submit.dataset.busy = "0";
        enable();
      }
    });
  }

  if (service.kind === "speech-recognition") setUpAudio();
  else if (service.kind === "text-embedding") setUpEmbeddings();
  else setUpChat();
  enable();
  // Watch the service's state: the page enables itself when the service runs, and disables itself when it ends.
  const watcher = PF.poll(async () => {
    service = await PF.api("GET", `/api/services/${service.id}`);
    enable();
    if (!PF.isLive(service)) watcher.stop();
  }, () => (ready() ? 5000 : 1500));
})();
