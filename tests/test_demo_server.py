"""The demo end to end: `python -m parrot.serve.demo` in a subprocess on a free loopback port, driven with
`gradio_client` (answers, router weights, bad inputs, 20 concurrent users) and headless Chromium (Chrome DevTools
protocol over `--remote-debugging-pipe`, stdlib only). The server is stopped by its PID at the end.

References are computed here, in-process, from the same saved model: greedy answers with `model.generate`,
routing weights with `model(...).router_probs`.
"""

import base64
import fcntl
import json
import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
from gradio_client import Client, handle_file
from gradio_client.utils import Status
from PIL import Image

from parrot.data.templates import IGNORE_INDEX
from parrot.model.builder import load_pretrained, save_pretrained
from parrot.serve.examples import write_examples

from .test_demo import build_demo_model

pytestmark = pytest.mark.slow  # one server start (~20 s on 2 cores) shared by every test here

REPO_ROOT = Path(__file__).resolve().parents[1]
CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
WARNING = "⚠️ "


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def demo_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo")
    model, processor = build_demo_model(sharpen_router=50.0)
    save_pretrained(model, processor, root / "model")
    rng = np.random.default_rng(1)
    Image.fromarray(rng.integers(0, 256, size=(48, 64, 3), dtype=np.uint8)).save(root / "photo.png")
    (root / "notes.txt").write_text("definitely not an image\n")
    raw = (root / "photo.png").read_bytes()
    (root / "cut.png").write_bytes(raw[: len(raw) // 2])
    Image.new("1", (10000, 10000)).save(root / "huge.png")
    frames = [Image.new("RGB", (32, 32), colour) for colour in ((255, 0, 0), (0, 0, 255))]
    frames[0].save(root / "anim.gif", save_all=True, append_images=frames[1:], duration=100, loop=0)
    return root


@pytest.fixture(scope="module")
def reference(demo_files):
    model, processor = load_pretrained(demo_files / "model")
    return model, processor


@pytest.fixture(scope="module")
def server(demo_files):
    port = free_port()
    log_path = demo_files / "server.log"
    env = dict(os.environ, GRADIO_ANALYTICS_ENABLED="False", PYTHONUNBUFFERED="1")
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "parrot.serve.demo", "--model", str(demo_files / "model"), "--port", str(port),
             "--concurrency", "2"],
            cwd=REPO_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
        )
    url = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.monotonic() + 120
        while True:
            if proc.poll() is not None:
                pytest.fail(f"demo server exited with {proc.returncode}:\n{log_path.read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(url, timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"demo server not up after 120 s:\n{log_path.read_text()[-3000:]}")
            time.sleep(0.5)
        yield url
    finally:
        os.kill(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode is not None


def client(url):
    return Client(url, verbose=False)


def chat(api, image, message, max_new_tokens=12, temperature=0.0, top_p=1.0):
    payload = handle_file(str(image)) if image is not None else None
    messages, textbox, plot, note = api.predict(payload, message, temperature, top_p, max_new_tokens,
                                                api_name="/chat")
    return messages, textbox, plot, note


def text_of(message: dict) -> str:
    content = message["content"]
    if isinstance(content, list):  # Gradio sends message content as typed parts
        return "".join(part.get("text", "") for part in content)
    return content


def greedy_answer(reference, image_path, question, history=(), max_new_tokens=12) -> str:
    """The answer computed directly: hand-built history with the image in the first user turn, tokenised and
    labelled as training does (the MoE router skips earlier answers), model.generate."""
    model, processor = reference
    messages = []
    for i, (user, assistant) in enumerate(history):
        messages += [{"role": "user", "content": f"<image>\n{user}" if i == 0 else user},
                     {"role": "assistant", "content": assistant}]
    messages.append({"role": "user", "content": question if history else f"<image>\n{question}"})
    ids, labels = processor.template.tokenize(messages, processor.tokenizer, max_length=100_000)
    header = processor.tokenizer("<|im_start|>assistant\n", add_special_tokens=False)["input_ids"]
    ids, labels = torch.tensor([ids + header]), torch.tensor([labels + [IGNORE_INDEX] * len(header)])
    pixel_values = processor.image_transform(Image.open(image_path).convert("RGB"))[None]
    new_tokens = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=pixel_values,
                                prompt_labels=labels, max_new_tokens=max_new_tokens, do_sample=False)
    return processor.batch_decode(new_tokens)[0]


# --- gradio_client ---------------------------------------------------------------------------------------------
def test_multi_turn_chat_answers_like_the_model(server, demo_files, reference):
    api = client(server)
    photo = demo_files / "photo.png"
    messages, textbox, _, _ = chat(api, photo, "What colour is the circle?")
    first = greedy_answer(reference, photo, "What colour is the circle?")
    assert first.strip()
    # the first chunk cleared the textbox; the final output leaves it unchanged (typing during the stream is kept)
    assert [m["role"] for m in messages] == ["user", "assistant"] and textbox == {"__type__": "update"}
    assert text_of(messages[-1]) == first

    messages, _, _, _ = chat(api, photo, "Сколько фигур на картинке?")  # same session: history and image kept
    second = greedy_answer(reference, photo, "Сколько фигур на картинке?",
                           history=[("What colour is the circle?", first)])
    assert len(messages) == 4 and text_of(messages[-1]) == second
    assert second != greedy_answer(reference, photo, "Сколько фигур на картинке?")  # the history mattered


def test_router_panel_weights_sum_to_one_and_match_the_model(server, demo_files, reference):
    model, processor = reference
    photo = demo_files / "photo.png"
    for question in ("What colour is the circle?", "红色的图形是什么形状？"):
        plot, note = client(server).predict(handle_file(str(photo)), question, api_name="/route")
        weights = [row[1] for row in plot["data"]]
        assert [row[0] for row in plot["data"]] == [f"expert {i}" for i in range(6)]
        assert sum(weights) == pytest.approx(1.0, abs=1e-6)
        batch = processor([processor.build_prompt(question)], [Image.open(photo)])
        with torch.no_grad():
            expected = model(**batch).router_probs[0].double().numpy()  # (E,)
        np.testing.assert_allclose(weights, expected, atol=1e-6)
        assert f"expert {int(np.argmax(expected))}**" in note
    _, _, plot, _ = chat(client(server), photo, "What colour is the circle?", max_new_tokens=2)
    assert sum(row[1] for row in plot["data"]) == pytest.approx(1.0, abs=1e-6)  # the chat updates the panel too


def test_bad_inputs_get_a_message_and_the_server_keeps_working(server, demo_files, reference):
    api = client(server)
    photo = demo_files / "photo.png"
    cases = [
        (demo_files / "notes.txt", "What is this?", "notes.txt: not an image file"),
        (demo_files / "cut.png", "What is this?", "cut.png: cannot decode image"),
        (demo_files / "huge.png", "What is this?", "huge.png: image too large (10000x10000 pixels"),
        (demo_files / "anim.gif", "What is this?", "anim.gif: an animated or multi-page image (2 frames)"),
        (photo, "", "Please type a message"),
        (photo, "circle " * 400, "Your message is too long"),
    ]
    for image, message, expected in cases:
        messages, textbox, _, _ = chat(api, image, message)
        shown = text_of(messages[-1])
        assert messages[-1]["role"] == "assistant" and shown.startswith(WARNING) and expected in shown, shown
        assert textbox == message
    messages, _, _, _ = chat(api, photo, "What colour is the circle?")
    assert text_of(messages[-1]) == greedy_answer(reference, photo, "What colour is the circle?")


def test_sessions_do_not_share_state(server, demo_files):
    photo = demo_files / "photo.png"
    first, second = client(server), client(server)
    chat(first, photo, "one", max_new_tokens=2)
    chat(first, photo, "two", max_new_tokens=2)
    messages, _, _, _ = chat(second, photo, "three", max_new_tokens=2)
    assert [text_of(m) for m in messages if m["role"] == "user"] == ["three"]
    messages, _, _, _ = chat(first, photo, "four", max_new_tokens=2)
    assert [text_of(m) for m in messages if m["role"] == "user"] == ["one", "two", "four"]


def test_twenty_concurrent_users_all_get_answers(server, demo_files, reference):
    photo = demo_files / "photo.png"
    question = "How many shapes are there in total?"
    expected = greedy_answer(reference, photo, question, max_new_tokens=8)

    def one_user(i):
        messages, _, _, _ = chat(client(server), photo, f"{question}", max_new_tokens=8)
        return [text_of(m) for m in messages]

    with ThreadPoolExecutor(max_workers=20) as pool:
        conversations = list(pool.map(one_user, range(20), timeout=180))
    assert len(conversations) == 20
    assert all(c == [question, expected] for c in conversations)


# --- headless Chromium -----------------------------------------------------------------------------------------
class PipeBrowser:
    """Headless Chromium driven over the DevTools protocol on `--remote-debugging-pipe` (fd 3 in, fd 4 out;
    messages are JSON separated by NUL bytes), so no driver or websocket package is needed."""

    def __init__(self, binary: str, profile_dir: Path, window=(1400, 1000)):
        to_browser_r, to_browser_w = os.pipe()
        from_browser_r, from_browser_w = os.pipe()
        # Park the child's ends above fd 10 so moving them onto 3 and 4 cannot clobber one another.
        child_in = fcntl.fcntl(to_browser_r, fcntl.F_DUPFD, 10)
        child_out = fcntl.fcntl(from_browser_w, fcntl.F_DUPFD, 10)

        def wire_child_fds():
            os.dup2(child_in, 3)
            os.dup2(child_out, 4)

        self.process = subprocess.Popen(
            [binary, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
             "--no-default-browser-check", "--remote-debugging-pipe", f"--user-data-dir={profile_dir}",
             f"--window-size={window[0]},{window[1]}", "about:blank"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            preexec_fn=wire_child_fds, pass_fds=(3, 4),
        )
        for fd in (to_browser_r, from_browser_w, child_in, child_out):
            os.close(fd)
        self.write_fd, self.read_fd = to_browser_w, from_browser_r
        self.buffer = b""
        self.last_id = 0
        self.session_id = None
        self.window = window

    def send(self, method: str, params: dict | None = None, timeout: float = 30.0, browser_level=False) -> dict:
        self.last_id += 1
        message = {"id": self.last_id, "method": method, "params": params or {}}
        if self.session_id and not browser_level:
            message["sessionId"] = self.session_id
        os.write(self.write_fd, json.dumps(message).encode() + b"\0")
        deadline = time.monotonic() + timeout
        while True:
            while b"\0" in self.buffer:
                raw, self.buffer = self.buffer.split(b"\0", 1)
                reply = json.loads(raw)
                if reply.get("id") == self.last_id:  # anything else is an event we do not need
                    if "error" in reply:
                        raise RuntimeError(f"{method}: {reply['error']}")
                    return reply["result"]
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"no reply to {method} within {timeout} s")
            if select.select([self.read_fd], [], [], remaining)[0]:
                chunk = os.read(self.read_fd, 1 << 20)
                if not chunk:
                    raise RuntimeError("Chromium closed the DevTools pipe")
                self.buffer += chunk

    def open(self, url: str) -> None:
        page = next(t for t in self.send("Target.getTargets", browser_level=True)["targetInfos"]
                    if t["type"] == "page")
        self.session_id = self.send("Target.attachToTarget", {"targetId": page["targetId"], "flatten": True},
                                    browser_level=True)["sessionId"]
        self.send("Page.enable")
        self.send("Emulation.setDeviceMetricsOverride",
                  {"width": self.window[0], "height": self.window[1], "deviceScaleFactor": 1, "mobile": False})
        self.send("Page.navigate", {"url": url})

    def evaluate(self, expression: str):
        result = self.send("Runtime.evaluate", {"expression": expression, "returnByValue": True})
        if "exceptionDetails" in result:
            raise RuntimeError(f"{expression}: {result['exceptionDetails']}")
        return result["result"].get("value")

    def wait_for(self, expression: str, timeout: float = 60.0):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = self.evaluate(expression)
            if value:
                return value
            time.sleep(0.2)
        raise TimeoutError(f"still false after {timeout} s: {expression}")

    def wait_until_stable(self, expression: str, quiet: float = 2.0, timeout: float = 60.0):
        """Wait until `expression` is truthy and has not changed for `quiet` seconds (a finished stream)."""
        deadline = time.monotonic() + timeout
        last, since = None, time.monotonic()
        while time.monotonic() < deadline:
            value = self.evaluate(expression)
            if value != last:
                last, since = value, time.monotonic()
            elif value and time.monotonic() - since >= quiet:
                return value
            time.sleep(0.2)
        raise TimeoutError(f"not stable for {quiet} s within {timeout} s: {expression}")

    def set_file_input(self, selector: str, path: Path) -> None:
        root = self.send("DOM.getDocument", {"depth": 1})["root"]["nodeId"]
        node = self.send("DOM.querySelector", {"nodeId": root, "selector": selector})["nodeId"]
        if not node:
            raise LookupError(selector)
        self.send("DOM.setFileInputFiles", {"nodeId": node, "files": [str(path)]})

    def screenshot(self, path: Path) -> None:
        path.write_bytes(base64.b64decode(self.send("Page.captureScreenshot", {"format": "png"})["data"]))

    def close(self) -> None:
        try:
            self.send("Browser.close", timeout=5, browser_level=True)
            self.process.wait(timeout=10)
        except (RuntimeError, TimeoutError, subprocess.TimeoutExpired):
            os.kill(self.process.pid, signal.SIGKILL)
            self.process.wait()
        finally:
            os.close(self.write_fd)
            os.close(self.read_fd)


TYPE_MESSAGE_JS = """(() => {
  const box = document.querySelector('#parrot-message textarea');
  Object.getOwnPropertyDescriptor(HTMLTextAreaElement.prototype, 'value').set.call(box, %s);
  box.dispatchEvent(new Event('input', {bubbles: true}));
  return true;
})()"""

COMPONENTS_JS = """(() => ({
  image_input: !!document.querySelector('#parrot-image input[type=file]'),
  chatbot: !!document.querySelector('#parrot-chatbot'),
  message_box: !!document.querySelector('#parrot-message textarea'),
  send: document.querySelector('#parrot-send')?.innerText.trim() ?? null,
  clear: document.querySelector('#parrot-clear')?.innerText.trim() ?? null,
  sliders: document.querySelectorAll('input[type=range]').length,
  router_chart: !!document.querySelector('#parrot-router'),
  examples: document.querySelectorAll('#parrot-examples tbody tr').length,
}))()"""

CHAR_X_JS = """(() => {  // the x of the first occurrence of each of two characters in an element's text
  const text = document.querySelector(%s).firstChild, range = document.createRange();
  return [%s, %s].map(ch => {
    const i = text.textContent.indexOf(ch);
    range.setStart(text, i);
    range.setEnd(text, i + 1);
    return range.getBoundingClientRect().x;
  });
})()"""

USER_TEXTS_JS = "[...document.querySelectorAll('#parrot-chatbot [data-testid=user]')].map(e => e.innerText.trim())"
BOT_TEXT_JS = "[...document.querySelectorAll('#parrot-chatbot [data-testid=bot]')].map(e => e.innerText).join('\\n')"


def test_browser_renders_the_chat_and_answers(server, demo_files, tmp_path):
    binary = next((shutil.which(name) for name in CHROMIUM_NAMES if shutil.which(name)), None)
    if binary is None:
        pytest.skip("no Chromium binary on PATH (Debian: apt-get install -y chromium)")
    browser = PipeBrowser(binary, tmp_path / "profile")
    try:
        browser.open(server)
        try:  # the Svelte app renders progressively; wait until every part is there, then report what is
            browser.wait_for(f"Object.values({COMPONENTS_JS}).every(Boolean)")
        except TimeoutError:
            pass
        components = browser.evaluate(COMPONENTS_JS)
        assert components["image_input"] and components["chatbot"] and components["message_box"], components
        assert (components["send"], components["clear"]) == ("Send", "Clear")
        assert components["sliders"] == 3 and components["router_chart"] and components["examples"] >= 6

        browser.set_file_input("#parrot-image input[type=file]", demo_files / "photo.png")
        browser.wait_for("!!document.querySelector('#parrot-image img')")
        browser.evaluate(TYPE_MESSAGE_JS % json.dumps("Какого цвета фон?"))
        browser.evaluate("document.querySelector('#parrot-send').click()")
        user_text = browser.wait_for(
            "document.querySelector('#parrot-chatbot [data-testid=user]')?.innerText", timeout=60)
        assert user_text.strip() == "Какого цвета фон?"
        browser.wait_for(f"({BOT_TEXT_JS}).trim().length > 0", timeout=60)
        # Let the first answer finish: its later chunks would otherwise refill the chat the example's new image clears.
        browser.wait_until_stable(f"({BOT_TEXT_JS}).trim()")

        # The Russian example row fills image + question; a new image starts a new conversation.
        russian = write_examples(tmp_path / "examples")[5].prompt  # the server's examples (same default seed)
        rows = "document.querySelectorAll('#parrot-examples tbody tr')"
        assert browser.evaluate(f"[...{rows}].map(r => r.innerText.trim())")[5] == russian
        browser.evaluate(f"{rows}[5].click()")
        browser.wait_for(f"document.querySelector('#parrot-message textarea').value === {json.dumps(russian)}")
        browser.wait_for(f"{USER_TEXTS_JS}.length === 0")
        browser.evaluate("document.querySelector('#parrot-send').click()")
        browser.wait_for(f"({BOT_TEXT_JS}).trim().length > 0", timeout=60)
        assert browser.evaluate(USER_TEXTS_JS) == [russian]
        browser.wait_for("document.querySelectorAll('#parrot-router svg, #parrot-router canvas').length > 0")
        time.sleep(1.0)  # let the stream finish and the chart draw before the picture
        shot = tmp_path / "demo.png"
        browser.screenshot(shot)

        # Clear while an answer is under way: it is cancelled, and the next message starts a new conversation instead
        # of the answer writing the old one back. Two long API answers (the server runs two at once) keep this one
        # waiting in the queue when Clear is pressed 0.2 s after Send, so the answer surely comes after the Clear.
        busy = [client(server).submit(None, "Tell a long story.", 1.0, 1.0, 255, api_name="/chat") for _ in range(2)]
        # Both must hold their slots before Send (the client joins the queue from a thread: on a loaded machine the
        # browser's message could otherwise start first, and the test would be about a running answer instead).
        deadline = time.monotonic() + 60
        while not all(job.status().code in (Status.PROCESSING, Status.ITERATING) for job in busy):
            assert time.monotonic() < deadline, [job.status().code for job in busy]
            time.sleep(0.02)
        browser.evaluate(TYPE_MESSAGE_JS % json.dumps("Describe the picture."))
        browser.evaluate("document.querySelector('#parrot-send').click(); "
                         "setTimeout(() => document.querySelector('#parrot-clear').click(), 200); true")
        for job in busy:
            job.result(timeout=120)
        time.sleep(2.0)  # an answer that was not cancelled runs now and writes the chat back
        assert browser.evaluate(USER_TEXTS_JS) == []
        # The next message starts the new conversation. In Arabic it reads right to left in the left-to-right page: the
        # closing "!" (a neutral character) is drawn at the left end of the line, after the sentence, not before it.
        arabic = "محادثة جديدة!"
        browser.evaluate(TYPE_MESSAGE_JS % json.dumps(arabic))
        browser.evaluate("document.querySelector('#parrot-send').click()")
        browser.wait_for(f"({BOT_TEXT_JS}).trim().length > 0", timeout=60)
        assert browser.evaluate(USER_TEXTS_JS) == [arabic]
        first, mark = browser.evaluate(CHAR_X_JS % (json.dumps("#parrot-chatbot [data-testid=user] p"),
                                                    json.dumps("م"), json.dumps("!")))
        assert mark < first, (mark, first)
    finally:
        browser.close()
    keep = os.environ.get("PARROT_DEMO_SCREENSHOT")  # e.g. to look at it after a CI run
    if keep:
        shutil.copy(shot, keep)
    image = Image.open(shot)
    assert image.size == (1400, 1000)
    assert len(np.unique(np.asarray(image.convert("L")))) > 20  # a rendered page, not a blank frame
