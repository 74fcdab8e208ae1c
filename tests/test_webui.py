"""The playground page of ``loramux serve`` (``/``) in a real browser (headless Chromium through Selenium),
against a real server on loopback: one server and one browser for the module.

Oracle for answers: the page's answer of a column must equal the API's own answer for that column's
mix (a chat completion, temperature 0, fixed seed; the columns' requests sent at once, as the page
sends them, so that they decode in one batch as the page's do). The negative control: the two
columns' mixes answer this prompt differently, so a column showing the other's answer fails. The token strip is checked against ``POST /v1/routing/tokens``'s JSON, and
that route against a fixed mix (a 400). Screenshots of every state go to pytest's tmp folder; with
``LORAMUX_WEBUI_SCREENSHOT=PATH`` the four-column state is also written to PATH (docs/playground.png).

Without Chromium the browser tests skip, except under ``CI`` where they fail.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import io
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import httpx
import pytest

from conftest import FIXTURES, ROUTER_TASKS
from serve_proc import loramux_server

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
LATE = "dyck_languages"  # loaded and unloaded through the page
PROMPT = "Explain in one sentence what a boolean expression is."
MAX_TOKENS = 32
SEED = 42
SLIDER_STEPS = 14  # arrow-right presses on a slider: 14 x 0.05 = 0.70
WAIT_S = 120


# --- the server -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def adapter_dir(tmp_path_factory, small_pool_dir):
    folder = tmp_path_factory.mktemp("webui-adapters")
    for name in ROUTER_TASKS:
        shutil.copytree(small_pool_dir / name, folder / name)
    shutil.copytree(FIXTURES / LATE, folder / "later" / LATE)  # not loaded at start (one level deeper)
    return folder


@pytest.fixture(scope="module")
def server(tmp_path_factory, adapter_dir, base_model):
    config = tmp_path_factory.mktemp("webui-config") / "serve.toml"
    config.write_text("n_seq_max = 4\nn_ctx = 512\n[mixes]\nlogic = { boolean_expressions = 0.7, navigate = 0.3 }\n")
    args = ["--config", str(config), "--base", str(base_model), "--adapters", str(adapter_dir), "--router", "pooled:arrow"]
    with loramux_server(*args, "--threads", "2", log_dir=config.parent) as url:
        yield url


def chat_body(fields: dict, **more) -> dict:
    """The request a column sends (its ``model`` / ``mix`` fields), whole."""
    messages = [{"role": "user", "content": PROMPT}]
    return {**fields, "messages": messages, "max_tokens": MAX_TOKENS, "temperature": 0, "seed": SEED, **more}


def api_answer(server: str, fields: dict) -> dict:
    """The API's answer to a column's request (a chat completion, not streamed)."""
    r = httpx.post(f"{server}/v1/chat/completions", json=chat_body(fields), timeout=WAIT_S)
    assert r.status_code == 200, r.text
    return r.json()


def api_answers(server: str, mixes: list[dict]) -> list[dict]:
    """The API's answers to the columns' requests, sent at once as the page sends them (so they decode in
    one batch too), in order."""
    with concurrent.futures.ThreadPoolExecutor(len(mixes)) as pool:
        return list(pool.map(lambda fields: api_answer(server, fields), mixes))


def text_of(answer: dict) -> str:
    return answer["choices"][0]["message"]["content"]


# --- the browser ----------------------------------------------------------------------------------


def _no_browser(why: str) -> None:
    if os.environ.get("CI"):
        pytest.fail(f"the playground's browser test needs Chromium under CI: {why} (scripts/setup.sh --dev installs it)")
    pytest.skip(f"no browser: {why}")


@pytest.fixture(scope="module")
def driver():
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        _no_browser("selenium is not installed (pip install -e '.[dev]')")
    if not (Path(CHROMIUM).exists() and Path(CHROMEDRIVER).exists()):
        _no_browser(f"{CHROMIUM} or {CHROMEDRIVER} is missing (apt-get install chromium chromium-driver)")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1400,1000"):
        options.add_argument(arg)
    browser = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    browser.set_script_timeout(WAIT_S)
    yield browser
    browser.quit()


@pytest.fixture
def page(driver, server):
    """The playground freshly opened (its adapters and models read)."""
    driver.get(f"{server}/")
    wait(driver, lambda d: d.find_element("tag name", "body").get_attribute("data-ready") == "true")
    return driver


def wait(driver, until, timeout: float = WAIT_S):
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, timeout).until(until)


def shot(driver, tmp_path: Path, name: str) -> Path:
    """A screenshot of the whole page (the window grown to its height) in pytest's tmp folder."""
    for _ in range(2):  # the page's height at this window size (grown once, the layout may move)
        height = driver.execute_script("return document.documentElement.scrollHeight")
        driver.set_window_size(1400, max(1000, height + 140))
    path = tmp_path / f"{name}.png"
    assert driver.save_screenshot(str(path)), path
    return path


def choose(driver, column: int, kind: str) -> None:
    """Pick a column's mix: ``sliders``, ``base``, ``text`` or ``model:ID``."""
    from selenium.webdriver.support.ui import Select

    Select(driver.find_element("id", f"mix-kind-{column}")).select_by_value(kind)


def columns(driver, n: int) -> None:
    from selenium.webdriver.support.ui import Select

    Select(driver.find_element("id", "column-count")).select_by_value(str(n))


def send(driver, n: int, *, keyboard: bool = False) -> None:
    """Send the prompt to every column (the button, or Ctrl+Enter in the prompt); wait until all of them have
    answered (or failed) and the status says so."""
    from selenium.webdriver.common.keys import Keys

    driver.find_element("id", "prompt").clear()
    driver.find_element("id", "prompt").send_keys(PROMPT)
    for field, value in (("max-tokens", MAX_TOKENS), ("temperature", 0), ("seed", SEED)):
        driver.find_element("id", field).clear()
        driver.find_element("id", field).send_keys(str(value))
    if keyboard:
        driver.find_element("id", "prompt").send_keys(Keys.CONTROL, Keys.ENTER)
    else:
        driver.find_element("id", "send-button").click()
    wait(driver, lambda d: d.find_element("id", "batch-status").text.startswith(f"{n} request"))


def column_text(driver, column: int, part: str) -> str:
    return driver.find_element("css selector", f"#column-{column} .{part}").text


def listed_rows(driver) -> list[str]:
    """The adapters the page's table lists (read in one script: the table is re-rendered as the list changes)."""
    return driver.execute_script("return [...document.querySelectorAll('#adapter-rows tr[data-adapter]')].map((r) => r.dataset.adapter)")


def api_adapters(server: str) -> list[str]:
    return [a["id"] for a in httpx.get(f"{server}/v1/adapters").json()["data"]]


# --- no browser: the page, its files, --no-webui ------------------------------------------------


def test_the_page_and_its_files_are_served_and_fetch_nothing_from_elsewhere(server):
    from loramux.server.webui_routes import ASSETS, WEBUI_DIR

    page = httpx.get(f"{server}/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html"), page.headers
    assert 'src="webui/app.js"' in page.text and 'href="webui/style.css"' in page.text
    for name, kind in ASSETS.items():
        r = httpx.get(f"{server}/webui/{name}")
        assert r.status_code == 200 and r.headers["content-type"] == kind and r.text == (WEBUI_DIR / name).read_text()
    other = httpx.get(f"{server}/webui/settings.py")  # nothing else in the package is served
    assert other.status_code == 404 and other.json()["error"]["code"] == "not_found"
    assert httpx.get(f"{server}/webui/..%2Fsettings.py").status_code == 404
    shipped = sorted(p.name for p in WEBUI_DIR.iterdir())
    assert shipped == sorted(["index.html", *ASSETS]), shipped
    for path in WEBUI_DIR.iterdir():  # no CDN, no web font, no absolute URL at all: the page works offline
        text = path.read_text()
        assert not re.search(r"https?://|(src|href)=[\"']//|url\(\s*[\"']?//|@import", text), f"{path.name} names another origin"
    assert "/v1/routing/tokens" in httpx.get(f"{server}/openapi.json").json()["paths"]


def test_no_webui_turns_the_page_off(tmp_path, base_model):
    config = tmp_path / "serve.toml"
    config.write_text("webui = false\n")  # the config key of --no-webui
    with loramux_server("--config", str(config), "--base", str(base_model), "--threads", "1", "--n-ctx", "256", log_dir=tmp_path) as url:
        gone = httpx.get(f"{url}/")
        assert gone.status_code == 404 and gone.json()["error"]["code"] == "not_found"
        assert httpx.get(f"{url}/webui/app.js").status_code == 404
        assert httpx.get(f"{url}/v1/models").status_code == 200  # the API is still there


def test_with_an_api_key_the_page_is_open_and_asks_for_the_key(driver, tmp_path, base_model):
    """The page holds no data: served without the key (as llama-server's); its API calls need it, typed into the page."""
    key = "webui-test-key"
    args = ["--base", str(base_model), "--api-key", key, "--no-webui", "--webui", "--threads", "1", "--n-ctx", "256"]
    with loramux_server(*args, log_dir=tmp_path) as url:
        assert httpx.get(f"{url}/").status_code == 200 and httpx.get(f"{url}/webui/style.css").status_code == 200
        assert httpx.get(f"{url}/v1/models").status_code == 401
        driver.get(f"{url}/")
        wait(driver, lambda d: d.find_element("tag name", "body").get_attribute("data-ready") == "true")
        line = driver.find_element("id", "server-line")
        assert "Cannot read the server: 401" in line.text and "API key" in line.text  # the server's own message
        driver.find_element("id", "api-key").send_keys(key)
        driver.find_element("id", "prompt").click()  # leaving the field sends its change
        wait(driver, lambda d: "0 adapter(s) loaded" in d.find_element("id", "server-line").text)
        shot(driver, tmp_path, "api-key")


# --- in the browser -------------------------------------------------------------------------------


def test_the_page_lists_the_adapters(page, server, tmp_path):
    assert listed_rows(page) == api_adapters(server) == sorted(ROUTER_TASKS)
    assert "3 adapter(s) loaded" in page.find_element("id", "server-line").text
    sliders = [s.get_attribute("data-adapter") for s in page.find_elements("css selector", "#column-0 input[type=range]")]
    assert sliders == sorted(ROUTER_TASKS)
    for el in page.find_elements("css selector", "input, select, textarea"):  # every field is labelled
        if el.is_displayed():
            assert page.find_elements("css selector", f"label[for='{el.get_attribute('id')}']"), el.get_attribute("outerHTML")
    shot(page, tmp_path, "adapters")


def test_two_columns_answer_as_the_api_does_for_their_mixes(page, server, tmp_path):
    from selenium.webdriver.common.keys import Keys

    columns(page, 2)
    choose(page, 0, "sliders")
    slider = page.find_element("id", "w-0-boolean_expressions")  # set with the keyboard, as a user without a mouse does
    for _ in range(SLIDER_STEPS):
        slider.send_keys(Keys.ARROW_RIGHT)
    choose(page, 1, "base")
    send(page, 2, keyboard=True)
    shown = [column_text(page, i, "answer") for i in range(2)]
    mixes = [{"model": "loramux", "mix": {"boolean_expressions": 0.7}}, {"model": "loramux"}]
    api = api_answers(server, mixes)
    assert api[0]["mix"] == {"boolean_expressions": 0.7} and api[1]["mix"] == {}
    assert text_of(api[0]) != text_of(api[1])  # negative control: the two mixes answer differently, so a swap is caught
    assert shown == [text_of(a) for a in api], (shown, [text_of(a) for a in api])
    assert "boolean_expressions 0.70" in column_text(page, 0, "used") and "base model" in column_text(page, 1, "used")
    status = page.find_element("id", "batch-status").text
    assert "decoded together in one batch" in status and "tokens/s" in status, status
    assert re.search(r"\d+ tokens? at [\d.]+ tokens/s", column_text(page, 0, "used"))
    shot(page, tmp_path, "two-columns")
    by_curl, by_python = _run_saved_forms(*_check_saved_forms(page))
    assert by_curl == text_of(api[0]) and by_python.startswith(by_curl)
    assert "{'boolean_expressions': 0.7}" in by_python  # the mix the answer reports, printed by the snippet


def _check_saved_forms(page) -> None:
    """Column 0's mix as a [mixes] entry of the config (TOML), as curl and as Python with extra_body."""
    import tomllib

    page.find_element("css selector", "#column-0 details.save summary").click()
    page.find_element("id", "save-name-0").clear()
    page.find_element("id", "save-name-0").send_keys("bool_mix")
    page.find_element("css selector", "#column-0 .show-toml").click()
    text = page.find_element("id", "save-text-0").get_attribute("value")
    assert tomllib.loads(text) == {"mixes": {"bool_mix": {"boolean_expressions": 0.7}}}, text
    page.find_element("css selector", "#column-0 .show-curl").click()
    curl = page.find_element("id", "save-text-0").get_attribute("value")
    assert curl.startswith("curl -s ") and '"mix":{"boolean_expressions":0.7}' in curl, curl
    page.find_element("css selector", "#column-0 .show-python").click()
    python = page.find_element("id", "save-text-0").get_attribute("value")
    assert 'extra_body={"mix": {"boolean_expressions":0.7}}' in python, python
    return curl, python


def _run_saved_forms(curl: str, python: str) -> list[str]:
    """The copied curl command (through bash) and Python (the openai client) run for real: the answers they get."""
    done = subprocess.run(["bash", "-c", curl], capture_output=True, text=True, timeout=WAIT_S)
    assert done.returncode == 0, done.stderr
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        exec(compile(python, "<playground python>", "exec"), {})
    return [json.loads(done.stdout)["choices"][0]["message"]["content"], printed.getvalue()]


def test_auto_shows_the_routers_scores(page, server, tmp_path):
    columns(page, 1)
    choose(page, 0, "model:auto")
    send(page, 1)
    routing = api_answer(server, {"model": "auto"})["routing"]
    rows = page.find_elements("css selector", "#column-0 .score-table tr[data-adapter]")
    assert [r.get_attribute("data-adapter") for r in rows] == list(routing["scores"]) and len(rows) == len(ROUTER_TASKS)
    for row in rows:
        score = float(row.find_element("css selector", ".score").text)
        assert score == pytest.approx(routing["scores"][row.get_attribute("data-adapter")], abs=1e-3)
    assert f"top: {routing['top1']}" in column_text(page, 0, "scores")
    assert "auto" in column_text(page, 0, "used")
    shot(page, tmp_path, "auto")


def strip_of(driver, column: int) -> list[dict]:
    """The token strip of a column: each token's text, adapter, title, aria-label and tabindex (one script)."""
    return driver.execute_script(
        "return [...document.querySelectorAll(`#column-${arguments[0]} .token-strip .token`)].map((t) => ({piece: t.textContent, "
        "adapter: t.dataset.adapter, title: t.title, label: t.getAttribute('aria-label'), tabindex: t.getAttribute('tabindex')}))",
        column,
    )


def check_strip(driver, server: str, body: dict) -> dict:
    """Column 0's strip equals POST /v1/routing/tokens's answer tokens for ``body``: the same pieces, the same adapters."""
    report = httpx.post(f"{server}/v1/routing/tokens", json=body, timeout=WAIT_S).json()
    want = [t for t in report["tokens"] if t["part"] == "answer"]
    shown = strip_of(driver, 0)
    assert [t["piece"] for t in shown] == [t["piece"] for t in want] and len(want) > 3
    assert [t["adapter"] for t in shown] == [t["adapter"] for t in want]
    for token, row in zip(shown, want):  # named without colour: on hover (title) and focus (tabindex, aria-label)
        assert token["tabindex"] == "0" and row["adapter"] in token["title"] and token["label"] == token["title"]
        assert sum(row["shares"].values()) == pytest.approx(1.0, abs=1e-3)
    legend = [li.text for li in driver.find_elements("css selector", "#column-0 .legend li")]
    assert sorted(legend) == sorted({t["adapter"] for t in want})
    return report


def test_an_arrow_column_shows_the_adapter_of_every_token(page, server, tmp_path):
    from selenium.webdriver.support.ui import Select

    columns(page, 1)
    choose(page, 0, "model:arrow")
    send(page, 1)
    wait(page, lambda d: d.find_elements("css selector", "#column-0 .token-strip .token"))
    answer = column_text(page, 0, "answer")
    body = {"model": "arrow", "messages": [{"role": "user", "content": PROMPT}], "answer": answer}
    report = check_strip(page, server, body)
    assert report["mix"] == {"mode": "arrow", "k": 3, "temperature": 1.0} and report["weights"] is None
    assert "".join(t["piece"] for t in report["tokens"] if t["part"] == "answer") == answer
    shot(page, tmp_path, "arrow")
    Select(page.find_element("id", "strip-weights-0")).select_by_value("attn_q")  # the shares at the attention queries only
    wait(page, lambda d: d.find_element("css selector", "#column-0 .strip").get_attribute("data-weights") == "attn_q")
    by_kind = check_strip(page, server, {**body, "weights": ["attn_q"]})
    assert [t["adapter"] for t in by_kind["tokens"]] != [t["adapter"] for t in report["tokens"]]  # another picture indeed
    shot(page, tmp_path, "arrow-attn-q")
    fixed = httpx.post(f"{server}/v1/routing/tokens", json={**body, "model": "navigate"}, timeout=WAIT_S)  # negative controls
    err = fixed.json()["error"]
    assert fixed.status_code == 400 and err["param"] == "model" and err["code"] == "invalid_mix" and "routes no token" in err["message"]
    named = httpx.post(f"{server}/v1/routing/tokens", json={**body, "model": "loramux", "mix": "navigate=1"}, timeout=WAIT_S)
    assert named.status_code == 400 and named.json()["error"]["param"] == "mix"
    long = httpx.post(f"{server}/v1/routing/tokens", json={**body, "answer": "word " * 600}, timeout=WAIT_S)
    assert long.status_code == 400 and long.json()["error"]["param"] == "answer" and "at most 512" in long.json()["error"]["message"]
    kind = httpx.post(f"{server}/v1/routing/tokens", json={**body, "weights": ["attn_z"]}, timeout=WAIT_S)
    assert kind.status_code == 400 and kind.json()["error"]["param"] == "weights" and "attn_q" in kind.json()["error"]["message"]


def test_loading_and_unloading_an_adapter_updates_the_list(page, server, tmp_path):
    page.find_element("id", "load-path").send_keys(f"later/{LATE}")
    page.find_element("id", "load-button").click()
    wait(page, lambda d: LATE in listed_rows(d))
    assert LATE in api_adapters(server) and f"Loaded {LATE}" in page.find_element("id", "adapter-message").text
    assert page.find_elements("id", f"w-0-{LATE}")  # a slider for it in every column
    shot(page, tmp_path, "loaded")
    page.find_element("css selector", f"#adapter-rows tr[data-adapter='{LATE}'] button.unload").click()
    wait(page, lambda d: LATE not in listed_rows(d))
    assert LATE not in api_adapters(server) and not page.find_elements("id", f"w-0-{LATE}")
    page.find_element("id", "load-path").clear()
    page.find_element("id", "load-path").send_keys("../elsewhere")
    page.find_element("id", "load-button").click()
    wait(page, lambda d: "Could not load" in d.find_element("id", "adapter-message").text)
    assert listed_rows(page) == sorted(ROUTER_TASKS)


def test_a_bad_mix_shows_the_servers_error(page, server, tmp_path):
    columns(page, 1)
    choose(page, 0, "text")
    page.find_element("id", "mix-text-0").send_keys("no_such_adapter=1")
    send(page, 1)
    r = httpx.post(f"{server}/v1/chat/completions", json=chat_body({"model": "loramux", "mix": "no_such_adapter=1"}))
    assert r.status_code == 400
    shown = column_text(page, 0, "error")
    assert shown == f"400: {r.json()['error']['message']}" and "no_such_adapter" in shown
    assert column_text(page, 0, "answer") == ""
    assert "1 column answered with an error" in page.find_element("id", "batch-status").text
    shot(page, tmp_path, "bad-mix")


def test_four_columns_side_by_side(page, server, tmp_path):
    """Four mixes at once (the README's screenshot: LORAMUX_WEBUI_SCREENSHOT=docs/playground.png)."""
    from selenium.webdriver.support.ui import Select

    columns(page, 4)
    slider = page.find_element("id", "w-0-boolean_expressions")
    page.execute_script("arguments[0].value = 0.7; arguments[0].dispatchEvent(new Event('input'))", slider)
    for column, kind in enumerate(["sliders", "model:auto", "model:arrow", "model:logic"]):
        choose(page, column, kind)
    send(page, 4)
    wait(page, lambda d: d.find_elements("css selector", "#column-2 .token-strip .token"))
    Select(page.find_element("id", "strip-weights-2")).select_by_value("attn_q")
    wait(page, lambda d: d.find_element("css selector", "#column-2 .strip").get_attribute("data-weights") == "attn_q")
    assert all(column_text(page, i, "answer") for i in range(4)) and not any(column_text(page, i, "error") for i in range(4))
    assert "named" in column_text(page, 3, "used")
    path = shot(page, tmp_path, "four-columns")
    if os.environ.get("LORAMUX_WEBUI_SCREENSHOT"):
        shutil.copyfile(path, os.environ["LORAMUX_WEBUI_SCREENSHOT"])
