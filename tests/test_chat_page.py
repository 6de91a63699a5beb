"""The chat page at `/` (qwen35_mlx/server/static/) in a real browser: headless Chromium from
Debian's packages, driven by Selenium through Debian's chromium-driver (the driver built for that
very Chromium, so nothing is downloaded), against the real `qwen35-mlx serve` on a tiny random
checkpoint, started and stopped here.

The reference for what the page shows is what the server sent: a wrapper around `window.fetch`,
installed by the test, keeps each chat request's body and a copy of its event stream, which is
parsed here in Python."""

from __future__ import annotations

import base64
import io
import json
import os
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from PIL import Image
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.support.ui import WebDriverWait

from qwen35_mlx.server.run import free_port

from checkpoints import Spec

# Debian's paths; elsewhere (Homebrew's chromium and chromedriver) the ones on PATH
CHROMIUM = Path(shutil.which("chromium") or "/usr/bin/chromium")
CHROMEDRIVER = Path(shutil.which("chromedriver") or "/usr/bin/chromedriver")
WAIT = 120  # seconds: the first reply also warms the model up on a shared CPU

RECORD_CHAT_REQUESTS = """
window.chatRequests = [];
const originalFetch = window.fetch;
window.fetch = async (url, init) => {
  if (!String(url).endsWith("/v1/chat/completions")) return originalFetch(url, init);
  const record = { body: JSON.parse(init.body), stream: null, aborted: false };
  window.chatRequests.push(record);
  const noteAbort = (error) => { record.aborted = error.name === "AbortError"; };
  try {
    const response = await originalFetch(url, init);
    response.clone().text().then((text) => { record.stream = text; }, noteAbort);
    return response;
  } catch (error) {
    noteAbort(error);
    throw error;
  }
};
"""

# Lengths of the last answer's text at each change of the transcript.
RECORD_ANSWER_LENGTHS = """
window.answerLengths = [];
new MutationObserver(() => {
  const answers = document.querySelectorAll(".message.assistant .answer");
  const last = answers[answers.length - 1];
  if (last) window.answerLengths.push(last.textContent.length);
}).observe(document.getElementById("transcript"), { subtree: true, childList: true });
"""


def wait_until_serving(url: str, server: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + WAIT
    while time.monotonic() < deadline:
        if server.poll() is not None:
            pytest.fail(f"qwen35-mlx serve exited with {server.returncode}:\n{log.read_text()}")
        try:
            with urllib.request.urlopen(f"{url}/v1/models", timeout=2):
                return
        except OSError:
            time.sleep(0.2)
    pytest.fail(f"qwen35-mlx serve did not answer within {WAIT} s:\n{log.read_text()}")


@pytest.fixture(scope="module")
def server_url(make_checkpoint, tmp_path_factory):
    """`qwen35-mlx serve` on a tiny random checkpoint with a vision tower, on a free port."""
    directory, _ = make_checkpoint(Spec(layout="conditional"))
    port = free_port()
    log = tmp_path_factory.mktemp("serve") / "serve.log"
    command = [sys.executable, "-c", "from qwen35_mlx.cli import main; raise SystemExit(main())"]
    with log.open("w") as output:
        server = subprocess.Popen(
            [*command, "serve", "--model", str(directory), "--port", str(port)],
            stdout=output,
            stderr=subprocess.STDOUT,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_serving(url, server, log)
        yield url
    finally:
        server.terminate()
        server.wait(timeout=30)


@pytest.fixture(scope="module")
def browser():
    missing = [str(path) for path in (CHROMIUM, CHROMEDRIVER) if not path.exists()]
    if missing:
        pytest.fail(
            f"{' and '.join(missing)} not found: the chat page test needs Debian's Chromium and "
            "its driver; run .ci/run, or as root: apt-get install -y chromium chromium-driver "
            "(on a Mac: brew install --cask chromium chromedriver)"
        )
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage"):
        options.add_argument(argument)
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
    driver.set_window_size(1000, 900)
    yield driver
    driver.quit()


@pytest.fixture
def page(browser, server_url):
    """The chat page freshly loaded, its chat requests recorded. Its settings ask for greedy
    decoding, in which the random model repeats itself rather than ending, and for 2000 tokens,
    more than a test waits for: so a reply is still streaming when Stop is pressed."""
    browser.set_window_size(1000, 900)
    browser.get(server_url)
    browser.execute_script(
        "localStorage.clear(); sessionStorage.clear();"
        "localStorage.setItem('qwen35-mlx.temperature', '0');"
        "localStorage.setItem('qwen35-mlx.max-tokens', '2000');"
    )
    browser.get(server_url)
    browser.execute_script(RECORD_CHAT_REQUESTS + RECORD_ANSWER_LENGTHS)
    return browser


def wait_for(driver, condition, message: str):
    return WebDriverWait(driver, WAIT, poll_frequency=0.05).until(condition, message=message)


def element(driver, css: str):
    return driver.find_element(By.CSS_SELECTOR, css)


def send(driver, text: str) -> None:
    element(driver, "#message").send_keys(text)
    element(driver, "#send").click()


def is_ready(driver) -> bool:
    return element(driver, "#send").is_enabled() and not element(driver, "#stop").is_displayed()


def last(driver, css: str) -> str:
    """The text of the last reply's elements matching css, folded ones too ("" for none)."""
    return driver.execute_script(
        "const reply = [...document.querySelectorAll('.message.assistant')].pop();"
        "const parts = reply ? [...reply.querySelectorAll(arguments[0])] : [];"
        "return parts.map((part) => part.textContent).join('');",
        css,
    )


def chat_requests(driver) -> list[dict]:
    return driver.execute_script("return window.chatRequests;")


def stream_choices(stream: str):
    """The `choices` entries of an OpenAI event stream's chunks, in order."""
    for line in stream.splitlines():
        if line.startswith("data: ") and line != "data: [DONE]":
            yield from json.loads(line.removeprefix("data: ")).get("choices", [])


def streamed(stream: str, field: str) -> str:
    """The concatenated `delta[field]` of an OpenAI event stream."""
    return "".join(choice["delta"].get(field) or "" for choice in stream_choices(stream))


def finish_reason(stream: str) -> str | None:
    reasons = [choice["finish_reason"] for choice in stream_choices(stream)]
    return next((reason for reason in reversed(reasons) if reason), None)


def letters(text: str) -> str:
    """The letters of a text: markdown rendering drops markup, whitespace, ordered-list numbers,
    code fences' info strings and link targets, and keeps every other letter in order."""
    return "".join(character for character in text if character.isalpha())


def is_subsequence(part: str, whole: str) -> bool:
    rest = iter(whole)
    return all(character in rest for character in part)


def png(color: tuple[int, int, int], size=(40, 28)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, format="PNG")
    return buffer.getvalue()


def data_url(image: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(image).decode()


def set_max_tokens(driver, count: int) -> None:
    element(driver, "#settings summary").click()
    element(driver, "#max-tokens").clear()
    element(driver, "#max-tokens").send_keys(str(count))


def stop_mid_stream(driver) -> None:
    """Presses Stop once the reply has started to show, while it still streams."""
    wait_for(driver, lambda d: last(d, ".thoughts, .answer").strip(), "no reply text appeared")
    assert element(driver, "#stop").is_displayed(), "the reply ended before Stop could be pressed"
    element(driver, "#stop").click()
    wait_for(driver, is_ready, "the page did not return to ready after Stop")


def test_a_reply_streams_into_the_page(page):
    set_max_tokens(page, 48)
    send(page, "Hello")
    wait_for(page, lambda d: chat_requests(d) and chat_requests(d)[0]["stream"], "no reply ended")
    wait_for(page, is_ready, "the page did not return to ready")
    [request] = chat_requests(page)
    assert request["body"]["messages"] == [{"role": "user", "content": "Hello"}]
    assert request["body"]["stream"] is True
    assert request["body"]["max_tokens"] == 48
    assert request["body"]["temperature"] == 0
    assert request["body"]["chat_template_kwargs"] == {"enable_thinking": False}

    sent = streamed(request["stream"], "content")
    shown = last(page, ".answer")
    assert letters(sent), f"the reply had no letters to compare: {sent!r}"
    assert is_subsequence(letters(shown), letters(sent))
    if "```" not in sent and "](" not in sent:  # no fence info string or link target to drop
        assert letters(shown) == letters(sent)
    lengths = page.execute_script("return window.answerLengths;")
    assert len(set(lengths) - {0}) >= 2, f"the reply appeared at once, not streamed: {lengths}"
    assert element(page, "#status").text == "Ready"
    if finish_reason(request["stream"]) == "length":
        assert last(page, ".note") == "Stopped at the token limit."


def test_images_by_file_picker_and_drop_are_sent_as_data_urls(page, tmp_path):
    picked, dropped = png((200, 30, 30)), png((30, 30, 200), size=(24, 36))
    (tmp_path / "picked.png").write_bytes(picked)
    element(page, "#image-input").send_keys(str(tmp_path / "picked.png"))
    thumbnails = "#attachments img.thumbnail"
    wait_for(page, lambda d: d.find_elements(By.CSS_SELECTOR, thumbnails), "no thumbnail")
    page.execute_script(
        """
        const [image, name] = arguments;
        const bytes = Uint8Array.from(atob(image), (c) => c.charCodeAt(0));
        const files = new DataTransfer();
        files.items.add(new File([bytes], name, { type: "image/png" }));
        files.items.add(new File(["not an image"], "notes.txt", { type: "text/plain" }));
        for (const type of ["dragover", "drop"]) {
          const init = { dataTransfer: files, bubbles: true, cancelable: true };
          document.getElementById("transcript").dispatchEvent(new DragEvent(type, init));
        }
        """,
        base64.b64encode(dropped).decode(),
        "dropped.png",
    )
    wait_for(page, lambda d: len(d.find_elements(By.CSS_SELECTOR, thumbnails)) == 2, "no drop")
    sources = [img.get_attribute("src") for img in page.find_elements(By.CSS_SELECTOR, thumbnails)]
    assert sources == [data_url(picked), data_url(dropped)]
    assert "notes.txt" in element(page, "#status").text  # refused, and said so

    send(page, "What colours are these?")
    stop_mid_stream(page)
    [request] = chat_requests(page)
    assert request["body"]["messages"] == [
        {
            "role": "user",
            "content": [
                {"type": "image_url", "image_url": {"url": data_url(picked)}},
                {"type": "image_url", "image_url": {"url": data_url(dropped)}},
                {"type": "text", "text": "What colours are these?"},
            ],
        }
    ]
    assert page.find_elements(By.CSS_SELECTOR, thumbnails) == []  # the tray is emptied
    shown = page.find_elements(By.CSS_SELECTOR, ".message.user img.thumbnail")
    assert [img.get_attribute("alt") for img in shown] == ["picked.png", "dropped.png"]
    assert page.find_elements(By.CSS_SELECTOR, ".message.error") == []  # the server took them


def test_stop_ends_the_stream_and_the_server_answers_the_next_message(page):
    element(page, "#thinking").click()
    send(page, "Think about a long story")
    wait_for(page, lambda d: last(d, ".thoughts").strip(), "no thinking appeared")
    thinking = element(page, ".message.assistant details.thinking")
    assert thinking.get_attribute("open") is None  # folded
    stop_mid_stream(page)
    assert element(page, "#status").text == "Stopped"
    assert last(page, ".note") == "Stopped."
    assert page.execute_script("return window.chatRequests[0].aborted;")  # the fetch was cut
    shown = last(page, ".thoughts, .answer, .note")
    shown_answer = last(page, ".answer")
    time.sleep(0.5)
    assert last(page, ".thoughts, .answer, .note") == shown  # nothing arrives after Stop

    send(page, "Go on")  # one request runs at a time: this answers only if Stop freed the slot
    wait_for(page, lambda d: len(chat_requests(d)) == 2, "the second message was not sent")
    first, second = chat_requests(page)
    assert first["body"]["chat_template_kwargs"] == {"enable_thinking": True}
    history = second["body"]["messages"]
    assert history[0] == first["body"]["messages"][0]
    assert history[-1] == {"role": "user", "content": "Go on"}
    # The stopped reply's answer goes back with the conversation when it had one.
    assert [m["role"] for m in history[1:-1]] == (["assistant"] if shown_answer else [])
    stop_mid_stream(page)


def test_escape_stops_and_new_chat_clears_the_conversation(page):
    send(page, "Hello")
    wait_for(page, lambda d: last(d, ".answer").strip(), "no reply text appeared")
    element(page, "#message").send_keys(Keys.ESCAPE)
    wait_for(page, is_ready, "Escape did not stop the reply")
    assert last(page, ".note") == "Stopped."
    element(page, "#message").send_keys("a draft")
    element(page, "#new-chat").click()
    assert page.find_elements(By.CSS_SELECTOR, "#transcript > *") == []
    assert element(page, "#message").get_attribute("value") == ""
    send(page, "Hi again")
    wait_for(page, lambda d: len(chat_requests(d)) == 2, "the new chat's message was not sent")
    assert chat_requests(page)[1]["body"]["messages"] == [{"role": "user", "content": "Hi again"}]
    stop_mid_stream(page)


def test_a_refused_message_is_shown_and_given_back_for_editing(page, tmp_path):
    (tmp_path / "broken.png").write_bytes(b"not an image")
    element(page, "#image-input").send_keys(str(tmp_path / "broken.png"))
    send(page, "Look")
    wait_for(page, is_ready, "the page did not return to ready")
    error = element(page, ".message.assistant.error")
    assert error.get_attribute("role") == "alert"
    assert error.text.startswith("Error 400: the data: URL is not an image")  # the server's words
    assert element(page, "#status").text == "Error"
    assert "unsent" in element(page, ".message.user").get_attribute("class").split()
    assert element(page, "#message").get_attribute("value") == "Look"  # given back
    element(page, "#attachments button.remove").click()  # drop the broken image, send again
    assert page.find_elements(By.CSS_SELECTOR, "#attachments li") == []
    element(page, "#send").click()
    stop_mid_stream(page)
    # The refused message is no part of the conversation.
    assert chat_requests(page)[1]["body"]["messages"] == [{"role": "user", "content": "Look"}]


HOSTILE = (
    'Hi <img src=x onerror="window.injected=1"> and <script>window.injected=2</script>\n\n'
    "**<b>bold</b>** [click](javascript:window.injected=3) [site](https://example.com/a)\n\n"
    "```\n<svg onload=window.injected=4></svg>\n```\n\n"
    "- <iframe src=javascript:window.injected=5></iframe>"
)


def test_model_output_is_shown_as_text_never_as_html(page):
    rendered = page.execute_script(
        """
        const reply = appendReply();
        reply.text = reply.thinking = arguments[0];
        finishReply(reply);
        return new Promise((resolve) => setTimeout(() => resolve({
          tags: [...reply.element.querySelectorAll("*")].map((e) => e.tagName.toLowerCase()),
          links: [...reply.element.querySelectorAll("a")].map((a) => a.getAttribute("href")),
          thoughts: reply.thoughts.textContent,
          answer: reply.answer.textContent,
          injected: window.injected ?? null,
        }), 300));
        """,
        HOSTILE,
    )
    assert rendered["injected"] is None
    assert set(rendered["tags"]) <= {"details", "summary", "div", "p", "br", "strong", "a"} | {
        "pre",
        "code",
        "ul",
        "li",
    }, rendered["tags"]
    assert rendered["links"] == ["https://example.com/a"]
    assert rendered["thoughts"] == HOSTILE
    for markup in (
        '<img src=x onerror="window.injected=1">',
        "<script>window.injected=2</script>",
        "<b>bold</b>",
        "[click](javascript:window.injected=3)",
        "<svg onload=window.injected=4></svg>",
        "<iframe src=javascript:window.injected=5></iframe>",
    ):
        assert markup in rendered["answer"]


def test_markdown_subset_renders_as_written(page):
    html = page.execute_script(
        "const box = document.createElement('div');"
        "box.append(renderMarkdown(arguments[0]));"
        "return box.innerHTML;",
        "# Title\nSay **hi** to `a_b` and *you*, __too__ _now_; snake_case_name stays.\n"
        "second line\n\n- one\n- two\n\n3. three\n4. four\n\n```python\nx < y\n\n```\n"
        "[docs](http://example.com/x) [file](file:///etc/passwd)",
    )
    assert html == (
        "<h3>Title</h3>"
        "<p>Say <strong>hi</strong> to <code>a_b</code> and <em>you</em>, <strong>too</strong> "
        "<em>now</em>; snake_case_name stays.<br>second line</p>"
        "<ul><li>one</li><li>two</li></ul>"
        '<ol start="3"><li>three</li><li>four</li></ol>'
        "<pre><code>x &lt; y\n</code></pre>"
        '<p><a href="http://example.com/x" rel="noopener noreferrer" target="_blank">docs</a> '
        "[file](file:///etc/passwd)</p>"
    )


def test_page_fits_a_narrow_window_and_names_its_controls(page, tmp_path, capsys):
    (tmp_path / "picture.png").write_bytes(png((40, 160, 90)))
    element(page, "#image-input").send_keys(str(tmp_path / "picture.png"))
    set_max_tokens(page, 64)
    element(page, "#settings summary").click()  # folded again
    send(page, "What is in this picture? Answer in **one** line.")
    wait_for(page, is_ready, "the page did not return to ready")
    unnamed = page.execute_script(
        """
        const controls = [...document.querySelectorAll("button, input, textarea, summary")];
        const named = (c) =>
          c.getAttribute("aria-label") || c.labels?.length || c.textContent.trim();
        return controls.filter((c) => !named(c)).map((c) => c.outerHTML);
        """
    )
    assert unnamed == []
    screenshots = []
    for width, height in ((1000, 900), (380, 800)):
        page.set_window_size(width, height)
        overflow = page.execute_script(
            "const root = document.documentElement; return root.scrollWidth - root.clientWidth;"
        )
        assert overflow <= 0, f"at {width}px the page scrolls sideways by {overflow}px"
        for control in ("#send", "#new-chat", "#thinking", "label[for=image-input]"):
            assert element(page, control).is_displayed()
        path = tmp_path / f"chat-page-{width}px.png"
        assert page.save_screenshot(str(path))
        with Image.open(path) as image:
            assert image.format == "PNG" and image.width > 0
        screenshots.append(path)
    with capsys.disabled():
        print("\nchat page screenshots:", *map(os.fspath, screenshots), sep="\n  ")
