"""The web chat page at `/`, driven in a real (headless) Chromium against a real `shoal serve`."""

import json
import re
from pathlib import Path
from urllib.parse import urlsplit

import pytest
from playwright.sync_api import Page, Route, expect, sync_playwright

CHROMIUM = Path("/usr/bin/chromium")
BUSY = re.compile(r"\bbusy\b")
NO_CAPACITY = {"error": {"message": "no online worker serves 'demo' now", "type": "service_unavailable_error",
                         "param": None, "code": "no_capacity"}}


def chromium_installed() -> None:
    assert CHROMIUM.exists(), f"{CHROMIUM} is missing: install Debian's chromium (apt-get install -y chromium)"


def test_chromium_is_installed():
    chromium_installed()  # fails, never skips: these tests need a browser


@pytest.fixture(scope="module")
def browser():
    chromium_installed()
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=["--no-sandbox"])
        yield browser
        browser.close()


@pytest.fixture
def page(browser, server_url) -> Page:
    context = browser.new_context(base_url=server_url)
    page = context.new_page()
    page.set_default_timeout(10_000)
    yield page
    context.close()


@pytest.fixture
def posted(page) -> list[dict]:
    """The JSON bodies the page posts to /v1/chat/completions."""
    bodies = []

    def record(request) -> None:
        if request.url.endswith("/v1/chat/completions"):
            bodies.append(json.loads(request.post_data))

    page.on("request", record)
    return bodies


def open_chat(page: Page, temperature: str = "0") -> None:
    page.goto("/")
    expect(page.locator("#model option")).to_have_text(["demo"])
    page.fill("#temperature", temperature)


def ask(page: Page, text: str, enter: bool = False) -> None:
    page.fill("#prompt", text)
    if enter:
        page.press("#prompt", "Enter")
    else:
        page.click("#send")
    expect(page.locator("body")).not_to_have_class(BUSY)


def test_chat_streams_answers_and_keeps_the_conversation(page: Page, posted: list[dict]):
    open_chat(page)
    ask(page, "What is 12 + 30?")
    answers = page.locator(".msg.assistant")
    expect(answers).to_have_text(["12 + 30 = 42"])
    ask(page, "Capital of Peru?", enter=True)
    expect(answers).to_have_text(["12 + 30 = 42", "The capital of Peru is Lima."])
    expect(page.locator(".msg.user")).to_have_text(["What is 12 + 30?", "Capital of Peru?"])
    expect(page.locator(".error")).to_have_count(0)

    first, second = posted
    assert first["stream"] is True and first["temperature"] == 0 and first["model"] == "demo"
    assert second["messages"] == [{"role": "user", "content": "What is 12 + 30?"},
                                  {"role": "assistant", "content": "12 + 30 = 42"},
                                  {"role": "user", "content": "Capital of Peru?"}]
    assert first["session_id"] and second["session_id"] == first["session_id"]

    page.click("#new")
    expect(page.locator(".msg")).to_have_count(0)
    ask(page, "Capital of Peru?")
    expect(answers).to_have_text(["The capital of Peru is Lima."])
    third = posted[2]
    assert third["messages"] == [{"role": "user", "content": "Capital of Peru?"}]
    assert third["session_id"] != first["session_id"]


def test_stop_keeps_what_arrived(page: Page, posted: list[dict]):
    def endless(route: Route) -> None:  # the demo model's replies are short: have it ignore its end of text
        route.continue_(post_data=json.dumps({**json.loads(route.request.post_data), "ignore_eos": True}))

    page.route("**/v1/chat/completions", endless)
    open_chat(page, temperature="1")
    page.click("text=Advanced")
    page.fill("#max-tokens", "400")
    page.fill("#prompt", "Hello! Tell me everything you can do.")
    page.click("#send")
    expect(page.locator("body")).to_have_class(BUSY)
    expect(page.locator("#send")).to_be_disabled()
    answer = page.locator(".msg.assistant")
    expect(answer).not_to_have_text("")
    page.click("#stop")
    expect(page.locator("body")).not_to_have_class(BUSY)
    expect(answer).to_have_class(re.compile(r"\bstopped\b"))
    kept = answer.text_content()
    assert kept
    page.wait_for_timeout(200)
    assert answer.text_content() == kept, "text kept arriving after stop"
    assert posted[0]["max_tokens"] == 400

    page.unroute("**/v1/chat/completions")  # the same session goes on (the server has let the stopped job go)
    page.fill("#max-tokens", "")  # the stopped reply may have used much of the context
    ask(page, "What is 12 + 30?")
    expect(page.locator(".error")).to_have_count(0)
    assert posted[-1]["messages"][1] == {"role": "assistant", "content": kept}


def test_http_error_is_shown_plainly(page: Page):
    page.route("**/v1/chat/completions", lambda route: route.fulfill(
        status=503, content_type="application/json", body=json.dumps(NO_CAPACITY)))
    open_chat(page)
    ask(page, "What is 12 + 30?")
    expect(page.locator(".error")).to_contain_text("no online worker serves 'demo' now")
    expect(page.locator(".msg.assistant")).to_have_count(0)
    expect(page.locator("#prompt")).to_have_value("What is 12 + 30?")  # given back to send again


def test_thinking_and_stream_errors_render_as_text(page: Page):
    def chunk(**delta) -> str:
        return "data: " + json.dumps({"choices": [{"index": 0, "delta": delta, "finish_reason": None}]}) + "\n\n"

    sse = (chunk(role="assistant", reasoning_content="Let me think") + chunk(reasoning_content=" <i>hard</i>.")
           + chunk(content="<b>bold</b> ") + chunk(content="claim") + 'data: {"error": {"message": "worker lost"}}\n\n'
           + "data: [DONE]\n\n")
    page.route("**/v1/chat/completions", lambda route: route.fulfill(
        status=200, content_type="text/event-stream", body=sse))
    open_chat(page)
    ask(page, "Think.")
    answer = page.locator(".msg.assistant")
    thinking = answer.locator("details")
    expect(thinking).not_to_have_attribute("open", "")
    expect(thinking).to_contain_text("Let me think <i>hard</i>.")
    expect(answer).to_contain_text("<b>bold</b> claim")
    expect(answer.locator("b, i")).to_have_count(0)
    expect(page.locator(".error")).to_have_text(re.compile("worker lost"))


def test_no_request_leaves_the_server(page: Page, server_url: str):
    urls = []
    page.on("request", lambda r: urls.append(r.url))
    open_chat(page)
    ask(page, "Capital of Peru?")
    expect(page.locator(".msg.assistant")).to_have_text(["The capital of Peru is Lima."])
    assert urls
    assert {urlsplit(u).netloc for u in urls} == {urlsplit(server_url).netloc}, urls
